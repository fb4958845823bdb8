"""The checkpoint sweep (eval_rm.py, run in-process through its ``main``), RewardScorer and checkpoint discovery."""

import hashlib
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from vlrm.data.prepare import load_preference_dataset
from vlrm.errors import CheckpointError, ConfigError
from vlrm.layout.packed import make_collator
from vlrm.layout.padded import split_rewards
from vlrm.model.checkpoints import check_loadable, find_checkpoints, parse_step
from vlrm.model.reward_model import VLRewardModel
from vlrm.train.config import EvalConfig
from vlrm.train.config_files import load_config
from vlrm.use.scoring import RewardScorer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir):
    return VLRewardModel.from_pretrained(tiny_model_dir)


def save_checkpoint(model, processor, path, seed):
    """A reward-model checkpoint whose score head is drawn from ``seed``: each one scores differently."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=generator))
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def make_run(root, reward_model, processor, steps=(5, 10, 20)):
    for step in steps:
        save_checkpoint(reward_model, processor, root / f"checkpoint-{step}", seed=step)
    return root


def write_config(tmp_path, model_dirs, synthetic_dir, tiny_model_dir, **extra):
    values = {
        "model_dirs": [str(path) for path in model_dirs],
        "dataset_path": str(synthetic_dir / "eval.jsonl"),
        "base_model_path": str(tiny_model_dir),
        "eval_batch_size": 5,
        "results_dir": str(tmp_path / "results"),
        "log_dir": str(tmp_path / "logs"),
    } | extra
    path = tmp_path / "eval.yaml"
    path.write_text(json.dumps(values))  # JSON is YAML
    return path


def file_hashes(directory):
    return {
        path: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.rglob("*")) if path.is_file()
    }


class LoadCounter:
    """Wraps RewardScorer.from_pretrained to record which checkpoints a sweep loaded."""

    def __init__(self, monkeypatch, eval_rm):
        self.loaded = []
        original = RewardScorer.from_pretrained

        def from_pretrained(checkpoint_dir, *args, **kwargs):
            self.loaded.append(Path(checkpoint_dir).name)
            return original(checkpoint_dir, *args, **kwargs)

        monkeypatch.setattr(eval_rm.RewardScorer, "from_pretrained", from_pretrained)


def test_sweep_writes_csv_json_plot_pair_scores_and_log(
    tmp_path, eval_rm, reward_model, processor, synthetic_dir, tiny_model_dir
):
    run = make_run(tmp_path / "run", reward_model, processor)
    before = file_hashes(run)
    config = write_config(tmp_path, [run], synthetic_dir, tiny_model_dir)

    assert eval_rm.main([str(config)]) == 0

    results = pd.read_csv(tmp_path / "results" / "evaluation_results.csv")
    # Sorted by step as a number: checkpoint-10 after checkpoint-5.
    assert results["checkpoint"].tolist() == ["checkpoint-5", "checkpoint-10", "checkpoint-20"]
    assert results["step"].tolist() == [5, 10, 20]
    assert (results["status"] == "ok").all() and (results["num_pairs"] == 24).all()
    assert results["margin_mean"].nunique() == 3, "each row must hold its own checkpoint's scores"
    report = json.loads((tmp_path / "results" / "evaluation_results.json").read_text())
    assert report["config"]["model_dirs"] == [str(run)] and report["errors"] == []
    for row, result in zip(report["results"], results.itertuples(), strict=True):
        pairs = pd.read_csv(row["pairs_file"])
        assert pairs.columns.tolist() == ["id", "category", "chosen_score", "rejected_score"]
        assert len(pairs) == 24 and pairs["id"].is_unique
        correct = pairs["chosen_score"] > pairs["rejected_score"]
        assert result.accuracy == pytest.approx(correct.mean())
        assert result.accuracy_ci_low <= result.accuracy <= result.accuracy_ci_high
        by_category = correct.groupby(pairs["category"]).mean()
        assert {name: values["accuracy"] for name, values in row["per_category"].items()} == pytest.approx(
            by_category.to_dict()
        )
        assert result.macro_accuracy == pytest.approx(by_category.mean())
        assert results.loc[result.Index, "accuracy/color"] == pytest.approx(by_category["color"])
        scores = np.concatenate([pairs["chosen_score"], pairs["rejected_score"]])
        assert result.reward_mean == pytest.approx(scores.mean()) and result.reward_std == pytest.approx(scores.std())
        assert result.pairs_per_s > 0 and result.wall_time_s > 0
        assert 0 <= result.irrelevant_accuracy <= 1 and np.isfinite(result.irrelevant_margin)
    with Image.open(tmp_path / "results" / "evaluation_results.png") as plot:
        assert plot.format == "PNG"
    (log_file,) = (tmp_path / "logs").glob("eval_*.log")
    assert "checkpoint-20 on eval: accuracy" in log_file.read_text()
    assert file_hashes(run) == before, "evaluation must not change checkpoint files"


def test_rerun_skips_scored_checkpoints_and_scores_new_or_changed_ones(
    tmp_path, monkeypatch, eval_rm, reward_model, processor, synthetic_dir, tiny_model_dir
):
    run = make_run(tmp_path / "run", reward_model, processor)
    config = str(write_config(tmp_path, [run], synthetic_dir, tiny_model_dir, max_eval_samples=6))
    csv_path = tmp_path / "results" / "evaluation_results.csv"
    assert eval_rm.main([config]) == 0
    first_csv = csv_path.read_bytes()

    counter = LoadCounter(monkeypatch, eval_rm)
    assert eval_rm.main([config]) == 0
    assert counter.loaded == [] and csv_path.read_bytes() == first_csv

    # A re-saved checkpoint is stale; a new one is new.
    save_checkpoint(reward_model, processor, run / "checkpoint-10", seed=99)
    os.utime(run / "checkpoint-10" / "model.safetensors", (1e9, 2e9))
    save_checkpoint(reward_model, processor, run / "checkpoint-30", seed=30)
    assert eval_rm.main([config]) == 0
    assert counter.loaded == ["checkpoint-10", "checkpoint-30"]
    assert pd.read_csv(csv_path)["checkpoint"].tolist() == [f"checkpoint-{step}" for step in (5, 10, 20, 30)]

    counter.loaded.clear()  # another subset size is another result
    assert eval_rm.main([config, "--max_eval_samples", "4"]) == 0
    assert len(counter.loaded) == 4
    assert sorted(pd.read_csv(csv_path)["max_eval_samples"]) == [4] * 4 + [6] * 4

    counter.loaded.clear()
    assert eval_rm.main([config, "--force"]) == 0
    assert len(counter.loaded) == 4 and len(pd.read_csv(csv_path)) == 8


def test_killed_sweep_keeps_finished_checkpoints_and_resumes(
    tmp_path, monkeypatch, eval_rm, reward_model, processor, synthetic_dir, tiny_model_dir
):
    run = make_run(tmp_path / "run", reward_model, processor)
    config = str(write_config(tmp_path, [run], synthetic_dir, tiny_model_dir, max_eval_samples=6))
    original = RewardScorer.score_pairs
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RewardScorer, "score_pairs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        eval_rm.main([config])
    results_dir = tmp_path / "results"
    assert pd.read_csv(results_dir / "evaluation_results.csv")["checkpoint"].tolist() == ["checkpoint-5"]
    assert [
        row["checkpoint"] for row in json.loads((results_dir / "evaluation_results.json").read_text())["results"]
    ] == ["checkpoint-5"]
    assert not list(results_dir.rglob("*.tmp"))

    monkeypatch.setattr(RewardScorer, "score_pairs", original)
    counter = LoadCounter(monkeypatch, eval_rm)
    assert eval_rm.main([config]) == 0
    assert counter.loaded == ["checkpoint-10", "checkpoint-20"]


def test_broken_checkpoints_become_error_rows_and_the_sweep_goes_on(
    tmp_path, monkeypatch, eval_rm, reward_model, processor, synthetic_dir, tiny_model_dir
):
    run = make_run(tmp_path / "run", reward_model, processor, steps=(5, 20))
    corrupt = save_checkpoint(reward_model, processor, run / "checkpoint-10", seed=1)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    no_weights = save_checkpoint(reward_model, processor, run / "checkpoint-15", seed=1)
    (no_weights / "model.safetensors").unlink()
    base_model = run / "checkpoint-25"  # a plain Qwen2.5-VL: no trained score head
    base_model.mkdir()
    for path in tiny_model_dir.iterdir():
        (base_model / path.name).write_bytes(path.read_bytes())
    config = str(write_config(tmp_path, [run], synthetic_dir, tiny_model_dir, max_eval_samples=6))

    assert eval_rm.main([config]) == 1

    results = pd.read_csv(tmp_path / "results" / "evaluation_results.csv").set_index("checkpoint")
    assert results["status"].to_dict() == {
        "checkpoint-5": "ok",
        "checkpoint-10": "error",
        "checkpoint-15": "error",
        "checkpoint-20": "ok",
        "checkpoint-25": "error",
    }
    assert "checkpoint-10: cannot load" in results.loc["checkpoint-10", "error"]
    assert "no weights" in results.loc["checkpoint-15", "error"]
    assert "no score head" in results.loc["checkpoint-25", "error"]
    assert results.loc["checkpoint-20", "accuracy"] >= 0
    errors = json.loads((tmp_path / "results" / "evaluation_results.json").read_text())["errors"]
    assert [error["checkpoint"] for error in errors] == ["checkpoint-10", "checkpoint-15", "checkpoint-25"]

    counter = LoadCounter(monkeypatch, eval_rm)
    eval_rm.main([config])
    assert counter.loaded == ["checkpoint-10", "checkpoint-15", "checkpoint-25"], "error rows are retried"


def test_eval_scores_equal_the_trained_models_rewards_in_memory(
    tmp_path, eval_rm, encoder, synthetic_dir, tiny_model_dir
):
    train_config = tmp_path / "train.yaml"
    train_config.write_text(
        f"model_name_or_path: {tiny_model_dir}\ndataset_path: {synthetic_dir / 'train.jsonl'}\n"
        f"output_dir: {tmp_path / 'out'}\nlog_dir: {tmp_path / 'logs'}\n"
        "per_device_train_batch_size: 4\nlearning_rate: 1.0e-3\nmax_steps: 2\nsave_strategy: steps\nsave_steps: 1\n"
        "eval_strategy: 'no'\nbf16: false\nuse_cpu: true\nseed: 3\nmax_seq_length: 512\nreport_to: none\n"
    )
    argv = sys.argv
    sys.argv = ["train_rm.py", str(train_config)]
    try:
        trained_model = runpy.run_path(str(ROOT / "train_rm.py"), run_name="__main__")["model"].eval()
    finally:
        sys.argv = argv
    dataset, _ = load_preference_dataset(synthetic_dir / "eval.jsonl")
    batch = make_collator(encoder)(list(dataset))
    num_pairs, num_irrelevant = batch.pop("num_pairs"), batch.pop("num_irrelevant")
    with torch.no_grad():
        chosen, rejected, _ = split_rewards(trained_model(**batch).rewards, num_pairs, num_irrelevant)

    config = str(write_config(tmp_path, [tmp_path / "out"], synthetic_dir, tiny_model_dir))
    assert eval_rm.main([config]) == 0

    report = json.loads((tmp_path / "results" / "evaluation_results.json").read_text())
    assert [(row["checkpoint"], row["step"]) for row in report["results"]] == [
        ("checkpoint-1", 1),
        ("checkpoint-2", 2),
        ("final", 2),
    ]
    final = pd.read_csv(report["results"][-1]["pairs_file"])
    assert final["id"].tolist() == list(dataset["id"])
    np.testing.assert_allclose(final["chosen_score"], chosen.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(final["rejected_score"], rejected.numpy(), rtol=0, atol=1e-5)


def test_scorer_scores_single_responses_like_the_pair_collator(tmp_path, reward_model, processor, synthetic_dir):
    checkpoint = save_checkpoint(reward_model, processor, tmp_path / "checkpoint-1", seed=1)
    scorer = RewardScorer.from_pretrained(checkpoint)
    assert not scorer.model.training
    dataset, _ = load_preference_dataset(synthetic_dir / "eval.jsonl", max_samples=5)
    pair_scores = scorer.score_pairs(dataset, batch_size=2, progress=False)
    rows = list(dataset)
    as_messages = [{"prompt": row["prompt"], "images": row["images"], "response": row["chosen"]} for row in rows]
    raw = {row["id"]: row for row in map(json.loads, (synthetic_dir / "eval.jsonl").read_text().splitlines())}
    as_question = [
        {
            "prompt": raw[row["id"]]["question"],
            "images": [str(synthetic_dir / path) for path in raw[row["id"]]["images"]],
            "response": row["rejected"],
        }
        for row in rows
    ]
    np.testing.assert_allclose(scorer.score(as_messages, batch_size=3), pair_scores.chosen, atol=1e-5)
    np.testing.assert_allclose(scorer.score(as_question), pair_scores.rejected, atol=1e-5)


def test_scorer_takes_the_processor_from_base_model_path_when_the_checkpoint_has_none(
    tmp_path, reward_model, tiny_model_dir
):
    checkpoint = tmp_path / "checkpoint-1"
    reward_model.save_pretrained(checkpoint)
    with pytest.raises(CheckpointError, match="set base_model_path"):
        RewardScorer.from_pretrained(checkpoint)
    scorer = RewardScorer.from_pretrained(checkpoint, base_model_path=tiny_model_dir, max_pixels=28 * 28 * 2)
    assert scorer.processor.image_processor.size["longest_edge"] == 28 * 28 * 2


def touch_model(path, weights="model.safetensors"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    (path / weights).write_bytes(b"")
    return path


def test_find_checkpoints_orders_by_step_and_adds_the_final_model(tmp_path):
    for name in ("checkpoint-100", "checkpoint-20", "checkpoint-3", "checkpoint-best"):
        touch_model(tmp_path / name)
    (tmp_path / "runs").mkdir()
    (tmp_path / "checkpoint-100" / "trainer_state.json").write_text(json.dumps({"global_step": 100, "max_steps": 120}))
    assert [checkpoint.name for checkpoint in find_checkpoints(tmp_path)] == [
        "checkpoint-3",
        "checkpoint-20",
        "checkpoint-100",
        "checkpoint-best",
    ]
    touch_model(tmp_path)
    checkpoints = find_checkpoints(tmp_path)
    assert (checkpoints[-1].name, checkpoints[-1].path, checkpoints[-1].step) == ("final", tmp_path, 120)
    assert [checkpoint.name for checkpoint in find_checkpoints(tmp_path, "checkpoint-1*")] == [
        "checkpoint-100",
        "final",
    ]
    with pytest.raises(FileNotFoundError, match="model dir not found"):
        find_checkpoints(tmp_path / "missing")


@pytest.mark.parametrize(
    ("name", "step"), [("checkpoint-200", 200), ("step_50", 50), ("global_step7", 7), ("final", None), ("best", None)]
)
def test_parse_step(name, step):
    assert parse_step(name) == step


def test_check_loadable_names_the_problem_and_the_fix(tmp_path):
    adapter = touch_model(tmp_path / "lora", weights="adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="LoRA adapter only"):
        check_loadable(adapter)
    zero = touch_model(tmp_path / "zero", weights="latest")
    (zero / "global_step10").mkdir()
    with pytest.raises(CheckpointError, match="zero_to_fp32"):
        check_loadable(zero)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        check_loadable(tmp_path / "empty")
    check_loadable(touch_model(tmp_path / "ok"))


def test_eval_config_errors_name_the_field(tmp_path):
    def load(**values):
        path = tmp_path / "config.yaml"
        path.write_text(json.dumps({"model_dirs": ["outputs/run"], "dataset_path": "eval.jsonl"} | values))
        return load_config(EvalConfig, path)

    assert load(model_dirs="outputs/one").model_dirs == ["outputs/one"]
    assert load().checkpoint_pattern == "checkpoint-*" and load().output_file == "evaluation_results.csv"
    with pytest.raises(ConfigError, match="Did you mean `model_dirs`"):
        load(model_dir=["x"])
    with pytest.raises(
        ConfigError, match="config.yaml: `dtype` must be one of 'auto', 'bfloat16', 'float16', 'float32', got 'bf16'"
    ):
        load(dtype="bf16")
    with pytest.raises(ConfigError, match="dataset_path is required"):
        load(dataset_path=None)
    with pytest.raises(ConfigError, match="output_file must end in .csv"):
        load(output_file="results.json")
    with pytest.raises(ConfigError, match="eval_batch_size"):
        load(eval_batch_size=0)


@pytest.mark.parametrize("name", ["eval_config_example.yaml", "eval_config_example7b.yaml"])
def test_example_configs_load(name):
    # flash_attention_2 (the 7B example) needs CUDA; everything else in the file must be valid here.
    config = load_config(EvalConfig, ROOT / "training_configs" / name, ["--attn_implementation", "sdpa"])
    assert config.model_dirs and config.dataset_path and config.base_model_path


def test_run_eval_sh_passes_gpu_and_exit_code(tmp_path, reward_model, processor, synthetic_dir, tiny_model_dir):
    run = make_run(tmp_path / "run", reward_model, processor, steps=(1,))
    touch_model(run / "checkpoint-2")  # empty weights: an error row, so eval_rm.py exits 1
    config = write_config(tmp_path, [run], synthetic_dir, tiny_model_dir, max_eval_samples=2)
    script = str(ROOT / "run_eval.sh")
    help_text = subprocess.run([script, "--help"], capture_output=True, text=True, check=True).stdout
    assert "[CONFIG] [GPU]" in help_text
    env = os.environ | {"PYTHON": sys.executable}
    finished = subprocess.run([script, str(config), "0"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert finished.returncode == 1, finished.stderr[-2000:]
    (log_file,) = (tmp_path / "logs").glob("eval_*.log")
    log = log_file.read_text()
    assert "CUDA_VISIBLE_DEVICES=0" in log and "checkpoint-1 on eval: accuracy" in log and "checkpoint-2" in log


def test_irrelevant_scores_are_the_chosen_response_under_the_drawn_prompts(
    tmp_path, reward_model, processor, synthetic_dir
):
    from vlrm.metrics import irrelevant_metrics
    from vlrm.train.irrelevant import RowsWithIrrelevantPrompts

    checkpoint = save_checkpoint(reward_model, processor, tmp_path / "checkpoint-1", seed=2)
    scorer = RewardScorer.from_pretrained(checkpoint)
    dataset, _ = load_preference_dataset(synthetic_dir / "eval.jsonl", max_samples=6)
    rows = RowsWithIrrelevantPrompts(dataset, num_pairs=2, seed=0, mode="query", batch_size=3)
    scores = scorer.score_pairs(rows, batch_size=3, progress=False)
    assert scores.irrelevant.shape == (6, 2)
    expected = []
    for index in range(6):
        row = rows[index]
        expected.append(
            scorer.score([{"prompt": other["prompt"], "images": other["images"], "response": row["chosen"]}
                          for other in row["irrelevant"]])
        )  # fmt: skip
        # Drawn with the scoring batch of 3 as the pool (the sampler's own tests cover pool vs dataset draws).
        batch_start = index - index % 3
        partners = rows.sampler.partners(index, 0, list(range(batch_start, batch_start + 3)))
        assert [other["prompt"] for other in row["irrelevant"]] == [dataset[j]["prompt"] for j in partners]
    np.testing.assert_allclose(scores.irrelevant, np.stack(expected), atol=1e-5)
    metrics = irrelevant_metrics(scores.chosen, scores.irrelevant)
    assert metrics["irrelevant_accuracy"] == pytest.approx((scores.chosen[:, None] > scores.irrelevant).mean())
    plain = scorer.score_pairs(dataset, batch_size=3, progress=False)
    assert plain.irrelevant is None
    np.testing.assert_allclose(plain.chosen, scores.chosen, atol=1e-5)
