"""A deterministic synthetic image preference set where only the pixels decide which answer is right.

Each row shows one shape on a plain background and asks about its colour, its kind or its side. The chosen answer
describes the image; the rejected answer is the same sentence with another value. Every answer sentence is chosen
exactly as often as it is rejected, so a model that ignores the image cannot beat 0.5.

    python -m vlrm.synthetic --output_dir .cache/synthetic --num_train 800 --num_eval 200
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 215, 20)}
SHAPES = ("circle", "square", "triangle")
SIDES = ("left", "right")

QUESTIONS = {
    "color": ("What color is the shape?", "The shape is {}.", tuple(COLORS)),
    "shape": ("What shape is in the image?", "It is a {}.", SHAPES),
    "position": ("Where is the shape?", "It is on the {}.", SIDES),
}


def draw_shape(color: str, shape: str, side: str, size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    radius = size // 5
    center_x = size // 4 if side == "left" else 3 * size // 4
    center_x += rng.randint(-size // 16, size // 16)
    center_y = size // 2 + rng.randint(-size // 6, size // 6)
    box = (center_x - radius, center_y - radius, center_x + radius, center_y + radius)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(center_x, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return image


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
    per_category = {c: _balanced_pairs(QUESTIONS[c][2], counts[c], rng) for c in categories}
    rows = []
    for index in range(num_rows):
        category = categories[index % len(categories)]
        question, template, _ = QUESTIONS[category]
        true_value, wrong_value = per_category[category][index // len(categories)]
        attributes = {"color": rng.choice(tuple(COLORS)), "shape": rng.choice(SHAPES), "side": rng.choice(SIDES)}
        attributes["side" if category == "position" else category] = true_value
        image_name = f"{split}_{index:05d}.png"
        draw_shape(attributes["color"], attributes["shape"], attributes["side"], image_size, rng).save(
            image_dir / image_name
        )
        rows.append(
            {
                "id": f"{split}-{index:05d}",
                "question": question,
                "images": [f"images/{image_name}"],
                "chosen": template.format(true_value),
                "rejected": template.format(wrong_value),
                "category": category,
            }
        )
    path = output_dir / f"{split}.jsonl"
    with open(path, "w") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def make_synthetic_dataset(
    output_dir: str | Path, num_train: int = 800, num_eval: int = 200, seed: int = 0, image_size: int = 56
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` (+ ``images/``) under ``output_dir``; returns both paths."""
    output_dir = Path(output_dir)
    return (
        make_split(output_dir, "train", num_train, seed, image_size),
        make_split(output_dir, "eval", num_eval, seed, image_size),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=".cache/synthetic")
    parser.add_argument("--num_train", type=int, default=800)
    parser.add_argument("--num_eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=56)
    args = parser.parse_args()
    train, held_out = make_synthetic_dataset(args.output_dir, args.num_train, args.num_eval, args.seed, args.image_size)
    print(f"synthetic preference set written: {train}, {held_out}")


if __name__ == "__main__":
    main()
