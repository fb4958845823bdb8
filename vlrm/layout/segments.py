"""``PackedLayout``: where the prompts and branches of one packed row sit, and what the attention kernels read.

Built by ``vlrm.layout.packed`` from the row it lays out (``build_layout``), read by the attention kernels
(``vlrm.layout.attention``), the packed linear-attention layers (``vlrm.layout.recurrent``) and the model inputs
(``vlrm.layout.packed_inputs``). A segment is ``(start, end, prefix_start, prefix_end)``: its own tokens, and the
tokens it attends to before them (a branch's prompt; nothing for a prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

_LAYOUT_TENSORS = ("image_order", "video_order", "cu_seqlens_q", "cu_seqlens_k", "kv_index", "bucket_query_index",
                   "bucket_kv_index", "bucket_row_index")  # fmt: skip

# The packed SDPA attention makes at most this many calls per layer, however many segment shapes the row holds: each
# call is a synchronisation point (on a busy CPU a thread that is descheduled stalls the others at every one), so a
# row of 8 completions of 8 lengths must not cost 9 calls. Within a bucket, segments are padded to its longest query
# and key; the fewest buckets are used whose padded attention work is within PADDING_SLACK of the unpadded work.
MAX_ATTENTION_BUCKETS = 4
PADDING_SLACK = 0.25


@dataclass(frozen=True)
class AttentionBucket:
    """Segments computed in one SDPA call: ``count`` of them, queries padded to ``query_length`` and keys
    ([prefix + own tokens]) to ``key_length``; ``prefix_lengths``, one per segment, place each one's causal edge
    (query t attends keys up to prefix + t, so padded keys are never seen by a real query)."""

    count: int
    query_length: int
    key_length: int
    prefix_lengths: tuple[int, ...]


@dataclass
class PackedLayout:
    """Where everything sits in the packed row. Passed to ``VLRewardModel.forward`` as ``packed_layout``.

    ``segments``: one ``(start, end, prefix_start, prefix_end)`` per prompt and per branch, in row order; a branch's
    prefix is its prompt, a prompt has none (``prefix_start == prefix_end``). ``prompt_spans``, ``node_images``,
    ``branch_spans``: per prompt node, its prompt, the range of its images in occurrence order, its branches.
    ``image_order``: image occurrence -> row of ``image_grid_thw`` (images are deduplicated); ``node_videos`` and
    ``video_order`` the same for videos (``video_grid_thw``, ``second_per_grid_ts``).

    For flash-attn's varlen kernel: ``cu_seqlens_*``, ``max_seqlen_*`` and ``kv_index`` (each segment's key rows).
    For the SDPA version: segments are laid out in at most ``MAX_ATTENTION_BUCKETS`` buckets, one SDPA call each
    (``buckets``); ``bucket_query_index`` / ``bucket_kv_index`` gather queries / keys bucket by bucket, padded slots
    repeating a real token of their segment, and ``bucket_row_index`` takes the outputs back to row order (``None``
    where the gather is the identity).
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
    buckets: list[AttentionBucket]
    bucket_kv_index: torch.Tensor  # [sum of count * key_length] long
    bucket_query_index: torch.Tensor | None = None  # [sum of count * query_length] long
    bucket_row_index: torch.Tensor | None = None  # [num_tokens] long
    deduplicated_images: bool = False
    node_videos: list[tuple[int, int]] = field(default_factory=list)
    video_order: torch.Tensor | None = None  # [num video occurrences] long
    deduplicated_videos: bool = False
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


def _bucket_runs(shapes: list[tuple[int, int, int]], max_buckets: int, slack: float) -> list[tuple[int, int]]:
    """Split ``shapes`` (query length, key length, segments of that shape), sorted by query then key length, into at
    most ``max_buckets`` contiguous runs ``(first, last + 1)``: the fewest whose padded work (segments x longest query
    x longest key, summed over runs) is within ``slack`` of the unpadded work, each count of runs at its least work
    (dynamic programming over the cut points; ``shapes`` are the row's distinct shapes, tens at most)."""
    num_shapes, infinity = len(shapes), float("inf")
    unpadded = sum(queries * keys * count for queries, keys, count in shapes)
    # least[runs][end]: least padded work of shapes[:end] in `runs` runs; cut[runs][end]: where the last run starts
    least = [[0.0] + [infinity] * num_shapes] + [[infinity] * (num_shapes + 1) for _ in range(max_buckets)]
    cut = [[0] * (num_shapes + 1) for _ in range(max_buckets + 1)]
    for runs in range(1, max_buckets + 1):
        for end in range(1, num_shapes + 1):
            count = longest_key = 0
            for start in range(end - 1, -1, -1):  # the last run is shapes[start:end]; its longest query: end - 1
                count += shapes[start][2]
                longest_key = max(longest_key, shapes[start][1])
                work = least[runs - 1][start] + count * shapes[end - 1][0] * longest_key
                if work < least[runs][end]:
                    least[runs][end], cut[runs][end] = work, start
        if least[runs][num_shapes] <= (1 + slack) * unpadded:
            break
    bounds, end = [], num_shapes
    for level in range(runs, 0, -1):
        bounds.append((cut[level][end], end))
        end = cut[level][end]
    return bounds[::-1]


def _attention_buckets(segments: list[tuple[int, int, int, int]]) -> dict[str, Any]:
    """Segments in at most ``MAX_ATTENTION_BUCKETS`` buckets (``_bucket_runs``), and the gathers that lay them out
    bucket by bucket: each segment's queries, then padding; its prefix and own keys, then padding. A padded slot
    repeats the segment's first token: its output is dropped and no real query attends to it, so it adds exact zeros
    to every gradient."""
    by_shape: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    for start, end, prefix_start, prefix_end in segments:
        shape = (end - start, end - start + prefix_end - prefix_start)  # (queries, keys)
        by_shape.setdefault(shape, []).append((start, end, prefix_start, prefix_end))
    shapes = sorted(by_shape)
    runs = _bucket_runs([(*shape, len(by_shape[shape])) for shape in shapes], MAX_ATTENTION_BUCKETS, PADDING_SLACK)
    buckets, query_slots, key_slots, slot = [], [], [], 0
    row_index = torch.empty(max(end for _, end, _, _ in segments), dtype=torch.long)  # token -> its query slot
    for first, last in runs:
        members = [segment for shape in shapes[first:last] for segment in by_shape[shape]]
        query_length, key_length = shapes[last - 1][0], max(keys for _, keys in shapes[first:last])
        prefix_lengths = tuple(prefix_end - prefix_start for _, _, prefix_start, prefix_end in members)
        buckets.append(AttentionBucket(len(members), query_length, key_length, prefix_lengths))
        for start, end, prefix_start, prefix_end in members:
            row_index[start:end] = torch.arange(slot, slot + end - start)
            slot += query_length
            query_padding = torch.full((query_length - (end - start),), start, dtype=torch.long)
            key_padding = torch.full(
                (key_length - (end - start) - (prefix_end - prefix_start),), start, dtype=torch.long
            )
            query_slots += [torch.arange(start, end), query_padding]
            key_slots += [torch.arange(prefix_start, prefix_end), torch.arange(start, end), key_padding]
    query_index = torch.cat(query_slots)
    identity = len(query_index) == len(row_index) and bool((query_index == torch.arange(len(query_index))).all())
    return {
        "buckets": buckets,
        "bucket_kv_index": torch.cat(key_slots),
        "bucket_query_index": None if identity else query_index,
        "bucket_row_index": None if identity else row_index,
    }


def build_layout(row: dict[str, Any]) -> PackedLayout:
    """The layout of a row laid out by ``vlrm.layout.packed``: its token ids, segments, spans and image order."""
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
        node_videos=row.get("node_videos") or [(0, 0)] * len(row["prompt_spans"]),
        video_order=torch.tensor(row.get("video_order") or [], dtype=torch.long),
        deduplicated_videos=len(row.get("video_grids") or []) < len(row.get("video_order") or []),
        **_attention_buckets(segments),
    )
