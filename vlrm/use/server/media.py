"""Media in requests: data: URLs, base64, or files under ``image_root``; the size checked from the header before
decoding; decoded as training decodes them (``vlrm.data.images.to_rgb``). No URL is ever fetched.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path
from typing import Any

from PIL import Image

from vlrm.data.images import to_rgb
from vlrm.use.server.settings import RequestError, kind_of

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
        # A short path can be valid base64 too ("img/cat1"), so a string that decodes to no image is still a path.
        return self._read_under_root(value, item, field_name, is_base64=data is not None)

    def _read_under_root(self, value: str, item: int, field_name: str, is_base64: bool) -> bytes:
        shown = _shown(value)
        candidate = Path(value) if Path(value).is_absolute() else self.root / value
        try:
            resolved = candidate.resolve()  # follows every symlink and `..`, so the check below sees the real file
        except (OSError, RuntimeError, ValueError) as error:  # a symlink loop, a NUL byte
            raise RequestError(f"bad image path {shown}: {error}", item, field_name) from error
        if not resolved.is_relative_to(self.root):
            raise RequestError(f"image path {shown} is outside --image_root: refused", item, field_name)
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
                raise RequestError(f"image file not found under --image_root: {shown}", item, field_name)
            if resolved.stat().st_size > self.max_file_bytes:
                raise RequestError(f"image file {shown} is over {self.max_file_bytes} bytes", item, field_name)
            return resolved.read_bytes()
        except OSError as error:
            if is_base64:
                raise RequestError(
                    f"decodes as base64, but not to a PNG, JPEG, GIF, WebP, BMP or TIFF file (and as an image path: "
                    f"{error.strerror})",
                    item, field_name,
                ) from error  # fmt: skip
            raise RequestError(f"cannot read image path {shown}: {error.strerror}", item, field_name) from error

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
