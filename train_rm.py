"""Train a vision-language reward model on preference pairs (chosen vs rejected, with images).

One process (CPU demo, or one GPU):
    python train_rm.py training_configs/tiny_demo.yaml
    python train_rm.py training_configs/7b_config.yaml
Override any config key on the command line:
    python train_rm.py training_configs/tiny_demo.yaml --learning_rate 5e-4 --max_steps 50
Many GPUs (torchrun + DeepSpeed, see run_distributed.sh):
    ./run_distributed.sh --gpus 8 --config training_configs/7b_config.yaml -- --num_train_epochs 2
Resume:
    python train_rm.py CONFIG --resume_from_checkpoint outputs/run/checkpoint-200
LoRA (peft adapters + the score head; checkpoints hold only those, see vlrm/model/lora.py):
    python train_rm.py training_configs/tiny_demo.yaml --use_lora true --lora_r 16 --lora_alpha 32 --lora_vision merger \
        --learning_rate 1e-3 --output_dir outputs/tiny_lora
    python train_rm.py training_configs/72b_lora.yaml
Prepare the data ahead (optional; the first run does it and caches it, see vlrm/data/prepare.py):
    python -m vlrm prepare training_configs/7b_config.yaml

The run's log goes to logs/train_TIMESTAMP.log; checkpoints (weights + config + processor) to output_dir.
"""

import logging
import sys
import time
import traceback
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoProcessor, set_seed

from vlrm.data.prepare import branch_lengths, contiguous_sample, peak_memory_gb, prepare_training_data
from vlrm.data.videos import VideoSettings
from vlrm.errors import ConfigError
from vlrm.layout.attention import enable_packed_attention
from vlrm.layout.encoder import PreferenceEncoder, apply_pixel_limits, check_step_separator
from vlrm.layout.joint import JointCollator, record_joint_settings
from vlrm.layout.packed import make_collator, row_tokens
from vlrm.layout.steps import StepCollator, record_process_settings
from vlrm.model.checkpoints import is_lora_checkpoint
from vlrm.model.families import family_of
from vlrm.model.heads import configure_head
from vlrm.model.lora import apply_lora, count_parameters, lora_summary
from vlrm.model.reward_model import VLRewardModel
from vlrm.train.config import TrainConfig
from vlrm.train.config_files import config_to_dict, load_config
from vlrm.train.irrelevant import EpochCallback, IrrelevantPairSampler, IrrelevantQueryCollator, with_row_index
from vlrm.train.objectives import LabelCounts, check_objective
from vlrm.train.process_group import exit_now, finish_process_group
from vlrm.train.trainer import LogFileCallback, VLRewardTrainer

logger = logging.getLogger("vlrm")

# ----------------------------------------------------------------------------------------------------------------
# Config and logging

if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
    sys.exit(__doc__)
config = load_config(TrainConfig, sys.argv[1], sys.argv[2:])

log_path = Path(config.log_dir) / f"train_{time.strftime('%Y%m%d_%H%M%S')}.log"
handlers = [logging.StreamHandler()]
if config.process_index == 0:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handlers.append(logging.FileHandler(log_path))
logging.basicConfig(
    level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True
)
transformers.utils.logging.set_verbosity_warning()
transformers.utils.logging.disable_default_handler()
transformers.utils.logging.enable_propagation()


def log_error(kind, error, trace):
    """An error that ends the run goes to the run's log too (the traceback at debug level), then to stderr."""
    logger.error("the run stopped: %s: %s", kind.__name__, error)
    logger.debug("traceback:\n%s", "".join(traceback.format_exception(kind, error, trace)))
    sys.__excepthook__(kind, error, trace)


sys.excepthook = log_error
logger.info("config %s: %s", sys.argv[1], config_to_dict(config))
set_seed(config.seed)

# ----------------------------------------------------------------------------------------------------------------
# Processor and data

base_config = AutoConfig.from_pretrained(config.model_name_or_path)
family = family_of(base_config)
if config.packing and not family.packed:
    logger.warning(
        "%s (%s): no packed layout, training with the padded layout (%s)", config.model_name_or_path, family.title,
        family.padded_reason,
    )  # fmt: skip
    config.packing = False
processor = AutoProcessor.from_pretrained(config.model_name_or_path)
apply_pixel_limits(processor, config.min_pixels, config.max_pixels)  # saved with every checkpoint
# Video sampling (vlrm.data.videos): the config's video_* keys over what the model records (a vlrm checkpoint trained
# further), else qwen-vl-utils' defaults; recorded in the model's config, so every consumer samples videos the same way.
video_settings = VideoSettings.from_values(
    getattr(base_config, "vlrm_video_sampling", None), **config.video_overrides()
)
encoder = PreferenceEncoder(processor, video_settings, config.step_separator)
if config.reward_type == "process":  # where a step's score is read must survive the chat template (vlrm.layout.steps)
    check_step_separator(processor, config.step_separator, encoder.end_of_turn)
if family.end_of_turn and encoder.end_of_turn != family.end_of_turn:
    logger.warning(
        "the chat template ends assistant turns with %r, not %s's %r: rewards are read at %r", encoder.end_of_turn,
        family.title, family.end_of_turn, encoder.end_of_turn,
    )  # fmt: skip

# Prepared once into a memory-mapped Arrow set (vlrm.data.prepare), or loaded from its cache: each node's first process
# goes first, the other ranks wait at a barrier and then load what it wrote.
with config.main_process_first(desc="preparing data"):
    data_started = time.perf_counter()
    train_dataset, eval_dataset = prepare_training_data(config, encoder)
    data_seconds = time.perf_counter() - data_started
logger.info(
    "rank %d: data ready in %.2f s (%d training pairs), peak memory %.2f GB",
    config.process_index, data_seconds, len(train_dataset), peak_memory_gb(),
)  # fmt: skip
label_counts = LabelCounts.of(train_dataset)
check_objective(config, label_counts)  # e.g. mse without scores stops here, before any weight is loaded
if label_counts.step_rows:
    logger.info(
        "process reward: %d rows of step-labelled solutions; a score at the end of every step (separator %r, the last "
        "at %r), %s", label_counts.step_rows, config.step_separator, encoder.end_of_turn,
        "last steps supervised only" if config.train_on_last_step_only else "every labelled step supervised",
    )  # fmt: skip
if label_counts.rankings or label_counts.ties:
    logger.info(
        "labels: %d rows, %d rankings of N responses, %d with ties, %d scored, %d rated (%s); loss_type %s",
        label_counts.rows, label_counts.rankings, label_counts.ties, label_counts.scored, label_counts.rated,
        ", ".join(sorted(label_counts.rating_names)) or "no attributes", config.loss_type,
    )  # fmt: skip
if config.train_sampling_strategy in ("group_by_length", "batch_rebalance"):
    # transformers' length-aware samplers read each row's size from this column: its tokens in the layout used.
    num_irrelevant = config.num_irrelevant_pairs if config.use_irrelevant_queries else 0
    sizes = [
        row_tokens(prompt, responses, best, num_irrelevant, config.packing)
        for prompt, responses, best in branch_lengths(train_dataset)
    ]
    train_dataset = train_dataset.add_column(config.length_column_name, sizes)

# ----------------------------------------------------------------------------------------------------------------
# Model

# Full-precision weights for the HF Trainer's mixed precision; DeepSpeed keeps its own fp32 master copy instead.
dtype = torch.float32
if config.deepspeed:
    dtype = torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else torch.float32
# The head asked for (score_head, reward_pooling, reward_attributes, ...) goes into the model's config before the model
# is built, and is saved with every checkpoint (vlrm.model.heads); a vlrm reward model to go on training must already
# have that head. A LoRA checkpoint loads with its own config, whose head has just been checked.
model_config = AutoConfig.from_pretrained(config.model_name_or_path)
configure_head(model_config, config, config.model_name_or_path)
own_config = {} if is_lora_checkpoint(config.model_name_or_path) else {"config": model_config}
model = VLRewardModel.from_pretrained(
    config.model_name_or_path, attn_implementation=config.attn_implementation, dtype=dtype, **own_config
)
model.config.pad_token_id = encoder.pad_token_id
model.config.vlrm_video_sampling = video_settings.identity()
record_process_settings(model.config, config)  # every consumer reads a process checkpoint's steps the same way
record_joint_settings(model.config, config)  # and scores a joint checkpoint's responses in chains
if config.freeze_vit:
    model.freeze_vision_tower()
if config.packing:
    enable_packed_attention(model)  # language-model attention for the packed layout; the padded layout still works
if config.use_lora:
    # peft adapters (vlrm.model.lora): the backbone frozen, the adapters and the whole head trained and saved.
    model = apply_lora(model, config)
trainable, total = count_parameters(model)  # ZeRO-3 placeholders counted at their full size
logger.info(
    "model: %s (%s, %s layout), %s trainable of %s parameters (%.3f%%)%s",
    config.model_name_or_path, family.title, "packed" if config.packing else "padded", f"{trainable:,}", f"{total:,}",
    100 * trainable / total, f"; {lora_summary(model)}" if config.use_lora else "",
)  # fmt: skip
if family.moe_note:
    logger.info("%s: %s", family.title, family.moe_note)

# ----------------------------------------------------------------------------------------------------------------
# Collators: each pair's prompt with its chosen and rejected branches (+ irrelevant-query branches)

callbacks = [LogFileCallback()]
if config.reward_type == "process":  # every step of every solution under its question's prompt node
    collator = eval_collator = StepCollator(encoder, config.packing)
elif config.scoring_mode == "joint":  # a prompt's responses in one chain, a fresh seeded order each epoch
    try:
        collator = JointCollator(encoder, config.packing, config.seed, max_seq_length=config.max_seq_length)
    except ValueError as error:  # a chat template that cannot render two assistant turns in a row
        raise ConfigError(str(error)) from error
    eval_collator = JointCollator(encoder, config.packing, config.seed, max_seq_length=config.max_seq_length)
    callbacks.append(EpochCallback(collator))
    logger.info("joint scoring: responses chained with %r between them", collator.separator)
else:
    collator = eval_collator = make_collator(encoder, config.packing)
if config.use_irrelevant_queries:

    def irrelevant_collator(dataset):
        sampler = IrrelevantPairSampler(dataset, config.num_irrelevant_pairs, config.seed, config.irrelevant_mode)
        return IrrelevantQueryCollator(make_collator(encoder, config.packing), dataset, sampler)

    train_dataset = with_row_index(train_dataset)
    collator = irrelevant_collator(train_dataset)
    callbacks.append(EpochCallback(collator))
    if eval_dataset is not None:
        eval_dataset = with_row_index(eval_dataset)
        eval_collator = irrelevant_collator(eval_dataset)  # epoch stays 0: the same draws at every evaluation

# ----------------------------------------------------------------------------------------------------------------
# Train

trainer = VLRewardTrainer(
    model=model,
    args=config,
    data_collator=collator,
    eval_data_collator=eval_collator,
    train_dataset=train_dataset,
    eval_dataset=eval_dataset,
    processing_class=processor.tokenizer,
    processor=processor,
    callbacks=callbacks,
)
trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
if config.reward_stats_samples and config.reward_type == "process":
    logger.info("process reward: step scores are probabilities (sigmoid), so no reward statistics are recorded")
elif config.reward_stats_samples:
    # The final model's reward scale, saved in its config: RL code normalises with it (vlrm.use.rewards, serve_rm.py).
    # Drawn in contiguous runs: scattered rows of a memory-mapped set would map most of its file (contiguous_sample).
    sample = contiguous_sample(len(train_dataset), config.reward_stats_samples, config.seed)
    count = len(sample)
    statistics_collator = make_collator(encoder, config.packing)
    if config.scoring_mode == "joint":  # the rewards as the joint model gives them: each row's chain, its own order
        statistics_collator = JointCollator(
            encoder, config.packing, shuffle=False, max_seq_length=config.max_seq_length
        )
    statistics = trainer.reward_statistics(train_dataset.select(sample), statistics_collator)
    model.config.reward_mean, model.config.reward_std = statistics.mean, statistics.std
    per_attribute = ""
    if statistics.attribute_mean is not None:  # each attribute's own, to normalise it alone (vlrm.use.scoring)
        model.config.reward_attribute_mean = statistics.attribute_mean
        model.config.reward_attribute_std = statistics.attribute_std
        named = zip(config.reward_attributes, statistics.attribute_mean, statistics.attribute_std, strict=True)
        per_attribute = "; " + ", ".join(f"{name} mean {mean:.4f}, std {std:.4f}" for name, mean, std in named)
    model.config.reward_stats_source = (
        f"training set: {count} pairs ({statistics.count} responses) drawn with seed {config.seed}"
    )
    logger.info(
        "final model's rewards on %s: mean %.4f, std %.4f%s", model.config.reward_stats_source, statistics.mean,
        statistics.std, per_attribute,
    )  # fmt: skip
trainer.save_model(config.output_dir)
trainer.save_state()  # trainer_state.json: the final model's step, for eval_rm.py
logger.info("final model saved to %s", config.output_dir)

if eval_dataset is not None:
    metrics = trainer.evaluate()
    trainer.save_metrics("eval", metrics)  # eval_results.json in output_dir
    if "eval_step_accuracy" in metrics:  # a process reward: each labelled step's score on the right side of 0.5
        logger.info(
            "held-out step accuracy: %.4f (%d rows of solutions)", metrics["eval_step_accuracy"], len(eval_dataset)
        )
    elif "eval_top1_accuracy" in metrics:  # rows of N responses (or ties): accuracy is over every strict pair
        logger.info(
            "held-out pairwise accuracy %.4f, top-1 accuracy %.4f, Kendall tau %s (%d rows)", metrics["eval_accuracy"],
            metrics["eval_top1_accuracy"], f"{metrics['eval_kendall_tau']:.4f}" if "eval_kendall_tau" in metrics
            else "undefined", len(eval_dataset),
        )  # fmt: skip
    else:
        logger.info("held-out preference accuracy: %.4f (%d pairs)", metrics["eval_accuracy"], len(eval_dataset))
logger.info(
    "rank %d: peak memory %.2f GB at the end; log written to %s", config.process_index, peak_memory_gb(), log_path
)
# An orderly exit: the process group freed and its threads joined now, not in the interpreter's teardown, where they
# now and then abort a finished rank; nothing may hold it then, and the trainer and the model do (process_group).
if torch.distributed.is_initialized():
    trainer.accelerator.free_memory()
    del trainer, model
    if finish_process_group():  # still held (ZeRO-3): end without the teardown that would run its destructor
        exit_now(0)
