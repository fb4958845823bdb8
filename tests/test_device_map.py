"""Models larger than one device: the scorer (and everything built on it) with the model split by accelerate's
big-model dispatch. On this CPU the split is the one accelerate allows without GPUs: some modules stay on the CPU,
others are offloaded to disk and brought in for their forward by accelerate's hooks (the same hooks that move
activations between GPUs). The rewards must equal the one-device scorer's to 1e-5, packed and padded: the hooks move
the packed layout (its ``to``) with the hidden states, and the score head reads the last layer's device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlrm.data.prepare import load_preference_dataset
from vlrm.model.loading import parse_device_map, parse_max_memory, placement
from vlrm.train.irrelevant import RowsWithIrrelevantPrompts
from vlrm.use.rewards import VLRewardFunction
from vlrm.use.scoring import RewardScorer

REWARD_TOLERANCE = 1e-5
# The vision tower and the first decoder layer on the CPU; the second layer, the final norm and the head on disk.
SPLIT = {
    "model.visual": "cpu",
    "model.language_model.embed_tokens": "cpu",
    "model.language_model.rotary_emb": "cpu",
    "model.language_model.layers.0": "cpu",
    "model.language_model.layers.1": "disk",
    "model.language_model.norm": "disk",
    "score": "disk",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, save_reward_checkpoint):
    return save_reward_checkpoint(tmp_path_factory.mktemp("device_map") / "checkpoint-3", seed=3)


@pytest.fixture(scope="module")
def rows(synthetic_dir, encoder):
    dataset, _ = load_preference_dataset(synthetic_dir / "eval.jsonl", max_samples=12, encoder=encoder)
    return RowsWithIrrelevantPrompts(dataset, num_pairs=1, seed=0, mode="query", batch_size=4)


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_split_model_scores_as_one_device(checkpoint, rows, tmp_path, packing):
    whole = RewardScorer.from_pretrained(checkpoint, dtype="float32", device="cpu", packing=packing)
    split = RewardScorer.from_pretrained(
        checkpoint, dtype="float32", packing=packing, device_map=SPLIT, offload_folder=tmp_path / "offload"
    )
    assert set(split.model.hf_device_map.values()) == {"cpu", "disk"} and split.device == torch.device("cpu")
    assert split.model.model.language_model.layers[1].mlp.down_proj.weight.device.type == "meta", "not offloaded"
    expected, got = whole.score_pairs(rows, batch_size=4), split.score_pairs(rows, batch_size=4)
    for name in ("chosen", "rejected", "irrelevant"):
        np.testing.assert_allclose(getattr(got, name), getattr(expected, name), rtol=0, atol=REWARD_TOLERANCE)
    assert np.ptp(expected.chosen) > 0.1, "the rewards must differ between rows for the comparison to mean anything"
    singles = [{"prompt": row["prompt"], "images": row["images"], "response": row["chosen"]} for row in rows]
    np.testing.assert_allclose(split.score(singles), whole.score(singles), rtol=0, atol=REWARD_TOLERANCE)


def test_grpo_reward_function_takes_a_device_map(checkpoint, rows, tmp_path):
    whole = VLRewardFunction.from_pretrained(checkpoint, device="cpu", dtype="float32")
    split = VLRewardFunction.from_pretrained(checkpoint, dtype="float32", device_map=SPLIT | {"score": "cpu"})
    prompts = [row["prompt"] for row in list(rows)[:4]]
    completions = [row["chosen"] for row in list(rows)[:4]]
    images = [row["images"] for row in list(rows)[:4]]
    np.testing.assert_allclose(
        split(prompts, completions, images=images), whole(prompts, completions, images=images), atol=REWARD_TOLERANCE
    )


def test_placement_settings_parse_and_refuse_nonsense():
    assert parse_device_map("auto") == "auto"
    assert parse_device_map('{"model.visual": 0, "score": 1}', devices=[4, 5]) == {"model.visual": 4, "score": 5}
    assert parse_max_memory("70GiB", devices=[2, 3]) == {2: "70GiB", 3: "70GiB"}
    assert parse_max_memory('{"0": "10GiB", "cpu": "50GiB"}', devices=[6]) == {6: "10GiB", "cpu": "50GiB"}
    with pytest.raises(ValueError, match="neither one of auto"):
        parse_device_map("everywhere")
    with pytest.raises(ValueError, match="need a device_map"):
        placement(None, {"cpu": "1GiB"})
