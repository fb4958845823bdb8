"""A vlrm reward model as the reward of an RL loop: ``VLRewardFunction`` for TRL's ``GRPOTrainer(reward_funcs=...)``.

    from trl import GRPOConfig, GRPOTrainer
    from vlrm import VLRewardFunction

    reward = VLRewardFunction.from_pretrained("outputs/run", normalize=True, device="cuda:1", dtype="bfloat16")
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=GRPOConfig(...), train_dataset=dataset)

TRL calls a reward function with ``prompts``, ``completions`` and every other dataset column as keyword lists, one
entry per completion; for a vision dataset the ``image`` or ``images`` column carries the images (TRL also puts them
into the prompt's image parts, where this reads them when the column is absent). Prompts and completions may be
plain strings or conversational messages. The return value is one float per completion.

Videos come in a ``video`` column (one video per row) or a ``videos`` column (a list per row), or as the payloads of
the prompt's ``{"type": "video", "video": ...}`` parts: paths, bytes, ``{"bytes", "path"}`` dicts (a
``datasets.Video`` column cast with ``decode=False``), frame lists or sampled videos (``vlrm.data.videos``). They are
sampled with the checkpoint's recorded video settings; a question string gets its videos before the text (or at its
``<video>`` markers), as ``vlrm.data`` places them in training.

A GRPO group is several completions of one prompt with one image or video. ``RewardScorer.score`` scores rows with
equal prompt and media under one prompt node of the packed layout, so the image or video goes through the vision
encoder (and is decoded, for a video) and the prompt through the language model once per group, not once per
completion.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlrm.data.videos import VideoSettings
from vlrm.use.scoring import DEFAULT_MAX_SEQ_LENGTH, RewardScorer

MEDIA_COLUMNS = ("image", "images", "video", "videos")  # the dataset columns read; TRL passes every column


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


def _prompt_and_media(prompt: Any, images: Sequence | None, videos: Sequence | None) -> tuple[Any, list, list]:
    """Messages with ``{"type": "image"}`` / ``{"type": "video"}`` parts (payloads removed), the images and the videos
    in their order. Media come from the dataset's columns when given, else from the parts' payloads (TRL's
    ``prepare_multimodal_messages`` fills the images'); a question string is left to ``RewardScorer.score``."""
    if isinstance(prompt, str):
        return prompt, list(images or []), list(videos or [])
    messages, embedded = [], {"image": [], "video": []}
    for message in prompt:
        content = message.get("content")
        if isinstance(content, str):
            messages.append({"role": message["role"], "content": [{"type": "text", "text": content}]})
            continue
        parts = []
        for part in content or []:
            kind = part.get("type")
            if kind in embedded:
                parts.append({"type": kind, "text": None})
                if part.get(kind) is not None:
                    embedded[kind].append(part[kind])
            else:
                parts.append({"type": "text", "text": part.get("text") or ""})
        messages.append({"role": message["role"], "content": parts})
    images = list(images) if images is not None else embedded["image"]
    videos = list(videos) if videos is not None else embedded["video"]
    unplaced = []  # media with no place in the prompt go before the text, videos then images, as vlrm.data does
    for kind, given in (("video", videos), ("image", images)):
        if given and not any(part["type"] == kind for message in messages for part in message["content"]):
            unplaced += [{"type": kind, "text": None} for _ in given]
    if unplaced:
        messages[-1]["content"] = unplaced + messages[-1]["content"]
    return messages, images, videos


def _per_row(columns: dict[str, Any], one: str, many: str, count: int) -> list:
    """Each row's media list from the ``many`` column (a list per row) or the ``one`` column (one value per row,
    None for none), or None per row when neither column is there (then the prompt's parts carry them)."""
    if many in columns:
        return list(columns[many])
    if one in columns:
        return [[value] if value is not None else [] for value in columns[one]]
    return [None] * count


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
        video_settings: VideoSettings | dict | None = None,
    ) -> VLRewardFunction:
        """``device_map`` / ``max_memory``: a reward model larger than one GPU, split over several (accelerate's
        dispatch, as ``RewardScorer.from_pretrained`` takes them); e.g. the policy on GPUs 0-3 and a 72B reward
        model on 4-7 with ``device_map="auto", max_memory={4: "75GiB", 5: "75GiB", 6: "75GiB", 7: "75GiB"}``.
        ``video_settings``: how videos are sampled, as ``RewardScorer.from_pretrained`` takes it (None: the
        checkpoint's recorded settings, those it was trained with)."""
        scorer = RewardScorer.from_pretrained(
            checkpoint_dir,
            base_model_path=base_model_path,
            dtype=dtype,
            attn_implementation=attn_implementation,
            device=device,
            max_seq_length=max_seq_length,
            device_map=device_map,
            max_memory=max_memory,
            video_settings=video_settings,
        )
        return cls(scorer, normalize=normalize, batch_size=batch_size)

    def rows(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[dict[str, Any]]:
        """The scorer's rows for TRL's arguments."""
        images = _per_row(columns, "image", "images", len(prompts))
        videos = _per_row(columns, "video", "videos", len(prompts))
        rows = []
        for prompt, completion, prompt_images, prompt_videos in zip(prompts, completions, images, videos, strict=True):
            messages, row_images, row_videos = _prompt_and_media(prompt, prompt_images, prompt_videos)
            response = _completion_text(completion)
            rows.append({"prompt": messages, "images": row_images, "videos": row_videos, "response": response})
        return rows

    def __call__(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[float]:
        columns = {key: value for key, value in columns.items() if key in MEDIA_COLUMNS}
        rewards = self.scorer.score(
            self.rows(prompts, completions, **columns), self.batch_size, normalize=self.normalize
        )
        return [self.nan_reward if np.isnan(reward) else float(reward) for reward in rewards]
