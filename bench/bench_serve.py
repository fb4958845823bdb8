"""The HTTP reward server under GRPO-like load, and packed vs padded group scoring, in one run.

    python bench/bench_serve.py                                 # CPU default: about a minute on 2 idle cores
    python bench/bench_serve.py --completions_per_request 8     # each request a whole group
    python bench/bench_serve.py --groups 16 --concurrency 1,4,16 --max_wait_ms 20
    python bench/bench_serve.py --threads 1                     # on a shared machine: less thread contention
    python bench/bench_serve.py --load 1                        # with one CPU-bound process running meanwhile

Workload: the mid-size random Qwen2.5-VL of bench_packing.py, saved as a reward checkpoint; GRPO-like groups, each
one image (about 1,000 visual tokens, sent as base64 PNG) and a 40-token question with 8 completions of 64-256
tokens. The server is `serve_rm.py` in a subprocess on 127.0.0.1. Clients are threads, each with its own keep-alive
http.client connection, taking the next request from one shared list: the requests in flight are consecutive
completions, as when an RL loop scores completions as they come. The groups are dealt into rounds, and in each
round every level sends that round's groups, the levels' order alternating (on a shared machine every level then
sees the same load). Per concurrency level: completions/s over the level's wall time, p50/p99 latency per
request, the mean items per forward (from /info), errors (a reply other than 200) and lost requests (no reply: a
timeout or a dropped connection).

Then, with the server stopped, the same groups scored in this process by RewardScorer(packing=True) and
(packing=False), the two timed group by group in turn (interleaved: on a shared machine both see the same load).
Everything is bounded: a fixed number of requests, a per-request timeout and a deadline for the load (--time_limit_s)
after which no new request is sent. Prints a table, then one JSON line.

``--load N`` starts N CPU-bound processes (a busy loop each, one core's worth) before the server and stops them after
group scoring: the figures of a machine that another job shares. Each stops by itself after the run's time bound too.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import math
import os
import queue
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_packing import PRESETS, build_model, build_processor, token_text  # noqa: E402  the same model and text


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="mid")
    parser.add_argument("--visual_tokens", type=int, default=1000, help="merged visual tokens per image (about)")
    parser.add_argument("--question_tokens", type=int, default=40)
    parser.add_argument("--min_response_tokens", type=int, default=64)
    parser.add_argument("--max_response_tokens", type=int, default=256)
    parser.add_argument("--group_size", type=int, default=8, help="completions per prompt")
    parser.add_argument("--groups", type=int, default=12, help="groups sent at each concurrency level")
    parser.add_argument("--concurrency", default="1,16", help="client threads of each level")
    parser.add_argument("--rounds", type=int, default=2, help="rounds the groups are dealt into (levels alternate)")
    parser.add_argument("--completions_per_request", type=int, default=1)
    parser.add_argument("--max_batch_size", type=int, default=32, help="the server's --max_batch_size")
    parser.add_argument("--max_wait_ms", type=float, default=10.0, help="the server's --max_wait_ms")
    parser.add_argument("--score_groups", type=int, default=4, help="groups timed per layout in group scoring")
    parser.add_argument("--time_limit_s", type=float, default=240.0, help="deadline for the load; then no new request")
    parser.add_argument("--request_timeout_s", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads, of the server and of this process")
    parser.add_argument("--load", type=int, default=0, help="CPU-bound busy-loop processes running meanwhile")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.attn, args.device, args.dtype = "sdpa", "cpu", "float32"  # what bench_packing's builders read
    return args


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint and groups, deterministic from the arguments


def save_checkpoint(args, directory: Path) -> Path:
    processor = build_processor(args)
    model = build_model(args, processor.tokenizer)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def build_groups(args, tokenizer, count: int) -> list[dict]:
    """``count`` groups: {"png": bytes, "question": str, "responses": [str] * group_size}. Images are random 28 x 28
    blocks (one per visual token), so that the PNG stays small on the wire while the model sees ~1,000 tokens."""
    import numpy as np
    from PIL import Image

    rng = random.Random(args.seed)
    side = math.isqrt(args.visual_tokens)
    blocks_wide = math.ceil(args.visual_tokens / side)
    groups = []
    for _ in range(count):
        blocks = np.random.default_rng(rng.randrange(2**31)).integers(0, 256, (side, blocks_wide, 3), np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(blocks.repeat(28, axis=0).repeat(28, axis=1)).save(buffer, format="PNG")
        responses = [
            token_text(tokenizer, rng, rng.randint(args.min_response_tokens, args.max_response_tokens) - 1)
            for _ in range(args.group_size)
        ]
        groups.append({"png": buffer.getvalue(), "question": token_text(tokenizer, rng, args.question_tokens),
                       "responses": responses})  # fmt: skip
    return groups


def request_bodies(groups: list[dict], per_request: int) -> list[bytes]:
    bodies = []
    for group in groups:
        image = base64.b64encode(group["png"]).decode()
        items = [{"prompt": group["question"], "images": [image], "response": text} for text in group["responses"]]
        bodies += [
            json.dumps({"items": items[i : i + per_request]}).encode() for i in range(0, len(items), per_request)
        ]
    return bodies


# ----------------------------------------------------------------------------------------------------------------
# Server and clients (loopback only)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(port: int, path: str, timeout: float = 10.0) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def start_server(args, checkpoint: Path, log_file) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = [
        sys.executable, str(ROOT / "serve_rm.py"), str(checkpoint), "--port", str(port), "--log_level", "warning",
        "--max_batch_size", str(args.max_batch_size), "--max_wait_ms", str(args.max_wait_ms),
        "--max_items", str(max(64, args.completions_per_request)),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))  # torch's intra-op threads in the server
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if get_json(port, "/health", timeout=2).get("status") == "ok":
                return process, port
        except OSError:
            time.sleep(0.25)
    process.kill()
    raise SystemExit("serve_rm.py did not start; its log is above")


def start_cpu_load(count: int, seconds: float) -> list[subprocess.Popen]:
    """``count`` processes that each keep one core busy for at most ``seconds`` (stopped earlier by the caller)."""
    code = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]


def run_load(port: int, bodies: list[bytes], concurrency: int, timeout: float, deadline: float) -> dict:
    """Send every body once from ``concurrency`` threads; latency per request, errors, lost, not sent."""
    work: queue.Queue[bytes] = queue.Queue()
    for body in bodies:
        work.put(body)
    latencies, errors, lost, lock = [], [], [0], threading.Lock()

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        while time.monotonic() < deadline:
            try:
                body = work.get_nowait()
            except queue.Empty:
                break
            start = time.perf_counter()
            try:
                connection.request("POST", "/score", body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                reply = response.read()
            except (OSError, http.client.HTTPException):  # no reply: counted as lost, then a fresh connection
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
                with lock:
                    lost[0] += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - start)
                if response.status != 200:
                    errors.append(f"{response.status}: {reply[:200]!r}")
        connection.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(1.0, deadline - time.monotonic() + timeout))
    wall = time.perf_counter() - start
    return {"latencies": latencies, "errors": errors, "lost": lost[0], "not_sent": work.qsize(), "wall_s": wall}


def measure_levels(args, port: int, groups: list[dict], deadline: float) -> list[dict]:
    """The groups dealt into ``--rounds`` rounds; in each round every level sends the round's groups, the order of
    the levels alternating: on a shared machine every level then sees the same load, as bench_packing.py does it."""
    concurrencies, per_request = [int(value) for value in args.concurrency.split(",")], args.completions_per_request
    run_load(port, request_bodies(groups[:1], per_request), 4, args.request_timeout_s, deadline)  # warm-up
    totals = {c: {"latencies": [], "errors": [], "lost": 0, "not_sent": 0, "wall_s": 0.0, "requests": 0,
                  "items": 0, "forwards": 0} for c in concurrencies}  # fmt: skip
    for index in range(args.rounds):
        bodies = request_bodies(groups[index :: args.rounds], per_request)
        for concurrency in concurrencies if index % 2 == 0 else concurrencies[::-1]:
            before = get_json(port, "/info")["stats"]
            load = run_load(port, bodies, concurrency, args.request_timeout_s, deadline)
            after = get_json(port, "/info")["stats"]
            total = totals[concurrency]
            for key in ("latencies", "errors", "lost", "not_sent", "wall_s"):
                total[key] += load[key]
            total["requests"] += len(bodies)
            total["items"] += after["items"] - before["items"]
            total["forwards"] += after["batches"] - before["batches"]
    levels = []
    for concurrency, total in totals.items():
        answered = len(total["latencies"]) - len(total["errors"])
        levels.append(
            {
                "concurrency": concurrency,
                "requests": total["requests"],
                "completions_per_s": answered * per_request / total["wall_s"],
                "p50_s": percentile(total["latencies"], 50),
                "p99_s": percentile(total["latencies"], 99),
                "mean_items_per_forward": total["items"] / max(total["forwards"], 1),
                "errors": len(total["errors"]),
                "lost": total["lost"],
                "not_sent": total["not_sent"],
                "first_errors": total["errors"][:3],
                "wall_s": total["wall_s"],
            }
        )
    return levels


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (with under 100 requests, p99 is the slowest)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


# ----------------------------------------------------------------------------------------------------------------
# Group scoring in this process: packed vs padded, interleaved


def group_scoring(args, checkpoint: Path, groups: list[dict]) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from vlrm.data.images import to_rgb
    from vlrm.use.scoring import RewardScorer

    torch.set_num_threads(args.threads)
    scorers = {layout: RewardScorer.from_pretrained(checkpoint, packing=layout == "packed", device="cpu")
               for layout in ("padded", "packed")}  # fmt: skip
    seconds, differences = {layout: [] for layout in scorers}, []
    for index, group in enumerate(groups[: args.score_groups + 1]):  # the first group warms up
        image = to_rgb(Image.open(io.BytesIO(group["png"])))
        rows = [{"prompt": group["question"], "images": [image], "response": text} for text in group["responses"]]
        rewards = {}
        for layout in ("padded", "packed") if index % 2 == 0 else ("packed", "padded"):
            start = time.perf_counter()
            rewards[layout] = scorers[layout].score(rows, batch_size=args.group_size)
            if index > 0:
                seconds[layout].append(time.perf_counter() - start)
        differences.append(float(np.max(np.abs(rewards["packed"] - rewards["padded"]))))
    result = {layout: {"group_s_median": statistics.median(values), "group_s_all": [round(v, 3) for v in values],
                       "completions_per_s": args.group_size / statistics.median(values)}
              for layout, values in seconds.items()}  # fmt: skip
    result["speedup"] = result["padded"]["group_s_median"] / result["packed"]["group_s_median"]
    result["max_abs_reward_difference"] = max(differences)  # the two layouts must agree (float32 round-off)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Driver


def print_tables(args, levels: list[dict], scoring: dict) -> None:
    print(f"\nserver: serve_rm.py on 127.0.0.1, {args.completions_per_request} completion(s) per request, "
          f"max_batch_size {args.max_batch_size}, max_wait_ms {args.max_wait_ms:g}, {args.groups} groups of "
          f"{args.group_size} per level")  # fmt: skip
    header = (
        f"{'concurrency':>11} {'requests':>8} {'completions/s':>13} {'p50 s':>7} {'p99 s':>7} "
        f"{'items/forward':>13} {'errors':>6} {'lost':>4} {'not sent':>8}"
    )
    print(header + "\n" + "-" * len(header))
    for level in levels:
        print(
            f"{level['concurrency']:>11} {level['requests']:>8} {level['completions_per_s']:>13.2f} "
            f"{level['p50_s']:>7.2f} {level['p99_s']:>7.2f} {level['mean_items_per_forward']:>13.1f} "
            f"{level['errors']:>6} {level['lost']:>4} {level['not_sent']:>8}"
        )
    if len(levels) > 1:
        ratio = levels[-1]["completions_per_s"] / levels[0]["completions_per_s"]
        print(f"throughput at concurrency {levels[-1]['concurrency']} / {levels[0]['concurrency']}: {ratio:.2f}x")
    print(f"\ngroup scoring: RewardScorer.score of {args.group_size} completions under one image prompt, median of "
          f"{args.score_groups} groups, layouts interleaved")  # fmt: skip
    print(f"{'layout':>7} {'group s':>8} {'completions/s':>13}")
    for layout in ("padded", "packed"):
        result = scoring[layout]
        print(f"{layout:>7} {result['group_s_median']:>8.3f} {result['completions_per_s']:>13.2f}")
    difference = scoring["max_abs_reward_difference"]
    print(f"packed / padded: {scoring['speedup']:.2f}x; max |reward difference| {difference:.1e}")


def main(argv=None) -> None:
    args = parse_args(argv)
    started, load_before = time.monotonic(), os.getloadavg()[0]  # a shared machine shows in the load average
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as scratch:
        checkpoint = save_checkpoint(args, Path(scratch) / "checkpoint")
        from transformers import AutoProcessor

        tokenizer = AutoProcessor.from_pretrained(checkpoint).tokenizer
        groups = build_groups(args, tokenizer, max(args.groups, args.score_groups + 1))
        log_path = Path(scratch) / "server.log"
        # The load's own bound: the server's start, the levels' deadline plus one request, and group scoring.
        cpu_load = start_cpu_load(args.load, 180 + args.time_limit_s + args.request_timeout_s + 600)
        try:
            with log_path.open("w") as log_file:
                process, port = start_server(args, checkpoint, log_file)
            try:
                levels = measure_levels(args, port, groups[: args.groups], started + args.time_limit_s)
            finally:
                process.terminate()
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
            if any(level["errors"] or level["lost"] for level in levels):
                sys.stderr.write(log_path.read_text()[-4000:])
            scoring = group_scoring(args, checkpoint, groups)
        finally:
            for busy in cpu_load:
                busy.kill()
                busy.wait()
    load_after = os.getloadavg()[0]
    print_tables(args, levels, scoring)
    print(
        f"1-minute load average: {load_before:.2f} at the start, {load_after:.2f} at the end ({os.cpu_count()} CPUs); "
        f"{args.load} CPU-bound process(es) started by the benchmark"
    )
    config = {key: value for key, value in vars(args).items() if key not in ("attn", "device", "dtype")}
    summary = {"config": config, "server": levels, "group_scoring": scoring,
               "total_s": round(time.monotonic() - started, 1), "load_average": [load_before, load_after]}  # fmt: skip
    if len(levels) > 1:
        summary["throughput_ratio"] = round(levels[-1]["completions_per_s"] / levels[0]["completions_per_s"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
