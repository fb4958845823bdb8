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


_SENTINEL = "vlrm-response-sentinel"


def chat_end_of_turn(processor: Any) -> str:
    """The token that closes an assistant turn in the processor's chat template (``<|im_end|>``, ``<end_of_turn>``,
    ``</s>``...): the first special token the template writes after an assistant message; the tokenizer's eos token
    when it writes none."""
    tokenizer = processor.tokenizer
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Q"}]},
        {"role": "assistant", "content": [{"type": "text", "text": _SENTINEL}]},
    ]
    try:
        rendered = processor.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that cannot render this conversation: fall back to eos
        return tokenizer.eos_token
    after = rendered.rsplit(_SENTINEL, 1)[-1].lstrip(" ")
    special = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()), key=len, reverse=True)
    return next((token for token in special if token and after.startswith(token)), tokenizer.eos_token)


@dataclass
class EncodedPrompt:
    input_ids: list[int]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None


class PreferenceEncoder:
    """Renders prompts with the chat template and runs the processor; tokenizes responses separately.

    A prompt ends with the assistant header (``add_generation_prompt``); a response is its text plus the turn's end
    token (``<|im_end|>`` for Qwen, ``<end_of_turn>`` for Gemma: ``chat_end_of_turn``), the token whose hidden state
    the reward is read from.

    Two encodings: Qwen-style processors (an image processor with ``merge_size``, patch rows plus ``image_grid_thw``;
    ``grid_images``) have the packed layout and count visual tokens from an image's size alone. Any other
    image-text-to-text processor goes through ``pad_with_processor``: the padded layout, the processor's own image
    tensors (``token_type_ids``, ``image_sizes``, ...) passed to the model as they come.
    """

    def __init__(self, processor: Any):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.grid_images = getattr(getattr(processor, "image_processor", None), "merge_size", None) is not None
        self.end_of_turn = chat_end_of_turn(processor)
        self.image_token_id = getattr(processor, "image_token_id", None) if self.grid_images else None
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.convert_tokens_to_ids(self.end_of_turn)
        self._image_expansion: dict[tuple[int, int], int] = {}

    def prompt_text(self, prompt: list[dict]) -> str:
        return self.processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

    def encode_prompt(self, prompt: list[dict], images: list) -> EncodedPrompt:
        text = self.prompt_text(prompt)
        if not images:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return EncodedPrompt(ids, None, None)
        if not self.grid_images:
            raise ValueError(
                f"{type(self.processor).__name__} has no Qwen-style image grid: its prompts go through "
                "pad_with_processor (the padded layout)"
            )
        encoded = self.processor(
            text=[text], images=[open_image(image) for image in images], return_tensors="pt", add_special_tokens=False
        )
        return EncodedPrompt(encoded["input_ids"][0].tolist(), encoded["pixel_values"], encoded.get("image_grid_thw"))

    def encode_response(self, text: str) -> list[int]:
        return self.tokenizer(text + self.end_of_turn, add_special_tokens=False)["input_ids"]

    def visual_tokens(self, image: Any) -> int:
        """Visual tokens an image (or a (width, height) size) becomes, from its size alone (no pixels are
        processed); Qwen-style processors only."""
        width, height = image if isinstance(image, tuple) else open_image_header(image).size
        image_processor = self.processor.image_processor
        patches = image_processor.get_number_of_image_patches(height, width, {})
        return patches // image_processor.merge_size**2

    def sequence_lengths(self, row: dict, image_sizes: list[tuple[int, int]] | None = None) -> tuple[int, int, int]:
        """(prompt, chosen, rejected) lengths in tokens, visual tokens included; the images' sizes (width, height)
        are read from their headers unless given."""
        texts = [self.prompt_text(row["prompt"]), row["chosen"] + self.end_of_turn, row["rejected"] + self.end_of_turn]
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        # One call into the Rust tokenizer (this runs once per row of every data set), unless a padded call left its
        # padding or truncation switched on (the generic path's processor call does).
        if backend is not None and backend.padding is None and backend.truncation is None:
            prompt, chosen, rejected = (len(encoding.ids) for encoding in backend.encode_batch(texts, False))
        else:
            prompt, chosen, rejected = map(len, self.tokenizer(texts, add_special_tokens=False)["input_ids"])
        return prompt + self._visual_extra(image_sizes or row["images"]), chosen, rejected

    def prompt_length(self, prompt: list[dict], images: list) -> int:
        """Tokens of a rendered prompt, visual tokens included (images, or their (width, height) sizes)."""
        text_ids = self.tokenizer(self.prompt_text(prompt), add_special_tokens=False)["input_ids"]
        return len(text_ids) + self._visual_extra(images)

    def _visual_extra(self, images: list) -> int:
        # The rendered prompt holds one placeholder per image; the processor expands it to the image's tokens.
        if self.grid_images:
            return sum(self.visual_tokens(image) - 1 for image in images)
        sizes = [image if isinstance(image, tuple) else open_image_header(image).size for image in images]
        return sum(self.image_expansion(size) for size in sizes)

    def image_expansion(self, size: tuple[int, int]) -> int:
        """Tokens an image of this (width, height) adds to a rendered prompt in a generic processor: measured once
        per size on a blank image (an image's tokens depend on its size, never on its pixels)."""
        if size not in self._image_expansion:
            text = self.prompt_text([{"role": "user", "content": [{"type": "image"}]}])
            blank = Image.new("RGB", size)
            expanded = self.processor(text=[text], images=[[blank]], add_special_tokens=False)["input_ids"][0]
            self._image_expansion[size] = len(expanded) - len(
                self.tokenizer(text, add_special_tokens=False)["input_ids"]
            )
        return self._image_expansion[size]


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


def branch_rows(encoder: PreferenceEncoder, examples: list[dict]) -> list[tuple[list[dict], list, list[int]]]:
    """(prompt messages, images, response ids) per branch, in reward order, for ``pad_with_processor``."""
    chosen = [encoder.encode_response(example["chosen"]) for example in examples]
    rows = [(example["prompt"], example["images"], chosen[i]) for i, example in enumerate(examples)]
    rows += [
        (example["prompt"], example["images"], encoder.encode_response(example["rejected"])) for example in examples
    ]
    for i, example in enumerate(examples):
        rows += [(other["prompt"], other["images"], chosen[i]) for other in example.get("irrelevant", None) or []]
    return rows


def pad_with_processor(encoder: PreferenceEncoder, rows: list[tuple[list[dict], list, list[int]]]) -> dict[str, Any]:
    """The padded layout through the processor itself, for any image-text-to-text family: the rendered prompts and
    their images in one processor call (which lays out its own image tensors), then each row's response ids appended
    and the rows right padded. Token-aligned outputs (``token_type_ids``, ``mm_token_type_ids``) are extended with 0
    over the response, as the processor gives text tokens."""
    texts = [encoder.prompt_text(prompt) for prompt, _, _ in rows]
    images = [[open_image(image) for image in row_images] for _, row_images, _ in rows]
    arguments = {"text": texts, "padding": True, "return_tensors": "pt", "add_special_tokens": False}
    if any(images):
        arguments["images"] = images
    processed = dict(encoder.processor(**arguments))
    prompt_ids, prompt_mask = processed.pop("input_ids"), processed.pop("attention_mask").bool()
    token_keys = [
        key for key, value in processed.items() if torch.is_tensor(value) and value.shape == prompt_ids.shape
    ]
    sequences = [prompt_ids[i][prompt_mask[i]].tolist() + response for i, (_, _, response) in enumerate(rows)]
    length = max(len(sequence) for sequence in sequences)
    batch = {"input_ids": torch.full((len(rows), length), encoder.pad_token_id, dtype=torch.long)}
    batch["attention_mask"] = torch.zeros((len(rows), length), dtype=torch.long)
    for key in token_keys:
        batch[key] = torch.zeros((len(rows), length), dtype=processed[key].dtype)
    for i, sequence in enumerate(sequences):
        batch["input_ids"][i, : len(sequence)] = torch.tensor(sequence)
        batch["attention_mask"][i, : len(sequence)] = 1
        for key in token_keys:
            prompt_values = processed[key][i][prompt_mask[i]]
            batch[key][i, : len(prompt_values)] = prompt_values
    batch.update({key: value for key, value in processed.items() if key not in token_keys})
    return batch


def pad_rows(encoder: PreferenceEncoder, rows: list[tuple[list[dict], list, list[int]]]) -> dict[str, Any]:
    """The padded layout of ``(prompt messages, images, response ids)`` rows, through the encoding the processor
    has: Qwen-style patch grids (``pad_branches``) or the processor itself (``pad_with_processor``)."""
    if not encoder.grid_images:
        return pad_with_processor(encoder, rows)
    encoded = [(encoder.encode_prompt(prompt, images), response) for prompt, images, response in rows]
    return pad_branches(encoded, encoder.pad_token_id, encoder.image_token_id)


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
        if self.encoder.grid_images:
            batch = pad_branches(
                branch_sequences(self.encoder, examples), self.encoder.pad_token_id, self.encoder.image_token_id
            )
        else:
            batch = pad_with_processor(self.encoder, branch_rows(self.encoder, examples))
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
