"""The padded layout: one right-padded row per (prompt, branch), and the reward order both layouts share.

Every row is one prompt (images + question) with response branches: its responses (a pair's chosen and rejected, a
ranking's N) and, with the irrelevant-query augmentation, its best response under other prompts. Rewards come back
in one flat tensor in the order ``vlrm.layout.labels`` documents, whatever the layout; for a micro-batch of pairs

    [chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}, irrelevant_{0,0} .. irrelevant_{B-1,K-1}]

which ``split_rewards`` undoes.

The padded layout is the baseline, and the fallback for any model: every family has it. The packed layout is in
``vlrm.layout.packed``.
"""

from __future__ import annotations

from typing import Any

import torch

from vlrm.data.rankings import responses_of
from vlrm.layout.encoder import EncodedPrompt, PreferenceEncoder, open_image
from vlrm.layout.labels import add_label_fields, response_tokens, reward_positions


def reward_branches(encoder: PreferenceEncoder, examples: list[dict]) -> list[tuple[dict, list[int]]]:
    """(prompt source, response ids) per reward position (``vlrm.layout.labels``): every response of every row,
    response-major, then the irrelevant branches pair-major (the row's best response under another prompt). The prompt
    source is the row itself or an irrelevant prompt: anything with ``prompt`` and ``images``."""
    responses = [[encoder.encode_response(text) for text in responses_of(example)] for example in examples]
    positions = reward_positions([len(row) for row in responses])
    ordered: list[tuple[dict, list[int]] | None] = [None] * sum(map(len, responses))
    for example, row, where in zip(examples, responses, positions, strict=True):
        for position, ids in zip(where, row, strict=True):
            ordered[position] = (example, ids)
    for example, row in zip(examples, responses, strict=True):
        best = row[responses_of(example).index(example["chosen"])]
        ordered += [(other, best) for other in example.get("irrelevant", None) or []]
    return ordered


def branch_sequences(encoder: PreferenceEncoder, examples: list[dict]) -> list[tuple[EncodedPrompt, list[int]]]:
    """(prompt, response ids) per branch, in reward order (``reward_branches``); each prompt encoded once."""
    encoded: dict[int, EncodedPrompt] = {}

    def prompt_of(source: dict) -> EncodedPrompt:
        if id(source) not in encoded:
            encoded[id(source)] = encoder.encode_prompt(source["prompt"], source["images"], source.get("videos"))
        return encoded[id(source)]

    return [(prompt_of(source), ids) for source, ids in reward_branches(encoder, examples)]


def branch_rows(encoder: PreferenceEncoder, examples: list[dict]) -> list[tuple]:
    """(prompt messages, images, response ids, videos) per branch, in reward order, for ``pad_with_processor``."""
    return [
        (source["prompt"], source["images"], ids, source.get("videos"))
        for source, ids in reward_branches(encoder, examples)
    ]


def pad_with_processor(encoder: PreferenceEncoder, rows: list[tuple]) -> dict[str, Any]:
    """The padded layout through the processor itself, for any image-text-to-text family: the rendered prompts and
    their images in one processor call (which lays out its own image tensors), then each row's response ids appended
    and the rows right padded. Token-aligned outputs (``token_type_ids``, ``mm_token_type_ids``) are extended with 0
    over the response, as the processor gives text tokens."""
    if any(len(row) > 3 and row[3] for row in rows):
        raise ValueError(
            f"videos need a Qwen-style processor (patch grids and video_grid_thw); {type(encoder.processor).__name__} "
            "goes through the generic padded path, which takes images only"
        )
    texts = [encoder.prompt_text(row[0]) for row in rows]
    images = [[open_image(image) for image in row[1]] for row in rows]
    arguments = {"text": texts, "padding": True, "return_tensors": "pt", "add_special_tokens": False}
    if any(images):
        arguments["images"] = images
    processed = dict(encoder.processor(**arguments))
    prompt_ids, prompt_mask = processed.pop("input_ids"), processed.pop("attention_mask").bool()
    token_keys = [
        key for key, value in processed.items() if torch.is_tensor(value) and value.shape == prompt_ids.shape
    ]
    sequences = [prompt_ids[i][prompt_mask[i]].tolist() + row[2] for i, row in enumerate(rows)]
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
    prompt_lengths = prompt_mask.sum(-1).tolist()
    spans = [
        (i, i * length + start, i * length + len(sequence))
        for i, (start, sequence) in enumerate(zip(prompt_lengths, sequences, strict=True))
    ]
    return batch | response_tokens(spans)


def pad_rows(encoder: PreferenceEncoder, rows: list[tuple]) -> dict[str, Any]:
    """The padded layout of ``(prompt messages, images, response ids[, videos])`` rows, through the encoding the
    processor has: Qwen-style patch grids (``pad_branches``) or the processor itself (``pad_with_processor``)."""
    if not encoder.grid_images:
        return pad_with_processor(encoder, rows)
    encoded = [
        (encoder.encode_prompt(prompt, images, videos[0] if videos else None), response)
        for prompt, images, response, *videos in rows
    ]
    return pad_branches(encoded, encoder.pad_token_id, encoder.image_token_id, encoder.video_token_id)


def pad_read_points(encoder: PreferenceEncoder, rows: list[tuple]) -> dict[str, Any]:
    """The padded layout of branches read at several points: rows of ``(prompt messages, images, ids, videos, ends,
    positions)``, one padded row each; reward ``positions[k]`` is read at offset ``ends[k]`` of the row's ids (a
    process reward's steps, ``vlrm.layout.steps``; a joint chain's responses, ``vlrm.layout.joint``). Returns the
    batch with ``reward_index`` (flat indices into ``[rows, length]``, in reward order) and each read point's own
    tokens for pooling (``response_index`` / ``response_owner``)."""
    batch = pad_rows(encoder, [(prompt, images, ids, videos) for prompt, images, ids, videos, _, _ in rows])
    # Where each row's branch starts in the flat [rows x length] tokens: its first response token, as the padded
    # layout lists them (either encoding: Qwen-style grids or the processor's own).
    starts = torch.full((len(rows),), torch.iinfo(torch.long).max, dtype=torch.long)
    starts = starts.scatter_reduce(0, batch["response_owner"], batch["response_index"], reduce="amin")
    total = sum(len(row[5]) for row in rows)
    reward_index = torch.empty(total, dtype=torch.long)
    index, owner = [], []
    for start, (*_, ends, positions) in zip(starts.tolist(), rows, strict=True):
        read_start = start
        for end, position in zip(ends, positions, strict=True):
            reward_index[position] = start + end
            index.append(torch.arange(read_start, start + end + 1))
            owner.append(torch.full((start + end + 1 - read_start,), position, dtype=torch.long))
            read_start = start + end + 1
    batch["reward_index"] = reward_index
    batch["response_index"], batch["response_owner"] = torch.cat(index), torch.cat(owner)
    return batch


def pad_branches(
    sequences: list[tuple[EncodedPrompt, list[int]]], pad_token_id: int, image_token_id: int,
    video_token_id: int | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """One right-padded row per branch. Images and videos are repeated for every row of their prompt, as a pairwise
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
        "mm_token_type_ids": _token_types(input_ids, image_token_id, video_token_id) * attention_mask,
        **response_tokens(
            [
                (i, i * length + len(prompt.input_ids), i * length + len(row))
                for i, ((prompt, _), row) in enumerate(zip(sequences, rows, strict=True))
            ]
        ),
    }
    with_images = [prompt for prompt, _ in sequences if prompt.pixel_values is not None]
    if with_images:
        batch["pixel_values"] = torch.cat([prompt.pixel_values for prompt in with_images])
        batch["image_grid_thw"] = torch.cat([prompt.image_grid_thw for prompt in with_images])
    with_videos = [prompt for prompt, _ in sequences if prompt.pixel_values_videos is not None]
    if with_videos:
        batch["pixel_values_videos"] = torch.cat([prompt.pixel_values_videos for prompt in with_videos])
        batch["video_grid_thw"] = torch.cat([prompt.video_grid_thw for prompt in with_videos])
        if with_videos[0].second_per_grid_ts is not None:
            batch["second_per_grid_ts"] = torch.cat([prompt.second_per_grid_ts for prompt in with_videos])
    return batch


def _token_types(input_ids: torch.Tensor, image_token_id: int, video_token_id: int | None) -> torch.Tensor:
    """1 on image tokens, 2 on video tokens (``get_rope_index``'s modality groups), 0 elsewhere."""
    types = (input_ids == image_token_id).long()
    return types if video_token_id is None else types + 2 * (input_ids == video_token_id).long()


class PaddedPreferenceCollator:
    """Collates canonical rows into the padded layout plus the label fields (``vlrm.layout.labels``)."""

    def __init__(self, encoder: PreferenceEncoder):
        self.encoder = encoder

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        if self.encoder.grid_images:
            encoder = self.encoder
            batch = pad_branches(
                branch_sequences(encoder, examples),
                encoder.pad_token_id,
                encoder.image_token_id,
                encoder.video_token_id,
            )
        else:
            batch = pad_with_processor(self.encoder, branch_rows(self.encoder, examples))
        return add_label_fields(batch, examples)


def split_rewards(
    rewards: torch.Tensor, num_pairs: int, num_irrelevant: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen [B], rejected [B], irrelevant [B, K]) from the flat reward tensor of a micro-batch of pairs."""
    chosen, rejected = rewards[:num_pairs], rewards[num_pairs : 2 * num_pairs]
    irrelevant = rewards[2 * num_pairs :].reshape(num_pairs, num_irrelevant)
    return chosen, rejected, irrelevant
