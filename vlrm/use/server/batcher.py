"""Micro-batching: one asyncio task merges queued requests into micro-batches, one thread runs the model.

A request waits at most ``max_wait_ms`` for others to join it, up to ``max_batch_size`` items (a request is never
split); the merged rows go to ``RewardScorer.score``, which puts rows with equal prompt and media under one prompt
node, so the completions of one GRPO group sent as separate requests share one prompt and one pass of the image or
video through the vision encoder (videos arrive sampled, decoded by the request parser: the key of a sampled video is
its content's, however it was sent). If a merged batch fails, each of its requests is scored alone. With attribute
heads (``reward_attributes``) every forward returns each attribute's rewards too: a request that asked gets its
share, and a normalised reward needs them (``RewardScorer.normalized``). With a process checkpoint the merged rows
(solutions, with ``steps``) go to ``RewardScorer.score_steps``, which puts the solutions of one prompt under one prompt
node alike; each request gets its solutions' scores and their step scores.

With a joint checkpoint (``vlrm.use.joint``) ``RewardScorer.score`` chains the merged rows of one prompt, at most
``joint_group_size`` to a chain, so completions of one prompt sent as separate requests are judged together when they
meet in a micro-batch, as are the items of one request. A request that asks (``joint=True``) gets with its rewards
each item's ``{"chain", "size", "batch"}``: the chain it was scored in (numbered within the micro-batch), how many
responses that chain held (1: scored alone) and the micro-batch's number (``stats.batches`` after it), so items of two
replies with equal ``batch`` and ``chain`` were judged together.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlrm.use.joint import JointRows
from vlrm.use.scoring import RewardScorer
from vlrm.use.server.settings import RequestError, ServerSettings

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    rows: list[dict]
    normalize: bool
    future: asyncio.Future
    attributes: bool = False
    joint: bool = False


@dataclass
class BatchStats:
    requests: int = 0
    items: int = 0
    batches: int = 0
    largest_batch: int = 0
    failed_batches: int = 0


class MicroBatcher:
    """Merges concurrent requests into micro-batches for ``RewardScorer.score``; never two forwards at once."""

    def __init__(self, scorer: RewardScorer, settings: ServerSettings):
        self.scorer, self.settings = scorer, settings
        self.stats = BatchStats()
        self.pending_items = 0  # queued or being scored: bounds the memory held by waiting requests
        self._queue: asyncio.Queue[_Pending] | None = None
        self._arrived: asyncio.Event | None = None  # set by every put: lets _collect wait without consuming
        self._carry: _Pending | None = None  # a request that did not fit the last batch: first in the next
        self._task: asyncio.Task | None = None
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlrm-model")

    async def start(self) -> None:
        self._queue, self._arrived = asyncio.Queue(), asyncio.Event()  # created here, on the server's event loop
        self._task = asyncio.create_task(self._run(), name="vlrm-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._model_thread.shutdown(wait=True)  # a forward in progress finishes; nothing new starts

    async def score(self, rows: list[dict], normalize: bool, attributes: bool = False, joint: bool = False) -> Any:
        """The rows' rewards, or with ``attributes`` ``(rewards, {attribute: rewards})``; for a process checkpoint
        ``(scores, [each row's step scores])``, the scores aggregated with the checkpoint's step aggregation. With
        ``joint`` (a joint checkpoint): ``(that, [each row's {"chain", "size", "batch"}])`` (module docstring)."""
        if self.pending_items + len(rows) > self.settings.max_pending_items:
            raise RequestError(
                f"server busy: {self.pending_items} items waiting (--max_pending_items="
                f"{self.settings.max_pending_items}); retry shortly",
                status=503,
            )
        pending = _Pending(rows, normalize, asyncio.get_running_loop().create_future(), attributes, joint)
        self.pending_items += len(rows)
        try:
            self._queue.put_nowait(pending)
            self._arrived.set()
            return await pending.future
        finally:
            self.pending_items -= len(rows)

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            try:
                await self._score_batch(batch)
            except Exception:  # the worker must not die: every later request would wait forever
                logger.exception("unexpected error in the batcher")
                for pending in batch:
                    _resolve(pending, exception=RequestError("internal error; see the server log", status=500))

    async def _collect(self) -> list[_Pending]:
        """The next micro-batch: the first waiting request, then whatever joins within ``max_wait_ms``, up to
        ``max_batch_size`` items (a request is never split; one larger than the limit goes alone)."""
        loop = asyncio.get_running_loop()
        first, self._carry = self._carry or await self._queue.get(), None
        batch, num_items = [first], len(first.rows)
        deadline = loop.time() + self.settings.max_wait_ms / 1000
        while num_items < self.settings.max_batch_size:
            if self._queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:  # wait on the event, not on queue.get(): a get() cancelled by the timeout could drop a request
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
                continue
            following = self._queue.get_nowait()  # one that arrived while the model was busy is taken at once
            if num_items + len(following.rows) > self.settings.max_batch_size:
                self._carry = following
                break
            batch.append(following)
            num_items += len(following.rows)
        return batch

    async def _score_batch(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        rows = [row for pending in batch for row in pending.rows]
        try:
            rewards, named, steps, joint = await loop.run_in_executor(self._model_thread, self._forward, rows)
        except Exception:
            self.stats.failed_batches += 1
            logger.exception("scoring a micro-batch of %d requests failed", len(batch))
            if len(batch) > 1:  # one request's failure must not fail the others: score each alone
                for pending in batch:
                    await self._score_batch([pending])
                return
            _resolve(batch[0], exception=RequestError("internal error while scoring; see the server log", status=500))
            return
        offset = 0
        for pending in batch:
            own = slice(offset, offset + len(pending.rows))
            offset += len(pending.rows)
            own_rewards = rewards[own]
            own_named = None if named is None else {name: values[own] for name, values in named.items()}
            if steps is not None:  # a process checkpoint (the parser refuses normalize and attributes for it)
                _resolve(pending, (own_rewards, steps[own]))
                continue
            if pending.normalize:
                own_rewards = self.scorer.normalized(own_rewards, own_named)
                own_named = None if own_named is None else self.scorer.normalized_attributes(own_named)
            result = (own_rewards, own_named) if pending.attributes else own_rewards
            if pending.joint:
                rows_joint = [] if joint is None else joint.entries(own.start, own.stop)
                # the count of this forward: the next one starts only after this batch is resolved (_run)
                result = (result, [entry | {"batch": self.stats.batches} for entry in rows_joint])
            _resolve(pending, result)

    def _forward(self, rows: list[dict]) -> tuple[np.ndarray, dict[str, np.ndarray] | None, list[np.ndarray] | None,
                                                  JointRows | None]:  # fmt: skip
        """Runs in the model thread: the rewards, each attribute's with attribute heads (else None), for a process
        checkpoint each row's step scores (else None; the rewards are then the solutions' scores), and for a joint
        checkpoint each row's chain (``RewardScorer.last_joint_rows``, read here: the next forward overwrites it)."""
        named, steps, joint = None, None, None
        if self.scorer.process["reward_type"] == "process":
            scored = self.scorer.score_steps(rows, batch_size=self.settings.max_batch_size)
            rewards, steps = scored.scores, scored.steps
        elif self.scorer.attribute_names is None:
            rewards = self.scorer.score(rows, batch_size=self.settings.max_batch_size)
        else:
            rewards, named = self.scorer.score(rows, batch_size=self.settings.max_batch_size, attributes=True)
        if steps is None:
            joint = self.scorer.last_joint_rows
        if np.isnan(rewards).any():  # the parser checked every length against the scorer's own limit
            raise RuntimeError("the scorer returned NaN for a row the length check accepted")
        self.stats.batches += 1
        self.stats.items += len(rows)
        self.stats.largest_batch = max(self.stats.largest_batch, len(rows))
        return rewards, named, steps, joint


def _resolve(pending: _Pending, rewards: Any = None, exception: Exception | None = None) -> None:
    if pending.future.done():  # the client went away and its handler was cancelled
        return
    if exception is not None:
        pending.future.set_exception(exception)
    else:
        pending.future.set_result(rewards)
