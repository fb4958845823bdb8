"""Model families: what differs from one VLM family to the next, one small entry each.

``family_of(config)`` picks the entry from the checkpoint's ``model_type``; ``VLRewardModel`` (``vlrm.model``), the
packed layout (``vlrm.packing``), LoRA (``vlrm.lora``) and the export (``vlrm.export``) read it. A reward model saved
by vlrm records its family's name as ``vlrm_family`` in its config.

What an entry says:

- ``model_types``: the ``config.model_type`` values it covers. The backbone class (``Qwen2_5_VLModel``,
  ``Qwen3VLModel``, ``LlavaModel``, ...) is the one transformers' ``AutoModel`` maps the config to, so an entry never
  names it.
- ``vision_tower`` / ``aligners``: where the vision encoder is inside the backbone, and the parts of it that project
  to the language model and keep training under ``freeze_vit`` (Qwen's ``merger``, Qwen3-VL's DeepStack mergers).
  A projector beside the tower (LLaVA's and Gemma 3's ``multi_modal_projector``) is an aligner too. LoRA's
  ``lora_vision: merger`` and ``aligner_lr`` mean these modules.
- ``positions``: how the language model places tokens: ``mrope`` (Qwen2-VL / Qwen2.5-VL: (time, height, width)
  sections), ``interleaved-mrope`` (Qwen3-VL, Qwen3.5: the same 3D positions, their frequencies interleaved by the
  rotary embedding), ``1d``. The packed layout reads a prompt's 3D positions from the backbone's own
  ``get_rope_index`` and puts branch token t at (prompt's largest position + 1 + t) on every axis, for all three.
- ``deepstack``: the backbone adds visual features from several vision layers to the first decoder layers at the
  image tokens (Qwen3-VL DeepStack). The packed layout hands the backbone its features in image-occurrence order
  (``mm_encoder_outputs``), so they land on the packed row's image tokens.
- ``packed``: whether the packed layout is supported, and ``padded_reason`` when it is not. ``recurrent``: the family
  has linear-attention layers (Qwen3.5's Gated DeltaNet), which the packed layout runs segment by segment so that
  each branch starts from its prompt's convolution and recurrent state (``vlrm.recurrent``).
- ``end_of_turn``: the token the family's chat template closes an assistant turn with, where the reward is read.
  The encoder always reads it from the checkpoint's own template (``vlrm.batching.chat_end_of_turn``); training
  warns when the two differ (a custom template), ``None`` (the generic path) has nothing to compare.
- ``native_classifier``: a transformers class that loads a vlrm checkpoint unchanged with the same rewards (the same
  ``model`` + ``score`` layout and last-token pooling); ``sequence_classification``: the architecture name the vLLM
  export writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

# Where generic image-text-to-text backbones keep their vision encoder and its projector, in transformers' naming.
VISION_TOWER_NAMES = ("visual", "vision_tower", "vision_model", "vision_encoder")
PROJECTOR_NAMES = ("multi_modal_projector", "connector", "mm_projector", "visual_projection")


def _has_module(root: nn.Module, name: str) -> bool:
    try:
        root.get_submodule(name)
    except AttributeError:
        return False
    return True


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    model_types: tuple[str, ...]
    positions: str = "1d"
    packed: bool = False
    padded_reason: str | None = None
    vision_tower: str | None = None  # None: the first of VISION_TOWER_NAMES the backbone has
    aligners: tuple[str, ...] = ()  # inside the vision tower
    deepstack: bool = False
    recurrent: bool = False  # linear-attention layers with a state along the sequence (vlrm.recurrent)
    moe_note: str | None = None
    end_of_turn: str | None = None
    native_classifier: str | None = None
    sequence_classification: str | None = None  # None: derived from the ForConditionalGeneration class name

    def vision_tower_name(self, backbone: nn.Module) -> str:
        """The backbone attribute that holds the vision encoder."""
        names = (self.vision_tower,) if self.vision_tower else VISION_TOWER_NAMES
        for name in names:
            if isinstance(getattr(backbone, name, None), nn.Module):
                return name
        raise ValueError(f"{type(backbone).__name__}: no vision tower found under {list(names)}")

    def aligner_names(self, backbone: nn.Module) -> list[str]:
        """Backbone-relative names of the modules that project vision features into the language model: the
        tower's own aligners (``visual.merger``) and a projector beside the tower (``multi_modal_projector``)."""
        tower = self.vision_tower_name(backbone)
        inside = [f"{tower}.{name}" for name in self.aligners]
        beside = [name for name in PROJECTOR_NAMES if isinstance(getattr(backbone, name, None), nn.Module)]
        return [name for name in inside if _has_module(backbone, name)] + beside

    def vision_parameters(self, backbone: nn.Module, prefix: str = "") -> tuple[list[str], list[str]]:
        """(vision tower without its aligners: what freeze_vit freezes, aligners) parameter names inside the
        backbone, each with ``prefix``."""
        tower = self.vision_tower_name(backbone)
        aligners = self.aligner_names(backbone)
        frozen, aligner = [], []
        for name, _ in backbone.named_parameters():
            if any(name.startswith(part + ".") for part in aligners):
                aligner.append(prefix + name)
            elif name.startswith(tower + "."):
                frozen.append(prefix + name)
        return frozen, aligner

    def classification_architecture(self, config: Any) -> str:
        """The ``*ForSequenceClassification`` name the vLLM export writes for this config."""
        if self.sequence_classification:
            return self.sequence_classification
        generation = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(config.model_type, "")
        return generation.replace("ForConditionalGeneration", "ForSequenceClassification") or "unknown"


_QWEN_MOE = (
    "the router's load-balancing loss is off, as in transformers' default (output_router_logits: false); the "
    "Bradley-Terry loss trains the experts and router through the routed tokens only"
)
_GENERIC = (
    "the packed layout needs a family entry that knows the model's positions and vision inputs; the generic path "
    "runs the padded layout, the reward at the last real token"
)

FAMILIES = (
    Family(
        "qwen2_vl", "Qwen2-VL", ("qwen2_vl",), positions="mrope", packed=True, vision_tower="visual",
        aligners=("merger",), end_of_turn="<|im_end|>", sequence_classification="Qwen2VLForSequenceClassification",
    ),
    Family(
        "qwen2_5_vl", "Qwen2.5-VL, MiMo-VL", ("qwen2_5_vl",), positions="mrope", packed=True, vision_tower="visual",
        aligners=("merger",), end_of_turn="<|im_end|>",
        sequence_classification="Qwen2_5_VLForSequenceClassification",
    ),
    Family(
        "qwen3_vl", "Qwen3-VL", ("qwen3_vl",), positions="interleaved-mrope", packed=True, vision_tower="visual",
        aligners=("merger", "deepstack_merger_list"), deepstack=True, end_of_turn="<|im_end|>",
        sequence_classification="Qwen3VLForSequenceClassification",
    ),
    Family(
        "qwen3_vl_moe", "Qwen3-VL-MoE", ("qwen3_vl_moe",), positions="interleaved-mrope", packed=True,
        vision_tower="visual", aligners=("merger", "deepstack_merger_list"), deepstack=True, moe_note=_QWEN_MOE,
        end_of_turn="<|im_end|>", sequence_classification="Qwen3VLMoeForSequenceClassification",
    ),
    Family(
        "qwen3_5", "Qwen3.5", ("qwen3_5",), positions="interleaved-mrope", packed=True, recurrent=True,
        vision_tower="visual", aligners=("merger",), end_of_turn="<|im_end|>",
        native_classifier="Qwen3_5ForSequenceClassification",
    ),
    Family(
        "qwen3_5_moe", "Qwen3.5-MoE", ("qwen3_5_moe",), positions="interleaved-mrope", packed=True, recurrent=True,
        vision_tower="visual", aligners=("merger",), moe_note=_QWEN_MOE, end_of_turn="<|im_end|>",
    ),
)  # fmt: skip
GENERIC = Family("generic", "any image-text-to-text model", (), padded_reason=_GENERIC)
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def family_named(name: str) -> Family:
    for family in (*FAMILIES, GENERIC):
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; known: {[family.name for family in (*FAMILIES, GENERIC)]}")


def family_of(config: Any) -> Family:
    """The entry for a model config (a composite VLM config, as ``AutoConfig`` reads it from a checkpoint)."""
    model_type = config.model_type
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return GENERIC
    raise ValueError(
        f"model_type {model_type!r} is not an image-text-to-text model transformers knows: vlrm loads Qwen-VL "
        f"families ({', '.join(sorted(_BY_MODEL_TYPE))}) and any AutoModelForImageTextToText checkpoint"
    )
