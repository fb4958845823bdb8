"""Request bodies -> rows for ``RewardScorer.score``, or a ``RequestError`` naming the item and the field.

``/score`` items are a prompt (a question string, ``<image>`` / ``<video>`` markers placing the media, else videos
then images before the text; or chat messages with ``{"type": "image"}`` / ``{"type": "video"}`` parts), images,
videos and a response. Media are decoded here, in Starlette's thread pool, never on the model thread; a video that
several items of one request carry is decoded once (``media.VideoDecoder``).

``/get_reward`` queries (OpenRLHF's remote reward) are full texts, split into prompt and response with ``prompts`` or
at the last assistant header, the chat text read back into turns that must render to exactly that text (images
only: ``images``, one list per query).

Every item's tokens are counted against ``max_seq_length`` here, before it is queued: nothing is truncated. Both
bodies may ask ``"normalize"`` and, for a checkpoint with attribute heads, ``"attributes"`` (``ScoreOptions``).

A process checkpoint (``reward_type: process``, ``vlrm.use.process``) scores solutions step by step: a ``/score`` item
gives ``steps`` (a list of non-empty strings) or ``response`` (text, split at the checkpoint's step separator, as
``split_steps`` splits a completion in RL), and its row carries ``steps``; a ``/get_reward`` query's response is split
alike. ``normalize`` is refused for it (its scores are probabilities already).
"""

from __future__ import annotations

import copy
import json
import re
import threading
from dataclasses import dataclass
from typing import Any

from vlrm.data.rows import user_prompt
from vlrm.layout.encoder import PreferenceEncoder
from vlrm.use.process import split_steps
from vlrm.use.scoring import RewardScorer
from vlrm.use.server.media import ImageDecoder, VideoDecoder
from vlrm.use.server.settings import NO_REWARD_STATS, PROCESS_NOT_NORMALIZED, RequestError, ServerSettings, kind_of

ITEM_FIELDS = ("prompt", "images", "videos", "response")
PROCESS_ITEM_FIELDS = ("prompt", "images", "videos", "steps", "response")  # steps or response
ROLES = ("system", "user", "assistant")
ASSISTANT_HEADER = "<|im_start|>assistant\n"
VISION_PLACEHOLDER = re.compile(r"<\|vision_start\|>(?:<\|image_pad\|>)+<\|vision_end\|>")
TURN = re.compile(r"<\|im_start\|>(system|user|assistant)\n(.*?)<\|im_end\|>\n?", re.S)


@dataclass(frozen=True)
class ScoreOptions:
    """What a request asks besides its rows: ``normalize`` the rewards, and add each attribute's rewards to the reply
    (``attributes``; a checkpoint with ``reward_attributes``, ``vlrm.model.heads``)."""

    normalize: bool = False
    attributes: bool = False


def _json_object(body: bytes, allowed: tuple[str, ...]) -> dict:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RequestError(f"invalid JSON: {error}") from error
    if not isinstance(payload, dict):
        raise RequestError(f"the body must be a JSON object, got {kind_of(payload)}")
    unknown = [key for key in payload if key not in allowed]
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}; expected: {', '.join(allowed)}", field=unknown[0])
    return payload


def _text(value: Any, item: int, field_name: str) -> str:
    if not isinstance(value, str):
        raise RequestError(f"expected a string, got {kind_of(value)}", item, field_name)
    if not value.strip():
        raise RequestError("is empty", item, field_name)
    return value


def _messages(prompt: Any, num_images: int, item: int, field_name: str, num_videos: int = 0) -> list[dict]:
    """A question string (``<image>`` / ``<video>`` markers place the media) or chat messages -> validated chat
    messages."""
    if isinstance(prompt, str):
        return user_prompt(_text(prompt, item, field_name), num_images, num_videos)
    if not isinstance(prompt, list) or not prompt:
        raise RequestError(
            f"expected a question string or a non-empty list of {{role, content}} messages, got {kind_of(prompt)}",
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
    """An inline image or video (``{"type": "image", "image": url}``) is refused: media travel in the item's
    ``images`` and ``videos``."""
    if isinstance(part, dict) and set(part) <= {"type", "text"}:
        if part.get("type") in ("image", "video") and part.get("text") is None:
            return {"type": part["type"], "text": None}
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            return {"type": "text", "text": part["text"]}
    raise RequestError(
        f"{where}: expected {{type: text, text: str}}, {{type: image}} or {{type: video}}, got {part!r:.80}",
        item, field_name,
    )  # fmt: skip


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
        self.encoder = PreferenceEncoder(
            copy.deepcopy(scorer.processor), scorer.encoder.video_settings, scorer.process["step_separator"]
        )
        # A process checkpoint: items are solutions of steps, counted as the scorer encodes them (encode_steps).
        self.process = scorer.process["reward_type"] == "process"
        self.step_separator = scorer.process["step_separator"]
        self.item_fields = PROCESS_ITEM_FIELDS if self.process else ITEM_FIELDS
        self.tokenizer_lock = threading.Lock()
        self.images = ImageDecoder(settings.image_root, settings.max_pixels_per_image, settings.max_body_bytes)
        # Sampled with the scorer's video settings and patch factor (the same processor), so the frames are the ones
        # the scorer would draw from the same file.
        self.videos = VideoDecoder(settings, self.encoder.sample_video)
        self.settings, self.max_seq_length = settings, scorer.max_seq_length
        self.can_normalize = scorer.can_normalize
        self.attribute_names = scorer.attribute_names
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

    def score_request(self, body: bytes) -> tuple[list[dict], ScoreOptions]:
        payload = _json_object(body, ("items", "normalize", "attributes"))
        items = self._list(payload, "items")
        options = self._options(payload)
        rows, videos = [], {}  # videos: this request's decoded videos by content, each decoded once
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise RequestError(f"expected an object {{{', '.join(self.item_fields)}}}, got {kind_of(item)}", index)
            unknown = [key for key in item if key not in self.item_fields]
            if "steps" in unknown:  # an outcome checkpoint: a likelier mistake than an unknown field
                raise RequestError(
                    "this checkpoint is an outcome reward model (one reward per response): send `response`; `steps` "
                    "needs a checkpoint trained with reward_type: process (GET /info says which this is)",
                    index, "steps",
                )  # fmt: skip
            if unknown:
                raise RequestError(f"unknown field; expected: {', '.join(self.item_fields)}", index, unknown[0])
            if "prompt" not in item:
                raise RequestError("missing", index, "prompt")
            if not self.process and "response" not in item:
                raise RequestError("missing", index, "response")
            if self.process and ("steps" in item) == ("response" in item):
                raise RequestError(
                    "give either `steps` (a list of strings) or `response` (text, split at the step separator "
                    f"{self.step_separator!r}), " + ("not both" if "steps" in item else "one of them is missing"),
                    index, "steps",
                )  # fmt: skip
            media = {"images": item.get("images", []), "videos": item.get("videos", []), "decoded_videos": videos}
            answer = {"response": item.get("response"), "steps": item.get("steps")}
            rows.append(self._row(index, item["prompt"], **answer, **media))
        return rows, options

    def get_reward_request(self, body: bytes) -> tuple[list[dict], ScoreOptions]:
        """OpenRLHF sends ``labels`` too; they are accepted and ignored (a reward model does not read them)."""
        payload = _json_object(body, ("query", "prompts", "images", "labels", "normalize", "attributes"))
        queries = self._list(payload, "query")
        prompts = self._parallel_list(payload, "prompts", len(queries))
        images = self._parallel_list(payload, "images", len(queries))
        options = self._options(payload)
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
        return rows, options

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
            raise RequestError(f"expected a list, got {kind_of(value)}", field=name)
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

    def _options(self, payload: dict) -> ScoreOptions:
        attributes = payload.get("attributes", False)
        if not isinstance(attributes, bool):
            raise RequestError(f"expected true or false, got {kind_of(attributes)}", field="attributes")
        if attributes and self.attribute_names is None:
            raise RequestError(
                "this checkpoint has no attribute heads (reward_attributes in its config): ask without attributes",
                field="attributes",
            )
        return ScoreOptions(self._normalize(payload), attributes)

    def _normalize(self, payload: dict) -> bool:
        value = payload.get("normalize", self.settings.normalize)
        if not isinstance(value, bool):
            raise RequestError(f"expected true or false, got {kind_of(value)}", field="normalize")
        if value and self.process:
            raise RequestError(f"{PROCESS_NOT_NORMALIZED}: ask without normalize", field="normalize")
        if value and not self.can_normalize:
            raise RequestError(NO_REWARD_STATS, field="normalize")
        return value

    def _row(
        self, item: int, prompt: Any, images: Any, response: Any, prompt_field: str = "prompt",
        response_field: str = "response", videos: Any = (), decoded_videos: dict | None = None, steps: Any = None,
    ) -> dict:  # fmt: skip
        """The scorer's row of one item: checked cheaply first (types, counts, places), then its media decoded and its
        tokens counted. ``decoded_videos``: the request's videos decoded so far, shared by its items. A process
        checkpoint's row has ``steps`` (given, or ``response`` split) instead of ``response``."""
        if not isinstance(images, list):
            raise RequestError(f"expected a list of images, got {kind_of(images)}", item, "images")
        if len(images) > self.settings.max_images:
            raise RequestError(f"{len(images)} images, over --max_images={self.settings.max_images}", item, "images")
        if not isinstance(videos, (list, tuple)):  # a tuple: the default, no videos (JSON gives lists)
            raise RequestError(f"expected a list of videos, got {kind_of(videos)}", item, "videos")
        if len(videos) > self.settings.max_videos:
            raise RequestError(f"{len(videos)} videos, over --max_videos={self.settings.max_videos}", item, "videos")
        if self.process:
            response_field = response_field if steps is None else "steps"  # where an over-long solution is named
            steps = self._steps(item, steps, response, response_field)
        else:
            response = _text(response, item, response_field)
        messages = _messages(prompt, len(images), item, prompt_field, len(videos))
        for kind, given in (("image", images), ("video", videos)):
            places = sum(part["type"] == kind for message in messages for part in message["content"])
            if places != len(given):
                raise RequestError(f"{len(given)} {kind}s but {places} {kind} places in the prompt", item, f"{kind}s")
        decoded = [self.images.decode(value, item, f"images[{index}]") for index, value in enumerate(images)]
        decoded_videos = {} if decoded_videos is None else decoded_videos
        sampled = [
            self.videos.decode(value, item, f"videos[{index}]", decoded_videos) for index, value in enumerate(videos)
        ]
        answer = {"steps": steps} if self.process else {"response": response}
        self._check_length(item, messages, decoded, answer, prompt_field, response_field, sampled)
        return {"prompt": messages, "images": decoded, "videos": sampled} | answer

    def _steps(self, item: int, steps: Any, response: Any, response_field: str) -> list[str]:
        """A process item's steps: the list given, each a non-empty string, or its response split at the step
        separator (``split_steps``: pieces stripped, empty ones dropped) into at least one step."""
        if steps is None:
            pieces = split_steps(_text(response, item, response_field), self.step_separator)
            if not pieces:
                raise RequestError(
                    f"has no step: only the step separator {self.step_separator!r} and spaces", item, response_field
                )
            return pieces
        if not isinstance(steps, list):
            raise RequestError(f"expected a list of steps (strings), got {kind_of(steps)}", item, "steps")
        if not steps:
            raise RequestError("is empty: a solution needs at least one step", item, "steps")
        return [_text(step, item, f"steps[{index}]") for index, step in enumerate(steps)]

    def _check_length(
        self, item: int, messages: list, images: list, answer: dict, prompt_field: str, response_field: str,
        videos: list[dict],
    ) -> None:  # fmt: skip
        with self.tokenizer_lock:
            try:
                prompt_tokens = self.encoder.prompt_length(messages, images)
            except ValueError as error:  # the image processor refuses some shapes (aspect ratio over 200)
                raise RequestError(f"the image processor refuses an image: {error}", item, "images") from error
            try:  # prompt_length(messages, images, videos) in two steps, so that a refusal names its field
                prompt_tokens += sum(self.encoder.video_expansion(video) for video in videos)
            except ValueError as error:
                raise RequestError(f"the video processor refuses a video: {error}", item, "videos") from error
            if "steps" in answer:  # as score_steps counts a solution: each step with its separator, the last its end
                response_tokens = len(self.encoder.encode_steps(answer["steps"])[0])
            else:
                response_tokens = len(self.encoder.encode_response(answer["response"]))
        total = prompt_tokens + response_tokens
        if self.max_seq_length is not None and total > self.max_seq_length:
            what = "steps" if "steps" in answer else "response"
            raise RequestError(
                f"{total} tokens (prompt {prompt_tokens} with visual tokens, {what} {response_tokens}), over "
                f"max_seq_length={self.max_seq_length}: not scored (never truncated)",
                item, prompt_field if prompt_tokens >= self.max_seq_length else response_field,
            )  # fmt: skip
