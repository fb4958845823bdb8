"""Scoring with a process reward checkpoint: a score for every step of a solution, and the solution's score.

    scorer = RewardScorer.from_pretrained("outputs/tiny_process_demo")          # reward_type: process, recorded
    scores = scorer.score_steps([{"prompt": "How many shapes?", "images": ["shapes.png"],
                                  "steps": ["There are two red shapes.", "So there are two shapes."]}])
    scores.steps[0]      # array([0.93, 0.88]): each step's score, sigmoid of its reward, in [0, 1]
    scores.scores[0]     # 0.905: the solution's score, the checkpoint's step_aggregation (mean by default)

A solution is given as ``steps`` (a list), or as ``response`` text, split at the checkpoint's ``step_separator``
(a blank line by default; empty pieces dropped): the split a policy's completion gets in RL (``VLRewardFunction``) and
over HTTP (``serve_rm.py``). Rows with the same prompt and media are scored under one prompt node of the packed
layout, so a best-of-N group computes its image and question once. Where a step's score is read, the separator and
the aggregations: ``vlrm.layout.steps``. An outcome checkpoint refuses ``score_steps`` with the reason.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vlrm.data.rows import user_prompt
from vlrm.errors import BadSampleError
from vlrm.layout.packed import prompt_key
from vlrm.layout.steps import StepCollator, aggregate_steps

logger = logging.getLogger(__name__)


@dataclass
class StepScores:
    """``steps``: per row, its steps' scores (sigmoid of each step's reward; NaN for a row over max_seq_length);
    ``rewards``: the same as raw rewards (logits); ``scores``: per row, the solution's score
    (``aggregation`` of its step scores)."""

    steps: list[np.ndarray]
    rewards: list[np.ndarray]
    scores: np.ndarray
    aggregation: str


def split_steps(text: str, separator: str) -> list[str]:
    """A completion's steps: its text split at the separator, pieces stripped, empty ones dropped."""
    return [piece.strip() for piece in text.split(separator) if piece.strip()]


def step_rows(scorer: Any, rows: Sequence[dict]) -> list[dict]:
    """Process rows (``vlrm.layout.steps``) of ``score_steps``' rows: messages, media, one solution each. Raises
    ``BadSampleError`` naming the row and field for a row with no step, a bad video, or media and places that differ.
    A video is sampled once per call however many rows share it (a best-of-N group's solutions do)."""
    separator = scorer.process["step_separator"]
    examples = []
    sampled: dict[tuple, dict] = {}
    for index, row in enumerate(rows):
        steps = row.get("steps")
        if steps is None:
            if not isinstance(row.get("response"), str):
                raise BadSampleError("rows", index, "steps", "give `steps` (a list) or `response` (text)")
            steps = split_steps(row["response"], separator)
        steps = [str(step) for step in steps]
        if not steps or any(not step.strip() for step in steps):
            raise BadSampleError("rows", index, "steps", "a solution needs at least one step, and no empty step")
        images = list(row.get("images") or [])
        videos = scorer._sampled_videos(row.get("videos"), index, sampled)
        prompt = row["prompt"]
        messages = user_prompt(prompt, len(images), len(videos)) if isinstance(prompt, str) else prompt
        examples.append({"prompt": messages, "images": images, "videos": videos, "steps": [steps],
                         "step_labels": [[math.nan] * len(steps)]})  # fmt: skip
    return examples


@torch.inference_mode()
def score_steps(scorer: Any, rows: Sequence[dict], batch_size: int = 8, aggregation: str | None = None) -> StepScores:
    """``RewardScorer.score_steps``: the module docstring. ``aggregation``: one of ``vlrm.layout.steps``'
    STEP_AGGREGATIONS (None: the checkpoint's recorded ``step_aggregation``)."""
    if scorer.process["reward_type"] != "process":
        raise ValueError(
            "this checkpoint is an outcome reward model (one reward per response): score it with score() or "
            "score_pairs(); score_steps() needs a checkpoint trained with reward_type: process"
        )
    aggregation = aggregation or scorer.process["step_aggregation"]
    examples = step_rows(scorer, rows)
    lengths = [
        scorer.encoder.prompt_length(example["prompt"], example["images"], example["videos"])
        + len(scorer.encoder.encode_steps(example["steps"][0])[0])
        for example in examples
    ]
    over = [scorer.max_seq_length is not None and length > scorer.max_seq_length for length in lengths]
    scorer._warn_overlong([(i, n) for i, (n, o) in enumerate(zip(lengths, over, strict=True)) if o], "solutions")
    kept = [index for index, too_long in enumerate(over) if not too_long]
    if scorer.packing:  # a question's solutions side by side: one prompt node per micro-batch
        first: dict[tuple, int] = {}
        keys = [first.setdefault(prompt_key(examples[i]["prompt"], examples[i]["images"], examples[i]["videos"]), i)
                for i in kept]  # fmt: skip
        kept = [index for _, index in sorted(zip(keys, kept, strict=True))]
    collator = StepCollator(scorer.encoder, scorer.packing)
    rewards: list[np.ndarray] = [np.full(len(example["steps"][0]), np.nan, dtype=np.float32) for example in examples]
    for start in range(0, len(kept), batch_size):
        batch_indices = kept[start : start + batch_size]
        batch = collator([examples[index] for index in batch_indices])
        labels = batch.pop("step_labels")
        for name in ("num_pairs", "num_irrelevant"):
            batch.pop(name)
        flat = scorer._forward(batch).float().cpu()
        for index, values in zip(batch_indices, torch.split(flat, labels.num_steps.tolist()), strict=True):
            rewards[index] = values.numpy()
    steps = [1.0 / (1.0 + np.exp(-values)) for values in rewards]
    solution = torch.cat([torch.full((len(values),), index) for index, values in enumerate(steps)])
    scores = aggregate_steps(torch.from_numpy(np.concatenate(steps)), solution, len(steps), aggregation)
    return StepScores(steps, rewards, scores.numpy().astype(np.float32), aggregation)
