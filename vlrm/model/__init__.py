"""The model wing: families, the reward model, LoRA, and the one place that loads a checkpoint.

``families`` holds one entry per VLM family; ``reward_model`` the backbone + head (``VLRewardModel``); ``heads`` the
heads, pooling and scale a config can ask for (``HeadArguments``); ``lora`` builds peft adapters for training;
``checkpoints`` says what a checkpoint dir is (full or LoRA) and finds a run's checkpoints;
``loading.load_checkpoint`` loads one for every consumer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlrm.lazy import public_names

# public name -> the module that defines it; each loads on first use (vlrm.lazy)
_PUBLIC = {
    "Checkpoint": "vlrm.model.checkpoints",
    "check_loadable": "vlrm.model.checkpoints",
    "find_checkpoints": "vlrm.model.checkpoints",
    "is_lora_checkpoint": "vlrm.model.checkpoints",
    "load_processor": "vlrm.model.checkpoints",
    "FAMILIES": "vlrm.model.families",
    "Family": "vlrm.model.families",
    "GENERIC": "vlrm.model.families",
    "family_named": "vlrm.model.families",
    "family_of": "vlrm.model.families",
    "HeadArguments": "vlrm.model.heads",
    "head_settings_of": "vlrm.model.heads",
    "load_checkpoint": "vlrm.model.loading",
    "LoraArguments": "vlrm.model.lora",
    "apply_lora": "vlrm.model.lora",
    "count_parameters": "vlrm.model.lora",
    "lora_summary": "vlrm.model.lora",
    "RewardOutput": "vlrm.model.reward_model",
    "VLRewardModel": "vlrm.model.reward_model",
    "reward_model_class": "vlrm.model.reward_model",
}

__all__ = [
    "FAMILIES", "GENERIC", "Checkpoint", "Family", "HeadArguments", "LoraArguments", "RewardOutput", "VLRewardModel",
    "apply_lora", "check_loadable", "count_parameters", "family_named", "family_of", "find_checkpoints",
    "head_settings_of", "is_lora_checkpoint", "load_checkpoint", "load_processor", "lora_summary",
    "reward_model_class",
]  # fmt: skip
__getattr__, __dir__ = public_names(__name__, _PUBLIC)

if TYPE_CHECKING:  # what editors and type checkers see
    from vlrm.model.checkpoints import Checkpoint, check_loadable, find_checkpoints, is_lora_checkpoint, load_processor
    from vlrm.model.families import FAMILIES, GENERIC, Family, family_named, family_of
    from vlrm.model.heads import HeadArguments, head_settings_of
    from vlrm.model.loading import load_checkpoint
    from vlrm.model.lora import LoraArguments, apply_lora, count_parameters, lora_summary
    from vlrm.model.reward_model import RewardOutput, VLRewardModel, reward_model_class
