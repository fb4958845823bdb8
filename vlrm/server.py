"""The batching HTTP reward server that ``serve_rm.py`` runs: ``create_app(scorer, settings, checkpoint_dir)``.

    POST /score       {"items": [{"prompt", "images", "response"}, ...], "normalize": bool?} -> {"rewards": [...]}
    POST /get_reward  OpenRLHF's remote reward shape: {"query": [text, ...], "prompts"?, "images"?} -> {"rewards"}
    GET  /health      {"status": "ok"} (no API key needed, for probes)
    GET  /info        checkpoint, step, normalisation statistics, limits, batching settings, counters

Requests are checked in Starlette's thread pool (JSON, fields, images decoded, tokens counted), then queued. One
asyncio task takes requests off the queue and merges them into micro-batches of at most ``max_batch_size`` items,
waiting at most ``max_wait_ms`` after the first one; one thread runs the model, so there are never two forwards at
once. ``RewardScorer.score`` on the merged rows puts rows with equal prompt and images under one prompt node, so a
prompt sent by several concurrent requests (the completions of one GRPO group) is computed once.

Every bad request gets a 4xx JSON ``{"error", "item", "field"}`` naming the item and the field; nothing is ever
truncated, no URL is fetched and no file outside ``image_root`` is read.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import hmac
import io
import json
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlrm.batching import PreferenceEncoder
from vlrm.checkpoints import checkpoint_step
from vlrm.data import to_rgb, user_prompt
from vlrm.scoring import RewardScorer

logger = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    """What the app enforces and how it batches (``serve_rm.py`` makes one flag per field, with this help)."""

    image_root: str | None = field(
        default=None,
        metadata={
            "help": "Directory image paths are read from (relative to it, or absolute inside it; `..` and symlinks "
            "are resolved and must stay inside). None: paths are refused, only data: URLs and base64 are accepted."
        },
    )
    api_key: str | None = field(
        default=None,
        metadata={
            "help": "Required in `Authorization: Bearer KEY` or `X-API-Key: KEY` on /score, /get_reward and /info "
            "(default: the VLRM_API_KEY environment variable, which keeps it out of `ps`; unset: no key)."
        },
    )
    normalize: bool = field(
        default=False,
        metadata={
            "help": "Return (reward - reward_mean) / reward_std by default (a request's `normalize` overrides it). "
            "Needs both values in the checkpoint's config.json, else the server refuses to start."
        },
    )
    max_batch_size: int = field(default=32, metadata={"help": "Most items merged into one forward pass."})
    max_wait_ms: float = field(
        default=10.0,
        metadata={"help": "Longest wait after a request arrives for others to merge with it, in milliseconds."},
    )
    max_items: int = field(default=64, metadata={"help": "Most items (or queries) in one request."})
    max_images: int = field(default=8, metadata={"help": "Most images in one item."})
    max_pixels_per_image: int = field(
        default=4096 * 4096,
        metadata={"help": "Most pixels (width x height) of an image as sent, read from its header before decoding."},
    )
    max_body_bytes: int = field(
        default=64 * 2**20, metadata={"help": "Largest request body in bytes, and largest image file read."}
    )
    max_pending_items: int = field(
        default=1024, metadata={"help": "Most items queued or being scored; beyond it requests get 503 (retry)."}
    )

    def __post_init__(self):
        for name in ("max_batch_size", "max_items", "max_images", "max_pixels_per_image", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_pending_items < self.max_items:
            raise ValueError(f"max_pending_items ({self.max_pending_items}) must be >= max_items ({self.max_items})")
        if self.image_root is not None and not Path(self.image_root).is_dir():
            raise ValueError(f"image_root is not a directory: {self.image_root}")


class RequestError(Exception):
    """A request the server will not score: the HTTP status, and the item and field at fault (None: the request)."""

    def __init__(self, message: str, item: int | None = None, field: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.item, self.field, self.status = message, item, field, status

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message, "item": self.item, "field": self.field}, status_code=self.status)


NO_REWARD_STATS = (
    "the checkpoint's config records no reward_mean/reward_std, so rewards cannot be normalised (only the final "
    "model of a vlrm training run has them)"
)


def require_reward_stats(checkpoint_dir: str | Path) -> tuple[float, float]:
    """The checkpoint's ``reward_mean`` and ``reward_std``, read from config.json (before any weight is loaded), or a
    ValueError saying why normalisation cannot be offered."""
    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    mean, std = config.get("reward_mean"), config.get("reward_std")
    if mean is None or not std:
        raise ValueError(f"{checkpoint_dir}: {NO_REWARD_STATS}: serve without --normalize")
    return float(mean), float(std)


# ----------------------------------------------------------------------------------------------------------------
# Images: data: URLs, base64, or files under image_root; the size checked from the header before decoding

URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:(//|/)")  # http://, https://, file:/, ftp://, ...
IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
# Raster formats only: Pillow would hand EPS to Ghostscript, and there is no reason to parse exotic formats here.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(IMAGE_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _strict_base64(text: str) -> bytes | None:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return None


class ImageDecoder:
    """An image value of a request -> the RGB PIL image the model gets (``vlrm.data.to_rgb``), or a RequestError."""

    def __init__(self, image_root: str | None, max_pixels: int, max_file_bytes: int):
        self.root = Path(image_root).resolve(strict=True) if image_root is not None else None
        self.max_pixels, self.max_file_bytes = max_pixels, max_file_bytes

    def decode(self, value: Any, item: int, field_name: str) -> Image.Image:
        return self._open(self._bytes(value, item, field_name), item, field_name)

    def _bytes(self, value: Any, item: int, field_name: str) -> bytes:
        if not isinstance(value, str):
            raise RequestError(
                f"expected a string (a data: URL, base64, or a path under --image_root), got {_kind(value)}",
                item, field_name,
            )  # fmt: skip
        if value.startswith("data:"):
            header, comma, payload = value.partition(",")
            if not comma or not header.endswith(";base64"):
                raise RequestError("only base64 data: URLs are accepted (data:image/png;base64,...)", item, field_name)
            data = _strict_base64(payload)
            if data is None:
                raise RequestError("invalid base64 in the data: URL", item, field_name)
            return data
        if URL_SCHEME.match(value):
            raise RequestError(
                "is a URL: the server fetches nothing; send the image as a data: URL or base64", item, field_name
            )
        data = _strict_base64(value)
        if data is not None and _looks_like_image(data):
            return data
        if self.root is None:
            raise RequestError(
                "neither a data: URL nor base64 of a PNG, JPEG, GIF, WebP, BMP or TIFF file; file paths are refused "
                "(the server was started without --image_root)",
                item, field_name,
            )  # fmt: skip
        return self._read_under_root(value, item, field_name)

    def _read_under_root(self, value: str, item: int, field_name: str) -> bytes:
        candidate = Path(value) if Path(value).is_absolute() else self.root / value
        try:
            resolved = candidate.resolve()  # follows every symlink and `..`, so the check below sees the real file
        except (OSError, RuntimeError, ValueError) as error:  # a symlink loop, a NUL byte
            raise RequestError(f"bad image path {value!r}: {error}", item, field_name) from error
        if not resolved.is_relative_to(self.root):
            raise RequestError(f"image path {value!r} is outside --image_root: refused", item, field_name)
        if not resolved.is_file():
            raise RequestError(f"image file not found under --image_root: {value!r}", item, field_name)
        if resolved.stat().st_size > self.max_file_bytes:
            raise RequestError(f"image file {value!r} is over {self.max_file_bytes} bytes", item, field_name)
        return resolved.read_bytes()

    def _open(self, data: bytes, item: int, field_name: str) -> Image.Image:
        try:
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
            width, height = image.size
            if width * height > self.max_pixels:
                raise RequestError(
                    f"image is {width}x{height} = {width * height} pixels, over --max_pixels_per_image="
                    f"{self.max_pixels} (read from its header, not decoded)",
                    item, field_name,
                )  # fmt: skip
            image.load()
            return to_rgb(image)
        except Image.DecompressionBombError as error:  # Pillow's own guard, for headers past MAX_IMAGE_PIXELS
            raise RequestError(f"image refused as a decompression bomb: {error}", item, field_name) from error
        except RequestError:
            raise
        except Exception as error:  # Pillow raises many types for a bad file
            raise RequestError(f"cannot decode image: {error}", item, field_name) from error


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# ----------------------------------------------------------------------------------------------------------------
# Request bodies -> rows for RewardScorer.score

ITEM_FIELDS = ("prompt", "images", "response")
ROLES = ("system", "user", "assistant")
ASSISTANT_HEADER = "<|im_start|>assistant\n"
VISION_PLACEHOLDER = re.compile(r"<\|vision_start\|>(?:<\|image_pad\|>)+<\|vision_end\|>")
TURN = re.compile(r"<\|im_start\|>(system|user|assistant)\n(.*?)<\|im_end\|>\n?", re.S)


def _json_object(body: bytes, allowed: tuple[str, ...]) -> dict:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RequestError(f"invalid JSON: {error}") from error
    if not isinstance(payload, dict):
        raise RequestError(f"the body must be a JSON object, got {_kind(payload)}")
    unknown = [key for key in payload if key not in allowed]
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}; expected: {', '.join(allowed)}", field=unknown[0])
    return payload


def _text(value: Any, item: int, field_name: str) -> str:
    if not isinstance(value, str):
        raise RequestError(f"expected a string, got {_kind(value)}", item, field_name)
    if not value.strip():
        raise RequestError("is empty", item, field_name)
    return value


def _messages(prompt: Any, num_images: int, item: int, field_name: str) -> list[dict]:
    """A question string (``<image>`` markers place the images) or chat messages -> validated chat messages."""
    if isinstance(prompt, str):
        return user_prompt(_text(prompt, item, field_name), num_images)
    if not isinstance(prompt, list) or not prompt:
        raise RequestError(
            f"expected a question string or a non-empty list of {{role, content}} messages, got {_kind(prompt)}",
            item, field_name,
        )  # fmt: skip
    messages = []
    for index, message in enumerate(prompt):
        if not isinstance(message, dict) or set(message) != {"role", "content"} or message["role"] not in ROLES:
            raise RequestError(
                f"message {index}: expected {{role: {' | '.join(ROLES)}, content}}, got {message!r:.80}",
                item,
                field_name,
            )
        content = message["content"]
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = [_part(part, f"message {index}", item, field_name) for part in content]
        else:
            raise RequestError(f"message {index}: content must be a string or a list of parts", item, field_name)
        messages.append({"role": message["role"], "content": parts})
    return messages


def _part(part: Any, where: str, item: int, field_name: str) -> dict:
    """An inline image (``{"type": "image", "image": url}``) is refused: images travel in the item's ``images``."""
    if isinstance(part, dict) and set(part) <= {"type", "text"}:
        if part.get("type") == "image" and part.get("text") is None:
            return {"type": "image", "text": None}
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            return {"type": "text", "text": part["text"]}
    raise RequestError(
        f"{where}: expected {{type: text, text: str}} or {{type: image}}, got {part!r:.80}", item, field_name
    )


def split_query(query: str, prompt: str | None, item: int) -> tuple[str, str]:
    """/get_reward: (prompt, response) of a full text. With ``prompts``, the query must start with its prompt and the
    rest is the response; without, the response is what follows the last ``<|im_start|>assistant\\n``."""
    if prompt is not None:
        if not query.startswith(prompt):
            raise RequestError("the query does not start with its prompt", item, "prompts")
        return prompt, query[len(prompt) :]
    cut = query.rfind(ASSISTANT_HEADER)
    if cut < 0:
        raise RequestError(
            "no `<|im_start|>assistant\\n` in the query: send the chat-templated text, or `prompts`", item, "query"
        )
    return query[: cut + len(ASSISTANT_HEADER)], query[cut + len(ASSISTANT_HEADER) :]


def chat_text_to_messages(text: str, item: int, field_name: str) -> list[dict]:
    """Qwen chat text (``<|im_start|>role\\n...<|im_end|>`` turns ending with the assistant header; an image is a
    ``<|vision_start|><|image_pad|>...<|vision_end|>`` run) -> chat messages."""
    body = text[: -len(ASSISTANT_HEADER)] if text.endswith(ASSISTANT_HEADER) else None
    turns = list(TURN.finditer(body or ""))
    if body is None or not turns or "".join(turn.group(0) for turn in turns).strip() != body.strip():
        raise RequestError(
            "cannot read the prompt as Qwen chat turns (<|im_start|>role\\n...<|im_end|>, then "
            "<|im_start|>assistant\\n): send /score items instead",
            item, field_name,
        )  # fmt: skip
    messages = []
    for turn in turns:
        pieces = VISION_PLACEHOLDER.split(turn.group(2))
        parts = []
        for index, piece in enumerate(pieces):
            if index > 0:
                parts.append({"type": "image", "text": None})
            if piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": turn.group(1), "content": parts})
    return messages


class RequestParser:
    """Request bodies -> rows for ``RewardScorer.score``, or a ``RequestError`` naming the item and the field.

    Runs in Starlette's thread pool (many threads), so it has its own copy of the processor, used under a lock: a
    Hugging Face fast tokenizer must not be used by two threads at once, and the model thread uses the scorer's."""

    def __init__(self, scorer: RewardScorer, settings: ServerSettings):
        self.encoder = PreferenceEncoder(copy.deepcopy(scorer.processor))
        self.tokenizer_lock = threading.Lock()
        self.images = ImageDecoder(settings.image_root, settings.max_pixels_per_image, settings.max_body_bytes)
        self.settings, self.max_seq_length = settings, scorer.max_seq_length
        self.can_normalize = scorer.reward_mean is not None and bool(scorer.reward_std)
        tokenizer = self.encoder.tokenizer
        end_tokens = "|".join(
            map(re.escape, {self.encoder.end_of_turn, tokenizer.eos_token, tokenizer.pad_token} - {None})
        )
        # OpenRLHF's queries end with the end-of-turn token and padding; the encoder adds the end-of-turn itself.
        self.trailing_end_tokens = re.compile(rf"(?:{end_tokens})(?:\s*(?:{end_tokens}))*\s*$")
        # Chat text is read back into turns in Qwen's format only; in another family's, a prompt with its markers
        # would be taken for a plain question and templated twice, so such a prompt is refused instead.
        self.qwen_chat = self.encoder.end_of_turn == "<|im_end|>"
        self.chat_markers = sorted(set(tokenizer.all_special_tokens) - {None, ""}, key=len, reverse=True)

    def score_request(self, body: bytes) -> tuple[list[dict], bool]:
        payload = _json_object(body, ("items", "normalize"))
        items = self._list(payload, "items")
        normalize = self._normalize(payload)
        rows = []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise RequestError(f"expected an object {{prompt, images, response}}, got {_kind(item)}", index)
            unknown = [key for key in item if key not in ITEM_FIELDS]
            if unknown:
                raise RequestError(f"unknown field; expected: {', '.join(ITEM_FIELDS)}", index, unknown[0])
            for name in ("prompt", "response"):
                if name not in item:
                    raise RequestError("missing", index, name)
            rows.append(self._row(index, item["prompt"], item.get("images", []), item["response"]))
        return rows, normalize

    def get_reward_request(self, body: bytes) -> tuple[list[dict], bool]:
        """OpenRLHF sends ``labels`` too; they are accepted and ignored (a reward model does not read them)."""
        payload = _json_object(body, ("query", "prompts", "images", "labels", "normalize"))
        queries = self._list(payload, "query")
        prompts = self._parallel_list(payload, "prompts", len(queries))
        images = self._parallel_list(payload, "images", len(queries))
        normalize = self._normalize(payload)
        rows = []
        for index, query in enumerate(queries):
            prompt = None if prompts is None else _text(prompts[index], index, "prompts")
            prompt_text, response = split_query(_text(query, index, "query"), prompt, index)
            response = self.trailing_end_tokens.sub("", response)
            prompt_field = "query" if prompts is None else "prompts"
            if self.qwen_chat and "<|im_start|>" in prompt_text:
                prompt_value = self._chat_prompt(prompt_text, index, prompt_field)
            elif not self.qwen_chat and any(marker in prompt_text for marker in self.chat_markers):
                raise RequestError(
                    "this checkpoint's chat format is not read back into turns (Qwen's is): send the plain question "
                    "in `prompts`, or messages to /score",
                    index, prompt_field,
                )  # fmt: skip
            else:
                prompt_value = prompt_text  # a plain question
            image_values = [] if images is None else images[index]
            rows.append(self._row(index, prompt_value, image_values, response, prompt_field, "query"))
        return rows, normalize

    def _chat_prompt(self, prompt_text: str, item: int, field_name: str) -> list[dict]:
        """Messages that the checkpoint's chat template renders back to exactly the text sent: the reward is then
        computed on that text, and never on a silently different one (a missing system turn, another template)."""
        messages = chat_text_to_messages(prompt_text, item, field_name)
        with self.tokenizer_lock:
            rendered = self.encoder.prompt_text(messages)
        placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
        if rendered != VISION_PLACEHOLDER.sub(placeholder, prompt_text):
            raise RequestError(
                "the prompt differs from what the checkpoint's chat template renders for it (a missing system turn, "
                f"another template?); the template gives: {rendered[:200]!r}",
                item, field_name,
            )  # fmt: skip
        return messages

    def _list(self, payload: dict, name: str) -> list:
        if name not in payload:
            raise RequestError("missing", field=name)
        value = payload[name]
        if not isinstance(value, list):
            raise RequestError(f"expected a list, got {_kind(value)}", field=name)
        if not value:
            raise RequestError("is empty: nothing to score", field=name)
        if len(value) > self.settings.max_items:
            raise RequestError(
                f"{len(value)} entries, over --max_items={self.settings.max_items}: split the request", field=name
            )
        return value

    def _parallel_list(self, payload: dict, name: str, length: int) -> list | None:
        value = payload.get(name)
        if value is None:
            return None
        if not isinstance(value, list) or len(value) != length:
            raise RequestError(f"expected a list of {length} entries, one per query", field=name)
        return value

    def _normalize(self, payload: dict) -> bool:
        value = payload.get("normalize", self.settings.normalize)
        if not isinstance(value, bool):
            raise RequestError(f"expected true or false, got {_kind(value)}", field="normalize")
        if value and not self.can_normalize:
            raise RequestError(NO_REWARD_STATS, field="normalize")
        return value

    def _row(
        self, item: int, prompt: Any, images: Any, response: Any, prompt_field: str = "prompt",
        response_field: str = "response",
    ) -> dict:  # fmt: skip
        if not isinstance(images, list):
            raise RequestError(f"expected a list of images, got {_kind(images)}", item, "images")
        if len(images) > self.settings.max_images:
            raise RequestError(f"{len(images)} images, over --max_images={self.settings.max_images}", item, "images")
        response = _text(response, item, response_field)
        messages = _messages(prompt, len(images), item, prompt_field)
        places = sum(part["type"] == "image" for message in messages for part in message["content"])
        if places != len(images):
            raise RequestError(f"{len(images)} images but {places} image places in the prompt", item, "images")
        decoded = [self.images.decode(value, item, f"images[{index}]") for index, value in enumerate(images)]
        self._check_length(item, messages, decoded, response, prompt_field, response_field)
        return {"prompt": messages, "images": decoded, "response": response}

    def _check_length(
        self, item: int, messages: list, images: list, response: str, prompt_field: str, response_field: str
    ) -> None:
        with self.tokenizer_lock:
            try:
                prompt_tokens = self.encoder.prompt_length(messages, images)
            except ValueError as error:  # the image processor refuses some shapes (aspect ratio over 200)
                raise RequestError(f"the image processor refuses an image: {error}", item, "images") from error
            response_tokens = len(self.encoder.encode_response(response))
        total = prompt_tokens + response_tokens
        if self.max_seq_length is not None and total > self.max_seq_length:
            raise RequestError(
                f"{total} tokens (prompt {prompt_tokens} with visual tokens, response {response_tokens}), over "
                f"max_seq_length={self.max_seq_length}: not scored (never truncated)",
                item, prompt_field if prompt_tokens >= self.max_seq_length else response_field,
            )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Micro-batching: one asyncio task merges queued requests, one thread runs the model


@dataclass
class _Pending:
    rows: list[dict]
    normalize: bool
    future: asyncio.Future


@dataclass
class BatchStats:
    requests: int = 0
    items: int = 0
    batches: int = 0
    largest_batch: int = 0
    failed_batches: int = 0


class MicroBatcher:
    """Merges concurrent requests into micro-batches for ``RewardScorer.score``; never two forwards at once."""

    def __init__(self, scorer: RewardScorer, settings: ServerSettings):
        self.scorer, self.settings = scorer, settings
        self.stats = BatchStats()
        self.pending_items = 0  # queued or being scored: bounds the memory held by waiting requests
        self._queue: asyncio.Queue[_Pending] | None = None
        self._arrived: asyncio.Event | None = None  # set by every put: lets _collect wait without consuming
        self._carry: _Pending | None = None  # a request that did not fit the last batch: first in the next
        self._task: asyncio.Task | None = None
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlrm-model")

    async def start(self) -> None:
        self._queue, self._arrived = asyncio.Queue(), asyncio.Event()  # created here, on the server's event loop
        self._task = asyncio.create_task(self._run(), name="vlrm-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._model_thread.shutdown(wait=True)  # a forward in progress finishes; nothing new starts

    async def score(self, rows: list[dict], normalize: bool) -> np.ndarray:
        if self.pending_items + len(rows) > self.settings.max_pending_items:
            raise RequestError(
                f"server busy: {self.pending_items} items waiting (--max_pending_items="
                f"{self.settings.max_pending_items}); retry shortly",
                status=503,
            )
        pending = _Pending(rows, normalize, asyncio.get_running_loop().create_future())
        self.pending_items += len(rows)
        try:
            self._queue.put_nowait(pending)
            self._arrived.set()
            return await pending.future
        finally:
            self.pending_items -= len(rows)

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            try:
                await self._score_batch(batch)
            except Exception:  # the worker must not die: every later request would wait forever
                logger.exception("unexpected error in the batcher")
                for pending in batch:
                    _resolve(pending, exception=RequestError("internal error; see the server log", status=500))

    async def _collect(self) -> list[_Pending]:
        """The next micro-batch: the first waiting request, then whatever joins within ``max_wait_ms``, up to
        ``max_batch_size`` items (a request is never split; one larger than the limit goes alone)."""
        loop = asyncio.get_running_loop()
        first, self._carry = self._carry or await self._queue.get(), None
        batch, num_items = [first], len(first.rows)
        deadline = loop.time() + self.settings.max_wait_ms / 1000
        while num_items < self.settings.max_batch_size:
            if self._queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:  # wait on the event, not on queue.get(): a get() cancelled by the timeout could drop a request
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
                continue
            following = self._queue.get_nowait()  # one that arrived while the model was busy is taken at once
            if num_items + len(following.rows) > self.settings.max_batch_size:
                self._carry = following
                break
            batch.append(following)
            num_items += len(following.rows)
        return batch

    async def _score_batch(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        rows = [row for pending in batch for row in pending.rows]
        try:
            rewards = await loop.run_in_executor(self._model_thread, self._forward, rows)
        except Exception:
            self.stats.failed_batches += 1
            logger.exception("scoring a micro-batch of %d requests failed", len(batch))
            if len(batch) > 1:  # one request's failure must not fail the others: score each alone
                for pending in batch:
                    await self._score_batch([pending])
                return
            _resolve(batch[0], exception=RequestError("internal error while scoring; see the server log", status=500))
            return
        offset = 0
        for pending in batch:
            own = rewards[offset : offset + len(pending.rows)]
            offset += len(pending.rows)
            _resolve(pending, self.scorer.normalized(own) if pending.normalize else own)

    def _forward(self, rows: list[dict]) -> np.ndarray:
        """Runs in the model thread."""
        rewards = self.scorer.score(rows, batch_size=self.settings.max_batch_size)
        if np.isnan(rewards).any():  # the parser checked every length against the scorer's own limit
            raise RuntimeError("the scorer returned NaN for a row the length check accepted")
        self.stats.batches += 1
        self.stats.items += len(rows)
        self.stats.largest_batch = max(self.stats.largest_batch, len(rows))
        return rewards


def _resolve(pending: _Pending, rewards: np.ndarray | None = None, exception: Exception | None = None) -> None:
    if pending.future.done():  # the client went away and its handler was cancelled
        return
    if exception is not None:
        pending.future.set_exception(exception)
    else:
        pending.future.set_result(rewards)


# ----------------------------------------------------------------------------------------------------------------
# The app


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"body of {declared} bytes, over --max_body_bytes={limit}", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():  # a chunked body has no Content-Length: count as it arrives
        size += len(chunk)
        if size > limit:
            raise RequestError(f"body over --max_body_bytes={limit}", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def _authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("x-api-key")
    authorization = request.headers.get("authorization", "")
    if given is None and authorization[:7].lower() == "bearer ":
        given = authorization[7:].strip()
    if given is None:
        raise RequestError("missing API key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`", status=401)
    if not hmac.compare_digest(given.encode(), api_key.encode()):  # constant time: no timing hint at the key
        raise RequestError("wrong API key", status=401)


def create_app(scorer: RewardScorer, settings: ServerSettings, checkpoint_dir: str | Path) -> FastAPI:
    """The FastAPI app serving ``scorer``. Raises ValueError when ``settings.normalize`` is set and the checkpoint
    records no reward statistics."""
    if settings.normalize and (scorer.reward_mean is None or not scorer.reward_std):
        raise ValueError(f"{checkpoint_dir}: {NO_REWARD_STATS}: serve without --normalize")
    parser = RequestParser(scorer, settings)
    batcher = MicroBatcher(scorer, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="vlrm reward server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher, app.state.parser = batcher, parser
    _add_error_handlers(app)

    async def rewards_for(request: Request, parse) -> dict:
        _authorize(request, settings.api_key)
        body = await _read_body(request, settings.max_body_bytes)
        rows, normalize = await run_in_threadpool(parse, body)  # decoding images must not block the event loop
        batcher.stats.requests += 1
        return {"rewards": (await batcher.score(rows, normalize)).tolist()}

    @app.post("/score")
    async def score(request: Request) -> dict:
        return await rewards_for(request, parser.score_request)

    @app.post("/get_reward")
    async def get_reward(request: Request) -> dict:
        return await rewards_for(request, parser.get_reward_request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/info")
    async def info(request: Request) -> dict:
        _authorize(request, settings.api_key)
        return _info(scorer, settings, checkpoint_dir, batcher)

    return app


def _info(scorer: RewardScorer, settings: ServerSettings, checkpoint_dir: str | Path, batcher: MicroBatcher) -> dict:
    normalization = None
    if scorer.reward_mean is not None and scorer.reward_std:
        normalization = {"reward_mean": float(scorer.reward_mean), "reward_std": float(scorer.reward_std)}
    limits = {
        name: getattr(settings, name)
        for name in ("max_items", "max_images", "max_pixels_per_image", "max_body_bytes", "max_pending_items")
    }
    return {
        "checkpoint": str(Path(checkpoint_dir).resolve()),
        "step": checkpoint_step(checkpoint_dir),
        "normalization": normalization,
        "normalize_default": settings.normalize,
        "limits": dict(limits, max_seq_length=scorer.max_seq_length, image_root=settings.image_root),
        "batching": {"max_batch_size": settings.max_batch_size, "max_wait_ms": settings.max_wait_ms},
        "model": {"device": str(scorer.device), "dtype": str(scorer.model.dtype), "packing": scorer.packing},
        "api_key_required": settings.api_key is not None,
        "stats": asdict(batcher.stats) | {"pending_items": batcher.pending_items},
    }


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in one JSON shape, ``{"error", "item", "field"}``, 4xx for the client's mistakes."""

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        where = "" if error.item is None else f" item {error.item}"
        where += "" if error.field is None else f" field {error.field}"
        logger.info("%s %s -> %d%s: %s", request.method, request.url.path, error.status, where, error.message)
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:  # 404, 405
        return RequestError(str(error.detail), status=error.status_code).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return RequestError("internal error; see the server log", status=500).response()
