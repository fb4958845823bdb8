"""A deterministic synthetic process-reward set: counting shapes step by step, where only the image tells which step
is wrong.

Each image shows 1-3 red and 1-3 blue shapes (equal areas, as ``vlrm.data.synthetic`` draws them). The question asks
for the number of shapes, step by step; each of its 4 solutions counts one colour, then the other, then adds:

    There are 2 red shapes.  /  There are 3 blue shapes.  /  So there are 5 shapes in all.

Two solutions are right; two miscount one colour (the first or the second step, drawn with equal odds), and every
step from the wrong one on is labelled wrong (the sum repeats the mistake), as a Monte-Carlo label would have it: no
right answer can be reached from there. Every stated count is equally likely to be right or wrong whatever its value,
so a step's text alone does not tell its label: with the image blanked a model can only learn the label base rate
(7/12 of the steps are right).

    python -m vlrm synthetic --steps --output_dir .cache/synthetic-steps
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

from vlrm.data.synthetic import COLORS, SHAPES

QUESTION = "How many shapes are there? Count them step by step."
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
STEP_COLORS = ("red", "blue")


def draw_counts(counts: dict[str, int], size: int, rng: random.Random) -> Image.Image:
    """``counts[colour]`` shapes of each colour at distinct cells of a 3 x 3 grid, all of the same area."""
    image = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    half_side = size / 10
    radius, half_base = half_side * 2 / math.sqrt(math.pi), half_side * math.sqrt(2)
    cells = rng.sample([(x, y) for x in range(3) for y in range(3)], sum(counts.values()))
    colours = [colour for colour, count in counts.items() for _ in range(count)]
    for (cell_x, cell_y), colour in zip(cells, colours, strict=True):
        x, y = (2 * cell_x + 1) * size / 6 + rng.randint(-2, 2), (2 * cell_y + 1) * size / 6 + rng.randint(-2, 2)
        shape, fill = rng.choice(SHAPES), COLORS[colour]
        if shape == "circle":
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)
        elif shape == "square":
            draw.rectangle((x - half_side, y - half_side, x + half_side, y + half_side), fill=fill)
        else:
            draw.polygon(
                [(x, y - half_base), (x - half_base, y + half_base), (x + half_base, y + half_base)], fill=fill
            )
    return image


def count_step(colour: str, count: int) -> str:
    return f"There {'is' if count == 1 else 'are'} {COUNT_WORDS[count]} {colour} shape{'' if count == 1 else 's'}."


def solution(counts: dict[str, int], order: tuple[str, str], wrong_step: int | None, rng: random.Random):
    """(steps, labels) of one solution counting ``order``'s colours; ``wrong_step`` (0 or 1) miscounts that colour."""
    stated = dict(counts)
    if wrong_step is not None:
        colour = order[wrong_step]
        stated[colour] = rng.choice([value for value in (1, 2, 3) if value != counts[colour]])
    steps = [count_step(colour, stated[colour]) for colour in order]
    steps.append(f"So there are {COUNT_WORDS[sum(stated.values())]} shapes in all.")
    labels = [1.0, 1.0, 1.0] if wrong_step is None else [1.0] * wrong_step + [0.0] * (3 - wrong_step)
    return steps, labels


def make_steps_split(output_dir: Path, split: str, num_rows: int, seed: int, image_size: int) -> Path:
    """``steps_{split}.jsonl`` of ``num_rows`` images with 4 step-labelled solutions each (``solutions`` layout,
    ``vlrm.data.steps``), and ``steps_{split}_blank.jsonl``: the same rows with every image blank."""
    rng = random.Random(f"{seed}-steps-{split}")
    image_dir = output_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (image_size, image_size), (245, 245, 245)).save(image_dir / "blank.png")
    rows, blank_rows = [], []
    for index in range(num_rows):
        counts = {colour: rng.randint(1, 3) for colour in STEP_COLORS}
        name = f"steps_{split}_{index:05d}.png"
        draw_counts(counts, image_size, rng).save(image_dir / name)
        wrong = [None, None, 0, 1]
        rng.shuffle(wrong)
        solutions = []
        for wrong_step in wrong:
            order = tuple(rng.sample(STEP_COLORS, 2))
            steps, labels = solution(counts, order, wrong_step, rng)
            solutions.append({"steps": steps, "step_labels": labels})
        row = {"id": f"steps-{split}-{index:05d}", "question": QUESTION, "images": [f"images/{name}"],
               "solutions": solutions, "category": "count"}  # fmt: skip
        rows.append(row)
        blank_rows.append(dict(row, images=["images/blank.png"]))
    path = output_dir / f"steps_{split}.jsonl"
    for target, target_rows in ((path, rows), (output_dir / f"steps_{split}_blank.jsonl", blank_rows)):
        target.write_text("".join(json.dumps(row) + "\n" for row in target_rows))
    return path


def make_steps_dataset(
    output_dir: str | Path, num_train: int = 600, num_eval: int = 100, seed: int = 0, image_size: int = 112
) -> tuple[Path, Path]:
    """Write ``steps_train.jsonl`` and ``steps_eval.jsonl`` (+ ``steps_eval_blank.jsonl``) under ``output_dir``."""
    output_dir = Path(output_dir)
    train = make_steps_split(output_dir, "train", num_train, seed, image_size)
    held_out = make_steps_split(output_dir, "eval", num_eval, seed, image_size)
    return train, held_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vlrm synthetic --steps",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output_dir", default=".cache/synthetic-steps")
    parser.add_argument("--num_train", type=int, default=600)
    parser.add_argument("--num_eval", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=112)
    args = parser.parse_args(argv)
    train, held_out = make_steps_dataset(args.output_dir, args.num_train, args.num_eval, args.seed, args.image_size)
    print(f"synthetic steps set written: {train}, {held_out}, and the blanked control steps_eval_blank.jsonl")
    return 0
