"""An offline tiny Qwen2.5-VL: random weights, a locally trained tokenizer and a Qwen2-VL processor.

It is written as an ordinary model directory (config.json + safetensors + tokenizer + processor), so the demo and
the tests load it through exactly the code path used for real checkpoints such as ``Qwen/Qwen2.5-VL-7B-Instruct``.

    python -m vlrm.tiny --output_dir .cache/tiny-qwen2.5-vl
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

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
_CORPUS = [
    "system user assistant You are a helpful assistant.",
    "What color are the shapes? How many shapes are there? What shape is in the image? Where is the shape?",
    "The shapes are red. The shapes are green. The shapes are blue. The shapes are yellow. It is a circle.",
    "There is one shape. There are two shapes. There are three shapes. Describe the image in one sentence.",
    "the a an is are of in on to and with this that image picture photo answer question yes no",
]


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
    )


def build_tiny_config(
    tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, num_layers: int = 2
) -> Qwen2_5_VLConfig:
    token_id = tokenizer.convert_tokens_to_ids
    head_dim = 16
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": hidden_size * 2,
            "num_hidden_layers": num_layers,
            "num_attention_heads": hidden_size // head_dim,
            "num_key_value_heads": max(1, hidden_size // head_dim // 2),
            "max_position_embeddings": 4096,
            # mRoPE splits head_dim/2 rotary frequencies over (time, height, width).
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": token_id("<|endoftext|>"),
            "eos_token_id": token_id("<|im_end|>"),
            "pad_token_id": token_id("<|endoftext|>"),
            "initializer_range": 0.1,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "initializer_range": 0.1,
        },
        # 0.1 rather than Qwen's 0.02: at hidden size 64 the smaller scale leaves attention nearly uniform and the
        # random model learns far more slowly.
        initializer_range=0.1,
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )


def build_processor(tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLProcessor:
    # 28 = patch 14 x merge 2: images are resized to multiples of it, between these pixel counts.
    image_processor = Qwen2VLImageProcessor(
        min_pixels=28 * 28, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    video_processor = Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model_dir(output_dir: str | Path, seed: int = 0, hidden_size: int = 64, num_layers: int = 2) -> Path:
    """Write a tiny random ``Qwen2_5_VLForConditionalGeneration`` and its processor to ``output_dir``."""
    output_dir = Path(output_dir)
    tokenizer = build_tokenizer()
    config = build_tiny_config(tokenizer, hidden_size=hidden_size, num_layers=num_layers)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(output_dir)
    build_processor(tokenizer).save_pretrained(output_dir)
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=".cache/tiny-qwen2.5-vl")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"tiny Qwen2.5-VL written to {build_tiny_model_dir(args.output_dir, seed=args.seed)}")


if __name__ == "__main__":
    main()
