"""Scoring with a joint checkpoint (``scoring_mode: joint``, ``vlrm.layout.joint``): a prompt's responses judged in
one chain, averaged over orders.

A joint model's reward of a response depends on the responses before it in the chain, so scoring averages over
orders: a pair's two orders (preferred first, then last), or ``joint_permutations`` seeded orders of N responses (the
first one the given order). ``RewardScorer`` follows the checkpoint's recorded mode with no change in its calls:

- ``score_pairs``: each row one chain per order, the rewards averaged; ``PairScores.order_chosen`` /
  ``order_rejected`` keep each order's (order 0: chosen first; for a pair, order 1: chosen last), from which
  ``eval_rm.py`` reports the position-bias diagnostic (accuracy with the preferred response first vs last).
- ``score`` (single responses, a GRPO group's completions): rows with the same prompt and media are chained, at most
  ``joint_group_size`` to a chain (a larger group is split into chains of near-equal size); a lone response is scored
  alone, a chain of one, and the scorer says how many were (``last_joint_report``) and, per row, which chain it was
  scored in and with how many others (``last_joint_rows``, a ``JointRows``: the GRPO reward function and the server
  read it to say which completions were judged together).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vlrm.data.rankings import responses_of
from vlrm.layout.joint import JointCollator
from vlrm.layout.labels import LABEL_FIELDS

logger = logging.getLogger(__name__)


def joint_orders(count: int, permutations: int, seed: int, key: str) -> list[list[int]]:
    """The orders a row of ``count`` responses is scored in: the given order first; for a pair, then the reverse;
    else up to ``permutations`` distinct seeded orders in all."""
    identity = list(range(count))
    if permutations <= 1 or count < 2:
        return [identity]
    if count == 2:
        return [identity, identity[::-1]]
    orders, rng = [identity], random.Random(hashlib.sha1(f"{seed}-orders-{key}".encode()).hexdigest())
    for _ in range(20 * permutations):
        if len(orders) == permutations:
            break
        order = identity[:]
        rng.shuffle(order)
        if order not in orders:
            orders.append(order)
    return orders


class JointOrdersCollator:
    """Collates rows for a joint checkpoint's scorer: one joint batch per order (``joint_orders``); the first batch
    carries the label fields and ``order_batches``, the others. ``average_outputs`` runs and averages them."""

    def __init__(self, encoder: Any, packing: bool, permutations: int, seed: int = 0, max_seq_length=None):
        self.collator = JointCollator(encoder, packing, seed, shuffle=False, max_seq_length=max_seq_length)
        self.permutations, self.seed = permutations, seed

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        per_row = [
            joint_orders(len(responses_of(example)), self.permutations, self.seed, str(example.get("id", index)))
            for index, example in enumerate(examples)
        ]
        count = max(len(orders) for orders in per_row)
        batches = [self.collator(examples, [orders[k % len(orders)] for orders in per_row]) for k in range(count)]
        first = batches[0]
        first["order_batches"] = [
            {key: value for key, value in batch.items() if key not in LABEL_FIELDS} for batch in batches[1:]
        ]
        return first


def average_outputs(forward, batch: dict[str, Any]) -> Any:
    """The model's output for a ``JointOrdersCollator`` batch: rewards (and attribute rewards) averaged over the
    orders, each order's rewards kept as ``order_rewards`` ``[orders, R]``. ``forward``: the scorer's forward of one
    collated batch."""
    extra = batch.pop("order_batches", [])
    outputs = forward(batch)
    if not extra:
        outputs.order_rewards = outputs.rewards.float()[None]
        return outputs
    others = [forward(other) for other in extra]
    rewards = torch.stack([outputs.rewards.float()] + [other.rewards.float() for other in others])
    outputs.order_rewards = rewards
    outputs.rewards = rewards.mean(0)
    outputs.logits = outputs.rewards[:, None]
    if outputs.attribute_rewards is not None:
        outputs.attribute_rewards = torch.stack(
            [outputs.attribute_rewards.float()] + [other.attribute_rewards.float() for other in others]
        ).mean(0)
    return outputs


def group_rows(keys: Sequence, group_size: int) -> list[list[int]]:
    """Indices of rows with equal keys (one prompt and its media), in chains of at most ``group_size`` (a larger
    group split into near-equal chains); the chains in order of first appearance."""
    groups: dict[Any, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    chains = []
    for members in groups.values():
        parts = -(-len(members) // group_size)
        size = -(-len(members) // parts)
        chains += [members[start : start + size] for start in range(0, len(members), size)]
    return chains


@dataclass
class JointRows:
    """Per row of a ``score`` call on a joint checkpoint: ``chain[i]``, the chain row i was scored in (numbered from
    0, prompts in the order of their first row, a prompt's chains one after another; -1: not scored, over
    ``max_seq_length``), and ``size[i]``, that chain's
    number of responses (1: scored alone, or not scored). Rows with equal ``chain`` were judged together. A chain that
    turns out longer than ``max_seq_length`` is still split by the collator (``vlrm.layout.joint.split_chain``): its
    entry names the chain it was grouped in."""

    chain: np.ndarray  # int64 [rows]
    size: np.ndarray  # int64 [rows]

    @classmethod
    def of(cls, chains: list[list[int]], count: int) -> JointRows:
        chain, size = np.full(count, -1, dtype=np.int64), np.ones(count, dtype=np.int64)
        for number, members in enumerate(chains):
            chain[members], size[members] = number, len(members)
        return cls(chain, size)

    def entries(self, start: int = 0, stop: int | None = None) -> list[dict[str, int]]:
        """``[{"chain", "size"}, ...]`` for rows ``start:stop`` (the server's reply shape)."""
        return [{"chain": int(chain), "size": int(size)}
                for chain, size in zip(self.chain[start:stop], self.size[start:stop], strict=True)]  # fmt: skip


def chain_rows(sequences: Sequence[tuple], chains: list[list[int]], texts: Sequence[str]) -> list[dict]:
    """One N-response row per chain of ``score``'s rows (``sequences``: (messages, images, ids, videos)), with
    neutral labels: the joint collator reads prompts, media and responses. A chain's id (the key of its seeded orders,
    ``joint_orders``) is its responses': the same chain gets the same orders, and so the same rewards, wherever it
    stands among a call's chains (the server merges requests into micro-batches as they come)."""
    rows = []
    for members in chains:
        messages, images, _, videos = sequences[members[0]]
        responses = [texts[index] for index in members]
        key = hashlib.sha1("\x1f".join(responses).encode()).hexdigest()[:16]
        rows.append({"id": f"chain-{key}", "prompt": messages, "images": images, "videos": videos,
                     "responses": responses, "ranks": [0.0] * len(responses), "chosen": responses[0],
                     "rejected": responses[-1]})  # fmt: skip
    return rows


def score_joint(scorer: Any, sequences: Sequence[tuple], texts: Sequence[str], kept: list[int], batch_size: int,
                prompt_key) -> tuple[np.ndarray, np.ndarray | None, dict[str, int], JointRows]:  # fmt: skip
    """Rewards (and attribute rewards) of ``score``'s kept rows on a joint checkpoint: chains of one prompt's rows,
    ``batch_size`` chains a micro-batch, averaged over orders. Returns them in row order, what was chained (counts) and
    each row's chain (``JointRows``; rows not in ``kept``: -1, size 1)."""
    settings = scorer.joint
    chains = [[kept[i] for i in chain] for chain in group_rows([prompt_key(sequences[i]) for i in kept],
                                                               settings["joint_group_size"])]  # fmt: skip
    rows = chain_rows(sequences, chains, texts)
    collator = JointOrdersCollator(scorer.encoder, scorer.packing, settings["joint_permutations"],
                                   max_seq_length=scorer.max_seq_length)  # fmt: skip
    rewards = np.full(len(sequences), np.nan, dtype=np.float32)
    named = None
    for start in range(0, len(rows), batch_size):
        batch_rows, batch_chains = rows[start : start + batch_size], chains[start : start + batch_size]
        batch = collator(batch_rows)
        labels = batch.get("reward_labels")
        for name in LABEL_FIELDS:
            batch.pop(name, None)
        outputs = average_outputs(scorer._forward_outputs, batch)
        flat = outputs.rewards.float().cpu()
        positions = labels.matrix if labels is not None else torch.arange(2 * len(batch_rows)).reshape(2, -1).T
        for row, members in enumerate(batch_chains):
            where = positions[row, : len(members)]
            rewards[members] = flat[where].numpy()
            if outputs.attribute_rewards is not None:
                if named is None:
                    named = np.full((len(sequences), outputs.attribute_rewards.shape[1]), np.nan, dtype=np.float32)
                named[members] = outputs.attribute_rewards.float().cpu()[where].numpy()
    report = {"chains": len(chains), "alone": sum(len(chain) == 1 for chain in chains),
              "chained": sum(len(chain) for chain in chains if len(chain) > 1)}  # fmt: skip
    if report["alone"]:
        logger.info("joint checkpoint: %d response(s) with no other response of their prompt scored alone",
                    report["alone"])  # fmt: skip
    return rewards, named, report, JointRows.of(chains, len(sequences))
