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
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[3, 1, T]`` positions (mRoPE and interleaved mRoPE alike): each prompt as the backbone's ``get_rope_index``
    places it alone (its images' and videos' grids, a video's seconds per temporal patch), each branch right after
    its prompt's largest position."""
    device = input_ids.device
    grids = image_grid_thw[layout.image_order] if image_grid_thw is not None else None
    video_grids = video_grid_thw[layout.video_order] if video_grid_thw is not None else None
    seconds = second_per_grid_ts[layout.video_order] if second_per_grid_ts is not None else None
    node_videos = layout.node_videos or [(0, 0)] * len(layout.prompt_spans)
    pieces = []
    for (start, end), (first_image, last_image), (first_video, last_video), spans in zip(
        layout.prompt_spans, layout.node_images, node_videos, layout.branch_spans, strict=True
    ):
        if last_image > first_image or last_video > first_video:
            media = {}
            if last_video > first_video:
                media["video_grid_thw"] = video_grids[first_video:last_video]
                if seconds is not None:
                    media["second_per_grid_ts"] = seconds[first_video:last_video]
            positions, _ = backbone.get_rope_index(
                input_ids[:, start:end],
                mm_token_type_ids=mm_token_type_ids[:, start:end],
                image_grid_thw=grids[first_image:last_image] if last_image > first_image else None,
                **media,
            )
            positions = positions[:, 0]
            next_position = positions.max() + 1
        else:  # text only: what get_rope_index gives too
            positions = torch.arange(end - start, device=device).expand(3, -1)
            next_position = end - start
        pieces.append(positions)
        pieces += [next_position + torch.arange(e - s, device=device).expand(3, -1) for s, e in spans]
    return torch.cat(pieces, dim=1)[:, None]


def image_features_by_occurrence(
    backbone: Any, pixel_values, image_grid_thw, layout: PackedLayout, kind: str = "image"
) -> Any:
    """The vision tower's output for the distinct images (``kind`` "video": videos), reordered to one entry per
    occurrence in the row: ``pooler_output`` (and Qwen3-VL's DeepStack ``deepstack_features``, one tuple per vision
    layer) as the backbone's ``mm_encoder_outputs`` takes them, so it places every feature on its tokens itself."""
    if kind == "video":
        features = backbone.get_video_features(pixel_values, image_grid_thw, return_dict=True)
        deduplicated, order = layout.deduplicated_videos, layout.video_order
    else:
        features = backbone.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        deduplicated, order = layout.deduplicated_images, layout.image_order
    if deduplicated:
        order = order.tolist()
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
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
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
        if getattr(model.config, "video_token_id", None) is not None:
            mm_token_type_ids = mm_token_type_ids + 2 * (input_ids == model.config.video_token_id).long()
    positions = packed_position_ids(
        backbone, input_ids, mm_token_type_ids, image_grid_thw, layout, video_grid_thw, second_per_grid_ts
    )
    inputs = {
        "input_ids": input_ids,
        "position_ids": positions,
        "attention_mask": PACKED_ROW_MASK.to(input_ids.device),
        "packed_layout": layout,
    }
    encoder_outputs = {}
    if pixel_values is not None:
        encoder_outputs["image"] = image_features_by_occurrence(backbone, pixel_values, image_grid_thw, layout)
    if pixel_values_videos is not None:
        encoder_outputs["video"] = image_features_by_occurrence(
            backbone, pixel_values_videos, video_grid_thw, layout, kind="video"
        )
    if encoder_outputs:
        inputs["mm_encoder_outputs"] = encoder_outputs
    return inputs
