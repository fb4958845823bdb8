"""vLLM serves a vlrm export with vlrm's rewards: the same rows through vlrm, vLLM offline and vLLM's server, compared.

    python bench/check_vllm.py                                    # Qwen2.5-VL and Qwen3-VL (the acceptance check)
    python bench/check_vllm.py --families qwen2_vl qwen2_5_vl qwen3_vl qwen3_5
    python bench/check_vllm.py --vllm_python /path/to/vllm-venv/bin/python --work_dir /tmp/check_vllm --keep

Per family: a tiny random model of the family is built offline with 32-wide attention heads (``vlrm.tiny``'s
``VLLM_HEAD_DIM``: vLLM's CPU attention refuses 16), given a random score head drawn as training initialises it
(seeded, std 1/sqrt(hidden + 1); the rows' rewards must spread over at least 0.5, checked) and saved as a vlrm
checkpoint; ``python -m vlrm export`` writes it for vLLM. Then every row is scored

- by vlrm: ``RewardScorer.score`` on the checkpoint (float32, the packed layout; vLLM's dtype for Qwen3.5);
- by vLLM offline: ``LLM(EXPORT, runner="pooling").classify`` on ``reward_text(...)`` + the PIL images, with
  ``PoolingParams(use_activation=False)``, and once more with the default parameters (the export's ``problem_type:
  regression`` must make them raw too);
- by vLLM's OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1, the flags the
  export records): ``/classify`` with chat messages and data: URL images, sent by ``vlrm.use.clients``'s
  ``VllmClassifyClient``, and once more without ``use_activation``.

vLLM loads an export only when every parameter is in it and every tensor in it maps to a parameter (its loader
raises otherwise), so a run that scores at all had no missing or unexpected weights. A family passes when every
|vLLM - vlrm| is at most ``--tolerance`` (1e-5, float32). Qwen3.5 runs in bfloat16 on vLLM's CPU build (its Gated
DeltaNet kernel takes nothing else, and only 128-wide linear-attention heads, so this script builds that family's
tiny model with them): it runs only when asked for, is compared with vlrm in bfloat16 to ``BF16_TOLERANCE``, and is
left out of the float32 maximum.

vLLM runs in its own interpreter (``--vllm_python``, default ``$VLLM_PYTHON``, else /work/vllm-venv/bin/python):
this script starts itself there with ``--worker`` (which imports vLLM and nothing of vlrm) for the offline pass, and
the server for the online one; vlrm's side runs here. Nothing is downloaded (``HF_HUB_OFFLINE=1``, no usage stats);
the server binds 127.0.0.1 and is stopped at the end, whatever happens. Prints a table per family, the maximum
differences, and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]

DEFAULT_VLLM_PYTHON = "/work/vllm-venv/bin/python"
DEFAULT_FAMILIES = ("qwen2_5_vl", "qwen3_vl")
BF16_TOLERANCE = 0.05  # |vLLM - vlrm| in bfloat16: a few bf16 steps (1/64 at 2..4) of rewards of a few units
# What vLLM's engine gets on this CPU: small caches (the machine is shared), no compilation (minutes on 2 cores).
ENGINE = {"max_model_len": 2048, "max_num_seqs": 8, "kv_cache_memory_bytes": 256 * 2**20, "enforce_eager": True}
MAX_IMAGES = 2
VLLM_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


# ----------------------------------------------------------------------------------------------------------------
# The worker: runs in vLLM's interpreter, imports vLLM only


def offline_worker(arguments: argparse.Namespace) -> int:
    """Score the requests of ``--requests`` with ``LLM.classify``: raw (``use_activation=False``) and default."""
    from PIL import Image
    from vllm import LLM, PoolingParams, __version__

    job = json.loads(Path(arguments.requests).read_text())
    started = time.perf_counter()
    llm = LLM(
        model=job["model"], runner="pooling", convert=job["convert"], dtype=job["dtype"],
        limit_mm_per_prompt={"image": MAX_IMAGES, "video": 0}, seed=0, **ENGINE,
    )  # fmt: skip
    load_seconds = time.perf_counter() - started
    prompts = []
    for request in job["requests"]:
        images = [Image.open(path).convert("RGB") for path in request["images"]]
        prompt = {"prompt": request["text"]}
        if images:
            prompt["multi_modal_data"] = {"image": images}
        prompts.append(prompt)
    raw = llm.classify(prompts, pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
    default = llm.classify(prompts, use_tqdm=False)
    result = {
        "vllm_version": __version__,
        "load_seconds": load_seconds,
        "raw": [output.outputs.probs for output in raw],
        "default": [output.outputs.probs for output in default],
    }
    Path(arguments.output).write_text(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and rows (vlrm's side)


def build_checkpoint(family: str, work_dir: Path, seed: int) -> Path:
    """A tiny random model of ``family`` that vLLM's CPU build runs, with a random score head, as a vlrm checkpoint."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlrm.model.reward_model import VLRewardModel
    from vlrm.tiny.qwen import VLLM_HEAD_DIM, build_processor, build_tiny_config, build_tokenizer

    base = work_dir / f"tiny-{family}"
    tokenizer = build_tokenizer()
    config = build_tiny_config(tokenizer, family=family, head_dim=VLLM_HEAD_DIM)
    if family in ("qwen3_5", "qwen3_5_moe"):  # vLLM's CPU Gated DeltaNet kernel: 128-wide heads only
        config.text_config.linear_key_head_dim = config.text_config.linear_value_head_dim = 128
    torch.manual_seed(seed)
    AutoModelForImageTextToText.from_config(config).save_pretrained(base)
    build_processor(tokenizer, family).save_pretrained(base)
    model = VLRewardModel.from_pretrained(base)
    hidden_size = config.text_config.hidden_size
    with torch.no_grad():  # the head training starts from (std 1/sqrt(hidden + 1)), drawn from the seed
        model.score.weight.normal_(std=(hidden_size + 1) ** -0.5, generator=torch.Generator().manual_seed(seed))
    checkpoint = work_dir / f"checkpoint-{family}"
    model.save_pretrained(checkpoint)
    AutoProcessor.from_pretrained(base).save_pretrained(checkpoint)
    return checkpoint


def make_rows() -> list[dict]:
    """Rows of every shape a reward request takes: one or two images of several sizes (each resized by the
    processor), an RGBA image, ``<image>`` markers, system and multi-part messages, text only, whitespace."""
    import random

    import numpy as np
    from PIL import Image

    from vlrm.data.synthetic import draw_shapes

    def shapes(color: str, count: int, size: int, seed: int) -> Image.Image:
        return draw_shapes(color, count, size, random.Random(seed))

    red, two, three = shapes("red", 1, 56, 0), shapes("blue", 2, 112, 1), shapes("green", 3, 112, 2)
    wide = shapes("yellow", 2, 112, 3).resize((168, 84))
    translucent = np.zeros((64, 64, 4), dtype=np.uint8)
    translucent[:, :32] = (200, 30, 30, 255)
    translucent = Image.fromarray(translucent, "RGBA")
    question = "What color are the shapes?"
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": [{"type": "text", "text": "Colour of"}, {"type": "image"},
                                     {"type": "text", "text": "?"}]},
    ]  # fmt: skip
    return [
        {"prompt": question, "images": [red], "response": "The shapes are red."},
        {"prompt": question, "images": [red], "response": "The shapes are blue."},
        {"prompt": question, "images": [red], "response": " The shapes are green. "},
        {"prompt": "How many shapes?", "images": [two], "response": "There are two shapes."},
        {"prompt": "How many shapes?", "images": [two], "response": "There are three shapes.\n"},
        {"prompt": "How many shapes?", "images": [wide], "response": "Two."},
        {"prompt": "Left <image> right <image>: which has more shapes?", "images": [red, three],
         "response": "The right one."},
        {"prompt": messages, "images": [translucent], "response": "Red."},
        {"prompt": "Describe a circle.", "images": [], "response": "It is round."},
        {"prompt": "Describe the image in one sentence.", "images": [three],
         "response": "There are three green shapes on a light background: a circle, a square and a triangle."},
    ]  # fmt: skip


def _describe(row: dict) -> str:
    prompt = row["prompt"]
    kind = "messages" if not isinstance(prompt, str) else ("markers" if "<image>" in prompt else "question")
    sizes = "+".join(f"{image.width}x{image.height}" for image in row["images"]) or "text"
    return f"{kind} {sizes} {row['response']!r:.28}"


# ----------------------------------------------------------------------------------------------------------------
# vLLM's side, driven from here


def _vllm_environment(offline: bool) -> dict:
    environment = dict(os.environ, **VLLM_ENV)
    environment.pop("PYTHONPATH", None)  # the vLLM venv must not see this project's packages
    if offline:
        environment["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in the worker's process: one start-up less
    return environment


def run_offline(vllm_python: str, export_dir: Path, rows: list[dict], dtype: str, convert: str, work_dir: Path):
    from transformers import AutoProcessor

    from vlrm.layout.encoder import open_image
    from vlrm.use.export import reward_text

    processor = AutoProcessor.from_pretrained(export_dir)
    requests = []
    for index, row in enumerate(rows):
        paths = []
        for number, image in enumerate(row["images"]):
            path = work_dir / f"{export_dir.name}-row{index}-image{number}.png"
            open_image(image).save(path)  # the RGB pixels vlrm decodes, losslessly
            paths.append(str(path))
        requests.append({"text": reward_text(processor, row["prompt"], row["response"], row["images"]),
                         "images": paths})  # fmt: skip
    job = {"model": str(export_dir), "convert": convert, "dtype": dtype, "requests": requests}
    job_file, output_file = work_dir / f"{export_dir.name}-offline.json", work_dir / f"{export_dir.name}-scores.json"
    job_file.write_text(json.dumps(job))
    command = [vllm_python, str(Path(__file__).resolve()), "--worker", "--requests", str(job_file),
               "--output", str(output_file)]  # fmt: skip
    log = work_dir / f"{export_dir.name}-offline.log"
    with open(log, "w") as log_file:
        completed = subprocess.run(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=_vllm_environment(True), timeout=1200
        )
    if completed.returncode != 0:
        raise RuntimeError(f"vLLM offline worker failed (exit {completed.returncode}); its log, {log}:\n{_tail(log)}")
    return json.loads(output_file.read_text())


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_server(vllm_python: str, export_dir: Path, rows: list[dict], dtype: str, flags: list[str], work_dir: Path):
    """Start vLLM's OpenAI-compatible server on 127.0.0.1, score the rows through ``/classify``, always stop it."""
    from vlrm.use.clients import VllmClassifyClient, classify_request

    port = _free_port()
    engine_flags = ["--max-model-len", str(ENGINE["max_model_len"]), "--max-num-seqs", str(ENGINE["max_num_seqs"]),
                    "--kv-cache-memory-bytes", str(ENGINE["kv_cache_memory_bytes"]), "--enforce-eager"]  # fmt: skip
    command = [
        vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(export_dir), "--host", "127.0.0.1",
        "--port", str(port), "--served-model-name", "vlrm", "--dtype", dtype, "--seed", "0",
        "--limit-mm-per-prompt", json.dumps({"image": MAX_IMAGES, "video": 0}), *flags, *engine_flags,
    ]  # fmt: skip
    log = work_dir / f"{export_dir.name}-server.log"
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=_vllm_environment(False), start_new_session=True
        )
        try:
            _wait_for_health(server, url, log, deadline=time.monotonic() + 900)
            load_seconds = time.perf_counter() - started
            client = VllmClassifyClient(url, model="vlrm", end_of_turn=_reward_token(export_dir), max_workers=4)
            raw = client.score(rows)
            default = []  # the same requests without use_activation: what a client that forgets it gets
            for row in rows:
                body = classify_request(row["prompt"], row["response"], row["images"], client.end_of_turn, "vlrm")
                body.pop("use_activation")
                default.append(_post_json(client.url, body)["data"][0]["probs"][0])
        except BaseException:
            print(f"vLLM server log ({log}):\n{_tail(log)}", file=sys.stderr)
            raise
        finally:
            _stop(server)
    return {"load_seconds": load_seconds, "raw": raw, "default": default, "command": shlex.join(command)}


def _post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=120) as reply:
        return json.loads(reply.read())


def _reward_token(export_dir: Path) -> str:
    return json.loads((export_dir / "config.json").read_text())["vlrm"]["reward_token"]


def _wait_for_health(server: subprocess.Popen, url: str, log: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"vLLM's server exited with {server.returncode} before it was up")
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                url + "/health", timeout=5
            ) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"vLLM's server was not up within the deadline ({log})")


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it started its engine process in it), SIGKILL after 30 s."""
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


# ----------------------------------------------------------------------------------------------------------------
# One family, end to end


def check_family(family: str, arguments: argparse.Namespace, work_dir: Path) -> dict:
    import numpy as np

    from vlrm.use.export import export_for_vllm
    from vlrm.use.scoring import RewardScorer

    bf16 = family in ("qwen3_5", "qwen3_5_moe")
    dtype, tolerance = ("bfloat16", BF16_TOLERANCE) if bf16 else ("float32", arguments.tolerance)
    started = time.perf_counter()
    checkpoint = build_checkpoint(family, work_dir, arguments.seed)
    export_dir = export_for_vllm(checkpoint, work_dir / f"export-{family}")
    flags = json.loads((export_dir / "config.json").read_text())["vlrm"]["vllm"]["serve_flags"]
    convert = flags[flags.index("--convert") + 1] if "--convert" in flags else "auto"
    rows = make_rows()
    vlrm = RewardScorer.from_pretrained(checkpoint, device="cpu", dtype=dtype).score(rows)
    if np.ptp(vlrm) < 0.5:
        raise RuntimeError(f"{family}: the random head gives rewards within {np.ptp(vlrm):.3f}: too flat to compare")
    prepared = time.perf_counter() - started
    offline = run_offline(arguments.vllm_python, export_dir, rows, dtype, convert, work_dir)
    server = run_server(arguments.vllm_python, export_dir, rows, dtype, flags, work_dir)
    offline_raw = np.array([probs[0] for probs in offline["raw"]])
    offline_default = np.array([probs[0] for probs in offline["default"]])
    server_raw, server_default = np.array(server["raw"]), np.array(server["default"])

    print(f"\n{family}: {export_dir} ({dtype}; vLLM {offline['vllm_version']}; server: {server['command']})")
    header = f"{'row':<4}{'request':<52}{'vlrm':>12}{'offline':>12}{'|diff|':>10}{'server':>12}{'|diff|':>10}"
    print(header + "\n" + "-" * len(header))
    for index, row in enumerate(rows):
        print(
            f"{index:<4}{_describe(row):<52}{vlrm[index]:>12.6f}{offline_raw[index]:>12.6f}"
            f"{abs(offline_raw[index] - vlrm[index]):>10.1e}{server_raw[index]:>12.6f}"
            f"{abs(server_raw[index] - vlrm[index]):>10.1e}"
        )
    result = {
        "dtype": dtype,
        "tolerance": tolerance,
        "rows": len(rows),
        "reward_range": [float(vlrm.min()), float(vlrm.max())],  # float32 round-off grows with the rewards' size
        "max_diff_offline": float(np.abs(offline_raw - vlrm).max()),
        "max_diff_server": float(np.abs(server_raw - vlrm).max()),
        # problem_type: regression -> vLLM applies no activation even when the request does not say so.
        "max_diff_default_activation_offline": float(np.abs(offline_default - offline_raw).max()),
        "max_diff_default_activation_server": float(np.abs(server_default - server_raw).max()),
        "missing_or_unexpected_weights": 0,  # vLLM's loader raises on either; it loaded and scored
        "architecture": json.loads((export_dir / "config.json").read_text())["architectures"][0],
        "serve_flags": flags,
        "seconds": {
            "build_export_vlrm": prepared,
            "vllm_offline_load": offline["load_seconds"],
            "vllm_server_load": server["load_seconds"],
            "total": time.perf_counter() - started,
        },  # fmt: skip
        "vllm_version": offline["vllm_version"],
    }
    result["passed"] = all(
        result[key] <= tolerance
        for key in ("max_diff_offline", "max_diff_server", "max_diff_default_activation_offline",
                    "max_diff_default_activation_server")
    )  # fmt: skip
    print(
        f"max |offline - vlrm| {result['max_diff_offline']:.2e}, max |server - vlrm| {result['max_diff_server']:.2e}, "
        f"default activation vs raw: offline {result['max_diff_default_activation_offline']:.1e}, server "
        f"{result['max_diff_default_activation_server']:.1e} (tolerance {tolerance:g}): "
        f"{'PASS' if result['passed'] else 'FAIL'}"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(DEFAULT_FAMILIES),
                        choices=["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"])  # fmt: skip
    parser.add_argument(
        "--vllm_python", default=os.environ.get("VLLM_PYTHON", DEFAULT_VLLM_PYTHON),
        help="the interpreter of a venv with vLLM (default: $VLLM_PYTHON, else %(default)s)",
    )  # fmt: skip
    parser.add_argument("--tolerance", type=float, default=1e-5, help="largest |vLLM - vlrm| allowed in float32")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny models and their score heads")
    parser.add_argument("--work_dir", default=None, help="where models, exports and logs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep --work_dir's contents (a temp dir is removed)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # vLLM's side, in its venv
    parser.add_argument("--requests", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.worker:
        return offline_worker(arguments)
    sys.path.insert(0, str(ROOT))  # vlrm's side only: the worker, in vLLM's venv, must not see this project
    if not Path(arguments.vllm_python).is_file():
        parser.error(
            f"--vllm_python {arguments.vllm_python} not found: point it (or $VLLM_PYTHON) at a venv with vLLM"
        )

    temporary = None if arguments.work_dir else tempfile.TemporaryDirectory(prefix="check_vllm-")
    work_dir = Path(arguments.work_dir or temporary.name)
    work_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        for family in arguments.families:
            results[family] = check_family(family, arguments, work_dir)
    finally:
        if temporary is not None and not arguments.keep:
            temporary.cleanup()
    float32 = [family for family, result in results.items() if result["dtype"] == "float32"]
    passed = all(results[family]["passed"] for family in results)
    summary = {
        "vllm_version": next(iter(results.values()))["vllm_version"],
        "passed": passed,
        "max_diff_float32": max(
            (max(results[f]["max_diff_offline"], results[f]["max_diff_server"]) for f in float32), default=None
        ),  # fmt: skip
        "families": results,
    }
    print(
        f"\n{'PASS' if passed else 'FAIL'}: max |vLLM - vlrm| over the float32 families: {summary['max_diff_float32']}"
    )
    print(json.dumps(summary))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
