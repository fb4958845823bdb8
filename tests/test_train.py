"""End-to-end training through train_rm.py itself (run in-process with runpy, as `python train_rm.py` would)."""

import json
import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.trainer_pt_utils import BatchRebalanceSampler

from vlrm.data.prepare import load_preference_dataset
from vlrm.layout.packed import pair_tokens
from vlrm.layout.padded import PaddedPreferenceCollator
from vlrm.model.checkpoints import find_checkpoints
from vlrm.model.reward_model import VLRewardModel
from vlrm.use.scoring import RewardScorer

ROOT = Path(__file__).resolve().parents[1]


def run_train(tmp_path, tiny_model_dir, synthetic_dir, *overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model_dir}\n"
        f"dataset_path: {synthetic_dir / 'train.jsonl'}\n"
        f"eval_dataset_path: {synthetic_dir / 'eval.jsonl'}\n"
        f"output_dir: {tmp_path / 'out'}\n"
        f"log_dir: {tmp_path / 'logs'}\n"
        "per_device_train_batch_size: 4\nper_device_eval_batch_size: 8\nlearning_rate: 1.0e-3\n"
        "max_steps: 4\nlogging_steps: 1\nsave_strategy: steps\nsave_steps: 2\neval_strategy: 'no'\n"
        "bf16: false\nuse_cpu: true\nseed: 7\nmax_seq_length: 512\nreport_to: none\n"
    )
    argv = sys.argv
    sys.argv = ["train_rm.py", str(config), *overrides]
    try:
        return runpy.run_path(str(ROOT / "train_rm.py"), run_name="__main__")
    finally:
        sys.argv = argv


def losses(output_dir):
    state = json.loads((Path(output_dir) / "checkpoint-4" / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, synthetic_dir):
    tmp_path = tmp_path_factory.mktemp("train")
    return tmp_path, run_train(tmp_path, tiny_model_dir, synthetic_dir, "--freeze_vit", "true")


def test_training_changes_parameters_but_not_the_frozen_vision_tower(trained, tiny_model_dir):
    _, run = trained
    before = dict(VLRewardModel.from_pretrained(tiny_model_dir).named_parameters())
    after = dict(run["model"].named_parameters())
    changed = {name for name in after if not torch.equal(after[name].detach(), before[name].detach())}
    assert any(name.startswith("model.language_model.layers") for name in changed)
    assert any(name.startswith("model.visual.merger") for name in changed)
    assert "score.weight" in changed
    frozen = [name for name in after if name.startswith(("model.visual.patch_embed", "model.visual.blocks"))]
    assert frozen and not set(frozen) & changed


def test_checkpoint_reloads_alone_with_identical_rewards(trained, encoder, synthetic_dir):
    tmp_path, run = trained
    checkpoint = tmp_path / "out" / "checkpoint-4"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "processor_config.json").is_file()
    dataset, _ = load_preference_dataset(synthetic_dir / "eval.jsonl", max_samples=6)
    batch = PaddedPreferenceCollator(encoder)(list(dataset))
    inputs = {key: value for key, value in batch.items() if key not in ("num_pairs", "num_irrelevant", "margin")}
    in_memory = run["model"].eval()
    reloaded = VLRewardModel.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).rewards, in_memory(**inputs).rewards, rtol=0, atol=0)


def test_run_log_is_written(trained):
    tmp_path, _ = trained
    (log_file,) = (tmp_path / "logs").glob("train_*.log")
    text = log_file.read_text()
    assert "pairs kept" in text and "step 4:" in text and "'loss':" in text


def test_resume_continues_with_the_same_losses(trained, tmp_path, tiny_model_dir, synthetic_dir):
    first_dir, _ = trained
    uninterrupted = losses(first_dir / "out")
    assert sorted(uninterrupted) == [1, 2, 3, 4]
    checkpoint = first_dir / "out" / "checkpoint-2"
    run_train(
        tmp_path, tiny_model_dir, synthetic_dir, "--freeze_vit", "true", "--resume_from_checkpoint", str(checkpoint)
    )
    resumed = losses(tmp_path / "out")
    for step in (3, 4):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5), step
    (log_file,) = (tmp_path / "logs").glob("train_*.log")  # the resumed run read the prepared set from the cache
    assert "train.jsonl: 48 of 48 pairs kept; loaded from the prepared cache" in log_file.read_text()


def test_dataloader_workers_decode_images_for_the_collator(tmp_path, tiny_model_dir, synthetic_dir):
    run = run_train(
        tmp_path, tiny_model_dir, synthetic_dir, "--dataloader_num_workers", "2", "--use_irrelevant_queries", "true",
        "--max_steps", "2", "--save_strategy", "no",
    )  # fmt: skip
    history = run["trainer"].state.log_history
    assert run["trainer"].state.global_step == 2
    assert all(math.isfinite(entry["loss"]) and entry["irrelevant_loss"] > 0 for entry in history if "loss" in entry)


def test_final_model_records_its_step_for_the_eval_sweep(trained):
    tmp_path, _ = trained
    (final,) = find_checkpoints(tmp_path / "out", pattern="final-only")  # no checkpoint-* dir to fall back on
    assert final.name == "final" and final.step == 4


def test_length_aware_sampling_reads_each_pair_s_tokens(tmp_path, tiny_model_dir, synthetic_dir):
    run = run_train(
        tmp_path,
        tiny_model_dir,
        synthetic_dir,
        "--train_sampling_strategy",
        "batch_rebalance",
        "--save_strategy",
        "no",
    )
    trainer = run["trainer"]
    dataset = trainer.train_dataset
    counted = [run["encoder"].sequence_lengths(row) for row in dataset]  # from each row, images decoded
    assert dataset["length"] == [pair_tokens(length) for length in counted]
    sampler = trainer._get_train_sampler(dataset)
    assert isinstance(sampler, BatchRebalanceSampler)
    assert sorted(index for batch in sampler for index in batch) == list(range(len(dataset)))
    assert trainer.state.global_step == 4 and all(
        math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry
    )


def test_final_model_records_its_reward_statistics_on_the_training_set(trained, synthetic_dir):
    tmp_path, _ = trained
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["reward_stats_source"] == "training set: 48 pairs (96 responses) drawn with seed 7"
    scorer = RewardScorer.from_pretrained(tmp_path / "out")
    pairs, _ = load_preference_dataset(synthetic_dir / "train.jsonl")
    scores = scorer.score_pairs(pairs, batch_size=8, progress=False)
    rewards = np.concatenate([scores.chosen, scores.rejected])
    assert config["reward_mean"] == pytest.approx(rewards.mean(), abs=1e-5)
    assert config["reward_std"] == pytest.approx(rewards.std(), rel=1e-4)
    assert (scorer.reward_mean, scorer.reward_std) == (config["reward_mean"], config["reward_std"])
    np.testing.assert_allclose(
        scorer.normalized(rewards[:3]), (rewards[:3] - rewards.mean()) / rewards.std(), atol=1e-4
    )
    assert "reward_mean" not in json.loads((tmp_path / "out" / "checkpoint-4" / "config.json").read_text())
