"""``load_checkpoint``: the one loader of reward checkpoints, for every consumer.

    from vlrm.model.loading import load_checkpoint

    model, processor = load_checkpoint("outputs/run/checkpoint-200")                  # full or LoRA, in eval mode
    model, processor = load_checkpoint("outputs/lora-run", merge_lora=True)           # adapters folded in

``RewardScorer`` (and through it ``eval_rm.py``, ``VLRewardFunction`` and ``serve_rm.py``) and the export all load
through here, so a checkpoint loads the same way everywhere: what a checkpoint dir holds is in
``vlrm.model.checkpoints``; here it is checked before any weight is read, loaded onto its base model when it is a
LoRA adapter, and refused with the reason when weights are missing (a base VLM has no trained score head: its
rewards would be random).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlrm.errors import CheckpointError
from vlrm.model.checkpoints import (
    check_loadable,
    is_lora_checkpoint,
    load_lora_reward_model,
    load_processor,
    resolve_base_model,
)
from vlrm.model.reward_model import VLRewardModel


def load_checkpoint(
    checkpoint_dir: str | Path,
    base_model_path: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    attn_implementation: str = "sdpa",
    merge_lora: bool = False,
) -> tuple[Any, Any]:
    """(model in eval mode, processor) of a checkpoint dir (config + weights, processor optional).

    ``dtype``: ``auto`` (as saved), ``bfloat16``, ``float16``, ``float32`` or a torch dtype. A vlrm LoRA checkpoint
    loads onto the base model it records, or onto ``base_model_path`` when that one is not reachable here: a peft
    model with its adapters unmerged (the computation training did), or with ``merge_lora`` a plain
    ``VLRewardModel`` with the adapters folded in. Its processor, when the dir has none, is the base model's; for a
    full checkpoint without one, ``base_model_path``'s. Raises ``CheckpointError`` with the reason and the fix."""
    check_loadable(checkpoint_dir)
    lora = is_lora_checkpoint(checkpoint_dir)
    if lora:
        base_model_path = resolve_base_model(checkpoint_dir, base_model_path)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    try:
        if lora:
            model = load_lora_reward_model(
                checkpoint_dir, VLRewardModel, base_model_path, merge=merge_lora, dtype=dtype,
                attn_implementation=attn_implementation,
            )  # fmt: skip
        else:
            model, loading_info = VLRewardModel.from_pretrained(
                checkpoint_dir, dtype=dtype, attn_implementation=attn_implementation, output_loading_info=True
            )
    except CheckpointError:
        raise
    except Exception as error:  # safetensors, torch and transformers each raise their own types for a bad file
        raise CheckpointError(f"{checkpoint_dir}: cannot load: {type(error).__name__}: {error}") from error
    if not lora and loading_info["missing_keys"]:
        missing = sorted(loading_info["missing_keys"])
        hint = " (no score head: a base model, not a trained reward model)" if "score.weight" in missing else ""
        raise CheckpointError(f"{checkpoint_dir}: weights missing from the checkpoint{hint}: {', '.join(missing[:5])}")
    return model.eval(), load_processor(checkpoint_dir, base_model_path)
