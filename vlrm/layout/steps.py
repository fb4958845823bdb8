"""Process rewards in both layouts: a score at the end of every step of a solution, all of a question's solutions
under its one prompt node.

A process row (``vlrm.data.steps``) has N solutions, each a list of steps. A solution is one branch: its steps are
encoded piece by piece (``PreferenceEncoder.encode_steps``: each step's text + ``step_separator``, the last step's +
the turn's end token) and its reward is read at the last token of every step, so a solution of K steps costs one
pass, not K (what an outcome reward model would need, one sequence per prefix). Rewards come back flat in **row,
solution, step order**: row 0's solution 0's steps, its solution 1's, ..., then row 1's. ``StepLabels`` says which
solution and row each reward belongs to, and holds the labels (NaN: neutral, never a loss or a metric).

- packed (``vlrm.layout.packed``): every solution of a question hangs under its prompt node, so the image (or video)
  and the question are computed once for all N solutions; the reward positions are each step's end.
- padded: one row per (question, solution); the reward positions are flat indices into ``[rows, length]``.

Both give the same step scores and gradients to float32 round-off (``tests/test_process.py``). Mean and attention
pooling (``vlrm.model.heads``) pool each step's own tokens.

Where a score is read is checked against the chat template when training starts (``check_step_separator``): the
separator must survive an assistant turn, and the last step ends on the end-of-turn token as an outcome reward does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import torch

from vlrm.layout.encoder import PreferenceEncoder
from vlrm.layout.packed import Nodes, pack_nodes
from vlrm.layout.padded import pad_read_points

STEP_AGGREGATIONS = ("mean", "min", "last", "product")


@dataclass
class ProcessArguments:
    """What kind of reward a model gives, and for a process reward how steps are read and combined; ``TrainConfig``
    inherits these fields and the trained model's config records them (``vlrm_reward_type``, ...)."""

    reward_type: Literal["outcome", "process"] = field(
        default="outcome",
        metadata={
            "help": "outcome: one reward per response (pairs, rankings, scores). process: a reward at the end of every "
            "step of a solution, trained with binary cross-entropy on step labels (vlrm.data.steps rows: VisualPRM400K, "
            "VisualProcessBench, steps + step_labels)."
        },
    )
    step_separator: str = field(
        default="\n\n",
        metadata={
            "help": "What ends a step inside a solution (process rewards): each step is followed by it, the last by the "
            "end-of-turn token, and a step's score is read at its last token. Checked against the chat template."
        },
    )
    train_on_last_step_only: bool = field(
        default=False,
        metadata={"help": "Process rewards: supervise only each solution's last step (default: every labelled step)."},
    )
    step_aggregation: Literal["mean", "min", "last", "product"] = field(
        default="mean",
        metadata={
            "help": "How a solution's step scores (sigmoid of each step's reward) make its score, for best-of-N and RL "
            "rewards: mean (VisualPRM's best), min, last, or product."
        },
    )


def recorded_settings(config: Any, defaults: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """Settings a model config records as ``vlrm_<name>`` (a checkpoint trained with them), else ``defaults``'."""
    return {name: getattr(config, f"vlrm_{name}", None) or getattr(defaults, name) for name in names}


def record_settings(config: Any, arguments: Any, names: tuple[str, ...]) -> None:
    """Write ``arguments``' settings into a model config as ``vlrm_<name>`` (saved with every checkpoint)."""
    for name in names:
        setattr(config, f"vlrm_{name}", getattr(arguments, name))


PROCESS_SETTINGS = ("reward_type", "step_separator", "step_aggregation")


def process_settings(config: Any) -> dict[str, Any]:
    """The process settings a model config records (``vlrm_reward_type``, ...), or the defaults of an outcome model."""
    return recorded_settings(config, ProcessArguments(), PROCESS_SETTINGS)


def record_process_settings(config: Any, arguments: ProcessArguments) -> None:
    """Write the process settings into a model config (an outcome model records its reward type only)."""
    record_settings(
        config, arguments, PROCESS_SETTINGS if arguments.reward_type == "process" else PROCESS_SETTINGS[:1]
    )


def aggregate_steps(probabilities: torch.Tensor, solution: torch.Tensor, num_solutions: int, how: str) -> torch.Tensor:
    """Each solution's score from its steps' scores (``probabilities``, in [0, 1]; ``solution`` [S]: the solution of
    each, steps in order): their mean (VisualPRM, Wang et al. 2025, arXiv 2503.10291, found it best for best-of-N),
    min (Lightman et al. 2023, "Let's Verify Step by Step", the weakest step), last, or product (the chance that every
    step is right, read as independent)."""
    if how not in STEP_AGGREGATIONS:
        raise ValueError(f"step_aggregation {how!r}: one of {', '.join(STEP_AGGREGATIONS)}")
    probabilities = probabilities.float()
    if how == "mean":
        sums = torch.zeros(num_solutions, device=probabilities.device).index_add_(0, solution, probabilities)
        counts = torch.zeros(num_solutions, device=probabilities.device).index_add_(
            0, solution, torch.ones_like(probabilities)
        )
        return sums / counts
    if how == "min":
        return torch.full((num_solutions,), math.inf, device=probabilities.device).scatter_reduce(
            0, solution, probabilities, reduce="amin"
        )
    if how == "product":
        logs = torch.zeros(num_solutions, device=probabilities.device).index_add_(
            0, solution, probabilities.clamp_min(1e-12).log()
        )
        return logs.exp()
    last = torch.zeros(num_solutions, dtype=torch.long, device=probabilities.device).scatter_reduce(
        0, solution, torch.arange(len(solution), device=probabilities.device), reduce="amax"
    )
    return probabilities[last]


@dataclass
class StepLabels:
    """The step labels of a micro-batch, aligned with its flat rewards (row, solution, step order): ``labels`` [S]
    (1 correct, 0 wrong, soft in between, NaN neutral), ``solution`` [S] (its solution's index in the batch),
    ``last`` [S] (its solution's last step), ``row`` [N] (each solution's row) and ``num_steps`` [N]."""

    labels: torch.Tensor
    solution: torch.Tensor
    last: torch.Tensor
    row: torch.Tensor
    num_steps: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> StepLabels:
        moved = {item.name: getattr(self, item.name).to(device, non_blocking=non_blocking) for item in fields(self)}
        return replace(self, **moved)

    @property
    def num_solutions(self) -> int:
        return len(self.num_steps)


def solutions_of(encoder: PreferenceEncoder, example: dict) -> list[tuple[list[int], list[int]]]:
    """(ids, step ends) of each of a process row's solutions."""
    if example.get("steps") is None:
        raise ValueError(
            f"row {example.get('id', '?')} has no steps: reward_type process reads rows of step-labelled solutions "
            "(vlrm.data.steps)"
        )
    return [encoder.encode_steps(list(steps)) for steps in example["steps"]]


def step_labels(examples: list[dict]) -> StepLabels:
    labels, solution, last, row, num_steps = [], [], [], [], []
    for row_index, example in enumerate(examples):
        for solution_labels in example.get("step_labels") or [[math.nan] * len(steps) for steps in example["steps"]]:
            index = len(num_steps)
            values = [math.nan if value is None else float(value) for value in solution_labels]
            labels += values
            solution += [index] * len(values)
            last += [False] * (len(values) - 1) + [True]
            row.append(row_index)
            num_steps.append(len(values))
    return StepLabels(
        labels=torch.tensor(labels, dtype=torch.float32),
        solution=torch.tensor(solution, dtype=torch.long),
        last=torch.tensor(last, dtype=torch.bool),
        row=torch.tensor(row, dtype=torch.long),
        num_steps=torch.tensor(num_steps, dtype=torch.long),
    )


def pack_solutions(encoder: PreferenceEncoder, examples: list[dict]) -> dict[str, Any]:
    """The packed row of process rows: each row's solutions under its prompt node, a reward at every step's end."""
    nodes, position = Nodes(), 0
    for example in examples:
        for ids, ends in solutions_of(encoder, example):
            nodes.add(example["prompt"], example["images"], position, ids, example.get("videos"), ends=ends)
            position += len(ends)
    return pack_nodes(encoder, nodes, position)


def pad_solutions(encoder: PreferenceEncoder, examples: list[dict]) -> dict[str, Any]:
    """The padded layout of process rows: one row per (question, solution), a reward at each step's end
    (``vlrm.layout.padded.pad_read_points``)."""
    rows, position = [], 0
    for example in examples:
        for ids, ends in solutions_of(encoder, example):
            positions = list(range(position, position + len(ends)))
            rows.append((example["prompt"], example["images"], ids, example.get("videos"), ends, positions))
            position += len(ends)
    return pad_read_points(encoder, rows)


class StepCollator:
    """Collates process rows (``vlrm.data.steps``) into either layout, with ``step_labels`` (``StepLabels``) and the
    pair fields the trainer reads (``num_pairs``: rows; no irrelevant branch)."""

    def __init__(self, encoder: PreferenceEncoder, packing: bool = True):
        self.encoder, self.packing = encoder, packing

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        batch = (pack_solutions if self.packing else pad_solutions)(self.encoder, examples)
        batch["num_pairs"], batch["num_irrelevant"] = len(examples), 0
        batch["step_labels"] = step_labels(examples)
        return batch
