"""The vLLM export (vlrm/use/export.py): per family the head under the name vLLM 0.32's loader maps, every other
tensor unchanged, the label fields vLLM reads, vlrm's own reload with the same rewards, refusals with the reason, and
``reward_text`` with images. bench/check_vllm.py runs the real engine on these exports."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, LlavaConfig

from vlrm.data.rows import user_prompt
from vlrm.data.synthetic import draw_shapes
from vlrm.layout.encoder import PreferenceEncoder
from vlrm.model.reward_model import VLRewardModel
from vlrm.tiny import build_tiny_config, build_tokenizer
from vlrm.use import export
from vlrm.use.export import VLLM_RECIPES, export_for_vllm, reward_text
from vlrm.use.scoring import RewardScorer

ATOL = 1e-6  # the export's weights are the checkpoint's bits: reloading it only re-runs the same float32 forward


def _shapes(index: int):
    return draw_shapes(("red", "blue", "green")[index % 3], 1 + index % 3, 56, random.Random(index))


def _reward_checkpoint(model_dir, path, seed: int = 0, reward_mean: float | None = None, **save_kwargs):
    """The tiny backbone of ``model_dir`` with a score head drawn from ``seed``, saved with its processor."""
    model = VLRewardModel.from_pretrained(model_dir)
    with torch.no_grad():
        model.score.weight.normal_(generator=torch.Generator().manual_seed(seed))
    model.config.reward_mean = reward_mean
    model.save_pretrained(path, **save_kwargs)
    AutoProcessor.from_pretrained(model_dir).save_pretrained(path)
    return path


def _tensors(model_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors |= load_file(file)
    return tensors


ROWS = [
    {"prompt": "What color are the shapes?", "images": [_shapes(0)], "response": "The shapes are red."},
    {"prompt": "How many shapes?", "images": [_shapes(1), _shapes(2)], "response": "There are two shapes."},
    {"prompt": "Describe the image in one sentence.", "images": [], "response": "It is a circle."},
]


@pytest.mark.parametrize("family", sorted(VLLM_RECIPES))
def test_each_family_is_written_as_vllm_loads_it_and_vlrm_reloads_it(family, tmp_path, family_dirs):
    checkpoint = _reward_checkpoint(family_dirs(family), tmp_path / "checkpoint", seed=1, reward_mean=0.5)
    exported = export_for_vllm(checkpoint, tmp_path / "vllm")
    recipe = VLLM_RECIPES[family]
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == [recipe.architecture]
    for level in (config, config["text_config"]):  # vLLM reads the label space from either, by version
        assert level["num_labels"] == 1 and level["id2label"] == {"0": "reward"}
        assert level["problem_type"] == "regression"  # vLLM then applies no activation, even by default
    assert config["vlrm"]["vllm"]["head"] == recipe.head and config["vlrm"]["reward_mean"] == 0.5
    assert config["vlrm"]["vllm"]["serve_flags"][:2] == ["--runner", "pooling"]

    # The head is where vLLM's loader looks for it; every other tensor is the checkpoint's, bit for bit.
    original, written = _tensors(checkpoint), _tensors(exported)
    assert set(written) == (set(original) - {"score.weight"}) | {recipe.head}
    assert all(torch.equal(written[name], original[name]) for name in original if name != "score.weight")
    assert torch.equal(written[recipe.head], original["score.weight"])
    assert (recipe.head == "language_model.score.weight") == family.startswith("qwen2")

    reference = RewardScorer.from_pretrained(checkpoint, device="cpu").score(ROWS)
    reloaded = RewardScorer.from_pretrained(exported, device="cpu").score(ROWS)
    assert np.ptp(reference) > 0.1  # a head that separates the rows, so equal rewards mean something
    np.testing.assert_allclose(reloaded, reference, rtol=0, atol=ATOL)


def test_a_sharded_checkpoint_keeps_its_shards_and_its_index_follows_the_head(tmp_path, tiny_model_dir):
    checkpoint = _reward_checkpoint(tiny_model_dir, tmp_path / "checkpoint", max_shard_size="100KB")
    shards = sorted(path.name for path in checkpoint.glob("*.safetensors"))
    assert len(shards) > 1
    exported = export_for_vllm(checkpoint, tmp_path / "vllm")
    assert sorted(path.name for path in exported.glob("*.safetensors")) == shards
    weight_map = json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"]
    assert "score.weight" not in weight_map
    with safe_open(exported / weight_map["language_model.score.weight"], "pt") as weights:
        assert "language_model.score.weight" in weights.keys()
    np.testing.assert_allclose(
        RewardScorer.from_pretrained(exported, device="cpu").score(ROWS),
        RewardScorer.from_pretrained(checkpoint, device="cpu").score(ROWS),
        rtol=0, atol=ATOL,
    )  # fmt: skip


def _config_only_dir(path, config):
    """A dir with a family's config and a placeholder weight file: the family check comes before any weight."""
    config.save_pretrained(path)
    save_file({"score.weight": torch.zeros(1, 4)}, path / "model.safetensors")
    return path


def test_families_vllm_cannot_serve_are_refused_with_the_reason(tmp_path):
    tokenizer = build_tokenizer()
    moe = _config_only_dir(tmp_path / "moe", build_tiny_config(tokenizer, family="qwen3_vl_moe"))
    with pytest.raises(ValueError, match=r"Qwen3-VL-MoE cannot be exported for vLLM 0\.32\.0: .*expert"):
        export_for_vllm(moe, tmp_path / "moe-vllm")
    moe35 = _config_only_dir(tmp_path / "moe35", build_tiny_config(tokenizer, family="qwen3_5_moe"))
    with pytest.raises(ValueError, match=r"Qwen3\.5-MoE cannot be exported .*text-only"):
        export_for_vllm(moe35, tmp_path / "moe35-vllm")
    llava = _config_only_dir(tmp_path / "llava", LlavaConfig())
    with pytest.raises(ValueError, match=r"generic image-text-to-text path is not checked against vLLM.*serve_rm\.py"):
        export_for_vllm(llava, tmp_path / "llava-vllm")
    assert not (tmp_path / "moe-vllm").exists() and not (tmp_path / "llava-vllm").exists()


def test_tensors_vllm_would_not_load_stop_the_export(tmp_path, save_reward_checkpoint):
    checkpoint = save_reward_checkpoint(tmp_path / "checkpoint")
    tensors = load_file(checkpoint / "model.safetensors")
    tensors["score.bias"] = torch.zeros(1)  # a head vLLM's classifier (one bias-free Linear) would not carry
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"would not load: \['score\.bias'\]"):
        export_for_vllm(checkpoint, tmp_path / "vllm")
    assert not (tmp_path / "vllm").exists()


def test_the_export_never_writes_over_a_model(tmp_path, save_reward_checkpoint, capsys):
    checkpoint = save_reward_checkpoint(tmp_path / "checkpoint")
    assert export.main([str(checkpoint), str(tmp_path / "vllm")]) == 0
    printed = capsys.readouterr().out
    assert f"--model {tmp_path / 'vllm'} --runner pooling" in printed
    with pytest.raises(ValueError, match="already holds a model"):  # vLLM would load a stale shard left there too
        export_for_vllm(checkpoint, tmp_path / "vllm")
    with pytest.raises(ValueError, match="another dir than the checkpoint"):
        export_for_vllm(checkpoint, checkpoint)


def test_reward_text_places_one_image_placeholder_per_image(processor):
    encoder = PreferenceEncoder(processor)
    images = [_shapes(0), _shapes(1)]
    cases = [
        ("How many shapes?", images, user_prompt("How many shapes?", 2)),
        ("Left <image> right <image> which?", images, user_prompt("Left <image> right <image> which?", 2)),
        ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}], images[:1], None),
        ("Colour?", [], user_prompt("Colour?", 0)),
    ]
    for prompt, row_images, messages in cases:
        text = reward_text(processor, prompt, "Red. ", row_images)
        assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == len(row_images)
        assert text.endswith("Red. <|im_end|>")
        # The text and the images, through the processor as vLLM runs it, are exactly the ids the scorer reads.
        if row_images:
            ids = processor(text=[text], images=row_images, add_special_tokens=False)["input_ids"][0]
        else:
            ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        expected = encoder.encode_prompt(messages or prompt, row_images).input_ids + encoder.encode_response("Red. ")
        assert list(ids) == expected
    assert reward_text(processor, "How many shapes?", "Two.", 2) == reward_text(
        processor, "How many shapes?", "Two.", images
    )
    with pytest.raises(ValueError, match="2 <image> markers for 1 images"):
        reward_text(processor, "Left <image> right <image>", "Red.", images[:1])
    with pytest.raises(ValueError, match="1 image parts for 2 images"):
        reward_text(processor, cases[2][0], "Red.", images)
