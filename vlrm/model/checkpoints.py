"""What a reward checkpoint is, and finding the checkpoints of a training run.

A checkpoint dir holds ``config.json`` (naming the architecture, ``vlrm_family``, the final model's reward
statistics), the processor files, and its weights in one of two forms:

- **full**: ``model.safetensors`` (or shards with an index), the whole reward model;
- **LoRA**: ``adapter_model.safetensors`` + peft's ``adapter_config.json`` with a ``vlrm`` entry (the format, and the
  base model to load: the absolute path of a local dir, else the hub id). The adapters and the trained score head
  only; the base model is loaded from where the entry says, or from ``base_model_path`` when that is not reachable
  here, after its shapes are checked against the adapter's config.

A training output dir holds ``checkpoint-<step>/`` dirs (saved every ``save_steps``) and, once training finishes,
the final model at its top level; ``find_checkpoints`` lists both, in step order. Matching checkpoint dirs are listed
even without weights, so that a broken save shows up in a sweep as an error rather than disappearing;
``check_loadable`` says what is wrong with one before any weight is read.

``vlrm.model.loading.load_checkpoint`` is the one loader every consumer calls (the scorer, eval_rm.py, the GRPO
reward function, the server, the export); this module holds what it reads: the format of an adapter dir, its base
model, the strict load of its weights, and a checkpoint's processor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from vlrm.errors import CheckpointError
from vlrm.model.heads import head_module_names
from vlrm.model.lora import base_model_reference, quiet_peft, reward_model_of

logger = logging.getLogger(__name__)

FINAL = "final"

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # peft's names

WEIGHT_GLOBS = ("model*.safetensors", "pytorch_model*.bin", "*.index.json", *ADAPTER_WEIGHT_FILES)

ADAPTER_CONFIG = "adapter_config.json"
MARKER = "vlrm"  # the key in adapter_config.json that says a vlrm reward adapter (with its head) is in the dir
FORMAT = "vlrm-lora-reward-model"
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
# Config fields that decide the shapes of the weights an adapter was trained on.
SHAPE_FIELDS = {
    "text_config": (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "vocab_size",
    ),
    "vision_config": ("depth", "num_hidden_layers", "embed_dim", "hidden_size", "intermediate_size", "out_hidden_size"),
}  # fmt: skip

_STEP = re.compile(r"(?:^|[-_])(?:step)?(\d+)$")


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


# ----------------------------------------------------------------------------------------------------------------------
# LoRA adapter checkpoints: what a vlrm adapter dir holds, and loading one onto its base model


def write_lora_metadata(model: nn.Module, output_dir: str | Path) -> None:
    """After peft's ``save_pretrained``: the reward model's config.json, and the ``vlrm`` entry in adapter_config.json
    that tells vlrm (``check_loadable``, the scorer, the export) that this adapter is a reward model with its head."""
    output_dir = Path(output_dir)
    reward_model_of(model).config.save_pretrained(output_dir)
    adapter_config_path = output_dir / ADAPTER_CONFIG
    values = json.loads(adapter_config_path.read_text())
    values[MARKER] = {
        "format": FORMAT,
        "version": 1,
        "base_model_name_or_path": values.get("base_model_name_or_path"),
        "trained_in_full": head_module_names(reward_model_of(model)),
        "load": "vlrm.RewardScorer.from_pretrained(dir) or vlrm.VLRewardModel.from_pretrained(dir)",
        "merge": "python -m vlrm export --merge DIR OUTPUT_DIR",
    }
    adapter_config_path.write_text(json.dumps(values, indent=2, sort_keys=True))


def read_lora_marker(path: str | Path) -> dict | None:
    """The ``vlrm`` entry of ``path``/adapter_config.json, or None (no adapter, or not one vlrm saved)."""
    adapter_config_path = Path(path) / ADAPTER_CONFIG
    if not adapter_config_path.is_file():
        return None
    try:
        marker = json.loads(adapter_config_path.read_text()).get(MARKER)
    except (OSError, ValueError, AttributeError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == FORMAT else None


def is_lora_checkpoint(path: str | Path) -> bool:
    return read_lora_marker(path) is not None


def _reachable(name_or_path: str) -> bool:
    """A local model dir, or a hub id already in the local Hugging Face cache."""
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return True
    if _is_local_path(name_or_path):
        return False
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(str(name_or_path), "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _is_local_path(name_or_path: str) -> bool:
    text = str(name_or_path)
    return text.startswith((".", "/", "~")) or Path(text).expanduser().exists() or text.count("/") != 1


def resolve_base_model(adapter_dir: str | Path, base_model_path: str | Path | None = None) -> str:
    """The base model to load an adapter onto: the one it records when reachable here, else ``base_model_path``, else
    the recorded hub id (downloaded). Raises ``CheckpointError`` when none of them can be found."""
    marker = read_lora_marker(adapter_dir)
    if marker is None:
        raise CheckpointError(f"{adapter_dir}: not a vlrm LoRA checkpoint (no `{MARKER}` entry in {ADAPTER_CONFIG})")
    recorded = marker.get("base_model_name_or_path")
    if recorded and _reachable(recorded):
        if base_model_path is not None and base_model_reference(str(base_model_path)) != recorded:
            logger.info(
                "%s: loading onto its recorded base model %s (base_model_path %s is used only when that is not "
                "reachable)", adapter_dir, recorded, base_model_path,
            )  # fmt: skip
        return recorded
    if base_model_path is not None:
        if _is_local_path(str(base_model_path)) and not _reachable(str(base_model_path)):
            raise CheckpointError(
                f"{adapter_dir}: base_model_path {base_model_path} is not a model dir (no config.json)"
            )
        return str(base_model_path)
    if recorded and not _is_local_path(recorded):
        return recorded  # a hub id not cached yet: from_pretrained downloads it
    raise CheckpointError(
        f"{adapter_dir}: a LoRA adapter for the base model {recorded}, which is not found here; set base_model_path "
        "to that model (RewardScorer.from_pretrained(..., base_model_path=...), the eval config key base_model_path, "
        "or --base_model_path for python -m vlrm.export --merge)"
    )


def _check_same_shapes(adapter_dir: Path, reward_config: Any, base: str) -> None:
    """The base model's shapes are the adapter's, read from the two configs before any weight is."""
    from transformers import AutoConfig

    base_config = AutoConfig.from_pretrained(base)
    differences = []
    for part, names in SHAPE_FIELDS.items():
        for name in names:
            want = getattr(getattr(reward_config, part, None), name, None)
            got = getattr(getattr(base_config, part, None), name, None)
            if want != got:
                differences.append(f"{part}.{name} {got} (adapter: {want})")
    if differences:
        raise CheckpointError(
            f"{adapter_dir}: the base model {base} is not the one this adapter was trained on: "
            + "; ".join(differences)
        )


@contextlib.contextmanager
def _without_load_report():
    """transformers' load report of the base model says the score head is missing and newly initialised: true of the
    base, but the head comes from the adapter, and every other missing key is an error raised below."""
    transformers_logger = logging.getLogger("transformers.modeling_utils")

    def keep(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)

    transformers_logger.addFilter(keep)
    try:
        yield
    finally:
        transformers_logger.removeFilter(keep)


def read_peft_config(adapter_dir: str | Path) -> Any:
    """peft's config of a vlrm adapter (the ``vlrm`` entry left out, so peft reads it without a warning)."""
    from peft import PeftConfig

    values = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    values.pop(MARKER, None)
    return PeftConfig.from_peft_type(**values)


def load_adapter_weights(model: nn.Module, checkpoint_dir: str | Path) -> None:
    """Load a vlrm adapter checkpoint's weights into a peft model built with the same LoRA settings, strictly: every
    adapter weight and the head, no other, of the same shapes. Raises ``ValueError`` with the differences."""
    from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

    checkpoint_dir = Path(checkpoint_dir)
    if not is_lora_checkpoint(checkpoint_dir):
        raise ValueError(
            f"{checkpoint_dir} is not a vlrm LoRA checkpoint (no {ADAPTER_CONFIG} with a `{MARKER}` entry): a LoRA "
            "run resumes from one of its own checkpoints"
        )
    saved, live = read_peft_config(checkpoint_dir), model.peft_config["default"]
    for name in ("r", "lora_alpha", "use_rslora"):  # the same weight shapes could still scale differently
        if getattr(saved, name) != getattr(live, name):
            raise ValueError(
                f"{checkpoint_dir} was trained with {name}={getattr(saved, name)}, this model has "
                f"{name}={getattr(live, name)}: use the checkpoint's LoRA settings"
            )
    weights = load_peft_weights(str(checkpoint_dir), device="cpu")
    expected = set(get_peft_model_state_dict(model))
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint_dir}: adapter weights do not match this model's adapters (other lora_target_modules or "
            f"lora_vision?): missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise ValueError(f"{checkpoint_dir}: weights peft could not place: {result.unexpected_keys[:5]}")


def load_lora_reward_model(
    adapter_dir: str | Path,
    model_class: type,
    base_model_path: str | Path | None = None,
    merge: bool = False,
    dtype: Any = "auto",
    output_loading_info: bool = False,
    **kwargs: Any,
) -> Any:
    """A vlrm adapter checkpoint on its base model (``resolve_base_model``), in eval mode: a peft model computing
    exactly what training computed, or with ``merge`` the adapters folded into a plain ``VLRewardModel``
    (peft's ``merge_and_unload``, checked for NaN). The base weights load with ``model_class.from_pretrained``
    (``VLRewardModel``, passed in by the caller so that this module never imports the model it loads); ``kwargs`` go
    to it (``attn_implementation``...). The reward model's config (reward statistics, pad id) is the adapter dir's."""
    from peft import PeftModel
    from transformers import AutoConfig

    adapter_dir = Path(adapter_dir)
    base = resolve_base_model(adapter_dir, base_model_path)
    reward_config = AutoConfig.from_pretrained(adapter_dir)
    _check_same_shapes(adapter_dir, reward_config, base)
    with _without_load_report():
        model, loading_info = model_class.from_pretrained(
            base, config=reward_config, dtype=dtype, output_loading_info=True, **kwargs
        )
    head = tuple(f"{name}." for name in head_module_names(model))  # the head is in the adapter, not the base
    missing = sorted(key for key in loading_info["missing_keys"] if not key.startswith(head))
    if missing:
        raise CheckpointError(f"{adapter_dir}: its base model {base} lacks weights: {', '.join(missing[:5])}")
    with quiet_peft():
        peft_model = PeftModel(model, read_peft_config(adapter_dir))
    load_adapter_weights(peft_model, adapter_dir)
    peft_model.eval()
    result = peft_model
    if merge:
        result = peft_model.merge_and_unload(safe_merge=True)
        # The merged model is this checkpoint, not its base: an adapter trained on top of it records this dir.
        result.name_or_path = result.config._name_or_path = str(adapter_dir.resolve())
    if output_loading_info:
        return result, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    return result


def load_processor(checkpoint_dir: str | Path, base_model_path: str | Path | None = None) -> Any:
    """The checkpoint's own processor, else the base model's (checkpoints saved without one still score with the
    tokenizer and image settings they were trained with, as long as those came from the base model)."""
    from transformers import AutoProcessor

    checkpoint_dir = Path(checkpoint_dir)
    if any((checkpoint_dir / name).is_file() for name in PROCESSOR_FILES):
        return AutoProcessor.from_pretrained(checkpoint_dir)
    if base_model_path is None:
        raise CheckpointError(
            f"{checkpoint_dir}: no processor files ({', '.join(PROCESSOR_FILES)}); set base_model_path to the model "
            "the run started from"
        )
    return AutoProcessor.from_pretrained(base_model_path)
