"""Evaluation sweeps at scale: a LoRA run's base loaded once, and several processes on one sweep.

    python bench/bench_eval.py                       # CPU: the mid-size random Qwen2.5-VL of bench_packing.py
    python bench/bench_eval.py --checkpoints 5 --pairs 8 --dp_pairs 48

Writes a LoRA run of ``--checkpoints`` adapter checkpoints (rank 16 on every language-model linear layer and the
merger, the head trained in full; random adapter weights, one seed each) on the mid-size random Qwen2.5-VL, and a
held-out set of image pairs (~``--visual_tokens`` visual tokens each), then times ``eval_rm.py``, each in a fresh
process:

    reuse     the sweep as it runs: the base model loaded once, each checkpoint's adapters and head swapped in
    reload    the same sweep, every checkpoint loaded from scratch (the base model again each time)
    1 / 2     a larger sweep (``--dp_pairs`` pairs) with one process and with ``./run_eval.sh --nproc 2`` (torchrun,
              two CPU processes of one thread each; the one process has the machine's threads)
    1, 1 thread  the larger sweep once more with one process of one thread: 2 processes over it is the data-parallel
              path's own scaling, and 2x it over the one process of all threads is the most that splitting this
              machine's cores between processes could give (the ceiling printed beside the goal)

Sweep time is what eval_rm.py records per checkpoint (load + score, ``wall_time_s``), summed; the per-pair scores of
the two ways must agree (reuse = reload exactly; 2 processes = 1 to 1e-6). Beside each goal it prints the ceiling the
same run measures: for the LoRA sweep, reload's load time over reuse's (the sweep's speed-up if scoring took no time:
the first load is the same in both); for the processes, ``--threads`` x the one-thread rate over the one process's.
Prints a table, then one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def build_run(work: Path, args) -> tuple[Path, Path]:
    """(LoRA run dir with ``checkpoint-*`` adapters, held-out set .jsonl) under ``work``."""
    import numpy as np
    import torch
    from bench_packing import build_config, build_processor, token_text
    from PIL import Image

    from vlrm.model.checkpoints import write_lora_metadata
    from vlrm.model.lora import LoraArguments, apply_lora
    from vlrm.model.reward_model import VLRewardModel
    from vlrm.tiny.qwen import build_tokenizer

    bench_args = argparse.Namespace(preset="mid", family="qwen2_5_vl", attn="sdpa", visual_tokens=args.visual_tokens)
    tokenizer, processor = build_tokenizer(), build_processor(bench_args)
    base = work / "base"
    if not (base / "config.json").is_file():
        torch.manual_seed(0)
        VLRewardModel._from_config(build_config(bench_args, tokenizer)).save_pretrained(base)
        processor.save_pretrained(base)
    run = work / "lora_run"
    for index in range(args.checkpoints):
        checkpoint = run / f"checkpoint-{10 * (index + 1)}"
        if (checkpoint / "adapter_model.safetensors").is_file():
            continue
        model = apply_lora(
            VLRewardModel.from_pretrained(base), LoraArguments(use_lora=True, lora_r=16, lora_vision="merger")
        )
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:  # adapters (B = 0 at the start: give them a trained-looking value)
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        model.save_pretrained(checkpoint)
        write_lora_metadata(model, checkpoint)
        processor.save_pretrained(checkpoint)
    data = work / "eval.jsonl"
    if not data.is_file():
        rng, side = np.random.default_rng(0), 28 * int(args.visual_tokens**0.5)
        (work / "images").mkdir(exist_ok=True)
        import random

        words = random.Random(0)
        with open(data, "w") as file:
            for index in range(max(args.pairs, args.dp_pairs)):
                image = work / "images" / f"{index}.png"
                Image.fromarray(rng.integers(0, 256, (side, side, 3), np.uint8)).save(image)
                row = {
                    "id": f"pair-{index}",
                    "question": token_text(tokenizer, words, 40),
                    "images": [str(image)],
                    "chosen": token_text(tokenizer, words, words.randint(64, 160)),
                    "rejected": token_text(tokenizer, words, words.randint(64, 160)),
                }
                file.write(json.dumps(row) + "\n")
    return run, data


def write_config(work: Path, name: str, run: Path, data: Path, pairs: int) -> Path:
    values = {
        "model_dirs": [str(run)], "dataset_path": str(data), "max_eval_samples": pairs, "eval_batch_size": 4,
        "num_irrelevant_pairs": 0, "results_dir": str(work / name), "log_dir": str(work / name / "logs"),
        "force": True,
    }  # fmt: skip
    path = work / f"{name}.yaml"
    path.write_text(json.dumps(values))
    return path


RELOAD = """
import runpy, sys
import vlrm.use.scoring as scoring
original = scoring.RewardScorer.from_pretrained.__func__
def fresh(cls, *args, reuse=None, **kwargs):  # every checkpoint from scratch: no base model kept
    return original(cls, *args, **kwargs)
scoring.RewardScorer.from_pretrained = classmethod(fresh)
sys.argv = ["eval_rm.py", sys.argv[1]]
runpy.run_path("eval_rm.py", run_name="__main__")
"""


def sweep(config: Path, how: str, threads: int) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "PYTHON": sys.executable,
                        "PYTHONPATH": str(ROOT)}  # fmt: skip
    if how == "reload":
        command = [sys.executable, "-c", RELOAD, str(config)]
    elif how.startswith("2 processes"):
        command = [str(ROOT / "run_eval.sh"), str(config), "--nproc", "2"]
    else:
        command = [sys.executable, str(ROOT / "eval_rm.py"), str(config)]
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if finished.returncode:
        raise SystemExit(f"{how} sweep failed:\n{finished.stdout[-3000:]}\n{finished.stderr[-3000:]}")
    import pandas as pd

    results_dir = Path(json.loads(config.read_text())["results_dir"])
    table = pd.read_csv(results_dir / "evaluation_results.csv")
    pairs = {row.checkpoint: pd.read_csv(row.pairs_file) for row in table.itertuples()}
    return {
        "how": how,
        "sweep_s": float(table["wall_time_s"].sum()),
        "process_s": time.perf_counter() - started,
        "pairs_per_s": float(table["num_pairs"].sum() / table["wall_time_s"].sum()),
        "first_checkpoint_s": float(table["wall_time_s"].iloc[0]),
        "load_s": float(table["load_s"].sum()),
        "later_loads_s": float(table["load_s"].iloc[1:].sum()),
        "scores": pairs,
    }


def max_difference(first: dict, second: dict) -> float:
    import numpy as np

    return max(
        float(np.abs(first["scores"][name][column] - second["scores"][name][column]).max())
        for name in first["scores"]
        for column in ("chosen_score", "rejected_score")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=8, help="pairs per checkpoint in the LoRA comparison")
    parser.add_argument("--dp_pairs", type=int, default=48, help="pairs per checkpoint in the processes comparison")
    parser.add_argument("--visual_tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of one process")
    parser.add_argument("--work_dir", default=str(ROOT / ".cache" / "bench_eval"))
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    run, data = build_run(work, args)
    reuse = sweep(write_config(work, "reuse", run, data, args.pairs), "reuse", args.threads)
    reload = sweep(write_config(work, "reload", run, data, args.pairs), "reload", args.threads)
    one = sweep(
        write_config(work, "one", run, data, args.dp_pairs), f"1 process ({args.threads} threads)", args.threads
    )
    single = sweep(write_config(work, "single", run, data, args.dp_pairs), "1 process (1 thread)", 1)
    two = sweep(write_config(work, "two", run, data, args.dp_pairs), "2 processes (1 thread each)", 1)
    lora_speedup, dp_speedup = reload["sweep_s"] / reuse["sweep_s"], two["pairs_per_s"] / one["pairs_per_s"]
    load_speedup = reload["later_loads_s"] / reuse["later_loads_s"]
    lora_ceiling = reload["load_s"] / reuse["load_s"]  # the sweep's speed-up were scoring free
    dp_ceiling = min(2, args.threads) * single["pairs_per_s"] / one["pairs_per_s"]  # cores split, none gained
    dp_scaling = two["pairs_per_s"] / single["pairs_per_s"]
    print(f"{'sweep':<28} {'checkpoints':>11} {'pairs each':>10} {'sweep s':>8} {'loads s':>8} {'later loads s':>13} "
          f"{'pairs/s':>8}")  # fmt: skip
    sweeps = ((reuse, args.pairs), (reload, args.pairs), (one, args.dp_pairs), (single, args.dp_pairs),
              (two, args.dp_pairs))  # fmt: skip
    for result, pairs in sweeps:
        name = {"reuse": "LoRA, base loaded once", "reload": "LoRA, reloaded each"}.get(result["how"], result["how"])
        print(f"{name:<28} {args.checkpoints:>11} {pairs:>10} {result['sweep_s']:>8.1f} {result['load_s']:>8.2f} "
              f"{result['later_loads_s']:>13.2f} {result['pairs_per_s']:>8.2f}")  # fmt: skip
    reuse_difference = max_difference(reuse, reload)
    dp_difference = max(max_difference(one, two), max_difference(one, single))
    print(f"base loaded once: checkpoints after the first load {load_speedup:.1f}x faster, the sweep {lora_speedup:.2f}x "
          f"(goal >= 3x; {lora_ceiling:.2f}x were scoring free); max score difference {reuse_difference:.1e}")  # fmt: skip
    print(f"2 processes: {dp_speedup:.2f}x the pairs/s of 1 process of {args.threads} threads (goal >= 1.6x; "
          f"{dp_ceiling:.2f}x at most on these cores: {args.threads} threads already run at "
          f"{one['pairs_per_s'] / single['pairs_per_s']:.2f}x one), {dp_scaling:.2f}x one process of 1 thread; "
          f"max score difference {dp_difference:.1e}")  # fmt: skip
    summary = {
        "checkpoints": args.checkpoints, "lora_speedup": round(lora_speedup, 3), "load_speedup": round(load_speedup, 2),
        "lora_ceiling": round(lora_ceiling, 3), "dp_speedup": round(dp_speedup, 3), "dp_ceiling": round(dp_ceiling, 3),
        "dp_scaling_one_thread": round(dp_scaling, 3),
        "reuse_max_score_difference": reuse_difference, "dp_max_score_difference": dp_difference,
        "sweeps": [{key: value for key, value in result.items() if key != "scores"} for result, _ in sweeps],
    }  # fmt: skip
    print(json.dumps(summary))
    return 0 if reuse_difference == 0 and dp_difference <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
