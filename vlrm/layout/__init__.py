"""The layout wing: canonical rows -> model inputs, in two layouts with the same rewards.

``encoder`` renders prompts and tokenizes responses (``PreferenceEncoder``); ``padded`` is the padded layout (one row
per prompt and branch, every family); ``packed`` the packed one (one padding-free row per micro-batch, each prompt
once), described by ``segments.PackedLayout`` and fed to the backbone by ``packed_inputs``; ``attention`` and
``recurrent`` are its kernels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlrm.lazy import public_names

# public name -> the module that defines it; each loads on first use (vlrm.lazy)
_PUBLIC = {
    "enable_packed_attention": "vlrm.layout.attention",
    "uses_packed_attention": "vlrm.layout.attention",
    "EncodedPrompt": "vlrm.layout.encoder",
    "PreferenceEncoder": "vlrm.layout.encoder",
    "apply_pixel_limits": "vlrm.layout.encoder",
    "chat_end_of_turn": "vlrm.layout.encoder",
    "open_image": "vlrm.layout.encoder",
    "PackedPreferenceCollator": "vlrm.layout.packed",
    "make_collator": "vlrm.layout.packed",
    "pack_branches": "vlrm.layout.packed",
    "pack_responses": "vlrm.layout.packed",
    "packed_tokens": "vlrm.layout.packed",
    "pair_tokens": "vlrm.layout.packed",
    "prompt_key": "vlrm.layout.packed",
    "packed_backbone_inputs": "vlrm.layout.packed_inputs",
    "PaddedPreferenceCollator": "vlrm.layout.padded",
    "pad_rows": "vlrm.layout.padded",
    "split_rewards": "vlrm.layout.padded",
    "PackedLayout": "vlrm.layout.segments",
}

__all__ = [
    "EncodedPrompt", "PackedLayout", "PackedPreferenceCollator", "PaddedPreferenceCollator", "PreferenceEncoder",
    "apply_pixel_limits", "chat_end_of_turn", "enable_packed_attention", "make_collator", "open_image",
    "pack_branches", "pack_responses", "pad_rows", "packed_backbone_inputs", "packed_tokens", "pair_tokens",
    "prompt_key", "split_rewards", "uses_packed_attention",
]  # fmt: skip
__getattr__, __dir__ = public_names(__name__, _PUBLIC)

if TYPE_CHECKING:  # what editors and type checkers see
    from vlrm.layout.attention import enable_packed_attention, uses_packed_attention
    from vlrm.layout.encoder import EncodedPrompt, PreferenceEncoder, apply_pixel_limits, chat_end_of_turn, open_image
    from vlrm.layout.packed import (
        PackedPreferenceCollator,
        make_collator,
        pack_branches,
        pack_responses,
        packed_tokens,
        pair_tokens,
        prompt_key,
    )
    from vlrm.layout.packed_inputs import packed_backbone_inputs
    from vlrm.layout.padded import PaddedPreferenceCollator, pad_rows, split_rewards
    from vlrm.layout.segments import PackedLayout
