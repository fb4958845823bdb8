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
        **_attention_groups(segments),
    )
