"""The packed layout gives the padded layout's rewards and gradients, with each image through the vision tower once.

Tolerance: every compared tensor (rewards, each parameter's gradient) must match to 1e-5 relative, elementwise, with
an absolute floor of 1e-5 x the tensor's largest magnitude. The floor is there because float32 round-off in a sum is
of the order of eps x the size of the summands, not of the result: a gradient element that cancels to near zero
(or a reward near 0) legitimately differs by ~1e-7 x the tensor's scale between two summation orders. Measured:
the largest difference is ~2e-6 of a tensor's scale, so 1e-5 leaves a 5x margin while a real layout bug (a token
attending to the wrong keys, a shifted position) gives differences of 1e-2 and more.
"""

import importlib.machinery
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import set_seed

import vlrm.layout.attention as attention
import vlrm.layout.packed as packing
import vlrm.layout.segments as segments
from vlrm.layout.attention import enable_packed_attention, uses_packed_attention
from vlrm.layout.packed import PackedPreferenceCollator, make_collator, packed_tokens, pair_tokens, prompt_key
from vlrm.layout.padded import PaddedPreferenceCollator
from vlrm.model.reward_model import VLRewardModel

PAIR_FIELDS = ("num_pairs", "num_irrelevant", "margin")
WORDS = "the shapes are red green blue yellow circle one two three image picture answer question yes no".split()
IMAGE_SIZES = [(28, 28), (56, 28), (28, 56), (56, 56), (70, 42), (40, 84)]


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _prompt(num_images: int, question: str) -> list[dict]:
    content = [{"type": "image", "text": None} for _ in range(num_images)] + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def _text(seed: int, num_words: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=num_words).tolist()) + "."


def _row(seed: int, num_images: int, question_words: int, chosen_words: int, rejected_words: int) -> dict:
    rng = np.random.default_rng(seed)
    sizes = [IMAGE_SIZES[index] for index in rng.integers(len(IMAGE_SIZES), size=num_images)]
    return {
        "prompt": _prompt(num_images, _text(seed + 1, question_words)),
        "images": [_image(seed * 10 + index, size) for index, size in enumerate(sizes)],
        "chosen": _text(seed + 2, chosen_words),
        "rejected": _text(seed + 3, rejected_words),
    }


def _same_prompt(row: dict) -> dict:
    """The row's prompt as the irrelevant-query sampler brings it: equal, but freshly decoded image objects."""
    return {"prompt": row["prompt"], "images": [image.copy() for image in row["images"]]}


def _model_inputs(batch: dict) -> dict:
    return {key: value for key, value in batch.items() if key not in PAIR_FIELDS}


def _rewards_and_grads(model, batch, weights):
    model.zero_grad(set_to_none=True)
    rewards = model(**_model_inputs(batch)).rewards
    (rewards * weights).sum().backward()
    grads = {
        name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None
    }
    return rewards.detach(), grads


def _assert_close(actual, expected, name=""):
    floor = 1e-5 * float(expected.abs().max())
    torch.testing.assert_close(
        actual, expected, rtol=1e-5, atol=max(floor, 1e-12), msg=lambda message: f"{name}: {message}"
    )


def _assert_same_rewards_and_grads(model, encoder, rows, seed=0):
    padded = PaddedPreferenceCollator(encoder)(rows)
    packed = PackedPreferenceCollator(encoder)(rows)
    weights = torch.randn(padded["input_ids"].shape[0], generator=torch.Generator().manual_seed(seed))
    padded_rewards, padded_grads = _rewards_and_grads(model, padded, weights)
    packed_rewards, packed_grads = _rewards_and_grads(model, packed, weights)
    _assert_close(packed_rewards, padded_rewards, "rewards")
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        _assert_close(packed_grads[name], grad, name)
    return padded, packed


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    set_seed(0)
    model = VLRewardModel.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    enable_packed_attention(model)
    return model


@st.composite
def micro_batches(draw):
    """1-3 pairs with 0-2 images each, and 0-2 irrelevant prompts per pair: an in-batch prompt, an out-of-batch
    prompt, or (image mode) the pair's question with another pair's images. Pairs may share a prompt."""
    num_pairs = draw(st.integers(1, 3))
    rows = []
    for _ in range(num_pairs):
        seed = draw(st.integers(0, 10_000))
        row = _row(seed, draw(st.sampled_from([0, 1, 2])), *(draw(st.integers(1, 12)) for _ in range(3)))
        if rows and draw(st.booleans()) and draw(st.booleans()):  # another pair under the same prompt
            row.update(_same_prompt(rows[-1]))
        rows.append(row)
    num_irrelevant = draw(st.integers(0, 2))
    for index, row in enumerate(rows):
        row["irrelevant"] = []
        for _ in range(num_irrelevant):
            kind = draw(st.sampled_from(["in_batch", "outside", "image_swap"]))
            others = [other for other in range(num_pairs) if other != index]
            if kind == "outside" or not others:
                outside = _row(draw(st.integers(10_001, 20_000)), draw(st.sampled_from([0, 1, 2])), 5, 1, 1)
                row["irrelevant"].append({"prompt": outside["prompt"], "images": outside["images"]})
                continue
            other = rows[draw(st.sampled_from(others))]
            if kind == "in_batch":
                row["irrelevant"].append(_same_prompt(other))
            else:
                question = row["prompt"][0]["content"][-1]["text"]
                images = [image.copy() for image in other["images"]]
                row["irrelevant"].append({"prompt": _prompt(len(images), question), "images": images})
    return rows


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=micro_batches(), seed=st.integers(0, 1000))
def test_packed_rewards_and_gradients_equal_padded(model, encoder, rows, seed):
    padded, packed = _assert_same_rewards_and_grads(model, encoder, rows, seed)
    assert packed["input_ids"].shape[0] == 1 and packed["num_irrelevant"] == padded["num_irrelevant"]
    # Each distinct image's patches appear once.
    distinct = {}
    for row in rows:
        for prompt in [row] + row["irrelevant"]:
            for image in prompt["images"]:
                distinct[packing.image_key(image)] = encoder.visual_tokens(image) * 4  # 2x2 patches a token
    assert packed.get("pixel_values", torch.empty(0, 1)).shape[0] == sum(distinct.values())


def test_gradient_checkpointing_packed_equals_padded(tiny_model_dir, encoder, monkeypatch):
    set_seed(0)
    model = VLRewardModel.from_pretrained(tiny_model_dir, dtype=torch.float32)
    enable_packed_attention(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # checkpointing is active in training mode; the tiny model has no dropout
    calls, real_packed_sdpa = [], attention.packed_sdpa
    monkeypatch.setattr(attention, "packed_sdpa", lambda *args: calls.append(1) or real_packed_sdpa(*args))
    rows = [_row(1, 1, 6, 4, 9), _row(2, 2, 3, 7, 2), _row(3, 0, 8, 3, 3)]
    rows[0]["irrelevant"], rows[1]["irrelevant"], rows[2]["irrelevant"] = (
        [_same_prompt(rows[1])],
        [_same_prompt(rows[2])],
        [_same_prompt(rows[0])],
    )
    _assert_same_rewards_and_grads(model, encoder, rows)
    # Every layer's packed attention ran twice: forward, then the recompute in backward.
    assert len(calls) == 2 * model.config.text_config.num_hidden_layers


def test_each_image_goes_through_the_vision_encoder_once(model, encoder):
    rows = [_row(11, 2, 5, 3, 4), _row(12, 1, 4, 6, 2), _row(13, 1, 7, 2, 2)]
    rows[2].update(images=[rows[1]["images"][0].copy()])  # two questions about one image
    rows[0]["irrelevant"] = [_same_prompt(rows[1])]
    rows[1]["irrelevant"] = [_same_prompt(rows[0])]
    question = rows[2]["prompt"][0]["content"][-1]["text"]
    rows[2]["irrelevant"] = [{"prompt": _prompt(2, question), "images": [image.copy() for image in rows[0]["images"]]}]
    patches = []
    hook = model.model.visual.patch_embed.register_forward_hook(
        lambda module, args, output: patches.append(len(args[0]))
    )
    try:
        padded, packed = _assert_same_rewards_and_grads(model, encoder, rows)
    finally:
        hook.remove()
    distinct_images = rows[0]["images"] + rows[1]["images"]
    expected = sum(encoder.visual_tokens(image) * 4 for image in distinct_images)  # 2x2 patches per token
    padded_patches, packed_patches = patches
    assert packed_patches == expected == packed["pixel_values"].shape[0]
    assert packed["image_grid_thw"].shape[0] == 3 and packed["packed_layout"].image_order.tolist() == [
        0,
        1,
        2,
        2,
        0,
        1,
    ]
    assert padded_patches == padded["pixel_values"].shape[0] > 2 * packed_patches


def test_same_shape_segments_are_batched_and_still_exact(model, encoder):
    """Prompts of equal length (and branches of equal length) in different nodes run as one batched SDPA call; the
    gathers that group them and put the outputs back in row order must be exact."""
    first = _row(51, 1, 6, 5, 7)
    second = dict(first, images=[_image(52, first["images"][0].size)])  # same shapes, other pixels
    third = _row(53, 0, 4, 3, 3)
    rows = [first, second, third]
    packed = PackedPreferenceCollator(encoder)(rows)
    layout = packed["packed_layout"]
    assert layout.bucket_query_index is not None and max(bucket.count for bucket in layout.buckets) >= 2
    _assert_same_rewards_and_grads(model, encoder, rows)


def test_sdpa_calls_per_layer_are_bounded_and_padding_in_buckets_changes_nothing(model, encoder, monkeypatch):
    """Three prompts (39, 38 and 27 tokens) with 12, 6 and 2 branches of many lengths: far more segment shapes than
    MAX_ATTENTION_BUCKETS, yet at most that many SDPA calls per layer, and the rewards and every gradient those of the
    padded layout (1e-5, as above): padding inside a bucket changes nothing, whether the bucket holds prompts only
    (causal), branches of several prompts (one mask per segment) or a prompt among branches."""
    first, second = _row(61, 1, 9, 1, 2), _row(62, 0, 12, 1, 2)
    rows = [dict(first, chosen=_text(70 + i, 4 * i + 1), rejected=_text(90 + i, 4 * i + 3)) for i in range(6)]
    rows += [dict(second, chosen=_text(110 + i, 4 * i + 2), rejected=_text(130 + i, 4 * i + 4)) for i in range(3)]
    rows += [_row(63, 0, 2, 9, 12)]
    layout = PackedPreferenceCollator(encoder)(rows)["packed_layout"]
    shapes = {(end - start, prefix_end - prefix_start) for start, end, prefix_start, prefix_end in layout.segments}
    assert len(shapes) >= 4 * segments.MAX_ATTENTION_BUCKETS and len(layout.buckets) <= segments.MAX_ATTENTION_BUCKETS
    prefixes = [set(bucket.prefix_lengths) for bucket in layout.buckets]  # 0: a prompt
    kinds = {
        "prompts only": {0} in prefixes,
        "branches of several prompts": any(len(p) > 1 and 0 not in p for p in prefixes),
        "a prompt among branches": any(0 in p and len(p) > 1 for p in prefixes),
    }
    assert all(kinds.values()), kinds
    calls, real_sdpa = [], attention.scaled_dot_product_attention
    monkeypatch.setattr(
        attention, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real_sdpa(*a, **k)
    )
    _assert_same_rewards_and_grads(model, encoder, rows)
    assert len(calls) == len(layout.buckets) * model.config.text_config.num_hidden_layers  # the packed forward only


def test_eager_model_packed_equals_padded(tiny_model_dir, encoder):
    set_seed(0)
    model = VLRewardModel.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    rows = [_row(21, 1, 5, 3, 8), _row(22, 0, 9, 5, 1)]
    rows[0]["irrelevant"], rows[1]["irrelevant"] = [_same_prompt(rows[1])], [_same_prompt(rows[0])]
    padded = _model_inputs(PaddedPreferenceCollator(encoder)(rows))
    packed = _model_inputs(PackedPreferenceCollator(encoder)(rows))
    with torch.no_grad():
        eager_rewards = model(**padded).rewards
        enable_packed_attention(model)
        enable_packed_attention(model)  # idempotent
        assert model.config.text_config._attn_implementation == "vlrm_packed_eager"
        assert model.config.vision_config._attn_implementation == "eager"
        torch.testing.assert_close(model(**padded).rewards, eager_rewards, rtol=0, atol=0)  # still plain eager
        _assert_close(model(**packed).rewards, eager_rewards)


def test_packed_layout_without_packed_attention_raises(tiny_model_dir, encoder):
    model = VLRewardModel.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    batch = _model_inputs(make_collator(encoder, packing=True)([_row(31, 1, 4, 2, 2)]))
    with pytest.raises(ValueError, match="enable_packed_attention"):
        model(**batch)


def test_a_transformers_without_mm_encoder_outputs_is_refused(tiny_model_dir, monkeypatch):
    """Before transformers 5.18 the backbone's forward has no ``mm_encoder_outputs``: it would swallow the packed
    row's image features in **kwargs and embed the image tokens as text (5.17: packed and padded rewards 0.29 apart),
    so enabling the packed layout refuses, with the version to install."""
    model = VLRewardModel.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    backbone = type(model.model)
    original = backbone.forward

    def older_forward(self, input_ids=None, attention_mask=None, position_ids=None, pixel_values=None, **kwargs):
        return original(self, input_ids, attention_mask, position_ids, pixel_values=pixel_values, **kwargs)

    monkeypatch.setattr(backbone, "forward", older_forward)
    with pytest.raises(ValueError, match=r"mm_encoder_outputs.*pip install 'transformers>=5\.24'.*packing: false"):
        enable_packed_attention(model)
    assert model.config.text_config._attn_implementation == "sdpa"  # left as it was
    monkeypatch.setattr(backbone, "forward", original)
    enable_packed_attention(model)
    assert uses_packed_attention(model)


def test_flash_varlen_path_with_a_reference_kernel(model, encoder, monkeypatch):
    """The flash-attn path's glue (gathered keys, cu_seqlens, bottom-right causality), run with a plain-torch
    stand-in for ``flash_attn_varlen_func``: flash-attn itself needs a GPU."""

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs):
        assert kwargs["causal"] and q.shape[0] == cu_seqlens_q[-1] and k.shape[0] == cu_seqlens_k[-1]
        outputs = []
        for index in range(len(cu_seqlens_q) - 1):
            query = q[cu_seqlens_q[index] : cu_seqlens_q[index + 1]].transpose(0, 1)
            key = k[cu_seqlens_k[index] : cu_seqlens_k[index + 1]].transpose(0, 1)
            value = v[cu_seqlens_k[index] : cu_seqlens_k[index + 1]].transpose(0, 1)
            key, value = (tensor.repeat_interleave(q.shape[1] // k.shape[1], 0) for tensor in (key, value))
            mask = attention._bottom_right_causal_mask(query.shape[1], key.shape[1] - query.shape[1], q.device)
            scores = (query @ key.transpose(1, 2)) * kwargs["softmax_scale"]
            outputs.append((scores.masked_fill(~mask, float("-inf")).softmax(-1) @ value).transpose(0, 1))
        assert all(
            max(torch.diff(cu)) <= length
            for cu, length in ((cu_seqlens_q, max_seqlen_q), (cu_seqlens_k, max_seqlen_k))
        )
        return torch.cat(outputs)

    fake = types.ModuleType("flash_attn")
    fake.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    fake.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    rows = [_row(41, 2, 5, 3, 6), _row(42, 0, 4, 2, 9)]
    rows[0]["irrelevant"] = [_same_prompt(rows[1])]
    rows[1]["irrelevant"] = [{"prompt": _prompt(0, "Other question"), "images": []}]
    packed = _model_inputs(PackedPreferenceCollator(encoder)(rows))
    with torch.no_grad():
        sdpa_rewards = model(**packed).rewards
        model.set_attn_implementation({"text_config": "vlrm_packed_varlen"})
        try:
            varlen_rewards = model(**packed).rewards
        finally:
            model.set_attn_implementation({"text_config": "vlrm_packed_sdpa"})
    _assert_close(varlen_rewards, sdpa_rewards)


def test_pair_sizes_count_each_layout_s_tokens(encoder):
    lengths = [(100, 10, 20), (100, 30, 5)]
    # A shared prompt is counted once; irrelevant branches add the chosen response again.
    assert packed_tokens(lengths, prompt_keys=["a", "a"]) == 100 + 30 + 35
    assert packed_tokens(lengths, num_irrelevant=1) == 200 + 30 + 35 + 40
    assert pair_tokens(lengths[0]) == 130 and pair_tokens(lengths[0], num_irrelevant=2) == 150
    # Padded: one row per branch (chosen, rejected, irrelevant), each prompt + the longer response long.
    assert pair_tokens(lengths[0], num_irrelevant=1, packing=False) == 3 * 120
    row = {"prompt": [{"role": "user", "content": [{"type": "text", "text": "Hi?"}]}], "images": [],
           "chosen": "A long answer here.", "rejected": "No."}  # fmt: skip
    padded = PaddedPreferenceCollator(encoder)([row])
    assert padded["input_ids"].numel() == pair_tokens(encoder.sequence_lengths(row), packing=False)


def test_pair_lengths_predict_the_packed_row(encoder, synthetic_dir):
    from vlrm.data.prepare import load_preference_dataset, pair_lengths

    dataset, _ = load_preference_dataset(synthetic_dir / "train.jsonl", max_samples=4, encoder=encoder)
    lengths = pair_lengths(dataset)
    rows = list(dataset)
    for index, row in enumerate(rows):
        row["irrelevant"] = [_same_prompt(rows[(index + 1) % len(rows)])]
    batch = PackedPreferenceCollator(encoder)(rows)
    keys = [prompt_key(row["prompt"], row["images"]) for row in rows]
    assert batch["input_ids"].shape[1] == packed_tokens(lengths, num_irrelevant=1, prompt_keys=keys)
    # The batch survives a DataLoader worker (pickling) and moves with the layout's .to().
    restored = pickle.loads(pickle.dumps(batch))
    assert restored["packed_layout"].to("cpu").segments == batch["packed_layout"].segments
