"""The packed layout's attention: transformers ``AttentionInterface`` functions that read a ``PackedLayout``.

Registered under names that stand in for the standard implementations (``PACKED_IMPLEMENTATIONS``), used by the
language model only (the vision tower keeps its own attention): with a ``packed_layout`` in the call, prompt tokens
attend causally within their prompt and branch tokens to their whole prompt and causally to their own branch
(``packed_sdpa``: one SDPA call per bucket of segments, at most a few per layer; ``packed_varlen``: one flash-attn
varlen call); without one (a padded batch) they are transformers' own sdpa / eager / flash_attention_2. The layout
itself is built in ``vlrm.layout.packed``.

    enable_packed_attention(model)   # once after loading, before DeepSpeed / accelerate wrap the model
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from typing import Any

import torch
import transformers
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, flash_attention_mask, sdpa_mask
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward

from vlrm.layout.recurrent import enable_packed_recurrence
from vlrm.layout.segments import AttentionBucket, PackedLayout


def _bottom_right_causal_mask(query_length: int, prefix_length: int, device: torch.device) -> torch.Tensor:
    """Query t sees the whole prefix and its own tokens up to t: True = attend."""
    keys = torch.arange(prefix_length + query_length, device=device)
    return keys[None, :] <= torch.arange(query_length, device=device)[:, None] + prefix_length


def _bucket_mask(
    layout: PackedLayout, index: int, bucket: AttentionBucket, query: torch.Tensor
) -> torch.Tensor | None:
    """The additive float mask of a bucket (what SDPA turns a bool mask into), built once per forward and shared by
    every layer: query t of a segment attends its keys up to its prefix + t. ``None`` when every segment is a prompt
    (no prefix): then right padding is plain causal attention. One [queries, keys] mask when all prefixes are equal
    (the completions of one prompt), else one per segment, [count, 1, queries, keys]."""
    prefixes = bucket.prefix_lengths
    if not any(prefixes):
        return None
    key = (index, query.dtype, query.device)
    if key not in layout.attention_masks:
        if len(set(prefixes)) == 1:
            allowed = _bottom_right_causal_mask(bucket.query_length, prefixes[0], query.device)
        else:
            offsets = torch.tensor(prefixes, device=query.device)[:, None, None, None]
            queries = torch.arange(bucket.query_length, device=query.device)[:, None]
            allowed = torch.arange(bucket.key_length, device=query.device) <= queries + offsets
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
    """Attention over the packed row with ``torch.nn.functional.scaled_dot_product_attention``, one call per bucket
    of segments (at most ``vlrm.layout.segments.MAX_ATTENTION_BUCKETS``, however many segment shapes the row has):
    each segment's queries against [its prefix keys + its own keys], padded to the bucket's longest, with the
    bucket's causal mask (``_bucket_mask``; never a [T, T] mask).

    Padding changes nothing: a real query never attends a padded key (the mask), and a padded query's output is
    dropped, so its gradient, and what it adds to every key's and value's gradient, are exact zeros. Queries and keys
    are gathered once for all buckets (one ``index_select`` each, whose backward is one scatter) and cut into buckets
    by views: slicing each segment out separately would cost a full-size zero-filled gradient per slice in the
    backward pass. ``query``/``key``/``value``: ``[1, heads, T, head_dim]``; returns ``[1, T, heads, head_dim]``."""
    if layout.bucket_query_index is not None:
        query = query.index_select(2, layout.bucket_query_index)
    num_groups = getattr(module, "num_key_value_groups", 1)
    keys = repeat_kv(key.index_select(2, layout.bucket_kv_index), num_groups)
    values = repeat_kv(value.index_select(2, layout.bucket_kv_index), num_groups)
    query_sizes = [bucket.count * bucket.query_length for bucket in layout.buckets]
    key_sizes = [bucket.count * bucket.key_length for bucket in layout.buckets]
    outputs = []
    for index, (bucket, bucket_query, bucket_key, bucket_value) in enumerate(
        zip(layout.buckets, query.split(query_sizes, 2), keys.split(key_sizes, 2), values.split(key_sizes, 2),
            strict=True)
    ):  # fmt: skip
        # [1, heads, count * length, dim] -> [count, heads, length, dim], as views
        bucket_query, bucket_key, bucket_value = (
            tensor.unflatten(2, (bucket.count, -1))[0].transpose(0, 1)
            for tensor in (bucket_query, bucket_key, bucket_value)
        )
        mask = _bucket_mask(layout, index, bucket, bucket_query)
        output = scaled_dot_product_attention(
            bucket_query,
            bucket_key,
            bucket_value,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=mask is None,
            scale=scaling,
        )
        outputs.append(output.transpose(1, 2).flatten(0, 1))  # [count * length, heads, dim]
    output = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    if layout.bucket_row_index is not None:
        output = output.index_select(0, layout.bucket_row_index)
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


# vlrm's minimum transformers (setup.py): the oldest the test suite passes on. 5.18 is the first whose VLM backbones
# take mm_encoder_outputs (precomputed image and video features), but its Qwen3.5, config and ZeRO paths fail the suite.
MIN_TRANSFORMERS = "5.24"


def enable_packed_attention(model: Any) -> None:
    """Switch the language model's attention to the packed function standing in for its current one (sdpa/eager ->
    packed SDPA, flash_attention_2 -> flash-attn varlen). The vision tower keeps its attention. Idempotent; the choice
    is not saved with the checkpoint. Call after loading and before DeepSpeed/accelerate wrap the model. For a family
    with linear-attention layers (Qwen3.5) it also gives those their packed path (``vlrm.layout.recurrent``). Raises
    ``ValueError`` for a family without the packed layout (``model.family``, a ``vlrm.model.families`` entry:
    ``packed``), or for a transformers whose backbone cannot take the image features the packed row computes."""
    family = model.family
    if not family.packed:
        raise ValueError(f"{family.title} ({model.config.model_type}) has no packed layout: {family.padded_reason}")
    reward_model = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model's own
    backbone = type(reward_model.model)
    if "mm_encoder_outputs" not in inspect.signature(backbone.forward).parameters:
        # An older forward swallows the argument in **kwargs and embeds the image tokens as text: wrong rewards.
        raise ValueError(
            f"the packed layout hands {backbone.__name__} the vision tower's output once per distinct image "
            f"(mm_encoder_outputs), which transformers {transformers.__version__} does not take: pip install "
            f"'transformers>={MIN_TRANSFORMERS}' (vlrm's minimum), or use the padded layout (packing: false)"
        )
    language = model.config.get_text_config()
    current = language._attn_implementation
    if current in PACKED_IMPLEMENTATIONS.values():
        return
    if current not in PACKED_IMPLEMENTATIONS:
        raise ValueError(
            f"the packed layout supports attn_implementation {sorted(PACKED_IMPLEMENTATIONS)}, not {current!r}; "
            "load the model with one of them or use the padded layout"
        )
    if "sliding_attention" in (getattr(language, "layer_types", None) or ()):
        raise ValueError("the packed layout does not support sliding-window attention (use_sliding_window=True)")
    if current == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ImportError(
            "the packed layout with flash_attention_2 needs flash-attn installed (pip install flash-attn)"
        )
    model.set_attn_implementation({"text_config": PACKED_IMPLEMENTATIONS[current]})
    if family.recurrent:  # Qwen3.5's linear-attention layers: each branch from its prompt's state
        enable_packed_recurrence(model)


def uses_packed_attention(model: Any) -> bool:
    return model.config.get_text_config()._attn_implementation in PACKED_IMPLEMENTATIONS.values()
