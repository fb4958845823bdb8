"""Images as the model's processor would see them: checked once when a data set is prepared, converted to RGB the
way transformers converts them.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlrm.errors import RowProblem

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
