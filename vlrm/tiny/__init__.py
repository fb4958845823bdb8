"""Offline tiny models, one per model family, each written as an ordinary model directory (``vlrm.tiny.qwen``:
the Qwen-VL families; ``vlrm.tiny.generic``: LLaVA and Gemma 3 for the generic image-text-to-text path).

    python -m vlrm.tiny --output_dir .cache/tiny-qwen2.5-vl          # the demo's Qwen2.5-VL
    python -m vlrm.tiny --family gemma3 --output_dir .cache/tiny-gemma3
"""

from __future__ import annotations

from pathlib import Path

from vlrm.tiny.generic import TINY_GENERIC_BUILDERS
from vlrm.tiny.qwen import QWEN_FAMILIES, build_processor, build_tiny_config, build_tokenizer
from vlrm.tiny.qwen import build_tiny_model_dir as build_tiny_qwen_dir

# The model_type of each tiny model: the Qwen-VL families, then the generic path's stand-ins.
TINY_FAMILIES = (*QWEN_FAMILIES, *TINY_GENERIC_BUILDERS)

__all__ = ["TINY_FAMILIES", "build_processor", "build_tiny_config", "build_tiny_model_dir", "build_tokenizer"]


def build_tiny_model_dir(output_dir: str | Path, seed: int = 0, family: str = "qwen2_5_vl", **sizes) -> Path:
    """Write the tiny model of ``family`` (a ``TINY_FAMILIES`` entry) to ``output_dir``; ``sizes`` (hidden_size,
    num_layers) apply to the Qwen-VL families."""
    if family in QWEN_FAMILIES:
        return build_tiny_qwen_dir(output_dir, seed=seed, family=family, **sizes)
    if family in TINY_GENERIC_BUILDERS:
        return TINY_GENERIC_BUILDERS[family](output_dir, seed=seed)
    raise ValueError(f"no tiny model for family {family!r}; choose one of {list(TINY_FAMILIES)}")
