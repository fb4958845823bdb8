"""``PreferenceEncoder``: what turns a canonical row into token ids and image tensors, for both layouts.

It renders prompts with the checkpoint's chat template and runs the processor on them, tokenizes responses with the
turn's end token (where the reward is read), and counts a row's tokens, visual tokens included, from the images'
sizes alone (``vlrm.data.prepare`` counts every row once with it). ``apply_pixel_limits`` bounds the image area the
processor resizes to (the ``min_pixels`` / ``max_pixels`` config keys).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlrm.data.images import to_rgb
from vlrm.data.rankings import responses_of
from vlrm.data.videos import DEFAULT_FACTOR, VideoSettings, frames_array, sample_video


def open_image_header(image: Any) -> Image.Image:
    """A lazily opened PIL image from a decoded image, a path, raw bytes or an undecoded ``{"bytes", "path"}``
    dict."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict):
        image = io.BytesIO(image["bytes"]) if image.get("bytes") is not None else image["path"]
    elif isinstance(image, (bytes, bytearray)):
        image = io.BytesIO(image)
    return Image.open(image)


def open_image(image: Any) -> Image.Image:
    """The decoded RGB image the processor receives (``vlrm.data.images.to_rgb``: alpha on white, 16-bit scaled)."""
    return to_rgb(open_image_header(image))


_SENTINEL = "vlrm-response-sentinel"


def chat_end_of_turn(processor: Any) -> str:
    """The token that closes an assistant turn in the processor's chat template (``<|im_end|>``, ``<end_of_turn>``,
    ``</s>``...): the first special token the template writes after an assistant message; the tokenizer's eos token
    when it writes none."""
    tokenizer = processor.tokenizer
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Q"}]},
        {"role": "assistant", "content": [{"type": "text", "text": _SENTINEL}]},
    ]
    try:
        rendered = processor.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that cannot render this conversation: fall back to eos
        return tokenizer.eos_token
    after = rendered.rsplit(_SENTINEL, 1)[-1].lstrip(" ")
    special = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()), key=len, reverse=True)
    return next((token for token in special if token and after.startswith(token)), tokenizer.eos_token)


@dataclass
class EncodedPrompt:
    input_ids: list[int]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    second_per_grid_ts: torch.Tensor | None = None  # Qwen2.5-VL: seconds per temporal patch, one per video


def video_metadata(video: dict) -> Any:
    """The ``VideoMetadata`` the processor computes a video's timestamps from: the source fps and the sampled frame
    numbers (``vlrm.data.videos``)."""
    from transformers.video_utils import VideoMetadata

    frames = video["frames"]
    first = frames[0] if isinstance(frames[0], Image.Image) else Image.fromarray(np.asarray(frames[0]))
    return VideoMetadata(
        total_num_frames=int(video["total_num_frames"]),
        fps=float(video["fps"]),
        frames_indices=list(video["frames_indices"]),
        width=first.width,
        height=first.height,
    )


class PreferenceEncoder:
    """Renders prompts with the chat template and runs the processor; tokenizes responses separately.

    A prompt ends with the assistant header (``add_generation_prompt``); a response is its text plus the turn's end
    token (``<|im_end|>`` for Qwen, ``<end_of_turn>`` for Gemma: ``chat_end_of_turn``), the token whose hidden state
    the reward is read from.

    Two encodings: Qwen-style processors (an image processor with ``merge_size``, patch rows plus ``image_grid_thw``;
    ``grid_images``) have the packed layout and count visual tokens from an image's size alone. Any other
    image-text-to-text processor goes through ``pad_with_processor``: the padded layout, the processor's own image
    tensors (``token_type_ids``, ``image_sizes``, ...) passed to the model as they come.
    """

    def __init__(self, processor: Any, video_settings: VideoSettings | None = None, step_separator: str = "\n\n"):
        self.processor = processor
        self.step_separator = step_separator
        self.tokenizer = processor.tokenizer
        self.grid_images = getattr(getattr(processor, "image_processor", None), "merge_size", None) is not None
        self.end_of_turn = chat_end_of_turn(processor)
        self.image_token_id = getattr(processor, "image_token_id", None) if self.grid_images else None
        self.video_token_id = getattr(processor, "video_token_id", None) if self.grid_images else None
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.convert_tokens_to_ids(self.end_of_turn)
        self._image_expansion: dict[tuple[int, int], int] = {}
        self.video_settings = video_settings or VideoSettings()
        video_processor = getattr(processor, "video_processor", None)
        self.video_factor = (
            video_processor.patch_size * video_processor.merge_size
            if getattr(video_processor, "merge_size", None)
            else DEFAULT_FACTOR
        )
        self._video_expansion: dict[tuple, int] = {}

    def sample_video(self, video: Any) -> dict:
        """A video value sampled with this encoder's settings and its family's patch factor (``vlrm.data.videos``);
        an already sampled video as it is."""
        return sample_video(video, self.video_settings, self.video_factor)

    def mm_token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """1 on image tokens, 2 on video tokens, 0 elsewhere: what ``get_rope_index`` groups a prompt by."""
        types = (input_ids == self.image_token_id).long()
        if self.video_token_id is not None:
            types = types + 2 * (input_ids == self.video_token_id).long()
        return types

    def prompt_text(self, prompt: list[dict]) -> str:
        return self.processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

    def encode_prompt(self, prompt: list[dict], images: list, videos: list | None = None) -> EncodedPrompt:
        text = self.prompt_text(prompt)
        if not images and not videos:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return EncodedPrompt(ids, None, None)
        if not self.grid_images:
            raise ValueError(
                f"{type(self.processor).__name__} has no Qwen-style image grid: its prompts go through "
                "pad_with_processor (the padded layout)" + ("; videos need a Qwen-style processor" if videos else "")
            )
        arguments: dict[str, Any] = {"text": [text], "return_tensors": "pt", "add_special_tokens": False}
        if images:
            arguments["images"] = [open_image(image) for image in images]
        if videos:
            arguments.update(self.video_arguments(videos))
        encoded = self.processor(**arguments)
        return EncodedPrompt(
            encoded["input_ids"][0].tolist(),
            encoded.get("pixel_values"),
            encoded.get("image_grid_thw"),
            encoded.get("pixel_values_videos"),
            encoded.get("video_grid_thw"),
            _as_tensor(encoded.get("second_per_grid_ts")),
        )

    def video_arguments(self, videos: list) -> dict[str, Any]:
        """The processor's video arguments: the sampled frames as they are (``do_sample_frames=False``,
        ``do_resize=False``: ``vlrm.data.videos`` sampled and sized them as qwen-vl-utils does, to multiples of the
        patch factor) and their metadata, from which the processor computes timestamps."""
        sampled = [self.sample_video(video) for video in videos]
        return {
            "videos": [frames_array(video) for video in sampled],
            "videos_kwargs": {
                "video_metadata": [video_metadata(video) for video in sampled],
                "do_sample_frames": False,
                "do_resize": False,  # for the videos only: images are resized by the processor as always
                "cap_pixels_per_frame": False,  # capped already, by qwen-vl-utils' rule (vlrm.data.videos)
            },
        }

    def encode_response(self, text: str) -> list[int]:
        return self.tokenizer(text + self.end_of_turn, add_special_tokens=False)["input_ids"]

    def encode_chain(self, responses: list[str], separator: str) -> tuple[list[int], list[int]]:
        """A joint chain's ids (``vlrm.layout.joint``) and the offset of each response's end-of-turn token (where its
        reward is read): each response + the turn's end token, the ones after the first preceded by ``separator``
        (``joint_separator``: what the chat template writes between two assistant turns), piece by piece as
        ``encode_steps`` does."""
        ids, ends = [], []
        for index, response in enumerate(responses):
            ids += self.tokenizer(
                (separator if index else "") + response + self.end_of_turn, add_special_tokens=False
            )["input_ids"]
            ends.append(len(ids) - 1)
        return ids, ends

    def encode_steps(self, steps: list[str]) -> tuple[list[int], list[int]]:
        """A solution's ids and, per step, the offset of its last token (where its score is read): each step's text
        and the step separator tokenized as one piece, the last step with the turn's end token instead, so the last
        step's score is read where an outcome reward is. Pieces are tokenized apart (a step's tokens never depend on
        the next one), the same in training and in use."""
        ids, ends = [], []
        for index, step in enumerate(steps):
            tail = self.end_of_turn if index == len(steps) - 1 else self.step_separator
            ids += self.tokenizer(step + tail, add_special_tokens=False)["input_ids"]
            ends.append(len(ids) - 1)
        return ids, ends

    def visual_tokens(self, image: Any) -> int:
        """Visual tokens an image (or a (width, height) size) becomes, from its size alone (no pixels are
        processed); Qwen-style processors only."""
        width, height = image if isinstance(image, tuple) else open_image_header(image).size
        image_processor = self.processor.image_processor
        patches = image_processor.get_number_of_image_patches(height, width, {})
        return patches // image_processor.merge_size**2

    def sequence_lengths(self, row: dict, image_sizes: list[tuple[int, int]] | None = None) -> tuple[int, int, int]:
        """(prompt, chosen, rejected) lengths in tokens, visual tokens included; the images' sizes (width, height)
        are read from their headers unless given."""
        prompt, responses = self.branch_lengths(row, image_sizes)
        if row.get("responses") is None:
            return prompt, responses[0], responses[1]
        texts = list(row["responses"])
        return prompt, responses[texts.index(row["chosen"])], responses[texts.index(row["rejected"])]

    def branch_lengths(self, row: dict, image_sizes: list[tuple[int, int]] | None = None) -> tuple[int, list[int]]:
        """(prompt, [each response]) lengths in tokens, visual tokens included; a pair's responses are chosen and
        rejected (``vlrm.data.rankings.responses_of``)."""
        if row.get("steps") is not None:  # process rows: each solution's steps, piece by piece (encode_steps)
            lengths = [len(self.encode_steps(list(steps))[0]) for steps in row["steps"]]
            return self.prompt_length(row["prompt"], image_sizes or row["images"], row.get("videos")), lengths
        texts = [self.prompt_text(row["prompt"])] + [text + self.end_of_turn for text in responses_of(row)]
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        # One call into the Rust tokenizer (this runs once per row of every data set), unless a padded call left its
        # padding or truncation switched on (the generic path's processor call does).
        if backend is not None and backend.padding is None and backend.truncation is None:
            lengths = [len(encoding.ids) for encoding in backend.encode_batch(texts, False)]
        else:
            lengths = list(map(len, self.tokenizer(texts, add_special_tokens=False)["input_ids"]))
        return lengths[0] + self._visual_extra(image_sizes or row["images"], row.get("videos")), lengths[1:]

    def prompt_length(self, prompt: list[dict], images: list, videos: list | None = None) -> int:
        """Tokens of a rendered prompt, visual tokens included (images, or their (width, height) sizes; videos)."""
        text_ids = self.tokenizer(self.prompt_text(prompt), add_special_tokens=False)["input_ids"]
        return len(text_ids) + self._visual_extra(images, videos)

    def video_expansion(self, video: dict) -> int:
        """Tokens a sampled video adds to a rendered prompt beyond its placeholder (its visual tokens and, for
        Qwen3-VL and Qwen3.5, its timestamps): measured once per frame count, size and timing on blank frames (a
        video's tokens never depend on its pixels)."""
        metadata = video_metadata(video)
        key = (len(video["frames"]), metadata.width, metadata.height, metadata.fps, tuple(metadata.frames_indices))
        if key not in self._video_expansion:
            text = self.prompt_text([{"role": "user", "content": [{"type": "video"}]}])
            blank = {**video, "frames": [Image.new("RGB", (metadata.width, metadata.height))] * key[0]}
            expanded = self.processor(text=[text], add_special_tokens=False, **self.video_arguments([blank]))
            self._video_expansion[key] = len(expanded["input_ids"][0]) - len(
                self.tokenizer(text, add_special_tokens=False)["input_ids"]
            )
        return self._video_expansion[key]

    def _visual_extra(self, images: list, videos: list | None = None) -> int:
        # The rendered prompt holds one placeholder per image and video; the processor expands it to their tokens.
        extra = sum(self.video_expansion(self.sample_video(video)) for video in videos or [])
        if self.grid_images:
            return extra + sum(self.visual_tokens(image) - 1 for image in images)
        sizes = [image if isinstance(image, tuple) else open_image_header(image).size for image in images]
        return sum(self.image_expansion(size) for size in sizes)

    def image_expansion(self, size: tuple[int, int]) -> int:
        """Tokens an image of this (width, height) adds to a rendered prompt in a generic processor: measured once
        per size on a blank image (an image's tokens depend on its size, never on its pixels)."""
        if size not in self._image_expansion:
            text = self.prompt_text([{"role": "user", "content": [{"type": "image"}]}])
            blank = Image.new("RGB", size)
            expanded = self.processor(text=[text], images=[[blank]], add_special_tokens=False)["input_ids"][0]
            self._image_expansion[size] = len(expanded) - len(
                self.tokenizer(text, add_special_tokens=False)["input_ids"]
            )
        return self._image_expansion[size]


def joint_separator(processor: Any, end_of_turn: str) -> str:
    """What goes between two responses of a joint chain: the text the chat template writes after an assistant turn's
    end token and before the next assistant turn's content (Qwen: ``\n<|im_start|>assistant\n``), so a chain reads
    as the template's own consecutive assistant turns. Raises ``ValueError`` when the template cannot render two
    assistant turns in a row (Gemma's insists on alternating roles), with the fix."""
    first, second = f"{_SENTINEL} one.", f"{_SENTINEL} two."
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Q"}]},
        {"role": "assistant", "content": [{"type": "text", "text": first}]},
        {"role": "assistant", "content": [{"type": "text", "text": second}]},
    ]
    try:
        rendered = processor.apply_chat_template(messages, tokenize=False)
    except Exception as error:  # templates raise their own errors for role order
        raise ValueError(
            f"the chat template cannot render two assistant turns in a row ({error}): joint scoring lays a prompt's "
            "responses out as consecutive turns; use scoring_mode: independent with this model"
        ) from error
    after_first = rendered.split(first, 1)[1]
    if not after_first.startswith(end_of_turn) or second not in after_first:
        raise ValueError(f"the chat template does not end an assistant turn with {end_of_turn!r} before the next one")
    return after_first[len(end_of_turn) : after_first.index(second)]


def check_step_separator(processor: Any, separator: str, end_of_turn: str) -> None:
    """Raise ``ValueError`` unless ``separator`` can end a step: not empty, no end-of-turn token in it, and kept as
    it is by the chat template inside an assistant turn (a template that strips or rewrites it would show the model
    other text in use than in training)."""
    if not separator:
        raise ValueError("step_separator is empty: steps need a separator to end on (default: a blank line)")
    if end_of_turn and end_of_turn in separator:
        raise ValueError(f"step_separator {separator!r} holds the end-of-turn token {end_of_turn!r}")
    text = f"{_SENTINEL} one.{separator}{_SENTINEL} two."
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Q"}]},
        {"role": "assistant", "content": [{"type": "text", "text": text}]},
    ]
    rendered = processor.apply_chat_template(messages, tokenize=False)
    if text not in rendered:
        raise ValueError(
            f"the chat template does not keep step_separator {separator!r} inside an assistant turn: choose a "
            "separator it keeps (e.g. a blank line)"
        )


def _as_tensor(value: Any) -> torch.Tensor | None:
    if value is None or torch.is_tensor(value):
        return value
    return torch.tensor(value, dtype=torch.float32)


def apply_pixel_limits(processor: Any, min_pixels: int | None, max_pixels: int | None) -> None:
    """Bound the image area the processor resizes to; None keeps the processor's own setting."""
    if min_pixels or max_pixels:
        size = dict(processor.image_processor.size)
        if "longest_edge" not in size or "shortest_edge" not in size:
            raise ValueError(
                f"min_pixels / max_pixels bound the image area of Qwen-style processors; "
                f"{type(processor.image_processor).__name__} resizes images to {size}: leave them unset"
            )
        size["shortest_edge"] = min_pixels or size["shortest_edge"]
        size["longest_edge"] = max_pixels or size["longest_edge"]
        processor.image_processor.size = size
