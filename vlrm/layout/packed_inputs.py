"""Model inputs for a packed row: image features placed once per occurrence, 3D positions per prompt node.

``packed_backbone_inputs`` gives the keyword arguments of the backbone's forward for one packed row; the vision tower
runs here, once per distinct image and with its usual attention (it never sees the layout).
"""

from __future__ import annotations

from typing import Any

import torch

from vlrm.layout.attention import uses_packed_attention
from vlrm.layout.segments import PackedLayout

# ever built for a packed row; the packed attention reads the layout instead and never looks at it.
PACKED_ROW_MASK = torch.ones(1, 1, 0, 0, dtype=torch.bool)


def packed_position_ids(
    backbone: Any,
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    layout: PackedLayout,
) -> torch.Tensor:
    """``[3, 1, T]`` positions (mRoPE and interleaved mRoPE alike): each prompt as the backbone's ``get_rope_index``
    places it alone, each branch right after its prompt's largest position."""
    device = input_ids.device
    grids = image_grid_thw[layout.image_order] if image_grid_thw is not None else None
    pieces = []
    for (start, end), (first_image, last_image), spans in zip(
        layout.prompt_spans, layout.node_images, layout.branch_spans, strict=True
    ):
        if last_image > first_image:
            positions, _ = backbone.get_rope_index(
                input_ids[:, start:end],
                mm_token_type_ids=mm_token_type_ids[:, start:end],
                image_grid_thw=grids[first_image:last_image],
            )
            positions = positions[:, 0]
            next_position = positions.max() + 1
        else:  # text only: what get_rope_index gives too
            positions = torch.arange(end - start, device=device).expand(3, -1)
            next_position = end - start
        pieces.append(positions)
        pieces += [next_position + torch.arange(e - s, device=device).expand(3, -1) for s, e in spans]
    return torch.cat(pieces, dim=1)[:, None]


def image_features_by_occurrence(backbone: Any, pixel_values, image_grid_thw, layout: PackedLayout) -> Any:
    """The vision tower's output for the distinct images, reordered to one entry per image occurrence in the row:
    ``pooler_output`` (and Qwen3-VL's DeepStack ``deepstack_features``, one tuple per vision layer) as the backbone's
    ``mm_encoder_outputs`` takes them, so it places every feature on its image tokens itself."""
    features = backbone.get_image_features(pixel_values, image_grid_thw, return_dict=True)
    if layout.deduplicated_images:
        order = layout.image_order.tolist()
        features.pooler_output = tuple(features.pooler_output[index] for index in order)
        if getattr(features, "deepstack_features", None) is not None:
            features.deepstack_features = [
                tuple(layer[index] for index in order) for layer in features.deepstack_features
            ]
    return features


def packed_backbone_inputs(
    model: Any,
    input_ids: torch.Tensor,
    layout: PackedLayout,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Keyword arguments for the backbone's forward (``Qwen2VLModel``, ``Qwen2_5_VLModel``, ``Qwen3VLModel``,
    ``Qwen3VLMoeModel``) on a packed row of ``model``, a ``VLRewardModel`` of a family with the packed layout.

    The vision tower runs here, once per distinct image and with its usual attention (it never sees the layout)."""
    if not uses_packed_attention(model):
        raise ValueError(
            f"the packed layout needs the packed attention, but the language model uses "
            f"{model.config.get_text_config()._attn_implementation!r}: call "
            "vlrm.layout.attention.enable_packed_attention(model) after loading"
        )
    if input_ids.shape[0] != 1 or input_ids.shape[1] != layout.num_tokens:
        raise ValueError(f"a packed row has shape [1, {layout.num_tokens}], got input_ids {list(input_ids.shape)}")
    backbone = model.model
    layout = layout.to(input_ids.device)  # a copy: the mask cache starts empty every forward
    if mm_token_type_ids is None:
        mm_token_type_ids = (input_ids == model.config.image_token_id).long()
    inputs = {
        "input_ids": input_ids,
        "position_ids": packed_position_ids(backbone, input_ids, mm_token_type_ids, image_grid_thw, layout),
        "attention_mask": PACKED_ROW_MASK.to(input_ids.device),
        "packed_layout": layout,
    }
    if pixel_values is not None:
        inputs["mm_encoder_outputs"] = {
            "image": image_features_by_occurrence(backbone, pixel_values, image_grid_thw, layout)
        }
    return inputs
