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

import gc
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from vlrm.errors import CheckpointError
from vlrm.model.checkpoints import (
    check_loadable,
    is_lora_checkpoint,
    load_adapter_weights,
    load_lora_reward_model,
    load_processor,
    read_peft_config,
    resolve_base_model,
)
from vlrm.model.reward_model import VLRewardModel

# The score head's name in a Qwen2-VL / Qwen2.5-VL vLLM export (vlrm.use.export: vLLM takes that family's head from
# its inner language model), read back as the reward model's own `score`.
EXPORT_KEY_MAPPING = {r"^language_model\.score\.": "score."}

# Config fields that may differ between checkpoints of one run without changing the model's structure.
# What differs between checkpoints of one run without changing the model: the reward statistics (the first
# RUN_STATISTICS, copied over on a swap) and where the config was read.
RUN_FIELDS = (
    "reward_mean", "reward_std", "reward_stats_source", "reward_attribute_mean", "reward_attribute_std",
    "_name_or_path", "transformers_version",
)  # fmt: skip
RUN_STATISTICS = 5


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(value: str | dict | None, devices: Sequence[int] | None = None) -> str | dict | None:
    """A ``device_map`` setting as the config or a flag writes it: a strategy name, a JSON object
    ``{"module": device}`` (or a dict), or None. ``devices``: the GPUs this process owns (several evaluation
    processes, each a replica over its own GPUs); an explicit map's GPU numbers then count within them (0 = the
    first one this process owns)."""
    if value is None or isinstance(value, dict):
        mapping = value
    elif value in DEVICE_MAP_STRATEGIES:
        return value
    else:
        try:
            mapping = json.loads(value)
        except ValueError as error:
            raise ValueError(
                f"device_map {value!r} is neither one of {', '.join(DEVICE_MAP_STRATEGIES)} nor a JSON object "
                '{"module": device}'
            ) from error
        if not isinstance(mapping, dict):
            raise ValueError(f"device_map {value!r}: expected a JSON object {{module: device}}")
    if mapping is None or devices is None:
        return mapping
    return {name: devices[device] if isinstance(device, int) else device for name, device in mapping.items()}


def parse_max_memory(value: str | dict | None, devices: Sequence[int] | None = None) -> dict | None:
    """``max_memory`` as written: one size for each GPU (``"70GiB"``), a JSON object (``{"0": "70GiB", "cpu":
    "100GiB"}``), or None (accelerate's own bound: each device's free memory). ``devices``: the GPUs this process
    owns; the model is then kept on them (GPU numbers in a JSON object count within them, and None bounds each of
    them by 90% of its free memory)."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        value = json.loads(value)
    if isinstance(value, str):
        gpus = devices if devices is not None else range(torch.cuda.device_count())
        return {gpu: value for gpu in gpus}
    if value is None:
        return None if devices is None else {gpu: int(0.9 * torch.cuda.mem_get_info(gpu)[0]) for gpu in devices}
    mapping = {int(key) if str(key).isdigit() else key: size for key, size in value.items()}
    if devices is None:
        return mapping
    return {devices[key] if isinstance(key, int) else key: size for key, size in mapping.items()}


def placement(
    device_map: str | dict | None = None, max_memory: dict | None = None, offload_folder: str | Path | None = None
) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that place a model larger than one device: accelerate's big-model
    dispatch (``device_map``: ``auto``, ``balanced``, ``balanced_low_0``, ``sequential`` or an explicit
    ``{module name: device}``; ``max_memory``: ``{device: "70GiB", "cpu": ...}``; ``offload_folder`` for modules
    mapped to ``disk``). None: the whole model on one device, moved there by the caller."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise ValueError("max_memory and offload_folder need a device_map (auto, balanced, or an explicit map)")
        return {}
    arguments: dict[str, Any] = {"device_map": device_map}
    if max_memory is not None:
        arguments["max_memory"] = max_memory
    if offload_folder is not None:
        arguments["offload_folder"] = str(offload_folder)
    return arguments


def load_checkpoint(
    checkpoint_dir: str | Path,
    base_model_path: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    attn_implementation: str = "sdpa",
    merge_lora: bool = False,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
    reuse: Any = None,
) -> tuple[Any, Any]:
    """(model in eval mode, processor) of a checkpoint dir (config + weights, processor optional).

    ``dtype``: ``auto`` (as saved), ``bfloat16``, ``float16``, ``float32`` or a torch dtype. ``device_map`` /
    ``max_memory`` / ``offload_folder``: split the model over several devices (``placement``); without them it loads
    on the CPU and the caller moves it. A vlrm LoRA checkpoint loads onto the base model it records, or onto
    ``base_model_path`` when that one is not reachable here: a peft model with its adapters unmerged (the computation
    training did), or with ``merge_lora`` a plain ``VLRewardModel`` with the adapters folded in. ``reuse``: a model
    this function returned for another adapter checkpoint of the same base, same LoRA settings and same head; its
    adapters and score head are then swapped for this checkpoint's (strictly: every key, no other) instead of
    loading the base again, which is what a sweep over a LoRA run's checkpoints wants; when it cannot be reused it is
    released first (pass the only reference: ``RewardScorer.from_pretrained(reuse=...)`` does). Its processor, when the dir
    has none, is the base model's; for a full checkpoint without one, ``base_model_path``'s. Raises
    ``CheckpointError`` with the reason and the fix."""
    check_loadable(checkpoint_dir)
    lora = is_lora_checkpoint(checkpoint_dir)
    if lora:
        base_model_path = resolve_base_model(checkpoint_dir, base_model_path)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    where = placement(device_map, max_memory, offload_folder)
    provenance = {"base": base_model_path, "dtype": str(dtype), "attn": attn_implementation, "placement": repr(where)}
    if reuse is not None:
        if lora and not merge_lora and _swap_adapters(reuse, checkpoint_dir, provenance):
            return reuse.eval(), load_processor(checkpoint_dir, base_model_path)
        reuse = None  # not reusable: let it go before another model takes its memory (callers hand it over)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    try:
        if lora:
            model = load_lora_reward_model(
                checkpoint_dir, VLRewardModel, base_model_path, merge=merge_lora, dtype=dtype,
                attn_implementation=attn_implementation, **where,
            )  # fmt: skip
        else:
            model, loading_info = VLRewardModel.from_pretrained(
                checkpoint_dir, dtype=dtype, attn_implementation=attn_implementation, output_loading_info=True,
                key_mapping=EXPORT_KEY_MAPPING, **where,
            )  # fmt: skip
    except CheckpointError:
        raise
    except Exception as error:  # safetensors, torch and transformers each raise their own types for a bad file
        raise CheckpointError(f"{checkpoint_dir}: cannot load: {type(error).__name__}: {error}") from error
    if not lora and loading_info["missing_keys"]:
        missing = sorted(loading_info["missing_keys"])
        no_head = any(key.split(".")[0] == "score" for key in missing)
        hint = " (no score head: a base model, not a trained reward model)" if no_head else ""
        raise CheckpointError(f"{checkpoint_dir}: weights missing from the checkpoint{hint}: {', '.join(missing[:5])}")
    if lora and not merge_lora:
        model.vlrm_provenance = provenance  # what _swap_adapters compares a later checkpoint with
    return model.eval(), load_processor(checkpoint_dir, base_model_path)


def _swap_adapters(model: Any, checkpoint_dir: str | Path, provenance: dict) -> bool:
    """Load ``checkpoint_dir``'s adapters and head into ``model`` (a peft model ``load_checkpoint`` returned) when
    it has the same base, dtype, kernel, placement, LoRA settings and reward-model config (the reward statistics
    aside); False, with ``model`` untouched, when anything differs and a full load is needed."""
    if getattr(model, "vlrm_provenance", None) != provenance:
        return False
    saved = read_peft_config(checkpoint_dir).to_dict()
    live = model.peft_config["default"].to_dict()
    if any(saved.get(key) != live.get(key) for key in set(saved) | set(live) if key != "base_model_name_or_path"):
        return False
    config = AutoConfig.from_pretrained(checkpoint_dir)
    reward_config = model.get_base_model().config
    ours, theirs = reward_config.to_dict(), config.to_dict()
    if any(ours.get(key) != theirs.get(key) for key in set(ours) | set(theirs) if key not in RUN_FIELDS):
        return False
    load_adapter_weights(model, checkpoint_dir)  # strict: every adapter weight and the head, no other
    for key in RUN_FIELDS[:RUN_STATISTICS]:
        setattr(reward_config, key, getattr(config, key, None))
    return True
