"""Loading preference data into canonical rows (see ARCHITECTURE.md, "The canonical row").

Accepted files: .json (a list of rows), .jsonl, .parquet, and directories written by ``datasets.save_to_disk``.
Accepted layouts, all mapped here and nowhere else:

- vlrm / seed README: ``{"question" | "prompt" | "query": str, "images": [...], "chosen": str, "rejected": str}``
- TRL conversational vision: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages], "images": [...]}``
- RLAIF-V: ``{"question", "image", "chosen", "rejected"}``
- VL-RewardBench: ``{"query", "image", "response": [a, b], "human_ranking": [rank_a, rank_b]}`` (lower rank wins)
- LLaVA / POVID: ``{"conversations": [...], "rejected_conversations": [...], "image"}`` with ``<image>`` markers

Images may be paths (relative to the data file), PIL images, raw bytes or ``{"bytes": ..., "path": ...}`` dicts.
Optional fields: ``id``, ``margin``, ``category``. A row that cannot be used raises ``BadSampleError`` naming the
file, the row index and the field, or, with ``on_bad_sample="skip"``, is dropped and counted.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

logger = logging.getLogger(__name__)

QUESTION_KEYS = ("question", "prompt", "query")
IMAGE_MARKER = "<image>"

# Arrow schema of a canonical row. Message content is always a list of parts so that every row has the same type.
CANONICAL_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "prompt": datasets.List(
            {
                "role": datasets.Value("string"),
                "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
            }
        ),
        "images": datasets.List(datasets.Image()),
        "chosen": datasets.Value("string"),
        "rejected": datasets.Value("string"),
        "margin": datasets.Value("float32"),
        "category": datasets.Value("string"),
    }
)


class BadSampleError(ValueError):
    """A row that cannot be used, with the place it came from."""

    def __init__(self, source: str, row_index: int, field_name: str, reason: str):
        self.source, self.row_index, self.field_name, self.reason = source, row_index, field_name, reason
        super().__init__(f"{source}: row {row_index}: field `{field_name}`: {reason}")


class _RowProblem(Exception):
    def __init__(self, field_name: str, reason: str):
        super().__init__(reason)
        self.field_name, self.reason = field_name, reason


@dataclass
class LoadReport:
    """What loading kept and dropped, for the log."""

    source: str
    rows_read: int = 0
    rows_kept: int = 0
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.source}: {self.rows_kept} of {self.rows_read} pairs kept"
        if self.skipped:
            first = "; ".join(self.skipped[:3])
            text += f", {len(self.skipped)} bad rows skipped (first: {first})"
        return text


# ----------------------------------------------------------------------------------------------------------------
# Reading files


def _read_rows(path: Path) -> Iterable[dict[str, Any]]:
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ValueError(f"{path}: a DatasetDict with splits {list(loaded)}; point at one split's directory")
            loaded = loaded["train"]
        # Keep images undecoded: we validate and re-encode them ourselves.
        for name, feature in loaded.features.items():
            if isinstance(feature, datasets.Image):
                loaded = loaded.cast_column(name, datasets.Image(decode=False))
            elif isinstance(feature, (datasets.List, datasets.Sequence)) and isinstance(
                getattr(feature, "feature", None), datasets.Image
            ):
                loaded = loaded.cast_column(name, datasets.List(datasets.Image(decode=False)))
        return iter(loaded)
    if not path.is_file():
        raise FileNotFoundError(f"preference data not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        import pandas as pd

        try:
            frame = pd.read_json(path, lines=suffix == ".jsonl" or _looks_like_json_lines(path), dtype=False)
        except ValueError as error:
            raise ValueError(f"{path}: not valid JSON{' lines' if suffix == '.jsonl' else ''}: {error}") from error
        return (_drop_nan(row) for row in frame.to_dict(orient="records"))
    if suffix == ".parquet":
        import pandas as pd

        return (_drop_nan(row) for row in pd.read_parquet(path).to_dict(orient="records"))
    raise ValueError(
        f"{path}: unsupported data file type `{suffix}` (use .json, .jsonl, .parquet or a save_to_disk dir)"
    )


def _looks_like_json_lines(path: Path) -> bool:
    with open(path, "rb") as file:
        head = file.read(64).lstrip()
    return head[:1] == b"{"


def _drop_nan(row: dict[str, Any]) -> dict[str, Any]:
    """pandas fills a field missing from some rows with NaN; treat it as absent."""
    return {key: value for key, value in row.items() if not (isinstance(value, float) and math.isnan(value))}


# ----------------------------------------------------------------------------------------------------------------
# Mapping one row onto the canonical layout


def _text(value: Any, field_name: str) -> str:
    if not isinstance(value, str):
        raise _RowProblem(field_name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise _RowProblem(field_name, "is empty")
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
    """A response: a string, or TRL's ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(value, str):
        return _text(value, field_name)
    messages = _as_list(value)
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "assistant":
        raise _RowProblem(field_name, "expected a string or a single assistant message")
    content = messages[0].get("content")
    if isinstance(content, str):
        return _text(content, field_name)
    texts = [
        part.get("text") or "" for part in _as_list(content) if isinstance(part, dict) and part.get("type") == "text"
    ]
    return _text("".join(texts), field_name)


def _user_prompt(question: str, num_images: int) -> list[dict]:
    """A single user turn; ``<image>`` markers place the images, else they go before the text."""
    parts: list[dict] = []
    if IMAGE_MARKER in question:
        pieces = question.split(IMAGE_MARKER)
        for index, piece in enumerate(pieces):
            if index > 0:
                parts.append({"type": "image", "text": None})
            if piece.strip():
                parts.append({"type": "text", "text": piece.strip("\n")})
    else:
        parts = [{"type": "image", "text": None} for _ in range(num_images)]
        parts.append({"type": "text", "text": question})
    return [{"role": "user", "content": parts}]


def _normalise_messages(messages: list, field_name: str) -> list[dict]:
    normalised = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise _RowProblem(field_name, "expected a list of {role, content} messages")
        content = message.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        else:
            parts = []
            for part in _as_list(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    parts.append({"type": "image", "text": None})
                elif kind == "text":
                    parts.append({"type": "text", "text": part.get("text") or ""})
                else:
                    raise _RowProblem(field_name, f"unsupported message part {part!r}")
        normalised.append({"role": message["role"], "content": parts})
    return normalised


def _llava_turns(conversations: Any, field_name: str) -> tuple[str, str]:
    turns = _as_list(conversations)
    if len(turns) < 2 or not all(isinstance(turn, dict) for turn in turns):
        raise _RowProblem(field_name, "expected [{from: human, value}, {from: gpt, value}]")
    human = [turn for turn in turns if turn.get("from") in ("human", "user")]
    answer = [turn for turn in turns if turn.get("from") in ("gpt", "assistant")]
    if not human or not answer:
        raise _RowProblem(field_name, "needs one human and one gpt turn")
    return _text(human[0].get("value"), field_name), _text(answer[-1].get("value"), field_name)


def map_row(raw: dict[str, Any]) -> dict[str, Any]:
    """Map one raw row of any accepted layout to the canonical fields (images still unresolved)."""
    images = _as_list(raw.get("images", raw.get("image")))
    if "conversations" in raw:  # LLaVA / POVID
        question, chosen = _llava_turns(raw["conversations"], "conversations")
        if "rejected_conversations" in raw:
            _, rejected = _llava_turns(raw["rejected_conversations"], "rejected_conversations")
        else:
            rejected = _assistant_text(raw.get("rejected"), "rejected")
        prompt = _user_prompt(question, len(images))
    elif "response" in raw and "human_ranking" in raw:  # VL-RewardBench
        responses, ranking = _as_list(raw["response"]), _as_list(raw["human_ranking"])
        if len(responses) != 2 or len(ranking) != 2:
            raise _RowProblem("response", "VL-RewardBench rows need two responses and two ranks")
        if ranking[0] == ranking[1]:
            raise _RowProblem("human_ranking", "both responses have the same rank: no preference")
        best = 0 if ranking[0] < ranking[1] else 1
        chosen = _text(responses[best], "response")
        rejected = _text(responses[1 - best], "response")
        prompt = _user_prompt(_text(raw.get("query"), "query"), len(images))
    else:
        if "chosen" not in raw:
            raise _RowProblem("chosen", "missing (no known layout matched the row's fields: " + ", ".join(raw) + ")")
        if "rejected" not in raw:
            raise _RowProblem("rejected", "missing")
        chosen = _assistant_text(raw["chosen"], "chosen")
        rejected = _assistant_text(raw["rejected"], "rejected")
        question_key = next((key for key in QUESTION_KEYS if key in raw), None)
        if question_key is None:
            raise _RowProblem("question", f"missing: one of {', '.join(QUESTION_KEYS)} is needed")
        question = raw[question_key]
        if isinstance(question, str):
            prompt = _user_prompt(_text(question, question_key), len(images))
        else:
            prompt = _normalise_messages(_as_list(question), question_key)
    if chosen.strip() == rejected.strip():
        raise _RowProblem("rejected", "identical to chosen: no preference to learn")
    num_image_parts = sum(part["type"] == "image" for message in prompt for part in message["content"])
    if num_image_parts != len(images):
        raise _RowProblem("images", f"{len(images)} images but {num_image_parts} image places in the prompt")
    margin = raw.get("margin")
    if margin is not None and not isinstance(margin, (int, float)):
        raise _RowProblem("margin", f"expected a number, got {type(margin).__name__}")
    category = raw.get("category")
    return {
        "prompt": prompt,
        "images": images,
        "chosen": chosen,
        "rejected": rejected,
        "margin": None if margin is None else float(margin),
        "category": None if category is None else str(category),
    }


def resolve_image(value: Any, base_dir: Path) -> dict[str, Any]:
    """Check an image can be decoded; return it as ``{"bytes", "path"}`` for the Arrow Image feature."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data, path = bytes(value), None
    elif isinstance(value, str):
        data, path = None, value
    elif isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.convert("RGB").save(buffer, format="PNG")
        data, path = buffer.getvalue(), None
    else:
        raise _RowProblem("images", f"unsupported image value of type {type(value).__name__}")
    if data is None:
        if not path:
            raise _RowProblem("images", "image has neither bytes nor a path")
        resolved = Path(path) if Path(path).is_absolute() else base_dir / path
        if not resolved.is_file():
            raise _RowProblem("images", f"image file not found: {resolved}")
        path = str(resolved)
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            image.load()  # decode fully: a truncated file passes verify() but fails here
    except Exception as error:  # PIL raises many types for bad files
        raise _RowProblem("images", f"cannot decode image {path or '<bytes>'}: {error}") from error
    return {"bytes": data, "path": path if data is None else None}


# ----------------------------------------------------------------------------------------------------------------
# Public entry point


def load_preference_dataset(
    path: str | Path,
    on_bad_sample: str = "error",
    max_samples: int | None = None,
    seed: int = 0,
) -> tuple[datasets.Dataset, LoadReport]:
    """Load ``path`` into canonical rows. Returns the dataset and a report of what was kept and skipped."""
    path = Path(path)
    base_dir = path if path.is_dir() else path.parent
    report = LoadReport(source=str(path))
    rows = []
    for row_index, raw in enumerate(_read_rows(path)):
        report.rows_read += 1
        try:
            if not isinstance(raw, dict):
                raise _RowProblem("row", f"expected an object, got {type(raw).__name__}")
            row = map_row(raw)
            row["images"] = [resolve_image(image, base_dir) for image in row["images"]]
        except _RowProblem as problem:
            error = BadSampleError(str(path), row_index, problem.field_name, problem.reason)
            if on_bad_sample != "skip":
                raise error from None
            report.skipped.append(f"row {row_index} `{problem.field_name}`: {problem.reason}")
            continue
        row["id"] = str(raw.get("id", f"{path.stem}-{row_index}"))
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no usable preference pairs ({report.summary()})")
    dataset = datasets.Dataset.from_list(rows, features=CANONICAL_FEATURES)
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(max_samples))
    report.rows_kept = len(dataset)
    return dataset, report
