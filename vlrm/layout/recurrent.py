"""The packed layout for Qwen3.5's Gated DeltaNet (linear attention) layers: each branch starts from its prompt's state.

A Gated DeltaNet layer carries two states along the sequence: the short causal convolution's window (the last
``kernel - 1`` projected tokens) and the delta rule's recurrent state (a ``[heads, key_dim, value_dim]`` matrix per
sequence). In a packed row ``[prompt][branch][branch]..`` the layer as transformers writes it would run the second
branch from the state the first branch left. ``PackedGatedDeltaNet`` runs the row segment by segment instead:

- convolution: a prompt from zeros, as at the start of a sequence; a branch from the last ``kernel - 1`` tokens of
  its prompt, exactly the window it has in its padded row;
- delta rule: a prompt from a zero state, keeping its final state; each branch from its prompt's final state.

So every branch computes exactly what its padded row computes (rewards and gradients equal to float32 round-off,
``tests/test_families.py``), and each prompt is computed once. The projections, gates, norm and output projection are
token-wise and run on the whole row at once; the convolution and the delta rule are transformers' own functions
(``causal_conv1d_fn``, ``torch_chunk_gated_delta_rule``: the fla / causal-conv1d kernels when installed, their
PyTorch fallbacks otherwise), called once per segment.

``enable_packed_attention`` swaps each linear-attention layer's class for ``packed_gated_delta_net_class(type)``, a
subclass with the same parameters whose ``forward`` takes this path when the call carries a ``packed_layout`` and is
transformers' own otherwise (padded batches, generation with a cache).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlrm.layout.segments import PackedLayout


def _kernels(module: nn.Module) -> Any:
    """The module that defines this layer class: its ``causal_conv1d_fn`` and ``torch_chunk_gated_delta_rule``."""
    for cls in type(module).__mro__:
        if cls.__name__.endswith("GatedDeltaNet") and cls.__module__.startswith("transformers."):
            return importlib.import_module(cls.__module__)
    raise TypeError(f"{type(module).__name__} is not a transformers Gated DeltaNet layer")


def _segment_convolution(module: nn.Module, mixed_qkv: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """The causal depthwise convolution (and its activation) over ``mixed_qkv`` ``[T, channels]``, segment by
    segment: a branch's window reaches back into its prompt, never into another branch."""
    kernels, context = _kernels(module), module.conv_kernel_size - 1
    weight, outputs = module.conv1d.weight.squeeze(1), []
    for start, end, prefix_start, prefix_end in layout.segments:
        window_start = max(prefix_start, prefix_end - context)
        window = torch.cat([mixed_qkv[window_start:prefix_end], mixed_qkv[start:end]])
        convolved = kernels.causal_conv1d_fn(window.T[None], weight, module.conv1d.bias, activation=module.activation)[
            0
        ]  # [channels, window]
        outputs.append(convolved[:, prefix_end - window_start :].T)
    return torch.cat(outputs)


def _segment_delta_rule(module, query, key, value, g, beta, layout: PackedLayout) -> torch.Tensor:
    """The gated delta rule over ``[1, T, heads, dim]`` inputs, segment by segment: prompts from a zero state, each
    branch from its prompt's final state."""
    rule, final_states, outputs = _kernels(module).torch_chunk_gated_delta_rule, {}, []
    for start, end, prefix_start, prefix_end in layout.segments:
        is_prompt = prefix_start == prefix_end
        output, state = rule(
            query[:, start:end], key[:, start:end], value[:, start:end], g=g[:, start:end], beta=beta[:, start:end],
            initial_state=None if is_prompt else final_states[prefix_start], output_final_state=is_prompt,
            use_qk_l2norm_in_kernel=True,
        )  # fmt: skip
        if is_prompt:
            final_states[start] = state
        outputs.append(output)
    return torch.cat(outputs, dim=1)


def packed_gated_delta_net(module: nn.Module, hidden_states: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """A Gated DeltaNet layer (transformers' ``Qwen3_5GatedDeltaNet`` and its MoE sibling) on a packed row
    ``[1, T, hidden]``, each branch continuing from its prompt (module docstring)."""
    length = hidden_states.shape[1]
    mixed_qkv = _segment_convolution(module, module.in_proj_qkv(hidden_states)[0], layout)[None]
    query, key, value = torch.split(mixed_qkv, [module.key_dim, module.key_dim, module.value_dim], dim=-1)
    query = query.reshape(1, length, -1, module.head_k_dim)
    key = key.reshape(1, length, -1, module.head_k_dim)
    value = value.reshape(1, length, -1, module.head_v_dim)
    beta = module.in_proj_b(hidden_states).sigmoid()
    # As transformers computes it: in float32, or A_log.exp() can overflow in fp16.
    g = -module.A_log.float().exp() * F.softplus(module.in_proj_a(hidden_states).float() + module.dt_bias)
    core = _segment_delta_rule(module, query, key, value, g, beta, layout)
    gate = module.in_proj_z(hidden_states).reshape(-1, module.head_v_dim)
    core = module.norm(core.reshape(-1, module.head_v_dim), gate).reshape(1, length, -1)
    return module.out_proj(core)


@functools.cache
def packed_gated_delta_net_class(base: type) -> type:
    """``base`` (a transformers Gated DeltaNet layer class) whose forward also takes a packed row."""

    def forward(self, hidden_states, cache=None, attention_mask=None, packed_layout=None, **kwargs):
        if packed_layout is None:
            return base.forward(self, hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        if cache is not None:
            raise ValueError("the packed layout scores whole sequences: it takes no cache")
        return packed_gated_delta_net(self, hidden_states, packed_layout)

    return type(f"Packed{base.__name__}", (base,), {"forward": forward, "__module__": __name__})


def enable_packed_recurrence(model: nn.Module) -> int:
    """Swap every Gated DeltaNet layer of ``model`` for its packed subclass (same parameters, same padded
    behaviour); returns how many layers it swapped. Idempotent."""
    swapped = 0
    for module in model.modules():
        base = type(module)
        if base.__name__.endswith("GatedDeltaNet") and base.__module__.startswith("transformers."):
            module.__class__ = packed_gated_delta_net_class(base)
            swapped += 1
    return swapped
