"""Reward heads: the projection (``score``), the pooling of the response tokens, named attributes, a learnable scale.

    python train_rm.py training_configs/tiny_demo.yaml --score_head mlp                  # BaseReward's MLP-SiLU head
    python train_rm.py training_configs/tiny_demo.yaml --reward_pooling attention --learnable_reward_scale true
    python train_rm.py CONFIG --reward_attributes helpfulness visual_faithfulness ethical_considerations \
        --loss_type mse                                                                  # VLFeedback's three aspects

The keys are ``HeadArguments``, part of every ``TrainConfig``. ``train_rm.py`` writes them into the model's config
(``HEAD_FIELDS``) before the model is built, so every checkpoint rebuilds its own head and every consumer (the
scorer, eval_rm.py, the GRPO reward function, the server, LoRA, resume) loads it without being told; a config
without them is the linear head read at the last token, what vlrm trained before heads were configurable.

What each part computes, for R rewards of a micro-batch (either layout; ``vlrm.layout.labels``):

- **pooling** (``reward_pooling``), hidden states -> one vector per reward: ``last`` reads the end-of-turn token that
  closes the response (``reward_index``); ``mean`` averages the response's tokens, end-of-turn included;
  ``attention`` weights them by ``softmax_t(h_t . q / sqrt(d))`` with a learned query ``q`` (``reward_pooler.query``)
  initialised at zero, so training starts from mean pooling (LightRFT's ``srm_trainer_vl`` pools with attention;
  it beat last-token pooling on HPDv3). Both read ``response_index`` / ``response_owner``, with ``index_add`` /
  ``scatter_reduce`` over the flat token axis: no loop over rows, and the same tokens in the same order in both
  layouts, so packed = padded holds for them as for the last token.
- **projection** (``score_head``): ``linear``: ``score = Linear(hidden, A, bias=False)``; for the default A = 1 exactly
  the ``score.weight`` [1, hidden] that existing checkpoints, the vLLM export and the demo hold. ``mlp``:
  ``score = Sequential(Linear(hidden, h), SiLU, ..., Linear(h, A, bias=False))`` with ``score_head_layers`` linear
  layers (BaseReward, arXiv 2509.16127: a 2-layer MLP with SiLU beat a linear head on Qwen2.5-VL, more layers gained
  nothing; MR2, arXiv 2604.10966, uses one too). The last layer has no bias, as the linear head: under a pairwise loss
  a constant offset of the reward is never trained.
- **attributes** (``reward_attributes``): A named outputs, one reward each (``attribute_rewards`` [R, A]); the scalar
  reward is their weighted sum, ``rewards = attribute_rewards @ w`` with ``reward_weights`` (default 1/A each).
  VideoReward (arXiv 2501.13918) trains three named heads and sums them; VLFeedback rates helpfulness, visual
  faithfulness and ethical considerations.
- **learnable scale** (``learnable_reward_scale``): ``logit_scale = exp(s)``, ``s`` = ``reward_scale.log_scale``
  initialised at 0 (a scale of 1) and clipped at 100 as CLIP's learnable temperature is (Radford et al. 2021); the
  objectives multiply reward differences / logits by it (LightRFT: BT 60.5 -> 69.7). It never changes the reward the
  model outputs, so the scorer, the server and the vLLM export ignore it.

The parameters live under three top-level names, so that LoRA's ``modules_to_save`` trains and saves each whole
(``head_module_names``): ``score`` (the projection), ``reward_pooler`` (attention pooling only) and ``reward_scale``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import torch
from torch import nn

from vlrm.errors import ConfigError

SCORE_HEAD = "score"
POOLER = "reward_pooler"
SCALE = "reward_scale"
HEAD_MODULES = (SCORE_HEAD, POOLER, SCALE)
MAX_LOGIT_SCALE = 100.0  # CLIP clips its learned temperature here: a larger scale made training unstable there
HEAD_FIELDS = (
    "score_head", "score_head_hidden_size", "score_head_layers", "reward_pooling", "reward_attributes",
    "reward_weights", "learnable_reward_scale",
)  # fmt: skip


@dataclass
class HeadArguments:
    """The reward head (module docstring); ``TrainConfig`` inherits these fields and ``train_rm.py`` writes them into
    the model's config."""

    score_head: Literal["linear", "mlp"] = field(
        default="linear",
        metadata={
            "help": "The projection from the pooled hidden state to the reward: `linear` (one bias-free Linear, "
            "vlrm's original head) or `mlp` (Linear layers with SiLU between, as BaseReward, arXiv 2509.16127)."
        },
    )
    score_head_hidden_size: int | None = field(
        default=None,
        metadata={
            "help": "Width of the MLP head's hidden layers (score_head: mlp). None: the backbone's hidden size."
        },
    )
    score_head_layers: int = field(
        default=2,
        metadata={
            "help": "Linear layers of the MLP head (score_head: mlp), SiLU between them; at least 2. BaseReward found "
            "2 best: more layers gained nothing."
        },
    )
    reward_pooling: Literal["last", "mean", "attention"] = field(
        default="last",
        metadata={
            "help": "What the head reads: `last` the end-of-turn token that closes the response; `mean` the mean of "
            "the response's tokens; `attention` a learned softmax weighting of them (a query vector, initialised at "
            "zero, so it starts as `mean`; LightRFT's srm_trainer_vl)."
        },
    )
    reward_attributes: list[str] | None = field(
        default=None,
        metadata={
            "help": "Named rewards, one output each (e.g. helpfulness, visual_faithfulness, ethical_considerations: "
            "VLFeedback's aspects; VideoReward, arXiv 2501.13918, trains three). The scalar reward is their "
            "weighted sum (reward_weights). None: one reward."
        },
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "One weight per reward_attributes entry: the scalar reward is sum_a w_a r_a. None: 1/A each."
        },
    )
    learnable_reward_scale: bool = field(
        default=False,
        metadata={
            "help": "Learn a scale exp(s) (s initialised at 0, the scale clipped at 100 as CLIP's temperature) that "
            "the objectives multiply reward differences and logits by (LightRFT). The model's rewards are unchanged."
        },
    )

    def _check_head_arguments(self) -> None:
        """Settings that cannot work raise ``ConfigError`` (``_check_head_values``); MLP settings on a linear head
        warn. When ``model_name_or_path`` (a ``TrainConfig`` field) is a local vlrm reward model, its head must be
        the one these settings describe (``check_same_head``): this fails before any data is prepared."""
        self._check_head_values()
        if self.score_head != "mlp" and (self.score_head_hidden_size is not None or self.score_head_layers != 2):
            warnings.warn(
                "score_head_hidden_size / score_head_layers shape the MLP head and have no effect with score_head: "
                f"{self.score_head}. Set score_head: mlp to use them.",
                stacklevel=3,
            )
        model = getattr(self, "model_name_or_path", None)
        config = _local_config(model) if model else None
        if config is not None:
            check_same_head(config, self, model)

    def _check_head_values(self) -> None:
        for name, hint in get_type_hints(HeadArguments).items():
            if get_origin(hint) is Literal and getattr(self, name) not in get_args(hint):
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of: {', '.join(get_args(hint))}.")
        if self.score_head_hidden_size is not None and self.score_head_hidden_size < 1:
            raise ConfigError(f"score_head_hidden_size must be at least 1, got {self.score_head_hidden_size}.")
        if self.score_head == "mlp" and self.score_head_layers < 2:
            raise ConfigError(
                f"score_head_layers must be at least 2 for an MLP head, got {self.score_head_layers} (one layer is "
                "score_head: linear)."
            )
        attributes = self.reward_attributes
        if attributes is not None:
            if not attributes or not all(isinstance(name, str) and name.strip() for name in attributes):
                raise ConfigError(f"reward_attributes must be a non-empty list of names, got {attributes!r}.")
            if len(set(attributes)) != len(attributes):
                raise ConfigError(f"reward_attributes has repeated names: {list(attributes)}.")
        if self.reward_weights is not None:
            if attributes is None:
                raise ConfigError("reward_weights combine reward_attributes: set reward_attributes too, or unset it.")
            if len(self.reward_weights) != len(attributes):
                raise ConfigError(
                    f"reward_weights has {len(self.reward_weights)} entries for {len(attributes)} reward_attributes: "
                    "give one per attribute."
                )
            if not all(math.isfinite(weight) for weight in self.reward_weights) or not any(self.reward_weights):
                raise ConfigError(f"reward_weights must be finite and not all 0, got {list(self.reward_weights)}.")

    def head_settings(self) -> dict[str, Any]:
        """The ``HEAD_FIELDS`` values, as written into a model config."""
        values = {name: getattr(self, name) for name in HEAD_FIELDS}
        for name in ("reward_attributes", "reward_weights"):  # a tuple from the command line saves as a list
            values[name] = None if values[name] is None else list(values[name])
        return values


def _local_config(model_name_or_path: str) -> dict | None:
    """The config.json of a local model dir as a dict (no transformers class needed), else None."""
    path = Path(model_name_or_path).expanduser() / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # an unreadable config fails later with the loader's own message


def _value(config: Any, name: str, default: Any = None) -> Any:
    """A field of a model config given as a transformers config or as the dict of its config.json."""
    return config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)


def _hidden_size(config: Any) -> int | None:
    """The backbone's hidden size (the language model's, where the reward is read)."""
    if isinstance(config, Mapping):
        return (config.get("text_config") or config).get("hidden_size")
    return config.get_text_config().hidden_size


def head_settings_of(config: Any) -> HeadArguments:
    """The head a model config describes (defaults for the fields it lacks: an older checkpoint's linear / last
    head), checked. Raises ``ConfigError`` for a config written with impossible settings."""
    defaults = HeadArguments()
    values = {name: _value(config, name) for name in HEAD_FIELDS}
    values = {name: getattr(defaults, name) if value is None else value for name, value in values.items()}
    settings = HeadArguments(**values)
    settings._check_head_values()  # not the warnings: a saved head is what it is
    return settings


def head_signature(settings: HeadArguments, hidden_size: int | None) -> dict[str, Any]:
    """What decides a head's parameters and its rewards: the settings with the defaults resolved (the MLP's width,
    equal weights), and the MLP-only ones left out of a linear head."""
    signature = {"score_head": settings.score_head, "reward_pooling": settings.reward_pooling}
    if settings.score_head == "mlp":
        signature["score_head_hidden_size"] = settings.score_head_hidden_size or hidden_size
        signature["score_head_layers"] = settings.score_head_layers
    signature["reward_attributes"] = list(settings.reward_attributes or []) or None
    signature["reward_weights"] = attribute_weights(settings)
    signature["learnable_reward_scale"] = settings.learnable_reward_scale
    return signature


def check_same_head(config: Any, settings: HeadArguments, source: str) -> None:
    """Raise ``ConfigError`` when ``config`` (a model config, or its config.json as a dict) is a vlrm reward model
    whose head differs from ``settings``, naming each difference; a plain VLM's config has no head to differ."""
    if _value(config, "vlrm_family") is None:
        return
    hidden_size = _hidden_size(config)
    saved, asked = head_signature(head_settings_of(config), hidden_size), head_signature(settings, hidden_size)
    differences = [f"{name}: {saved.get(name)!r} (asked: {asked.get(name)!r})"
                   for name in dict.fromkeys([*saved, *asked]) if saved.get(name) != asked.get(name)]  # fmt: skip
    if differences:
        raise ConfigError(
            f"{source} is a vlrm reward model whose head differs from this config's: {'; '.join(differences)}. To go "
            "on training it, set these keys to the checkpoint's values; for another head, start from its base model."
        )


def configure_head(model_config: Any, settings: HeadArguments, source: str) -> None:
    """Write ``settings`` into ``model_config`` (``HEAD_FIELDS``) before the model is built from it; raises
    ``ConfigError`` when ``model_config`` is a vlrm reward model with another head (``check_same_head``)."""
    check_same_head(model_config, settings, source)
    for name, value in settings.head_settings().items():
        setattr(model_config, name, value)


def attribute_weights(settings: HeadArguments) -> list[float] | None:
    """The weights of the attributes in the scalar reward (1/A each by default), or None without attributes."""
    if not settings.reward_attributes:
        return None
    if settings.reward_weights is not None:
        return [float(weight) for weight in settings.reward_weights]
    return [1.0 / len(settings.reward_attributes)] * len(settings.reward_attributes)


# ----------------------------------------------------------------------------------------------------------------------
# Modules


class AttentionPooler(nn.Module):
    """``pooled_r = sum_t softmax_t(h_t . q / sqrt(d)) h_t`` over the tokens of reward r (module docstring)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, tokens: torch.Tensor, owner: torch.Tensor, num_rewards: int) -> torch.Tensor:
        """``tokens`` [M, d] float32, ``owner`` [M] (the reward each token belongs to) -> [R, d]."""
        logits = tokens @ self.query.to(tokens.dtype) / math.sqrt(tokens.shape[-1])
        # Softmax per reward over a flat axis: subtract each reward's largest logit (no gradient needed through it:
        # the softmax does not depend on the shift), exponentiate, normalise by the per-reward sums.
        largest = torch.full((num_rewards,), -math.inf, dtype=logits.dtype, device=logits.device)
        largest = largest.scatter_reduce(0, owner, logits.detach(), reduce="amax", include_self=True)
        weights = torch.exp(logits - largest[owner])
        totals = torch.zeros(num_rewards, dtype=weights.dtype, device=weights.device).index_add(0, owner, weights)
        weights = weights / totals[owner]
        pooled = torch.zeros(num_rewards, tokens.shape[-1], dtype=tokens.dtype, device=tokens.device)
        return pooled.index_add(0, owner, weights[:, None] * tokens)


def mean_pool(tokens: torch.Tensor, owner: torch.Tensor, num_rewards: int) -> torch.Tensor:
    """The mean of each reward's tokens: ``tokens`` [M, d], ``owner`` [M] -> [R, d]."""
    sums = torch.zeros(num_rewards, tokens.shape[-1], dtype=tokens.dtype, device=tokens.device)
    sums = sums.index_add(0, owner, tokens)
    counts = torch.bincount(owner, minlength=num_rewards).to(tokens.dtype)
    return sums / counts[:, None]


class RewardScale(nn.Module):
    """The learnable logit scale ``exp(log_scale)``, clipped at ``MAX_LOGIT_SCALE`` (CLIP, Radford et al. 2021).

    A module (not a bare parameter) so that LoRA's ``modules_to_save`` can name it and DeepSpeed ZeRO-3 gathers its
    parameter when it is called. The parameter has shape [1], not [], as ZeRO-3 partitions every parameter."""

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(1))

    def forward(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()[0]


@dataclass
class RewardHead:
    """The head modules of one model config; ``pooler`` / ``scale`` are None when not asked for."""

    settings: HeadArguments
    score: nn.Module
    pooler: nn.Module | None
    scale: nn.Module | None


def build_head(config: Any) -> RewardHead:
    """The head a model config describes (``head_settings_of``): the ``score`` projection (linear, or the MLP as an
    ``nn.Sequential``: ``score.0``, ``score.2``, ... are its Linear layers), the attention pooler and the scale."""
    settings = head_settings_of(config)
    hidden_size = _hidden_size(config)
    outputs = len(settings.reward_attributes or [None])
    if settings.score_head == "linear":
        score = nn.Linear(hidden_size, outputs, bias=False)
    else:
        width = settings.score_head_hidden_size or hidden_size
        layers: list[nn.Module] = []
        for index in range(settings.score_head_layers - 1):
            layers += [nn.Linear(hidden_size if index == 0 else width, width), nn.SiLU()]
        score = nn.Sequential(*layers, nn.Linear(width, outputs, bias=False))
    pooler = AttentionPooler(hidden_size) if settings.reward_pooling == "attention" else None
    scale = RewardScale() if settings.learnable_reward_scale else None
    return RewardHead(settings, score, pooler, scale)


def initialize_head_module(module: nn.Module, head_modules: dict[str, nn.Module | None], hidden_size: int) -> bool:
    """Initialise ``module`` when it is one of the head's top-level modules (``head_modules``: name -> module);
    returns whether it was. The output layer is drawn with std 1/sqrt(fan_in + 1), which keeps initial rewards O(1)
    (Stiennon et al. 2020, summarize_from_feedback: std 1/sqrt(hidden + 1) for their linear head); an MLP's hidden
    layers with std 1/sqrt(fan_in) (LeCun), so each hidden unit starts O(1) too, and zero biases; the attention query
    and the log scale at 0 (mean pooling, a scale of 1)."""
    if module is head_modules.get(SCORE_HEAD):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=1.0 / (hidden_size + 1) ** 0.5)
            return True
        linears = [layer for layer in module.modules() if isinstance(layer, nn.Linear)]
        for layer in linears[:-1]:
            nn.init.normal_(layer.weight, std=1.0 / layer.in_features**0.5)
            nn.init.zeros_(layer.bias)
        nn.init.normal_(linears[-1].weight, std=1.0 / (linears[-1].in_features + 1) ** 0.5)
        return True
    if module is head_modules.get(POOLER):
        nn.init.zeros_(module.query)
        return True
    if module is head_modules.get(SCALE):
        nn.init.zeros_(module.log_scale)
        return True
    return False


def head_module_names(model: nn.Module) -> list[str]:
    """The top-level head modules a reward model has (``score``, and ``reward_pooler`` / ``reward_scale`` when its
    head has them): what LoRA trains in full and saves beside the adapters."""
    return [name for name in HEAD_MODULES if getattr(model, name, None) is not None]


def vllm_head_problems(config: Any) -> list[str]:
    """Why vLLM's sequence-classification runner (the backbone and one ``Linear(hidden, 1)`` read at the last token)
    cannot compute this config's rewards: one reason per part it cannot express; empty when it can. The learnable
    scale is not one: it only multiplies the training loss's logits, never the reward."""
    settings = head_settings_of(config)
    problems = []
    if settings.score_head != "linear":
        problems.append(f"score_head: {settings.score_head} (vLLM's classifier is one Linear layer)")
    if settings.reward_pooling != "last":
        problems.append(f"reward_pooling: {settings.reward_pooling} (vLLM reads the last token only)")
    if settings.reward_attributes:
        problems.append(
            f"reward_attributes: {list(settings.reward_attributes)} (vLLM's runner returns one reward, and the "
            "weighted sum of several heads is not a weight it loads)"
        )
    return problems
