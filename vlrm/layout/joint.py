"""Joint scoring: all responses of a prompt judged in one sequence, each seeing the ones before it.

"You Only Judge Once" (Yang et al. 2026, arXiv 2604.10966) lays the N candidate responses of a prompt out as one
chain after the prompt; response k attends to the prompt and to responses 1..k-1, and its reward is read at its own
end-of-turn token. One forward judges N responses, with the comparison in the context.

Here a chain is the prompt's own consecutive assistant turns (``joint_separator``: what the chat template writes
between two assistant turns, ``\\n<|im_start|>assistant\\n`` for Qwen; a template that cannot render two assistant turns
in a row is refused), each response + the end-of-turn token, encoded piece by piece (``encode_chain``):

    [prompt ... assistant\\n] r_1 <|im_end|> \\n<|im_start|>assistant\\n r_2 <|im_end|> ... r_N <|im_end|>
                               ^ reward 1                               ^ reward 2            ^ reward N

- padded (the reference): the chain is one ordinary causal row per prompt.
- packed: each chain is one causal segment of the packed row (several prompts' chains side by side, each image
  through the vision tower once): exactly what the padded row computes, with SDPA or flash-attn's varlen kernel and
  Qwen3.5's recurrent layers alike (``vlrm.layout.packed``, ``joint=True``).

Rewards come back in the order of ``vlrm.layout.labels`` (response-major, the row's own response order), whatever the
chain's order, so every objective of ``vlrm.train.objectives`` applies unchanged. The order: training draws a fresh
seeded order of a row's responses for each epoch (``chain_order``), so position carries no label; scoring averages
over orders (``vlrm.use``). A chain longer than ``max_seq_length`` is split into consecutive chains that fit (each its
own prompt node; a response never sees the ones in another chain), and the collator counts the splits; a single
response that does not fit is refused (preparation drops such rows, as for independent scoring).
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from vlrm.data.rankings import responses_of
from vlrm.layout.encoder import PreferenceEncoder, joint_separator
from vlrm.layout.labels import add_label_fields, reward_positions
from vlrm.layout.packed import Nodes, pack_nodes
from vlrm.layout.padded import pad_read_points
from vlrm.layout.steps import record_settings, recorded_settings

logger = logging.getLogger(__name__)


@dataclass
class JointArguments:
    """How responses are judged (``scoring_mode``) and, jointly, how their orders are drawn; ``TrainConfig``
    inherits these fields and the trained model's config records them (``vlrm_scoring_mode``, ...)."""

    scoring_mode: Literal["independent", "joint"] = field(
        default="independent",
        metadata={
            "help": "independent: each response attends to its prompt and itself. joint: a prompt's responses are one "
            "chain after the prompt, response k attending to the prompt and responses 1..k-1 (arXiv 2604.10966); "
            "training draws a fresh seeded order per row and epoch, scoring averages over orders (vlrm.layout.joint)."
        },
    )
    joint_permutations: int = field(
        default=2,
        metadata={
            "help": "Joint scoring: orders averaged per group (seeded; a pair's two orders are both orders). 1: the "
            "given order only."
        },
    )
    joint_group_size: int = field(
        default=8,
        metadata={"help": "Joint scoring in use: the most responses in one chain (a larger GRPO group is split)."},
    )


JOINT_SETTINGS = ("scoring_mode", "joint_permutations", "joint_group_size")


def joint_settings(config: Any) -> dict[str, Any]:
    """The joint settings a model config records, or the defaults (independent scoring)."""
    return recorded_settings(config, JointArguments(), JOINT_SETTINGS)


def record_joint_settings(config: Any, arguments: JointArguments) -> None:
    """Write the scoring mode into a model config, and for a joint model its orders and group size."""
    record_settings(config, arguments, JOINT_SETTINGS if arguments.scoring_mode == "joint" else JOINT_SETTINGS[:1])


def chain_order(count: int, seed: int, epoch: int, key: str) -> list[int]:
    """A seeded order of ``count`` responses for one row (``key``: its id) and epoch: the same in every run and rank."""
    order = list(range(count))
    digest = hashlib.sha1(f"{seed}-{epoch}-{key}".encode()).hexdigest()
    random.Random(digest).shuffle(order)
    return order


def split_chain(prompt_length: int, lengths: list[int], max_length: int | None) -> list[list[int]]:
    """Consecutive runs of a chain's responses (``lengths``: each one's tokens, separator included) whose prompt +
    responses fit ``max_length`` (None: one chain). Raises ``ValueError`` for a response that fits on no chain."""
    if max_length is None or prompt_length + sum(lengths) <= max_length:
        return [list(range(len(lengths)))]
    runs, current, total = [], [], prompt_length
    for index, length in enumerate(lengths):
        if prompt_length + length > max_length:
            raise ValueError(
                f"response {index} ({prompt_length} + {length} tokens) exceeds max_seq_length={max_length}"
            )
        if current and total + length > max_length:
            runs.append(current)
            current, total = [], prompt_length
        current.append(index)
        total += length
    return runs + [current]


class JointCollator:
    """Collates canonical rows (pairs or N responses) into joint chains, in either layout, with the label fields of
    ``vlrm.layout.labels``. ``epoch`` (set by the trainer's epoch callback) and ``seed`` draw each row's order
    (``shuffle=False``: the rows' own order, or ``orders`` given per call); ``max_seq_length`` splits over-long
    chains (``split_chains`` counts them)."""

    def __init__(self, encoder: PreferenceEncoder, packing: bool = True, seed: int = 0, shuffle: bool = True,
                 max_seq_length: int | None = None):  # fmt: skip
        self.encoder, self.packing, self.seed, self.shuffle = encoder, packing, seed, shuffle
        self.max_seq_length = max_seq_length
        self.separator = joint_separator(encoder.processor, encoder.end_of_turn)
        self.epoch, self.split_chains = 0, 0

    def order(self, example: dict, index: int) -> list[int]:
        count = len(responses_of(example))
        if not self.shuffle:
            return list(range(count))
        return chain_order(count, self.seed, self.epoch, str(example.get("id", index)))

    def chains(self, examples: list[dict], orders: list[list[int]] | None = None) -> list[tuple]:
        """(prompt, images, ids, videos, ends, positions) per chain: each row's responses in its order, split where
        a chain would exceed ``max_seq_length``."""
        if any(example.get("irrelevant") for example in examples):
            raise ValueError("joint scoring has no irrelevant-query branches: set use_irrelevant_queries: false")
        positions = reward_positions([len(responses_of(example)) for example in examples])
        chains = []
        for index, (example, where) in enumerate(zip(examples, positions, strict=True)):
            responses = responses_of(example)
            order = orders[index] if orders is not None else self.order(example, index)
            prompt_length, lengths = 0, [0] * len(order)
            if self.max_seq_length is not None:  # each piece as encode_chain tokenizes it, separator included
                prompt_length = self.encoder.prompt_length(example["prompt"], example["images"], example.get("videos"))
                texts = [(self.separator if n else "") + responses[k] + self.encoder.end_of_turn
                         for n, k in enumerate(order)]  # fmt: skip
                lengths = [len(ids) for ids in self.encoder.tokenizer(texts, add_special_tokens=False)["input_ids"]]
            runs = split_chain(prompt_length, lengths, self.max_seq_length)
            self.split_chains += len(runs) - 1
            for run in runs:
                ids, ends = self.encoder.encode_chain([responses[order[n]] for n in run], self.separator)
                chains.append((example["prompt"], example["images"], ids, example.get("videos"), ends,
                               [where[order[n]] for n in run]))  # fmt: skip
        return chains

    def __call__(self, examples: list[dict], orders: list[list[int]] | None = None) -> dict[str, Any]:
        chains = self.chains(examples, orders)
        total = sum(len(chain[5]) for chain in chains)
        if self.packing:
            nodes = Nodes()
            for number, (prompt, images, ids, videos, ends, positions) in enumerate(chains):
                nodes.add(prompt, images, positions[0], ids, videos, ends=ends, positions=positions, chain=number)
            batch = pack_nodes(self.encoder, nodes, total, joint=True)
        else:
            batch = pad_read_points(self.encoder, chains)
        return add_label_fields(batch, examples)
