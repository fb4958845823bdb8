"""Reward heads (vlrm/model/heads.py) in every consumer: packed = padded for each head and pooling on Qwen2.5-VL and
Qwen3-VL with a row of N = 4 responses and a tie, pooling over exactly the response tokens, save / reload (full and
LoRA) with identical rewards, the export's refusals, the scorer's and the server's attribute rewards, the reward
statistics per attribute, the config keys and their checks, and one train_rm.py run with every head option.

Tolerances: packed vs padded, every compared tensor to 1e-5 relative with an absolute floor of 1e-5 x the tensor's
largest magnitude (tests/test_packing.py's ``_assert_close``, which explains the floor); a reload of the same
weights, bit for bit (rtol = atol = 0) for a full checkpoint and for unmerged LoRA adapters; LoRA merged into the
base weights, 1e-5 (the merge rounds each weight once); the scorer and the server against the model, 1e-5 relative
and 1e-6 absolute (the same forward in another micro-batch order).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoProcessor, set_seed

from tests.test_packing import _assert_close, _row, _same_prompt, _text
from tests.test_server import call, serving
from tests.test_train import run_train
from vlrm.data.rows import user_prompt
from vlrm.errors import ConfigError
from vlrm.layout.attention import enable_packed_attention
from vlrm.layout.encoder import PreferenceEncoder
from vlrm.layout.labels import LABEL_FIELDS
from vlrm.layout.packed import PackedPreferenceCollator, make_collator
from vlrm.layout.padded import PaddedPreferenceCollator, pad_rows
from vlrm.model.checkpoints import write_lora_metadata
from vlrm.model.heads import HEAD_FIELDS, HeadArguments, configure_head, head_module_names
from vlrm.model.loading import load_checkpoint
from vlrm.model.lora import LoraArguments, apply_lora
from vlrm.model.reward_model import VLRewardModel
from vlrm.train.config import TrainConfig
from vlrm.train.config_files import load_config
from vlrm.train.trainer import VLRewardTrainer
from vlrm.use.export import export_for_vllm, weight_names
from vlrm.use.rewards import VLRewardFunction
from vlrm.use.scoring import RewardScorer
from vlrm.use.server.app import create_app
from vlrm.use.server.settings import ServerSettings

ATTRIBUTES = ["helpfulness", "visual_faithfulness", "ethical_considerations"]
HEADS = {
    "linear-last": HeadArguments(),
    "linear-mean": HeadArguments(reward_pooling="mean"),
    "linear-attention": HeadArguments(reward_pooling="attention"),
    "mlp-last": HeadArguments(score_head="mlp"),
    "mlp-mean": HeadArguments(score_head="mlp", score_head_hidden_size=24, score_head_layers=3, reward_pooling="mean"),
    "mlp-attention": HeadArguments(score_head="mlp", reward_pooling="attention"),
    "attributes": HeadArguments(reward_attributes=ATTRIBUTES, reward_weights=[0.5, 0.3, 0.2], reward_pooling="mean"),
    "scale": HeadArguments(learnable_reward_scale=True),
    "all": HeadArguments(
        score_head="mlp", reward_pooling="attention", reward_attributes=ATTRIBUTES[:2], learnable_reward_scale=True
    ),
}


def _ranking_row(seed: int, num_images: int = 1) -> dict:
    """A canonical row of N = 4 responses ranked [0, 1, 1, 2]: the two middle ones tie (vlrm.data.rankings)."""
    responses = [_text(seed + 10 + index, 2 + 3 * index) for index in range(4)]
    row = _row(seed, num_images, 6, 1, 1)
    return dict(row, responses=responses, ranks=[0, 1, 1, 2], chosen=responses[0], rejected=responses[3])


def _micro_batch() -> list[dict]:
    """A ranking of 4 with a tie and two pairs (two images, none), each with an irrelevant branch."""
    rows = [_ranking_row(1), _row(2, 2, 3, 7, 2), _row(3, 0, 8, 3, 3)]
    rows[0]["irrelevant"], rows[1]["irrelevant"], rows[2]["irrelevant"] = (
        [_same_prompt(rows[1])], [_same_prompt(rows[2])], [_same_prompt(rows[0])],
    )  # fmt: skip
    return rows


def _head_model(model_dir, head: HeadArguments, seed: int = 0) -> VLRewardModel:
    """The tiny model of ``model_dir`` with ``head``, float32, its head parameters drawn from ``seed`` (the attention
    query and the log scale too: at their zero init, attention pooling would be mean pooling and the scale 1)."""
    config = AutoConfig.from_pretrained(model_dir)
    configure_head(config, head, str(model_dir))
    set_seed(seed)
    model = VLRewardModel.from_pretrained(model_dir, config=config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("reward_pooler", "reward_scale"):
            for parameter in getattr(model, name).parameters() if hasattr(model, name) else []:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def _loss(outputs, generator: torch.Generator) -> torch.Tensor:
    """A random weighting of every output, multiplied by the scale as the objectives use it."""
    loss = (outputs.rewards * torch.randn(outputs.rewards.shape, generator=generator)).sum()
    if outputs.attribute_rewards is not None:
        loss = (
            loss
            + (outputs.attribute_rewards * torch.randn(outputs.attribute_rewards.shape, generator=generator)).sum()
        )
    return loss if outputs.logit_scale is None else loss * outputs.logit_scale


def _outputs_and_grads(model, batch, seed: int):
    model.zero_grad(set_to_none=True)
    outputs = model(**_model_inputs_of(batch))
    _loss(outputs, torch.Generator().manual_seed(seed)).backward()
    grads = {
        name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None
    }
    fields = ("rewards", "attribute_rewards", "logit_scale")
    detached = {name: None if getattr(outputs, name) is None else getattr(outputs, name).detach() for name in fields}
    return SimpleNamespace(**detached), grads


def _model_inputs_of(batch: dict) -> dict:
    return {key: value for key, value in batch.items() if key not in LABEL_FIELDS}


# ----------------------------------------------------------------------------------------------------------------
# Packed = padded for every head and pooling, on both families


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("head_name", sorted(HEADS))
def test_packed_equals_padded_for_every_head(head_name, family, family_dirs):
    """Rewards, attribute rewards, the scale and every parameter's gradient, on a micro-batch with a row of N = 4
    responses with a tie, two pairs and irrelevant branches."""
    model_dir = family_dirs(family)
    model = _head_model(model_dir, HEADS[head_name])
    enable_packed_attention(model)
    model.train()  # the tiny models have no dropout
    encoder = PreferenceEncoder(AutoProcessor.from_pretrained(model_dir))
    rows = _micro_batch()
    padded, packed = PaddedPreferenceCollator(encoder)(rows), PackedPreferenceCollator(encoder)(rows)
    assert len(packed["reward_index"]) == padded["input_ids"].shape[0] == 4 + 2 + 2 + 3
    padded_outputs, padded_grads = _outputs_and_grads(model, padded, seed=5)
    packed_outputs, packed_grads = _outputs_and_grads(model, packed, seed=5)
    _assert_close(packed_outputs.rewards, padded_outputs.rewards, "rewards")
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        _assert_close(packed_grads[name], grad, name)
    head = HEADS[head_name]
    if head.reward_attributes:
        assert padded_outputs.attribute_rewards.shape == (11, len(head.reward_attributes))
        _assert_close(packed_outputs.attribute_rewards, padded_outputs.attribute_rewards, "attribute_rewards")
        weights = torch.tensor(head.reward_weights or [1 / len(head.reward_attributes)] * len(head.reward_attributes))
        _assert_close(padded_outputs.rewards, padded_outputs.attribute_rewards @ weights, "weighted sum")
    else:
        assert padded_outputs.attribute_rewards is None
    if head.learnable_reward_scale:
        expected = math.exp(model.reward_scale.log_scale.item())
        assert packed_outputs.logit_scale.item() == pytest.approx(expected, rel=1e-6)
        assert padded_grads["reward_scale.log_scale"].abs().item() > 0
    else:
        assert padded_outputs.logit_scale is None
    # Every head parameter takes part: a pooler or a layer left out of the forward would have no gradient.
    head_parameters = [name for name, _ in model.named_parameters() if name.split(".")[0] in head_module_names(model)]
    assert head_parameters and all(padded_grads[name].abs().sum() > 0 for name in head_parameters)


def test_mean_and_attention_pool_exactly_the_response_tokens(tiny_model_dir, encoder):
    """Mean pooling is the mean of the response's hidden states (its end-of-turn token included, the prompt and the
    padding left out); attention pooling with its zero initial query is the same; a trained query weights them by
    softmax(h . q / sqrt(d)). Computed here row by row from the padded layout's hidden states."""
    rows = _micro_batch()
    batch = _model_inputs_of(PaddedPreferenceCollator(encoder)(rows))
    mean_model = _head_model(tiny_model_dir, HEADS["mlp-mean"]).eval()
    attention_model = _head_model(tiny_model_dir, replace(HEADS["mlp-mean"], reward_pooling="attention")).eval()
    attention_model.score.load_state_dict(mean_model.score.state_dict())
    prompt_lengths = [len(encoder.encode_prompt(row["prompt"], row["images"]).input_ids) for row in rows]
    with torch.no_grad():
        backbone_inputs = {key: value for key, value in batch.items() if not key.startswith("response_")}
        hidden = mean_model.model(**backbone_inputs, use_cache=False).last_hidden_state
        lengths = batch["attention_mask"].sum(-1)
        # Branch i's prompt: rows in reward order (response-major, then the irrelevant branches: each row's best
        # response under the next row's prompt).
        prompts = [0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 0]
        pooled = []
        for branch, prompt in enumerate(prompts):
            pooled.append(hidden[branch, prompt_lengths[prompt] : lengths[branch]].mean(0))
        expected = mean_model.score(torch.stack(pooled)).squeeze(-1)
        torch.testing.assert_close(mean_model(**batch).rewards, expected, rtol=1e-5, atol=1e-6)
        query = attention_model.reward_pooler.query
        query.zero_()
        torch.testing.assert_close(attention_model(**batch).rewards, expected, rtol=1e-5, atol=1e-6)
        query.copy_(torch.randn(query.shape, generator=torch.Generator().manual_seed(1)))
        weighted = []
        for branch, prompt in enumerate(prompts):
            tokens = hidden[branch, prompt_lengths[prompt] : lengths[branch]]
            weighted.append((torch.softmax(tokens @ query / math.sqrt(tokens.shape[-1]), 0)[:, None] * tokens).sum(0))
        expected = attention_model.score(torch.stack(weighted)).squeeze(-1)
        torch.testing.assert_close(attention_model(**batch).rewards, expected, rtol=1e-5, atol=1e-6)


def test_the_default_head_is_the_original_linear_head(tiny_model_dir):
    model = VLRewardModel.from_pretrained(tiny_model_dir)
    assert [name for name, _ in model.named_parameters() if not name.startswith("model.")] == ["score.weight"]
    assert model.score.weight.shape == (1, model.config.text_config.hidden_size) and model.score.bias is None
    assert {name: getattr(model.config, name) for name in HEAD_FIELDS} == HeadArguments().head_settings()
    mlp = _head_model(tiny_model_dir, HEADS["mlp-mean"])
    names = [name for name, _ in mlp.named_parameters() if not name.startswith("model.")]
    assert names == ["score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias", "score.4.weight"]
    assert mlp.score[0].weight.shape == (24, 64) and mlp.score[4].weight.shape == (1, 24)
    everything = _head_model(tiny_model_dir, HEADS["all"])
    assert head_module_names(everything) == ["score", "reward_pooler", "reward_scale"]
    assert everything.score[-1].weight.shape == (2, 64) and everything.reward_pooler.query.shape == (64,)


def test_pooling_without_the_response_tokens_says_what_to_pass(tiny_model_dir, encoder):
    model = _head_model(tiny_model_dir, HEADS["linear-mean"]).eval()
    batch = _model_inputs_of(PaddedPreferenceCollator(encoder)([_row(4, 1, 3, 2, 2)]))
    batch.pop("response_index")
    with pytest.raises(ValueError, match="reward_pooling: mean reads the response tokens: pass response_index"):
        model(**batch)


# ----------------------------------------------------------------------------------------------------------------
# Save / reload: full checkpoints and LoRA adapters


RELOADED = ["mlp-last", "linear-mean", "mlp-attention", "attributes", "scale"]


def _save(model, processor, path: Path) -> Path:
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def saved_heads(tmp_path_factory, tiny_model_dir, processor):
    """A full checkpoint of each head in RELOADED, its head parameters drawn from the seed."""
    root = tmp_path_factory.mktemp("heads")
    return {name: _save(_head_model(tiny_model_dir, HEADS[name], seed=3), processor, root / name) for name in RELOADED}


@pytest.mark.parametrize("head_name", RELOADED)
def test_a_saved_head_reloads_with_identical_rewards(head_name, saved_heads, tiny_model_dir, encoder):
    batch = _model_inputs_of(PackedPreferenceCollator(encoder)(_micro_batch()))
    config = json.loads((saved_heads[head_name] / "config.json").read_text())
    assert {name: config[name] for name in HEAD_FIELDS} == HEADS[head_name].head_settings()
    original = _head_model(tiny_model_dir, HEADS[head_name], seed=3)
    reloaded = VLRewardModel.from_pretrained(saved_heads[head_name])
    for model in (original, reloaded):
        enable_packed_attention(model)
        model.eval()
    with torch.no_grad():
        expected, actual = original(**batch), reloaded(**batch)
    torch.testing.assert_close(actual.rewards, expected.rewards, rtol=0, atol=0)
    if expected.attribute_rewards is not None:
        torch.testing.assert_close(actual.attribute_rewards, expected.attribute_rewards, rtol=0, atol=0)
    if expected.logit_scale is not None:
        assert actual.logit_scale.item() == expected.logit_scale.item() != 1.0


@pytest.mark.parametrize("head_name", ["mlp-attention", "attributes", "scale"])
def test_lora_trains_and_saves_every_head_module_and_reloads_with_identical_rewards(
    head_name, tmp_path, tiny_model_dir, processor, encoder
):
    model = _head_model(tiny_model_dir, HEADS[head_name], seed=4)
    model.name_or_path = str(tiny_model_dir)  # the base the adapter records
    modules = head_module_names(model)
    head_parameters = {name for name, _ in model.named_parameters() if name.split(".")[0] in modules}
    peft_model = apply_lora(model, LoraArguments(use_lora=True, lora_r=4, lora_alpha=8))
    assert sorted(peft_model.peft_config["default"].modules_to_save) == sorted(modules)
    trainable = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    # Besides the adapters, exactly every head parameter trains (peft's copy of it: base_model.model.<module>.
    # modules_to_save.default.<parameter>).
    copies = {name.removeprefix("base_model.model.").replace("modules_to_save.default.", "")
              for name in trainable if ".lora_" not in name}  # fmt: skip
    assert copies == head_parameters
    with torch.no_grad():  # as training would leave them: adapters and every head copy away from their init
        generator = torch.Generator().manual_seed(9)
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    peft_model.save_pretrained(tmp_path / "lora")
    write_lora_metadata(peft_model, tmp_path / "lora")
    processor.save_pretrained(tmp_path / "lora")
    marker = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["vlrm"]
    assert marker["trained_in_full"] == modules
    batch = _model_inputs_of(PackedPreferenceCollator(encoder)(_micro_batch()))
    enable_packed_attention(peft_model)
    peft_model.eval()
    unmerged, _ = load_checkpoint(tmp_path / "lora")
    merged = VLRewardModel.from_pretrained(tmp_path / "lora")
    for loaded in (unmerged, merged):
        enable_packed_attention(loaded)
        loaded.eval()
    with torch.no_grad():
        expected, adapters, folded = peft_model(**batch), unmerged(**batch), merged(**batch)
    torch.testing.assert_close(adapters.rewards, expected.rewards, rtol=0, atol=0)
    torch.testing.assert_close(folded.rewards, expected.rewards, rtol=1e-5, atol=1e-5)
    for name in ("attribute_rewards", "logit_scale"):
        if getattr(expected, name) is not None:
            torch.testing.assert_close(getattr(adapters, name), getattr(expected, name), rtol=0, atol=0)
            torch.testing.assert_close(getattr(folded, name), getattr(expected, name), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# The vLLM export: refusals, and the scale left out


@pytest.mark.parametrize(
    ("head_name", "reason"),
    [
        ("mlp-last", r"score_head: mlp \(vLLM's classifier is one Linear layer\)"),
        ("linear-mean", r"reward_pooling: mean \(vLLM reads the last token only\)"),
        ("linear-attention", r"reward_pooling: attention"),
        ("attributes", r"reward_attributes: \['helpfulness', 'visual_faithfulness', 'ethical_considerations'\]"),
    ],
)
def test_the_export_refuses_heads_vllm_cannot_express(head_name, reason, tmp_path, tiny_model_dir, processor):
    checkpoint = _save(_head_model(tiny_model_dir, HEADS[head_name]), processor, tmp_path / "checkpoint")
    with pytest.raises(ValueError, match=rf"its head cannot be exported for vLLM .*{reason}.*serve_rm\.py"):
        export_for_vllm(checkpoint, tmp_path / "vllm")
    assert not (tmp_path / "vllm").exists()


def test_the_learnable_scale_does_not_block_the_export(saved_heads, tmp_path):
    exported = export_for_vllm(saved_heads["scale"], tmp_path / "vllm")
    config = json.loads((exported / "config.json").read_text())
    assert config["learnable_reward_scale"] is False
    assert "reward_scale.log_scale" in weight_names(saved_heads["scale"])
    assert "reward_scale.log_scale" not in weight_names(exported)
    rows = [{"prompt": "What color?", "images": [_row(7, 1, 1, 1, 1)["images"][0]], "response": "Red."}]
    rows.append({"prompt": "Say something.", "images": [], "response": "Something else entirely."})
    np.testing.assert_allclose(
        RewardScorer.from_pretrained(exported, device="cpu").score(rows),
        RewardScorer.from_pretrained(saved_heads["scale"], device="cpu").score(rows),
        rtol=0, atol=1e-6,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# The scorer, the reward function and the server with attribute heads


ATTRIBUTE_MEAN, ATTRIBUTE_STD = [0.1, -0.2, 0.3], [2.0, 0.5, 1.5]


@pytest.fixture(scope="module")
def attribute_checkpoint(saved_heads):
    """The attribute head's checkpoint with reward statistics in its config, as train_rm.py records them."""
    path = saved_heads["attributes"]
    config = json.loads((path / "config.json").read_text())
    config.update(reward_mean=0.05, reward_std=1.25, reward_attribute_mean=ATTRIBUTE_MEAN,
                  reward_attribute_std=ATTRIBUTE_STD)  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    return path


def _single_rows() -> list[dict]:
    images = _row(8, 2, 1, 1, 1)["images"]
    return [
        {"prompt": "What color are the shapes?", "images": images[:1], "response": text}
        for text in ("Red.", "The shapes are blue.", "Green and yellow.")
    ] + [{"prompt": "Compare <image> with <image>.", "images": images, "response": "Same."},
         {"prompt": "Say something.", "images": [], "response": "Something."}]  # fmt: skip


def test_the_scorer_returns_the_model_s_attribute_rewards_and_normalises_each(attribute_checkpoint, encoder):
    scorer = RewardScorer.from_pretrained(attribute_checkpoint, device="cpu")
    rows = _single_rows()
    rewards, named = scorer.score(rows, attributes=True)
    assert list(named) == ATTRIBUTES
    model = VLRewardModel.from_pretrained(attribute_checkpoint).eval()
    sequences = [
        (user_prompt(row["prompt"], len(row["images"])), row["images"], encoder.encode_response(row["response"]))
        for row in rows
    ]
    with torch.no_grad():
        outputs = model(**pad_rows(encoder, sequences))
    np.testing.assert_allclose(rewards, outputs.rewards.numpy(), rtol=1e-5, atol=1e-6)
    for column, name in enumerate(ATTRIBUTES):
        np.testing.assert_allclose(named[name], outputs.attribute_rewards[:, column].numpy(), rtol=1e-5, atol=1e-6)
    assert np.ptp(named["helpfulness"]) > 0.01  # rows score differently: a mix-up would show
    weighted = sum(weight * named[name] for weight, name in zip([0.5, 0.3, 0.2], ATTRIBUTES, strict=True))
    np.testing.assert_allclose(rewards, weighted, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scorer.score(rows), rewards, rtol=0, atol=0)  # the scalar alone is the same

    normalised_rewards, normalised = scorer.score(rows, normalize=True, attributes=True)
    for name, mean, std in zip(ATTRIBUTES, ATTRIBUTE_MEAN, ATTRIBUTE_STD, strict=True):
        np.testing.assert_allclose(normalised[name], (named[name] - mean) / std, rtol=1e-5, atol=1e-6)
    expected = sum(w * normalised[n] for w, n in zip([0.5, 0.3, 0.2], ATTRIBUTES, strict=True))  # VideoReward's sum
    np.testing.assert_allclose(normalised_rewards, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scorer.score(rows, normalize=True), normalised_rewards, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pass attribute_rewards"):
        scorer.normalized(rewards)

    reward = VLRewardFunction(scorer, normalize=True)
    prompts = [row["prompt"] for row in rows]
    given = reward(prompts, [row["response"] for row in rows], images=[row["images"] for row in rows])
    np.testing.assert_allclose(given, normalised_rewards, rtol=1e-5, atol=1e-6)


def test_score_pairs_gives_the_scalar_reward_of_an_attribute_head(attribute_checkpoint, encoder):
    scorer = RewardScorer.from_pretrained(attribute_checkpoint, device="cpu")
    rows = [_row(20, 1, 4, 3, 5), _row(21, 0, 6, 2, 4)]
    scores = scorer.score_pairs(rows, progress=False)
    singles = [{"prompt": row["prompt"], "images": row["images"], "response": row[side]}
               for side in ("chosen", "rejected") for row in rows]  # fmt: skip
    expected = scorer.score(singles)
    np.testing.assert_allclose(np.concatenate([scores.chosen, scores.rejected]), expected, rtol=1e-5, atol=1e-6)


def test_the_server_returns_attributes_when_asked(attribute_checkpoint, saved_heads):
    scorer = RewardScorer.from_pretrained(attribute_checkpoint, device="cpu")
    reference = RewardScorer.from_pretrained(attribute_checkpoint, device="cpu")
    rows = [row for row in _single_rows() if not row["images"]]  # images over HTTP are tests/test_server.py's part
    items = [{"prompt": row["prompt"], "response": row["response"]} for row in rows]
    items += [{"prompt": "Say something.", "response": "Nothing at all, really."}]
    rows += [{"prompt": "Say something.", "images": [], "response": "Nothing at all, really."}]
    rewards, named = reference.score(rows, attributes=True)
    normalised_rewards, normalised = reference.score(rows, normalize=True, attributes=True)
    with serving(create_app(scorer, ServerSettings(max_wait_ms=1), attribute_checkpoint)) as port:
        status, reply = call(port, "POST", "/score", {"items": items}, key=None)
        assert status == 200 and set(reply) == {"rewards"}
        np.testing.assert_allclose(reply["rewards"], rewards, rtol=1e-5, atol=1e-6)
        status, reply = call(port, "POST", "/score", {"items": items, "attributes": True}, key=None)
        assert status == 200 and list(reply["attributes"]) == ATTRIBUTES
        np.testing.assert_allclose(reply["rewards"], rewards, rtol=1e-5, atol=1e-6)
        for name in ATTRIBUTES:
            np.testing.assert_allclose(reply["attributes"][name], named[name], rtol=1e-5, atol=1e-6)
        body = {"query": ["Say something. Something."], "prompts": ["Say something. "], "attributes": True,
                "normalize": True}  # fmt: skip
        status, reply = call(port, "POST", "/get_reward", body, key=None)
        assert status == 200 and list(reply["attributes"]) == ATTRIBUTES
        status, reply = call(port, "POST", "/score", {"items": items, "attributes": True, "normalize": True}, key=None)
        np.testing.assert_allclose(reply["rewards"], normalised_rewards, rtol=1e-5, atol=1e-6)
        for name in ATTRIBUTES:
            np.testing.assert_allclose(reply["attributes"][name], normalised[name], rtol=1e-5, atol=1e-6)
        status, reply = call(port, "POST", "/score", {"items": items, "attributes": "yes"}, key=None)
        assert status == 400 and reply["field"] == "attributes" and "true or false" in reply["error"]
        assert call(port, "GET", "/info", key=None)[1]["model"]["reward_attributes"] == ATTRIBUTES
    plain = RewardScorer.from_pretrained(saved_heads["mlp-last"], device="cpu")
    with serving(create_app(plain, ServerSettings(max_wait_ms=1), saved_heads["mlp-last"])) as port:
        status, reply = call(port, "POST", "/score", {"items": items, "attributes": True}, key=None)
        assert status == 400 and reply["field"] == "attributes" and "no attribute heads" in reply["error"]


# ----------------------------------------------------------------------------------------------------------------
# Reward statistics per attribute, each response once


class _FakeAccelerator:
    """One process whose last batch comes again, as accelerate's even_batches repeats rows on another rank."""

    def prepare(self, loader):
        batches = list(loader)
        return [*batches, dict(batches[0])]  # a copy: the first is consumed (its keys popped) before the repeat

    def gather(self, tensor):
        return tensor

    def pad_across_processes(self, tensor, pad_index=0):
        return tensor


def test_reward_statistics_count_every_response_once_and_each_attribute(attribute_checkpoint, encoder):
    model = VLRewardModel.from_pretrained(attribute_checkpoint).eval()
    rows = [_ranking_row(30), _row(31, 1, 4, 3, 5), _row(32, 0, 6, 2, 4), _ranking_row(33, 0), _row(34, 1, 3, 3, 3)]
    collator = PaddedPreferenceCollator(encoder)
    fake = SimpleNamespace(
        accelerator=_FakeAccelerator(), args=SimpleNamespace(per_device_eval_batch_size=2), model=model,
        _prepare_inputs=lambda batch: batch,
    )  # fmt: skip
    statistics = VLRewardTrainer.reward_statistics(fake, rows, collator)
    with torch.no_grad():
        outputs = model(**_model_inputs_of(collator(rows)))
    assert statistics.count == 4 + 2 + 2 + 4 + 2 == len(outputs.rewards)
    assert statistics.mean == pytest.approx(outputs.rewards.mean().item(), abs=1e-6)
    assert statistics.std == pytest.approx(outputs.rewards.std(unbiased=False).item(), rel=1e-5)
    np.testing.assert_allclose(statistics.attribute_mean, outputs.attribute_rewards.mean(0).numpy(), atol=1e-6)
    np.testing.assert_allclose(
        statistics.attribute_std, outputs.attribute_rewards.std(0, unbiased=False).numpy(), rtol=1e-5
    )


# ----------------------------------------------------------------------------------------------------------------
# The keys: checks, and a vlrm checkpoint with another head


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"score_head": "deep"}, r"score_head='deep' is not one of: linear, mlp"),
        ({"reward_pooling": "max"}, r"reward_pooling='max' is not one of: last, mean, attention"),
        ({"score_head": "mlp", "score_head_layers": 1}, r"score_head_layers must be at least 2"),
        ({"score_head": "mlp", "score_head_hidden_size": 0}, r"score_head_hidden_size must be at least 1"),
        ({"reward_attributes": []}, r"reward_attributes must be a non-empty list"),
        ({"reward_attributes": ["a", "a"]}, r"repeated names"),
        ({"reward_weights": [1.0]}, r"reward_weights combine reward_attributes"),
        ({"reward_attributes": ["a", "b"], "reward_weights": [1.0]}, r"1 entries for 2 reward_attributes"),
        ({"reward_attributes": ["a", "b"], "reward_weights": [0.0, 0.0]}, r"not all 0"),
    ],
)
def test_impossible_head_settings_raise(values, message):
    with pytest.raises(ConfigError, match=message):
        HeadArguments(**values)._check_head_arguments()


def test_mlp_settings_on_a_linear_head_warn():
    with pytest.warns(UserWarning, match="no effect with score_head: linear"):
        HeadArguments(score_head_layers=3)._check_head_arguments()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HeadArguments(score_head="mlp", score_head_layers=3)._check_head_arguments()


def test_a_vlrm_checkpoint_with_another_head_is_refused_naming_the_difference(saved_heads, tmp_path):
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        f"model_name_or_path: {saved_heads['mlp-attention']}\ndataset_path: data.jsonl\noutput_dir: {tmp_path}\n"
        "use_cpu: true\nreport_to: none\n"
    )
    message = r"whose head differs from this config's: score_head: 'mlp' \(asked: 'linear'\); .*reward_pooling"
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, config_file, [])
    same = load_config(TrainConfig, config_file, ["--score_head", "mlp", "--reward_pooling", "attention"])
    assert same.score_head == "mlp"  # the checkpoint's own head: training goes on
    model_config = AutoConfig.from_pretrained(saved_heads["mlp-attention"])
    with pytest.raises(ConfigError, match=r"reward_pooling: 'attention' \(asked: 'mean'\)"):
        configure_head(model_config, HeadArguments(score_head="mlp", reward_pooling="mean"), "checkpoint")


# ----------------------------------------------------------------------------------------------------------------
# train_rm.py with every head option


def test_train_rm_builds_the_head_it_is_given_and_records_each_attribute_s_statistics(
    tmp_path, tiny_model_dir, synthetic_dir
):
    """LoRA, an MLP head, attention pooling, two attributes and the learnable scale, 2 steps (loss_type bt: the
    objectives warn that attributes then learn only their sum), reward statistics on 6 pairs (not a multiple of the
    eval batch of 8)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        run = run_train(
            tmp_path, tiny_model_dir, synthetic_dir, "--use_lora", "true", "--lora_r", "4", "--score_head", "mlp",
            "--reward_pooling", "attention", "--reward_attributes", "helpfulness", "faithfulness",
            "--learnable_reward_scale", "true", "--max_train_samples", "8", "--max_steps", "2", "--save_strategy",
            "no", "--reward_stats_samples", "6",
        )  # fmt: skip
    output = tmp_path / "out"
    config = json.loads((output / "config.json").read_text())
    assert config["score_head"] == "mlp" and config["reward_pooling"] == "attention"
    assert config["reward_attributes"] == ["helpfulness", "faithfulness"] and config["learnable_reward_scale"]
    marker = json.loads((output / "adapter_config.json").read_text())["vlrm"]
    assert marker["trained_in_full"] == ["score", "reward_pooler", "reward_scale"]
    assert config["reward_stats_source"] == "training set: 6 pairs (12 responses) drawn with seed 7"
    # The statistics are the trained model's rewards on the drawn pairs.
    model = run["model"].eval()
    batch = make_collator(run["encoder"], True)(list(run["train_dataset"].select(run["sample"])))
    with torch.no_grad():
        outputs = model(**_model_inputs_of(batch))
    assert config["reward_mean"] == pytest.approx(outputs.rewards.mean().item(), abs=1e-5)
    np.testing.assert_allclose(config["reward_attribute_mean"], outputs.attribute_rewards.mean(0).numpy(), atol=1e-5)
    np.testing.assert_allclose(
        config["reward_attribute_std"], outputs.attribute_rewards.std(0, unbiased=False).numpy(), rtol=1e-4
    )
    # Trained: the head moved from its initialisation (the query and the log scale start at exactly 0).
    base = model.get_base_model()
    assert base.reward_pooler.query.abs().sum() > 0 and base.reward_scale.log_scale.abs().item() > 0
    scorer = RewardScorer.from_pretrained(output, device="cpu")
    assert scorer.attribute_names == ("helpfulness", "faithfulness") and scorer.can_normalize
