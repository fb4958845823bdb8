"""Turning canonical rows into model inputs.

Every pair is one prompt (images + question) with response branches: chosen, rejected and, with the irrelevant-query
augmentation, the pair's chosen response under other prompts. Rewards come back in one flat tensor ordered as

    [chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}, irrelevant_{0,0} .. irrelevant_{B-1,K-1}]

whatever the layout; ``split_rewards`` undoes it.

The padded layout (this module) makes one right-padded row per (prompt, branch): the baseline, and the fallback for
any model.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from vlrm.data import to_rgb


def open_image_header(image: Any) -> Image.Image:
    """A lazily opened PIL image from a decoded image, a path, raw bytes or an undecoded ``{"bytes", "path"}``
    dict."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict):
        image = io.BytesIO(image["bytes"]) if image.get("bytes") is not None else image["path"]
    elif isinstance(image, (bytes, bytearray)):
        image = io.BytesIO(image)
    return Image.open(image)


def open_image(image: Any) -> Image.Image:
    """The decoded RGB image the processor receives (``vlrm.data.to_rgb``: alpha on white, 16-bit scaled)."""
    return to_rgb(open_image_header(image))


@dataclass
class EncodedPrompt:
    input_ids: list[int]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None


class PreferenceEncoder:
    """Renders prompts with the chat template and runs the processor; tokenizes responses separately.

    A prompt ends with the assistant header (``add_generation_prompt``); a response is its text plus the turn's end
    token (``<|im_end|>`` for Qwen), the token whose hidden state the reward is read from.
    """

    def __init__(self, processor: Any):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        vocab = self.tokenizer.get_vocab()
        self.end_of_turn = "<|im_end|>" if "<|im_end|>" in vocab else self.tokenizer.eos_token
        self.image_token_id = processor.image_token_id
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.convert_tokens_to_ids(self.end_of_turn)

    def prompt_text(self, prompt: list[dict]) -> str:
        return self.processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

    def encode_prompt(self, prompt: list[dict], images: list) -> EncodedPrompt:
        text = self.prompt_text(prompt)
        if not images:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return EncodedPrompt(ids, None, None)
        encoded = self.processor(text=[text], images=[open_image(image) for image in images], return_tensors="pt")
        return EncodedPrompt(encoded["input_ids"][0].tolist(), encoded["pixel_values"], encoded["image_grid_thw"])

    def encode_response(self, text: str) -> list[int]:
        return self.tokenizer(text + self.end_of_turn, add_special_tokens=False)["input_ids"]

    def visual_tokens(self, image: Any) -> int:
        """Visual tokens an image (or a (width, height) size) becomes, from its size alone (no pixels are
        processed)."""
        width, height = image if isinstance(image, tuple) else open_image_header(image).size
        image_processor = self.processor.image_processor
        patches = image_processor.get_number_of_image_patches(height, width, {})
        return patches // image_processor.merge_size**2

    def sequence_lengths(self, row: dict, image_sizes: list[tuple[int, int]] | None = None) -> tuple[int, int, int]:
        """(prompt, chosen, rejected) lengths in tokens, visual tokens included; the images' sizes (width, height)
        are read from their headers unless given."""
        texts = [self.prompt_text(row["prompt"]), row["chosen"] + self.end_of_turn, row["rejected"] + self.end_of_turn]
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # one call into the Rust tokenizer: this runs once per row of every data set
            prompt, chosen, rejected = (len(encoding.ids) for encoding in backend.encode_batch(texts, False))
        else:
            prompt, chosen, rejected = map(len, self.tokenizer(texts, add_special_tokens=False)["input_ids"])
        return prompt + self._visual_extra(image_sizes or row["images"]), chosen, rejected

    def prompt_length(self, prompt: list[dict], images: list) -> int:
        """Tokens of a rendered prompt, visual tokens included (images, or their (width, height) sizes)."""
        text_ids = self.tokenizer(self.prompt_text(prompt), add_special_tokens=False)["input_ids"]
        return len(text_ids) + self._visual_extra(images)

    def _visual_extra(self, images: list) -> int:
        # The rendered prompt holds one image token per image; the processor expands it to the image's tokens.
        return sum(self.visual_tokens(image) - 1 for image in images)


def branch_sequences(encoder: PreferenceEncoder, examples: list[dict]) -> list[tuple[EncodedPrompt, list[int]]]:
    """(prompt, response ids) per branch, in reward order: chosen, rejected, then irrelevant (pair-major)."""
    prompts = [encoder.encode_prompt(example["prompt"], example["images"]) for example in examples]
    chosen = [encoder.encode_response(example["chosen"]) for example in examples]
    sequences = [(prompts[i], chosen[i]) for i in range(len(examples))]
    sequences += [(prompts[i], encoder.encode_response(example["rejected"])) for i, example in enumerate(examples)]
    for i, example in enumerate(examples):
        for other in example.get("irrelevant", None) or []:
            sequences.append((encoder.encode_prompt(other["prompt"], other["images"]), chosen[i]))
    return sequences


def pad_branches(
    sequences: list[tuple[EncodedPrompt, list[int]]], pad_token_id: int, image_token_id: int
) -> dict[str, torch.Tensor]:
    """One right-padded row per branch. Images are repeated for every row of their prompt, as a pairwise
    collator does."""
    rows = [prompt.input_ids + response for prompt, response in sequences]
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = torch.tensor(row)
        attention_mask[index, : len(row)] = 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": (input_ids == image_token_id).long() * attention_mask,
    }
    with_images = [prompt for prompt, _ in sequences if prompt.pixel_values is not None]
    if with_images:
        batch["pixel_values"] = torch.cat([prompt.pixel_values for prompt in with_images])
        batch["image_grid_thw"] = torch.cat([prompt.image_grid_thw for prompt in with_images])
    return batch


class PaddedPreferenceCollator:
    """Collates canonical rows into the padded layout plus ``num_pairs``, ``num_irrelevant`` and ``margin``."""

    def __init__(self, encoder: PreferenceEncoder):
        self.encoder = encoder

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        batch = pad_branches(
            branch_sequences(self.encoder, examples), self.encoder.pad_token_id, self.encoder.image_token_id
        )
        return add_pair_fields(batch, examples)


def add_pair_fields(batch: dict[str, Any], examples: list[dict]) -> dict[str, Any]:
    num_irrelevant = {len(example.get("irrelevant") or []) for example in examples}
    if len(num_irrelevant) > 1:
        raise ValueError(f"every pair in a batch needs the same number of irrelevant prompts, got {num_irrelevant}")
    batch["num_pairs"] = len(examples)
    batch["num_irrelevant"] = num_irrelevant.pop()
    margins = [example.get("margin") for example in examples]
    if any(margin is not None for margin in margins):
        batch["margin"] = torch.tensor([margin or 0.0 for margin in margins], dtype=torch.float32)
    return batch


def split_rewards(
    rewards: torch.Tensor, num_pairs: int, num_irrelevant: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen [B], rejected [B], irrelevant [B, K]) from the flat reward tensor."""
    chosen, rejected = rewards[:num_pairs], rewards[num_pairs : 2 * num_pairs]
    irrelevant = rewards[2 * num_pairs :].reshape(num_pairs, num_irrelevant)
    return chosen, rejected, irrelevant


def make_collator(encoder: PreferenceEncoder, packing: bool = False):
    """The collator for a layout. Both return the same fields and the same reward order."""
    if packing:
        from vlrm.packing import PackedPreferenceCollator  # packing imports this module

        return PackedPreferenceCollator(encoder)
    return PaddedPreferenceCollator(encoder)
