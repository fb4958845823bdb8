"""A vlrm reward model as the reward of an RL loop: ``VLRewardFunction`` for TRL's ``GRPOTrainer(reward_funcs=...)``.

    from trl import GRPOConfig, GRPOTrainer
    from vlrm import VLRewardFunction

    reward = VLRewardFunction.from_pretrained("outputs/run", normalize=True, device="cuda:1", dtype="bfloat16")
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=GRPOConfig(...), train_dataset=dataset)

TRL calls a reward function with ``prompts``, ``completions`` and every other dataset column as keyword lists, one
entry per completion; for a vision dataset the ``image`` or ``images`` column carries the images (TRL also puts them
into the prompt's image parts, where this reads them when the column is absent). Prompts and completions may be
plain strings or conversational messages. The return value is one float per completion.

A GRPO group is several completions of one prompt with one image. ``RewardScorer.score`` scores rows with equal
prompt and images under one prompt node of the packed layout, so the image goes through the vision encoder and the
prompt through the language model once per group, not once per completion.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlrm.use.scoring import DEFAULT_MAX_SEQ_LENGTH, RewardScorer


def _text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content or [] if part.get("type") == "text")


def _completion_text(completion: Any) -> str:
    """A completion as TRL passes it: a string, or ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(completion, str):
        return completion
    return "".join(_text(message.get("content")) for message in completion if message.get("role") == "assistant")


def _prompt_and_images(prompt: Any, images: Sequence | None) -> tuple[Any, list]:
    """Messages with ``{"type": "image"}`` parts (payloads removed) and the images in their order. Images come from
    the dataset column when given, else from the parts' payloads (TRL's ``prepare_multimodal_messages`` fills them)."""
    if isinstance(prompt, str):
        return prompt, list(images or [])
    messages, embedded = [], []
    for message in prompt:
        content = message.get("content")
        if isinstance(content, str):
            messages.append({"role": message["role"], "content": [{"type": "text", "text": content}]})
            continue
        parts = []
        for part in content or []:
            if part.get("type") == "image":
                parts.append({"type": "image", "text": None})
                if part.get("image") is not None:
                    embedded.append(part["image"])
            else:
                parts.append({"type": "text", "text": part.get("text") or ""})
        messages.append({"role": message["role"], "content": parts})
    images = list(images) if images is not None else embedded
    num_parts = sum(part["type"] == "image" for message in messages for part in message["content"])
    if num_parts == 0 and images:  # images but no place for them: before the text, as vlrm.data does
        messages[-1]["content"] = [{"type": "image", "text": None} for _ in images] + messages[-1]["content"]
    return messages, images


class VLRewardFunction:
    """A callable reward for TRL's GRPOTrainer (and any RL loop): no gradient, batched, the model kept in eval mode.

    The reward is the checkpoint's scalar reward, whatever its head (``vlrm.model.heads``; with attribute heads, their
    weighted sum). ``normalize``: return ``(r - mean) / std`` with the statistics recorded in the checkpoint's config
    at the end of training (the final model on a seeded sample of its training set; with attribute heads, the
    weighted sum of each attribute normalised by its own, ``RewardScorer.normalized``). A completion longer than
    ``max_seq_length`` is not scored and gets ``nan_reward``: NaN by default, which TRL's GRPOTrainer leaves out of its
    group's baseline and gives no advantage (unless another reward function scores it)."""

    def __init__(
        self, scorer: RewardScorer, normalize: bool = False, batch_size: int = 16, nan_reward: float = float("nan")
    ):
        if normalize:
            scorer.require_reward_statistics()  # fails now, with the reason, if the stats are absent
        self.scorer, self.normalize, self.batch_size, self.nan_reward = scorer, normalize, batch_size, nan_reward
        self.__name__ = "vlrm_reward"  # the name TRL logs the reward under (rewards/vlrm_reward/mean)

    @classmethod
    def from_pretrained(
        cls,
        checkpoint_dir: str | Path,
        normalize: bool = False,
        batch_size: int = 16,
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        max_seq_length: int | None = DEFAULT_MAX_SEQ_LENGTH,
        base_model_path: str | Path | None = None,
        device_map: str | dict | None = None,
        max_memory: dict | None = None,
    ) -> VLRewardFunction:
        """``device_map`` / ``max_memory``: a reward model larger than one GPU, split over several (accelerate's
        dispatch, as ``RewardScorer.from_pretrained`` takes them); e.g. the policy on GPUs 0-3 and a 72B reward
        model on 4-7 with ``device_map="auto", max_memory={4: "75GiB", 5: "75GiB", 6: "75GiB", 7: "75GiB"}``."""
        scorer = RewardScorer.from_pretrained(
            checkpoint_dir,
            base_model_path=base_model_path,
            dtype=dtype,
            attn_implementation=attn_implementation,
            device=device,
            max_seq_length=max_seq_length,
            device_map=device_map,
            max_memory=max_memory,
        )
        return cls(scorer, normalize=normalize, batch_size=batch_size)

    def rows(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[dict[str, Any]]:
        """The scorer's rows for TRL's arguments."""
        if "images" in columns:
            images = columns["images"]
        elif "image" in columns:
            images = [[image] if image is not None else [] for image in columns["image"]]
        else:
            images = [None] * len(prompts)
        rows = []
        for prompt, completion, prompt_images in zip(prompts, completions, images, strict=True):
            messages, row_images = _prompt_and_images(prompt, prompt_images)
            rows.append({"prompt": messages, "images": row_images, "response": _completion_text(completion)})
        return rows

    def __call__(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[float]:
        columns = {key: value for key, value in columns.items() if key in ("image", "images")}
        rewards = self.scorer.score(
            self.rows(prompts, completions, **columns), self.batch_size, normalize=self.normalize
        )
        return [self.nan_reward if np.isnan(reward) else float(reward) for reward in rewards]
