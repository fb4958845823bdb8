"""``VLRewardTrainer``: TRL's RewardTrainer for vision-language pairs.

What changes from ``trl.RewardTrainer``: the data is already canonical rows and our collator runs the processor (so
TRL's tokenisation step is skipped); the model returns one reward per branch, in the order documented in
``vlrm.layout.padded``; the loss adds the irrelevant-query term; checkpoints carry the processor; ``vit_lr`` /
``aligner_lr`` become optimizer parameter groups; a LoRA model (``vlrm.model.lora``) saves its adapter with vlrm's
config and marker, and resumes from one strictly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import TrainerCallback
from trl import RewardTrainer

from vlrm.data.rankings import responses_of
from vlrm.layout.labels import LABEL_FIELDS, RewardLabels, reward_positions
from vlrm.layout.padded import split_rewards
from vlrm.model.checkpoints import is_lora_checkpoint, load_adapter_weights, write_lora_metadata
from vlrm.model.lora import is_lora_model, parameter_groups
from vlrm.train.objectives import Objective, ObjectiveArguments, objective_of, step_loss

logger = logging.getLogger(__name__)


def ranking_rows(rewards: torch.Tensor, labels: RewardLabels) -> dict[str, torch.Tensor]:
    """Per row of a labelled micro-batch (``[rows]`` each, float): ``pairs`` (strict pairs), ``correct`` (those the
    rewards order right; equal rewards wrong), the sums of their ``margin``, ``better`` and ``worse`` rewards;
    ``top1`` (1 when every response of the highest reward is best-ranked, as ``vlrm.metrics.ranking_metrics``
    scores it); ``kendall_tau`` (tau-b of rewards against ranks, Kendall 1945; NaN where either is constant);
    ``ties`` (tied pairs) and ``tie_gap`` (the sum of their |r_i - r_j|)."""
    num_rows = labels.num_responses.numel()
    row_of = torch.empty(labels.num_rewards, dtype=torch.long, device=rewards.device)
    valid = labels.matrix >= 0
    row_of[labels.matrix[valid]] = torch.arange(num_rows, device=rewards.device)[:, None].expand_as(valid)[valid]

    def per_row(index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(num_rows, device=rewards.device).index_add_(0, row_of[index], values.float())

    better, worse = rewards[labels.better], rewards[labels.worse]
    first, second = rewards[labels.tie_first], rewards[labels.tie_second]
    matrix = rewards[labels.matrix.clamp(min=0)].masked_fill(~valid, -torch.inf)
    ranks = labels.matrix_ranks.to(rewards.device)
    highest = (matrix == matrix.max(-1, keepdim=True).values) & valid
    top1 = (~highest | (ranks == ranks.min(-1, keepdim=True).values)).all(-1)
    upper = torch.triu(torch.ones(valid.shape[1], valid.shape[1], dtype=torch.bool, device=rewards.device), 1)
    both = valid[:, :, None] & valid[:, None, :] & upper
    reward_sign = torch.sign(matrix[:, :, None] - matrix[:, None, :]).nan_to_num(0.0) * both
    rank_sign = torch.sign(ranks[:, None, :] - ranks[:, :, None]).nan_to_num(0.0) * both  # lower rank: better
    untied = (reward_sign != 0).sum((1, 2)) * (rank_sign != 0).sum((1, 2))
    tau = (reward_sign * rank_sign).sum((1, 2)) / untied.float().sqrt()
    return {
        "pairs": per_row(labels.better, torch.ones_like(better)),
        "correct": per_row(labels.better, better > worse),
        "margin": per_row(labels.better, better - worse),
        "better": per_row(labels.better, better),
        "worse": per_row(labels.better, worse),
        "top1": top1.float(),
        "kendall_tau": tau.masked_fill(untied == 0, torch.nan),
        "ties": per_row(labels.tie_first, torch.ones_like(first)),
        "tie_gap": per_row(labels.tie_first, (first - second).abs()),
    }


def reward_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    irrelevant: torch.Tensor | None = None,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
    irrelevant_loss_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The Bradley-Terry loss of a micro-batch of pairs, with the margin, the centring and the irrelevant-query term
    (``vlrm.train.objectives``, ``loss_type: bt``, where the formulas and their papers are). Returns the total and its
    parts."""
    num_pairs = len(chosen)
    irrelevant = chosen.new_zeros(num_pairs, 0) if irrelevant is None else irrelevant
    rewards = torch.cat([chosen, rejected, irrelevant.flatten()])
    objective = Objective(ObjectiveArguments(), center_rewards_coefficient, irrelevant_loss_weight)
    loss, parts = objective(rewards, num_pairs, irrelevant.shape[1], margin)
    return loss, {name: value for name, value in parts.items() if name.endswith("_loss")}


@dataclass
class RewardStatistics:
    """The final model's reward scale (``VLRewardTrainer.reward_statistics``), saved in its config: ``reward_mean``,
    ``reward_std`` over ``count`` responses, and with attribute heads ``reward_attribute_mean`` /
    ``reward_attribute_std``, one entry per attribute in ``reward_attributes`` order."""

    mean: float
    std: float
    count: int
    attribute_mean: list[float] | None = None
    attribute_std: list[float] | None = None


class VLRewardTrainer(RewardTrainer):
    def __init__(self, *args, processor: Any = None, eval_data_collator: Any = None, **kwargs):
        self.processor = processor
        self.eval_data_collator = eval_data_collator
        super().__init__(*args, **kwargs)
        attributes = tuple(getattr(self.accelerator.unwrap_model(self.model).config, "reward_attributes", None) or ())
        self.objective = objective_of(self.args, attributes)

    def get_eval_dataloader(self, eval_dataset=None):
        # Evaluation draws irrelevant prompts from the eval set with a fixed epoch, so the training collator (which
        # draws from the training set) cannot be reused.
        if self.eval_data_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # canonical rows; the collator does the processing

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt", "images", "chosen", "rejected", "margin", "id", "category"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        num_pairs, num_irrelevant = inputs.pop("num_pairs"), inputs.pop("num_irrelevant")
        margin, labels = inputs.pop("margin", None), inputs.pop("reward_labels", None)
        steps = inputs.pop("step_labels", None)
        outputs = model(**inputs)
        if steps is not None:  # a process reward (vlrm.layout.steps): binary cross-entropy on the step labels
            last_only = bool(getattr(self.args, "train_on_last_step_only", False))
            loss, parts = step_loss(outputs.rewards, steps, getattr(outputs, "logit_scale", None) or 1.0, last_only)
            self._record_step_metrics(mode, outputs.rewards, steps, loss)
            return (loss, outputs) if return_outputs else loss
        loss, parts = self.objective(
            outputs.rewards, num_pairs, num_irrelevant, margin, labels,
            logit_scale=getattr(outputs, "logit_scale", None), attribute_rewards=getattr(outputs, "attribute_rewards", None),
        )  # fmt: skip
        self._record_metrics(mode, outputs.rewards, num_pairs, num_irrelevant, labels, parts)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _record_step_metrics(self, mode, rewards, steps, loss) -> None:
        """``step_accuracy`` over every hard-labelled step (sigmoid on the label's side of 0.5) and ``step_loss``.
        Counted per row and gathered per row: accelerate trims the last eval batch to its number of rows, so a
        per-step tensor would lose steps."""
        labels = steps.labels.to(rewards.device)
        hard = ~torch.isnan(labels) & (labels != 0.5)
        right = ((rewards.detach().float() > 0) == (labels > 0.5)) & hard
        row_of_step = steps.row.to(rewards.device)[steps.solution.to(rewards.device)]
        num_rows = int(steps.row.max()) + 1 if len(steps.row) else 0
        per_row = torch.zeros(num_rows, 2, device=rewards.device)
        per_row.index_add_(0, row_of_step, torch.stack([right.float(), hard.float()], dim=1))
        totals = self.accelerator.gather_for_metrics(per_row).sum(0)
        correct, counted = int(totals[0]), int(totals[1])
        self._metrics[mode]["step_accuracy"].extend([1.0] * correct + [0.0] * (counted - correct))
        self._metrics[mode]["step_loss"].append(self.accelerator.gather_for_metrics(loss.detach()[None]).mean().item())

    @torch.no_grad()
    def _record_metrics(self, mode, rewards, num_pairs, num_irrelevant, labels, parts) -> None:
        """Per-example values (not per-batch means), so the logged averages are exact over uneven batches: on pairs
        today's accuracy, margin, chosen_reward, rejected_reward; on rankings and ties the same over every strict
        pair of each row (``accuracy`` is then the pairwise accuracy), and top1_accuracy, kendall_tau and tie_gap
        (``ranking_rows``). Gathered per row, so that accelerate's trimming of the last eval batch (which counts rows)
        stays right when rows hold different numbers of pairs."""
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        rewards = rewards.detach().float()
        if labels is None:
            chosen, rejected, irrelevant = split_rewards(rewards, num_pairs, num_irrelevant)
            chosen, rejected, best = gather(chosen), gather(rejected), chosen
            counts = None
        else:
            rows = {name: gather(value) for name, value in ranking_rows(rewards, labels).items()}
            counts = rows["pairs"].long()
            keep = counts > 0
            if keep.any():  # a micro-batch of tied pairs has no strict pair (the Trainer averages each list)
                right = int(rows["correct"].sum())
                metrics["accuracy"].extend([1.0] * right + [0.0] * (int(counts.sum()) - right))
                # Each row's pair sums spread back over its pairs: the per-pair means come out exact.
                for name, total in (("margin", "margin"), ("chosen_reward", "better"), ("rejected_reward", "worse")):
                    metrics[name].extend((rows[total][keep] / counts[keep]).repeat_interleave(counts[keep]).tolist())
            metrics["top1_accuracy"].extend(rows["top1"].tolist())
            taus = rows["kendall_tau"][~rows["kendall_tau"].isnan()]
            if taus.numel():  # the Trainer averages each list: none may be empty
                metrics["kendall_tau"].extend(taus.tolist())
            tied = rows["ties"] > 0
            if tied.any():
                gaps = (rows["tie_gap"][tied] / rows["ties"][tied]).repeat_interleave(rows["ties"][tied].long())
                metrics["tie_gap"].extend(gaps.tolist())
            irrelevant = rewards[labels.num_rewards :].reshape(num_pairs, num_irrelevant)
            best = rewards[labels.best]
        if counts is None:
            metrics["accuracy"].extend((chosen > rejected).float().tolist())
            metrics["margin"].extend((chosen - rejected).tolist())
            metrics["chosen_reward"].extend(chosen.tolist())
            metrics["rejected_reward"].extend(rejected.tolist())
        if irrelevant.numel():
            irrelevant_margin = gather(best)[:, None] - gather(irrelevant)
            metrics["irrelevant_accuracy"].extend((irrelevant_margin > 0).float().flatten().tolist())
            metrics["irrelevant_margin"].extend(irrelevant_margin.flatten().tolist())
        for name, value in parts.items():
            if name.endswith("_loss"):
                metrics[name].append(gather(value.detach()).mean().item())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    @torch.no_grad()
    def reward_statistics(self, dataset: Any, collator: Any) -> RewardStatistics:
        """Mean and std of the model's rewards over every response of ``dataset`` (a pair's chosen and rejected, a
        ranking's N), and of each attribute's reward with ``reward_attributes``, computed on all ranks (the
        DataLoader is sharded, the rewards gathered), for normalising rewards in RL (``RewardScorer.normalized``).
        Each response counts once: the rows accelerate repeats to even out the last batch across ranks are dropped
        by their keys (``_KeyedRows``)."""
        loader = self.accelerator.prepare(
            DataLoader(
                list(range(len(dataset))), batch_size=self.args.per_device_eval_batch_size,
                collate_fn=_KeyedRows(dataset, collator),
            )
        )  # fmt: skip
        was_training = self.model.training
        self.model.eval()
        keys, values = [], []
        for batch in loader:
            batch_keys = batch.pop("reward_keys")
            batch = self._prepare_inputs(batch)
            outputs = self.model(**{key: value for key, value in batch.items() if key not in LABEL_FIELDS})
            columns = [outputs.rewards.float()[: len(batch_keys), None]]
            if outputs.attribute_rewards is not None:
                columns.append(outputs.attribute_rewards.float()[: len(batch_keys)])
            # Ranks hold different numbers of rewards (N-way rows): padded to one length (key -1) to be gathered.
            pad = self.accelerator.pad_across_processes
            keys.append(self.accelerator.gather(pad(batch_keys.to(columns[0].device), pad_index=-1)))
            values.append(self.accelerator.gather(pad(torch.cat(columns, dim=1))))
        self.model.train(was_training)
        keys, values = torch.cat(keys), torch.cat(values)
        unique, inverse = torch.unique(keys, return_inverse=True)
        first = torch.full((len(unique),), len(keys), device=keys.device)
        first = first.scatter_reduce(0, inverse, torch.arange(len(keys), device=keys.device), reduce="amin")
        values = values[first[unique >= 0]]
        mean, std = values.mean(0), values.std(0, unbiased=False)
        statistics = RewardStatistics(mean[0].item(), std[0].item(), len(values))
        if values.shape[1] > 1:
            statistics.attribute_mean, statistics.attribute_std = mean[1:].tolist(), std[1:].tolist()
        return statistics

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the vision blocks and the merger in parameter groups of their own learning
        rates when ``vit_lr`` / ``aligner_lr`` are set. DeepSpeed (without an `optimizer` block in its config) wraps
        this optimizer and keeps its groups; the scheduler scales every group's rate alike."""
        vit_lr, aligner_lr = getattr(self.args, "vit_lr", None), getattr(self.args, "aligner_lr", None)
        if self.optimizer is not None or (vit_lr is None and aligner_lr is None):
            return super().create_optimizer(model)
        optimizer_model = self.model if model is None else model
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, optimizer_model)
        if "params" in optimizer_kwargs or "model" in optimizer_kwargs:
            raise ValueError(f"optim={self.args.optim} builds its own parameter groups: unset vit_lr and aligner_lr")
        groups = parameter_groups(
            optimizer_model,
            self.args.learning_rate,
            self.args.weight_decay,
            self.get_decay_parameter_names(optimizer_model),
            vit_lr,
            aligner_lr,
        )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        logger.info(
            "optimizer parameter groups: %s",
            ", ".join(f"{group['name']}: {len(group['params'])} tensors at lr {group['lr']:g}" for group in groups),
        )
        return self.optimizer

    # transformers saves Qwen2.5-VL weights under their original (pre-4.52) names and converts them back only in
    # `from_pretrained`; the Trainer's own resume / best-model loading uses a non-strict `load_state_dict` on the
    # raw file, which silently loads nothing but the score head. Load through `from_pretrained`, strictly. A LoRA
    # model loads its adapter and head strictly too: every key and no other, with the same LoRA settings.
    def _load_weights(self, checkpoint_dir: str) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if is_lora_model(model):
            load_adapter_weights(model, checkpoint_dir)
            return
        if is_lora_checkpoint(checkpoint_dir):
            raise ValueError(
                f"{checkpoint_dir} is a LoRA checkpoint, but this run trains every weight: resume it with use_lora: "
                "true and its LoRA settings, or start a full run from its merged export (python -m vlrm export "
                "--merge)"
            )
        reloaded = type(model).from_pretrained(checkpoint_dir, dtype=next(model.parameters()).dtype)
        model.load_state_dict(reloaded.state_dict(), strict=True)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or model is not None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info("loading weights from %s", resume_from_checkpoint)
        self._load_weights(resume_from_checkpoint)

    def _load_best_model(self):
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        logger.info("loading best model from %s", self.state.best_model_checkpoint)
        self._load_weights(self.state.best_model_checkpoint)

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)  # a peft model writes its adapter and head only (under ZeRO-3 gathered)
        if not self.args.should_save:
            return
        if is_lora_model(self.model):
            write_lora_metadata(self.model, output_dir or self.args.output_dir)
        if self.processor is not None:
            self.processor.save_pretrained(output_dir or self.args.output_dir)


class _KeyedRows:
    """A collate function over row indices: the rows of ``dataset`` through ``collator``, plus ``reward_keys``, each
    response reward's (row, response) as one integer. accelerate evens out the last batch across ranks by repeating
    rows from the start, and its ``gather_for_metrics`` cuts the last batch at a number of rows, where a batch holds
    2 to N rewards per row: the keys let ``reward_statistics`` count every response exactly once instead."""

    STRIDE = 1 << 20  # more responses than this in one row would collide with the next row's keys

    def __init__(self, dataset: Any, collator: Any):
        self.dataset, self.collator = dataset, collator

    def __call__(self, indices: list[int]) -> dict[str, Any]:
        rows = [self.dataset[int(index)] for index in indices]
        batch = self.collator(rows)
        counts = [len(responses_of(row)) for row in rows]
        keys = torch.empty(sum(counts), dtype=torch.long)
        for index, where in zip(indices, reward_positions(counts), strict=True):
            keys[where] = int(index) * self.STRIDE + torch.arange(len(where))
        batch["reward_keys"] = keys
        return batch


class LogFileCallback(TrainerCallback):
    """Writes every Trainer log record (loss, accuracy, learning rate...) to the run's log file."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            logger.info(
                "step %d: %s",
                state.global_step,
                {key: round(value, 6) if isinstance(value, float) else value for key, value in logs.items()},
            )
