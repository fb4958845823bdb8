"""``RewardScorer``: load a saved reward model and score rows in batches, with no gradient and no side effect.

    from vlrm.scoring import RewardScorer

    scorer = RewardScorer.from_pretrained("outputs/run/checkpoint-200")
    pair_scores = scorer.score_pairs(dataset, batch_size=16)  # canonical rows -> .chosen, .rejected
    rewards = scorer.score([{"prompt": "What is in the image?", "images": ["cat.png"], "response": "A cat."}])

Pairs go through the same collator as training (``vlrm.batching.make_collator``), so a score here is exactly the
reward the trainer saw for that row. ``eval_rm.py`` only orchestrates this class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoProcessor

from vlrm.batching import PreferenceEncoder, make_collator, pad_branches, split_rewards
from vlrm.checkpoints import CheckpointError, check_loadable
from vlrm.data import _user_prompt
from vlrm.model import VLRewardModel
from vlrm.packing import enable_packed_attention

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


@dataclass
class PairScores:
    """Rewards of the chosen and the rejected response of each pair, in row order (float32); ``irrelevant[i, j]``
    is pair i's chosen response under its j-th irrelevant prompt, when the rows carried them (else None)."""

    chosen: np.ndarray
    rejected: np.ndarray
    irrelevant: np.ndarray | None = None


def apply_pixel_limits(processor: Any, min_pixels: int | None, max_pixels: int | None) -> None:
    """Bound the image area the processor resizes to; None keeps the processor's own setting."""
    if min_pixels or max_pixels:
        size = dict(processor.image_processor.size)
        size["shortest_edge"] = min_pixels or size["shortest_edge"]
        size["longest_edge"] = max_pixels or size["longest_edge"]
        processor.image_processor.size = size


def load_processor(checkpoint_dir: str | Path, base_model_path: str | Path | None = None) -> Any:
    """The checkpoint's own processor, else the base model's (checkpoints saved without one still score with the
    tokenizer and image settings they were trained with, as long as those came from the base model)."""
    checkpoint_dir = Path(checkpoint_dir)
    if any((checkpoint_dir / name).is_file() for name in PROCESSOR_FILES):
        return AutoProcessor.from_pretrained(checkpoint_dir)
    if base_model_path is None:
        raise CheckpointError(
            f"{checkpoint_dir}: no processor files ({', '.join(PROCESSOR_FILES)}); set base_model_path to the model "
            "the run started from"
        )
    return AutoProcessor.from_pretrained(base_model_path)


def _batches(rows: Sequence, batch_size: int):
    for start in range(0, len(rows), batch_size):
        yield [rows[index] for index in range(start, min(start + batch_size, len(rows)))]


class RewardScorer:
    """Scores rows with a ``VLRewardModel`` in eval mode under ``torch.inference_mode()``; never writes."""

    def __init__(
        self, model: VLRewardModel, processor: Any, device: str | torch.device | None = None, packing: bool = True
    ):
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        if packing:
            enable_packed_attention(self.model)
        self.processor = processor
        self.encoder = PreferenceEncoder(processor)
        self.collator = make_collator(self.encoder, packing)

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
    ) -> RewardScorer:
        """Load a checkpoint dir (config + weights, processor optional). ``dtype``: auto (as saved), bfloat16,
        float16 or float32; ``device``: default cuda when visible, else cpu. Raises ``CheckpointError`` when the
        dir cannot be loaded or lacks trained weights (a base VLM has no score head: its rewards would be random)."""
        check_loadable(checkpoint_dir)
        try:
            model, loading_info = VLRewardModel.from_pretrained(
                checkpoint_dir,
                dtype=dtype if dtype == "auto" else getattr(torch, dtype),
                attn_implementation=attn_implementation,
                output_loading_info=True,
            )
        except Exception as error:  # safetensors, torch and transformers each raise their own types for a bad file
            raise CheckpointError(f"{checkpoint_dir}: cannot load: {type(error).__name__}: {error}") from error
        if loading_info["missing_keys"]:
            missing = sorted(loading_info["missing_keys"])
            hint = " (no score head: a base model, not a trained reward model)" if "score.weight" in missing else ""
            raise CheckpointError(
                f"{checkpoint_dir}: weights missing from the checkpoint{hint}: {', '.join(missing[:5])}"
            )
        processor = load_processor(checkpoint_dir, base_model_path)
        apply_pixel_limits(processor, min_pixels, max_pixels)
        device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model, processor, device, packing)

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

    @torch.inference_mode()
    def score_pairs(
        self, rows: Sequence[dict], batch_size: int = 8, progress: bool = True, desc: str = "pairs"
    ) -> PairScores:
        """Score canonical rows (a ``datasets.Dataset`` or a sequence of dicts with prompt, images, chosen, rejected,
        and optionally ``irrelevant`` prompts, see ``vlrm.irrelevant.RowsWithIrrelevantPrompts``)."""
        if len(rows) == 0:
            raise ValueError("no pairs to score")
        chosen, rejected, irrelevant = [], [], []
        num_batches = math.ceil(len(rows) / batch_size)
        for batch_rows in tqdm(
            _batches(rows, batch_size), total=num_batches, desc=desc, unit="batch", disable=not progress, leave=False
        ):
            batch = self.collator(batch_rows)
            num_pairs, num_irrelevant = batch.pop("num_pairs"), batch.pop("num_irrelevant")
            batch.pop("margin", None)
            chosen_rewards, rejected_rewards, irrelevant_rewards = split_rewards(
                self._forward(batch), num_pairs, num_irrelevant
            )
            chosen.append(chosen_rewards.cpu().numpy())
            rejected.append(rejected_rewards.cpu().numpy())
            irrelevant.append(irrelevant_rewards.cpu().numpy())
        irrelevant = np.concatenate(irrelevant) if irrelevant[0].size else None
        return PairScores(np.concatenate(chosen), np.concatenate(rejected), irrelevant)

    @torch.inference_mode()
    def score(self, rows: Sequence[dict], batch_size: int = 8, progress: bool = False) -> np.ndarray:
        """Score single responses: each row has ``prompt`` (a question string or chat messages), ``images`` (paths,
        PIL images or bytes; optional) and ``response``. Returns one float32 reward per row."""
        if len(rows) == 0:
            raise ValueError("no rows to score")
        rewards = []
        num_batches = math.ceil(len(rows) / batch_size)
        for batch_rows in tqdm(
            _batches(rows, batch_size), total=num_batches, desc="responses", disable=not progress, leave=False
        ):
            sequences = []
            for row in batch_rows:
                images = list(row.get("images") or [])
                prompt = row["prompt"]
                messages = _user_prompt(prompt, len(images)) if isinstance(prompt, str) else prompt
                sequences.append(
                    (self.encoder.encode_prompt(messages, images), self.encoder.encode_response(row["response"]))
                )
            batch = pad_branches(sequences, self.encoder.pad_token_id, self.encoder.image_token_id)
            rewards.append(self._forward(batch).cpu().numpy())
        return np.concatenate(rewards)
