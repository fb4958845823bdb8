"""The field's benchmarks, by their own protocols: how their rows map onto canonical rows, and their reference numbers.

Each benchmark's rows are recognised by their fields (``benchmark_of``), or named with the eval config's
``benchmark`` key, and mapped here onto the canonical row plus what the protocol needs: a ``category`` (the
benchmark's own grouping), a ``group`` (pairs that must all be right for Acc+) and ``preferred_position`` (where the
preferred answer stood in the source row, for the position-bias diagnostic).

- **VL-RewardBench** (Li et al. 2024, arXiv 2411.17451): ``id, query, image, response[2], human_ranking,
  query_source``. The lower rank wins. Categories: general = vlfeedback + wildvision-battle, hallucination = povid +
  rlhf-v + rlaif-v, reasoning = reasoning_tasks (from ``query_source``, else the id's prefix). Reports Overall (micro
  accuracy) and Macro (mean of the three categories).
- **Multimodal RewardBench** (Yasunaga et al. 2025, arXiv 2502.14191): ``ID, Text, Image, Output1, Output2, Better,
  Category`` (or ``Meta: {Category}``). ``Better`` names the preferred output. Reports per-category and overall.
- **MM-RLHF-RewardBench** (Zhang et al. 2025, arXiv 2502.10391; ``mm_reward_bench.jsonl`` of the HF dataset
  yifanzhang114/MM-RLHF-RewardBench): ``id, image, video, prompt, chosen, rejected, chosen_reason, rejected_reason``;
  several pairs share an ``id`` (one question, several rejected answers). Recognised by ``id``, ``prompt`` and
  ``video`` together, or by ``chosen_reason`` / ``rejected_reason``. As its evaluation script scores a row (MM-RLHF's
  ``llava/eval/eval_mm_reward_bench.py``), a row with an ``image`` is scored on the image, else on its ``video`` (a
  path relative to the data file, bytes or a ``{"bytes", "path"}`` dict): the video becomes the row's one video,
  placed before the prompt's text as the script places it, and its pairs count in Acc and Acc+ as image pairs do.
  The category is the first of ``mcq, long, short, safety, video`` found in the row's media path, as its
  ``cal_performance_mmreweard_bench.py`` groups them (none found: uncategorised). Reports Acc (ties wrong) and Acc+
  (an ``id``'s group counts only if all its pairs are right), overall and per category. Its evaluation script reads a
  video as a **folder of frames** (32 drawn evenly); vlrm reads video files, bytes or frame lists
  (``vlrm.data.videos``), and the HF release ships ``images/`` but no videos: give each video row a clip (or its
  frames as a list) where ``video`` points, or count the rows out with ``on_bad_sample: skip`` (a missing video is a
  bad row: ``FILE: row N: field `videos`: video file not found``).
- **VideoRewardBench** (Zhang et al. 2025, arXiv 2509.00484): 1,563 (video-text prompt, chosen, rejected) triplets
  in five dimensions: long-form perception (283), short-form perception (413), knowledge (238), reasoning (278) and
  safety (351). Reports overall accuracy (micro: its Table 4's overall is the pair-weighted mean of the five
  dimensions, to the table's rounding) and the accuracy per dimension; vlrm adds their unweighted mean (macro), as
  for VL-RewardBench. **Layout designed here, not read from a release**: no data card or evaluation script of the
  benchmark was within reach when this was written (its data is said to be the HF dataset
  Dragonriser/VideoRewardBench), so vlrm reads the paper's triplets as ``{"id", "video" | "videos", "prompt" |
  "question" | "query", "chosen", "rejected", "dimension"}``, recognised by ``dimension`` beside a video and a pair
  (or named with ``benchmark: videorewardbench``, which also takes the dimension from ``category``). A dimension is
  matched by its words (``Long-form Perception``, ``long_perception`` and ``long`` are the first dimension), anything
  else is a bad row naming the field. Check the release's field names against this before a first run.
"""

from __future__ import annotations

import re
from typing import Any

from vlrm.errors import RowProblem

VL_REWARDBENCH, MULTIMODAL_REWARDBENCH, MM_RLHF_REWARDBENCH = "vl_rewardbench", "multimodal_rewardbench", "mm_rlhf"
VIDEO_REWARDBENCH = "videorewardbench"
BENCHMARKS = (VL_REWARDBENCH, MULTIMODAL_REWARDBENCH, MM_RLHF_REWARDBENCH, VIDEO_REWARDBENCH)

VL_REWARDBENCH_CATEGORIES = {
    "vlfeedback": "general",
    "wildvision-battle": "general",
    "povid": "hallucination",
    "rlhf-v": "hallucination",
    "rlaif-v": "hallucination",
    "reasoning_tasks": "reasoning",
}

# MM-RLHF-RewardBench's categories: the first of these words in a row's image or video path, in this order (its
# cal_performance_mmreweard_bench.py tries them so).
MM_RLHF_CATEGORIES = ("mcq", "long", "short", "safety", "video")

# VideoRewardBench's five dimensions (arXiv 2509.00484), each with the word that names it in any spelling, and its
# number of pairs (1,563 in all): the weights that make its overall accuracy the micro mean of the dimensions.
VIDEO_REWARDBENCH_DIMENSIONS = {
    "long-form perception": ("long", 283),
    "short-form perception": ("short", 413),
    "knowledge": ("knowledge", 238),
    "reasoning": ("reason", 278),
    "safety": ("safe", 351),
}


def _video_rewardbench_row(model: str, overall: float, per_dimension: tuple[float, ...]) -> dict[str, Any]:
    """One model's row of VideoRewardBench's Table 4: overall and the five dimensions as published; the macro is
    their mean, computed here (the table has no macro column)."""
    return {
        "model": model,
        "overall": overall,
        "macro": round(sum(per_dimension) / len(per_dimension), 1),
        "per_category": dict(zip(VIDEO_REWARDBENCH_DIMENSIONS, per_dimension, strict=True)),
        "source": "arXiv 2509.00484, Table 4; macro computed",
    }


# Published numbers, in percent, with where each comes from. Printed beside our checkpoints' results when a dataset is
# recognised: ``overall`` and ``macro`` always (None: not published), ``acc_plus`` and ``per_category`` where the
# benchmark reports them. The VL-RewardBench values are those this project's tracker cites from the Skywork-VL Reward
# paper's VL-RewardBench table (arXiv 2505.07263) and the IXC-2.5-Reward paper (arXiv 2501.12368): check a number
# against its table before quoting it (the VL-RewardBench abstract itself gives GPT-4o 65.4% overall). The
# VideoRewardBench and MM-RLHF-RewardBench rows were read from transcriptions of the papers' tables; each
# VideoRewardBench overall equals its dimensions' pair-weighted mean to the table's rounding (a test holds them to
# it), but check them against the PDF before quoting (the VideoRewardBench v1 abstract calls GPT-4o, 57.0%, the best
# model, while its Table 4 puts Gemini-2.5-Pro and Claude-3.7-Sonnet above it).
REFERENCE_RESULTS: dict[str, list[dict[str, Any]]] = {
    VL_REWARDBENCH: [
        {
            "model": "Skywork-VL-Reward-7B",
            "overall": 73.1,
            "macro": 69.0,
            "source": "arXiv 2505.07263, VL-RewardBench table",
        },
        {
            "model": "IXC-2.5-Reward-7B",
            "overall": None,
            "macro": 70.0,
            "source": "arXiv 2501.12368, VL-RewardBench table",
        },
        {"model": "GPT-4o", "overall": 65.8, "macro": 62.4, "source": "arXiv 2505.07263, VL-RewardBench table"},
        {
            "model": "Qwen2.5-VL-72B",
            "overall": 51.6,
            "macro": 52.7,
            "source": "arXiv 2505.07263, VL-RewardBench table",
        },
    ],
    MULTIMODAL_REWARDBENCH: [
        {"model": "Gemini 1.5 Pro", "overall": 72.0, "macro": None, "source": "arXiv 2502.14191, abstract (rounded)"},
        {
            "model": "Claude 3.5 Sonnet",
            "overall": 72.0,
            "macro": None,
            "source": "arXiv 2502.14191, abstract (rounded)",
        },
    ],
    MM_RLHF_REWARDBENCH: [
        {
            "model": "MM-RLHF-Reward-7B",
            "overall": 85.0,
            "macro": None,
            "acc_plus": 67.0,
            "source": "arXiv 2502.10391, Table 4 (Acc 0.85, Acc+ 0.67)",
        },
        {
            "model": "GPT-4o",
            "overall": 74.0,
            "macro": None,
            "acc_plus": 50.0,
            "source": "arXiv 2502.10391, Table 4 (Acc 0.74, Acc+ 0.50)",
        },
    ],
    # Table 4's columns: long-form perception, short-form perception, knowledge, reasoning, safety.
    VIDEO_REWARDBENCH: [
        _video_rewardbench_row("Gemini-2.5-Pro", 63.6, (70.7, 55.9, 65.5, 67.3, 62.7)),
        _video_rewardbench_row("Claude-3.7-Sonnet", 63.2, (65.0, 48.4, 63.4, 58.3, 82.9)),
        _video_rewardbench_row("GPT-4o", 57.0, (63.3, 50.8, 58.8, 57.9, 57.3)),
        _video_rewardbench_row("Qwen2.5-VL-72B", 53.3, (68.9, 48.4, 56.7, 52.5, 44.7)),
        _video_rewardbench_row("LLaVA-Critic-72B", 63.0, (72.4, 43.8, 55.9, 56.5, 88.0)),
        _video_rewardbench_row("Skywork-VL-Reward-7B", 60.5, (65.7, 49.2, 52.9, 54.0, 80.1)),
        _video_rewardbench_row("IXC-2.5-Reward-7B", 53.4, (73.5, 51.3, 56.3, 52.2, 38.7)),
        _video_rewardbench_row("MM-RLHF-Reward-7B", 51.2, (59.4, 37.0, 44.1, 52.2, 65.2)),
    ],
    # VisualProcessBench (VisualPRM, Wang et al. 2025, arXiv 2503.10291), Table 3: the macro-F1 (mean of the F1 of the
    # correct and of the wrong steps, neutral steps left out) per data source and Overall, over all steps pooled (the
    # caption's "micro average"). Steps are scored by process models (VisualPRM) or judged by prompted MLLMs (the
    # others). Its MathVerse column is MathVerse's Vision-Only split. Read from two transcriptions of the paper that
    # agree (Sec. 4.2's text gives VisualPRM 62.0, and InternVL2.5-8B's F1 76.8 on correct and 19.2 on wrong steps);
    # random guessing reads 50.0. Check against the PDF before quoting a per-source number.
    "visualprocessbench": [
        {
            "model": model,
            "overall": overall,
            "macro": None,
            "per_category": dict(zip(("MMMU", "MathVision", "MathVerse", "DynaMath", "WeMath"), sources, strict=True)),
            "source": "arXiv 2503.10291, Table 3",
        }
        for model, overall, sources in (
            ("VisualPRM-8B", 62.0, (58.5, 62.1, 61.0, 62.7, 61.8)),
            ("Gemini-2.0-Flash", 62.3, (58.5, 60.1, 62.8, 66.7, 58.7)),
            ("GPT-4o", 60.3, (56.3, 60.2, 59.7, 59.0, 63.3)),
            ("GPT-4o-Mini", 57.9, (53.6, 58.9, 57.1, 56.7, 58.5)),
            ("Qwen2.5-VL-72B", 60.5, (59.2, 59.0, 59.7, 62.9, 62.3)),
            ("InternVL2.5-78B", 52.6, (52.0, 51.7, 53.7, 50.8, 52.5)),
            ("InternVL2.5-8B", 48.0, (47.1, 45.5, 47.8, 50.3, 50.8)),
        )
    ],
}


def benchmark_of(raw: dict[str, Any], named: str | None = None) -> str | None:
    """The benchmark a raw row belongs to: ``named`` (the config's choice), else recognised by its fields."""
    if named in BENCHMARKS:
        return named
    if "response" in raw and "human_ranking" in raw:
        return VL_REWARDBENCH
    if {"Output1", "Output2", "Better"} <= raw.keys():
        return MULTIMODAL_REWARDBENCH
    if "chosen" not in raw or "rejected" not in raw:
        return None
    if "dimension" in raw and ("video" in raw or "videos" in raw):
        return VIDEO_REWARDBENCH
    # MM-RLHF-RewardBench: its own column names (a parquet row keeps a null `video` but drops a null `image`), or the
    # annotators' reasons. A `video` pair asking its `question`, or without an `id`, is a plain video pair
    # (LLaVA-Video, ShareGPT), not the benchmark: no Acc+ group, and an image beside its video is kept.
    if {"id", "prompt", "video"} <= raw.keys() or {"chosen_reason", "rejected_reason"} <= raw.keys():
        return MM_RLHF_REWARDBENCH
    return None


def vl_rewardbench_category(raw: dict[str, Any]) -> str | None:
    """general / hallucination / reasoning from ``query_source``, else from the id's prefix (``RLAIF-V-123``)."""
    source = raw.get("query_source")
    if source is None and isinstance(raw.get("id"), str):
        source = next((name for name in VL_REWARDBENCH_CATEGORIES if raw["id"].lower().startswith(name)), None)
    return VL_REWARDBENCH_CATEGORIES.get(str(source).lower()) if source is not None else None


def multimodal_rewardbench_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The vlrm layout of a Multimodal RewardBench row (``Better`` is ``Output1`` or ``Output2``)."""
    better = str(raw.get("Better", "")).strip()
    if better not in ("Output1", "Output2"):
        raise RowProblem("Better", f"expected Output1 or Output2, got {raw.get('Better')!r}")
    worse = "Output2" if better == "Output1" else "Output1"
    meta = raw.get("Meta") if isinstance(raw.get("Meta"), dict) else {}
    return {
        "question": raw.get("Text"),
        "images": raw.get("Image"),
        "chosen": raw.get(better),
        "rejected": raw.get(worse),
        "category": raw.get("Category", meta.get("Category")),
        "preferred_position": 0 if better == "Output1" else 1,
    }


def _present(value: Any) -> bool:
    """A media value that is there: not null, not an empty string or list (a column's filler in rows of the other
    medium)."""
    if value is None or isinstance(value, str) and not value.strip():
        return False
    return isinstance(value, (bytes, bytearray, dict)) or not hasattr(value, "__len__") or len(value) > 0


def _media_path(value: Any) -> str:
    if isinstance(value, str):
        return value
    return str(value.get("path") or "") if isinstance(value, dict) else ""


def mm_rlhf_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """MM-RLHF-RewardBench (module docstring): the image, else the video, placed before the prompt's text; pairs
    sharing ``id`` form an Acc+ group; the category from the media path."""
    image = raw.get("image") if _present(raw.get("image")) else None
    video = raw.get("video") if image is None and _present(raw.get("video")) else None
    category = raw.get("category")
    if category is None:
        path = _media_path(image if image is not None else video).lower()
        category = next((word for word in MM_RLHF_CATEGORIES if word in path), None)
    group = None if raw.get("id") is None else str(raw["id"])
    fields = {key: value for key, value in raw.items() if key not in ("image", "video")} | {
        "image": image, "video": video, "category": category, "group": group,
    }  # fmt: skip
    if isinstance(raw.get("prompt"), str):  # its script drops the prompt's image token and puts the media first
        fields["prompt"] = re.sub(r"<image>|<video>", "", raw["prompt"]).strip()
    return fields


def videorewardbench_dimension(value: Any) -> str | None:
    """The dimension a VideoRewardBench row names, in any spelling (``Long-form Perception``, ``long_perception``,
    ``Safety``), or None."""
    if not isinstance(value, str):
        return None
    words = re.split(r"[^a-z]+", value.lower())
    found = [
        name for name, (word, _) in VIDEO_REWARDBENCH_DIMENSIONS.items() if any(w.startswith(word) for w in words)
    ]
    return found[0] if len(found) == 1 else None


def videorewardbench_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """VideoRewardBench (module docstring): the dimension becomes the category; a row without a video is a bad row."""
    field_name = "dimension" if raw.get("dimension") is not None or "category" not in raw else "category"
    dimension = videorewardbench_dimension(raw.get(field_name))
    if dimension is None:
        raise RowProblem(
            field_name, f"expected one of {', '.join(VIDEO_REWARDBENCH_DIMENSIONS)}, got {raw.get(field_name)!r}"
        )
    if not _present(raw.get("videos", raw.get("video"))):
        raise RowProblem("video", "missing: every VideoRewardBench pair is judged on its video")
    return {key: value for key, value in raw.items() if key not in ("dimension", "category")} | {"category": dimension}
