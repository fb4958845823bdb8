"""bench/gpu_check.py --smoke: the GPU check's code on the CPU with the tiny model, so that it cannot rot between the
times a GPU is lent."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_part(tmp_path):
    finished = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--work_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    (check,) = result["packing"]  # no flash-attn on the CPU: SDPA only
    assert check["attn"] == "sdpa" and check["layouts"]["agree"] is True
    for mode in ("train", "score"):
        summary = check["results"][mode]
        assert summary["packed"]["lm_tokens"] < summary["padded"]["lm_tokens"], "packing must drop the padding"
        for layout in ("padded", "packed"):
            assert summary[layout]["tflops"] > 0 and summary[layout]["mfu"] is None  # no bf16 peak for a CPU
    split = result["split"]
    assert split["devices"] == ["cpu", "disk"] and split["reward_max_abs_diff"] <= 1e-5
    assert "split scoring" in finished.stdout and "MFU" in finished.stdout
