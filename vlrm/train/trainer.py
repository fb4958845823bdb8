"""``VLRewardTrainer``: TRL's RewardTrainer for vision-language pairs.

What changes from ``trl.RewardTrainer``: the data is already canonical rows and our collator runs the processor (so
TRL's tokenisation step is skipped); the model returns one reward per branch, in the order documented in
``vlrm.layout.padded``; the loss adds the irrelevant-query term; checkpoints carry the processor; ``vit_lr`` /
``aligner_lr`` become optimizer parameter groups; a LoRA model (``vlrm.model.lora``) saves its adapter with vlrm's
config and marker, and resumes from one strictly.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import TrainerCallback
from trl import RewardTrainer

from vlrm.layout.padded import split_rewards
from vlrm.model.checkpoints import is_lora_checkpoint, load_adapter_weights, write_lora_metadata
from vlrm.model.lora import is_lora_model, parameter_groups

logger = logging.getLogger(__name__)

PAIR_FIELDS = ("num_pairs", "num_irrelevant", "margin")


def reward_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    irrelevant: torch.Tensor | None = None,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
    irrelevant_loss_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry loss ``-log sigmoid(r_c - r_r - margin)`` (Bradley & Terry 1952; the margin as in Llama 2,
    Touvron et al. 2023), optional reward centring (Eisenstein et al. 2023), and the irrelevant-query loss
    ``mean_j -log sigmoid(r(prompt_i, chosen_i) - r(prompt_j, chosen_i))``. Returns the total and its parts."""
    difference = chosen - rejected
    if margin is not None:
        difference = difference - margin.to(difference)
    parts = {"bt_loss": -F.logsigmoid(difference).mean()}
    loss = parts["bt_loss"]
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
    if irrelevant is not None and irrelevant.numel():
        parts["irrelevant_loss"] = -F.logsigmoid(chosen[:, None] - irrelevant).mean()
        loss = loss + irrelevant_loss_weight * parts["irrelevant_loss"]
    return loss, parts


class VLRewardTrainer(RewardTrainer):
    def __init__(self, *args, processor: Any = None, eval_data_collator: Any = None, **kwargs):
        self.processor = processor
        self.eval_data_collator = eval_data_collator
        super().__init__(*args, **kwargs)

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
        margin = inputs.pop("margin", None)
        outputs = model(**inputs)
        chosen, rejected, irrelevant = split_rewards(outputs.rewards, num_pairs, num_irrelevant)
        loss, parts = reward_losses(
            chosen,
            rejected,
            irrelevant,
            margin,
            self.args.center_rewards_coefficient,
            self.args.irrelevant_loss_weight,
        )
        self._record_metrics(mode, chosen, rejected, irrelevant, parts)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _record_metrics(self, mode, chosen, rejected, irrelevant, parts) -> None:
        gather = self.accelerator.gather_for_metrics
        chosen, rejected = gather(chosen.detach()), gather(rejected.detach())
        metrics = self._metrics[mode]
        # Per-pair values (not per-batch means), so the logged averages are exact over uneven batches.
        metrics["accuracy"].extend((chosen > rejected).float().tolist())
        metrics["margin"].extend((chosen - rejected).tolist())
        metrics["chosen_reward"].extend(chosen.tolist())
        metrics["rejected_reward"].extend(rejected.tolist())
        if irrelevant.numel():
            irrelevant_margin = chosen[:, None] - gather(irrelevant.detach())
            metrics["irrelevant_accuracy"].extend((irrelevant_margin > 0).float().flatten().tolist())
            metrics["irrelevant_margin"].extend(irrelevant_margin.flatten().tolist())
        for name, value in parts.items():
            metrics[name].append(gather(value.detach()).mean().item())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    @torch.no_grad()
    def reward_statistics(self, dataset: Any, collator: Any) -> tuple[float, float, int]:
        """Mean and std of the model's rewards over every response (chosen and rejected) of ``dataset``, computed on
        all ranks (the DataLoader is sharded, the rewards gathered), for normalising rewards in RL."""
        loader = self.accelerator.prepare(
            DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size, collate_fn=collator)
        )
        was_training = self.model.training
        self.model.eval()
        rewards = []
        for batch in loader:
            batch = self._prepare_inputs(batch)
            outputs = self.model(**{key: value for key, value in batch.items() if key not in PAIR_FIELDS})
            rewards.append(self.accelerator.gather_for_metrics(outputs.rewards.float()))
        self.model.train(was_training)
        rewards = torch.cat(rewards)
        return rewards.mean().item(), rewards.std(unbiased=False).item(), len(rewards)

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


class LogFileCallback(TrainerCallback):
    """Writes every Trainer log record (loss, accuracy, learning rate...) to the run's log file."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            logger.info(
                "step %d: %s",
                state.global_step,
                {key: round(value, 6) if isinstance(value, float) else value for key, value in logs.items()},
            )
