"""``RewardScorer``: load a saved reward model and score rows in batches, with no gradient and no side effect.

    from vlrm import RewardScorer

    scorer = RewardScorer.from_pretrained("outputs/run/checkpoint-200")
    pair_scores = scorer.score_pairs(dataset, batch_size=16)  # canonical rows -> .chosen, .rejected
    rewards = scorer.score([{"prompt": "What is in the image?", "images": ["cat.png"], "response": "A cat."}])

Pairs go through the same collator as training (``vlrm.layout.packed.make_collator``), so a score here is exactly the
reward the trainer saw for that row. ``eval_rm.py`` only orchestrates this class.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vlrm.data.prepare import LENGTH_COLUMNS
from vlrm.data.rows import user_prompt
from vlrm.layout.attention import enable_packed_attention
from vlrm.layout.encoder import PreferenceEncoder, apply_pixel_limits
from vlrm.layout.packed import make_collator, pack_responses, prompt_key
from vlrm.layout.padded import pad_rows, split_rewards
from vlrm.model.loading import load_checkpoint
from vlrm.model.reward_model import VLRewardModel

logger = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LENGTH = 4096  # as training's default: a longer branch is not scored (never truncated)


@dataclass
class PairScores:
    """Rewards of the chosen and the rejected response of each pair, in row order (float32); ``irrelevant[i, j]``
    is pair i's chosen response under its j-th irrelevant prompt, when the rows carried them (else None).
    ``overlong`` lists the rows with a branch longer than ``max_seq_length`` and its tokens: they are not scored
    (NaN in every array)."""

    chosen: np.ndarray
    rejected: np.ndarray
    irrelevant: np.ndarray | None = None
    overlong: list[tuple[int, int]] = field(default_factory=list)

    @property
    def scored(self) -> np.ndarray:
        """Mask of the rows that were scored."""
        return ~np.isnan(self.chosen)


def _batches(indices: list[int], batch_size: int):
    for start in range(0, len(indices), batch_size):
        yield indices[start : start + batch_size]


class RewardScorer:
    """Scores rows with a ``VLRewardModel`` in eval mode under ``torch.inference_mode()``; never writes."""

    def __init__(
        self,
        model: VLRewardModel,
        processor: Any,
        device: str | torch.device | None = None,
        packing: bool = True,
        max_seq_length: int | None = DEFAULT_MAX_SEQ_LENGTH,
    ):
        self.max_seq_length = max_seq_length
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        if packing and not model.family.packed:  # vlrm.model.families: the generic path
            logger.info("%s has no packed layout: scoring with the padded layout", model.family.title)
            packing = False
        if packing:
            enable_packed_attention(self.model)
        self.processor = processor
        self.encoder = PreferenceEncoder(processor)
        self.packing = packing
        self.collator = make_collator(self.encoder, packing)
        self.reward_mean = getattr(model.config, "reward_mean", None)
        self.reward_std = getattr(model.config, "reward_std", None)

    @classmethod
    def from_pretrained(
        cls,
        checkpoint_dir: str | Path,
        base_model_path: str | Path | None = None,
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        device: str | torch.device | None = None,
        packing: bool = True,
        max_seq_length: int | None = DEFAULT_MAX_SEQ_LENGTH,
    ) -> RewardScorer:
        """Load a checkpoint dir (config + weights, processor optional). ``dtype``: auto (as saved), bfloat16,
        float16 or float32; ``device``: default cuda when visible, else cpu; ``max_seq_length``: longer sequences
        are not scored (None: no limit, at the risk of running out of memory). Raises ``CheckpointError`` when the
        dir cannot be loaded or lacks trained weights (a base VLM has no score head: its rewards would be random).

        Loading is ``vlrm.model.loading.load_checkpoint``'s: a vlrm LoRA checkpoint loads onto the base model it
        records, or onto ``base_model_path`` when that one is not reachable here, with its adapters unmerged (the
        computation training did); its processor, when the dir has none, is the base model's."""
        model, processor = load_checkpoint(checkpoint_dir, base_model_path, dtype, attn_implementation)
        apply_pixel_limits(processor, min_pixels, max_pixels)
        device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model, processor, device, packing, max_seq_length)

    def _forward(self, batch: dict[str, Any]) -> torch.Tensor:
        inputs = {}
        for key, value in batch.items():
            if torch.is_tensor(value):
                dtype = self.model.dtype if value.is_floating_point() else None
                value = value.to(self.device, dtype=dtype)
            elif hasattr(value, "to"):  # the packed layout's index tensors
                value = value.to(self.device)
            inputs[key] = value
        return self.model(**inputs).rewards

    def _longest_branch(self, row: dict) -> int:
        """Tokens of a pair's longest branch: prompt + the longer response, or an irrelevant prompt + chosen."""
        if all(row.get(name) is not None for name in LENGTH_COLUMNS):  # a prepared row carries its lengths
            prompt, chosen, rejected = (row[name] for name in LENGTH_COLUMNS)
        else:
            prompt, chosen, rejected = self.encoder.sequence_lengths(row)
        longest = prompt + max(chosen, rejected)
        for other in row.get("irrelevant") or []:
            longest = max(longest, self.encoder.prompt_length(other["prompt"], other["images"]) + chosen)
        return longest

    def _over_limit(self, lengths: Sequence[int]) -> list[bool]:
        return [self.max_seq_length is not None and tokens > self.max_seq_length for tokens in lengths]

    def _warn_overlong(self, overlong: list[tuple[int, int]], what: str) -> None:
        if overlong:
            first = ", ".join(f"{index} ({tokens} tokens)" for index, tokens in overlong[:5])
            logger.warning(
                "%d %s longer than max_seq_length=%d not scored (NaN), never truncated; first: %s", len(overlong),
                what, self.max_seq_length, first,
            )  # fmt: skip

    @torch.inference_mode()
    def score_pairs(
        self, rows: Sequence[dict], batch_size: int = 8, progress: bool = True, desc: str = "pairs"
    ) -> PairScores:
        """Score canonical rows (a ``datasets.Dataset`` or a sequence of dicts with prompt, images, chosen, rejected,
        and optionally ``irrelevant`` prompts, see ``vlrm.train.irrelevant.RowsWithIrrelevantPrompts``). A pair with a
        branch longer than ``max_seq_length`` is not scored: NaN, and listed in ``overlong``."""
        if len(rows) == 0:
            raise ValueError("no pairs to score")
        chosen = np.full(len(rows), np.nan, dtype=np.float32)
        rejected = chosen.copy()
        irrelevant, overlong = None, []
        for batch_indices in tqdm(
            _batches(list(range(len(rows))), batch_size), total=math.ceil(len(rows) / batch_size), desc=desc,
            unit="batch", disable=not progress, leave=False,
        ):  # fmt: skip
            examples = [rows[index] for index in batch_indices]  # each row read (and its images decoded) once
            unlimited = self.max_seq_length is None
            lengths = [0 if unlimited else self._longest_branch(example) for example in examples]
            too_long = self._over_limit(lengths)
            overlong += [
                (index, tokens) for index, tokens, over in zip(batch_indices, lengths, too_long, strict=True) if over
            ]
            if any(too_long):
                batch_indices = [index for index, over in zip(batch_indices, too_long, strict=True) if not over]
                examples = [example for example, over in zip(examples, too_long, strict=True) if not over]
                if not examples:
                    continue
            batch = self.collator(examples)
            num_pairs, num_irrelevant = batch.pop("num_pairs"), batch.pop("num_irrelevant")
            batch.pop("margin", None)
            chosen_rewards, rejected_rewards, irrelevant_rewards = split_rewards(
                self._forward(batch), num_pairs, num_irrelevant
            )
            chosen[batch_indices] = chosen_rewards.float().cpu().numpy()
            rejected[batch_indices] = rejected_rewards.float().cpu().numpy()
            if num_irrelevant:
                if irrelevant is None:
                    irrelevant = np.full((len(rows), num_irrelevant), np.nan, dtype=np.float32)
                irrelevant[batch_indices] = irrelevant_rewards.float().cpu().numpy()
        self._warn_overlong(overlong, "pairs")
        return PairScores(chosen, rejected, irrelevant, overlong)

    @torch.inference_mode()
    def score(
        self, rows: Sequence[dict], batch_size: int = 8, progress: bool = False, normalize: bool = False
    ) -> np.ndarray:
        """Score single responses: each row has ``prompt`` (a question string or chat messages), ``images`` (paths,
        PIL images or bytes; optional) and ``response``. Returns one float32 reward per row (``normalize``: as
        ``normalized``); a row longer than ``max_seq_length`` is not scored (NaN, with a warning naming it). With the
        packed layout, rows with the same prompt and images are scored in one micro-batch under one prompt node: the
        prompt and its images are computed once for all its responses."""
        if len(rows) == 0:
            raise ValueError("no rows to score")
        sequences = []
        for row in rows:
            images = list(row.get("images") or [])
            prompt = row["prompt"]
            messages = user_prompt(prompt, len(images)) if isinstance(prompt, str) else prompt
            sequences.append((messages, images, self.encoder.encode_response(row["response"])))
        lengths = [  # tokenizing each prompt once more is only worth it when there is a limit to check
            0 if self.max_seq_length is None else self.encoder.prompt_length(messages, images) + len(ids)
            for messages, images, ids in sequences
        ]
        too_long = self._over_limit(lengths)
        self._warn_overlong(
            [(i, tokens) for i, (tokens, over) in enumerate(zip(lengths, too_long, strict=True)) if over], "rows"
        )
        kept = [index for index, over in enumerate(too_long) if not over]
        if self.packing:  # rows of one prompt side by side, so a group shares one prompt node in a micro-batch
            first_seen: dict[tuple, int] = {}
            keys = [first_seen.setdefault(prompt_key(*sequences[index][:2]), index) for index in kept]
            kept = [index for _, index in sorted(zip(keys, kept, strict=True))]
        rewards = np.full(len(rows), np.nan, dtype=np.float32)
        for batch_indices in tqdm(
            _batches(kept, batch_size), total=math.ceil(len(kept) / batch_size), desc="responses",
            disable=not progress, leave=False,
        ):  # fmt: skip
            if self.packing:
                batch = pack_responses(self.encoder, [sequences[index] for index in batch_indices])
            else:
                batch = pad_rows(self.encoder, [sequences[index] for index in batch_indices])
            rewards[batch_indices] = self._forward(batch).float().cpu().numpy()
        return self.normalized(rewards) if normalize else rewards

    def normalized(self, rewards: np.ndarray) -> np.ndarray:
        """``(r - mean) / std`` with the reward statistics recorded in the checkpoint's config at the end of training
        (``reward_mean``, ``reward_std``: the final model on a seeded sample of its training set)."""
        if self.reward_mean is None or not self.reward_std:
            raise ValueError(
                "this checkpoint's config records no reward_mean/reward_std (only the final model of a vlrm training "
                "run has them): score without normalize, or take reward_mean/reward_std from eval_rm.py's results"
            )
        return ((rewards - self.reward_mean) / self.reward_std).astype(np.float32)
