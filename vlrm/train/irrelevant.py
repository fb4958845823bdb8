"""Irrelevant-query augmentation: a pair's chosen response placed under another pair's prompt.

A reward model must not score a fluent answer highly when it does not answer the image and question it is shown.
For pair i we draw ``num_irrelevant_pairs`` other pairs j and add the branch (prompt_j, chosen_i); the loss
(``vlrm.train.trainer.reward_losses``) asks r(prompt_i, chosen_i) > r(prompt_j, chosen_i).

A partner j is valid when it is not i, its images differ from i's (for text-only rows: its question differs), and its
chosen response differs from i's (else chosen_i may be right under prompt_j too). Partners come from the same
micro-batch when it holds enough valid ones, so in the packed layout the extra branch reuses a prompt that is computed
anyway and costs only its response tokens; otherwise from the whole dataset. Draws are seeded by (seed, epoch, i):
the same on every process, different every epoch (and the shuffled batches differ every epoch too).

Modes: ``query`` swaps the whole prompt (j's images and question); ``image`` keeps i's question and swaps only the
images, which tests visual grounding. In ``image`` mode a partner must have as many images as i, and partners that
ask i's own question (with a different chosen answer) are preferred: a partner asking something else may show an
image for which i's answer happens to be right (i asks the colour, j asks the count of shapes that have i's colour).
A row whose question no other row asks takes any valid partner. A text-only row has no image to swap and falls back
to ``query``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import datasets
import numpy as np
from transformers import TrainerCallback

from vlrm.data.rows import images_key

ROW_INDEX = "row_index"


def prompt_keys(dataset: datasets.Dataset) -> list[str]:
    """What makes two prompts the same for this purpose (``vlrm.data.rows.images_key``): their images, or their text
    when they have none. Prepared sets carry it as a column; other sets are read once, images undecoded."""
    if "images_key" in dataset.column_names:
        return dataset["images_key"]
    undecoded = dataset.select_columns(["images", "prompt"]).cast_column(
        "images", datasets.List(datasets.Image(decode=False))
    )
    return [images_key(row["prompt"], row["images"]) for row in undecoded]


def _digest(text: str) -> int:
    """A stable 64-bit hash: the sampler compares rows by these, so it holds a few integers per row, not texts."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class IrrelevantPairSampler:
    def __init__(self, dataset: datasets.Dataset, num_pairs: int, seed: int, mode: str = "query"):
        self.num_pairs, self.seed, self.mode = num_pairs, seed, mode
        self.keys = [_digest(key) for key in prompt_keys(dataset)]
        self.chosen, self.image_counts, self.questions = [], [], []
        # Read in batches of texts only (no image column), so memory stays a few integers per row.
        for batch in dataset.select_columns(["chosen", "prompt"]).iter(batch_size=4096):
            self.chosen += [_digest(chosen) for chosen in batch["chosen"]]
            for prompt in batch["prompt"]:
                self.image_counts.append(sum(part["type"] == "image" for turn in prompt for part in turn["content"]))
                self.questions.append(_digest(json.dumps(prompt, sort_keys=True)))
        self.same_question: dict[int, list[int]] = {}  # image mode: question -> rows asking it
        if mode == "image":
            for index, question in enumerate(self.questions):
                self.same_question.setdefault(question, []).append(index)

    def _valid(self, index: int, other: int) -> bool:
        if other == index or self.keys[other] == self.keys[index] or self.chosen[other] == self.chosen[index]:
            return False
        if self.mode == "image" and self.image_counts[index]:
            return self.image_counts[other] == self.image_counts[index]
        return True

    def partners(self, index: int, epoch: int, pool: list[int] | None = None) -> list[int]:
        """``num_pairs`` distinct valid partners of row ``index`` for ``epoch``: from ``pool`` (the micro-batch's row
        indices) when it has enough, else from the whole dataset; in ``image`` mode rows asking i's question first."""
        rng = np.random.default_rng([self.seed, epoch, index])
        if self.mode == "image" and self.image_counts[index]:
            asked_too = self.same_question[self.questions[index]]
            same_in_pool = [other for other in pool or [] if self.questions[other] == self.questions[index]]
            for candidates in (same_in_pool, asked_too):
                if drawn := self._draw(index, candidates, rng):
                    return drawn
        if pool is not None and (drawn := self._draw(index, pool, rng)):
            return drawn
        if drawn := self._draw(index, range(len(self.keys)), rng):
            return drawn
        valid = sum(self._valid(index, other) for other in range(len(self.keys)))
        raise ValueError(
            f"row {index}: only {valid} other pairs have different images and a different chosen response; "
            f"num_irrelevant_pairs={self.num_pairs} needs more"
        )

    def _draw(self, index: int, candidates: Sequence[int], rng: np.random.Generator) -> list[int] | None:
        """``num_pairs`` distinct valid partners drawn from ``candidates``, or None when it holds too few."""
        chosen: list[int] = []
        for position in _positions(len(candidates), 64 * self.num_pairs if len(candidates) > 64 else 0, rng):
            other = candidates[position]
            if other not in chosen and self._valid(index, other):
                chosen.append(other)
                if len(chosen) == self.num_pairs:
                    return chosen
        return None


def _positions(size: int, random_draws: int, rng: np.random.Generator) -> Iterator[int]:
    """``random_draws`` positions drawn with replacement (rejection sampling: cheap when valid partners are the vast
    majority of a large set), then every position once in a random order (so a scarce valid partner is still found);
    the permutation is only made when the draws were not enough."""
    for _ in range(random_draws):
        yield int(rng.integers(size))
    yield from rng.permutation(size).tolist()


def irrelevant_prompts(
    dataset: datasets.Dataset,
    sampler: IrrelevantPairSampler,
    index: int,
    example: dict,
    epoch: int,
    pool: list[int] | None = None,
) -> list[dict[str, Any]]:
    """The prompts (messages + images) under which row ``index``'s chosen response is placed."""
    prompts = []
    for other_index in sampler.partners(index, epoch, pool):
        other = dataset[other_index]
        question = example["prompt"] if sampler.mode == "image" and example["images"] else other["prompt"]
        prompts.append({"prompt": question, "images": other["images"]})
    return prompts


class IrrelevantQueryCollator:
    """Wraps a layout collator: attaches ``irrelevant`` prompts to every example, then collates.

    Examples need a ``row_index`` column (``with_row_index``). ``epoch`` is set by ``EpochCallback``.
    """

    def __init__(self, collator: Callable, dataset: datasets.Dataset, sampler: IrrelevantPairSampler):
        self.collator, self.dataset, self.sampler = collator, dataset, sampler
        self.epoch = 0

    def irrelevant_prompts(self, example: dict, pool: list[int] | None = None) -> list[dict[str, Any]]:
        return irrelevant_prompts(self.dataset, self.sampler, example[ROW_INDEX], example, self.epoch, pool)

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        pool = [example[ROW_INDEX] for example in examples]
        examples = [dict(example, irrelevant=self.irrelevant_prompts(example, pool)) for example in examples]
        return self.collator(examples)


class RowsWithIrrelevantPrompts(Sequence):
    """A dataset's rows with fixed irrelevant prompts attached (epoch 0, partners from the same scoring batch), for
    evaluation: every checkpoint is scored on the same draws, whether or not it was trained with the augmentation."""

    def __init__(self, dataset: datasets.Dataset, num_pairs: int, seed: int, mode: str, batch_size: int):
        self.dataset, self.batch_size = dataset, batch_size
        self.sampler = IrrelevantPairSampler(dataset, num_pairs, seed, mode)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.dataset[index]
        start = index - index % self.batch_size
        pool = list(range(start, min(start + self.batch_size, len(self.dataset))))
        return dict(example, irrelevant=irrelevant_prompts(self.dataset, self.sampler, index, example, 0, pool))


def with_row_index(dataset: datasets.Dataset) -> datasets.Dataset:
    return dataset.add_column(ROW_INDEX, list(range(len(dataset))))


class EpochCallback(TrainerCallback):
    """Tells the irrelevant-query collator which epoch starts, so partners are redrawn each epoch."""

    def __init__(self, collator: IrrelevantQueryCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int(state.epoch or 0)
