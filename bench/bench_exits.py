"""Clean exits under torchrun: N consecutive 2-process trainings of the tiny model, and how each rank exited.

    python bench/bench_exits.py                 # 20 runs (about 30 s each on 2 cores)
    python bench/bench_exits.py --runs 5 --processes 2

Each run is ``./run_distributed.sh --gpus 2`` (CPU processes on gloo) on the tiny model and the synthetic set, a few
steps, the end-of-training reward statistics and the final save included: everything a finished run does before it
exits. A rank that aborts at exit (``terminate called without an active exception``: a C++ thread still joinable when
the interpreter tears down) fails the run although training finished; Python's faulthandler is on, so such a run's
log holds every thread's stack at the abort. Prints one line per run, the count, and a last line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--work_dir", default=str(ROOT / ".cache" / "bench_exits"))
    args = parser.parse_args()

    from vlrm.data.synthetic import make_synthetic_dataset
    from vlrm.tiny import build_tiny_model_dir

    work = Path(args.work_dir)
    model_dir = work / "tiny-qwen2.5-vl"
    if not (model_dir / "config.json").is_file():
        build_tiny_model_dir(model_dir)
    data = work / "data"
    if not (data / "train.jsonl").is_file():
        make_synthetic_dataset(data, num_train=64, num_eval=16, seed=0, image_size=56)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = os.environ | {
        "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
        "PYTHONFAULTHANDLER": "1", "VLRM_CACHE_DIR": str(work / "cache"),
    }  # fmt: skip
    if torchrun.exists():
        env["TORCHRUN"] = str(torchrun)
    outcomes = []
    for run in range(args.runs):
        overrides = [
            "--model_name_or_path", str(model_dir), "--dataset_path", str(data / "train.jsonl"),
            "--eval_dataset_path", str(data / "eval.jsonl"), "--output_dir", str(work / "out"),
            "--log_dir", str(work / "logs"), "--max_steps", str(args.steps), "--per_device_train_batch_size", "2",
            "--save_steps", "2", "--eval_steps", "2", "--report_to", "none", "--reward_stats_samples", "32",
            "--seed", str(run),
        ]  # fmt: skip
        command = [str(ROOT / "run_distributed.sh"), "--gpus", str(args.processes), "--port", str(free_port())]
        command += ["--log-dir", str(work / "launcher"), "--config", str(ROOT / "training_configs/tiny_demo.yaml")]
        started = time.perf_counter()
        finished = subprocess.run(
            [*command, "--", *overrides], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, timeout=600,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        aborted = "terminate called" in finished.stdout or "SIGABRT" in finished.stdout
        saved = "final model saved to" in finished.stdout
        outcomes.append({"run": run, "exit_code": finished.returncode, "aborted": aborted, "saved": saved,
                         "seconds": round(seconds, 1)})  # fmt: skip
        print(
            f"run {run + 1:2d}/{args.runs}: exit {finished.returncode}, final model saved: {saved}, "
            f"abort at exit: {aborted}, {seconds:.0f} s",
            flush=True,
        )
        if finished.returncode != 0:
            log = work / f"failed_run_{run}.log"
            log.write_text(finished.stdout)
            failures = re.findall(r"(?m)^.*(?:terminate called|Fatal Python error|exitcode).*$", finished.stdout)
            print(f"  log: {log}; {'; '.join(failures[:3])}", flush=True)
    clean = sum(outcome["exit_code"] == 0 for outcome in outcomes)
    print(f"{clean} of {len(outcomes)} runs exited 0 on every rank ({args.processes} processes each)")
    print(json.dumps({"runs": len(outcomes), "clean": clean, "outcomes": outcomes}))
    return 0 if clean == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
