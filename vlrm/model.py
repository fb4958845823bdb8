"""``VLRewardModel``: a Qwen2.5-VL backbone (no language-model head) and a scalar ``score`` head.

The reward of a sequence is the score at its last real token. With the padded layout that token is found from the
attention mask (so left or right padding and pad == eos are all fine); the packed layout (``vlrm.packing``) passes its
positions as ``reward_index`` directly, with its ``packed_layout``.

Loads, with ``VLRewardModel.from_pretrained(path)``:
- a reward model saved by vlrm (config + safetensors, ``architectures: ["VLRewardModel"]``);
- a plain ``Qwen2_5_VLForConditionalGeneration`` checkpoint (Qwen2.5-VL 3B/7B/32B/72B, MiMo-VL-7B): ``lm_head`` is
  dropped and the score head is initialised from the current seed;
- a LoRA reward checkpoint saved by vlrm (``adapter_config.json`` with a ``vlrm`` entry, see ``vlrm.lora``): its base
  model is loaded, the adapters and the trained head are applied and merged, and a plain ``VLRewardModel`` comes back
  (``base_model_path=`` names the base when the recorded one is not reachable here).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Qwen2_5_VLConfig
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel, Qwen2_5_VLPreTrainedModel
from transformers.utils import ModelOutput

from vlrm.lora import is_lora_checkpoint, load_lora_reward_model
from vlrm.packing import packed_backbone_inputs

# Checkpoints saved before transformers 4.52 keep `visual.*` and `model.layers.*` at the top level; load them the way
# transformers loads them into Qwen2_5_VLForConditionalGeneration, whose module layout ours mirrors.
register_checkpoint_conversion_mapping(
    "VLRewardModel",
    copy.deepcopy(get_checkpoint_conversion_mapping("Qwen2_5_VLForConditionalGeneration")),
    overwrite=True,
)


@dataclass
class RewardOutput(ModelOutput):
    """``rewards``: one float32 scalar per sequence (or per ``reward_index`` entry); ``logits`` is the same as
    ``[N, 1]``, the shape TRL's reward utilities expect."""

    rewards: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last attended token: right padding, left padding and pad == eos alike."""
    length = attention_mask.shape[-1]
    return length - 1 - attention_mask.flip(-1).to(torch.int64).argmax(-1)


class VLRewardModel(Qwen2_5_VLPreTrainedModel):
    config_class = Qwen2_5_VLConfig
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

    def __init__(self, config: Qwen2_5_VLConfig):
        super().__init__(config)
        config.num_labels = 1
        config.architectures = [type(self).__name__]
        self.model = Qwen2_5_VLModel(config)
        self.score = nn.Linear(config.text_config.hidden_size, 1, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, base_model_path=None, **kwargs):
        """Any checkpoint the module docstring lists; ``base_model_path`` is read for LoRA checkpoints only."""
        if pretrained_model_name_or_path is not None and is_lora_checkpoint(pretrained_model_name_or_path):
            if model_args or "config" in kwargs:
                raise TypeError("a LoRA checkpoint loads with its own config: pass keyword arguments only")
            return load_lora_reward_model(pretrained_model_name_or_path, base_model_path, merge=True, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is getattr(self, "score", None):
            # std 1/sqrt(hidden + 1) keeps initial rewards O(1) (Stiennon et al. 2020, summarize_from_feedback).
            nn.init.normal_(module.weight, std=1.0 / (self.config.text_config.hidden_size + 1) ** 0.5)

    def freeze_vision_tower(self) -> None:
        """Freeze the patch embedding and the vision blocks. The merger (vision -> language projection) trains."""
        visual = self.model.visual
        for module in (visual.patch_embed, visual.blocks):
            module.requires_grad_(False)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | dict | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        reward_index: torch.LongTensor | None = None,
        packed_layout=None,
        **kwargs,
    ) -> RewardOutput:
        kwargs.pop("use_cache", None)
        if packed_layout is not None:  # vlrm.packing: one padding-free row; reward_index comes with it
            backbone_inputs = packed_backbone_inputs(
                self.model, input_ids, pixel_values, image_grid_thw, mm_token_type_ids, packed_layout
            )
            outputs = self.model(**backbone_inputs, use_cache=False, **kwargs)
        else:
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                image_grid_thw=image_grid_thw,
                mm_token_type_ids=mm_token_type_ids,
                position_ids=position_ids,
                use_cache=False,
                **kwargs,
            )
        hidden_states = outputs.last_hidden_state
        batch_size, length, hidden_size = hidden_states.shape
        if reward_index is None:
            if attention_mask is None:
                reward_index = torch.full((batch_size,), length - 1, device=hidden_states.device)
            else:
                reward_index = last_token_index(attention_mask)
            reward_index = reward_index + torch.arange(batch_size, device=hidden_states.device) * length
        # Only the reward tokens go through the head: no [batch, length] scores are ever materialised.
        selected = hidden_states.reshape(-1, hidden_size)[reward_index]
        rewards = self.score(selected).squeeze(-1).float()
        return RewardOutput(rewards=rewards, logits=rewards[:, None])
