"""Videos as the families' own tooling samples them: decoded once with PyAV, frames drawn and resized by
``qwen-vl-utils``' rules, kept with the metadata the processor turns into timestamps.

A video in a canonical row (``videos``, one per ``{"type": "video"}`` part) is a path (relative to the data file),
raw bytes, ``{"bytes", "path"}``, a list of frame images, or a directory of frame images (read in name order, as
MM-RLHF's evaluation script stores its videos). ``sample_video`` turns any of them into a **sampled
video**::

    {"frames": [PIL RGB images], "fps": source fps, "frames_indices": [sampled frame numbers],
     "total_num_frames": frames in the source, "key": what makes two videos the same}

- Frames: ``qwen_vl_utils.smart_nframes`` (``video_fps`` frames a second, between ``video_min_frames`` and
  ``video_max_frames``, an even count), evenly spaced (``linspace(0, total - 1, n).round()``, as qwen-vl-utils reads
  them); a frame list is taken whole at ``video_fps`` (padded to an even count with its last frame, as qwen-vl-utils
  pads it).
- Size: ``qwen_vl_utils.smart_resize`` to a multiple of the family's patch factor (patch size x merge size: 28 for
  Qwen2/2.5-VL, 32 for Qwen3-VL and Qwen3.5), each frame's area within ``video_min_pixels`` and the per-frame cap
  ``max(min(video_max_pixels, video_total_pixels / n x 2), 1.05 x video_min_pixels)``; bicubic with antialias, as
  qwen-vl-utils resizes (then rounded to 8 bits).
- The processor then receives the frames with ``do_sample_frames=False`` and a ``VideoMetadata`` of the source fps
  and the sampled frame numbers, so Qwen2.5-VL's ``second_per_grid_ts`` and Qwen3-VL's / Qwen3.5's frame timestamps
  are the processor's own computation (``vlrm.layout.encoder``).

Why PyAV: it ships FFmpeg inside its wheel (no system FFmpeg, any CUDA or none), it is already installed with
``qwen-vl-utils``, and it reads the container header without decoding (the server's limits). torchvision's
``read_video``, qwen-vl-utils' fallback, is gone from torchvision 0.29; torchcodec needs a matching torch build and a
system FFmpeg; decord is unmaintained. ``vlrm.data.prepare`` samples each video once and stores its frames (lossless
PNG) in the prepared set, so no epoch and no rank decodes a video again.
"""

from __future__ import annotations

import fractions
import hashlib
import io
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from qwen_vl_utils import vision_process
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as transforms

from vlrm.data.images import resolve_image, to_rgb
from vlrm.errors import RowProblem

DEFAULT_FACTOR = 28  # Qwen2/2.5-VL: 14-pixel patches, 2 x 2 merged


@dataclass(frozen=True)
class VideoSettings:
    """How videos are sampled (the ``video_*`` config keys). ``None`` pixel budgets take qwen-vl-utils' defaults for
    the family's patch factor: ``VIDEO_MIN_TOKEN_NUM`` (128) and ``VIDEO_MAX_TOKEN_NUM`` (768) merged patches a frame,
    ``MODEL_SEQ_LEN`` x 0.9 in all."""

    fps: float = vision_process.FPS
    min_frames: int = vision_process.FPS_MIN_FRAMES
    max_frames: int = vision_process.FPS_MAX_FRAMES
    min_pixels: int | None = None
    max_pixels: int | None = None
    total_pixels: int | None = None

    def budget(self, factor: int) -> tuple[int, int, float]:
        """(min, max, total) pixels for a family whose patches merge to ``factor`` pixels."""
        min_pixels = self.min_pixels or vision_process.VIDEO_MIN_TOKEN_NUM * factor * factor
        max_pixels = self.max_pixels or vision_process.VIDEO_MAX_TOKEN_NUM * factor * factor
        total = self.total_pixels or vision_process.MODEL_SEQ_LEN * factor * factor * 0.9
        return min_pixels, max_pixels, total

    def identity(self) -> dict[str, Any]:
        return {item.name: getattr(self, item.name) for item in fields(self)}

    @classmethod
    def from_values(cls, recorded: dict | None = None, **overrides: Any) -> VideoSettings:
        """Settings from a checkpoint's recorded ``vlrm_video_sampling`` (``identity()``), overridden by the
        ``overrides`` that are not None."""
        values = {name: value for name, value in (recorded or {}).items() if name in {f.name for f in fields(cls)}}
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**values)


@dataclass(frozen=True)
class VideoHeader:
    """What a container's header says, read without decoding a frame."""

    num_frames: int  # 0 when the container does not say
    fps: float
    duration: float  # seconds
    width: int
    height: int


def _source(value: Any, base_dir: Path | None, field_name: str) -> tuple[bytes | None, str | None]:
    """(bytes, path) of a video value that is a file; raises for what is neither."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data, path = bytes(value), None
    elif isinstance(value, (str, Path)):
        data, path = None, str(value)
    else:
        raise RowProblem(field_name, f"unsupported video value of type {type(value).__name__}")
    if data is None:
        if not path:
            raise RowProblem(field_name, "video has neither bytes nor a path")
        resolved = Path(path) if Path(path).is_absolute() or base_dir is None else base_dir / path
        if not resolved.is_file():
            raise RowProblem(field_name, f"video file not found: {resolved}")
        path = str(resolved)
    return data, path


def _open(data: bytes | None, path: str | None, field_name: str):
    import av  # PyAV: imported here so that rows without video never load FFmpeg

    try:
        container = av.open(io.BytesIO(data) if data is not None else path)
    except Exception as error:  # PyAV raises its own error types for every kind of bad file
        raise RowProblem(field_name, f"cannot open video {path or '<bytes>'}: {error}") from error
    if not container.streams.video:
        container.close()
        raise RowProblem(field_name, f"no video stream in {path or '<bytes>'}")
    return container


def read_header(value: Any, base_dir: Path | None = None, field_name: str = "videos") -> VideoHeader:
    """The container header of a video file (no frame decoded): what the server's limits are checked against."""
    data, path = _source(value, base_dir, field_name)
    with _open(data, path, field_name) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = (container.duration or 0) / 1_000_000
        context = stream.codec_context
        return VideoHeader(int(stream.frames or 0), fps, duration, int(context.width or 0), int(context.height or 0))


def _count_frames(container) -> int:
    """Frames of the first video stream, from its packets (no decoding), for containers whose header has no count."""
    stream = container.streams.video[0]
    count = sum(1 for packet in container.demux(stream) if packet.size)
    if count:  # nothing to rewind to without packets (and some demuxers refuse the seek then)
        container.seek(0)
    return count


def _decode(value: Any, base_dir: Path | None, settings: VideoSettings, field_name: str):
    """(frames [n, H, W, 3] uint8, source fps, sampled frame numbers, total frames, key) of a video file."""
    data, path = _source(value, base_dir, field_name)
    name = path or "<bytes>"
    with _open(data, path, field_name) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        total = int(stream.frames or 0) or _count_frames(container)
        if total == 0 or fps <= 0:
            raise RowProblem(field_name, f"video {name} has no frames")
        wanted = _frame_indices(settings, total, fps, name, field_name)
        wanted_set = set(wanted)
        frames: list[np.ndarray | None] = [None] * len(wanted)
        try:
            for number, frame in enumerate(container.decode(stream)):
                if number in wanted_set:
                    array = frame.to_ndarray(format="rgb24")
                    for slot, index in enumerate(wanted):  # linspace may draw a frame twice on short videos
                        if index == number:
                            frames[slot] = array
                if number >= wanted[-1]:
                    break
        except Exception as error:  # a corrupt packet mid-stream
            raise RowProblem(field_name, f"cannot decode video {name}: {error}") from error
    decoded = sum(frame is not None for frame in frames)
    if decoded < len(wanted):
        raise RowProblem(
            field_name, f"video {name} is truncated or undecodable: {decoded} of the {len(wanted)} sampled frames "
            f"(of {total} in its header) decoded"
        )  # fmt: skip
    digest = hashlib.sha1(data if data is not None else Path(path).read_bytes()).hexdigest()
    return np.stack(frames), fps, wanted, total, digest


def _frame_indices(settings: VideoSettings, total: int, fps: float, name: str, field_name: str) -> list[int]:
    element = {"fps": settings.fps, "min_frames": settings.min_frames, "max_frames": min(settings.max_frames, total)}
    if total < vision_process.FRAME_FACTOR:
        raise RowProblem(field_name, f"video {name} has {total} frame(s); at least {vision_process.FRAME_FACTOR}")
    try:
        count = vision_process.smart_nframes(element, total_frames=total, video_fps=fps)
    except ValueError as error:
        raise RowProblem(field_name, f"video {name}: {error}") from error
    return torch.linspace(0, total - 1, count).round().long().tolist()


def resize_frames(frames: np.ndarray, settings: VideoSettings, factor: int) -> np.ndarray:
    """``[n, H, W, 3]`` uint8 resized as qwen-vl-utils' ``fetch_video`` resizes (module docstring)."""
    count, height, width, _ = frames.shape
    min_pixels, max_pixels, total = settings.budget(factor)
    frame_cap = max(min(max_pixels, total / count * vision_process.FRAME_FACTOR), int(min_pixels * 1.05))
    new_height, new_width = vision_process.smart_resize(height, width, factor, min_pixels, frame_cap)
    if (new_height, new_width) == (height, width):
        return frames
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    resized = transforms.resize(video, [new_height, new_width], InterpolationMode.BICUBIC, antialias=True)
    return resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def is_frame_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and not isinstance(value, (bytes, bytearray))


def frame_directory(value: Any, base_dir: Path | None) -> list[Path] | None:
    """The frame images of a video given as a directory path (in name order), or None when it is not a directory."""
    if not isinstance(value, (str, Path)):
        return None
    path = Path(value) if Path(value).is_absolute() or base_dir is None else base_dir / value
    if not path.is_dir():
        return None
    return sorted(file for file in path.iterdir() if file.suffix.lower() in FRAME_SUFFIXES)


def is_sampled(value: Any) -> bool:
    return isinstance(value, dict) and "frames" in value and "frames_indices" in value


def _frame_list(value: list, base_dir: Path | None, settings: VideoSettings, field_name: str):
    if not value:
        raise RowProblem(field_name, "a video given as frames has no frame")
    arrays, keys = [], []
    for frame in value:
        if not isinstance(frame, Image.Image):
            resolved, _ = resolve_image(frame, base_dir)
            frame = Image.open(io.BytesIO(resolved["bytes"]) if resolved["bytes"] is not None else resolved["path"])
        rgb = to_rgb(frame)
        arrays.append(np.asarray(rgb))
        keys.append(hashlib.sha1(rgb.tobytes()).hexdigest())
    if len({array.shape for array in arrays}) > 1:
        raise RowProblem(field_name, f"a video's frames differ in size: {sorted({a.shape for a in arrays})}")
    count = math.ceil(len(arrays) / vision_process.FRAME_FACTOR) * vision_process.FRAME_FACTOR
    arrays += [arrays[-1]] * (count - len(arrays))
    digest = hashlib.sha1("".join(keys).encode()).hexdigest()
    return np.stack(arrays), settings.fps, list(range(count)), count, digest


def sample_video(
    value: Any, settings: VideoSettings | None = None, factor: int = DEFAULT_FACTOR, base_dir: Path | None = None,
    field_name: str = "videos",
) -> dict[str, Any]:  # fmt: skip
    """The sampled video (module docstring) of any accepted video value; a sampled video comes back as it is. Raises
    ``RowProblem`` naming ``field_name`` for a missing, truncated, zero-frame or undecodable video."""
    if is_sampled(value):
        return value
    settings = settings or VideoSettings()
    directory = frame_directory(value, base_dir)
    if directory is not None:
        if not directory:
            raise RowProblem(field_name, f"video directory {value} holds no frame image ({', '.join(FRAME_SUFFIXES)})")
        value = [str(frame) for frame in directory]
    if is_frame_list(value):
        frames, fps, indices, total, digest = _frame_list(list(value), base_dir, settings, field_name)
    else:
        frames, fps, indices, total, digest = _decode(value, base_dir, settings, field_name)
    frames = resize_frames(frames, settings, factor)
    key = hashlib.sha1(f"{digest}:{factor}:{sorted(settings.identity().items())}".encode()).hexdigest()
    return {
        "frames": [Image.fromarray(frame) for frame in frames],
        "fps": float(fps),
        "frames_indices": [int(index) for index in indices],
        "total_num_frames": int(total),
        "key": key,
    }


def frames_array(video: dict[str, Any]) -> np.ndarray:
    """``[n, H, W, 3]`` uint8 frames of a sampled video (PIL frames, or Arrow's decoded ones)."""
    return np.stack(
        [np.asarray(to_rgb(frame) if isinstance(frame, Image.Image) else frame) for frame in video["frames"]]
    )


def stored_video(video: dict[str, Any]) -> dict[str, Any]:
    """A sampled video as the prepared set stores it: each frame PNG-encoded (lossless)."""

    def png(frame: Image.Image) -> dict[str, Any]:
        buffer = io.BytesIO()
        frame.save(buffer, format="PNG", compress_level=1)
        return {"bytes": buffer.getvalue(), "path": None}

    return {**video, "frames": [png(frame) for frame in video["frames"]]}


def write_clip(path: str | Path, frames: np.ndarray, fps: float, codec: str = "libx264") -> Path:
    """An mp4 of ``[n, H, W, 3]`` uint8 frames at ``fps`` (H.264, lossless, for synthetic sets and tests)."""
    import av

    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv444p"
        if codec == "libx264":
            stream.options = {"qp": "0", "preset": "ultrafast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
