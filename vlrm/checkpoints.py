"""Finding the checkpoints of a training run, in step order.

A training output dir holds ``checkpoint-<step>/`` dirs (saved every ``save_steps``) and, once training finishes,
the final model at its top level. Both are listed; a dir counts as a model when it has ``config.json`` and weights:
full weights, or a vlrm LoRA adapter (``adapter_model.safetensors`` + ``adapter_config.json`` with a ``vlrm`` entry;
its base model is loaded from elsewhere, see ``vlrm.lora``). Matching checkpoint dirs are listed even without weights,
so that a broken save shows up in a sweep as an error rather than disappearing; ``check_loadable`` says what is wrong
with one before any weight is read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

FINAL = "final"

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # peft's names

WEIGHT_GLOBS = ("model*.safetensors", "pytorch_model*.bin", "*.index.json", *ADAPTER_WEIGHT_FILES)

_STEP = re.compile(r"(?:^|[-_])(?:step)?(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint dir that cannot be loaded, with the reason and the fix."""


@dataclass(frozen=True)
class Checkpoint:
    """``name`` is the dir name, or ``"final"`` for the model at the top of the run dir; ``step`` is None when
    it cannot be known."""

    name: str
    path: Path
    step: int | None


def parse_step(name: str) -> int | None:
    """The training step a checkpoint name ends with: ``checkpoint-200`` -> 200, ``step_50`` -> 50, else None."""
    match = _STEP.search(name)
    return int(match.group(1)) if match else None


def has_weights(path: str | Path) -> bool:
    """Full weights (not an adapter's)."""
    return any((Path(path) / name).is_file() for name in WEIGHT_FILES)


def has_adapter_weights(path: str | Path) -> bool:
    return any((Path(path) / name).is_file() for name in ADAPTER_WEIGHT_FILES)


def weights_mtime(path: str | Path) -> float | None:
    """Newest modification time of the weight files (an adapter's too), or None without any: when it changes, the
    checkpoint was overwritten (a training run started again into the same dir) and an earlier score of it is stale."""
    files = [file for pattern in WEIGHT_GLOBS for file in Path(path).glob(pattern)]
    return max((file.stat().st_mtime for file in files), default=None)


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file() and (has_weights(path) or has_adapter_weights(path))


def _trainer_state(path: Path) -> dict:
    try:
        return json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return {}


def _final_step(model_dir: Path, checkpoints: list[Checkpoint]) -> int | None:
    """The step of the final model: its own trainer_state.json, else the run length recorded by the newest
    checkpoint (``max_steps``), which is where a run that finished saved its final model."""
    if "global_step" in (state := _trainer_state(model_dir)):
        return int(state["global_step"])
    for checkpoint in reversed(checkpoints):
        if "max_steps" in (state := _trainer_state(checkpoint.path)):
            return int(state["max_steps"])
    return None


def find_checkpoints(model_dir: str | Path, pattern: str = "checkpoint-*") -> list[Checkpoint]:
    """Dirs in ``model_dir`` matching ``pattern``, by step (numerically: 5 before 10; names without a step last),
    then the final model at the top of ``model_dir`` when there is one. A ``model_dir`` that is itself a model and
    holds no checkpoints gives just ``final``."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model dir not found: {model_dir}")
    checkpoints = [
        Checkpoint(path.name, path, parse_step(path.name)) for path in model_dir.glob(pattern) if path.is_dir()
    ]
    checkpoints.sort(key=lambda checkpoint: (checkpoint.step is None, checkpoint.step or 0, checkpoint.name))
    if is_model_dir(model_dir):
        checkpoints.append(Checkpoint(FINAL, model_dir, _final_step(model_dir, checkpoints)))
    return checkpoints


def check_loadable(path: str | Path) -> None:
    """Raise ``CheckpointError`` with the fix when ``path`` lacks a config or weights that vlrm can load."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (an incomplete save?)")
    if (path / "adapter_config.json").is_file() and not has_weights(path):
        _check_adapter(path)
        return
    if has_weights(path):
        return
    if any(path.glob("global_step*")):
        raise CheckpointError(
            f"{path}: holds DeepSpeed ZeRO shards only (global_step*/); consolidate them with "
            f"`python {path}/zero_to_fp32.py {path} {path}` or set stage3_gather_16bit_weights_on_model_save: true"
        )
    raise CheckpointError(f"{path}: no weights (expected one of {', '.join(WEIGHT_FILES)})")


def _check_adapter(path: Path) -> None:
    """A LoRA dir loads when vlrm saved it (its ``vlrm`` entry says the score head is in the adapter and names the
    base model) and its weights are there; the base model is found when it is loaded (``vlrm.lora``)."""
    from vlrm.lora import read_lora_marker

    if read_lora_marker(path) is None:
        raise CheckpointError(
            f"{path}: holds a LoRA adapter only, not one vlrm saved (no `vlrm` entry in adapter_config.json, so no "
            "trained score head is known to be in it): merge it into its base model and save a full reward model, "
            "or train the adapter with vlrm (use_lora: true)"
        )
    if not has_adapter_weights(path):
        raise CheckpointError(
            f"{path}: adapter_config.json but no adapter weights ({', '.join(ADAPTER_WEIGHT_FILES)})"
        )


def checkpoint_step(checkpoint_dir: str | Path) -> int | None:
    """``global_step`` of the checkpoint's trainer_state.json, else the step its name ends with, else None."""
    state = _trainer_state(Path(checkpoint_dir))
    return int(state["global_step"]) if "global_step" in state else parse_step(Path(checkpoint_dir).name)
