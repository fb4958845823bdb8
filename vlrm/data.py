"""Reading preference data and mapping each row onto the canonical row (see ARCHITECTURE.md, "The canonical row").
``vlrm.prepare`` runs this over a whole data set once and caches the result.

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

import hashlib
import io
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from vlrm import benchmarks

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
        "group": datasets.Value("string"),  # pairs judged together (MM-RLHF's Acc+), else null
        "preferred_position": datasets.Value("int8"),  # where the preferred answer stood in the source row, if known
        "benchmark": datasets.Value("string"),  # the benchmark layout the row was read as (vlrm.benchmarks), or null
    }
)


class BadSampleError(ValueError):
    """A row that cannot be used, with the place it came from."""

    def __init__(self, source: str, row_index: int, field_name: str, reason: str):
        self.source, self.row_index, self.field_name, self.reason = source, row_index, field_name, reason
        super().__init__(f"{source}: row {row_index}: field `{field_name}`: {reason}")

    def __reduce__(self):  # raised in a preparation worker and re-raised in the main process
        return BadSampleError, (self.source, self.row_index, self.field_name, self.reason)


class RowProblem(Exception):
    """What is wrong with a row, before the file and row index are known (``BadSampleError`` adds them)."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(reason)
        self.field_name, self.reason = field_name, reason


# ----------------------------------------------------------------------------------------------------------------
# Reading files: one source's raw rows by index, streamed (nothing here decodes an image)


class RawRows:
    """The raw rows of one source, read by index in a bounded amount of memory: a .jsonl file (line offsets), a
    .json list, a .parquet file (streamed in small batches) or an Arrow dataset (a ``save_to_disk`` dir, or a hub
    dataset loaded by ``vlrm.prepare``). Picklable, so the workers of a parallel preparation each read their share.

    ``num_rows`` counts rows; ``identity()`` is what the prepared cache is keyed on; ``read(indices)`` yields
    ``(index, row)`` for the given sorted row indices."""

    def __init__(self, source: str, path: Path | None = None, dataset: datasets.Dataset | None = None):
        self.source, self.path, self.dataset = source, path, dataset
        self.base_dir = None if path is None else (path if path.is_dir() else path.parent)
        self.kind = "arrow" if dataset is not None else _file_kind(path)
        self._offsets: np.ndarray | None = None

    @classmethod
    def from_dataset(cls, source: str, dataset: datasets.Dataset) -> RawRows:
        return cls(source, dataset=_undecoded(dataset))

    @property
    def stem(self) -> str:
        """The prefix of derived row ids (``<stem>-<row>``) and of the prepared cache's dir name."""
        return self.path.stem if self.path is not None else self.source.split(":")[0].split("/")[-1]

    @classmethod
    def open(cls, path: str | Path) -> RawRows:
        path = Path(path)
        if path.is_dir():
            return cls(str(path), path, _undecoded(_load_from_disk(path)))
        if not path.is_file():
            raise FileNotFoundError(f"preference data not found: {path}")
        return cls(str(path), path)

    @property
    def num_rows(self) -> int:
        if self.kind == "arrow":
            return len(self.dataset)
        if self.kind == "parquet":
            return pq.ParquetFile(self.path).metadata.num_rows
        if self.kind == "json":
            return len(self._json_list())
        return len(self._line_offsets())

    def identity(self) -> dict[str, Any]:
        if self.kind == "arrow" and self.path is None:  # a hub dataset: its fingerprint names its files
            return {"source": self.source, "fingerprint": self.dataset._fingerprint}
        files = sorted(p for p in self.path.rglob("*") if p.is_file()) if self.path.is_dir() else [self.path]
        return {"source": str(self.path.resolve()), "files": [_file_identity(file) for file in files]}

    def read(self, indices: np.ndarray) -> Iterator[tuple[int, Any]]:
        if self.kind == "arrow":
            for index in indices:
                yield int(index), _drop_nan(self.dataset[int(index)])
        elif self.kind == "json":
            rows = self._json_list()
            for index in indices:
                yield int(index), rows[index]
        elif self.kind == "parquet":
            yield from self._read_parquet(indices)
        else:
            offsets = self._line_offsets()
            with open(self.path, "rb") as file:
                for index in indices:
                    file.seek(offsets[index])
                    line = file.readline()
                    try:
                        yield int(index), json.loads(line)
                    except ValueError as error:
                        yield int(index), RowProblem("row", f"not valid JSON: {error}")

    def _line_offsets(self) -> np.ndarray:
        """Byte offset of every non-blank line (one pass over the file, kept as one int64 per row)."""
        if self._offsets is None:
            offsets, position = [], 0
            with open(self.path, "rb") as file:
                for line in file:
                    if line.strip():
                        offsets.append(position)
                    position += len(line)
            self._offsets = np.asarray(offsets, dtype=np.int64)
        return self._offsets

    def _json_list(self) -> list:
        # A .json file is one document: it is parsed whole (in each worker). Large sets belong in .jsonl or .parquet.
        try:
            rows = json.loads(self.path.read_bytes())
        except ValueError as error:
            raise ValueError(f"{self.path}: not valid JSON: {error}") from error
        if not isinstance(rows, list):
            raise ValueError(
                f"{self.path}: expected a list of rows, got {type(rows).__name__} (use .jsonl for one row a line)"
            )
        return rows

    def _read_parquet(self, indices: np.ndarray) -> Iterator[tuple[int, Any]]:
        # Buffered column reads and small batches: memory stays bounded however large the row group is.
        parquet = pq.ParquetFile(self.path, buffer_size=1 << 20, pre_buffer=False)
        group_starts = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
        groups = sorted(set(np.searchsorted(group_starts, indices, side="right") - 1))
        wanted = iter(indices.tolist())
        target = next(wanted, None)
        for group in groups:
            position = int(group_starts[group])
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group]):
                end = position + batch.num_rows
                here = []
                while target is not None and target < end:
                    here.append(target)
                    target = next(wanted, None)
                if here:
                    taken = batch.take([index - position for index in here]).to_pylist()
                    yield from ((index, _drop_nan(row)) for index, row in zip(here, taken, strict=True))
                position = end
                if target is None or target >= group_starts[group + 1]:
                    break


PARQUET_BATCH_ROWS = 64


def _file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and _looks_like_json_lines(path)):
        return "jsonl"
    if suffix in (".json", ".parquet"):
        return suffix[1:]
    raise ValueError(
        f"{path}: unsupported data file type `{suffix}` (use .json, .jsonl, .parquet or a save_to_disk dir)"
    )


def _file_identity(path: Path) -> list:
    """(path, size, mtime) and a hash of the content: all of it for files up to 64 MiB, else its first and last
    MiB, so that a file rewritten within one mtime tick is still told apart while a large one is not read whole."""
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        if stat.st_size <= 64 << 20:
            digest.update(file.read())
        else:
            digest.update(file.read(1 << 20))
            file.seek(-(1 << 20), io.SEEK_END)
            digest.update(file.read())
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns, digest.hexdigest()]


def _load_from_disk(path: Path) -> datasets.Dataset:
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(f"{path}: a DatasetDict with splits {list(loaded)}; point at one split's directory")
        loaded = loaded["train"]
    return loaded


def _undecoded(dataset: datasets.Dataset) -> datasets.Dataset:
    """Image columns cast to undecoded ``{"bytes", "path"}``: images are checked and decoded by us, once."""
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, (datasets.List, datasets.Sequence)) and isinstance(
            getattr(feature, "feature", None), datasets.Image
        ):
            dataset = dataset.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return dataset


def _looks_like_json_lines(path: Path) -> bool:
    with open(path, "rb") as file:
        head = file.read(64).lstrip()
    return head[:1] == b"{"


LAYOUT_MARKERS = ("video",)  # columns whose presence, even null, identifies a layout (MM-RLHF-RewardBench)


def _drop_nan(row: dict[str, Any]) -> dict[str, Any]:
    """pandas fills a field missing from some rows with NaN (and parquet with null); treat it as absent, except for
    the columns that mark a benchmark's layout."""
    return {
        key: value
        for key, value in row.items()
        if key in LAYOUT_MARKERS or (value is not None and not (isinstance(value, float) and math.isnan(value)))
    }


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
    """A response: a string, or TRL's ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(value, str):
        return _text(value, field_name)
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


def user_prompt(question: str, num_images: int) -> list[dict]:
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
            raise RowProblem(field_name, "expected a list of {role, content} messages")
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
    a benchmark layout (``vlrm.benchmarks``); by default each row's own fields tell. Raises ``RowProblem``, or
    ``UnsupportedRow`` for a benchmark row vlrm cannot score."""
    kind = benchmarks.benchmark_of(raw, benchmark)
    if kind == benchmarks.MULTIMODAL_REWARDBENCH:
        raw = benchmarks.multimodal_rewardbench_fields(raw)
    elif kind == benchmarks.MM_RLHF_REWARDBENCH:
        raw = benchmarks.mm_rlhf_fields(raw)
    images = _as_list(raw.get("images", raw.get("image")))
    if "conversations" in raw:  # LLaVA / POVID
        pair = _llava_pair(raw, len(images))
    elif "response" in raw and "human_ranking" in raw:  # VL-RewardBench
        pair = _vl_rewardbench_pair(raw, len(images))
    else:
        pair = _chosen_rejected_pair(raw, len(images))
    prompt, chosen, rejected = pair["prompt"], pair["chosen"], pair["rejected"]
    if chosen.strip() == rejected.strip():
        raise RowProblem("rejected", "identical to chosen: no preference to learn")
    num_image_parts = sum(part["type"] == "image" for message in prompt for part in message["content"])
    if num_image_parts != len(images):
        raise RowProblem("images", f"{len(images)} images but {num_image_parts} image places in the prompt")
    margin = raw.get("margin")
    if margin is not None and not isinstance(margin, (int, float)):
        raise RowProblem("margin", f"expected a number, got {type(margin).__name__}")
    category = pair.get("category", raw.get("category"))
    return {
        "prompt": prompt,
        "images": images,
        "chosen": chosen,
        "rejected": rejected,
        "margin": None if margin is None else float(margin),
        "category": None if category is None else str(category),
        "group": raw.get("group"),
        "preferred_position": pair.get("preferred_position", raw.get("preferred_position")),
        "benchmark": kind,
    }


def _llava_pair(raw: dict[str, Any], num_images: int) -> dict[str, Any]:
    question, chosen = _llava_turns(raw["conversations"], "conversations")
    if "rejected_conversations" in raw:
        _, rejected = _llava_turns(raw["rejected_conversations"], "rejected_conversations")
    else:
        rejected = _assistant_text(raw.get("rejected"), "rejected")
    return {"prompt": user_prompt(question, num_images), "chosen": chosen, "rejected": rejected}


def _vl_rewardbench_pair(raw: dict[str, Any], num_images: int) -> dict[str, Any]:
    responses, ranking = _as_list(raw["response"]), _as_list(raw["human_ranking"])
    if len(responses) != 2 or len(ranking) != 2:
        raise RowProblem("response", "VL-RewardBench rows need two responses and two ranks")
    if ranking[0] == ranking[1]:
        raise RowProblem("human_ranking", "both responses have the same rank: no preference")
    best = 0 if ranking[0] < ranking[1] else 1
    category = raw.get("category")
    return {
        "prompt": user_prompt(_text(raw.get("query"), "query"), num_images),
        "chosen": _text(responses[best], "response"),
        "rejected": _text(responses[1 - best], "response"),
        "preferred_position": best,
        "category": benchmarks.vl_rewardbench_category(raw) if category is None else category,
    }


def _chosen_rejected_pair(raw: dict[str, Any], num_images: int) -> dict[str, Any]:
    if "chosen" not in raw:
        raise RowProblem("chosen", "missing (no known layout matched the row's fields: " + ", ".join(raw) + ")")
    if "rejected" not in raw:
        raise RowProblem("rejected", "missing")
    chosen = _assistant_text(raw["chosen"], "chosen")
    rejected = _assistant_text(raw["rejected"], "rejected")
    question_key = next((key for key in QUESTION_KEYS if key in raw), None)
    if question_key is None:
        raise RowProblem("question", f"missing: one of {', '.join(QUESTION_KEYS)} is needed")
    question = raw[question_key]
    if isinstance(question, str):
        prompt = user_prompt(_text(question, question_key), num_images)
    elif isinstance(question, (list, tuple)) or hasattr(question, "tolist"):
        prompt = _normalise_messages(_as_list(question), question_key)
    else:
        kind = "null" if question is None else type(question).__name__
        raise RowProblem(question_key, f"expected a question string or a list of messages, got {kind}")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def images_key(prompt: list[dict], images: list[dict]) -> str:
    """What makes two prompts the same to the irrelevant-query sampler: their images, or their text when they have
    none (``vlrm.irrelevant``)."""
    if images:
        keys = [
            hashlib.sha1(image["bytes"]).hexdigest() if image.get("bytes") is not None else str(image["path"])
            for image in images
        ]
        return "images:" + hashlib.sha1("\x00".join(keys).encode()).hexdigest()
    return "text:" + hashlib.sha1(json.dumps(prompt, sort_keys=True).encode()).hexdigest()


HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB image as the model's image processor would make it: transparency composited on **white**, as
    transformers' ``image_transforms.convert_to_rgb`` does (PIL's ``convert("RGB")`` drops alpha, which shows
    transparent pixels black), and 16-bit or float greyscale scaled to 8 bits (``convert`` clips it: a 16-bit PNG
    turns white)."""
    if image.mode in HIGH_BIT_DEPTH_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or pixels.max(initial=0) > 255:
            top = 65535.0 if image.mode.startswith("I;16") or pixels.max() <= 65535 else pixels.max()
            pixels = pixels * (255.0 / top)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")  # palette transparency and LA's alpha become RGBA's alpha
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def resolve_image(value: Any, base_dir: Path | None) -> tuple[dict[str, Any], tuple[int, int]]:
    """Check an image can be decoded; return it as ``{"bytes", "path"}`` for the Arrow Image feature, and its
    (width, height)."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data, path = bytes(value), None
    elif isinstance(value, str):
        data, path = None, value
    elif isinstance(value, Image.Image):
        buffer = io.BytesIO()
        to_rgb(value).save(buffer, format="PNG")
        data, path = buffer.getvalue(), None
    else:
        raise RowProblem("images", f"unsupported image value of type {type(value).__name__}")
    if data is None:
        if not path:
            raise RowProblem("images", "image has neither bytes nor a path")
        resolved = Path(path) if Path(path).is_absolute() or base_dir is None else base_dir / path
        if not resolved.is_file():
            raise RowProblem("images", f"image file not found: {resolved}")
        path = str(resolved)
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            size = image.size
            # Decode every byte (a truncated file passes verify() but fails here); a JPEG at 1/8 scale, which still
            # entropy-decodes the whole stream and fails alike, at about 2/3 of the cost. Pixels are not kept.
            image.draft(image.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
            image.load()
    except Exception as error:  # PIL raises many types for bad files
        raise RowProblem("images", f"cannot decode image {path or '<bytes>'}: {error}") from error
    return {"bytes": data, "path": path if data is None else None}, size
