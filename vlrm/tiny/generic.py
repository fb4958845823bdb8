"""Offline tiny LLaVA and Gemma 3 models: random weights, locally trained tokenizers and the families' own processors.

Like ``vlrm.tiny.qwen`` (the tiny Qwen-VL families), each builder writes an ordinary model directory (config.json +
safetensors + tokenizer + processor with a chat template), so ``AutoProcessor.from_pretrained(dir)`` and
``AutoModelForImageTextToText.from_pretrained(dir)`` load it exactly as they load a real checkpoint such as
``llava-hf/llava-1.5-7b-hf`` or ``google/gemma-3-4b-it``. Nothing is downloaded.

Both models have a 2-layer, 64-wide text model and a 2-layer, 32-wide vision tower on 56-pixel images, and each image
becomes 16 image tokens:

* LLaVA: CLIP vision tower (patch 14, so 4 x 4 patches plus CLS; the ``default`` strategy drops CLS), a Llama text
  model, ``LlavaProcessor`` with ``LlavaImageProcessor`` (pad to square, resize, crop). Chat turns are
  ``USER: <image>\\n... ASSISTANT: ...</s>``; the end-of-turn token is ``</s>``, the pad token ``<pad>``.
* Gemma 3: SigLIP vision tower (patch 7, so 8 x 8 patches, average-pooled 2 x 2 to 16 tokens), a Gemma 3 text model,
  ``Gemma3Processor`` (returns ``token_type_ids``). Chat turns are ``<start_of_turn>user\\n...<end_of_turn>\\n``;
  the end-of-turn token is ``<end_of_turn>``, the pad token ``<pad>``.

    python -m vlrm.tiny --family gemma3 --output_dir .cache/tiny-gemma3
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

from vlrm.tiny.qwen import train_bpe

# Shared tiny sizes: a 64-wide, 2-layer text model and a 32-wide, 2-layer vision tower on 56 x 56 images.
TEXT_HIDDEN_SIZE = 64
TEXT_LAYERS = 2
HEAD_DIM = 16
VISION_HIDDEN_SIZE = 32
VISION_LAYERS = 2
IMAGE_SIZE = 56
# 0.1 rather than the usual 0.02, as in vlrm.tiny: at these widths the smaller scale leaves attention nearly
# uniform and the random model learns far more slowly.
INITIALIZER_RANGE = 0.1

# ---------------------------------------------------------------------------------------------------------------------
# LLaVA (1.5 style): Llama's special tokens plus <image>.
LLAVA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
LLAVA_END_OF_TURN = "</s>"
LLAVA_PATCH_SIZE = 14
# CLIP adds a CLS embedding; the "default" feature strategy drops it again, leaving one token per patch.
LLAVA_IMAGE_TOKENS = (IMAGE_SIZE // LLAVA_PATCH_SIZE) ** 2

# LLaVA-1.5's "USER: ... ASSISTANT: ..." turns, written for this project. Images come first in a turn as
# "<image>\n" (the processor expands each to one <image> per image token); every assistant turn ends with </s>, and
# the generation prompt ends with "ASSISTANT: " so that prompt + response + "</s>" is exactly the rendered turn.
LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set prefix = '' %}"
    "{% elif message['role'] == 'assistant' %}{% set prefix = 'ASSISTANT: ' %}"
    "{% else %}{% set prefix = 'USER: ' %}{% endif %}"
    "{{ prefix }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% else %} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)

# ---------------------------------------------------------------------------------------------------------------------
# Gemma 3: Gemma's pad/eos/bos/unk first (ids 0-3, as in the real vocabulary), then the turn and image tokens.
GEMMA3_SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
GEMMA3_END_OF_TURN = "<end_of_turn>"
GEMMA3_PATCH_SIZE = 7
# 8 x 8 SigLIP patches, average-pooled with a 2 x 2 kernel by Gemma 3's projector: 4 x 4 = 16 tokens per image.
GEMMA3_IMAGE_TOKENS = 16

# Gemma 3's turns, written for this project: "assistant" is rendered as "model", a system message is folded into the
# first user turn (Gemma has no system role) and an image part is a <start_of_image> that the processor expands to
# "\n\n<start_of_image>" + <image_soft_token> x 16 + "<end_of_image>\n\n".
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{% set ns.system = message['content'] + '\n\n' %}"
    "{% else %}{% set ns.system = (message['content'] | map(attribute='text') | join('')) + '\n\n' %}{% endif %}"
    "{% else %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ ns.system }}{% set ns.system = '' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_turn>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_llava_tokenizer() -> PreTrainedTokenizerFast:
    """LLaVA's tokenizer: Llama's ``<s>``/``</s>``/``<unk>``, a distinct ``<pad>`` and the ``<image>`` token."""
    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(LLAVA_SPECIAL_TOKENS, ["USER: ASSISTANT: USER: <image>\n ASSISTANT:"]),
        bos_token="<s>",
        eos_token=LLAVA_END_OF_TURN,
        unk_token="<unk>",
        pad_token="<pad>",
        # A named model-specific token: ``tokenizer.image_token`` / ``image_token_id``, read by LlavaProcessor.
        image_token="<image>",
        chat_template=LLAVA_CHAT_TEMPLATE,
        model_max_length=4096,
    )


def build_gemma3_tokenizer() -> PreTrainedTokenizerFast:
    """Gemma 3's tokenizer, with the named ``boi_token``/``eoi_token``/``image_token`` that Gemma3Processor reads.

    ``eos_token`` is ``<end_of_turn>`` (what ends a chat turn, so code that falls back to ``eos_token`` finds it) and
    the pad token is ``<pad>``. No BOS is added on encoding: the chat template writes ``<bos>`` itself.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(GEMMA3_SPECIAL_TOKENS, ["user model <start_of_turn>user\n<end_of_turn>\n"]),
        bos_token="<bos>",
        eos_token=GEMMA3_END_OF_TURN,
        unk_token="<unk>",
        pad_token="<pad>",
        boi_token="<start_of_image>",
        eoi_token="<end_of_image>",
        image_token="<image_soft_token>",
        extra_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        chat_template=GEMMA3_CHAT_TEMPLATE,
        model_max_length=4096,
    )


def _text_sizes() -> dict:
    """The tiny text-model sizes both families share (4 query heads, 2 key/value heads of width 16)."""
    return {
        "hidden_size": TEXT_HIDDEN_SIZE,
        "intermediate_size": TEXT_HIDDEN_SIZE * 2,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": TEXT_HIDDEN_SIZE // HEAD_DIM,
        "num_key_value_heads": TEXT_HIDDEN_SIZE // HEAD_DIM // 2,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": 4096,
        "initializer_range": INITIALIZER_RANGE,
    }


def _vision_sizes(patch_size: int) -> dict:
    """The tiny vision-tower sizes both families share."""
    return {
        "hidden_size": VISION_HIDDEN_SIZE,
        "intermediate_size": VISION_HIDDEN_SIZE * 2,
        "num_hidden_layers": VISION_LAYERS,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": patch_size,
        "initializer_range": INITIALIZER_RANGE,
    }


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict:
    """The text config's bos/eos/pad ids, taken from the tokenizer."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_tiny_llava_config(tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """A tiny LLaVA-1.5: CLIP vision tower, 2-layer GELU projector, Llama text model."""
    return LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "projection_dim": VISION_HIDDEN_SIZE,
            **_vision_sizes(LLAVA_PATCH_SIZE),
        },
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            **_text_sizes(),
            **_special_ids(tokenizer),
        },
        image_token_index=tokenizer.image_token_id,
        image_seq_length=LLAVA_IMAGE_TOKENS,
        vision_feature_select_strategy="default",
        # The last layer rather than LLaVA's -2: with only two vision layers, -2 would leave half the tower unused.
        vision_feature_layer=-1,
    )


def build_tiny_gemma3_config(tokenizer: PreTrainedTokenizerFast) -> Gemma3Config:
    """A tiny Gemma 3: SigLIP vision tower (no pooling head), pooling RMS-norm projector, Gemma 3 text model."""
    text_config = {
        "vocab_size": len(tokenizer),
        # One local (sliding-window) and one global layer, as Gemma 3 interleaves them.
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 512,
        "query_pre_attn_scalar": HEAD_DIM,
        **_text_sizes(),
        **_special_ids(tokenizer),
    }
    vision_config = {"model_type": "siglip_vision_model", "vision_use_head": False, **_vision_sizes(GEMMA3_PATCH_SIZE)}
    return Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=GEMMA3_IMAGE_TOKENS,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
        initializer_range=INITIALIZER_RANGE,
    )


def build_llava_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """LlavaProcessor whose patch size, CLS count and feature strategy match :func:`build_tiny_llava_config`.

    Images are padded to a square (so nothing is cropped away), resized to 56 x 56: 16 ``<image>`` tokens each.
    """
    image_processor = LlavaImageProcessor(
        do_pad=True,
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=LLAVA_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def build_gemma3_processor(tokenizer: PreTrainedTokenizerFast) -> Gemma3Processor:
    """Gemma3Processor with 16 image tokens per 56 x 56 image, matching :func:`build_tiny_gemma3_config`."""
    image_processor = Gemma3ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_pan_and_scan=False,
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=GEMMA3_IMAGE_TOKENS,
    )


def _write_model_dir(
    output_dir: str | Path,
    model_class: type[PreTrainedModel],
    config,
    processor: ProcessorMixin,
    seed: int,
    after_init: Callable[[PreTrainedModel], None] | None = None,
) -> Path:
    """Build ``model_class(config)`` under ``seed``, let ``after_init`` adjust it, save it with ``processor``."""
    output_dir = Path(output_dir)
    torch.manual_seed(seed)
    model = model_class(config)
    if after_init is not None:
        with torch.no_grad():
            after_init(model)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def _randomize_gemma3_projector(model: Gemma3ForConditionalGeneration) -> None:
    """Give Gemma 3's vision->text projection random weights.

    Gemma 3 initializes ``mm_input_projection_weight`` to zeros: every image would embed as a zero vector and no
    gradient would reach the vision tower until the projection had moved. Real checkpoints have it trained.
    """
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=INITIALIZER_RANGE)


def build_tiny_llava_dir(output_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``LlavaForConditionalGeneration`` and its ``LlavaProcessor`` to ``output_dir``."""
    tokenizer = build_llava_tokenizer()
    config = build_tiny_llava_config(tokenizer)
    return _write_model_dir(output_dir, LlavaForConditionalGeneration, config, build_llava_processor(tokenizer), seed)


def build_tiny_gemma3_dir(output_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``Gemma3ForConditionalGeneration`` and its ``Gemma3Processor`` to ``output_dir``."""
    tokenizer = build_gemma3_tokenizer()
    config = build_tiny_gemma3_config(tokenizer)
    processor = build_gemma3_processor(tokenizer)
    return _write_model_dir(
        output_dir, Gemma3ForConditionalGeneration, config, processor, seed, after_init=_randomize_gemma3_projector
    )


# Keyed by the config's model_type.
TINY_GENERIC_BUILDERS: dict[str, Callable[..., Path]] = {
    "llava": build_tiny_llava_dir,
    "gemma3": build_tiny_gemma3_dir,
}
