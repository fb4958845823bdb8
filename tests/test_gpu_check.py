"""bench/gpu_check.py --smoke: the GPU check's code on the CPU with the tiny model, so that it cannot rot between the
times a GPU is lent. It runs as on the lent machine's image, where TRL, datasets, DeepSpeed, flash-attn, PyAV and
FastAPI are not installed (bench/device_wheels.sh carries only transformers and qwen-vl-utils there)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABSENT_ON_THE_DEVICE = ("trl", "datasets", "deepspeed", "flash_attn", "av", "fastapi", "uvicorn")


def test_gpu_check_smoke_runs_every_part(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(  # None in sys.modules: `import` raises, find_spec answers None
        f"import sys\nsys.modules.update(dict.fromkeys({ABSENT_ON_THE_DEVICE!r}))\n"
    )
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    absent = subprocess.run([sys.executable, "-c", "import datasets"], capture_output=True, text=True, env=env)
    assert absent.returncode == 1 and "ModuleNotFoundError" in absent.stderr  # the stand-in for the device works
    finished = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--work_dir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
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
    assert "] sdpa: done" in finished.stderr and "] split scoring: done" in finished.stderr  # progress as it goes
