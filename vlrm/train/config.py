"""Configuration for training (``TrainConfig``) and evaluation (``EvalConfig``).

Both load from a YAML or JSON file, and any key can be overridden on the command line as ``--key value``
(``vlrm.train.config_files.load_config``, which checks every key and value):

    config = load_config(TrainConfig, "training_configs/tiny_demo.yaml", ["--learning_rate", "5e-4"])

Each field's help is its documentation (``python train_rm.py`` and ``python eval_rm.py --help`` print it); a
combination that cannot work raises ``ConfigError`` in ``__post_init__``, before any weight is loaded.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from trl import RewardConfig

from vlrm.errors import ConfigError
from vlrm.layout.joint import JointArguments
from vlrm.layout.steps import ProcessArguments
from vlrm.model.heads import HeadArguments
from vlrm.model.loading import parse_device_map, parse_max_memory
from vlrm.model.lora import LoraArguments
from vlrm.train.objectives import ObjectiveArguments
from vlrm.train.process_group import import_deepspeed_before_the_process_group


def check_flash_attention_available() -> None:
    """Raise a ConfigError with the fix when flash_attention_2 cannot run here."""
    import torch

    if importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            "attn_implementation=flash_attention_2 needs the flash-attn package, which is not installed. "
            "Install it on a CUDA machine with `pip install -e .[gpu]`, or set `attn_implementation: sdpa`."
        )
    if not torch.cuda.is_available():
        raise ConfigError(
            "attn_implementation=flash_attention_2 needs a CUDA GPU, and none is visible. "
            "Set `attn_implementation: sdpa` to run on this machine."
        )


@dataclass
class ModelDataArguments:
    """Fields shared by training and evaluation: how to load the model and how to render images."""

    attn_implementation: Literal["flash_attention_2", "sdpa", "eager"] = field(
        default="sdpa",
        metadata={"help": "Attention kernel. flash_attention_2 needs CUDA and the flash-attn package (extra `gpu`)."},
    )
    min_pixels: int | None = field(
        default=None,
        metadata={"help": "Smallest image area in pixels after resizing (None: the processor's own setting)."},
    )
    max_pixels: int | None = field(
        default=None,
        metadata={
            "help": "Largest image area in pixels after resizing (None: the processor's own setting). Each 28x28 "
            "block becomes one visual token, so this bounds the visual tokens per image."
        },
    )
    video_fps: float | None = field(
        default=None,
        metadata={
            "help": "Frames a second sampled from each video (qwen-vl-utils' `fps`; vlrm.data.videos). None: the "
            "checkpoint's recorded setting when scoring, else qwen-vl-utils' 2.0. Frames are evenly spaced, an even "
            "count between 4 and video_max_frames."
        },
    )
    video_max_frames: int | None = field(
        default=None,
        metadata={"help": "Most frames sampled from one video (None: recorded, else qwen-vl-utils' 768)."},
    )
    video_min_pixels: int | None = field(
        default=None,
        metadata={
            "help": "Smallest area of a video frame in pixels after resizing (None: recorded, else qwen-vl-utils' 128 "
            "merged patches: 128 x 28 x 28 for Qwen2/2.5-VL, 128 x 32 x 32 for Qwen3-VL and Qwen3.5)."
        },
    )
    video_max_pixels: int | None = field(
        default=None,
        metadata={"help": "Largest area of a video frame in pixels (None: recorded, else 768 merged patches)."},
    )
    video_total_pixels: int | None = field(
        default=None,
        metadata={
            "help": "Pixel budget of one video's frames together: each frame is capped at total / frames x 2 "
            "(None: recorded, else qwen-vl-utils' 128,000 tokens x 0.9)."
        },
    )
    packing: bool = field(
        default=True,
        metadata={
            "help": "Packed layout: each micro-batch is one padding-free sequence, every prompt and image computed "
            "once per pair, each response branch attending to its own prompt (vlrm.layout.packed). False: the padded "
            "layout, one row per (prompt, response), the baseline; families without the packed layout (the generic "
            "image-text-to-text path) use it whatever this says, with a warning."
        },
    )
    on_bad_sample: Literal["error", "skip"] = field(
        default="error",
        metadata={
            "help": "What a row that cannot be used does (missing or corrupt image, empty response, chosen == "
            "rejected, wrong type): `error` stops with the file, row and field; `skip` drops it and logs the count."
        },
    )
    data_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where prepared data sets are cached (vlrm.data.prepare). None: $VLRM_CACHE_DIR/prepared, else "
            "~/.cache/vlrm/prepared. On several nodes, a dir on a shared filesystem is prepared once in all; a "
            "node-local one once per node."
        },
    )
    dataset_num_proc: int | None = field(
        default=None,
        metadata={
            "help": "Processes that prepare a data set (read, check and decode images, count tokens). None: one per "
            "CPU core (at most 16) for sources of 2,000 rows or more, else 1."
        },
    )

    def _check_model_data_arguments(self) -> None:
        # Values from the YAML file reach argparse as defaults, which it never checks against `choices`.
        for name, hint in get_type_hints(type(self)).items():
            if get_origin(hint) is Literal and getattr(self, name) not in get_args(hint):
                choices = ", ".join(map(str, get_args(hint)))
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of: {choices}.")
        if self.attn_implementation == "flash_attention_2":
            check_flash_attention_available()
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            if value is not None and value < 28 * 28:
                raise ConfigError(f"{name}={value} is below one 28x28 visual token (784 pixels).")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ConfigError(f"min_pixels={self.min_pixels} is larger than max_pixels={self.max_pixels}.")
        for name in ("video_fps", "video_max_frames", "video_min_pixels", "video_max_pixels", "video_total_pixels"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name}={value} must be positive.")
        if self.video_min_pixels and self.video_max_pixels and self.video_min_pixels > self.video_max_pixels:
            raise ConfigError(
                f"video_min_pixels={self.video_min_pixels} is larger than video_max_pixels={self.video_max_pixels}."
            )

    def video_overrides(self) -> dict[str, Any]:
        """The ``video_*`` keys this config sets (``vlrm.data.videos.VideoSettings`` field names)."""
        names = {"video_fps": "fps", "video_max_frames": "max_frames", "video_min_pixels": "min_pixels",
                 "video_max_pixels": "max_pixels", "video_total_pixels": "total_pixels"}  # fmt: skip
        return {field_name: getattr(self, name) for name, field_name in names.items() if getattr(self, name)}


@dataclass
class TrainConfig(
    ModelDataArguments,
    LoraArguments,
    HeadArguments,
    ObjectiveArguments,
    ProcessArguments,
    JointArguments,
    RewardConfig,
):
    """Everything `train_rm.py` reads: TRL's `RewardConfig` (and so every `TrainingArguments` field) plus the
    vision-language fields below.

    Defaults that differ from `RewardConfig`:
    - `remove_unused_columns`: False (the collator needs the image and prompt columns).
    - `max_length`: not used; the one length limit is `max_seq_length`, and longer rows are dropped, never truncated.
    - `logging_steps`: 10.
    - `gradient_checkpointing`: False (TRL: True); the recipes for real models turn it on.
    """

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A model directory or hub id of a supported family (vlrm.model.families: Qwen2-VL, Qwen2.5-VL / "
            "MiMo-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE, or any AutoModelForImageTextToText checkpoint "
            "whose processor has a chat template), or a reward model saved by vlrm."
        },
    )
    dataset_path: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Training preference pairs: a .json, .jsonl or .parquet file, a `datasets.save_to_disk` dir or a "
            "Hugging Face Hub dataset id; or a list of them, mixed (see dataset_weights)."
        },
    )
    dataset_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "One sampling ratio per dataset_path entry: 1.0 every row once, 2.0 twice, 0.25 a seeded quarter "
            "(drawn before any image is decoded). None: every row once."
        },
    )
    dataset_num_samples: list[int] | None = field(
        default=None,
        metadata={"help": "Instead of dataset_weights: pairs drawn from each dataset_path entry (seeded)."},
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Config name of a hub dataset (dataset_path / eval_dataset_path an id)."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset used for training."})
    eval_dataset_path: list[str] | None = field(
        default=None,
        metadata={"help": "Held-out preference pairs (same forms as dataset_path), evaluated every `eval_steps`."},
    )
    eval_dataset_split: str = field(default="test", metadata={"help": "Split of a hub eval dataset."})
    max_seq_length: int = field(
        default=4096,
        metadata={
            "help": "Longest prompt + response in tokens, visual tokens included. Longer pairs are dropped and "
            "counted in the log, never truncated (truncation would cut off the token the reward is read at)."
        },
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={
            "help": "Train on a fixed, seeded subset of this many pairs (None: all), drawn before any image is "
            "decoded; a mixture keeps its proportions."
        },
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on a fixed, seeded subset of this many pairs (None: all)."}
    )
    freeze_vit: bool = field(
        default=False,
        metadata={
            "help": "Freeze the vision tower. Its aligners, which project visual features into the language model "
            "(Qwen's merger, Qwen3-VL's DeepStack mergers, a multi_modal_projector), stay trainable."
        },
    )
    use_irrelevant_queries: bool = field(
        default=False,
        metadata={"help": "Add the irrelevant-query loss: a chosen response must score lower under another prompt."},
    )
    num_irrelevant_pairs: int = field(
        default=1, metadata={"help": "Irrelevant prompts drawn per pair and epoch when use_irrelevant_queries."}
    )
    irrelevant_loss_weight: float = field(
        default=1.0, metadata={"help": "Weight of the irrelevant-query loss added to the Bradley-Terry loss."}
    )
    irrelevant_mode: Literal["query", "image"] = field(
        default="query",
        metadata={
            "help": "`query`: the chosen response goes under another pair's whole prompt. `image`: keep the "
            "question text, swap only the image(s)."
        },
    )
    reward_stats_samples: int = field(
        default=1000,
        metadata={
            "help": "Pairs of the training set (drawn with `seed`) on which the final model's reward mean and std "
            "are measured and saved in its config (reward_mean, reward_std) for normalised rewards in RL; 0: skip."
        },
    )
    log_dir: str = field(default="logs", metadata={"help": "Where `train_TIMESTAMP.log` is written."})

    # Overridden parent defaults (listed in the class docstring).
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the collator needs the image and prompt columns."}
    )
    max_length: int | None = field(default=None, metadata={"help": "Not used: set `max_seq_length` instead."})
    logging_steps: float = field(default=10, metadata={"help": "Log every this many optimizer steps."})
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Recompute activations in the backward pass to save memory (alias of activation_checkpointing)."
        },
    )

    def __post_init__(self):
        # `gradient_checkpointing` is the name our recipes use; hand it to transformers' newer name ourselves so the
        # deprecation warning is not printed on every run.
        if self.gradient_checkpointing is not None and self.activation_checkpointing is None:
            self.activation_checkpointing, self.gradient_checkpointing = self.gradient_checkpointing, None
        import_deepspeed_before_the_process_group()  # TrainingArguments' set-up starts the process group
        super().__post_init__()
        self._check_model_data_arguments()
        self._check_lora_arguments()
        self._check_head_arguments()
        self._check_objective_arguments()
        if not self.model_name_or_path:
            raise ConfigError("model_name_or_path is required (a model directory or hub id).")
        self.dataset_path = _as_list(self.dataset_path)
        self.eval_dataset_path = _as_list(self.eval_dataset_path) or None
        if not self.dataset_path:
            raise ConfigError("dataset_path is required (a .json, .jsonl, .parquet file or a save_to_disk dir).")
        self._check_mixture()
        # A hub id is `org/name`; a path written as one (./x, ../x, /x, .cache/x) must exist, or loading would go to
        # the hub and fail with an unrelated message.
        if (
            self.model_name_or_path.startswith((".", "/", "~"))
            and not Path(self.model_name_or_path).expanduser().exists()
        ):
            hint = " (`make demo` builds it, or `python -m vlrm.tiny`)" if "tiny" in self.model_name_or_path else ""
            raise ConfigError(f"model_name_or_path not found: {self.model_name_or_path}{hint}")
        if self.max_length is not None:
            raise ConfigError("max_length is not used by vlrm: set max_seq_length instead.")
        if self.max_seq_length <= 0:
            raise ConfigError(f"max_seq_length must be positive, got {self.max_seq_length}.")
        if self.num_irrelevant_pairs < 1:
            raise ConfigError(f"num_irrelevant_pairs must be at least 1, got {self.num_irrelevant_pairs}.")
        if self.irrelevant_loss_weight < 0:
            raise ConfigError(f"irrelevant_loss_weight must be >= 0, got {self.irrelevant_loss_weight}.")
        if self.scoring_mode == "joint":
            if self.use_irrelevant_queries or self.reward_type == "process":
                raise ConfigError(
                    "scoring_mode joint judges a prompt's responses in one chain: it has no irrelevant-query branches "
                    "and no process (step) rewards; set use_irrelevant_queries: false and reward_type: outcome."
                )
            if self.joint_permutations < 1 or self.joint_group_size < 2:
                raise ConfigError(
                    f"joint_permutations must be >= 1 and joint_group_size >= 2, got {self.joint_permutations} and "
                    f"{self.joint_group_size}."
                )
        if self.reward_type == "process":
            if self.use_irrelevant_queries:
                raise ConfigError(
                    "use_irrelevant_queries pairs a row's best response with other prompts; a process reward scores "
                    "steps, not pairs: set use_irrelevant_queries: false with reward_type: process."
                )
            if self.loss_type != "bt" or self.center_rewards_coefficient:
                raise ConfigError(
                    "reward_type process trains with the step loss (binary cross-entropy on step labels, "
                    "vlrm.train.objectives): leave loss_type at its default and center_rewards_coefficient unset."
                )

    def _check_mixture(self) -> None:
        if self.dataset_weights is not None and self.dataset_num_samples is not None:
            raise ConfigError("set dataset_weights or dataset_num_samples, not both.")
        for name in ("dataset_weights", "dataset_num_samples"):
            values = getattr(self, name)
            if values is None:
                continue
            if len(values) != len(self.dataset_path):
                raise ConfigError(
                    f"{name} has {len(values)} entries but dataset_path has {len(self.dataset_path)}: give one per source."
                )
            if any(value < 0 for value in values) or not any(values):
                raise ConfigError(f"{name} must be >= 0 and not all 0, got {values}.")


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


@dataclass
class EvalConfig(ModelDataArguments):
    """Everything `eval_rm.py` reads: which runs to sweep, the preference set, and how to load each checkpoint.

    Results go to `results_dir/output_file` (CSV), the same name with `.json` and `.png`, and per-pair scores to
    `results_dir/<output_file stem>_pairs/`. A (model_dir, checkpoint, dataset_path, max_eval_samples) already
    in the results is skipped unless `force`, its weights or the data file changed since, or a setting that
    changes its numbers differs (dtype, seed, pixel limits, video sampling, num_irrelevant_pairs, irrelevant_mode,
    max_seq_length, on_bad_sample; a process result's step_threshold: the log says which). `packing` and `attn_implementation` change the numbers only by float round-off, so a result
    is reused across them.
    """

    model_dirs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Training output dirs to sweep; each holds `checkpoint-*` dirs and/or a final model at its top "
            "level (a single model dir works too)."
        },
    )
    dataset_path: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Held-out preference sets (.json, .jsonl, .parquet or a `datasets.save_to_disk` dir): one path, a "
            "list, or a mapping name: path (YAML; on the command line `name=path`). Each checkpoint is scored on "
            "each: one result row per (checkpoint, dataset)."
        },
    )
    benchmark: Literal["auto", "vl_rewardbench", "multimodal_rewardbench", "mm_rlhf", "videorewardbench"] = field(
        default="auto",
        metadata={
            "help": "Read every row as this benchmark's layout (vlrm.data.benchmarks); `auto`: each row's fields tell "
            "(VL-RewardBench: response + human_ranking; Multimodal RewardBench: Output1/Output2/Better; MM-RLHF: "
            "id + prompt + video, or chosen_reason / rejected_reason; VideoRewardBench: a video and a dimension)."
        },
    )
    base_model_path: str | None = field(
        default=None,
        metadata={"help": "The model the runs started from; its processor is used for checkpoints saved without one."},
    )
    checkpoint_pattern: str = field(
        default="checkpoint-*",
        metadata={
            "help": "Glob for checkpoint dirs inside each model dir. The final model in the dir is always added."
        },
    )
    eval_batch_size: int = field(default=8, metadata={"help": "Pairs per forward pass (each pair is two sequences)."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate a fixed, seeded subset of this many pairs (None: all)."}
    )
    output_file: str = field(
        default="evaluation_results.csv",
        metadata={"help": "CSV file name under `results_dir`; the JSON and PNG take the same name."},
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="auto",
        metadata={"help": "Weight dtype for scoring; `auto` keeps the dtype the checkpoint was saved in."},
    )
    seed: int = field(
        default=42, metadata={"help": "Seed of the `max_eval_samples` subset and the bootstrap interval."}
    )
    num_irrelevant_pairs: int = field(
        default=1,
        metadata={
            "help": "Irrelevant prompts per pair for irrelevant_accuracy / irrelevant_margin (the pair's chosen "
            "response under another pair's prompt, drawn with `seed`, the same for every checkpoint); 0 skips them."
        },
    )
    irrelevant_mode: Literal["query", "image"] = field(
        default="query", metadata={"help": "`query`: swap the whole prompt; `image`: swap only the image(s)."}
    )
    max_seq_length: int | None = field(
        default=4096,
        metadata={
            "help": "Longest branch in tokens (prompt + response, visual tokens included; an irrelevant prompt + the "
            "chosen response too). Longer pairs are not scored, never truncated: counted, their first ids listed in "
            "the log and the JSON, and the rest scored. null: no limit."
        },
    )
    device_map: str | None = field(
        default=None,
        metadata={
            "help": "Split each checkpoint over several GPUs, for models larger than one (accelerate's big-model "
            "dispatch): auto, balanced, balanced_low_0, sequential, or a JSON object {module: device}. null: the "
            "whole model on one device. Both layouts work with the layers on several devices."
        },
    )
    max_memory: str | None = field(
        default=None,
        metadata={
            "help": 'With device_map: memory per device, one size for every GPU ("70GiB") or a JSON object '
            '({"0": "70GiB", "1": "70GiB", "cpu": "200GiB"}). null: each device\'s free memory.'
        },
    )
    gpus_per_process: int = field(
        default=1,
        metadata={
            "help": "GPUs each evaluation process uses. Under torchrun (./run_eval.sh CONFIG 0,1,...,7) every "
            "process scores a shard of the pairs with its own replica of the model, split with device_map over "
            "its own gpus_per_process GPUs: 8 GPUs with 4 are 2 replicas of a 72B model. Above 1 needs device_map; "
            "GPU numbers in an explicit device_map or max_memory then count within the process's GPUs."
        },
    )
    step_threshold: float = field(
        default=0.5,
        metadata={
            "help": "Process checkpoints (reward_type: process): a step is predicted correct when its score (a "
            "probability) is above this, wrong otherwise, for the step F1s, macro-F1 and step accuracy "
            "(VisualProcessBench's protocol: eval_rm.py). A labelled step is correct when its label is above 0.5."
        },
    )
    force: bool = field(default=False, metadata={"help": "Re-evaluate checkpoints already in the results."})
    log_dir: str = field(default="logs", metadata={"help": "Where `eval_TIMESTAMP.log` is written."})
    results_dir: str = field(default="evaluation_results", metadata={"help": "Where the results are written."})

    def __post_init__(self):
        self._check_model_data_arguments()
        if isinstance(self.model_dirs, str):
            self.model_dirs = [self.model_dirs]
        if not self.model_dirs:
            raise ConfigError("model_dirs is required: a list of training output dirs (or model dirs) to evaluate.")
        self.dataset_path = _as_list(self.dataset_path)
        if not self.dataset_path:
            raise ConfigError("dataset_path is required (a .json, .jsonl, .parquet file or a save_to_disk dir).")
        if self.num_irrelevant_pairs < 0:
            raise ConfigError(f"num_irrelevant_pairs must be >= 0, got {self.num_irrelevant_pairs}.")
        if not 0.0 <= self.step_threshold < 1.0:
            raise ConfigError(
                f"step_threshold is compared with step probabilities, so it is in [0, 1); got {self.step_threshold}."
            )
        if self.max_seq_length is not None and self.max_seq_length <= 0:
            raise ConfigError(f"max_seq_length must be positive (or null for no limit), got {self.max_seq_length}.")
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size must be at least 1, got {self.eval_batch_size}.")
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            raise ConfigError(f"max_eval_samples must be at least 1 (or null for all), got {self.max_eval_samples}.")
        if Path(self.output_file).suffix != ".csv":
            raise ConfigError(f"output_file must end in .csv, got `{self.output_file}`.")
        if not self.checkpoint_pattern:
            raise ConfigError("checkpoint_pattern must not be empty (default: checkpoint-*).")
        if self.gpus_per_process < 1:
            raise ConfigError(f"gpus_per_process must be at least 1, got {self.gpus_per_process}.")
        if self.gpus_per_process > 1 and self.device_map is None:
            raise ConfigError(
                f"gpus_per_process={self.gpus_per_process} splits each replica over several GPUs: set device_map "
                "(auto or balanced) too."
            )
        if self.max_memory is not None and self.device_map is None:
            raise ConfigError("max_memory bounds a device_map: set device_map (auto or balanced) too.")
        try:
            parse_device_map(self.device_map)
            parse_max_memory(self.max_memory, devices=[])
        except ValueError as error:
            raise ConfigError(str(error)) from error
