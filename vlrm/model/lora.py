"""LoRA reward models (peft): adapters on the backbone, the ``score`` head trained in full and saved with them.

Train: the keys are ``LoraArguments``, part of every ``TrainConfig``:

    python train_rm.py training_configs/tiny_demo.yaml --use_lora true --lora_r 16 --lora_alpha 32 \
        --lora_vision merger --learning_rate 1e-3 --output_dir outputs/tiny_lora     # the CPU demo, LoRA r=16
    ./run_distributed.sh --gpus 8 --config training_configs/72b_lora.yaml             # Qwen2.5-VL-72B, one node

What trains: LoRA adapters (``B @ A``, rank ``lora_r``, scaled by ``lora_alpha / lora_r``; Hu et al. 2021) on every
linear layer of the language model (or the ones ``lora_target_modules`` names), on the vision merger and blocks when
``lora_vision`` asks, and the whole head (peft's ``modules_to_save``: a random head has nothing for a low-rank update
to adapt): ``score`` (linear or MLP), and the attention pooler and the learnable scale when the head has them
(``vlrm.model.heads.head_module_names``). Everything else is frozen. ``vit_lr`` / ``aligner_lr`` give the vision
tower and the merger their own learning rates, with or without LoRA, as optimizer parameter groups
(``parameter_groups``), which the HF Trainer, accelerate and DeepSpeed ZeRO-2/3 all keep.

This module builds the adapters. What an adapter checkpoint holds, and loading one onto its base model, is in
``vlrm.model.checkpoints``; ``vlrm.model.loading.load_checkpoint`` loads one for every consumer.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from torch import nn

from vlrm.errors import ConfigError
from vlrm.model.heads import head_module_names

# The language model inside every family's VLRewardModel; the vision tower and its aligners are the family's
# (vlrm.model.families: Qwen's model.visual and model.visual.merger, LLaVA's model.vision_tower and
# model.multi_modal_projector).
LANGUAGE_MODEL = "model.language_model."


@dataclass
class LoraArguments:
    """LoRA (peft) and per-part learning rates; ``TrainConfig`` inherits these fields."""

    use_lora: bool = field(
        default=False,
        metadata={
            "help": "Train LoRA adapters (peft) instead of every weight: the backbone is frozen, the adapters and the "
            "whole head (`score`, and the attention pooler and learnable scale when asked for) train, and "
            "checkpoints hold only those (+ config and processor; see vlrm/model/lora.py)."
        },
    )
    lora_r: int = field(
        default=16,
        metadata={"help": "LoRA rank: an adapted [out, in] weight gets r * (in + out) trainable parameters."},
    )
    lora_alpha: int = field(
        default=32,
        metadata={"help": "LoRA scale numerator: the update added to a weight is (lora_alpha / lora_r) B A."},
    )
    lora_dropout: float = field(
        default=0.0,
        metadata={
            "help": "Dropout on the adapters' input. `disable_dropout` (default true) zeroes every dropout, this one "
            "too: set disable_dropout: false to use it."
        },
    )
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Language-model linear layers that get adapters, by name: q_proj, k_proj, v_proj, o_proj, "
            "gate_proj, up_proj, down_proj (in every layer). None: all of them."
        },
    )
    lora_vision: Literal["none", "merger", "all"] = field(
        default="none",
        metadata={
            "help": "Adapters in the vision tower too: `none` (it stays frozen), `merger` (the vision -> language "
            "projection's linear layers), `all` (the merger and every vision block's linear layers; the patch "
            "embedding, a convolution, stays frozen)."
        },
    )
    vit_lr: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the vision tower's patch embedding and blocks (their adapters with use_lora), "
            "as ms-swift's vit_lr; the scheduler scales it like learning_rate. None: learning_rate."
        },
    )
    aligner_lr: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the merger, the vision -> language projection (its adapters with use_lora), "
            "as ms-swift's aligner_lr. None: learning_rate."
        },
    )

    def _check_lora_arguments(self) -> None:
        """Combinations that cannot work raise; ones that silently do nothing warn. Call after the parent's
        ``__post_init__`` (it reads the DeepSpeed config)."""
        if self.lora_r < 1:
            raise ConfigError(f"lora_r must be at least 1, got {self.lora_r}.")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be positive, got {self.lora_alpha}.")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise ConfigError("lora_target_modules is empty: list layer names, or leave it null for all of them.")
        for name in ("vit_lr", "aligner_lr"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive (or null for learning_rate), got {value}.")
        freeze_vit = getattr(self, "freeze_vit", False)
        if self.use_lora and freeze_vit and self.lora_vision == "all":
            raise ConfigError(
                "freeze_vit: true freezes the vision blocks, but lora_vision: all trains adapters in them: set "
                "freeze_vit: false, or lora_vision: merger / none."
            )
        if not self.use_lora:
            changed = [
                item.name
                for item in fields(LoraArguments)
                if item.name.startswith("lora_") and getattr(self, item.name) != _default(item)
            ]
            if changed:
                warnings.warn(
                    f"{', '.join(changed)} set but use_lora is false: they have no effect (every weight trains). "
                    "Set use_lora: true to train LoRA adapters.",
                    stacklevel=3,
                )
        if self.use_lora and self.lora_dropout and getattr(self, "disable_dropout", False):
            warnings.warn(
                f"lora_dropout={self.lora_dropout} has no effect: disable_dropout: true (the default) zeroes every "
                "dropout, the adapters' too. Set disable_dropout: false to use it.",
                stacklevel=3,
            )
        vision_trains = self.lora_vision == "all" if self.use_lora else not freeze_vit
        if self.vit_lr is not None and not vision_trains:
            reason = "lora_vision is not `all`" if self.use_lora else "freeze_vit: true"
            warnings.warn(f"vit_lr has no effect: the vision blocks do not train ({reason}).", stacklevel=3)
        if self.aligner_lr is not None and self.use_lora and self.lora_vision == "none":
            warnings.warn(
                "aligner_lr has no effect: with use_lora and lora_vision: none the merger does not train (set "
                "lora_vision: merger).",
                stacklevel=3,
            )
        deepspeed_config = getattr(getattr(self, "hf_deepspeed_config", None), "config", None) or {}
        if (self.vit_lr is not None or self.aligner_lr is not None) and "optimizer" in deepspeed_config:
            raise ConfigError(
                "vit_lr / aligner_lr are optimizer parameter groups of the Trainer's optimizer, but the DeepSpeed "
                "config has an `optimizer` block: DeepSpeed then builds its own optimizer from one flat list of "
                "parameters. Remove the block (ZeRO offload needs it: drop offload_optimizer too), or unset vit_lr "
                "and aligner_lr."
            )


def _default(item) -> Any:
    return item.default_factory() if callable(item.default_factory) else item.default


# ----------------------------------------------------------------------------------------------------------------------
# Building the peft model


def reward_model_of(model: nn.Module) -> nn.Module:
    """The ``VLRewardModel`` inside a peft model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_lora_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def linear_layer_names(model: nn.Module, target_modules: list[str] | None = None, vision: str = "none") -> list[str]:
    """Full names (inside ``VLRewardModel``) of the linear layers that get adapters: the language model's (those whose
    last name part is in ``target_modules``, or all), then the merger's (``vision`` merger / all) and the vision
    blocks' (``vision`` all). Raises ``ValueError`` for a target name that matches no language-model layer."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    language = [name for name in linears if name.startswith(LANGUAGE_MODEL)]
    if not language:
        raise ValueError(f"{type(model).__name__} has no linear layers under {LANGUAGE_MODEL!r}: not a VLRewardModel?")
    if target_modules is not None:
        available = sorted({name.rsplit(".", 1)[-1] for name in language})
        unknown = sorted(set(target_modules) - set(available))
        if unknown:
            raise ValueError(
                f"lora_target_modules {unknown} match no linear layer of the language model; its layers are named "
                f"{available}"
            )
        language = [name for name in language if name.rsplit(".", 1)[-1] in target_modules]
    tower, aligners = vision_prefixes(model)
    prefixes = {"none": (), "merger": aligners, "all": (tower, *aligners)}[vision]
    vision_layers = [name for name in linears if name.startswith(prefixes)]
    return language + vision_layers


def vision_prefixes(model: nn.Module) -> tuple[str, tuple[str, ...]]:
    """Name prefixes (inside ``VLRewardModel``) of the vision tower and of its aligners, from the model's family."""
    reward_model = reward_model_of(model)
    backbone = reward_model.model
    tower = reward_model.family.vision_tower_name(backbone)
    return f"model.{tower}.", tuple(f"model.{name}." for name in reward_model.family.aligner_names(backbone))


def _vision_parts(model: nn.Module) -> tuple[set[int], set[int]]:
    """(vision tower without aligners, aligners) as sets of parameter ids."""
    reward_model = reward_model_of(model)
    frozen, aligner = reward_model.vision_parameter_names()
    parameters = dict(reward_model.named_parameters())
    return {id(parameters[name]) for name in frozen}, {id(parameters[name]) for name in aligner}


def base_model_reference(name_or_path: str | None) -> str | None:
    """What an adapter records as its base model: the absolute path of a local dir (the run's relative path would not
    resolve from another working dir), else the hub id as given; None for a model built from a config."""
    if not name_or_path:
        return None
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else str(name_or_path)


def apply_lora(model: nn.Module, config: LoraArguments) -> nn.Module:
    """Wrap a ``VLRewardModel`` in a peft ``PeftModel``: LoRA adapters on ``linear_layer_names``, every head module
    (``head_module_names``: ``score``, ``reward_pooler``, ``reward_scale``) trained in full (``modules_to_save``),
    every other weight frozen. Call after loading (and after
    ``enable_packed_attention``, which it keeps) and before the Trainer wraps the model; under ZeRO-3 the base weights
    may already be partitioned (peft gathers the head to copy it)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:  # an install without the dependency: say how to fix it
        raise ImportError("use_lora needs the peft package: pip install peft (or pip install -e .)") from error

    targets = sorted(linear_layer_names(model, config.lora_target_modules, config.lora_vision))
    lora_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        modules_to_save=head_module_names(model),
        bias="none",
    )
    with quiet_peft():
        peft_model = get_peft_model(model, lora_config)
    # peft records the model's name_or_path as given (a relative path, often); saved checkpoints record this instead.
    peft_model.peft_config["default"].base_model_name_or_path = base_model_reference(model.name_or_path)
    return peft_model


@contextlib.contextmanager
def quiet_peft():
    """peft still calls transformers' deprecated ``is_gradient_checkpointing``: a warning the user cannot act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters. Under ZeRO-3 a rank holds an empty placeholder per weight: ``ds_numel`` is the
    full size. A peft model's total counts the frozen original of the score head as well as its trained copy."""
    trainable = total = 0
    for parameter in model.parameters():
        size = getattr(parameter, "ds_numel", parameter.numel())
        total += size
        trainable += size if parameter.requires_grad else 0
    return trainable, total


def lora_summary(model: nn.Module) -> str:
    """One line for the log: rank, scale, where the adapters are and their parameter count, and the head's."""
    peft_config = model.peft_config["default"]
    vision, merger = _vision_parts(model)
    adapters: dict[str, int] = {"language model": 0, "merger": 0, "vision blocks": 0}
    layers: set[str] = set()
    head = 0
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        size = getattr(parameter, "ds_numel", parameter.numel())
        if ".lora_" in name:
            part = (
                "merger"
                if id(parameter) in merger
                else "vision blocks"
                if id(parameter) in vision
                else "language model"
            )
            adapters[part] += size
            layers.add(name.split(".lora_")[0])
        else:
            head += size
    where = ", ".join(f"{part} {count:,}" for part, count in adapters.items() if count)
    head_modules = ", ".join(head_module_names(reward_model_of(model)))
    return (
        f"LoRA r={peft_config.r}, alpha={peft_config.lora_alpha} on {len(layers)} linear layers: "
        f"{sum(adapters.values()):,} adapter parameters ({where}); head ({head_modules}) {head:,}"
    )


def parameter_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    decay_parameter_names: list[str],
    vit_lr: float | None = None,
    aligner_lr: float | None = None,
) -> list[dict]:
    """Optimizer parameter groups of the trainable parameters: the rest (``learning_rate``), the vision blocks
    (``vit_lr``) and the merger (``aligner_lr``), each split into weight decay / no decay as the HF Trainer splits
    them. Parts are found by module, so the adapters inside a part belong to it. Empty groups are left out."""
    vision, merger = _vision_parts(model)
    decay = set(decay_parameter_names)
    # `rest` first: the Trainer logs the first group's rate as `learning_rate`.
    rates = {"rest": learning_rate, "vision": vit_lr or learning_rate, "merger": aligner_lr or learning_rate}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        part = "merger" if id(parameter) in merger else "vision" if id(parameter) in vision else "rest"
        groups.setdefault((part, name in decay), []).append(parameter)
    return [
        {
            "params": groups[part, decays],
            "lr": rates[part],
            "weight_decay": weight_decay if decays else 0.0,
            "name": f"{part}{'' if decays else ' (no decay)'}",
        }
        for part in rates
        for decays in (True, False)
        if (part, decays) in groups
    ]
