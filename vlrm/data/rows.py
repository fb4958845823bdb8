"""Mapping raw rows of every accepted layout onto the canonical row (see ARCHITECTURE.md, "The canonical row"), here
and nowhere else. ``vlrm.data.sources`` reads the raw rows; ``vlrm.data.prepare`` runs this over a whole data set once
and caches the result.

Accepted layouts:

- vlrm / seed README: ``{"question" | "prompt" | "query": str, "images": [...], "videos": [...], "chosen": str,
  "rejected": str}`` (either media list may be absent)
- TRL conversational vision: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages], "images": [...]}``
- RLAIF-V: ``{"question", "image", "chosen", "rejected"}``
- VL-RewardBench: ``{"query", "image", "response": [a, b], "human_ranking": [rank_a, rank_b]}`` (lower rank wins)
- LLaVA / POVID: ``{"conversations": [...], "rejected_conversations": [...], "image"}`` with ``<image>`` markers
- LLaVA-Video: ``{"video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\\n..."}, {"from": "gpt",
  "value": ...}], "rejected_conversations": [...] | "rejected": str}``; LLaVA-Video-178K writes ``<image>`` for its
  video (LLaVA-NeXT feeds a video's frames through the image token), so a row with videos, no image and no video
  place reads as many ``<image>`` markers as it has videos as the videos' places
- ShareGPT preference (LLaMA-Factory): ``{"conversations": [{"from": "human", "value": "<video>..."}], "chosen":
  {"from": "gpt", "value"}, "rejected": {"from": "gpt", "value"}, "videos" | "images": [...]}``
- a plain video pair: ``{"video" | "videos", "question" | "prompt" | "query", "chosen", "rejected"}`` (``id``,
  ``prompt`` and ``video`` together are MM-RLHF-RewardBench's layout: see ``vlrm.data.benchmarks``)
- the benchmarks' own layouts (``vlrm.data.benchmarks``: VL-RewardBench, Multimodal RewardBench, MM-RLHF-RewardBench,
  VideoRewardBench)
- process rows: one or several solutions split into steps, a label per step (``vlrm.data.steps``: VisualPRM400K,
  VisualProcessBench, generic ``steps`` + ``step_labels``)
- rows of N responses with ranks (ties allowed), scores or attribute ratings, VLFeedback's native rows among them,
  and a tie on a pair (``vlrm.data.rankings``)

Images may be paths (relative to the data file), PIL images, raw bytes or ``{"bytes": ..., "path": ...}`` dicts
(checked by ``vlrm.data.images``). Videos (``videos``, or ``video`` as LLaVA-Video / ShareGPT rows name it) may be
paths (relative to the data file), bytes, ``{"bytes", "path"}`` dicts or lists of frame images, placed by
``{"type": "video"}`` parts or ``<video>`` markers, else before the text; images and videos mix in one prompt, each
list in its order of appearance (sampled by ``vlrm.data.videos``). Optional fields: ``id``, ``margin``,
``category``. A row that cannot be used raises ``RowProblem`` naming the field; the caller adds the file and the row
index (``BadSampleError``), or, with ``on_bad_sample="skip"``, drops and counts it.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import vlrm.data.benchmarks as benchmarks
import vlrm.data.rankings as rankings
import vlrm.data.steps as steps
from vlrm.errors import RowProblem

QUESTION_KEYS = ("question", "prompt", "query")
IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
MEDIA_MARKERS = {IMAGE_MARKER: "image", VIDEO_MARKER: "video"}

# The token lengths a prepared row carries (vlrm.data.prepare; null when prepared without a processor), which the
# scorer's length guard reads instead of encoding the row again.
LENGTH_COLUMNS = ("prompt_length", "chosen_length", "rejected_length")


# ----------------------------------------------------------------------------------------------------------------
# Mapping one row onto the canonical layout


def _text(value: Any, field_name: str) -> str:
    if not isinstance(value, str):
        raise RowProblem(field_name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise RowProblem(field_name, "is empty")
    return value


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if hasattr(value, "tolist") and not isinstance(value, (bytes, str)):  # numpy arrays from parquet
        return list(value.tolist()) if getattr(value, "ndim", 1) else [value.item()]
    return [value]


def _assistant_text(value: Any, field_name: str) -> str:
    """A response: a string, TRL's ``[{"role": "assistant", "content": ...}]``, or a ShareGPT message
    ``{"from": "gpt", "value": ...}`` (LLaMA-Factory's preference rows)."""
    if isinstance(value, str):
        return _text(value, field_name)
    if isinstance(value, dict) and "value" in value:
        return _text(value["value"], field_name)
    messages = _as_list(value)
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "assistant":
        raise RowProblem(field_name, "expected a string or a single assistant message")
    content = messages[0].get("content")
    if isinstance(content, str):
        return _text(content, field_name)
    texts = [
        part.get("text") or "" for part in _as_list(content) if isinstance(part, dict) and part.get("type") == "text"
    ]
    return _text("".join(texts), field_name)


def user_prompt(question: str, num_images: int, num_videos: int = 0) -> list[dict]:
    """A single user turn; ``<image>`` / ``<video>`` markers place the media, else the videos and then the images go
    before the text."""
    parts: list[dict] = []
    pieces = re.split("(" + "|".join(map(re.escape, MEDIA_MARKERS)) + ")", question)
    if len(pieces) > 1:
        for piece in pieces:
            if piece in MEDIA_MARKERS:
                parts.append({"type": MEDIA_MARKERS[piece], "text": None})
            elif piece.strip():
                parts.append({"type": "text", "text": piece.strip("\n")})
    else:
        parts = [{"type": "video", "text": None} for _ in range(num_videos)]
        parts += [{"type": "image", "text": None} for _ in range(num_images)]
        parts.append({"type": "text", "text": question})
    return [{"role": "user", "content": parts}]


def _normalise_messages(messages: list, field_name: str) -> list[dict]:
    normalised = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise RowProblem(field_name, "expected a list of {role, content} messages")
        content = message.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        else:
            parts = []
            for part in _as_list(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in ("image", "video"):
                    parts.append({"type": kind, "text": None})
                elif kind == "text":
                    parts.append({"type": "text", "text": part.get("text") or ""})
                else:
                    raise RowProblem(field_name, f"unsupported message part {part!r}")
        normalised.append({"role": message["role"], "content": parts})
    return normalised


def _llava_turns(conversations: Any, field_name: str) -> tuple[str, str]:
    turns = _as_list(conversations)
    if len(turns) < 2 or not all(isinstance(turn, dict) for turn in turns):
        raise RowProblem(field_name, "expected [{from: human, value}, {from: gpt, value}]")
    human = [turn for turn in turns if turn.get("from") in ("human", "user")]
    answer = [turn for turn in turns if turn.get("from") in ("gpt", "assistant")]
    if not human or not answer:
        raise RowProblem(field_name, "needs one human and one gpt turn")
    return _text(human[0].get("value"), field_name), _text(answer[-1].get("value"), field_name)


def map_row(raw: dict[str, Any], benchmark: str | None = None) -> dict[str, Any]:
    """Map one raw row of any accepted layout to the canonical fields (images still unresolved). ``benchmark`` names
    a benchmark layout (``vlrm.data.benchmarks``); by default each row's own fields tell. Raises ``RowProblem``, or
    ``UnsupportedRow`` for a benchmark row vlrm cannot score."""
    kind = benchmarks.benchmark_of(raw, benchmark)
    if kind == benchmarks.MULTIMODAL_REWARDBENCH:
        raw = benchmarks.multimodal_rewardbench_fields(raw)
    elif kind == benchmarks.MM_RLHF_REWARDBENCH:
        raw = benchmarks.mm_rlhf_fields(raw)
    elif kind == benchmarks.VIDEO_REWARDBENCH:
        raw = benchmarks.videorewardbench_fields(raw)
    images = _as_list(raw.get("images", raw.get("image", raw.get("img_path"))))
    videos = raw.get("videos", raw.get("video"))
    videos = [videos] if isinstance(videos, (str, bytes, dict)) else _as_list(videos)
    media = (len(images), len(videos))
    if steps.is_step_row(raw):  # solutions split into steps, a label per step (VisualPRM400K, VisualProcessBench)
        fields = steps.step_fields(raw)
        question = {"question": fields.pop("question")} if "question" in fields else {}
        pair = {"prompt": _question_prompt(raw | question, media), **fields}
    elif rankings.is_ranking_row(raw):  # N responses with ranks, scores or ratings (VLFeedback, ranked lists)
        pair = {"prompt": _question_prompt(raw, media), **rankings.ranking_labels(raw)}
    elif "conversations" in raw:  # LLaVA / POVID
        pair = _llava_pair(raw, media)
    elif "response" in raw and "human_ranking" in raw:  # VL-RewardBench
        pair = _vl_rewardbench_pair(raw, media)
    else:
        pair = _chosen_rejected_pair(raw, media)
    prompt, chosen, rejected = _video_places(pair["prompt"], *media), pair["chosen"], pair["rejected"]
    tie = None if pair.get("responses") is not None else rankings.pair_tie(raw)
    if chosen.strip() == rejected.strip() and pair.get("responses") is None:
        raise RowProblem("rejected", "identical to chosen: no preference to learn")
    for medium, given in (("image", images), ("video", videos)):
        places = sum(part["type"] == medium for message in prompt for part in message["content"])
        if places != len(given):
            raise RowProblem(f"{medium}s", f"{len(given)} {medium}s but {places} {medium} places in the prompt")
    margin = raw.get("margin")
    if margin is not None and not isinstance(margin, (int, float)):
        raise RowProblem("margin", f"expected a number, got {type(margin).__name__}")
    category = pair.get("category", raw.get("category"))
    return {
        "prompt": prompt,
        "images": images,
        "videos": videos,
        "chosen": chosen,
        "rejected": rejected,
        "margin": None if margin is None else float(margin),
        "category": None if category is None else str(category),
        "group": raw.get("group"),
        "preferred_position": pair.get("preferred_position", raw.get("preferred_position")),
        "benchmark": kind,
        **{name: pair.get(name) for name in rankings.RANKING_FIELDS if name != "tie"},
        "tie": tie,
        **{name: pair.get(name) for name in steps.STEP_FIELDS},
    }


def _video_places(prompt: list[dict], num_images: int, num_videos: int) -> list[dict]:
    """The prompt, its image places read as video places when the row has videos, no image and no video place, and
    as many image places as videos: LLaVA-Video's rows (LLaVA-Video-178K) write ``<image>`` for their video, because
    LLaVA-NeXT feeds a video's frames through the image token."""
    kinds = [part["type"] for message in prompt for part in message["content"]]
    if num_images or not num_videos or "video" in kinds or kinds.count("image") != num_videos:
        return prompt
    return [
        {**message, "content": [{**part, "type": "video"} if part["type"] == "image" else part
                                for part in message["content"]]}
        for message in prompt
    ]  # fmt: skip


def _llava_pair(raw: dict[str, Any], media: tuple[int, int]) -> dict[str, Any]:
    if "chosen" in raw:  # ShareGPT preference rows (LLaMA-Factory): the question's turns, then chosen / rejected
        human = [turn for turn in _as_list(raw["conversations"]) if isinstance(turn, dict)
                 and turn.get("from") in ("human", "user")]  # fmt: skip
        if not human:
            raise RowProblem("conversations", "needs a human turn: [{from: human, value}]")
        question = _text(human[0].get("value"), "conversations")
        chosen, rejected = _assistant_text(raw["chosen"], "chosen"), _assistant_text(raw.get("rejected"), "rejected")
        return {"prompt": user_prompt(question, *media), "chosen": chosen, "rejected": rejected}
    question, chosen = _llava_turns(raw["conversations"], "conversations")
    if "rejected_conversations" in raw:
        _, rejected = _llava_turns(raw["rejected_conversations"], "rejected_conversations")
    else:
        rejected = _assistant_text(raw.get("rejected"), "rejected")
    return {"prompt": user_prompt(question, *media), "chosen": chosen, "rejected": rejected}


def _vl_rewardbench_pair(raw: dict[str, Any], media: tuple[int, int]) -> dict[str, Any]:
    responses, ranking = _as_list(raw["response"]), _as_list(raw["human_ranking"])
    if len(responses) != 2 or len(ranking) != 2:
        raise RowProblem("response", "VL-RewardBench rows need two responses and two ranks")
    if ranking[0] == ranking[1]:
        raise RowProblem("human_ranking", "both responses have the same rank: no preference")
    best = 0 if ranking[0] < ranking[1] else 1
    category = raw.get("category")
    return {
        "prompt": user_prompt(_text(raw.get("query"), "query"), *media),
        "chosen": _text(responses[best], "response"),
        "rejected": _text(responses[1 - best], "response"),
        "preferred_position": best,
        "category": benchmarks.vl_rewardbench_category(raw) if category is None else category,
    }


def _chosen_rejected_pair(raw: dict[str, Any], media: tuple[int, int]) -> dict[str, Any]:
    if "chosen" not in raw:
        raise RowProblem("chosen", "missing (no known layout matched the row's fields: " + ", ".join(raw) + ")")
    if "rejected" not in raw:
        raise RowProblem("rejected", "missing")
    chosen = _assistant_text(raw["chosen"], "chosen")
    rejected = _assistant_text(raw["rejected"], "rejected")
    return {"prompt": _question_prompt(raw, media), "chosen": chosen, "rejected": rejected}


def _question_prompt(raw: dict[str, Any], media: tuple[int, int]) -> list[dict]:
    """The prompt of a row that asks its question in ``question`` / ``prompt`` / ``query``: a string, or messages."""
    question_key = next((key for key in QUESTION_KEYS if key in raw), None)
    if question_key is None:
        raise RowProblem("question", f"missing: one of {', '.join(QUESTION_KEYS)} is needed")
    question = raw[question_key]
    if isinstance(question, str):
        return user_prompt(_text(question, question_key), *media)
    if isinstance(question, (list, tuple)) or hasattr(question, "tolist"):
        return _normalise_messages(_as_list(question), question_key)
    kind = "null" if question is None else type(question).__name__
    raise RowProblem(question_key, f"expected a question string or a list of messages, got {kind}")


def images_key(prompt: list[dict], images: list[dict], videos: list[dict] | None = None) -> str:
    """What makes two prompts the same to the irrelevant-query sampler: their images and videos, or their text when
    they have none (``vlrm.train.irrelevant``)."""
    if images or videos:
        keys = [
            hashlib.sha1(image["bytes"]).hexdigest() if image.get("bytes") is not None else str(image["path"])
            for image in images
        ] + [video["key"] for video in videos or []]
        return "images:" + hashlib.sha1("\x00".join(keys).encode()).hexdigest()
    return "text:" + hashlib.sha1(json.dumps(prompt, sort_keys=True).encode()).hexdigest()
