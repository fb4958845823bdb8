"""A deterministic synthetic video preference set where only the ORDER of the frames decides which answer is right.

Each clip shows one square gliding across a plain background, to the left or to the right, at a constant speed; the
question asks which way it moves. Every frame alone is a square somewhere on the background: without the order of the
frames the two answers cannot be told apart. Each answer is chosen exactly as often as it is rejected, so a model
that ignores the video scores 0.5. Beside the held-out split, three controls of the same rows, the label unchanged:

    video_eval_blank.jsonl     every frame blank                  -> a reward that reads the video: ~0.5
    video_eval_frozen.jsonl    one frame repeated, the square at   -> no motion, no order:           ~0.5
                               the middle of its path
    video_eval_reversed.jsonl  the frames in reverse order        -> the motion flips:               far below 0.5

A model that read one frame (or the frames without their order) would score the same on the held-out split and on
the reversed one; one that reads time falls below 0.5 on the reversed clips by as much as it is above it on the
held-out ones.

    python -m vlrm synthetic --video --output_dir .cache/synthetic-video
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from vlrm.data.videos import write_clip

DIRECTIONS = {"right": "The shape moves to the right.", "left": "The shape moves to the left."}
QUESTION = "Which way does the shape move?"
CONTROLS = ("blank", "frozen", "reversed")
BACKGROUND = (245, 245, 245)
PALETTE = ((220, 30, 30), (30, 180, 40), (30, 60, 220), (235, 150, 20))


def motion_frames(
    direction: str, num_frames: int, width: int, height: int, rng: random.Random
) -> tuple[np.ndarray, np.ndarray]:
    """``[num_frames, height, width, 3]`` uint8: a square of a seeded colour and row crossing the frame left to right
    (or right to left) at a constant speed, starting and ending at a seeded margin; and the same square standing still
    at the middle of its path (the frozen control: with an even frame count no frame of the clip is there, and the
    frame nearest the middle would still lean the way the square moves)."""
    side = height // 3
    top = rng.randint(0, height - side)
    margin = rng.randint(0, width // 8)
    start, end = margin, width - side - margin
    xs = np.linspace(start, end, num_frames).round().astype(int)
    if direction == "left":
        xs = xs[::-1]
    color = np.array(rng.choice(PALETTE), dtype=np.uint8)
    frames = np.empty((num_frames + 1, height, width, 3), dtype=np.uint8)
    frames[:] = BACKGROUND
    for frame, x in zip(frames, [*xs, round((start + end) / 2)], strict=True):
        frame[top : top + side, x : x + side] = color
    return frames[:-1], frames[-1]


def control_frames(frames: np.ndarray, middle: np.ndarray, control: str) -> np.ndarray:
    """The frames of a control clip (module docstring); ``middle``: the square still at the middle of its path."""
    if control == "blank":
        return np.broadcast_to(np.array(BACKGROUND, dtype=np.uint8), frames.shape).copy()
    if control == "frozen":
        return np.repeat(middle[None], len(frames), axis=0)
    if control == "reversed":
        return frames[::-1].copy()
    raise ValueError(f"unknown control {control!r}: one of {CONTROLS}")


def make_video_split(
    output_dir: Path, split: str, num_rows: int, seed: int, num_frames: int, fps: float, size: tuple[int, int],
    controls: tuple[str, ...] = (),
) -> list[Path]:  # fmt: skip
    """``video_{split}.jsonl`` of ``num_rows`` clips, half moving each way in a seeded order (+ each control's file of
    the same rows); returns the paths, the split's first."""
    rng = random.Random(f"{seed}-video-{split}")
    video_dir = output_dir / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    directions = [("right", "left")[index % 2] for index in range(num_rows)]
    rng.shuffle(directions)
    width, height = size
    rows = {name: [] for name in ("", *controls)}
    for index, direction in enumerate(directions):
        frames, middle = motion_frames(direction, num_frames, width, height, rng)
        other = "left" if direction == "right" else "right"
        row = {"id": f"video-{split}-{index:05d}", "question": QUESTION, "chosen": DIRECTIONS[direction],
               "rejected": DIRECTIONS[other], "category": direction}  # fmt: skip
        for name in rows:
            clip = f"{split}_{index:05d}{'_' + name if name else ''}.mp4"
            write_clip(video_dir / clip, control_frames(frames, middle, name) if name else frames, fps)
            rows[name].append(dict(row, videos=[f"videos/{clip}"]))
    paths = []
    for name, split_rows in rows.items():
        path = output_dir / f"video_{split}{'_' + name if name else ''}.jsonl"
        with open(path, "w") as file:
            file.writelines(json.dumps(row) + "\n" for row in split_rows)
        paths.append(path)
    return paths


def make_video_dataset(
    output_dir: str | Path, num_train: int = 800, num_eval: int = 200, seed: int = 0, num_frames: int = 8,
    fps: float = 2.0, size: tuple[int, int] = (112, 56),
) -> tuple[Path, Path]:  # fmt: skip
    """Write ``video_train.jsonl``, ``video_eval.jsonl`` and the controls ``video_eval_{blank,frozen,reversed}.jsonl``
    (+ ``videos/``: mp4 clips of ``num_frames`` frames at ``fps``, ``size`` = (width, height)) under ``output_dir``;
    returns the first two paths."""
    output_dir = Path(output_dir)
    (train,) = make_video_split(output_dir, "train", num_train, seed, num_frames, fps, size)
    held_out, *_ = make_video_split(output_dir, "eval", num_eval, seed, num_frames, fps, size, CONTROLS)
    return train, held_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vlrm synthetic --video",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output_dir", default=".cache/synthetic-video")
    parser.add_argument("--num_train", type=int, default=800)
    parser.add_argument("--num_eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, held_out = make_video_dataset(args.output_dir, args.num_train, args.num_eval, args.seed)
    print(f"synthetic video set written: {train}, {held_out}, and its controls video_eval_blank.jsonl, "
          "video_eval_frozen.jsonl, video_eval_reversed.jsonl")  # fmt: skip
    return 0
