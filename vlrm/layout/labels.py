"""Where each reward of a micro-batch sits, and the labels the objectives read, for both layouts.

Every row has N >= 2 responses (a pair: chosen, rejected; ``vlrm.data.rankings``). Both layouts return one flat
reward tensor in **response-major** order: the first response of every row, then the second of every row, then the
third of the rows that have one, and so on; then the irrelevant-query branches, pair-major (``num_irrelevant`` per
row, each the row's best response under another prompt)::

    pairs only:   [chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}, irrelevant_{0,0} .. irrelevant_{B-1,K-1}]

which is the pair layout ``split_rewards`` undoes, unchanged from before N-way rows existed. A micro-batch of pairs
carries ``num_pairs``, ``num_irrelevant`` and ``margin`` only; one with a ranking, a tie or a score also carries
``reward_labels`` (``RewardLabels``; not ``labels``, a name the HF Trainer reads for itself): the index tensors every
objective of ``vlrm.train.objectives`` reads, computed here once per micro-batch so that no loss loops over rows in
Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from vlrm.data.rankings import responses_of

LABEL_FIELDS = ("num_pairs", "num_irrelevant", "margin", "reward_labels", "step_labels")  # not model inputs


def response_tokens(spans: list[tuple[int, int, int]]) -> dict[str, torch.Tensor]:
    """``response_index`` (the flat token index of every response token, the end-of-turn token included) and
    ``response_owner`` (the reward position it belongs to), from ``(reward position, first token, end)`` spans in
    the flat token order of either layout: what mean and attention pooling read (``vlrm.model.heads``)."""
    index = [torch.arange(start, end) for _, start, end in spans]
    owner = [torch.full((end - start,), position, dtype=torch.long) for position, start, end in spans]
    return {"response_index": torch.cat(index), "response_owner": torch.cat(owner)}


def reward_positions(counts: list[int]) -> list[list[int]]:
    """Reward positions of each row's responses, response-major (module docstring)."""
    positions, position = [[0] * count for count in counts], 0
    for index in range(max(counts, default=0)):
        for row, count in enumerate(counts):
            if count > index:
                positions[row][index] = position
                position += 1
    return positions


def row_ranks(example: dict) -> list[float]:
    """A row's ranks, lower is better: a ranking's own, a pair's [0, 1], a tied pair's [0, 0]."""
    if example.get("responses") is not None:
        return [float(rank) for rank in example["ranks"]]
    return [0.0, 0.0] if example.get("tie") else [0.0, 1.0]


def is_plain_pair(example: dict) -> bool:
    return example.get("responses") is None and not example.get("tie")


@dataclass
class RewardLabels:
    """The labels of a micro-batch, as index tensors into the flat reward tensor (``R`` response rewards first).

    ``better`` / ``worse``: every ordered pair of responses of one row with a strict preference (a pair row: its one
    pair, with ``margin``; a ranking of N: all pairs with different ranks, as if binarised); ``tie_first`` /
    ``tie_second``: the tied pairs. ``matrix`` (``[rows, N_max]``, -1 pads) and ``matrix_ranks`` (inf pads): each row's
    reward positions and ranks, for the listwise objectives. ``scores`` (``[R]``, NaN where absent) and
    ``ratings`` (``[R, A]`` in ``rating_names`` order, NaN where absent or not rated): the targets of the regression
    objective. ``best``: each row's best response (the irrelevant-query term compares it under other prompts)."""

    num_responses: torch.Tensor  # [rows] long
    better: torch.Tensor  # [P] long
    worse: torch.Tensor  # [P] long
    margin: torch.Tensor  # [P] float
    tie_first: torch.Tensor  # [Q] long
    tie_second: torch.Tensor  # [Q] long
    matrix: torch.Tensor  # [rows, N_max] long, -1 pads
    matrix_ranks: torch.Tensor  # [rows, N_max] float, inf pads
    best: torch.Tensor  # [rows] long
    scores: torch.Tensor | None = None  # [R] float, NaN where absent
    ratings: torch.Tensor | None = None  # [R, A] float, NaN where absent
    rating_names: tuple[str, ...] = ()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RewardLabels:
        """Tensors on ``device`` (accelerate's ``send_to_device`` and the Trainer's input preparation call this)."""
        moved = {
            item.name: getattr(self, item.name).to(device, non_blocking=non_blocking)
            for item in fields(self)
            if torch.is_tensor(getattr(self, item.name))
        }
        return replace(self, **moved)

    @property
    def num_rewards(self) -> int:
        return int(self.num_responses.sum())


def _rating_names(examples: list[dict]) -> tuple[str, ...]:
    names: list[str] = []
    for example in examples:
        for name in example.get("rating_names") or []:
            if name not in names:
                names.append(name)
    return tuple(names)


def reward_labels(examples: list[dict], positions: list[list[int]]) -> RewardLabels:
    """The ``RewardLabels`` of a micro-batch whose rows' rewards sit at ``positions``."""
    better, worse, margins, tie_first, tie_second, best = [], [], [], [], [], []
    width = max(len(row) for row in positions)
    matrix = torch.full((len(examples), width), -1, dtype=torch.long)
    matrix_ranks = torch.full((len(examples), width), math.inf)
    for row, (example, where) in enumerate(zip(examples, positions, strict=True)):
        ranks = row_ranks(example)
        matrix[row, : len(where)] = torch.tensor(where)
        matrix_ranks[row, : len(where)] = torch.tensor(ranks)
        best.append(where[ranks.index(min(ranks))])
        margin = float(example.get("margin") or 0.0) if example.get("responses") is None else 0.0
        for first in range(len(where)):
            for second in range(len(where)):
                if ranks[first] < ranks[second]:
                    better.append(where[first]), worse.append(where[second]), margins.append(margin)
                elif ranks[first] == ranks[second] and first < second:
                    tie_first.append(where[first]), tie_second.append(where[second])
    total = sum(len(where) for where in positions)
    labels = RewardLabels(
        num_responses=torch.tensor([len(where) for where in positions]),
        better=torch.tensor(better, dtype=torch.long),
        worse=torch.tensor(worse, dtype=torch.long),
        margin=torch.tensor(margins, dtype=torch.float32),
        tie_first=torch.tensor(tie_first, dtype=torch.long),
        tie_second=torch.tensor(tie_second, dtype=torch.long),
        matrix=matrix,
        matrix_ranks=matrix_ranks,
        best=torch.tensor(best, dtype=torch.long),
    )
    if any(example.get("scores") is not None for example in examples):
        labels.scores = torch.full((total,), math.nan)
        for example, where in zip(examples, positions, strict=True):
            if example.get("scores") is not None:
                labels.scores[where] = torch.tensor(example["scores"], dtype=torch.float32)
    names = _rating_names(examples)
    if names:
        labels.ratings, labels.rating_names = torch.full((total, len(names)), math.nan), names
        for example, where in zip(examples, positions, strict=True):
            for column, name in enumerate(example.get("rating_names") or []):
                values = torch.tensor([ratings[column] for ratings in example["ratings"]], dtype=torch.float32)
                labels.ratings[where, names.index(name)] = values
    return labels


def add_label_fields(batch: dict[str, Any], examples: list[dict]) -> dict[str, Any]:
    """The fields the objectives read (module docstring): ``num_pairs`` (rows), ``num_irrelevant``, ``margin`` as for
    pairs always, and ``reward_labels`` when a row is a ranking, a tie or has a score."""
    num_irrelevant = {len(example.get("irrelevant") or []) for example in examples}
    if len(num_irrelevant) > 1:
        raise ValueError(f"every row in a batch needs the same number of irrelevant prompts, got {num_irrelevant}")
    batch["num_pairs"] = len(examples)
    batch["num_irrelevant"] = num_irrelevant.pop()
    margins = [example.get("margin") for example in examples]
    if any(margin is not None for margin in margins):
        batch["margin"] = torch.tensor([margin or 0.0 for margin in margins], dtype=torch.float32)
    if not all(is_plain_pair(example) for example in examples):
        batch["reward_labels"] = reward_labels(examples, reward_positions([len(responses_of(e)) for e in examples]))
    return batch
