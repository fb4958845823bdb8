"""Offline tiny Qwen-VL models: random weights, a locally trained tokenizer and the family's own processor.

Qwen2-VL, Qwen2.5-VL (the demo's model), Qwen3-VL (with DeepStack), Qwen3-VL-MoE (4 experts, 2 per token), Qwen3.5
(one Gated DeltaNet layer and one gated attention layer) and Qwen3.5-MoE, each a 2-layer, 64-wide language model and a 2-block, 32-wide
vision tower. Each is written as an ordinary model directory (config.json + safetensors + tokenizer + processor), so
the demo and the tests load it through exactly the code path used for real checkpoints such as
``Qwen/Qwen2.5-VL-7B-Instruct``.

    python -m vlrm.tiny --output_dir .cache/tiny-qwen2.5-vl
    python -m vlrm.tiny --family qwen3_vl --output_dir .cache/tiny-qwen3-vl

Their attention heads are 16 wide. ``build_tiny_model_dir(DIR, family=F, head_dim=VLLM_HEAD_DIM)`` builds the same
model with 32-wide heads (half as many), the narrowest vLLM's CPU attention runs (``bench/check_vllm.py`` uses it;
Qwen3.5's linear-attention heads stay 16 wide, and vLLM's CPU kernel for them wants 128, which that script sets).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3_5Config,
    Qwen3_5MoeConfig,
    Qwen3VLConfig,
    Qwen3VLMoeConfig,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

# family -> (config class, processor class, video processor class), as the real checkpoints pair them.
QWEN_FAMILIES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLProcessor, Qwen2VLVideoProcessor),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLVideoProcessor),
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLProcessor, Qwen3VLVideoProcessor),
    "qwen3_vl_moe": (Qwen3VLMoeConfig, Qwen3VLProcessor, Qwen3VLVideoProcessor),
    "qwen3_5": (Qwen3_5Config, Qwen3VLProcessor, Qwen3VLVideoProcessor),
    "qwen3_5_moe": (Qwen3_5MoeConfig, Qwen3VLProcessor, Qwen3VLVideoProcessor),
}
# vLLM's CPU attention backend runs head_dim 32 and up (``Unsupported CPU attention configuration: head_dim=16``):
# the tiny models' 16 keeps them fast, ``build_tiny_model_dir(..., head_dim=VLLM_HEAD_DIM)`` makes one vLLM runs.
VLLM_HEAD_DIM = 32
PATCH_SIZES = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16, "qwen3_vl_moe": 16, "qwen3_5": 16, "qwen3_5_moe": 16}

# Qwen-VL's special tokens, in Qwen's order; the processor and the model config look them up by name.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's chat template, written for this project: images and videos become a vision_start/pad/vision_end
# triple that the processor expands to one pad token per merged patch.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text the byte-level BPE is trained on: chat scaffolding plus the synthetic task's words, so that common words
# become single tokens and sequences stay short. Any other text still encodes (byte fallback).
CORPUS = [
    "system user assistant You are a helpful assistant.",
    "What color are the shapes? How many shapes are there? What shape is in the image? Where is the shape?",
    "The shapes are red. The shapes are green. The shapes are blue. The shapes are yellow. It is a circle.",
    "There is one shape. There are two shapes. There are three shapes. Describe the image in one sentence.",
    "the a an is are of in on to and with this that image picture photo answer question yes no",
]


def train_bpe(special_tokens: list[str], extra_corpus: list[str], vocab_size: int = 512) -> Tokenizer:
    """A byte-level BPE trained on ``CORPUS`` plus ``extra_corpus`` (a family's chat scaffolding). ``special_tokens``
    get the first ids, in order, and are never split; any other text still encodes, byte by byte."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((CORPUS + extra_corpus) * 20, trainer=trainer)
    return tokenizer


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    tokenizer = train_bpe(SPECIAL_TOKENS, [], vocab_size)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
    )


def _scaled_sections(sections: list[int], head_dim: int) -> list[int]:
    """mRoPE sections written for head_dim 16, scaled to ``head_dim`` (they must sum to the rotary half-width)."""
    return [section * head_dim // 16 for section in sections]


def _text_config(
    tokenizer: PreTrainedTokenizerFast, family: str, hidden_size: int, num_layers: int, head_dim: int = 16
) -> dict:
    token_id = tokenizer.convert_tokens_to_ids
    if head_dim % 16 or hidden_size % (2 * head_dim):
        raise ValueError(
            f"head_dim must be a multiple of 16 dividing hidden_size / 2, got {head_dim} of {hidden_size}"
        )
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": hidden_size // head_dim,
        "num_key_value_heads": max(1, hidden_size // head_dim // 2),
        "head_dim": head_dim,
        "max_position_embeddings": 4096,
        # mRoPE splits head_dim/2 rotary frequencies over (time, height, width).
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": _scaled_sections([2, 3, 3], head_dim),
        },
        "bos_token_id": token_id("<|endoftext|>"),
        "eos_token_id": token_id("<|im_end|>"),
        "pad_token_id": token_id("<|endoftext|>"),
        "initializer_range": 0.1,
    }
    if family in ("qwen3_vl", "qwen3_vl_moe"):  # interleaved mRoPE, as Qwen3-VL's [24, 20, 20] of 64
        sections = _scaled_sections([4, 2, 2], head_dim)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections,
                                   "mrope_interleaved": True}  # fmt: skip
    if family == "qwen3_vl_moe":
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden_size, decoder_sparse_step=1)
    if family == "qwen3_5_moe":  # 4 routed experts, 2 per token, and the shared expert
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden_size,
                    shared_expert_intermediate_size=hidden_size)  # fmt: skip
    if family in ("qwen3_5", "qwen3_5_moe"):  # a Gated DeltaNet layer, then a gated attention layer (3:1, shrunk)
        text.update(
            layer_types=["linear_attention", "full_attention"] * (num_layers // 2),
            linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
            linear_num_value_heads=4,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                             "mrope_section": _scaled_sections([2, 1, 1], head_dim), "mrope_interleaved": True},
        )  # fmt: skip
    return text


def _vision_config(family: str, hidden_size: int) -> dict:
    vision = {
        "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": hidden_size,
        "patch_size": PATCH_SIZES[family], "spatial_merge_size": 2, "temporal_patch_size": 2, "initializer_range": 0.1,
    }  # fmt: skip
    if family == "qwen2_5_vl":
        vision.update(window_size=112, fullatt_block_indexes=[1])
    elif family == "qwen2_vl":  # Qwen2-VL names the widths embed_dim (tower) and hidden_size (output)
        vision.update(embed_dim=32, hidden_size=hidden_size, mlp_ratio=2)
    else:  # Qwen3-VL / Qwen3.5: a learned 4 x 4 position grid, interpolated to each image
        vision.update(num_position_embeddings=16)
        if family not in ("qwen3_5", "qwen3_5_moe"):
            vision["deepstack_visual_indexes"] = [0, 1]  # both blocks feed DeepStack features to the decoder
    return vision


def build_tiny_config(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    family: str = "qwen2_5_vl",
    head_dim: int = 16,
) -> PretrainedConfig:
    """A tiny config of a Qwen-VL family (``QWEN_FAMILIES``). ``head_dim``: the language model's attention head
    width (16: the default tiny models; 32: what vLLM's CPU attention accepts, ``VLLM_HEAD_DIM``), with
    ``hidden_size / head_dim`` heads and half as many key-value heads."""
    token_id = tokenizer.convert_tokens_to_ids
    config_class, _, _ = QWEN_FAMILIES[family]
    return config_class(
        text_config=_text_config(tokenizer, family, hidden_size, num_layers, head_dim),
        vision_config=_vision_config(family, hidden_size),
        # 0.1 rather than Qwen's 0.02: at hidden size 64 the smaller scale leaves attention nearly uniform and the
        # random model learns far more slowly.
        initializer_range=0.1,
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, family: str = "qwen2_5_vl") -> ProcessorMixin:
    # patch x merge 2 (28 or 32): images are resized to multiples of it, between these pixel counts.
    block = PATCH_SIZES[family] * 2
    sizes = {"patch_size": PATCH_SIZES[family], "merge_size": 2, "temporal_patch_size": 2}
    image_processor = Qwen2VLImageProcessor(min_pixels=block * block, max_pixels=4 * block * 4 * block, **sizes)
    _, processor_class, video_class = QWEN_FAMILIES[family]
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_class(**sizes),
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model_dir(
    output_dir: str | Path,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    family: str = "qwen2_5_vl",
    head_dim: int = 16,
) -> Path:
    """Write a tiny random ``*ForConditionalGeneration`` of a Qwen-VL family and its processor to ``output_dir``
    (``head_dim``: see ``build_tiny_config``; ``VLLM_HEAD_DIM`` for a model vLLM's CPU build runs)."""
    output_dir = Path(output_dir)
    tokenizer = build_tokenizer()
    config = build_tiny_config(
        tokenizer, hidden_size=hidden_size, num_layers=num_layers, family=family, head_dim=head_dim
    )
    torch.manual_seed(seed)
    AutoModelForImageTextToText.from_config(config).save_pretrained(output_dir)
    build_processor(tokenizer, family).save_pretrained(output_dir)
    return output_dir
