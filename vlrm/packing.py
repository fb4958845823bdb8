"""The packed layout: one padding-free row per micro-batch, each prompt once, each branch attending to its prompt.

A micro-batch becomes ONE sequence ``[1, T]``, laid out node by node::

    [prompt_0][branch][branch]..[prompt_1][branch]..

A prompt node is a distinct prompt (same messages and same images = same node). Each pair's chosen and rejected
branches hang under its prompt; an irrelevant branch (pair i's chosen under another prompt) hangs under that
prompt's node when it is in the batch, else under a node of its own. Each distinct image goes through the vision
encoder once per micro-batch, even when several nodes show it (``irrelevant_mode: image``).

Attention (``vlrm.attention``, used by the language model only): prompt tokens attend causally within their prompt;
branch tokens attend to their whole prompt and causally to their own branch. Positions: the prompt's 3D positions
from the backbone's ``get_rope_index``; branch token t sits at (max prompt position + 1 + t) on all three axes. Image
features (with Qwen3-VL's DeepStack features) go to the backbone in occurrence order, so it places them on the row's
image tokens. Each branch therefore sees exactly what its row of the padded layout sees, so rewards and gradients
match the padded layout to float32 round-off (``tests/test_packing.py``, ``tests/test_families.py``). Which families
have this layout: ``vlrm.families`` (``packed``).

Rewards come back in the padded layout's order (chosen B, rejected B, irrelevant B x K pair-major) through
``reward_index``, and the collator adds the same ``num_pairs``, ``num_irrelevant`` and ``margin`` fields.

Use::

    enable_packed_attention(model)              # once after loading: sdpa/eager -> packed SDPA, FA2 -> varlen
    collator = PackedPreferenceCollator(encoder)  # or make_collator(encoder, packing=True)
    rewards = model(**{k: v for k, v in collator(rows).items() if k not in PAIR_FIELDS}).rewards

The padded layout keeps working on an enabled model: without ``packed_layout`` the attention functions are the
standard sdpa / eager / flash ones.

This module also holds ``make_collator`` (either layout) and the pair sizes used for length-aware batching.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image

from vlrm.attention import enable_packed_attention, uses_packed_attention
from vlrm.batching import PaddedPreferenceCollator, PreferenceEncoder, add_pair_fields

__all__ = [
    "PackedLayout", "PackedPreferenceCollator", "enable_packed_attention", "make_collator", "pack_branches",
    "pack_responses", "packed_backbone_inputs", "pair_tokens", "packed_tokens", "prompt_key", "image_key",
]  # fmt: skip

# ----------------------------------------------------------------------------------------------------------------------
# Layout


_LAYOUT_TENSORS = ("image_order", "cu_seqlens_q", "cu_seqlens_k", "kv_index", "group_query_index", "group_kv_index",
                   "group_row_index")  # fmt: skip


@dataclass
class PackedLayout:
    """Where everything sits in the packed row. Passed to ``VLRewardModel.forward`` as ``packed_layout``.

    ``segments``: one ``(start, end, prefix_start, prefix_end)`` per prompt and per branch, in row order; a branch's
    prefix is its prompt, a prompt has none (``prefix_start == prefix_end``). ``prompt_spans``, ``node_images``,
    ``branch_spans``: per prompt node, its prompt, the range of its images in occurrence order, its branches.
    ``image_order``: image occurrence -> row of ``image_grid_thw`` (images are deduplicated).

    For flash-attn's varlen kernel: ``cu_seqlens_*``, ``max_seqlen_*`` and ``kv_index`` (each segment's key rows).
    For the SDPA version: segments of one shape (query length, prefix length) form a group, computed in one call;
    ``group_query_index`` / ``group_kv_index`` gather queries / keys group by group, ``group_row_index`` puts the
    outputs back in row order (``None`` where the gather is the identity).
    """

    num_tokens: int
    segments: list[tuple[int, int, int, int]]
    prompt_spans: list[tuple[int, int]]
    node_images: list[tuple[int, int]]
    branch_spans: list[list[tuple[int, int]]]
    image_order: torch.Tensor  # [num image occurrences] long
    cu_seqlens_q: torch.Tensor  # [num segments + 1] int32
    cu_seqlens_k: torch.Tensor  # [num segments + 1] int32
    kv_index: torch.Tensor  # [cu_seqlens_k[-1]] long
    max_seqlen_q: int
    max_seqlen_k: int
    groups: list[tuple[int, int, int]]  # (segments, query length, prefix length)
    group_kv_index: torch.Tensor
    group_query_index: torch.Tensor | None = None
    group_row_index: torch.Tensor | None = None
    deduplicated_images: bool = False
    # Masks built during one forward (and its gradient-checkpointing recompute): every .to() starts an empty cache,
    # and the model calls .to() at the start of each forward, so nothing survives from one call to the next.
    attention_masks: dict = field(default_factory=dict, compare=False, repr=False)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedLayout:
        """Tensors on ``device`` (accelerate's ``send_to_device`` and the model call this)."""
        return self._map(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedLayout:
        return self._map(lambda tensor: tensor.pin_memory())

    def _map(self, function) -> PackedLayout:
        tensors = {name: getattr(self, name) for name in _LAYOUT_TENSORS}
        moved = {name: function(tensor) for name, tensor in tensors.items() if tensor is not None}
        return replace(self, **moved, attention_masks={})


def _attention_groups(segments: list[tuple[int, int, int, int]]) -> dict[str, Any]:
    """Segments grouped by shape, in order of first appearance, and the gathers that lay them out group by group."""
    groups: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    for start, end, prefix_start, prefix_end in segments:
        groups.setdefault((end - start, prefix_end - prefix_start), []).append((start, end, prefix_start, prefix_end))
    query_index = torch.cat([torch.arange(s, e) for members in groups.values() for s, e, _, _ in members])
    kv_index = torch.cat(
        [
            torch.cat([torch.arange(ps, pe), torch.arange(s, e)])
            for members in groups.values()
            for s, e, ps, pe in members
        ]
    )
    identity = bool((query_index == torch.arange(len(query_index))).all())
    return {
        "groups": [
            (len(members), query_length, prefix_length) for (query_length, prefix_length), members in groups.items()
        ],
        "group_kv_index": kv_index,
        "group_query_index": None if identity else query_index,
        "group_row_index": None if identity else torch.argsort(query_index),
    }


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


def prompt_key(prompt: list[dict], images: list) -> tuple:
    return json.dumps(prompt, sort_keys=True, default=str), tuple(image_key(image) for image in images)


class _Nodes:
    """Prompt nodes and the branches under them: (reward position, response ids) per node."""

    def __init__(self):
        self.index: dict[tuple, int] = {}
        self.prompts: list[tuple[list[dict], list, tuple]] = []
        self.branches: list[list[tuple[int, list[int]]]] = []

    def add(self, prompt: list[dict], images: list, position: int, response: list[int]) -> None:
        key = prompt_key(prompt, images)
        if key not in self.index:
            self.index[key] = len(self.prompts)
            self.prompts.append((prompt, images, key[1]))
            self.branches.append([])
        self.branches[self.index[key]].append((position, response))


def pack_branches(encoder: PreferenceEncoder, examples: list[dict]) -> dict[str, Any]:
    """The packed row of a micro-batch of pairs: input ids, deduplicated images, ``reward_index`` and the layout."""
    num_pairs = len(examples)
    chosen = [encoder.encode_response(example["chosen"]) for example in examples]
    nodes = _Nodes()
    for index, example in enumerate(examples):
        nodes.add(example["prompt"], example["images"], index, chosen[index])
        nodes.add(
            example["prompt"], example["images"], num_pairs + index, encoder.encode_response(example["rejected"])
        )
    reward_position = 2 * num_pairs
    for index, example in enumerate(examples):
        for other in example.get("irrelevant", None) or []:
            nodes.add(other["prompt"], other["images"], reward_position, chosen[index])
            reward_position += 1
    return _pack_nodes(encoder, nodes, reward_position)


def pack_responses(encoder: PreferenceEncoder, rows: list[tuple[list[dict], list, list[int]]]) -> dict[str, Any]:
    """The packed row of single responses ``(prompt messages, images, response ids)``, reward i for row i. Rows with
    the same prompt and images (a GRPO group: several completions of one prompt) share one prompt node, so the prompt
    and its images are computed once for the group."""
    nodes = _Nodes()
    for position, (prompt, images, response) in enumerate(rows):
        nodes.add(prompt, images, position, response)
    return _pack_nodes(encoder, nodes, len(rows))


def _pack_nodes(encoder: PreferenceEncoder, nodes: _Nodes, num_rewards: int) -> dict[str, Any]:
    """The packed row of prompt nodes and their branches, with ``reward_index`` (reward position -> token)."""
    row = _lay_out(encoder, nodes, num_rewards)
    ids = torch.tensor([row["input_ids"]])
    batch = {
        "input_ids": ids,
        "mm_token_type_ids": (ids == encoder.image_token_id).long(),
        "reward_index": torch.tensor(row["reward_index"], dtype=torch.long),
        "packed_layout": _layout(row),
    }
    if row["grids"]:
        batch["pixel_values"] = torch.cat(row["pixel_rows"])
        batch["image_grid_thw"] = torch.stack(row["grids"])
    return batch


def _lay_out(encoder: PreferenceEncoder, nodes: _Nodes, num_rewards: int) -> dict[str, Any]:
    """Token ids, segments and spans node by node; each distinct image's pixel rows once (``image_order``: image
    occurrence -> distinct image)."""
    row = {name: [] for name in ("input_ids", "segments", "prompt_spans", "node_images", "branch_spans")}
    row.update(reward_index=[0] * num_rewards, pixel_rows=[], grids=[], image_order=[])
    unique_images: dict[tuple, int] = {}
    input_ids, segments = row["input_ids"], row["segments"]
    for (prompt, images, image_keys), branches in zip(nodes.prompts, nodes.branches, strict=True):
        encoded = encoder.encode_prompt(prompt, images)
        if encoded.pixel_values is not None:
            pixel_rows = torch.split(encoded.pixel_values, encoded.image_grid_thw.prod(-1).tolist())
            for key, image_rows, grid in zip(image_keys, pixel_rows, encoded.image_grid_thw, strict=True):
                if key not in unique_images:
                    unique_images[key] = len(row["grids"])
                    row["pixel_rows"].append(image_rows)
                    row["grids"].append(grid)
                row["image_order"].append(unique_images[key])
        row["node_images"].append((len(row["image_order"]) - len(images), len(row["image_order"])))
        prompt_start = len(input_ids)
        input_ids += encoded.input_ids
        prompt_end = len(input_ids)
        row["prompt_spans"].append((prompt_start, prompt_end))
        segments.append((prompt_start, prompt_end, prompt_start, prompt_start))
        spans = []
        for position, response in sorted(branches, key=lambda branch: branch[0]):
            start = len(input_ids)
            input_ids += response
            spans.append((start, len(input_ids)))
            segments.append((start, len(input_ids), prompt_start, prompt_end))
            row["reward_index"][position] = len(input_ids) - 1
        row["branch_spans"].append(spans)
    return row


def _layout(row: dict[str, Any]) -> PackedLayout:
    segments = row["segments"]
    # flash-attn varlen: queries are the row itself, segment by segment; keys are each segment's prefix + itself.
    kv_index = torch.cat([torch.cat([torch.arange(ps, pe), torch.arange(s, e)]) for s, e, ps, pe in segments])
    query_lengths = torch.tensor([e - s for s, e, _, _ in segments])
    key_lengths = torch.tensor([e - s + pe - ps for s, e, ps, pe in segments])
    return PackedLayout(
        num_tokens=len(row["input_ids"]),
        segments=segments,
        prompt_spans=row["prompt_spans"],
        node_images=row["node_images"],
        branch_spans=row["branch_spans"],
        image_order=torch.tensor(row["image_order"], dtype=torch.long),
        cu_seqlens_q=torch.nn.functional.pad(query_lengths.cumsum(0), (1, 0)).to(torch.int32),
        cu_seqlens_k=torch.nn.functional.pad(key_lengths.cumsum(0), (1, 0)).to(torch.int32),
        kv_index=kv_index,
        max_seqlen_q=int(query_lengths.max()),
        max_seqlen_k=int(key_lengths.max()),
        deduplicated_images=len(row["grids"]) < len(row["image_order"]),
        **_attention_groups(segments),
    )


class PackedPreferenceCollator:
    """Collates canonical rows into the packed layout plus ``num_pairs``, ``num_irrelevant`` and ``margin``."""

    def __init__(self, encoder: PreferenceEncoder):
        self.encoder = encoder

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        return add_pair_fields(pack_branches(self.encoder, examples), examples)


# ----------------------------------------------------------------------------------------------------------------------
# Model inputs: image features placed once per occurrence, 3D positions per node

# A prepared 4D mask as far as transformers' mask creation goes (it returns such a mask as is), so no [T, T] mask is
# ever built for a packed row; the packed attention reads the layout instead and never looks at it.
PACKED_ROW_MASK = torch.ones(1, 1, 0, 0, dtype=torch.bool)


def packed_position_ids(
    backbone: Any,
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    layout: PackedLayout,
) -> torch.Tensor:
    """``[3, 1, T]`` positions (mRoPE and interleaved mRoPE alike): each prompt as the backbone's ``get_rope_index``
    places it alone, each branch right after its prompt's largest position."""
    device = input_ids.device
    grids = image_grid_thw[layout.image_order] if image_grid_thw is not None else None
    pieces = []
    for (start, end), (first_image, last_image), spans in zip(
        layout.prompt_spans, layout.node_images, layout.branch_spans, strict=True
    ):
        if last_image > first_image:
            positions, _ = backbone.get_rope_index(
                input_ids[:, start:end],
                mm_token_type_ids=mm_token_type_ids[:, start:end],
                image_grid_thw=grids[first_image:last_image],
            )
            positions = positions[:, 0]
            next_position = positions.max() + 1
        else:  # text only: what get_rope_index gives too
            positions = torch.arange(end - start, device=device).expand(3, -1)
            next_position = end - start
        pieces.append(positions)
        pieces += [next_position + torch.arange(e - s, device=device).expand(3, -1) for s, e in spans]
    return torch.cat(pieces, dim=1)[:, None]


def image_features_by_occurrence(backbone: Any, pixel_values, image_grid_thw, layout: PackedLayout) -> Any:
    """The vision tower's output for the distinct images, reordered to one entry per image occurrence in the row:
    ``pooler_output`` (and Qwen3-VL's DeepStack ``deepstack_features``, one tuple per vision layer) as the backbone's
    ``mm_encoder_outputs`` takes them, so it places every feature on its image tokens itself."""
    features = backbone.get_image_features(pixel_values, image_grid_thw, return_dict=True)
    if layout.deduplicated_images:
        order = layout.image_order.tolist()
        features.pooler_output = tuple(features.pooler_output[index] for index in order)
        if getattr(features, "deepstack_features", None) is not None:
            features.deepstack_features = [
                tuple(layer[index] for index in order) for layer in features.deepstack_features
            ]
    return features


def packed_backbone_inputs(
    model: Any,
    input_ids: torch.Tensor,
    layout: PackedLayout,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Keyword arguments for the backbone's forward (``Qwen2VLModel``, ``Qwen2_5_VLModel``, ``Qwen3VLModel``,
    ``Qwen3VLMoeModel``) on a packed row of ``model``, a ``VLRewardModel`` of a family with the packed layout.

    The vision tower runs here, once per distinct image and with its usual attention (it never sees the layout)."""
    if not uses_packed_attention(model):
        raise ValueError(
            f"the packed layout needs the packed attention, but the language model uses "
            f"{model.config.get_text_config()._attn_implementation!r}: call vlrm.packing.enable_packed_attention(model) "
            "after loading"
        )
    if input_ids.shape[0] != 1 or input_ids.shape[1] != layout.num_tokens:
        raise ValueError(f"a packed row has shape [1, {layout.num_tokens}], got input_ids {list(input_ids.shape)}")
    backbone = model.model
    layout = layout.to(input_ids.device)  # a copy: the mask cache starts empty every forward
    if mm_token_type_ids is None:
        mm_token_type_ids = (input_ids == model.config.image_token_id).long()
    inputs = {
        "input_ids": input_ids,
        "position_ids": packed_position_ids(backbone, input_ids, mm_token_type_ids, image_grid_thw, layout),
        "attention_mask": PACKED_ROW_MASK.to(input_ids.device),
        "packed_layout": layout,
    }
    if pixel_values is not None:
        inputs["mm_encoder_outputs"] = {
            "image": image_features_by_occurrence(backbone, pixel_values, image_grid_thw, layout)
        }
    return inputs


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


def pair_tokens(length: tuple[int, int, int], num_irrelevant: int = 0, packing: bool = True) -> int:
    """Tokens one pair adds to a micro-batch: packed, its prompt once plus its branches; padded, one row per branch,
    each as long as the prompt plus the longer response. The size transformers' length-aware samplers
    (``train_sampling_strategy: group_by_length | batch_rebalance``) read from the dataset's length column;
    ``length`` is one entry of ``vlrm.prepare.pair_lengths``."""
    if packing:
        return packed_tokens([length], num_irrelevant)
    prompt_length, chosen_length, rejected_length = length
    return (2 + num_irrelevant) * (prompt_length + max(chosen_length, rejected_length))
