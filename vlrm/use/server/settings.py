"""The server's settings and limits, and the one error shape every bad request gets (``RequestError``).

``serve_rm.py`` makes one flag per ``ServerSettings`` field, with its help; ``RequestError`` becomes a JSON reply
``{"error", "item", "field"}`` with its HTTP status (``vlrm.use.server.app``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse


@dataclass
class ServerSettings:
    """What the app enforces and how it batches (``serve_rm.py`` makes one flag per field, with this help)."""

    image_root: str | None = field(
        default=None,
        metadata={
            "help": "Directory image and video paths are read from (relative to it, or absolute inside it; `..` and "
            "symlinks are resolved and must stay inside). None: paths are refused, only data: URLs (and base64 "
            "images) are accepted."
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
            "Needs both values in the checkpoint's config.json, else the server refuses to start; refused for a "
            "process reward model (its rewards are probabilities already)."
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
    # Videos: every limit below is checked from the container's header before a frame is decoded (media.py).
    max_videos: int = field(default=4, metadata={"help": "Most videos in one item (0: videos refused)."})
    max_video_bytes: int = field(
        default=128 * 2**20,
        metadata={"help": "Largest video file read under --image_root, or video in a data: URL, in bytes."},
    )
    max_video_seconds: float = field(default=600.0, metadata={"help": "Longest video, in seconds."})
    max_video_frames: int = field(default=36_000, metadata={"help": "Most frames in a video (before sampling)."})
    max_video_pixels: int = field(
        default=3840 * 2160, metadata={"help": "Most pixels (width x height) of a video's frames as sent."}
    )
    max_body_bytes: int = field(
        default=64 * 2**20, metadata={"help": "Largest request body in bytes, and largest image file read."}
    )
    max_drain_bytes: int = field(
        default=256 * 2**20,
        metadata={
            "help": "Most bytes of a request body read and discarded after an error reply that went out before the "
            "body was read (413 over --max_body_bytes, 401, 404), so that a client still sending reads the reply "
            "instead of a connection reset; 0: close at once."
        },
    )
    max_pending_items: int = field(
        default=1024, metadata={"help": "Most items queued or being scored; beyond it requests get 503 (retry)."}
    )

    def __post_init__(self):
        for name in ("max_batch_size", "max_items", "max_images", "max_pixels_per_image", "max_body_bytes",
                     "max_video_bytes", "max_video_frames", "max_video_pixels"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_videos < 0:
            raise ValueError(f"max_videos must be >= 0, got {self.max_videos}")
        if not self.max_video_seconds > 0:
            raise ValueError(f"max_video_seconds must be > 0, got {self.max_video_seconds}")
        if self.max_drain_bytes < 0:
            raise ValueError(f"max_drain_bytes must be >= 0, got {self.max_drain_bytes}")
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


PROCESS_NOT_NORMALIZED = (
    "the checkpoint is a process reward model: its rewards are step scores aggregated into a probability in [0, 1] "
    "already, and no reward_mean/reward_std is recorded for them"
)


def require_reward_stats(checkpoint_dir: str | Path) -> tuple[float, float]:
    """The checkpoint's ``reward_mean`` and ``reward_std``, read from config.json (before any weight is loaded), or a
    ValueError saying why normalisation cannot be offered."""
    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    if config.get("vlrm_reward_type") == "process":
        raise ValueError(f"{checkpoint_dir}: {PROCESS_NOT_NORMALIZED}: serve without --normalize")
    mean, std = config.get("reward_mean"), config.get("reward_std")
    if mean is None or not std:
        raise ValueError(f"{checkpoint_dir}: {NO_REWARD_STATS}: serve without --normalize")
    attributes, stds = config.get("reward_attributes"), config.get("reward_attribute_std")
    if attributes and (not stds or len(stds) != len(attributes) or not all(stds)):  # each normalised by its own
        raise ValueError(
            f"{checkpoint_dir}: its attribute heads {attributes} have no reward_attribute_mean/reward_attribute_std "
            "in config.json, so their rewards cannot be normalised: serve without --normalize"
        )
    return float(mean), float(std)


def kind_of(value: Any) -> str:
    """A value's JSON kind for an error message: ``null``, ``str``, ``list``..."""
    return "null" if value is None else type(value).__name__
