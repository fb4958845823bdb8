"""``RewardScorer``: load a saved reward model and score rows in batches, with no gradient and no side effect.

    from vlrm import RewardScorer

    scorer = RewardScorer.from_pretrained("outputs/run/checkpoint-200")
    pair_scores = scorer.score_pairs(dataset, batch_size=16)  # canonical rows -> .chosen, .rejected
    rewards = scorer.score([{"prompt": "What is in the image?", "images": ["cat.png"], "response": "A cat."}])
    rewards = scorer.score([{"prompt": "What happens?", "videos": ["clip.mp4"], "response": "A cat jumps."}])

Videos (``videos``: paths, bytes, ``{"bytes", "path"}``, frame lists or sampled videos) are sampled with the
checkpoint's recorded video settings (``scorer.encoder.video_settings``, ``vlrm.data.videos``), each distinct video
once per ``score`` call (once per batch in ``score_pairs``; a prepared set's videos are sampled already).

Pairs go through the same collator as training (``vlrm.layout.packed.make_collator``), so a score here is exactly the
reward the trainer saw for that row. ``eval_rm.py`` only orchestrates this class.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vlrm.data.rankings import responses_of
from vlrm.data.rows import LENGTH_COLUMNS, user_prompt
from vlrm.data.videos import VideoSettings
from vlrm.errors import BadSampleError, RowProblem
from vlrm.layout.attention import enable_packed_attention
from vlrm.layout.encoder import PreferenceEncoder, apply_pixel_limits
from vlrm.layout.joint import joint_settings
from vlrm.layout.packed import make_collator, pack_responses, prompt_key, video_key
from vlrm.layout.padded import pad_rows, split_rewards
from vlrm.layout.steps import process_settings
from vlrm.model.heads import attribute_weights, head_settings_of
from vlrm.model.loading import load_checkpoint
from vlrm.model.reward_model import VLRewardModel
from vlrm.use.joint import JointOrdersCollator, JointRows, average_outputs, score_joint
from vlrm.use.process import StepScores, score_steps

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
    # Rows of N responses (vlrm.data.rankings): every response's reward, one float32 array per row in the row's own
    # order (a pair's: [chosen, rejected]); None when no row of the set has more than a pair's label. ``chosen`` and
    # ``rejected`` hold such a row's best and worst response.
    responses: np.ndarray | None = None
    # A checkpoint with attribute heads (reward_attributes): each scored row's [n, A] float32 attribute rewards (a
    # pair's n = 2: chosen, rejected; a row of N responses in its own order), ``attribute_names`` their names.
    attributes: np.ndarray | None = None
    attribute_names: tuple[str, ...] | None = None
    # A joint checkpoint (vlrm.use.joint): each order's chosen and rejected rewards, [rows, orders] (order 0: the
    # given order, chosen first; a pair's order 1: chosen last); ``chosen`` / ``rejected`` are their means.
    order_chosen: np.ndarray | None = None
    order_rejected: np.ndarray | None = None

    @property
    def scored(self) -> np.ndarray:
        """Mask of the rows that were scored."""
        return ~np.isnan(self.chosen)

    @classmethod
    def combine(cls, shards: Sequence[PairScores]) -> PairScores:
        """The scores of a whole set from its shards (``score_pairs(..., shard=(rank, size))`` on every rank): each
        row from the shard that scored it. A row no shard scored (over-long) stays NaN, as in one process."""
        first = shards[0]
        combined = cls(first.chosen.copy(), first.rejected.copy(), None, sorted(sum((s.overlong for s in shards), [])))
        if any(shard.responses is not None for shard in shards):
            combined.responses = np.full(len(first.chosen), None, dtype=object)
        if any(shard.attributes is not None for shard in shards):
            combined.attributes = np.full(len(first.chosen), None, dtype=object)
            combined.attribute_names = next(s.attribute_names for s in shards if s.attribute_names is not None)
        if first.irrelevant is not None or any(shard.irrelevant is not None for shard in shards):
            width = next(shard.irrelevant.shape[1] for shard in shards if shard.irrelevant is not None)
            combined.irrelevant = np.full((len(first.chosen), width), np.nan, dtype=np.float32)
        for shard in shards:
            mine = shard.scored
            combined.chosen[mine], combined.rejected[mine] = shard.chosen[mine], shard.rejected[mine]
            if shard.irrelevant is not None:
                combined.irrelevant[mine] = shard.irrelevant[mine]
            if shard.responses is not None:
                combined.responses[mine] = shard.responses[mine]
            if shard.attributes is not None:
                combined.attributes[mine] = shard.attributes[mine]
            for name in ("order_chosen", "order_rejected"):
                if getattr(shard, name) is not None:
                    if getattr(combined, name) is None:
                        setattr(combined, name, np.full((len(first.chosen), getattr(shard, name).shape[1]), np.nan,
                                                        dtype=np.float32))  # fmt: skip
                    getattr(combined, name)[mine] = getattr(shard, name)[mine]
        return combined


def dispatched_device_map(model: Any) -> dict | None:
    """The ``{module: device}`` map of a model loaded with a ``device_map`` (accelerate placed it, over one device or
    several, parts perhaps offloaded), else None (a model the scorer moves where it is asked)."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map is None and hasattr(model, "get_base_model"):  # a peft model wraps the placed one
        device_map = getattr(model.get_base_model(), "hf_device_map", None)
    return device_map or None


def input_device(device_map: dict) -> torch.device:
    """Where a dispatched model's inputs go: the device of its first module (the vision tower and the embeddings
    come first); offloaded modules (``disk``, ``cpu`` offload) execute on the CPU or the GPU accelerate gives them."""
    first = next(iter(device_map.values()))
    if isinstance(first, int):
        return torch.device("cuda", first)
    return torch.device("cpu" if first == "disk" else first)


def _ranking_rewards(
    rewards: torch.Tensor, labels: Any, examples: list[dict]
) -> tuple[list, torch.Tensor, torch.Tensor]:
    """(each row's rewards in its own order, its chosen's, its rejected's) from a labelled micro-batch's rewards."""
    row_rewards, chosen, rejected = [], [], []
    for row, (example, count) in enumerate(zip(examples, labels.num_responses.tolist(), strict=True)):
        values = rewards[labels.matrix[row, :count]].numpy()
        texts = responses_of(example)
        row_rewards.append(values)
        chosen.append(values[texts.index(example["chosen"])])
        rejected.append(values[len(texts) - 1 - texts[::-1].index(example["rejected"])])
    return row_rewards, torch.tensor(chosen), torch.tensor(rejected)


def _media_places(messages: list[dict], kind: str) -> int:
    """``{"type": kind}`` parts of chat messages (string contents have none)."""
    return sum(
        isinstance(part, dict) and part.get("type") == kind
        for message in messages
        if not isinstance(message.get("content"), str)
        for part in message.get("content") or []
    )


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
        video_settings: VideoSettings | dict | None = None,
    ):
        """``video_settings``: how videos are sampled (``vlrm.data.videos``); a dict overrides the fields it names
        of what the checkpoint recorded in training (``vlrm_video_sampling``), None takes the recorded ones."""
        self.max_seq_length = max_seq_length
        self.device_map = dispatched_device_map(model)
        if self.device_map is not None:  # split over devices by accelerate: inputs go where the first layers are
            self.device = input_device(self.device_map)
            self.model = model.eval()
        else:
            self.device = torch.device(device) if device is not None else next(model.parameters()).device
            self.model = model.to(self.device).eval()
        if packing and not model.family.packed:  # vlrm.model.families: the generic path
            logger.info("%s has no packed layout: scoring with the padded layout", model.family.title)
            packing = False
        if packing:
            enable_packed_attention(self.model)
        self.processor = processor
        if not isinstance(video_settings, VideoSettings):
            recorded = getattr(model.config, "vlrm_video_sampling", None)
            video_settings = VideoSettings.from_values(recorded, **(video_settings or {}))
        self.encoder = PreferenceEncoder(processor, video_settings)
        self.packing = packing
        self.collator = make_collator(self.encoder, packing)
        # A joint checkpoint (vlrm.layout.joint) scores a prompt's responses in chains, averaged over orders.
        self.joint = joint_settings(model.config)
        if self.joint["scoring_mode"] == "joint":
            self.collator = JointOrdersCollator(
                self.encoder, packing, self.joint["joint_permutations"], max_seq_length=max_seq_length
            )
        # What the last ``score`` call on a joint checkpoint chained: counts, and each row's chain and its size.
        self.last_joint_report: dict[str, int] | None = None
        self.last_joint_rows: JointRows | None = None
        # A process checkpoint (vlrm.layout.steps) records its reward type, step separator and aggregation.
        self.process = process_settings(model.config)
        self.encoder.step_separator = self.process["step_separator"]
        self.reward_mean = getattr(model.config, "reward_mean", None)
        self.reward_std = getattr(model.config, "reward_std", None)
        # The head's named rewards (vlrm.model.heads), their weights in the scalar and their own statistics.
        head = head_settings_of(model.config)
        self.attribute_names: tuple[str, ...] | None = (
            tuple(head.reward_attributes) if head.reward_attributes else None
        )
        self.attribute_weights = attribute_weights(head)
        self.reward_attribute_mean = getattr(model.config, "reward_attribute_mean", None)
        self.reward_attribute_std = getattr(model.config, "reward_attribute_std", None)

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
        device_map: str | dict | None = None,
        max_memory: dict | None = None,
        offload_folder: str | Path | None = None,
        reuse: RewardScorer | None = None,
        video_settings: VideoSettings | dict | None = None,
    ) -> RewardScorer:
        """Load a checkpoint dir (config + weights, processor optional). ``dtype``: auto (as saved), bfloat16,
        float16 or float32; ``device``: default cuda when visible, else cpu; ``max_seq_length``: longer sequences
        are not scored (None: no limit, at the risk of running out of memory). Raises ``CheckpointError`` when the
        dir cannot be loaded or lacks trained weights (a base VLM has no score head: its rewards would be random).

        A model larger than one device: ``device_map`` (``auto``, ``balanced``, or ``{module: device}``), with
        ``max_memory`` (``{0: "70GiB", 1: "70GiB"}``) and ``offload_folder`` as in transformers' big-model loading
        (accelerate's dispatch); both layouts work with the layers on several devices, and ``device`` is then
        unused. ``reuse``: the scorer of another adapter checkpoint of the same LoRA run: its base model is kept and
        only the adapters and the head are swapped (``load_checkpoint``'s ``reuse``). ``video_settings``: as in the
        constructor (the checkpoint's recorded sampling, with these fields overridden).

        Loading is ``vlrm.model.loading.load_checkpoint``'s: a vlrm LoRA checkpoint loads onto the base model it
        records, or onto ``base_model_path`` when that one is not reachable here, with its adapters unmerged (the
        computation training did); its processor, when the dir has none, is the base model's."""
        model, processor = load_checkpoint(
            checkpoint_dir, base_model_path, dtype, attn_implementation, device_map=device_map,
            max_memory=max_memory, offload_folder=offload_folder,
            reuse=None if reuse is None else reuse._give_up_model(),  # no other reference: freed if not reused
        )  # fmt: skip
        apply_pixel_limits(processor, min_pixels, max_pixels)
        device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model, processor, device, packing, max_seq_length, video_settings)

    def _give_up_model(self) -> Any:
        """The model, no longer this scorer's (``from_pretrained(reuse=...)``: the scorer is not used again)."""
        model, self.model = self.model, None
        return model

    def _forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self._forward_outputs(batch).rewards

    def _forward_outputs(self, batch: dict[str, Any]) -> Any:
        """The model's ``RewardOutput`` for a collated batch (rewards, and attribute rewards with attribute heads);
        a joint checkpoint's batch of several orders averaged over them (``vlrm.use.joint``)."""
        if "order_batches" in batch:
            return average_outputs(self._forward_one, batch)
        return self._forward_one(batch)

    def _forward_one(self, batch: dict[str, Any]) -> Any:
        inputs = {}
        for key, value in batch.items():
            if torch.is_tensor(value):
                dtype = self.model.dtype if value.is_floating_point() else None
                value = value.to(self.device, dtype=dtype)
            elif hasattr(value, "to"):  # the packed layout's index tensors
                value = value.to(self.device)
            inputs[key] = value
        return self.model(**inputs)

    def _longest_branch(self, row: dict) -> int:
        """Tokens of a pair's longest branch: prompt + the longer response, or an irrelevant prompt + chosen."""
        if all(row.get(name) is not None for name in LENGTH_COLUMNS):  # a prepared row carries its lengths
            prompt, chosen, rejected = (row[name] for name in LENGTH_COLUMNS)
        else:
            prompt, chosen, rejected = self.encoder.sequence_lengths(row)
        longest = prompt + max(chosen, rejected)
        for other in row.get("irrelevant") or []:
            prompt_tokens = self.encoder.prompt_length(other["prompt"], other["images"], other.get("videos"))
            longest = max(longest, prompt_tokens + chosen)
        return longest

    def _sampled_videos(self, values: Any, index: int, sampled: dict[tuple, dict]) -> list[dict]:
        """A row's videos sampled (``encoder.sample_video``), each distinct one once: ``sampled`` maps a video's key
        (``vlrm.layout.packed.video_key``: its path, bytes, frames or sampled key) to its sampled video for the
        call. Equal videos then carry one sampled ``key``, so their prompts meet under one prompt node. A bad video
        raises ``BadSampleError`` naming the row and the field."""
        if values is None:
            return []
        if not isinstance(values, (list, tuple)):  # a lone path would be read as one video per character
            raise BadSampleError(
                "rows", index, "videos", f"expected a list of videos (paths, bytes, frame lists, sampled videos), got "
                f"{type(values).__name__}",
            )  # fmt: skip
        videos = []
        for position, value in enumerate(values):
            key = video_key(value)
            if key not in sampled:
                try:
                    sampled[key] = self.encoder.sample_video(value)
                except RowProblem as problem:
                    raise BadSampleError("rows", index, f"videos[{position}]", problem.reason) from problem
            videos.append(sampled[key])
        return videos

    def _with_sampled_videos(self, row: dict, index: int, sampled: dict[tuple, dict]) -> dict:
        """A canonical row whose videos, and its irrelevant prompts' videos, are sampled (a copy; the row itself
        when it has none), so that the length check and the collator never decode a video again."""
        irrelevant = row.get("irrelevant") or []
        if not row.get("videos") and not any(other.get("videos") for other in irrelevant):
            return row
        copy = {**row, "videos": self._sampled_videos(row.get("videos"), index, sampled)}
        if irrelevant:
            copy["irrelevant"] = [
                {**other, "videos": self._sampled_videos(other.get("videos"), index, sampled)} for other in irrelevant
            ]
        return copy

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
        self, rows: Sequence[dict], batch_size: int = 8, progress: bool = True, desc: str = "pairs",
        shard: tuple[int, int] | None = None,
    ) -> PairScores:  # fmt: skip
        """Score canonical rows (a ``datasets.Dataset`` or a sequence of dicts with prompt, images, videos (optional),
        chosen, rejected, and optionally ``irrelevant`` prompts, see
        ``vlrm.train.irrelevant.RowsWithIrrelevantPrompts``). A pair with a branch longer than ``max_seq_length``
        (visual tokens of images and videos included) is not scored: NaN, and listed in ``overlong``. Videos not yet
        sampled are sampled once per batch of rows.

        ``shard=(rank, size)``: score only every ``size``-th batch of ``batch_size`` rows, starting at batch
        ``rank`` (the other rows stay NaN); ``PairScores.combine`` of all ranks' shards is then the one-process result
        exactly, since every batch holds the same rows as in one process (``eval_rm.py`` under torchrun)."""
        if len(rows) == 0:
            raise ValueError("no pairs to score")
        chosen = np.full(len(rows), np.nan, dtype=np.float32)
        rejected = chosen.copy()
        irrelevant, overlong, responses = None, [], None
        order_chosen = order_rejected = None  # a joint checkpoint's per-order rewards
        attributes = None if self.attribute_names is None else np.full(len(rows), None, dtype=object)
        rank, size = shard or (0, 1)
        batches = list(_batches(list(range(len(rows))), batch_size))[rank::size]
        for batch_indices in tqdm(
            batches, total=len(batches), desc=desc, unit="batch", disable=not progress, leave=False
        ):
            sampled: dict[tuple, dict] = {}  # a batch's distinct videos, each decoded once (then freed)
            # each row read (and its images decoded, its videos sampled) once
            examples = [self._with_sampled_videos(rows[index], index, sampled) for index in batch_indices]
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
            labels = batch.pop("reward_labels", None)
            outputs = self._forward_outputs(batch)
            rewards = outputs.rewards.float().cpu()
            if getattr(outputs, "order_rewards", None) is not None and labels is None:  # joint: each order's pair
                by_order = outputs.order_rewards.float().cpu()
                if order_chosen is None:
                    order_chosen = np.full((len(rows), len(by_order)), np.nan, dtype=np.float32)
                    order_rejected = np.full((len(rows), len(by_order)), np.nan, dtype=np.float32)
                order_chosen[batch_indices] = by_order[:, :num_pairs].T.numpy()
                order_rejected[batch_indices] = by_order[:, num_pairs : 2 * num_pairs].T.numpy()
            if attributes is not None:
                named = outputs.attribute_rewards.float().cpu()
                rows_of = (
                    labels.matrix.clamp(min=0)
                    if labels is not None
                    else torch.arange(2 * num_pairs).reshape(2, num_pairs).T
                )
                for row, index in enumerate(batch_indices):
                    count = int(labels.num_responses[row]) if labels is not None else 2
                    attributes[index] = named[rows_of[row, :count]].numpy()
            if labels is None:
                chosen_rewards, rejected_rewards, irrelevant_rewards = split_rewards(
                    rewards, num_pairs, num_irrelevant
                )
            else:  # rows of N responses: every response's reward, in each row's own order
                if responses is None:
                    responses = np.full(len(rows), None, dtype=object)
                row_rewards, chosen_rewards, rejected_rewards = _ranking_rewards(rewards, labels, examples)
                for index, values in zip(batch_indices, row_rewards, strict=True):
                    responses[index] = values
                irrelevant_rewards = rewards[labels.num_rewards :].reshape(num_pairs, num_irrelevant)
            chosen[batch_indices] = chosen_rewards.float().numpy()
            rejected[batch_indices] = rejected_rewards.float().numpy()
            if num_irrelevant:
                if irrelevant is None:
                    irrelevant = np.full((len(rows), num_irrelevant), np.nan, dtype=np.float32)
                irrelevant[batch_indices] = irrelevant_rewards.float().cpu().numpy()
        self._warn_overlong(overlong, "pairs")
        return PairScores(chosen, rejected, irrelevant, overlong, responses, attributes, self.attribute_names,
                          order_chosen, order_rejected)  # fmt: skip

    @torch.inference_mode()
    def score(
        self, rows: Sequence[dict], batch_size: int = 8, progress: bool = False, normalize: bool = False,
        attributes: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:  # fmt: skip
        """Score single responses: each row has ``prompt`` (a question string or chat messages), ``images`` (paths,
        PIL images or bytes; optional), ``videos`` (a list of paths, bytes, ``{"bytes", "path"}``, frame lists or
        sampled videos; optional) and ``response``. A question string gets its media before the text (videos, then
        images) or where its ``<image>`` / ``<video>`` markers stand; messages place them with ``{"type": "image"}`` /
        ``{"type": "video"}`` parts, one per image / video, in order (else ``BadSampleError``). Returns one float32
        reward per row (``normalize``: as ``normalized``); a row longer than ``max_seq_length`` (visual tokens
        included) is not scored (NaN, with a warning naming it). With the packed layout, rows with the same prompt,
        images and videos are scored in one micro-batch under one prompt node: the prompt and its media are computed
        once for all its responses. Each distinct video is decoded and sampled once per call
        (``encoder.sample_video``), and its frames are held until the call returns: score many distinct videos in
        chunks. A video that cannot be read raises ``BadSampleError`` naming the row and the field (``videos[j]``).

        ``attributes``: for a checkpoint with attribute heads (``reward_attributes``), return ``(rewards, {name:
        float32 rewards})``, each attribute's reward per row (``normalize``: each by its own statistics,
        ``normalized_attributes``); ``rewards`` is still the scalar, their weighted sum.

        A joint checkpoint (``vlrm.use.joint``) chains the rows with the same prompt and media, at most
        ``joint_group_size`` to a chain; after the call ``last_joint_report`` counts the chains and
        ``last_joint_rows`` gives each row's chain and its size."""
        if len(rows) == 0:
            raise ValueError("no rows to score")
        self.last_joint_report = self.last_joint_rows = None  # never a previous call's, should this one fail
        if attributes and self.attribute_names is None:
            raise ValueError(
                "this checkpoint has no attribute heads (reward_attributes in its config): score without attributes"
            )
        sequences = []
        sampled: dict[tuple, dict] = {}  # each distinct video decoded and sampled once for the whole call
        for index, row in enumerate(rows):
            images = list(row.get("images") or [])
            videos = self._sampled_videos(row.get("videos"), index, sampled)
            prompt = row["prompt"]
            messages = user_prompt(prompt, len(images), len(videos)) if isinstance(prompt, str) else prompt
            for kind, given in (("image", images), ("video", videos)):
                places = _media_places(messages, kind)
                if places != len(given):  # the processor would fail later, or the model on mismatched features
                    raise BadSampleError(
                        "rows", index, f"{kind}s", f"{len(given)} {kind}s but {places} {kind} places in the prompt"
                    )
            sequences.append((messages, images, self.encoder.encode_response(row["response"]), videos))
        lengths = [  # tokenizing each prompt once more is only worth it when there is a limit to check
            0 if self.max_seq_length is None else self.encoder.prompt_length(messages, images, videos) + len(ids)
            for messages, images, ids, videos in sequences
        ]
        too_long = self._over_limit(lengths)
        self._warn_overlong(
            [(i, tokens) for i, (tokens, over) in enumerate(zip(lengths, too_long, strict=True)) if over], "rows"
        )
        kept = [index for index, over in enumerate(too_long) if not over]
        if self.packing:  # rows of one prompt side by side, so a group shares one prompt node in a micro-batch
            first_seen: dict[tuple, int] = {}
            keys = [first_seen.setdefault(self._prompt_key(sequences[index]), index) for index in kept]
            kept = [index for _, index in sorted(zip(keys, kept, strict=True))]
        rewards = np.full(len(rows), np.nan, dtype=np.float32)
        named = None if self.attribute_names is None else np.full((len(rows), len(self.attribute_names)), np.nan)
        if self.joint["scoring_mode"] == "joint":  # one prompt's responses in chains (vlrm.use.joint)
            texts = [str(row["response"]) for row in rows]
            joint_rewards, joint_named, self.last_joint_report, self.last_joint_rows = score_joint(
                self, sequences, texts, kept, batch_size, self._prompt_key
            )
            rewards[kept] = joint_rewards[kept]
            if named is not None and joint_named is not None:
                named[kept] = joint_named[kept]
        else:
            for batch_indices in tqdm(
                _batches(kept, batch_size), total=math.ceil(len(kept) / batch_size), desc="responses",
                disable=not progress, leave=False,
            ):  # fmt: skip
                if self.packing:
                    batch = pack_responses(self.encoder, [sequences[index] for index in batch_indices])
                else:
                    batch = pad_rows(self.encoder, [sequences[index] for index in batch_indices])
                if named is None:
                    rewards[batch_indices] = self._forward(batch).float().cpu().numpy()
                else:  # attribute heads: the whole output, the scalar and each attribute's rewards
                    outputs = self._forward_outputs(batch)
                    rewards[batch_indices] = outputs.rewards.float().cpu().numpy()
                    named[batch_indices] = outputs.attribute_rewards.float().cpu().numpy()
        named = None if named is None else dict(zip(self.attribute_names, named.T.astype(np.float32), strict=True))
        if normalize:
            rewards = self.normalized(rewards, named)
            named = None if named is None else self.normalized_attributes(named)
        return (rewards, named) if attributes else rewards

    def score_steps(self, rows: Sequence[dict], batch_size: int = 8, aggregation: str | None = None) -> StepScores:
        """A process checkpoint's score for every step of each row's solution, and each solution's score
        (``vlrm.use.process``): rows of ``prompt``, ``images`` / ``videos`` and ``steps`` (or ``response`` text, split
        at the checkpoint's step separator)."""
        return score_steps(self, rows, batch_size, aggregation)

    @staticmethod
    def _prompt_key(sequence: tuple) -> tuple:
        messages, images, _, videos = sequence
        return prompt_key(messages, images, videos)

    @property
    def can_normalize(self) -> bool:
        """Whether the checkpoint's config records the statistics ``normalized`` needs."""
        try:
            self.require_reward_statistics()
        except ValueError:
            return False
        return True

    def require_reward_statistics(self) -> None:
        """Raise ``ValueError`` with the reason when the checkpoint's config lacks what ``normalized`` reads:
        ``reward_mean`` / ``reward_std``, and with attribute heads ``reward_attribute_mean`` / ``reward_attribute_std``
        (one per attribute, std non-zero)."""
        if self.reward_mean is None or not self.reward_std:
            raise ValueError(
                "this checkpoint's config records no reward_mean/reward_std (only the final model of a vlrm training "
                "run has them): score without normalize, or take reward_mean/reward_std from eval_rm.py's results"
            )
        if self.attribute_names is not None:
            means, stds = self.reward_attribute_mean, self.reward_attribute_std
            if means is None or stds is None or len(means) != len(self.attribute_names) or not all(stds):
                raise ValueError(
                    f"this checkpoint's config records no reward_attribute_mean/reward_attribute_std for its "
                    f"attributes {list(self.attribute_names)} (the final model of a vlrm training run has them): "
                    "score without normalize"
                )

    def normalized(self, rewards: np.ndarray, attribute_rewards: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Rewards on the scale of the final model's rewards on its training set (``reward_mean``, ``reward_std``,
        ``reward_attribute_mean``, ``reward_attribute_std``: measured on a seeded sample of it at the end of training).

        One reward: ``(r - mean) / std``. With attribute heads, each attribute is normalised by its own statistics and
        the scalar is the weighted sum of the normalised attributes, ``sum_a w_a (r_a - mean_a) / std_a``, as
        VideoReward (arXiv 2501.13918) sums its normalised heads; ``attribute_rewards`` (``score(...,
        attributes=True)``'s dict) is then required, since that sum is not a function of the raw scalar when the
        attributes' stds differ."""
        self.require_reward_statistics()
        if self.attribute_names is None:
            return ((rewards - self.reward_mean) / self.reward_std).astype(np.float32)
        if attribute_rewards is None:
            raise ValueError(
                "with attribute heads the normalised reward is the weighted sum of the normalised attributes: pass "
                "attribute_rewards (score(rows, attributes=True) gives them), or score(rows, normalize=True)"
            )
        normalised = self.normalized_attributes(attribute_rewards)
        weights = zip(self.attribute_names, self.attribute_weights, strict=True)
        total = sum(weight * normalised[name] for name, weight in weights)
        return np.asarray(total, dtype=np.float32)

    def normalized_attributes(self, attribute_rewards: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each attribute's ``(r_a - mean_a) / std_a`` with its own statistics from the checkpoint's config."""
        self.require_reward_statistics()
        statistics = zip(self.attribute_names, self.reward_attribute_mean, self.reward_attribute_std, strict=True)
        return {
            name: ((np.asarray(attribute_rewards[name]) - mean) / std).astype(np.float32)
            for name, mean, std in statistics
        }
