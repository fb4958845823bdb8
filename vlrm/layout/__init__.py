"""The layout wing: canonical rows -> model inputs, in two layouts with the same rewards.

``encoder`` renders prompts and tokenizes responses (``PreferenceEncoder``); ``padded`` is the padded layout (one row
per prompt and branch, every family); ``packed`` the packed one (one padding-free row per micro-batch, each prompt
once), described by ``segments.PackedLayout`` and fed to the backbone by ``packed_inputs``; ``attention`` and
``recurrent`` are its kernels.
"""

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

__all__ = [
    "EncodedPrompt", "PackedLayout", "PackedPreferenceCollator", "PaddedPreferenceCollator", "PreferenceEncoder",
    "apply_pixel_limits", "chat_end_of_turn", "enable_packed_attention", "make_collator", "open_image",
    "pack_branches", "pack_responses", "pad_rows", "packed_backbone_inputs", "packed_tokens", "pair_tokens",
    "prompt_key", "split_rewards", "uses_packed_attention",
]  # fmt: skip
