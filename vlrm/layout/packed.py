"""The packed layout: one padding-free row per micro-batch, each prompt once, each branch attending to its prompt.

A micro-batch becomes ONE sequence ``[1, T]``, laid out node by node::

    [prompt_0][branch][branch]..[prompt_1][branch]..

A prompt node is a distinct prompt (same messages and same images = same node). Each row's responses (a pair's chosen
and rejected, a ranking's N) hang under its prompt; an irrelevant branch (row i's best response under another
prompt) hangs under that prompt's node when it is in the batch, else under a node of its own. Each distinct image goes through the vision
encoder once per micro-batch, even when several nodes show it (``irrelevant_mode: image``).

Attention (``vlrm.layout.attention``, used by the language model only): prompt tokens attend causally within their prompt;
branch tokens attend to their whole prompt and causally to their own branch. Positions: the prompt's 3D positions
from the backbone's ``get_rope_index``; branch token t sits at (max prompt position + 1 + t) on all three axes. Image
features (with Qwen3-VL's DeepStack features) go to the backbone in occurrence order, so it places them on the row's
image tokens. Each branch therefore sees exactly what its row of the padded layout sees, so rewards and gradients
match the padded layout to float32 round-off (``tests/test_packing.py``, ``tests/test_families.py``). Which families
have this layout: ``vlrm.model.families`` (``packed``).

Rewards come back in the padded layout's order (``vlrm.layout.labels``: for pairs chosen B, rejected B, irrelevant
B x K pair-major) through ``reward_index``, and the collator adds the same label fields.

Use::

    enable_packed_attention(model)              # once after loading: sdpa/eager -> packed SDPA, FA2 -> varlen
    collator = PackedPreferenceCollator(encoder)  # or make_collator(encoder, packing=True)
    rewards = model(**{k: v for k, v in collator(rows).items() if k not in LABEL_FIELDS}).rewards

The padded layout keeps working on an enabled model: without ``packed_layout`` the attention functions are the
standard sdpa / eager / flash ones.

This module also holds ``make_collator`` (either layout) and the pair sizes used for length-aware batching.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from vlrm.layout.encoder import PreferenceEncoder
from vlrm.layout.labels import add_label_fields, response_tokens
from vlrm.layout.padded import PaddedPreferenceCollator, reward_branches
from vlrm.layout.segments import build_layout


def image_key(image: Any) -> tuple:
    """What makes two images the same: their pixels (PIL), their bytes, or their path."""
    if isinstance(image, Image.Image):
        return ("pixels", image.mode, image.size, hashlib.sha1(image.tobytes()).hexdigest())
    if isinstance(image, dict):
        if image.get("bytes") is not None:
            return ("bytes", hashlib.sha1(image["bytes"]).hexdigest())
        return ("path", str(image["path"]))
    if isinstance(image, (bytes, bytearray)):
        return ("bytes", hashlib.sha1(image).hexdigest())
    return ("path", str(image))


def video_key(video: Any) -> tuple:
    """What makes two videos the same: a sampled video's ``key`` (source and sampling, ``vlrm.data.videos``), else
    its frames', bytes' or path's key."""
    if isinstance(video, dict) and video.get("key"):
        return ("video", video["key"])
    if isinstance(video, (list, tuple)):
        return ("frames", *(image_key(frame) for frame in video))
    return image_key(video)


def prompt_key(prompt: list[dict], images: list, videos: list | None = None) -> tuple:
    media = tuple(image_key(image) for image in images)
    if videos:
        media += tuple(video_key(video) for video in videos)
    return json.dumps(prompt, sort_keys=True, default=str), media


class Nodes:
    """Prompt nodes and the branches under them: (reward positions, response ids, read points) per node. A plain
    branch has one reward, at its last token; a branch with ``ends`` has one reward per read point: a process
    reward's solution one per step (``vlrm.layout.steps``), a joint chain one per response (``vlrm.layout.joint``),
    at positions ``positions`` (default ``position, position + 1, ...``), read at the offsets ``ends`` into the
    branch. ``chain``: a key of its own for this node (a joint chain never shares its prompt node with another)."""

    def __init__(self):
        self.index: dict[tuple, int] = {}
        self.prompts: list[tuple[list[dict], list, list, tuple]] = []
        self.branches: list[list[tuple[list[int], list[int], list[int]]]] = []

    def add(self, prompt: list[dict], images: list, position: int, response: list[int], videos=None,
            ends: list[int] | None = None, positions: list[int] | None = None, chain: int | None = None) -> None:  # fmt: skip
        videos = list(videos or [])
        key = prompt_key(prompt, images, videos)
        node_key = key if chain is None else (*key, chain)
        if node_key not in self.index:
            self.index[node_key] = len(self.prompts)
            self.prompts.append((prompt, images, videos, key[1]))
            self.branches.append([])
        ends = ends if ends is not None else [len(response) - 1]
        positions = positions if positions is not None else [position + step for step in range(len(ends))]
        self.branches[self.index[node_key]].append((positions, response, ends))


def pack_branches(encoder: PreferenceEncoder, examples: list[dict]) -> dict[str, Any]:
    """The packed row of a micro-batch: input ids, deduplicated images, ``reward_index`` and the layout. Every branch
    (each response of each row, and the irrelevant branches: ``vlrm.layout.padded.reward_branches``) hangs under the
    node of its prompt, so a row's N responses share one prompt node and its images go through the vision tower once."""
    nodes = Nodes()
    ordered = reward_branches(encoder, examples)
    for position, (source, ids) in enumerate(ordered):
        nodes.add(source["prompt"], source["images"], position, ids, source.get("videos"))
    return pack_nodes(encoder, nodes, len(ordered))


def pack_responses(encoder: PreferenceEncoder, rows: list[tuple]) -> dict[str, Any]:
    """The packed row of single responses ``(prompt messages, images, response ids[, videos])``, reward i for row i.
    Rows with the same prompt, images and videos (a GRPO group: several completions of one prompt) share one prompt
    node, so the prompt and its media are computed once for the group."""
    nodes = Nodes()
    for position, (prompt, images, response, *videos) in enumerate(rows):
        nodes.add(prompt, images, position, response, videos[0] if videos else None)
    return pack_nodes(encoder, nodes, len(rows))


def pack_nodes(encoder: PreferenceEncoder, nodes: Nodes, num_rewards: int, joint: bool = False) -> dict[str, Any]:
    """The packed row of prompt nodes and their branches, with ``reward_index`` (reward position -> token).
    ``joint``: each node's one branch is a chain that continues its prompt causally (``vlrm.layout.joint``)."""
    row = _lay_out(encoder, nodes, num_rewards, joint)
    ids = torch.tensor([row["input_ids"]])
    batch = {
        "input_ids": ids,
        "mm_token_type_ids": encoder.mm_token_type_ids(ids),
        "reward_index": torch.tensor(row["reward_index"], dtype=torch.long),
        "packed_layout": build_layout(row),
        **response_tokens(row["response_spans"]),
    }
    if row["grids"]:
        batch["pixel_values"] = torch.cat(row["pixel_rows"])
        batch["image_grid_thw"] = torch.stack(row["grids"])
    if row["video_grids"]:
        batch["pixel_values_videos"] = torch.cat(row["video_rows"])
        batch["video_grid_thw"] = torch.stack(row["video_grids"])
        if row["video_seconds"]:
            batch["second_per_grid_ts"] = torch.stack(row["video_seconds"])
    return batch


def _add_media(row: dict[str, Any], kind: str, keys: tuple, pixel_values, grids, seconds, unique: dict) -> None:
    """Each distinct image (``kind`` "image") or video ("video") of a prompt once: its pixel rows and grid (and a
    video's seconds per temporal patch); its occurrence -> distinct index in ``image_order`` / ``video_order``."""
    names = {"image": ("pixel_rows", "grids", None, "image_order"),
             "video": ("video_rows", "video_grids", "video_seconds", "video_order")}[kind]  # fmt: skip
    pixels, grid_list, seconds_list, order = names
    pieces = torch.split(pixel_values, grids.prod(-1).tolist())
    for index, (key, rows, grid) in enumerate(zip(keys, pieces, grids, strict=True)):
        if key not in unique:
            unique[key] = len(row[grid_list])
            row[pixels].append(rows)
            row[grid_list].append(grid)
            if seconds_list is not None and seconds is not None:
                row[seconds_list].append(seconds[index])
        row[order].append(unique[key])


def _lay_out(encoder: PreferenceEncoder, nodes: Nodes, num_rewards: int, joint: bool = False) -> dict[str, Any]:
    """Token ids, segments and spans node by node; each distinct image's pixel rows once (``image_order``: image
    occurrence -> distinct image)."""
    names = ("input_ids", "segments", "prompt_spans", "node_images", "node_videos", "branch_spans", "pixel_rows",
             "grids", "image_order", "video_rows", "video_grids", "video_seconds", "video_order", "response_spans")  # fmt: skip
    row = {name: [] for name in names}
    row["reward_index"] = [0] * num_rewards
    unique_images: dict[tuple, int] = {}
    unique_videos: dict[tuple, int] = {}
    input_ids, segments = row["input_ids"], row["segments"]
    for (prompt, images, videos, media_keys), branches in zip(nodes.prompts, nodes.branches, strict=True):
        encoded = encoder.encode_prompt(prompt, images, videos)
        if encoded.pixel_values is not None:
            image_keys = media_keys[: len(images)]
            _add_media(row, "image", image_keys, encoded.pixel_values, encoded.image_grid_thw, None, unique_images)
        if encoded.pixel_values_videos is not None:
            keys = media_keys[len(images) :]
            _add_media(row, "video", keys, encoded.pixel_values_videos, encoded.video_grid_thw,
                       encoded.second_per_grid_ts, unique_videos)  # fmt: skip
        row["node_images"].append((len(row["image_order"]) - len(images), len(row["image_order"])))
        row["node_videos"].append((len(row["video_order"]) - len(videos), len(row["video_order"])))
        prompt_start = len(input_ids)
        input_ids += encoded.input_ids
        prompt_end = len(input_ids)
        row["prompt_spans"].append((prompt_start, prompt_end))
        if not joint:
            segments.append((prompt_start, prompt_end, prompt_start, prompt_start))
        elif len(branches) != 1:
            raise ValueError(f"a joint prompt node holds one chain, got {len(branches)}")
        spans = []
        for positions, response, ends in sorted(branches, key=lambda branch: branch[0][0]):
            start = len(input_ids)
            input_ids += response
            spans.append((start, len(input_ids)))
            # A joint chain continues its prompt as one causal segment: response k sees the prompt and responses
            # 1..k-1, exactly as the padded chain (one ordinary causal row) does.
            segments.append((prompt_start if joint else start, len(input_ids), prompt_start,
                             prompt_start if joint else prompt_end))  # fmt: skip
            read_start = start
            for position, end in zip(positions, ends, strict=True):
                row["reward_index"][position] = start + end
                row["response_spans"].append((position, read_start, start + end + 1))
                read_start = start + end + 1
        row["branch_spans"].append(spans)
    return row


class PackedPreferenceCollator:
    """Collates canonical rows into the packed layout plus the label fields (``vlrm.layout.labels``)."""

    def __init__(self, encoder: PreferenceEncoder):
        self.encoder = encoder

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        return add_label_fields(pack_branches(self.encoder, examples), examples)


def make_collator(encoder: PreferenceEncoder, packing: bool = False):
    """The collator for a layout: packed (``PackedPreferenceCollator``) or padded (``PaddedPreferenceCollator``).
    Both return the same fields and the same reward order."""
    return PackedPreferenceCollator(encoder) if packing else PaddedPreferenceCollator(encoder)


# ----------------------------------------------------------------------------------------------------------------------
# Pair sizes: tokens a pair costs in each layout, for length-aware batching


def packed_tokens(
    lengths: Sequence[tuple[int, int, int]], num_irrelevant: int = 0, prompt_keys: Sequence | None = None
) -> int:
    """Tokens of these pairs in one packed row: each distinct prompt once (by ``prompt_keys``, when given), chosen
    and rejected, and ``num_irrelevant`` copies of chosen (irrelevant branches hung under in-batch prompts)."""
    seen, total = set(), 0
    for index, (prompt_length, chosen_length, rejected_length) in enumerate(lengths):
        key = prompt_keys[index] if prompt_keys is not None else index
        if key not in seen:
            seen.add(key)
            total += prompt_length
        total += chosen_length * (1 + num_irrelevant) + rejected_length
    return total


def row_tokens(prompt: int, responses: list[int], best: int, num_irrelevant: int = 0, packing: bool = True) -> int:
    """Tokens one row adds to a micro-batch (``vlrm.data.prepare.branch_lengths`` gives the lengths: the prompt, each
    response, the best one): packed, its prompt once, its responses and ``num_irrelevant`` copies of its best one;
    padded, one row per branch, each as long as the prompt plus the longest response. On a pair, ``pair_tokens``."""
    if packing:
        return prompt + sum(responses) + num_irrelevant * best
    return (len(responses) + num_irrelevant) * (prompt + max(responses))


def pair_tokens(length: tuple[int, int, int], num_irrelevant: int = 0, packing: bool = True) -> int:
    """Tokens one pair adds to a micro-batch: packed, its prompt once plus its branches; padded, one row per branch,
    each as long as the prompt plus the longer response. The size transformers' length-aware samplers
    (``train_sampling_strategy: group_by_length | batch_rebalance``) read from the dataset's length column;
    ``length`` is one entry of ``vlrm.prepare.pair_lengths``."""
    if packing:
        return packed_tokens([length], num_irrelevant)
    prompt_length, chosen_length, rejected_length = length
    return (2 + num_irrelevant) * (prompt_length + max(chosen_length, rejected_length))
