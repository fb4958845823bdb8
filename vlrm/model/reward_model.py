"""``VLRewardModel``: a VLM backbone (no language-model head) and a reward head, for every family.

The head (``vlrm.model.heads``: linear or MLP ``score``, last-token / mean / attention pooling, named attributes, a
learnable scale) is the one the config describes; a config without head settings is the original one, a bias-free
``score = Linear(hidden, 1)`` read at the last real token. With the padded layout that token is found from the
attention mask (so left or right padding and pad == eos are all fine); the packed layout (``vlrm.layout.packed``)
passes its positions as ``reward_index`` directly, with its ``packed_layout``. Mean and attention pooling read the
response tokens both collators list (``response_index``, ``response_owner``).

``VLRewardModel`` is the family-independent part. ``VLRewardModel.from_pretrained(path)`` and
``VLRewardModel.from_config(config)`` read the config's ``model_type``, pick its family (``vlrm.model.families``) and
build ``reward_model_class(config)``: ``VLRewardModel`` mixed into the family's own ``*PreTrainedModel``
(``Qwen3VLRewardModel``, ``LlavaRewardModel``, ...), whose backbone is the class transformers' ``AutoModel`` maps the
config to. So weight initialisation, gradient checkpointing, attention kernels, DeepSpeed ZeRO-3 loading and checkpoint
key conversions are transformers' own for that family, and ``isinstance(model, VLRewardModel)`` holds for all.

Loads:
- a reward model saved by vlrm (config + safetensors, ``architectures: ["Qwen2_5_VLRewardModel"]`` or its family's
  class, ``vlrm_family``);
- a plain VLM checkpoint (``Qwen2_5_VLForConditionalGeneration`` for Qwen2.5-VL 3B-72B and MiMo-VL-7B,
  ``Qwen3VLForConditionalGeneration``, ``Gemma3ForConditionalGeneration``, ...): ``lm_head`` is dropped and the score
  head is initialised from the current seed;
- a LoRA reward checkpoint saved by vlrm (``adapter_config.json`` with a ``vlrm`` entry, see
  ``vlrm.model.checkpoints``): its base model is loaded, the adapters and the trained head are applied and merged, and
  a plain reward model comes back (``base_model_path=`` names the base when the recorded one is not reachable here).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
from transformers.utils import ModelOutput

from vlrm.layout.packed_inputs import packed_backbone_inputs
from vlrm.model.checkpoints import is_lora_checkpoint, load_lora_reward_model
from vlrm.model.families import Family, family_of
from vlrm.model.heads import (
    POOLER,
    SCALE,
    SCORE_HEAD,
    attribute_weights,
    build_head,
    initialize_head_module,
    mean_pool,
)


@dataclass
class RewardOutput(ModelOutput):
    """``rewards``: one float32 scalar per sequence (or per ``reward_index`` entry), R in all; ``logits`` is the same
    as ``[R, 1]``, the shape TRL's reward utilities expect. ``attribute_rewards``: ``[R, A]`` float32, one column per
    ``reward_attributes`` name (``rewards`` is their weighted sum), else None. ``logit_scale``: the learnable scale
    (a float32 scalar) the objectives multiply reward differences by, else None; it is not applied to ``rewards``."""

    rewards: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    attribute_rewards: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last attended token: right padding, left padding and pad == eos alike."""
    length = attention_mask.shape[-1]
    return length - 1 - attention_mask.flip(-1).to(torch.int64).argmax(-1)


class VLRewardModel(PreTrainedModel):
    """The reward head and forward pass; concrete classes come from ``reward_model_class`` (module docstring)."""

    family: Family  # set on each concrete class
    _keys_to_ignore_on_load_unexpected = [r"(^|\.)lm_head\."]  # the generation head, wherever a family keeps it

    def __init__(self, config):
        super().__init__(config)
        config.num_labels = 1
        config.architectures = [type(self).__name__]  # Qwen2_5_VLRewardModel, ...
        config.vlrm_family = self.family.name
        self.model = AutoModel._model_mapping[type(config)](config)
        head = build_head(config)
        for name, value in head.settings.head_settings().items():  # a saved checkpoint rebuilds the same head
            setattr(config, name, value)
        self.score = head.score
        if head.pooler is not None:
            self.reward_pooler = head.pooler
        if head.scale is not None:
            self.reward_scale = head.scale
        self.reward_pooling = head.settings.reward_pooling
        self.reward_attributes = tuple(head.settings.reward_attributes or ())
        self.reward_weights = attribute_weights(head.settings)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, base_model_path=None, **kwargs):
        """Any checkpoint the module docstring lists; ``base_model_path`` is read for LoRA checkpoints only."""
        if pretrained_model_name_or_path is not None and is_lora_checkpoint(pretrained_model_name_or_path):
            if model_args or "config" in kwargs:
                raise TypeError("a LoRA checkpoint loads with its own config: pass keyword arguments only")
            return load_lora_reward_model(
                pretrained_model_name_or_path, VLRewardModel, base_model_path, merge=True, **kwargs
            )
        if cls is VLRewardModel:
            config = kwargs.get("config")
            if config is None:
                config = AutoConfig.from_pretrained(pretrained_model_name_or_path, trust_remote_code=False)
            return reward_model_class(config).from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs) -> VLRewardModel:
        """A randomly initialised reward model of ``config``'s family; ``VLRewardModel.from_config(config)`` too."""
        if cls is VLRewardModel:
            return reward_model_class(config)._from_config(config, **kwargs)
        return super()._from_config(config, **kwargs)

    from_config = _from_config

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # The head's own initialisation (vlrm.model.heads): the linear head as it always was, std 1/sqrt(hidden + 1).
        head_modules = {name: getattr(self, name, None) for name in (SCORE_HEAD, POOLER, SCALE)}
        initialize_head_module(module, head_modules, self.config.get_text_config().hidden_size)

    def vision_parameter_names(self) -> tuple[list[str], list[str]]:
        """(vision tower, aligner) parameter names: what ``freeze_vision_tower`` freezes, and what of the tower
        projects into the language model and keeps training."""
        return self.family.vision_parameters(self.model, prefix="model.")

    def freeze_vision_tower(self) -> None:
        """Freeze the vision encoder (``freeze_vit``); its aligner (Qwen's merger, Qwen3-VL's DeepStack mergers) and
        any projector outside the tower keep training."""
        frozen = set(self.vision_parameter_names()[0])
        for name, parameter in self.named_parameters():
            if name in frozen:
                parameter.requires_grad_(False)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | dict | None = None,
        reward_index: torch.LongTensor | None = None,
        packed_layout=None,
        response_index: torch.LongTensor | None = None,
        response_owner: torch.LongTensor | None = None,
        **inputs,
    ) -> RewardOutput:
        """``inputs``: what the collator gives besides ids and mask (``pixel_values``, ``image_grid_thw``,
        ``mm_token_type_ids``, a generic processor's ``token_type_ids`` / ``image_sizes`` ...), passed on."""
        inputs.pop("use_cache", None)
        inputs = {key: value for key, value in inputs.items() if value is not None}
        if packed_layout is not None:  # vlrm.layout.packed: one padding-free row; reward_index comes with it
            inputs = packed_backbone_inputs(self, input_ids, packed_layout, **inputs)
            outputs = self.model(**inputs, use_cache=False)
        else:
            outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **inputs)
        hidden_states = outputs.last_hidden_state
        batch_size, length, hidden_size = hidden_states.shape
        if reward_index is None:
            if attention_mask is None:
                reward_index = torch.full((batch_size,), length - 1, device=hidden_states.device)
            else:
                reward_index = last_token_index(attention_mask).to(hidden_states.device)
            reward_index = reward_index + torch.arange(batch_size, device=hidden_states.device) * length
        # Only the tokens the head reads go through it: no [batch, length] scores are ever materialised. With the
        # layers split over devices (device_map), the last hidden states are on the last layer's device, not the
        # input's.
        flat = hidden_states.reshape(-1, hidden_size)
        if self.reward_pooling == "last":
            selected = flat[reward_index.to(hidden_states.device)]
        else:
            selected = self._pool_responses(flat, len(reward_index), response_index, response_owner)
        scores = self.score(selected).float()  # [R, A]: one column per attribute, or the one reward
        if self.reward_attributes:
            attribute_rewards = scores
            rewards = attribute_rewards @ torch.tensor(self.reward_weights, device=scores.device)
        else:
            attribute_rewards, rewards = None, scores.squeeze(-1)
        logit_scale = self.reward_scale().float() if getattr(self, SCALE, None) is not None else None
        return RewardOutput(
            rewards=rewards, logits=rewards[:, None], attribute_rewards=attribute_rewards, logit_scale=logit_scale
        )

    def _pool_responses(
        self, flat: torch.Tensor, num_rewards: int, response_index: torch.Tensor | None, owner: torch.Tensor | None
    ) -> torch.Tensor:
        """Mean or attention pooling of each reward's response tokens (``vlrm.model.heads``), ``[num_rewards, d]`` in
        the hidden states' dtype. The sums run in float32: a bfloat16 sum over hundreds of tokens would lose the
        reward's low bits."""
        if response_index is None or owner is None:
            raise ValueError(
                f"reward_pooling: {self.reward_pooling} reads the response tokens: pass response_index and "
                "response_owner (vlrm's collators, vlrm.layout, give them with every micro-batch)"
            )
        tokens = flat[response_index.to(flat.device)].float()
        owner = owner.to(flat.device)
        pooler = getattr(self, POOLER, None)
        pooled = mean_pool(tokens, owner, num_rewards) if pooler is None else pooler(tokens, owner, num_rewards)
        return pooled.to(flat.dtype)


def _pretrained_base(backbone_class: type) -> type:
    """The family's ``*PreTrainedModel`` (``Qwen2_5_VLPreTrainedModel`` for ``Qwen2_5_VLModel``)."""
    for base in backbone_class.__mro__[1:]:
        if issubclass(base, PreTrainedModel) and base is not PreTrainedModel:
            return base
    return PreTrainedModel


def reward_model_class(config) -> type[VLRewardModel]:
    """The concrete reward model class for ``config`` (a composite VLM config), made once per family and config
    class and kept in this module under its name (``Qwen2_5_VLRewardModel``) so that it pickles."""
    family = family_of(config)
    backbone_class = AutoModel._model_mapping[type(config)]
    base = _pretrained_base(backbone_class)
    name = base.__name__.removesuffix("PreTrainedModel") + "RewardModel"
    module = sys.modules[__name__]
    if not hasattr(module, name):
        attributes = {"family": family, "config_class": type(config), "__module__": __name__}
        setattr(module, name, type(name, (VLRewardModel, base), attributes))
        # Checkpoints saved before transformers 4.52 keep `visual.*` and `model.layers.*` at the top level: load them
        # as transformers loads them into the family's ForConditionalGeneration, whose module layout ours mirrors.
        generation = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(config.model_type)
        conversion = get_checkpoint_conversion_mapping(generation) if generation else None
        if conversion is not None:
            register_checkpoint_conversion_mapping(name, copy.deepcopy(conversion), overwrite=True)
    return getattr(module, name)
