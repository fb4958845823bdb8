"""Data-parallel evaluation: ``./run_eval.sh CONFIG --nproc 2`` (torchrun, gloo on the CPU) gives the outputs of one
process, and a sweep killed mid-way loses nothing when it is run again.

Each rank scores whole batches of ``eval_batch_size`` rows (every second batch), the same batches one process scores,
so the per-pair scores agree to float32 round-off (1e-6 here; on this CPU they come out identical)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from vlrm.model.reward_model import VLRewardModel

ROOT = Path(__file__).resolve().parents[1]
SCORE_TOLERANCE = 1e-6
# Columns that say when and how fast, not what was measured.
TIMING = ("wall_time_s", "load_s", "pairs_per_s", "evaluated_at", "pairs_file")  # measured, not computed

# Started with PYTHONPATH pointing here, this kills the whole run (torchrun and both ranks) right after rank 0 has
# written the results of the first checkpoint: a sweep killed mid-way, at a point the test knows.
KILL_AFTER_FIRST_RESULT = """
import os, signal
_replace = os.replace
def replace(source, target, *args, **kwargs):
    _replace(source, target, *args, **kwargs)
    if str(target).endswith("evaluation_results.json") and os.environ.get("RANK") == "0":
        os.killpg(os.getpgid(0), signal.SIGKILL)
os.replace = replace
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, processor):
    """A run with three checkpoints whose score heads differ."""
    root = tmp_path_factory.mktemp("dp_run")
    model = VLRewardModel.from_pretrained(tiny_model_dir)
    for step in (2, 4, 6):
        with torch.no_grad():
            model.score.weight.normal_(generator=torch.Generator().manual_seed(step))
        model.save_pretrained(root / f"checkpoint-{step}")
        processor.save_pretrained(root / f"checkpoint-{step}")
    return root


def write_config(path: Path, run_dir: Path, synthetic_dir: Path, results: Path) -> Path:
    values = {
        "model_dirs": [str(run_dir)],
        "dataset_path": [f"held_out={synthetic_dir / 'eval.jsonl'}", f"train={synthetic_dir / 'train.jsonl'}"],
        "eval_batch_size": 5,  # 24 and 48 pairs: uneven shards, a last batch of 4 and of 3
        "max_eval_samples": 23,
        "results_dir": str(results),
        "log_dir": str(results / "logs"),
    }
    path.write_text(json.dumps(values))
    return path


def run_eval_sh(config: Path, hooks: Path | None = None) -> subprocess.CompletedProcess:
    pythonpath = os.pathsep.join(str(path) for path in (hooks, ROOT) if path is not None)
    env = os.environ | {"PYTHON": sys.executable, "PYTHONPATH": pythonpath, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [str(ROOT / "run_eval.sh"), str(config), "--nproc", "2"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=400, start_new_session=True,
    )  # fmt: skip


def results_of(results_dir: Path) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    table = pd.read_csv(results_dir / "evaluation_results.csv")
    pairs = {path.name: pd.read_csv(path) for path in sorted((results_dir / "evaluation_results_pairs").glob("*.csv"))}
    return table, pairs


def assert_same_results(ours: Path, reference: Path) -> None:
    table, pairs = results_of(ours)
    expected_table, expected_pairs = results_of(reference)
    assert table.columns.tolist() == expected_table.columns.tolist()
    measured = [column for column in table if column not in TIMING]
    numeric = [column for column in measured if pd.api.types.is_float_dtype(table[column])]
    others = [column for column in measured if column not in numeric]
    pd.testing.assert_frame_equal(table[others], expected_table[others])
    np.testing.assert_allclose(table[numeric], expected_table[numeric], rtol=0, atol=SCORE_TOLERANCE, equal_nan=True)
    assert list(pairs) == list(expected_pairs) and len(pairs) == 6  # 3 checkpoints x 2 datasets, same file names
    for name, frame in pairs.items():
        expected = expected_pairs[name]
        assert frame["id"].tolist() == expected["id"].tolist(), f"{name}: pairs in another order"
        for column in ("chosen_score", "rejected_score"):
            np.testing.assert_allclose(frame[column], expected[column], rtol=0, atol=SCORE_TOLERANCE)
    assert (ours / "evaluation_results.png").is_file()


def test_two_processes_write_what_one_writes_and_a_killed_sweep_resumes(tmp_path, eval_rm, run_dir, synthetic_dir):
    single = tmp_path / "single"
    assert eval_rm.main([str(write_config(tmp_path / "single.yaml", run_dir, synthetic_dir, single))]) == 0

    # Two processes, killed right after the first checkpoint's results were written...
    parallel = tmp_path / "parallel"
    config = write_config(tmp_path / "parallel.yaml", run_dir, synthetic_dir, parallel)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(KILL_AFTER_FIRST_RESULT)
    killed = run_eval_sh(config, hooks)
    assert killed.returncode != 0, killed.stdout[-3000:]
    written = json.loads((parallel / "evaluation_results.json").read_text())["results"]
    assert {row["checkpoint"] for row in written} == {"checkpoint-2"}, "killed after the first checkpoint"

    # ...then run again: the first checkpoint is kept, the other two are scored, and every output equals one process'.
    finished = run_eval_sh(config)
    assert finished.returncode == 0, finished.stdout[-6000:]
    (log_file,) = sorted((parallel / "logs").glob("eval_*.log"))[-1:]
    log = log_file.read_text()
    assert "4 to evaluate, 2 already in" in log, "the rerun must skip what the killed run wrote"
    assert "2 processes" in log
    assert_same_results(parallel, single)
