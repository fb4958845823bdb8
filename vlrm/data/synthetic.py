"""A deterministic synthetic image preference set where only the pixels decide which answer is right.

Each image shows one to three shapes of one colour on a plain background; the question asks for the colour or the
count. The chosen answer describes the image; the rejected answer gives another value. Every answer sentence is chosen
exactly as often as it is rejected, so a model that ignores the image cannot beat 0.5.

    python -m vlrm synthetic --output_dir .cache/synthetic --num_train 1200 --num_eval 200
    python -m vlrm synthetic --video --output_dir .cache/synthetic-video   # vlrm.data.synthetic_video
    python -m vlrm synthetic --steps --output_dir .cache/synthetic-steps   # vlrm.data.synthetic_steps
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 215, 20)}
SHAPES = ("circle", "square", "triangle")
COUNTS = {1: "There is one shape.", 2: "There are two shapes.", 3: "There are three shapes."}

# category -> (question, {value: answer sentence})
QUESTIONS = {
    "color": ("What color are the shapes?", {color: f"The shapes are {color}." for color in COLORS}),
    "count": ("How many shapes are there?", COUNTS),
}


def draw_shapes(color: str, count: int, size: int, rng: random.Random) -> Image.Image:
    """``count`` shapes of one colour at non-overlapping places on a light background.

    Circles, squares and triangles are drawn with the same area, so the coloured area is proportional to the count:
    a model can read the count from the pixels without first learning to tell the shapes apart."""
    image = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    half_side = size / 10  # square of side size/5; the circle and the triangle get its area
    radius = half_side * 2 / math.sqrt(math.pi)
    half_base = half_side * math.sqrt(2)  # triangle with base = height = 2 * sqrt(2) * half_side
    cells = [(x, y) for x in range(3) for y in range(3)]
    for cell_x, cell_y in rng.sample(cells, count):
        center_x = (2 * cell_x + 1) * size / 6 + rng.randint(-2, 2)
        center_y = (2 * cell_y + 1) * size / 6 + rng.randint(-2, 2)
        shape = rng.choice(SHAPES)
        if shape == "circle":
            draw.ellipse(_box(center_x, center_y, radius), fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(_box(center_x, center_y, half_side), fill=COLORS[color])
        else:
            left, top, right, bottom = _box(center_x, center_y, half_base)
            draw.polygon([(center_x, top), (left, bottom), (right, bottom)], fill=COLORS[color])
    return image


def _box(center_x: float, center_y: float, half: float) -> tuple[float, float, float, float]:
    return (center_x - half, center_y - half, center_x + half, center_y + half)


def _balanced_pairs(values: tuple[str, ...], count: int, rng: random.Random) -> list[tuple[str, str]]:
    """``count`` (true, wrong) pairs made as mirrored couples (x, y), (y, x): each value is as often true as wrong
    (off by at most one when ``count`` is odd)."""
    pairs = []
    while len(pairs) < count:
        true_value, wrong_value = rng.sample(values, 2)
        pairs += [(true_value, wrong_value), (wrong_value, true_value)]
    rng.shuffle(pairs)
    return pairs[:count]


def make_split(output_dir: Path, split: str, num_rows: int, seed: int, image_size: int) -> Path:
    rng = random.Random(f"{seed}-{split}")
    image_dir = output_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    categories = list(QUESTIONS)
    counts = {c: len(range(i, num_rows, len(categories))) for i, c in enumerate(categories)}
    per_category = {c: _balanced_pairs(tuple(QUESTIONS[c][1]), counts[c], rng) for c in categories}
    rows = []
    for index in range(num_rows):
        category = categories[index % len(categories)]
        question, answers = QUESTIONS[category]
        true_value, wrong_value = per_category[category][index // len(categories)]
        color = true_value if category == "color" else rng.choice(tuple(COLORS))
        count = true_value if category == "count" else rng.choice(tuple(COUNTS))
        image_name = f"{split}_{index:05d}.png"
        draw_shapes(color, count, image_size, rng).save(image_dir / image_name)
        rows.append(
            {
                "id": f"{split}-{index:05d}",
                "question": question,
                "images": [f"images/{image_name}"],
                "chosen": answers[true_value],
                "rejected": answers[wrong_value],
                "category": category,
            }
        )
    path = output_dir / f"{split}.jsonl"
    with open(path, "w") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def write_blanked(eval_path: Path, image_size: int) -> Path:
    """The held-out rows with every image replaced by one blank image: a model that learned from the pixels scores
    0.5 here (each answer pair appears in both orders), a model that learned a text shortcut would not."""
    Image.new("RGB", (image_size, image_size), (245, 245, 245)).save(eval_path.parent / "images" / "blank.png")
    rows = [json.loads(line) for line in eval_path.read_text().splitlines()]
    blank_path = eval_path.with_name("eval_blank.jsonl")
    with open(blank_path, "w") as file:
        file.writelines(json.dumps(dict(row, images=["images/blank.png"])) + "\n" for row in rows)
    return blank_path


VL_REWARDBENCH_SOURCES = ("vlfeedback", "wildvision-battle", "povid", "rlhf-v", "rlaif-v", "reasoning_tasks")


def write_benchmark_standins(eval_path: Path, seed: int = 0) -> list[Path]:
    """The held-out rows in each benchmark's own layout (``vlrm.benchmarks``), to run the benchmark protocols end to
    end without the benchmarks themselves: synthetic **stand-ins**, not the benchmarks. VL-RewardBench: the two
    responses in a seeded order with ``human_ranking``, ``query_source`` cycling through its six sources;
    Multimodal RewardBench: ``Output1``/``Output2`` with ``Better`` either way; MM-RLHF-RewardBench: every wrong answer
    of a row paired with its right one, the pairs of a row sharing its ``id`` (2 or 3 pairs: an Acc+ group)."""
    rng = random.Random(f"{seed}-standins")
    rows = [json.loads(line) for line in eval_path.read_text().splitlines()]
    vl_rewardbench, multimodal, mm_rlhf = [], [], []
    for index, row in enumerate(rows):
        source = VL_REWARDBENCH_SOURCES[index % len(VL_REWARDBENCH_SOURCES)]
        chosen_first = rng.random() < 0.5
        responses = [row["chosen"], row["rejected"]] if chosen_first else [row["rejected"], row["chosen"]]
        vl_rewardbench.append(
            {"id": f"{source}-{index}", "query": row["question"], "image": row["images"][0], "response": responses,
             "human_ranking": [0, 1] if chosen_first else [1, 0], "query_source": source}
        )  # fmt: skip
        multimodal.append(
            {"ID": row["id"], "Text": row["question"], "Image": row["images"][0], "Output1": responses[0],
             "Output2": responses[1], "Better": "Output1" if chosen_first else "Output2", "Category": row["category"]}
        )  # fmt: skip
        answers = QUESTIONS[row["category"]][1].values()
        for wrong in (answer for answer in answers if answer != row["chosen"]):
            mm_rlhf.append(
                {"id": row["id"], "image": row["images"][0], "video": None, "prompt": row["question"],
                 "chosen": row["chosen"], "rejected": wrong}
            )  # fmt: skip
    paths = []
    for name, layout_rows in (("vl_rewardbench", vl_rewardbench), ("multimodal_rewardbench", multimodal),
                              ("mm_rlhf", mm_rlhf)):  # fmt: skip
        path = eval_path.with_name(f"standin_{name}.jsonl")
        with open(path, "w") as file:
            file.writelines(json.dumps(layout_row) + "\n" for layout_row in layout_rows)
        paths.append(path)
    return paths


VIDEO_REWARDBENCH_DIMENSIONS = ("Long-form Perception", "Short-form Perception", "Knowledge", "Reasoning", "Safety")
MOTIONS = {"right": "The shape moves to the right.", "left": "The shape moves to the left.",
           "still": "The shape stays where it is."}  # fmt: skip
MOTION_QUESTION = "Which way does the shape move?"


def gliding_square(direction: str, num_frames: int, width: int, height: int, rng: random.Random) -> np.ndarray:
    """``[num_frames, height, width, 3]`` uint8 frames of a square of a seeded colour and row crossing a light
    background left to right, or right to left: each frame alone shows a square somewhere, only their order tells
    the direction (the task of ``vlrm.data.synthetic_video``, kept apart from that module's controls)."""
    side, color = height // 3, rng.choice(list(COLORS.values()))
    top = rng.randint(0, height - side)
    xs = np.linspace(0, width - side, num_frames).round().astype(int)
    frames = np.full((num_frames, height, width, 3), 245, dtype=np.uint8)
    for frame, x in zip(frames, xs if direction == "right" else xs[::-1], strict=True):
        frame[top : top + side, x : x + side] = color
    return frames


def write_video_benchmark_standins(
    output_dir: str | Path, num_clips: int = 10, seed: int = 0, num_frames: int = 8, fps: float = 4.0,
    size: tuple[int, int] = (112, 56),
) -> tuple[Path, Path]:  # fmt: skip
    """``standin_mm_rlhf_video.jsonl`` and ``standin_videorewardbench.jsonl`` (+ their clips under ``videos/`` and
    frames under ``images/``) in ``output_dir``: the video benchmarks' own layouts (``vlrm.data.benchmarks``) on
    ``num_clips`` clips of one square gliding left or right (``gliding_square``), half each way in a seeded order,
    ``num_frames`` frames of ``size`` (width, height) at ``fps``. Synthetic **stand-ins** to run the protocols end
    to end, not the benchmarks.

    - MM-RLHF-RewardBench: per clip, an ``id`` whose right answer meets both wrong ones (the other direction, standing
      still): an Acc+ group of 2 pairs, the clip in ``video`` beside a null ``image``, with the annotators' reasons;
      and for every other clip, a group on its first frame (``images/short_*.png``: an image row of the category
      ``short``) asking whether a shape is there. Video rows fall in the category ``video`` (their path's word).
    - VideoRewardBench: one pair per clip, ``dimension`` cycling through the five dimensions (as the paper spells
      them), the right direction chosen.

    Returns the two paths."""
    from vlrm.data.videos import write_clip  # the video tooling loads on use

    output_dir = Path(output_dir)
    (output_dir / "videos").mkdir(parents=True, exist_ok=True)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}-video-standins")
    directions = [("right", "left")[index % 2] for index in range(num_clips)]
    rng.shuffle(directions)
    mm_rlhf, video_rewardbench = [], []
    for index, direction in enumerate(directions):
        frames = gliding_square(direction, num_frames, *size, rng)
        clip = f"videos/standin_{index:05d}.mp4"
        write_clip(output_dir / clip, frames, fps)
        right, wrong = MOTIONS[direction], MOTIONS["left" if direction == "right" else "right"]
        for rejected in (wrong, MOTIONS["still"]):
            mm_rlhf.append(
                {"id": f"mmrlhf-video-{index}", "image": None, "video": clip, "prompt": MOTION_QUESTION,
                 "chosen": right, "rejected": rejected, "chosen_reason": f"It moves {direction}.",
                 "rejected_reason": "It does not."}
            )  # fmt: skip
        if index % 2 == 0:
            image = f"images/short_standin_{index:05d}.png"
            Image.fromarray(frames[0]).save(output_dir / image)
            for rejected in ("No, the image is empty.", "There are two squares."):
                mm_rlhf.append(
                    {"id": f"mmrlhf-image-{index}", "image": image, "video": None, "prompt": "Is there a shape?",
                     "chosen": "Yes, there is one square.", "rejected": rejected, "chosen_reason": "One square.",
                     "rejected_reason": "Wrong count."}
                )  # fmt: skip
        video_rewardbench.append(
            {"id": f"vrb-{index:05d}", "video": clip, "prompt": MOTION_QUESTION, "chosen": right, "rejected": wrong,
             "dimension": VIDEO_REWARDBENCH_DIMENSIONS[index % len(VIDEO_REWARDBENCH_DIMENSIONS)]}
        )  # fmt: skip
    paths = (output_dir / "standin_mm_rlhf_video.jsonl", output_dir / "standin_videorewardbench.jsonl")
    for path, layout_rows in zip(paths, (mm_rlhf, video_rewardbench), strict=True):
        with open(path, "w") as file:
            file.writelines(json.dumps(layout_row) + "\n" for layout_row in layout_rows)
    return paths


RANKED_COUNTS = {1: "There is one shape.", 2: "There are two shapes.", 3: "There are three shapes.",
                 4: "There are four shapes."}  # fmt: skip


def ranking_row(color: str, count: int, category: str, rng: random.Random) -> dict:
    """The 4 answers of one image, ranked by how right they are: for the count, by how far off (1 vs 3 shapes when
    there are 2: tied), for the colour the right one first and the other three tied. Scores are 3 - the rank; the
    ratings (1-5, as VLFeedback's) are ``accuracy`` (5 when exactly right, else 1) and ``closeness`` (5 - 2 x how far
    off, 1 for a wrong colour). The answers come in a seeded order, so no position carries the label."""
    if category == "count":
        answers = [(sentence, abs(value - count)) for value, sentence in RANKED_COUNTS.items()]
    else:
        answers = [(sentence, 0 if value == color else 1) for value, sentence in QUESTIONS["color"][1].items()]
    rng.shuffle(answers)
    ranks = [float(distance) for _, distance in answers]
    return {
        "question": QUESTIONS[category][0],
        "responses": [sentence for sentence, _ in answers],
        "ranks": ranks,
        "scores": [3.0 - rank for rank in ranks],
        "ratings": [
            {
                "accuracy": 5.0 if rank == 0 else 1.0,
                "closeness": max(1.0, 5.0 - 2 * rank) if category == "count" else (5.0 if rank == 0 else 1.0),
            }
            for rank in ranks
        ],  # fmt: skip
        "category": category,
    }


def make_ranking_split(output_dir: Path, split: str, num_rows: int, seed: int, image_size: int) -> Path:
    """``num_rows`` rows of 4 ranked answers (``ranking_row``), colour and count questions alternating, each colour
    and each count 1-4 equally often: only the pixels decide the ranking."""
    rng = random.Random(f"{seed}-ranking-{split}")
    image_dir = output_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    colors, counts = list(COLORS), list(RANKED_COUNTS)
    rows = []
    for index in range(num_rows):
        category = ("color", "count")[index % 2]
        color = colors[(index // 2) % len(colors)] if category == "color" else rng.choice(colors)
        count = counts[(index // 2) % len(counts)] if category == "count" else rng.choice(counts)
        image_name = f"ranking_{split}_{index:05d}.png"
        draw_shapes(color, count, image_size, rng).save(image_dir / image_name)
        rows.append({"id": f"ranking-{split}-{index:05d}", "images": [f"images/{image_name}"],
                     **ranking_row(color, count, category, rng)})  # fmt: skip
    rng.shuffle(rows)
    path = output_dir / f"ranking_{split}.jsonl"
    with open(path, "w") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def make_ranking_dataset(
    output_dir: str | Path, num_train: int = 600, num_eval: int = 100, seed: int = 0, image_size: int = 112
) -> tuple[Path, Path]:
    """Write ``ranking_train.jsonl`` and ``ranking_eval.jsonl`` (+ ``images/``): rows of N = 4 answers ranked by the
    image, with ties, scores and two attribute ratings (``ranking_row``); returns their paths."""
    output_dir = Path(output_dir)
    return (
        make_ranking_split(output_dir, "train", num_train, seed, image_size),
        make_ranking_split(output_dir, "eval", num_eval, seed, image_size),
    )


def make_synthetic_dataset(
    output_dir: str | Path, num_train: int = 1200, num_eval: int = 200, seed: int = 0, image_size: int = 112
) -> tuple[Path, Path]:
    """Write ``train.jsonl``, ``eval.jsonl``, ``eval_blank.jsonl``, the benchmark stand-ins ``standin_*.jsonl``,
    the N-way set ``ranking_{train,eval}.jsonl`` (``make_ranking_dataset``, half as many rows) (+ ``images/``) under
    ``output_dir``; returns the first two paths."""
    output_dir = Path(output_dir)
    train = make_split(output_dir, "train", num_train, seed, image_size)
    held_out = make_split(output_dir, "eval", num_eval, seed, image_size)
    write_blanked(held_out, image_size)
    write_benchmark_standins(held_out, seed)
    make_ranking_dataset(output_dir, num_train // 2, num_eval // 2, seed, image_size)
    return train, held_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vlrm synthetic", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", default=".cache/synthetic")
    parser.add_argument("--num_train", type=int, default=1200)
    parser.add_argument("--num_eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=112)
    args = parser.parse_args(argv)
    train, held_out = make_synthetic_dataset(
        args.output_dir, args.num_train, args.num_eval, args.seed, args.image_size
    )
    print(
        f"synthetic preference set written: {train}, {held_out}; N-way rankings: ranking_train.jsonl, "
        "ranking_eval.jsonl"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
