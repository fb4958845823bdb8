"""Media in requests: data: URLs, base64 (images), or files under ``image_root``; the size checked from the header
before decoding; decoded as training decodes them (``vlrm.data.images.to_rgb``, ``vlrm.data.videos.sample_video``).
No URL is ever fetched.

A video's file size, frame size (width x height), frame count and length are checked against the server's limits
from its container header (``vlrm.data.videos.read_header``; a header without a frame count has its packets counted,
demuxed but not decoded) before a frame is decoded: a file that claims an hour of 8K frames costs a header read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from vlrm.data.images import to_rgb
from vlrm.data.videos import read_header
from vlrm.errors import RowProblem
from vlrm.use.server.settings import RequestError, ServerSettings, kind_of

URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:(//|/)")  # http://, https://, file:/, ftp://, ...
IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
# Raster formats only: Pillow would hand EPS to Ghostscript, and there is no reason to parse exotic formats here.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(IMAGE_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _shown(value: str, limit: int = 80) -> str:
    """A client's string in an error message, cut short: a megabyte of base64 must not come back in the reply."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"


def _strict_base64(text: str) -> bytes | None:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return None


def _data_url_bytes(value: str, item: int, field_name: str, example: str) -> bytes:
    """The payload of a ``data:...;base64,`` URL."""
    header, comma, payload = value.partition(",")
    if not comma or not header.endswith(";base64"):
        raise RequestError(f"only base64 data: URLs are accepted ({example})", item, field_name)
    data = _strict_base64(payload)
    if data is None:
        raise RequestError("invalid base64 in the data: URL", item, field_name)
    return data


def read_under_root(
    root: Path, value: str, item: int, field_name: str, kind: str, max_bytes: int, limit_flag: str = "",
    is_base64: bool = False,
) -> bytes:  # fmt: skip
    """The bytes of the ``kind`` ("image", "video") file a client names, relative to ``root`` or absolute inside it;
    ``..`` and symlinks are resolved first, so no file outside ``root`` is ever read. ``is_base64``: the string also
    decoded as base64 (of no image), which the errors then say."""
    shown = _shown(value)
    candidate = Path(value) if Path(value).is_absolute() else root / value
    try:
        resolved = candidate.resolve()  # follows every symlink and `..`, so the check below sees the real file
    except (OSError, RuntimeError, ValueError) as error:  # a symlink loop, a NUL byte
        raise RequestError(f"bad {kind} path {shown}: {error}", item, field_name) from error
    if not resolved.is_relative_to(root):
        raise RequestError(f"{kind} path {shown} is outside --image_root: refused", item, field_name)
    # Every file-system call below can raise OSError on what a client sends (ENAMETOOLONG for a long base64
    # string taken as a path, EACCES, EIO): each is the client's bad value, a 400, never the server's 500.
    try:
        if not resolved.is_file():
            if is_base64:
                raise RequestError(
                    f"decodes as base64, but not to a PNG, JPEG, GIF, WebP, BMP or TIFF file, and is no image "
                    f"file under --image_root either: {shown}",
                    item, field_name,
                )  # fmt: skip
            raise RequestError(f"{kind} file not found under --image_root: {shown}", item, field_name)
        if resolved.stat().st_size > max_bytes:
            raise RequestError(f"{kind} file {shown} is over {max_bytes} bytes{limit_flag}", item, field_name)
        return resolved.read_bytes()
    except OSError as error:
        if is_base64:
            raise RequestError(
                f"decodes as base64, but not to a PNG, JPEG, GIF, WebP, BMP or TIFF file (and as an image path: "
                f"{error.strerror})",
                item, field_name,
            ) from error  # fmt: skip
        raise RequestError(f"cannot read {kind} path {shown}: {error.strerror}", item, field_name) from error


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
                f"expected a string (a data: URL, base64, or a path under --image_root), got {kind_of(value)}",
                item, field_name,
            )  # fmt: skip
        if value.startswith("data:"):
            return _data_url_bytes(value, item, field_name, "data:image/png;base64,...")
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
        # A short path can be valid base64 too ("img/cat1"), so a string that decodes to no image is still a path.
        return read_under_root(
            self.root, value, item, field_name, "image", self.max_file_bytes, is_base64=data is not None
        )

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


class VideoDecoder:
    """A video value of a request -> its sampled video (``vlrm.data.videos``: frames drawn and sized with the
    checkpoint's video settings, by ``sample``), or a RequestError. A value is a base64 ``data:`` URL or a path under
    ``image_root`` (raw base64 is not guessed at for videos); its size, frame size, frame count and length are checked
    before any frame is decoded (module docstring)."""

    def __init__(self, settings: ServerSettings, sample: Callable[[bytes], dict]):
        self.root = Path(settings.image_root).resolve(strict=True) if settings.image_root is not None else None
        self.max_bytes, self.max_seconds = settings.max_video_bytes, settings.max_video_seconds
        self.max_frames, self.max_pixels = settings.max_video_frames, settings.max_video_pixels
        self.sample = sample

    def decode(self, value: Any, item: int, field_name: str, decoded: dict[str, dict]) -> dict:
        """The sampled video; ``decoded`` (a request's videos by content hash) makes a video that several items of
        one request carry (a GRPO group) decoded once."""
        data = self._bytes(value, item, field_name)
        digest = hashlib.sha1(data).hexdigest()
        if digest not in decoded:
            self._check_header(data, item, field_name)
            decoded[digest] = self._sample(data, item, field_name)
        return decoded[digest]

    def _bytes(self, value: Any, item: int, field_name: str) -> bytes:
        if not isinstance(value, str):
            raise RequestError(
                f"expected a string (a data: URL or a path under --image_root), got {kind_of(value)}", item, field_name
            )
        if value.startswith("data:"):
            data = _data_url_bytes(value, item, field_name, "data:video/mp4;base64,...")
            if len(data) > self.max_bytes:
                raise RequestError(
                    f"video is {len(data)} bytes, over --max_video_bytes={self.max_bytes}", item, field_name
                )
            return data
        if URL_SCHEME.match(value):
            raise RequestError(
                "is a URL: the server fetches nothing; send the video as a data: URL (data:video/mp4;base64,...)",
                item, field_name,
            )  # fmt: skip
        if self.root is None:
            raise RequestError(
                "not a data: URL (data:video/mp4;base64,...); file paths are refused (the server was started without "
                "--image_root)",
                item, field_name,
            )  # fmt: skip
        limit_flag = f" (--max_video_bytes={self.max_bytes})"
        return read_under_root(self.root, value, item, field_name, "video", self.max_bytes, limit_flag)

    def _check_header(self, data: bytes, item: int, field_name: str) -> None:
        try:
            header = read_header(data, field_name=field_name)
        except RowProblem as problem:  # not a container FFmpeg can open, or one without a video stream
            raise RequestError(problem.reason, item, field_name) from problem
        except Exception as error:  # PyAV's errors past read_header's own guard: still the client's file
            raise RequestError(f"cannot read the video's header: {error}", item, field_name) from error
        unread = "(read from its header, not decoded)"
        pixels = header.width * header.height
        if pixels <= 0:
            raise RequestError(f"video header gives no frame size {unread}", item, field_name)
        if pixels > self.max_pixels:
            raise RequestError(
                f"video frames are {header.width}x{header.height} = {pixels} pixels, over --max_video_pixels="
                f"{self.max_pixels} {unread}",
                item, field_name,
            )  # fmt: skip
        if header.fps <= 0:
            raise RequestError(f"video header gives no frame rate {unread}", item, field_name)
        frames = header.num_frames
        if frames == 0:  # Matroska / WebM headers give no count: the packets are counted, none decoded
            frames, unread = self._count_packets(data, item, field_name), "(its packets counted, none decoded)"
        if frames == 0:
            raise RequestError(f"video has no frames {unread}", item, field_name)
        if frames > self.max_frames:
            raise RequestError(
                f"video has {frames} frames, over --max_video_frames={self.max_frames} {unread}", item, field_name
            )
        # The longer of the stated duration and frames / fps: a header that understates either is still caught.
        seconds = max(header.duration, frames / header.fps)
        if seconds > self.max_seconds:
            raise RequestError(
                f"video is {seconds:.2f} seconds long, over --max_video_seconds={self.max_seconds} {unread}",
                item, field_name,
            )  # fmt: skip

    def _count_packets(self, data: bytes, item: int, field_name: str) -> int:
        """Video packets of a container (one per frame), demuxed without decoding; stops past ``max_frames``."""
        import av  # PyAV, as vlrm.data.videos imports it: only when a video comes

        count = 0
        try:
            with av.open(io.BytesIO(data)) as container:
                for packet in container.demux(container.streams.video[0]):
                    count += bool(packet.size)
                    if count > self.max_frames:
                        break
        except Exception as error:  # a corrupt container past its header
            raise RequestError(f"cannot read the video's packets: {error}", item, field_name) from error
        return count

    def _sample(self, data: bytes, item: int, field_name: str) -> dict:
        try:
            return self.sample(data)
        except RowProblem as problem:  # truncated, a single frame, undecodable packets
            raise RequestError(problem.reason, item, field_name) from problem
        except Exception as error:  # PyAV, or frames of another size midway (numpy): the client's file, not a 500
            raise RequestError(f"cannot decode video: {error}", item, field_name) from error
