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

A **joint** checkpoint (``scoring_mode: joint``, ``vlrm.use.joint``) judges a group's completions together: ``score``
chains the completions of one prompt and media, at most the recorded ``joint_group_size`` to a chain (a larger group in
near-equal chains), averaged over orders; ``reward.scorer.last_joint_rows`` says after a call which chain each
completion was in and its size (1: a completion with no other of its prompt in the call, judged alone).

A **process** checkpoint (trained with ``reward_type: process``: a score at the end of every step, ``vlrm.use.process``)
gives each completion its solution's score: the completion split into steps at the checkpoint's recorded
``step_separator``, each step's score (sigmoid of its reward, in [0, 1]) combined by the recorded
``step_aggregation`` (or ``aggregation=``: mean, min, last, product). RL code that wants every step's reward (a
per-step advantage) calls ``step_rewards`` (one list per completion) or reads ``last_step_rewards`` after a call,
which holds the same lists without a second forward:

    reward = VLRewardFunction.from_pretrained("outputs/tiny_process_demo", aggregation="min")
    rewards = reward(prompts, completions, image=images)          # one float per completion, in [0, 1]
    per_step = reward.last_step_rewards                           # [[0.93, 0.88], [0.71, 0.12, 0.40], ...]

A completion with no step (empty, or only separators) has no place to read a score: it gets ``nan_reward``, as an
over-long one does (``nan_reward=0.0`` scores it as the worst solution). ``normalize`` is refused for a process
checkpoint: its scores are probabilities already, on one scale for every checkpoint, and training records no
reward_mean / reward_std for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlrm.data.videos import VideoSettings
from vlrm.layout.steps import STEP_AGGREGATIONS
from vlrm.use.process import StepScores, split_steps
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
    weighted sum); for a process checkpoint, the solution's aggregated step score (module docstring). ``normalize``:
    return ``(r - mean) / std`` with the statistics recorded in the checkpoint's config at the end of training (the
    final model on a seeded sample of its training set; with attribute heads, the weighted sum of each attribute
    normalised by its own, ``RewardScorer.normalized``); refused for a process checkpoint. A completion longer than
    ``max_seq_length`` is not scored and gets ``nan_reward``: NaN by default, which TRL's GRPOTrainer leaves out of its
    group's baseline and gives no advantage (unless another reward function scores it). ``aggregation``: a process
    checkpoint's step aggregation (None: the recorded one)."""

    def __init__(
        self, scorer: RewardScorer, normalize: bool = False, batch_size: int = 16, nan_reward: float = float("nan"),
        aggregation: str | None = None,
    ):  # fmt: skip
        self.process = scorer.process["reward_type"] == "process"
        if normalize and self.process:
            raise ValueError(
                "normalize is not offered for a process reward model: its rewards are step scores aggregated into a "
                "probability in [0, 1] already (no reward_mean/reward_std is recorded for them); use them as they are"
            )
        if normalize:
            scorer.require_reward_statistics()  # fails now, with the reason, if the stats are absent
        if aggregation is not None and not self.process:
            raise ValueError(
                "aggregation combines the step scores of a process reward model; this checkpoint is an outcome reward "
                "model (one reward per completion): leave aggregation unset"
            )
        if aggregation is not None and aggregation not in STEP_AGGREGATIONS:
            raise ValueError(f"aggregation {aggregation!r}: one of {', '.join(STEP_AGGREGATIONS)}")
        self.scorer, self.normalize, self.batch_size, self.nan_reward = scorer, normalize, batch_size, nan_reward
        self.aggregation = aggregation or (scorer.process["step_aggregation"] if self.process else None)
        # A process checkpoint's step rewards of the last call: RL code that wants them reads them here rather than
        # scoring the completions a second time.
        self.last_step_rewards: list[list[float]] | None = None
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
        nan_reward: float = float("nan"),
        aggregation: str | None = None,
    ) -> VLRewardFunction:
        """``device_map`` / ``max_memory``: a reward model larger than one GPU, split over several (accelerate's
        dispatch, as ``RewardScorer.from_pretrained`` takes them); e.g. the policy on GPUs 0-3 and a 72B reward
        model on 4-7 with ``device_map="auto", max_memory={4: "75GiB", 5: "75GiB", 6: "75GiB", 7: "75GiB"}``.
        ``video_settings``: how videos are sampled, as ``RewardScorer.from_pretrained`` takes it (None: the
        checkpoint's recorded settings, those it was trained with). ``nan_reward`` and ``aggregation``: the class
        docstring."""
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
        return cls(scorer, normalize=normalize, batch_size=batch_size, nan_reward=nan_reward, aggregation=aggregation)

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
        if self.process:
            scores = self.step_scores(prompts, completions, **columns)
            self.last_step_rewards = self._step_lists(scores)
            return [self.nan_reward if np.isnan(score) else float(score) for score in scores.scores]
        columns = {key: value for key, value in columns.items() if key in MEDIA_COLUMNS}
        rewards = self.scorer.score(
            self.rows(prompts, completions, **columns), self.batch_size, normalize=self.normalize
        )
        return [self.nan_reward if np.isnan(reward) else float(reward) for reward in rewards]

    def step_rewards(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[list[float]]:
        """A process checkpoint's reward for every step of every completion, in TRL's arguments: one list per
        completion, each step's score (sigmoid of its reward, in [0, 1]) in order; ``nan_reward`` for each step of an
        over-long completion, an empty list for a completion with no step."""
        steps = self._step_lists(self.step_scores(prompts, completions, **columns))
        self.last_step_rewards = steps
        return steps

    def step_scores(self, prompts: Sequence, completions: Sequence, **columns: Any) -> StepScores:
        """``RewardScorer.score_steps`` of the completions, each split at the checkpoint's step separator, the solution
        scores aggregated with this function's ``aggregation``. A completion with no step is not scored: an empty
        step array and a NaN score."""
        if not self.process:
            raise ValueError(
                "this checkpoint is an outcome reward model (one reward per completion): step rewards need a "
                "checkpoint trained with reward_type: process; call the function itself for the rewards"
            )
        columns = {key: value for key, value in columns.items() if key in MEDIA_COLUMNS}
        rows = self.rows(prompts, completions, **columns)
        separator = self.scorer.process["step_separator"]
        sampled: dict[tuple, dict] = {}  # here, so that a bad video names its completion's index
        solutions = []
        for index, row in enumerate(rows):
            steps = split_steps(row.pop("response"), separator)
            videos = self.scorer._sampled_videos(row["videos"], index, sampled)
            solutions.append(row | {"videos": videos, "steps": steps})
        scored = [index for index, solution in enumerate(solutions) if solution["steps"]]
        steps = [np.zeros(0, dtype=np.float32) for _ in solutions]
        rewards = [np.zeros(0, dtype=np.float32) for _ in solutions]
        scores = np.full(len(solutions), np.nan, dtype=np.float32)
        if scored:
            result = self.scorer.score_steps([solutions[i] for i in scored], self.batch_size, self.aggregation)
            for position, index in enumerate(scored):
                steps[index], rewards[index] = result.steps[position], result.rewards[position]
                scores[index] = result.scores[position]
        return StepScores(steps, rewards, scores, self.aggregation)

    def _step_lists(self, scores: StepScores) -> list[list[float]]:
        return [[self.nan_reward if np.isnan(value) else float(value) for value in row] for row in scores.steps]
