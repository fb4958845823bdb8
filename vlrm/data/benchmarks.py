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
- **MM-RLHF-RewardBench** (Zhang et al. 2025, arXiv 2502.10391): ``id, image, video, prompt, chosen, rejected``;
  several pairs share an ``id``. Reports Acc (ties wrong) and Acc+ (a group counts only if all its pairs are right).
  Video rows are not supported: they are skipped and counted, with the reason, whatever ``on_bad_sample`` says.
"""

from __future__ import annotations

from typing import Any

from vlrm.errors import RowProblem, UnsupportedRow

VL_REWARDBENCH, MULTIMODAL_REWARDBENCH, MM_RLHF_REWARDBENCH = "vl_rewardbench", "multimodal_rewardbench", "mm_rlhf"
BENCHMARKS = (VL_REWARDBENCH, MULTIMODAL_REWARDBENCH, MM_RLHF_REWARDBENCH)

VL_REWARDBENCH_CATEGORIES = {
    "vlfeedback": "general",
    "wildvision-battle": "general",
    "povid": "hallucination",
    "rlhf-v": "hallucination",
    "rlaif-v": "hallucination",
    "reasoning_tasks": "reasoning",
}

# Published numbers, in percent, with where each comes from. Printed beside our checkpoints' results when a dataset is
# recognised. The VL-RewardBench values are those this project's tracker cites from the Skywork-VL Reward paper's
# VL-RewardBench table (arXiv 2505.07263) and the IXC-2.5-Reward paper (arXiv 2501.12368): check a number against
# its table before quoting it (the VL-RewardBench abstract itself gives GPT-4o 65.4% overall).
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
    MM_RLHF_REWARDBENCH: [],  # none shipped yet: add them with their table's source
}


def benchmark_of(raw: dict[str, Any], named: str | None = None) -> str | None:
    """The benchmark a raw row belongs to: ``named`` (the config's choice), else recognised by its fields."""
    if named in BENCHMARKS:
        return named
    if "response" in raw and "human_ranking" in raw:
        return VL_REWARDBENCH
    if {"Output1", "Output2", "Better"} <= raw.keys():
        return MULTIMODAL_REWARDBENCH
    if "video" in raw and "chosen" in raw and "rejected" in raw:  # MM-RLHF-RewardBench has both media columns
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


def mm_rlhf_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """MM-RLHF-RewardBench: pairs sharing ``id`` form an Acc+ group; video rows are skipped and counted."""
    if raw.get("video"):
        raise UnsupportedRow("video", "video rows are not supported (vlrm scores images): skipped")
    return {key: value for key, value in raw.items() if key != "video"} | {"group": str(raw.get("id"))}
