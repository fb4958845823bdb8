"""The packed layout: one padding-free row per micro-batch, each prompt once, each branch attending to its prompt.

A micro-batch becomes ONE sequence ``[1, T]``, laid out node by node::

    [prompt_0][branch][branch]..[prompt_1][branch]..

A prompt node is a distinct prompt (same messages and same images = same node). Each pair's chosen and rejected
branches hang under its prompt; an irrelevant branch (pair i's chosen under another prompt) hangs under that
prompt's node when it is in the batch, else under a node of its own. Each distinct image goes through the vision
encoder once per micro-batch, even when several nodes show it (``irrelevant_mode: image``).

Attention (registered with transformers' ``AttentionInterface``, used by the language model only): prompt tokens
attend causally within their prompt; branch tokens attend to their whole prompt and causally to their own branch.
Positions: the prompt's 3D mRoPE positions from ``get_rope_index``; branch token t sits at (max prompt position + 1
+ t) on all three axes. Each branch therefore sees exactly what its row of the padded layout sees, so rewards and
gradients match the padded layout to float32 round-off (``tests/test_packing.py``).

Rewards come back in the padded layout's order (chosen B, rejected B, irrelevant B x K pair-major) through
``reward_index``, and the collator adds the same ``num_pairs``, ``num_irrelevant`` and ``margin`` fields.

Use::

    enable_packed_attention(model)              # once after loading: sdpa/eager -> packed SDPA, FA2 -> varlen
    collator = PackedPreferenceCollator(encoder)  # or make_collator(encoder, packing=True)
    rewards = model(**{k: v for k, v in collator(rows).items() if k not in PAIR_FIELDS}).rewards

The padded layout keeps working on an enabled model: without ``packed_layout`` the attention functions are the
standard sdpa / eager / flash ones.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, flash_attention_mask, sdpa_mask
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward

from vlrm.batching import PreferenceEncoder, add_pair_fields

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
    node_prompts, node_branches, reward_position = nodes.prompts, nodes.branches, num_rewards
    input_ids: list[int] = []
    segments, prompt_spans, node_images, branch_spans = [], [], [], []
    reward_index = [0] * reward_position
    unique_images: dict[tuple, int] = {}
    pixel_rows, grids, image_order = [], [], []
    for (prompt, images, image_keys), branches in zip(node_prompts, node_branches, strict=True):
        encoded = encoder.encode_prompt(prompt, images)
        if encoded.pixel_values is not None:
            rows = torch.split(encoded.pixel_values, encoded.image_grid_thw.prod(-1).tolist())
            for key, image_rows, grid in zip(image_keys, rows, encoded.image_grid_thw, strict=True):
                if key not in unique_images:
                    unique_images[key] = len(grids)
                    pixel_rows.append(image_rows)
                    grids.append(grid)
                image_order.append(unique_images[key])
        node_images.append((len(image_order) - len(images), len(image_order)))
        prompt_start = len(input_ids)
        input_ids += encoded.input_ids
        prompt_end = len(input_ids)
        prompt_spans.append((prompt_start, prompt_end))
        segments.append((prompt_start, prompt_end, prompt_start, prompt_start))
        spans = []
        for position, response in sorted(branches, key=lambda branch: branch[0]):
            start = len(input_ids)
            input_ids += response
            spans.append((start, len(input_ids)))
            segments.append((start, len(input_ids), prompt_start, prompt_end))
            reward_index[position] = len(input_ids) - 1
        branch_spans.append(spans)

    # flash-attn varlen: queries are the row itself, segment by segment; keys are each segment's prefix + itself.
    kv_index = torch.cat([torch.cat([torch.arange(ps, pe), torch.arange(s, e)]) for s, e, ps, pe in segments])
    query_lengths = torch.tensor([e - s for s, e, _, _ in segments])
    key_lengths = torch.tensor([e - s + pe - ps for s, e, ps, pe in segments])
    ids = torch.tensor([input_ids])
    layout = PackedLayout(
        num_tokens=len(input_ids),
        segments=segments,
        prompt_spans=prompt_spans,
        node_images=node_images,
        branch_spans=branch_spans,
        image_order=torch.tensor(image_order, dtype=torch.long),
        cu_seqlens_q=torch.nn.functional.pad(query_lengths.cumsum(0), (1, 0)).to(torch.int32),
        cu_seqlens_k=torch.nn.functional.pad(key_lengths.cumsum(0), (1, 0)).to(torch.int32),
        kv_index=kv_index,
        max_seqlen_q=int(query_lengths.max()),
        max_seqlen_k=int(key_lengths.max()),
        deduplicated_images=len(grids) < len(image_order),
        **_attention_groups(segments),
    )
    batch = {
        "input_ids": ids,
        "mm_token_type_ids": (ids == encoder.image_token_id).long(),
        "reward_index": torch.tensor(reward_index, dtype=torch.long),
        "packed_layout": layout,
    }
    if grids:
        batch["pixel_values"] = torch.cat(pixel_rows)
        batch["image_grid_thw"] = torch.stack(grids)
    return batch


class PackedPreferenceCollator:
    """Collates canonical rows into the packed layout plus ``num_pairs``, ``num_irrelevant`` and ``margin``."""

    def __init__(self, encoder: PreferenceEncoder):
        self.encoder = encoder

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        return add_pair_fields(pack_branches(self.encoder, examples), examples)


# ----------------------------------------------------------------------------------------------------------------------
# Model inputs: image embeddings placed once per occurrence, mRoPE positions per node


def packed_position_ids(
    backbone: Any,
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    layout: PackedLayout,
) -> torch.Tensor:
    """``[3, 1, T]`` mRoPE positions: each prompt as ``get_rope_index`` places it alone, each branch right after."""
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


def packed_backbone_inputs(
    backbone: Any,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    mm_token_type_ids: torch.Tensor | None,
    layout: PackedLayout,
) -> dict[str, Any]:
    """Keyword arguments for ``Qwen2_5_VLModel.forward`` on a packed row.

    The vision tower runs here, once per distinct image and with its usual attention (it never sees the layout);
    its features are placed at every occurrence, as the model's own forward places them."""
    text_config = backbone.config.text_config
    if text_config._attn_implementation not in PACKED_IMPLEMENTATIONS.values():
        raise ValueError(
            f"the packed layout needs the packed attention, but the language model uses "
            f"{text_config._attn_implementation!r}: call vlrm.packing.enable_packed_attention(model) after loading"
        )
    if input_ids.shape[0] != 1 or input_ids.shape[1] != layout.num_tokens:
        raise ValueError(f"a packed row has shape [1, {layout.num_tokens}], got input_ids {list(input_ids.shape)}")
    layout = layout.to(input_ids.device)  # a copy: the mask cache starts empty every forward
    if mm_token_type_ids is None:
        mm_token_type_ids = (input_ids == backbone.config.image_token_id).long()
    inputs_embeds = backbone.get_input_embeddings()(input_ids)
    if pixel_values is not None:
        features = backbone.get_image_features(pixel_values, image_grid_thw, return_dict=True).pooler_output
        if layout.deduplicated_images:
            features = [features[index] for index in layout.image_order.tolist()]
        image_embeds = torch.cat(features).to(inputs_embeds.device, inputs_embeds.dtype)
        image_mask = (input_ids == backbone.config.image_token_id)[..., None]
        if image_mask.sum() * inputs_embeds.shape[-1] != image_embeds.numel():
            raise ValueError(f"{int(image_mask.sum())} image tokens but {image_embeds.shape[0]} image features")
        inputs_embeds = inputs_embeds.masked_scatter(image_mask, image_embeds)
    position_ids = packed_position_ids(backbone, input_ids, mm_token_type_ids, image_grid_thw, layout)
    return {
        "input_ids": None,
        "inputs_embeds": inputs_embeds,
        "position_ids": position_ids,
        # A dict of per-layer-type masks is taken as already prepared: no [T, T] mask is ever built.
        "attention_mask": {layer_type: None for layer_type in set(text_config.layer_types)},
        "packed_layout": layout,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Attention functions (transformers' AttentionInterface): packed when given a layout, standard otherwise


def _bottom_right_causal_mask(query_length: int, prefix_length: int, device: torch.device) -> torch.Tensor:
    """Query t sees the whole prefix and its own tokens up to t: True = attend."""
    keys = torch.arange(prefix_length + query_length, device=device)
    return keys[None, :] <= torch.arange(query_length, device=device)[:, None] + prefix_length


def _branch_mask(layout: PackedLayout, query_length: int, prefix_length: int, query: torch.Tensor) -> torch.Tensor:
    """The bottom-right causal mask as an additive float mask (what SDPA turns a bool mask into), built once per
    forward and shape."""
    key = (query_length, prefix_length, query.dtype, query.device)
    if key not in layout.attention_masks:
        allowed = _bottom_right_causal_mask(query_length, prefix_length, query.device)
        mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        layout.attention_masks[key] = mask.masked_fill_(~allowed, torch.finfo(query.dtype).min)
    return layout.attention_masks[key]


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: PackedLayout,
    dropout: float = 0.0,
    scaling: float | None = None,
) -> torch.Tensor:
    """Attention over the packed row with ``torch.nn.functional.scaled_dot_product_attention``, one call per group
    of same-shape segments: prompts with ``is_causal``, branches against [prompt keys + own keys] with a bottom-right
    causal mask of [branch, prompt + branch] (never a [T, T] mask).

    Queries and keys are gathered once for all groups (one ``index_select`` each, whose backward is one scatter) and
    cut into groups by views: slicing each segment out separately would cost a full-size zero-filled gradient per
    slice in the backward pass. ``query``/``key``/``value``: ``[1, heads, T, head_dim]``; returns
    ``[1, T, heads, head_dim]``."""
    if layout.group_query_index is not None:
        query = query.index_select(2, layout.group_query_index)
    keys = key.index_select(2, layout.group_kv_index)
    values = value.index_select(2, layout.group_kv_index)
    num_groups = getattr(module, "num_key_value_groups", 1)
    query_sizes = [count * query_length for count, query_length, _ in layout.groups]
    key_sizes = [count * (query_length + prefix_length) for count, query_length, prefix_length in layout.groups]
    outputs = []
    for (count, query_length, prefix_length), group_query, group_key, group_value in zip(
        layout.groups, query.split(query_sizes, 2), keys.split(key_sizes, 2), values.split(key_sizes, 2), strict=True
    ):
        # [1, heads, count * length, dim] -> [count, heads, length, dim], as views
        group_query = group_query.unflatten(2, (count, query_length))[0].transpose(0, 1)
        group_key, group_value = (
            repeat_kv(tensor.unflatten(2, (count, -1))[0].transpose(0, 1), num_groups)
            for tensor in (group_key, group_value)
        )
        mask = _branch_mask(layout, query_length, prefix_length, group_query) if prefix_length else None
        output = torch.nn.functional.scaled_dot_product_attention(
            group_query,
            group_key,
            group_value,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=mask is None,
            scale=scaling,
        )
        outputs.append(output.transpose(1, 2).flatten(0, 1))  # [count * length, heads, dim]
    output = torch.cat(outputs)
    if layout.group_row_index is not None:
        output = output.index_select(0, layout.group_row_index)
    return output[None]


def packed_varlen(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: PackedLayout,
    dropout: float = 0.0,
    scaling: float | None = None,
) -> torch.Tensor:
    """The same attention with flash-attn's varlen kernel: one call; queries are the row, keys/values each segment's
    [prefix + own] rows gathered by ``kv_index``; ``causal=True`` aligns bottom-right (flash-attn >= 2.1)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as error:
        raise ImportError(
            "packed attention with attn_implementation='flash_attention_2' needs flash-attn (pip install flash-attn); "
            "load the model with attn_implementation='sdpa' to use the packed SDPA attention instead"
        ) from error
    from transformers.integrations.flash_attention import get_target_dtype

    queries = query[0].transpose(0, 1)  # [T, heads, head_dim]
    keys = key[0].transpose(0, 1).index_select(0, layout.kv_index)
    values = value[0].transpose(0, 1).index_select(0, layout.kv_index)
    target_dtype = get_target_dtype(query, module)
    if target_dtype is not None:  # float32 activations (e.g. norms upcast): flash-attn runs in half precision
        queries, keys, values = (tensor.to(target_dtype) for tensor in (queries, keys, values))
    output = flash_attn_varlen_func(
        queries,
        keys,
        values,
        cu_seqlens_q=layout.cu_seqlens_q,
        cu_seqlens_k=layout.cu_seqlens_k,
        max_seqlen_q=layout.max_seqlen_q,
        max_seqlen_k=layout.max_seqlen_k,
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=True,
    )
    return output.to(query.dtype)[None]


def _packed_or(standard: Callable) -> Callable:
    """An attention function that runs ``packed_sdpa`` when the call carries a packed layout, else ``standard``
    (transformers' own SDPA or eager attention, for padded batches)."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        layout = kwargs.pop("packed_layout", None)
        if layout is None:
            return standard(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        return packed_sdpa(module, query, key, value, layout, dropout, scaling), None

    return attention


packed_sdpa_attention = _packed_or(sdpa_attention_forward)
packed_eager_attention = _packed_or(eager_attention_forward)


def packed_flash_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    layout = kwargs.pop("packed_layout", None)
    if layout is not None:
        return packed_varlen(module, query, key, value, layout, dropout, scaling), None
    # Standard flash_attention_2, as transformers' flash_attention_forward runs it; that function reads the kernel
    # name from module.config, which here names this function, so the kernel is named explicitly.
    from transformers.integrations.flash_attention import _use_top_left_mask, get_target_dtype
    from transformers.modeling_flash_attention_utils import _flash_attention_forward

    is_causal = kwargs.pop("is_causal", None)
    query, key, value = (tensor.transpose(1, 2) for tensor in (query, key, value))
    output = _flash_attention_forward(
        query,
        key,
        value,
        attention_mask,
        query_length=query.shape[1],
        is_causal=module.is_causal if is_causal is None else is_causal,
        dropout=dropout,
        softmax_scale=scaling,
        use_top_left_mask=_use_top_left_mask,
        target_dtype=get_target_dtype(query, module),
        attn_implementation="flash_attention_2",
        layer_idx=getattr(module, "layer_idx", None),
        **kwargs,
    )
    return output, None


# Standard implementation -> the packed one that stands in for it. The names must not contain "flash": transformers
# treats such names as flash kernels to load.
PACKED_IMPLEMENTATIONS = {
    "sdpa": "vlrm_packed_sdpa",
    "eager": "vlrm_packed_eager",
    "flash_attention_2": "vlrm_packed_varlen",
}
AttentionInterface.register("vlrm_packed_sdpa", packed_sdpa_attention)
AttentionInterface.register("vlrm_packed_eager", packed_eager_attention)
AttentionInterface.register("vlrm_packed_varlen", packed_flash_attention)
# Without a layout the padded layout's masks are built exactly as for the standard implementation.
AttentionMaskInterface.register("vlrm_packed_sdpa", sdpa_mask)
AttentionMaskInterface.register("vlrm_packed_eager", eager_mask)
AttentionMaskInterface.register("vlrm_packed_varlen", flash_attention_mask)


def enable_packed_attention(model: Any) -> None:
    """Switch the language model's attention to the packed function standing in for its current one (sdpa/eager ->
    packed SDPA, flash_attention_2 -> flash-attn varlen). The vision tower keeps its attention. Idempotent; the
    choice is not saved with the checkpoint. Call after loading and before DeepSpeed/accelerate wrap the model."""
    text_config = model.config.text_config
    current = text_config._attn_implementation
    if current in PACKED_IMPLEMENTATIONS.values():
        return
    if current not in PACKED_IMPLEMENTATIONS:
        raise ValueError(
            f"the packed layout supports attn_implementation {sorted(PACKED_IMPLEMENTATIONS)}, not {current!r}; "
            "load the model with one of them or use the padded layout"
        )
    if "sliding_attention" in text_config.layer_types:
        raise ValueError("the packed layout does not support sliding-window attention (use_sliding_window=True)")
    if current == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ImportError(
            "the packed layout with flash_attention_2 needs flash-attn installed (pip install flash-attn)"
        )
    model.set_attn_implementation({"text_config": PACKED_IMPLEMENTATIONS[current]})


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
