"""Evaluate every checkpoint of one or more reward-model runs on one or more held-out preference sets or benchmarks.

One process (CPU demo, or one GPU):
    python eval_rm.py training_configs/eval_config_example.yaml
    ./run_eval.sh                                                  # the same config, default device
    ./run_eval.sh training_configs/eval_config_example7b.yaml 0    # GPU 0 (sets CUDA_VISIBLE_DEVICES)
Override any config key on the command line (`python eval_rm.py --help` lists them):
    python eval_rm.py training_configs/eval_config_example.yaml --max_eval_samples 200
    python eval_rm.py CONFIG --model_dirs outputs/run_a outputs/run_b --force
    python eval_rm.py CONFIG --dataset_path vlrb=data/vl_rewardbench.parquet held_out=data/eval.jsonl
    python eval_rm.py training_configs/eval_config_benchmarks.yaml      # the benchmark stand-ins, after make demo

Each model dir gives its `checkpoint-*` dirs in step order, then its final model (`final`); each checkpoint is loaded
once and scored on every dataset (benchmarks by their own protocols: vlrm/data/benchmarks.py). Outputs, with the default
output_file `evaluation_results.csv`:
    evaluation_results/evaluation_results.csv    one row per model x checkpoint x dataset, sorted by model then step:
                                                 status (ok | error) and error, accuracy with a 95% bootstrap
                                                 interval, num_ties, margin mean/std, num_pairs, num_overlong,
                                                 accuracy per category (accuracy/<category>) and their macro mean,
                                                 acc_plus (groups all right, MM-RLHF), reward mean/std (to normalise
                                                 rewards in RL), step, wall_time_s (load + score), load_s (loading the
                                                 checkpoint: a LoRA run's base is loaded once), pairs_per_s
    evaluation_results/evaluation_results.json   the config, the same rows with per_category, bias diagnostics and
                                                 overlong_ids nested, and the errors
    evaluation_results/evaluation_results_pairs/<model>__<checkpoint>__<dataset>.csv
                                                 per-pair scores: id, category, chosen_score, rejected_score. One
                                                 small CSV per checkpoint and dataset, so finishing one never
                                                 rewrites another and each opens directly in pandas or a spreadsheet.
    evaluation_results/evaluation_results.png    accuracy and its interval against step, one line per model x dataset
    logs/eval_TIMESTAMP.log                      the full log: results, accuracy by dataset, published reference
                                                 numbers next to ours for recognised benchmarks

Ties (chosen == rejected) count as wrong, as RewardBench scores them, and are counted in num_ties.

Joint checkpoints (trained with scoring_mode: joint; vlrm.use.joint) judge a pair's two responses in one sequence, so
each pair is scored in both orders and the rewards averaged: `accuracy` is the order-averaged one. Their result rows
add the position-bias diagnostic (absent for independent checkpoints; empty cells in a CSV that mixes both):
    accuracy_preferred_first, accuracy_preferred_last   pairwise accuracy on the order with the preferred response
                                                 first (order 0) and on the one with it last (order 1), each on its
                                                 own order's rewards, ties wrong as above
    position_gap                                 accuracy_preferred_first - accuracy_preferred_last: how much the
                                                 model leans on the order (0: none); only the order-averaged accuracy
                                                 is free of it
and their per-pair file each order's rewards: chosen_score_preferred_first, rejected_score_preferred_first,
chosen_score_preferred_last, rejected_score_preferred_last (chosen_score / rejected_score are their means). A joint
checkpoint has no irrelevant-query branches: its irrelevant metrics are left out. Sets of N responses are averaged
over joint_permutations orders, with no per-order accuracy; a checkpoint with joint_permutations 1 is scored in the
given order only (accuracy_preferred_first alone).

Process checkpoints (trained with reward_type: process; their config records it) on rows of step-labelled solutions
(vlrm.data.steps: VisualProcessBench, VisualPRM400K, `python -m vlrm synthetic --steps`) get every step of every
solution scored (RewardScorer.score_steps, the probability that the step is right) instead of pairs; on rows without
steps they score each response as an outcome model would. Their result rows carry, instead of accuracy:
    step_macro_f1, step_f1_correct, step_f1_wrong   VisualProcessBench's protocol (VisualPRM, Wang et al. 2025, arXiv
                                                 2503.10291): the F1 of the correct steps and of the wrong steps (each
                                                 class the positive one) and their mean, over every labelled step;
                                                 neutral steps (NaN labels; VisualProcessBench's 0) are left out. A
                                                 step is predicted correct when its score is above step_threshold
                                                 (default 0.5); a label is correct above 0.5 (a soft label of 0.75 is
                                                 correct, 0.5 is wrong). Per source (the row's category, VisualProcess-
                                                 Bench's data_source) in macro_f1/<source>, f1_correct/<source>, ...
    step_accuracy                                the share of labelled steps on the right side of the threshold
    best_of_n, best_of_n_oracle, best_of_n_random   on the rows of several solutions: the share of questions whose
                                                 highest-scored solution (the checkpoint's step_aggregation) is fully
                                                 correct (every labelled step correct), the share that have a fully
                                                 correct solution, and the expected share of a random pick; ties go to
                                                 the solution listed first. best_of_n/<how> for each aggregation (mean,
                                                 min, last, product).
The per-pair file then holds one row per solution, in the data's order: id, category, solution (its index), num_steps,
step_scores and step_labels (JSON lists, null for neutral), score (aggregated), correct, selected (best-of-N's pick);
the plot evaluation_results_process.png draws step macro-F1 and best-of-N against step. A set whose every category
is a VisualProcessBench source (MMMU, MathVision, MathVerse, DynaMath, WeMath) is recognised as the benchmark and its
published macro-F1s (arXiv 2503.10291, Table 3) are logged beside ours. Under torchrun each rank scores every
size-th chunk of questions, the same score_steps calls one process makes.

Pairs with a branch longer than max_seq_length (default 4096 tokens) are not scored, never truncated: they are
counted (num_overlong), their first ids listed in the log and the JSON (overlong_ids), and the rest are scored.

Crash-safe and resumable: after every checkpoint the results are rewritten atomically (temporary file, then rename),
so a killed sweep loses only the checkpoint in progress. Running the same command again skips each (model_dir,
checkpoint, dataset_path, max_eval_samples) already scored, unless its weights changed since (a re-run training
overwrote it) or a setting that changes its numbers differs (RESULT_SETTINGS: the log says which); `--force`
re-evaluates all, and error rows are always retried. A checkpoint that cannot be loaded becomes a row with status
`error` and the reason, and the sweep goes on; the exit code is then 1. Checkpoints are only read, never written.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import transformers
from matplotlib.figure import Figure
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from vlrm.data.benchmarks import REFERENCE_RESULTS
from vlrm.data.prepare import load_preference_dataset
from vlrm.data.steps import is_correct_solution
from vlrm.data.videos import VideoSettings
from vlrm.errors import CheckpointError, ConfigError
from vlrm.layout.encoder import PreferenceEncoder, apply_pixel_limits
from vlrm.layout.steps import STEP_AGGREGATIONS, aggregate_steps
from vlrm.metrics import (
    attribute_metrics,
    best_of_n,
    bias_diagnostics,
    evaluate_pairs,
    irrelevant_metrics,
    ranking_metrics,
    ranking_pairs,
    step_metrics,
)
from vlrm.model.checkpoints import find_checkpoints, load_processor, weights_mtime
from vlrm.model.loading import parse_device_map, parse_max_memory
from vlrm.train.config import EvalConfig
from vlrm.train.config_files import config_to_dict, load_config
from vlrm.train.irrelevant import RowsWithIrrelevantPrompts
from vlrm.train.process_group import exit_now, finish_process_group, import_deepspeed_before_the_process_group
from vlrm.use.scoring import PairScores, RewardScorer

logger = logging.getLogger("vlrm.eval")

# What a result is of; a later run replaces it, or reuses it when the settings that change its numbers are equal
# (packing and attn_implementation change them by round-off only: see EvalConfig).
RESULT_KEY = ("model_dir", "checkpoint", "dataset_path", "max_eval_samples")
RESULT_SETTINGS = (
    "dtype", "seed", "min_pixels", "max_pixels", "num_irrelevant_pairs", "irrelevant_mode", "max_seq_length",
    "on_bad_sample", "benchmark", "video_fps", "video_max_frames", "video_min_pixels", "video_max_pixels",
    "video_total_pixels",
)  # fmt: skip
# A joint checkpoint's position-bias diagnostic (the section "Joint checkpoints" above), beside its accuracy.
JOINT_COLUMNS = ["accuracy_preferred_first", "accuracy_preferred_last", "position_gap"]
# CSV column order: these first, then per-category accuracies, then any other metric a row carries (so one added
# later, such as the irrelevant-query metrics, reaches the CSV and the JSON with no change here), then bookkeeping.
LEADING_COLUMNS = [
    "model", "checkpoint", "step", "dataset", "dataset_benchmark", "status", "error", "accuracy", "accuracy_ci_low",
    "accuracy_ci_high", *JOINT_COLUMNS, "num_ties", "margin_mean", "margin_std", "num_pairs", "num_overlong", "acc_plus", "num_groups",
    "reward_mean", "reward_std", "wall_time_s", "load_s", "pairs_per_s", "macro_accuracy",
]  # fmt: skip
TRAILING_COLUMNS = [
    "model_dir", "checkpoint_path", "dataset_path", "max_eval_samples", *RESULT_SETTINGS, "weights_mtime", "data_mtime",
    "pairs_file", "evaluated_at",
]  # fmt: skip
# Process checkpoints on step rows (the section "Process checkpoints" below): their result rows carry these instead of
# the pair metrics, then per source (category) ``<metric>/<source>`` and best-of-N per aggregation ``best_of_n/<how>``.
PROCESS_COLUMNS = [
    "reward_type", "step_threshold", "step_macro_f1", "step_f1_correct", "step_f1_wrong", "step_accuracy", "num_steps",
    "num_neutral_steps", "num_correct_steps", "num_wrong_steps", "num_questions", "num_solutions", "step_aggregation",
    "best_of_n", "best_of_n_oracle", "best_of_n_random", "num_best_of_n_questions", "solutions_per_s",
]  # fmt: skip
PER_SOURCE_METRICS = ("macro_f1", "f1_correct", "f1_wrong", "step_accuracy", "num_steps")
PROCESS_TABLE_COLUMNS = ["step_macro_f1", "step_f1_correct", "step_f1_wrong", "step_accuracy", "best_of_n",
                         "best_of_n_oracle", "num_solutions", "solutions_per_s"]  # fmt: skip
# Compared on resume only for process results (an outcome result never depended on it).
PROCESS_SETTINGS = ("step_threshold",)
# VisualProcessBench (arXiv 2503.10291): a set of step rows whose every category (its `data_source`) is one of these
# is recognised as the benchmark, and its published numbers are printed beside ours.
VISUAL_PROCESS_BENCH = "visualprocessbench"
VISUAL_PROCESS_BENCH_SOURCES = ("MMMU", "MathVision", "MathVerse", "DynaMath", "WeMath")
JSON_ONLY = ("overlong_ids", "bias")  # lists: in the JSON, not the CSV
TABLE_COLUMNS = [
    "model", "checkpoint", "step", "dataset", "status", "accuracy", "accuracy_ci_low", "accuracy_ci_high",
    *JOINT_COLUMNS, "num_ties", "macro_accuracy", "acc_plus", "top1_accuracy", "kendall_tau", "margin_mean", "irrelevant_accuracy", "reward_mean",
    "reward_std", "num_pairs", "pairs_per_s", *PROCESS_TABLE_COLUMNS, "error",
]  # fmt: skip


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` then rename over ``path``: readers, and a run killed half-way, see the old file or the new
    one, never part of one (``os.replace`` is atomic within one filesystem, hence the tmp file's dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def result_key(row: dict) -> tuple:
    return tuple(row[name] for name in RESULT_KEY)


def sort_rows(rows: list[dict]) -> list[dict]:
    return sorted(
        rows,
        key=lambda row: (row["model"], row["step"] is None, row["step"] or 0, row["dataset_path"], row["checkpoint"]),
    )


def read_results(json_path: Path) -> list[dict]:
    if not json_path.exists():
        return []
    try:
        return json.loads(json_path.read_text())["results"]
    except (ValueError, KeyError, TypeError) as error:
        raise SystemExit(
            f"{json_path}: not a results file ({error}); move it away or set another output_file"
        ) from None


def results_frame(rows: list[dict]) -> pd.DataFrame:
    """One flat row per result: ``per_category`` becomes ``accuracy/<category>`` columns; a process result's
    ``per_source`` ``<metric>/<source>`` columns and its ``best_of_n_by_aggregation`` ``best_of_n/<how>`` ones."""
    flat = []
    for row in rows:
        row = {key: value for key, value in row.items() if key not in JSON_ONLY}
        for category, values in (row.pop("per_category", None) or {}).items():
            row[f"accuracy/{category}"] = values["accuracy"]
        for source, values in (row.pop("per_source", None) or {}).items():
            row.update({f"{metric}/{source}": values[metric] for metric in PER_SOURCE_METRICS})
        for how, value in (row.pop("best_of_n_by_aggregation", None) or {}).items():
            row[f"best_of_n/{how}"] = value
        for name, values in (row.pop("attributes", None) or {}).items():  # attribute heads on rated rows
            for metric in ("pairwise_accuracy", "mae", "rmse"):
                row[f"attribute/{name}/{metric}"] = values[metric]
        flat.append(row)
    frame = pd.DataFrame(flat)
    leading = [column for column in LEADING_COLUMNS + PROCESS_COLUMNS if column in frame]
    for prefix in ("accuracy", "best_of_n", *PER_SOURCE_METRICS):
        leading += sorted(column for column in frame if column.startswith(f"{prefix}/") and column not in leading)
    trailing = [column for column in TRAILING_COLUMNS if column in frame]
    frame = frame[leading + [column for column in frame if column not in leading + trailing] + trailing]
    # Nullable ints: an error row's missing count must not turn every count into a float.
    counts = ("step", "num_ties", "num_pairs", "num_steps", "num_neutral_steps", "num_solutions", "num_questions")
    counts += tuple(column for column in frame if column.startswith("num_steps/"))
    return frame.astype({column: "Int64" for column in counts if column in frame})


def write_results(rows: list[dict], config: EvalConfig, csv_path: Path, json_path: Path) -> None:
    rows = sort_rows(rows)
    errors = [
        {name: row[name] for name in ("model", "checkpoint", "dataset_path", "error")}
        for row in rows
        if row["status"] == "error"
    ]
    payload = {"config": config_to_dict(config), "results": rows, "errors": errors}
    # The JSON first: it is what a resumed run reads, so the CSV can never claim a row the JSON lacks.
    write_atomically(json_path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2)))
    write_atomically(csv_path, lambda tmp: results_frame(rows).to_csv(tmp, index=False))


@dataclass(frozen=True)
class PlotSpec:
    """What a sweep's plot draws against step: ``metric`` (one line per (model, dataset), its bootstrap
    ``interval`` shaded when the rows have one), ``second`` dashed beside it where the rows have it, a final model whose
    step is unknown as a line across (``final_style``), a chance line, and the y axis's label."""

    metric: str
    interval: tuple[str, str] | None
    second: str
    second_label: str
    final_style: str
    chance_label: str
    ylabel: str


PAIR_PLOT = PlotSpec("accuracy", ("accuracy_ci_low", "accuracy_ci_high"), "top1_accuracy", "top-1 of N", "--",
                     "chance", "preference accuracy (ties count as wrong)")  # fmt: skip
# Step macro-F1 (VisualProcessBench's score) and best-of-N (the checkpoint's aggregation) of process checkpoints.
PROCESS_PLOT = PlotSpec("step_macro_f1", None, "best_of_n", "best-of-N", ":", "random guessing (macro-F1)",
                        "step macro-F1 (neutral steps left out) / best-of-N")  # fmt: skip


def write_plot(rows: list[dict], plot_path: Path, title: str, spec: PlotSpec = PAIR_PLOT) -> list[str]:
    """Accuracy against step (``spec``: another metric), one line per (model, dataset), the bootstrap interval
    shaded; a final model whose step is unknown is a line across, so runs saved without checkpoints still show up.
    Returns the line labels."""
    figure = Figure(figsize=(9, 5.5), layout="constrained")
    axes = figure.subplots()
    ok_rows = [row for row in sort_rows(rows) if row["status"] == "ok" and row.get(spec.metric) is not None]
    series = dict.fromkeys((row["model"], row.get("dataset", "")) for row in ok_rows)
    labels = []
    for index, (model, dataset) in enumerate(series):
        color = f"C{index % 10}"
        label = f"{model} · {dataset}" if len({name for _, name in series}) > 1 else model
        line_rows = [row for row in ok_rows if (row["model"], row.get("dataset", "")) == (model, dataset)]
        stepped = [row for row in line_rows if row["step"] is not None]
        if stepped:
            steps = [row["step"] for row in stepped]
            axes.plot(steps, [row[spec.metric] for row in stepped], marker="o", color=color, label=label)
            if spec.interval is not None:
                low, high = ([row[name] for row in stepped] for name in spec.interval)
                axes.fill_between(steps, low, high, color=color, alpha=0.15, linewidth=0)
            labels.append(label)
            if any(row.get(spec.second) is not None for row in stepped):  # rows of N responses / solutions
                second = [row.get(spec.second) for row in stepped]
                second_label = f"{label} ({spec.second_label})"
                axes.plot(steps, second, marker="s", linestyle="--", color=color, label=second_label)
                labels.append(second_label)
        for row in line_rows:
            if row["step"] is None:
                final_label = f"{label} ({row['checkpoint']})"
                axes.axhline(row[spec.metric], color=color, linestyle=spec.final_style, label=final_label)
                labels.append(final_label)
    axes.axhline(0.5, color="gray", linestyle=":", linewidth=1, label=spec.chance_label)
    axes.set(xlabel="step", ylabel=spec.ylabel, ylim=(-0.02, 1.02), title=title)
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    write_atomically(plot_path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    return labels


@contextmanager
def run_logging(log_path: Path, main_process: bool = True):
    """The run's log on the console and in ``log_path`` for the length of one run, then the handlers are removed
    (``main`` may run several times in one process, as the tests do). Under torchrun only rank 0 writes the log
    file; the other ranks print their warnings and errors."""
    handlers = [logging.StreamHandler()]
    if main_process:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path))
    root = logging.getLogger()
    previous_level, progress_bars = root.level, transformers.utils.logging.is_progress_bar_enabled()
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if main_process else logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.disable_progress_bar()  # one bar per weight load would bury ours
    try:
        yield
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(previous_level)
        if progress_bars:
            transformers.utils.logging.enable_progress_bar()


def length_encoder(checkpoints: list, config: EvalConfig) -> PreferenceEncoder | None:
    """A processor to count tokens with: the first of these checkpoints' that loads, else the base model's."""
    for checkpoint in checkpoints:
        try:
            processor = load_processor(checkpoint.path, config.base_model_path)
        except (CheckpointError, OSError, ValueError):
            continue
        apply_pixel_limits(processor, config.min_pixels, config.max_pixels)
        config_file = Path(checkpoint.path) / "config.json"  # full and LoRA checkpoints alike
        recorded = json.loads(config_file.read_text()).get("vlrm_video_sampling") if config_file.is_file() else None
        return PreferenceEncoder(processor, VideoSettings.from_values(recorded, **config.video_overrides()))
    return None


# ----------------------------------------------------------------------------------------------------------------
# Ranks: under torchrun each process scores a shard of every (checkpoint, dataset); rank 0 gathers and writes


@dataclass(frozen=True)
class Ranks:
    """This process's place in the sweep (one process: rank 0 of 1) and the GPUs it owns. Rank 0 plans the sweep,
    prepares the data first, gathers every rank's scores and writes every output; the others score their shards."""

    rank: int = 0
    size: int = 1
    gpus: tuple[int, ...] = ()
    group: Any = None  # a gloo group for the Python objects the ranks exchange (beside NCCL's)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int] | None:
        return (self.rank, self.size) if self.size > 1 else None

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank."""
        if self.size == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, value: Any) -> list | None:
        """Every rank's ``value`` in rank order, on rank 0 (None on the others)."""
        if self.size == 1:
            return [value]
        gathered = [None] * self.size if self.main else None
        torch.distributed.gather_object(value, gathered, dst=0, group=self.group)
        return gathered

    def all_gather(self, value: Any) -> list:
        if self.size == 1:
            return [value]
        gathered = [None] * self.size
        torch.distributed.all_gather_object(gathered, value, group=self.group)
        return gathered

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier(group=self.group)


def start_ranks(config: EvalConfig) -> Ranks:
    """The process group when torchrun started this process (WORLD_SIZE > 1): NCCL on GPUs, gloo on the CPU. Rank
    r owns GPUs ``r * gpus_per_process`` .. ``(r + 1) * gpus_per_process - 1`` of the visible ones."""
    size, local_rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    gpus: tuple[int, ...] = ()
    if torch.cuda.is_available():
        first = local_rank * config.gpus_per_process
        gpus = tuple(range(first, first + config.gpus_per_process))
        if gpus[-1] >= torch.cuda.device_count():
            raise ConfigError(
                f"rank {local_rank} needs GPUs {list(gpus)} (gpus_per_process={config.gpus_per_process}), but "
                f"{torch.cuda.device_count()} are visible: start {torch.cuda.device_count() // config.gpus_per_process}"
                " processes per node (./run_eval.sh does)"
            )
        torch.cuda.set_device(gpus[0])
    if size == 1:
        return Ranks(gpus=gpus)
    import_deepspeed_before_the_process_group()  # or the group outlives destroy_process_group (see there)
    torch.distributed.init_process_group("nccl" if gpus else "gloo")
    group = torch.distributed.new_group(backend="gloo") if gpus else None
    return Ranks(torch.distributed.get_rank(), size, gpus, group)


def scorer_placement(config: EvalConfig, ranks: Ranks) -> dict[str, Any]:
    """Where this rank's replica of each checkpoint goes: one device (its GPU, else the CPU), or with device_map
    split over the GPUs it owns (all visible ones for a single process with gpus_per_process 1)."""
    own = list(ranks.gpus) if ranks.gpus and (ranks.size > 1 or config.gpus_per_process > 1) else None
    if config.device_map is None:
        return {"device": f"cuda:{ranks.gpus[0]}" if ranks.gpus else "cpu"}
    return {
        "device_map": parse_device_map(config.device_map, own),
        "max_memory": parse_max_memory(config.max_memory, own),
    }


@dataclass
class EvalSet:
    """One evaluation data set of a sweep, prepared (vlrm.prepare) and ready to score."""

    name: str  # in tables, plots and per-pair file names
    path: str  # resolved: part of the result key
    dataset: Any
    rows: Any  # the dataset, or its rows with fixed irrelevant prompts
    report: Any
    benchmark: str | None
    step_rows: list[int] = field(default_factory=list)  # the rows with step-labelled solutions (vlrm.data.steps)


def dataset_entries(config: EvalConfig) -> list[tuple[str, str]]:
    """(name, resolved path) of every dataset: ``name=path`` entries keep their name, others take the file's stem."""
    entries = []
    for entry in config.dataset_path:
        name, _, path = entry.partition("=") if "=" in entry and not Path(entry).exists() else ("", "", entry)
        if not Path(path).exists():
            raise FileNotFoundError(f"dataset_path not found: {path}")
        name = name or Path(path).stem
        if any(name == other for other, _ in entries):
            name = f"{name}-{len(entries)}"
        entries.append((name, str(Path(path).resolve())))
    return entries


def data_mtime(path: str) -> float | None:
    """Newest modification time of a data set's files (a file, or a ``save_to_disk`` dir), None for a hub id: when it
    changes, the set was rewritten at the same path and an earlier score on it is stale."""
    local = Path(path)
    if local.is_file():
        return local.stat().st_mtime
    if local.is_dir():
        return max((file.stat().st_mtime for file in local.rglob("*") if file.is_file()), default=None)
    return None


def plan(config: EvalConfig, entries: list[tuple[str, str]], results: list[dict]) -> tuple[list, dict]:
    """The sweep's result keys, and per checkpoint to (re-)score, the dataset names it still needs."""
    previous = {result_key(row): row for row in results if row["status"] == "ok"}
    settings = {name: getattr(config, name) for name in RESULT_SETTINGS}
    sweep_keys, todo = [], {}
    for model_dir in config.model_dirs:
        checkpoints = find_checkpoints(model_dir, config.checkpoint_pattern)
        if not checkpoints:
            logger.warning("%s: no dir matching %s and no final model", model_dir, config.checkpoint_pattern)
        for checkpoint, (name, path) in itertools.product(checkpoints, entries):
            key = (str(Path(model_dir).resolve()), checkpoint.name, path, config.max_eval_samples)
            sweep_keys.append(key)
            done = previous.get(key)
            if done is not None and not config.force:
                compared = settings | ({name: getattr(config, name) for name in PROCESS_SETTINGS}
                                       if done.get("reward_type") == "process" else {})  # fmt: skip
                why = [f"{k} {done.get(k)!r} -> {v!r}" for k, v in compared.items() if done.get(k) != v]
                if done.get("weights_mtime") != weights_mtime(checkpoint.path):
                    why.insert(0, "weights changed since it was evaluated")
                if done.get("data_mtime") != data_mtime(path):
                    why.insert(0, "the data set changed since it was evaluated")
                if not why:
                    continue
                logger.info("%s/%s on %s: %s; evaluating again", model_dir, checkpoint.name, name, "; ".join(why))
            todo.setdefault((model_dir, checkpoint), []).append(name)
    return sweep_keys, todo


def load_eval_set(config: EvalConfig, name: str, path: str, encoder: PreferenceEncoder | None) -> EvalSet:
    dataset, report = load_preference_dataset(
        path,
        config.on_bad_sample,
        config.max_eval_samples,
        config.seed,
        encoder=encoder,
        max_seq_length=config.max_seq_length,
        cache_dir=config.data_cache_dir,
        num_proc=config.dataset_num_proc,
        benchmark=None if config.benchmark == "auto" else config.benchmark,
    )
    (logger.warning if report.num_overlong or report.num_unsupported else logger.info)(report.summary())
    rows = dataset
    if config.num_irrelevant_pairs:
        rows = RowsWithIrrelevantPrompts(
            dataset, config.num_irrelevant_pairs, config.seed, config.irrelevant_mode, config.eval_batch_size
        )
    benchmark = next((kind for kind in dataset["benchmark"] if kind is not None), None)
    step_rows = [index for index, steps in enumerate(dataset["steps"]) if steps]
    if benchmark is None and step_rows:
        categories = dataset["category"]
        sources = {str(categories[index]).lower() for index in step_rows}
        if sources <= {source.lower() for source in VISUAL_PROCESS_BENCH_SOURCES}:
            benchmark = VISUAL_PROCESS_BENCH
    return EvalSet(name, path, dataset, rows, report, benchmark, step_rows)


def ranking_set_metrics(scores: PairScores, eval_set: EvalSet, config: EvalConfig) -> tuple[dict, Any]:
    """The metrics of a dataset with rows of N responses: every pair metric over the rows' binarised pairs (each
    strict pair one pair; ties make none), Acc+ over each row's pairs, and the ranking metrics
    (``vlrm.metrics.ranking_metrics``); the per-response scores."""
    columns = eval_set.dataset.select_columns(
        ["id", "category", "group", "ranks", "tie", "response_lengths", "chosen_length", "rejected_length", "ratings",
         "rating_names"]
    ).to_dict()  # fmt: skip
    scored = np.flatnonzero(scores.scored)
    row_rewards, row_ranks, row_lengths = [], [], []
    for index in scored:
        ranks = columns["ranks"][index]
        pair = ranks is None
        row_rewards.append([scores.chosen[index], scores.rejected[index]] if pair else scores.responses[index])
        row_ranks.append(([0.0, 0.0] if columns["tie"][index] else [0.0, 1.0]) if pair else ranks)
        row_lengths.append([columns["chosen_length"][index], columns["rejected_length"][index]] if pair
                           else columns["response_lengths"][index])  # fmt: skip
    rows, better, worse = ranking_pairs(row_ranks)
    if not len(rows):
        raise ValueError(f"{eval_set.name}: no row has two responses of different ranks")
    chosen = np.array([row_rewards[r][i] for r, i in zip(rows, better, strict=True)])
    rejected = np.array([row_rewards[r][i] for r, i in zip(rows, worse, strict=True)])
    ids = [columns["id"][scored[r]] for r in rows]
    groups = [columns["group"][scored[r]] or ids[k] for k, r in enumerate(rows)]  # Acc+: a row's pairs all right
    metrics = evaluate_pairs(chosen, rejected, [columns["category"][scored[r]] for r in rows], seed=config.seed,
                             groups=groups)  # fmt: skip
    metrics.update(ranking_metrics(row_rewards, row_ranks))
    if scores.attributes is not None:
        rated = [index for index in scored if columns["rating_names"][index]]
        if rated:  # each attribute head against the rating of the same name (NaN where the row does not rate it)
            names = list(scores.attribute_names)
            ratings = []
            for index in rated:
                given = columns["rating_names"][index]
                ratings.append(np.array([[row[given.index(name)] if name in given else np.nan for name in names]
                                         for row in columns["ratings"][index]], dtype=np.float64))  # fmt: skip
            metrics["attributes"] = attribute_metrics([scores.attributes[index] for index in rated], ratings, names)
    metrics["bias"] = bias_diagnostics(
        chosen, rejected, [row_lengths[r][i] for r, i in zip(rows, better, strict=True)],
        [row_lengths[r][i] for r, i in zip(rows, worse, strict=True)],
    )  # fmt: skip
    per_response = pd.DataFrame(
        [
            {"id": columns["id"][index], "category": columns["category"][index], "response": position,
             "rank": rank, "score": float(reward)}
            for index, rewards, ranks in zip(scored, row_rewards, row_ranks, strict=True)
            for position, (reward, rank) in enumerate(zip(rewards, ranks, strict=True))
        ]
    )  # fmt: skip
    return metrics, per_response


# A pair's orders on a joint checkpoint (vlrm.use.joint.joint_orders): the given order, then the reverse.
ORDER_NAMES = ("preferred_first", "preferred_last")


def position_metrics(order_chosen: np.ndarray, order_rejected: np.ndarray) -> dict[str, float | None]:
    """A joint checkpoint's position-bias diagnostic from the scored pairs' per-order rewards ([pairs, orders]):
    accuracy with the preferred response first and last, each order's rewards alone (ties wrong), and their gap."""
    accuracies = [float((order_chosen[:, order] > order_rejected[:, order]).mean())
                  for order in range(order_chosen.shape[1])]  # fmt: skip
    first, last = accuracies[0], accuracies[1] if len(accuracies) > 1 else None
    return {"accuracy_preferred_first": first, "accuracy_preferred_last": last,
            "position_gap": None if last is None else first - last}  # fmt: skip


def eval_set_metrics(scores: PairScores, eval_set: EvalSet, config: EvalConfig, seconds: float) -> tuple[dict, Any]:
    """Every metric of one checkpoint on one dataset, and the per-pair scores (unscored over-long pairs are NaN): one
    row per pair, or, for a dataset with rows of N responses, one per response (``ranking_set_metrics``)."""
    scored = scores.scored
    if not scored.any():
        raise ValueError(f"every pair of {eval_set.name} is longer than max_seq_length={config.max_seq_length}")
    columns = eval_set.dataset.select_columns(
        ["id", "category", "group", "preferred_position", "chosen_length", "rejected_length"]
    ).to_dict()
    kept = {
        name: [value for value, keep in zip(values, scored, strict=True) if keep] for name, values in columns.items()
    }
    chosen, rejected = scores.chosen[scored], scores.rejected[scored]
    if scores.responses is not None:
        metrics, pair_scores = ranking_set_metrics(scores, eval_set, config)
    else:
        metrics = evaluate_pairs(chosen, rejected, kept["category"], seed=config.seed, groups=kept["group"])
        metrics["bias"] = bias_diagnostics(
            chosen, rejected, kept["chosen_length"], kept["rejected_length"], kept["preferred_position"]
        )
        pair_scores = pd.DataFrame(
            {"id": columns["id"], "category": columns["category"], "chosen_score": scores.chosen,
             "rejected_score": scores.rejected}
        )  # fmt: skip
        if scores.order_chosen is not None:  # a joint checkpoint: each order's rewards, and accuracy in each
            for order, name in enumerate(ORDER_NAMES[: scores.order_chosen.shape[1]]):
                pair_scores[f"chosen_score_{name}"] = scores.order_chosen[:, order]
                pair_scores[f"rejected_score_{name}"] = scores.order_rejected[:, order]
            metrics.update(position_metrics(scores.order_chosen[scored], scores.order_rejected[scored]))
    if scores.irrelevant is not None:  # the row's best response under another prompt
        metrics.update(irrelevant_metrics(chosen, scores.irrelevant[scored]))
    overlong = eval_set.report.overlong + [f"{columns['id'][i]} ({tokens} tokens)" for i, tokens in scores.overlong]
    metrics.update(
        num_overlong=eval_set.report.num_overlong + len(scores.overlong),
        overlong_ids=overlong[:20],
        pairs_per_s=metrics["num_pairs"] / seconds,
    )
    return metrics, pair_scores


def gather_parts(ranks: Ranks, part: Any, error: str | None, started: float) -> tuple[list | None, str | None, float]:
    """Every rank's (part, error) gathered: on rank 0 (every part in rank order, None, seconds), or (None, the first
    rank's error, seconds) when a rank failed; on the other ranks (None, None, seconds)."""
    parts = ranks.gather((part, error))
    seconds = time.perf_counter() - started
    if not ranks.main:
        return None, None, seconds
    errors = [error for _, error in parts if error is not None]
    if errors:
        return None, errors[0], seconds
    return [part for part, _ in parts], None, seconds


def score_on_every_rank(scorer: RewardScorer | None, eval_set: EvalSet, config: EvalConfig, ranks: Ranks,
                        desc: str) -> tuple[PairScores | None, str | None, float]:  # fmt: skip
    """(scores of the whole set on rank 0, the first rank's error or None, seconds). Every rank scores its shard of
    whole batches (``score_pairs(shard=...)``: the batches of one process, so the same numbers) and rank 0 combines
    them; every rank takes part even after a failure, so none waits forever for another."""
    started, part, error = time.perf_counter(), None, None
    # A joint checkpoint judges a pair's responses in one chain, with no branch for another prompt: the plain rows.
    rows = eval_set.dataset if scorer.joint["scoring_mode"] == "joint" else eval_set.rows
    if rows is not eval_set.rows and ranks.main:
        logger.info("%s: a joint checkpoint has no irrelevant-query branches: no irrelevant metrics", desc)
    try:
        part = scorer.score_pairs(rows, config.eval_batch_size, desc=desc, shard=ranks.shard,
                                  progress=ranks.main)  # fmt: skip
    except Exception as failure:  # NaN weights, OOM: this dataset's row says so
        logger.error("rank %d: %s: %s", ranks.rank, desc, failure, exc_info=True)
        error = f"{type(failure).__name__}: {failure}"
    parts, error, seconds = gather_parts(ranks, part, error, started)
    return (None if parts is None else PairScores.combine(parts)), error, seconds


# ----------------------------------------------------------------------------------------------------------------
# Process checkpoints: a score at every step of every solution (vlrm.use.process), by VisualProcessBench's protocol

# Questions are scored in chunks of about this many batches of solutions: one ``score_steps`` call each (a question's
# solutions under one prompt node), a progress step each, and under torchrun the unit each rank takes.
STEP_CHUNK_BATCHES = 8


def step_chunks(solution_counts: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive questions (positions in ``solution_counts``, each its number of solutions) grouped until a group
    holds ``STEP_CHUNK_BATCHES * batch_size`` solutions: fixed by the data and the batch size alone, so a chunk is
    scored the same whichever rank scores it."""
    chunks, current, size = [], [], 0
    for position, count in enumerate(solution_counts):
        current.append(position)
        size += count
        if size >= STEP_CHUNK_BATCHES * batch_size:
            chunks.append(current)
            current, size = [], 0
    return chunks + ([current] if current else [])


def score_steps_on_every_rank(scorer: RewardScorer, eval_set: EvalSet, config: EvalConfig, ranks: Ranks,
                              desc: str) -> tuple[list[list[np.ndarray]] | None, str | None, float]:  # fmt: skip
    """(on rank 0, per step row, each of its solutions' step scores (NaN over max_seq_length); the first rank's error
    or None; seconds). Every rank scores every ``ranks.size``-th chunk of questions (``step_chunks``) with
    ``RewardScorer.score_steps`` and rank 0 puts them back in the data's order: the calls one process makes, so the
    same numbers. A question's videos are sampled once for all its solutions."""
    started, part, error = time.perf_counter(), {}, None
    try:
        counts = eval_set.dataset.select(eval_set.step_rows).select_columns(["steps"])["steps"]
        chunks = step_chunks([len(steps) for steps in counts], config.eval_batch_size)[ranks.rank :: ranks.size]
        for chunk in tqdm(chunks, desc=desc, unit="chunk", disable=not ranks.main, leave=False):
            rows, owners = [], []
            for position in chunk:
                example = eval_set.dataset[eval_set.step_rows[position]]
                videos = [scorer.encoder.sample_video(video) for video in example.get("videos") or []]
                for steps in example["steps"]:
                    rows.append({"prompt": example["prompt"], "images": example["images"], "videos": videos,
                                 "steps": steps})  # fmt: skip
                    owners.append(position)
            scores = scorer.score_steps(rows, config.eval_batch_size)
            for position, values in zip(owners, scores.steps, strict=True):
                part.setdefault(position, []).append(values)
    except Exception as failure:  # NaN weights, OOM, a bad row: this dataset's row says so
        logger.error("rank %d: %s: %s", ranks.rank, desc, failure, exc_info=True)
        error = f"{type(failure).__name__}: {failure}"
    parts, error, seconds = gather_parts(ranks, part, error, started)
    if parts is None:
        return None, error, seconds
    merged = {position: values for part in parts for position, values in part.items()}
    return [merged[position] for position in range(len(eval_set.step_rows))], None, seconds


def _json_list(values: Any) -> str:
    """A list of numbers as JSON text for one CSV cell (NaN: null), read back with ``json.loads``."""
    return json.dumps([None if np.isnan(value) else float(value) for value in np.asarray(values, dtype=np.float64)])


def step_set_metrics(step_scores: list[list[np.ndarray]], eval_set: EvalSet, config: EvalConfig, aggregation: str,
                     seconds: float) -> tuple[dict, pd.DataFrame]:  # fmt: skip
    """Every metric of a process checkpoint on a set of step rows, and one row per solution.

    - The step F1s, macro-F1 and step accuracy (``vlrm.metrics.step_metrics``: VisualProcessBench's protocol, neutral
      steps left out, a step predicted correct above ``step_threshold``) over every step, and per source (the row's
      ``category``) in ``per_source``.
    - Best-of-N (``vlrm.metrics.best_of_n``) on the rows of several solutions, each solution scored by each of
      ``STEP_AGGREGATIONS`` (``best_of_n_by_aggregation``) and by the checkpoint's own ``aggregation`` (``best_of_n``);
      a solution is correct when every labelled step is (``vlrm.data.steps.is_correct_solution``); a row with a
      solution over max_seq_length is left out of best-of-N.
    Solutions over max_seq_length (their scores NaN) are left out, counted in ``num_overlong``, their ids listed."""
    columns = eval_set.dataset.select(eval_set.step_rows).select_columns(["id", "category", "step_labels"]).to_dict()
    solutions = []  # (position, solution index, step scores, step labels)
    for position, row_scores in enumerate(step_scores):
        row_labels = columns["step_labels"][position]
        for index, (scores, labels) in enumerate(zip(row_scores, row_labels, strict=True)):
            labels = np.asarray([np.nan if label is None else label for label in labels], dtype=np.float64)
            solutions.append((position, index, np.asarray(scores, dtype=np.float64), labels))
    scored = [not np.isnan(scores).any() for _, _, scores, _ in solutions]
    if not any(scored):
        raise ValueError(f"every solution of {eval_set.name} is longer than max_seq_length={config.max_seq_length}")
    kept = [solution for solution, keep in zip(solutions, scored, strict=True) if keep]
    overall = step_metrics(
        np.concatenate([scores for _, _, scores, _ in kept]), np.concatenate([labels for _, _, _, labels in kept]),
        [columns["category"][position] for position, _, scores, _ in kept for _step in range(len(scores))],
        config.step_threshold,
    )  # fmt: skip
    per_source = overall.pop("per_category")
    metrics: dict[str, Any] = {f"step_{name}" if "f1" in name else name: value for name, value in overall.items()}
    metrics["per_source"] = per_source

    # Each solution's score by every aggregation (vlrm.layout.steps.aggregate_steps, as score_steps aggregates).
    flat = torch.from_numpy(np.concatenate([scores for _, _, scores, _ in kept]).astype(np.float32))
    owner = torch.cat([torch.full((len(scores),), number) for number, (_, _, scores, _) in enumerate(kept)])
    aggregated = {how: aggregate_steps(flat, owner, len(kept), how).numpy() for how in STEP_AGGREGATIONS}
    correct = [is_correct_solution(labels.tolist()) for _, _, _, labels in kept]
    by_row: dict[int, list[int]] = {}  # each row's kept solutions (numbers into ``kept``)
    for number, (position, _, _, _) in enumerate(kept):
        by_row.setdefault(position, []).append(number)
    complete = [numbers for position, numbers in by_row.items() if len(numbers) == len(step_scores[position])]
    metrics["best_of_n_by_aggregation"] = {}
    for how in STEP_AGGREGATIONS:
        result = best_of_n([aggregated[how][numbers] for numbers in complete],
                           [[correct[number] for number in numbers] for numbers in complete])  # fmt: skip
        metrics["best_of_n_by_aggregation"][how] = result["best_of_n"]
        if how == aggregation:
            metrics.update(result)
    selected = {numbers[int(np.argmax(aggregated[aggregation][numbers]))] for numbers in complete if len(numbers) > 1}

    number_of = {(position, index): number for number, (position, index, _, _) in enumerate(kept)}
    per_solution = pd.DataFrame(
        [
            {"id": columns["id"][position], "category": columns["category"][position], "solution": index,
             "num_steps": len(scores), "step_scores": _json_list(scores), "step_labels": _json_list(labels),
             "score": float(aggregated[aggregation][number_of[position, index]]) if keep else None,
             "correct": is_correct_solution(labels.tolist()), "selected": number_of.get((position, index)) in selected}
            for (position, index, scores, labels), keep in zip(solutions, scored, strict=True)
        ]
    )  # fmt: skip
    unscored = [f"{columns['id'][position]} (solution {index})"
                for (position, index, _, _), keep in zip(solutions, scored, strict=True) if not keep]  # fmt: skip
    metrics.update(
        reward_type="process", step_threshold=config.step_threshold, step_aggregation=aggregation,
        num_questions=len(step_scores), num_solutions=len(kept), num_overlong=eval_set.report.num_overlong + len(unscored),
        overlong_ids=(eval_set.report.overlong + unscored)[:20], solutions_per_s=len(solutions) / seconds,
    )  # fmt: skip
    return metrics, per_solution


def evaluate_checkpoint(config: EvalConfig, model_dir: str, checkpoint: Any, eval_sets: list[EvalSet],
                        pairs_dir: Path, ranks: Ranks, previous: RewardScorer | None = None,
                        ) -> tuple[list[dict], RewardScorer | None]:  # fmt: skip
    """Load one checkpoint once and score it on each of ``eval_sets``: one result row per dataset (on rank 0), and
    the scorer, whose base model the next checkpoint may reuse (a sweep over a LoRA run swaps only the adapters and
    the head: ``RewardScorer.from_pretrained(reuse=...)``). A checkpoint that cannot be loaded, on any rank, or a
    dataset it cannot score, becomes an error row; the sweep goes on."""
    model_name = Path(model_dir).as_posix()
    base = {
        "model": model_name, "checkpoint": checkpoint.name, "step": checkpoint.step,
        "model_dir": str(Path(model_dir).resolve()), "checkpoint_path": str(checkpoint.path),
        "max_eval_samples": config.max_eval_samples, **{name: getattr(config, name) for name in RESULT_SETTINGS},
        "weights_mtime": weights_mtime(checkpoint.path),
    }  # fmt: skip
    started, rows, scorer, error = time.perf_counter(), [], None, None
    try:
        scorer = RewardScorer.from_pretrained(
            checkpoint.path, base_model_path=config.base_model_path, dtype=config.dtype,
            attn_implementation=config.attn_implementation, min_pixels=config.min_pixels,
            max_pixels=config.max_pixels, packing=config.packing, max_seq_length=config.max_seq_length,
            reuse=previous, video_settings=config.video_overrides(), **scorer_placement(config, ranks),
        )  # fmt: skip
    except Exception as failure:  # a corrupt or incomplete checkpoint must not end the sweep
        logger.error(
            "%s/%s: %s", model_name, checkpoint.name, failure, exc_info=not isinstance(failure, CheckpointError)
        )
        error = f"{type(failure).__name__}: {failure}"
    load_seconds = time.perf_counter() - started
    errors = [error for error in ranks.all_gather(error) if error is not None]
    if errors:  # on any rank: every rank skips the checkpoint, so none waits for the others' scores
        failure = {"status": "error", "error": errors[0]}
        rows = [
            base
            | failure
            | {
                "dataset": e.name,
                "dataset_path": e.path,
                "dataset_benchmark": e.benchmark,
                "data_mtime": data_mtime(e.path),
            }
            for e in eval_sets
        ]
        return (rows if ranks.main else []), None
    for eval_set in eval_sets:
        row = base | {
            "dataset": eval_set.name,
            "dataset_path": eval_set.path,
            "dataset_benchmark": eval_set.benchmark,
            "data_mtime": data_mtime(eval_set.path),
        }
        desc = f"{checkpoint.name} {eval_set.name}"
        # A process checkpoint on step rows: every step scored (the section above); on other rows it scores each
        # response as an outcome model would (its reward at the last step's end), as does an outcome checkpoint.
        process = scorer.process["reward_type"] == "process" and bool(eval_set.step_rows)
        if process:
            row.update(reward_type="process", step_threshold=config.step_threshold)
            scores, error, seconds = score_steps_on_every_rank(scorer, eval_set, config, ranks, desc)
        else:
            scores, error, seconds = score_on_every_rank(scorer, eval_set, config, ranks, desc)
        if not ranks.main:
            continue
        try:
            if error is not None:
                raise RuntimeError(error)
            if process:
                metrics, pair_scores = step_set_metrics(
                    scores, eval_set, config, scorer.process["step_aggregation"], seconds
                )
            else:
                metrics, pair_scores = eval_set_metrics(scores, eval_set, config, seconds)
        except Exception as failure:
            logger.error("%s/%s on %s: %s", model_name, checkpoint.name, eval_set.name, failure)
            row.update(status="error", error=error or f"{type(failure).__name__}: {failure}")
        else:
            safe_model = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("_")
            tag = eval_set.name + (f"-n{config.max_eval_samples}" if config.max_eval_samples else "")
            pairs_file = pairs_dir / f"{safe_model}__{checkpoint.name}__{tag}.csv"
            write_atomically(pairs_file, lambda tmp, frame=pair_scores: frame.to_csv(tmp, index=False))
            row.update(status="ok", error=None, pairs_file=str(pairs_file), **metrics)
            if process:
                logger.info(
                    "%s/%s on %s: step macro-F1 %s (F1 correct %s, wrong %s; threshold %g), step accuracy %s, "
                    "best-of-N (%s) %s [oracle %s, random %s] on %d questions, %d solutions at %.1f solutions/s",
                    model_name, checkpoint.name, eval_set.name, _number(metrics["step_macro_f1"]),
                    _number(metrics["step_f1_correct"]), _number(metrics["step_f1_wrong"]), config.step_threshold,
                    _number(metrics["step_accuracy"]), metrics["step_aggregation"], _number(metrics["best_of_n"]),
                    _number(metrics["best_of_n_oracle"]), _number(metrics["best_of_n_random"]),
                    metrics["num_best_of_n_questions"], metrics["num_solutions"], metrics["solutions_per_s"],
                )  # fmt: skip
            else:
                logger.info(
                    "%s/%s on %s: accuracy %.4f [%.4f, %.4f], %d ties, macro %s, acc+ %s, %d pairs at %.1f pairs/s",
                    model_name, checkpoint.name, eval_set.name, metrics["accuracy"], metrics["accuracy_ci_low"],
                    metrics["accuracy_ci_high"], metrics["num_ties"], _number(metrics["macro_accuracy"]),
                    _number(metrics["acc_plus"]), metrics["num_pairs"], metrics["pairs_per_s"],
                )  # fmt: skip
                if "position_gap" in metrics:
                    logger.info(
                        "%s/%s on %s (joint): accuracy %s with the preferred response first, %s with it last "
                        "(gap %s); the accuracy above is over both orders", model_name, checkpoint.name,
                        eval_set.name, _number(metrics["accuracy_preferred_first"]),
                        _number(metrics["accuracy_preferred_last"]), _number(metrics["position_gap"]),
                    )  # fmt: skip
        rows.append(row)
    for row in rows:
        row.update(
            wall_time_s=time.perf_counter() - started, load_s=load_seconds,
            evaluated_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )  # fmt: skip
    return rows, scorer


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def summary_table(rows: list[dict]) -> pd.DataFrame:
    """One row per checkpoint, one accuracy column per dataset (and its macro / Acc+ where the dataset has them; a
    process result's step macro-F1 and best-of-N)."""
    frame = pd.DataFrame(
        [
            {"model": row["model"], "checkpoint": row["checkpoint"], "step": row["step"], "dataset": row["dataset"],
             "accuracy": row.get("accuracy"), "macro": row.get("macro_accuracy"), "acc+": row.get("acc_plus"),
             "step macro-F1": row.get("step_macro_f1"), "best-of-N": row.get("best_of_n")}
            for row in rows
        ]
    )  # fmt: skip
    wide = frame.pivot_table(
        index=["model", "checkpoint", "step"], columns="dataset",
        values=["accuracy", "macro", "acc+", "step macro-F1", "best-of-N"], aggfunc="first", sort=False,
    )  # fmt: skip
    wide = wide.dropna(axis=1, how="all")
    wide.columns = [name if metric == "accuracy" else f"{name} {metric}" for metric, name in wide.columns]
    return wide.reset_index()  # rows in the order of ``rows`` (pivot_table keeps it with sort=False)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def reference_lines(rows: list[dict], eval_sets: list[EvalSet]) -> list[str]:
    """Published numbers next to our best checkpoint, for every dataset recognised as a benchmark: overall and macro,
    Acc+ where the benchmark reports it (MM-RLHF-RewardBench), and a line of per-category accuracies where the
    references have them (VideoRewardBench's dimensions)."""
    lines = []
    for eval_set in eval_sets:
        references = REFERENCE_RESULTS.get(eval_set.benchmark or "", [])
        ours = [row for row in rows if row["dataset"] == eval_set.name and row["status"] == "ok"
                and row.get("accuracy") is not None]  # fmt: skip
        if not references or not ours or eval_set.benchmark == VISUAL_PROCESS_BENCH:  # process_reference_lines
            continue
        best = max(ours, key=lambda row: row["accuracy"])
        macro = "" if best.get("macro_accuracy") is None else f", macro {100 * best['macro_accuracy']:.1f}"
        acc_plus = "" if best.get("acc_plus") is None else f", acc+ {100 * best['acc_plus']:.1f}"
        categories = list(dict.fromkeys(name for ref in references for name in ref.get("per_category") or {}))
        lines.append(f"{eval_set.name} ({eval_set.benchmark}), published results (percent):")
        for ref in references:
            plus = f"  acc+ {_percent(ref['acc_plus']):>5}" if "acc_plus" in ref else ""
            lines.append(
                f"  {ref['model']:<24} overall {_percent(ref['overall']):>5}  macro {_percent(ref['macro']):>5}{plus}"
                f"  ({ref['source']})"
            )
            if ref.get("per_category"):
                lines.append("      " + " | ".join(f"{name} {_percent(ref['per_category'].get(name))}"
                                                   for name in categories))  # fmt: skip
        lines.append(
            f"  {'ours: ' + best['model'] + '/' + best['checkpoint']:<24} overall {100 * best['accuracy']:.1f}"
            f"{macro}{acc_plus}"
        )
        if categories:
            per_category = best.get("per_category") or {}
            lines.append("      " + " | ".join(
                f"{name} {_percent(100 * per_category[name]['accuracy'] if name in per_category else None)}"
                for name in categories
            ))  # fmt: skip
    return lines


def process_reference_lines(rows: list[dict], eval_sets: list[EvalSet]) -> list[str]:
    """VisualProcessBench's published macro-F1s (REFERENCE_RESULTS, percent) next to our best process checkpoint on
    each dataset recognised as it: overall (every step pooled, as the paper's Overall) and per source."""
    lines = []
    for eval_set in eval_sets:
        if eval_set.benchmark != VISUAL_PROCESS_BENCH:
            continue
        references = REFERENCE_RESULTS.get(VISUAL_PROCESS_BENCH, [])
        ours = [row for row in rows if row["dataset"] == eval_set.name and row["status"] == "ok"
                and row.get("step_macro_f1") is not None]  # fmt: skip
        if not references or not ours:
            continue
        best = max(ours, key=lambda row: row["step_macro_f1"])
        sources = list(VISUAL_PROCESS_BENCH_SOURCES)
        ours_by_source = {name.lower(): values for name, values in (best.get("per_source") or {}).items()}
        lines.append(f"{eval_set.name} ({VISUAL_PROCESS_BENCH}), step macro-F1 published (percent):")
        lines.append(f"  {'':<24} {'overall':>7}  " + "  ".join(f"{name:>10}" for name in sources))
        for ref in references:
            lines.append(
                f"  {ref['model']:<24} {_percent(ref['overall']):>7}  "
                + "  ".join(f"{_percent(ref['per_category'].get(name)):>10}" for name in sources)
                + f"  ({ref['source']})"
            )
        per_source = [ours_by_source.get(name.lower(), {}).get("macro_f1") for name in sources]
        lines.append(
            f"  {'ours: ' + best['model'] + '/' + best['checkpoint']:<24} {_percent(100 * best['step_macro_f1']):>7}  "
            + "  ".join(f"{_percent(None if value is None else 100 * value):>10}" for value in per_source)
            + f"  (threshold {best['step_threshold']:g}; F1 correct {_percent(100 * best['step_f1_correct'])}, "
            f"wrong {_percent(100 * best['step_f1_wrong'])})"
        )
    return lines


def sweep(config: EvalConfig, config_path: str, log_path: Path, ranks: Ranks = Ranks()) -> int:
    """The whole evaluation, top to bottom; returns the exit code (1 when a checkpoint of this sweep failed)."""
    logger.info("config %s: %s", config_path, config_to_dict(config))
    logger.info(
        "device: %s (CUDA_VISIBLE_DEVICES=%s); %d process%s%s",
        torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        os.environ.get("CUDA_VISIBLE_DEVICES", "unset"), ranks.size, "es" if ranks.size > 1 else "",
        f", each {config.gpus_per_process} GPUs with device_map {config.device_map}" if config.device_map else "",
    )  # fmt: skip
    csv_path = Path(config.results_dir) / config.output_file
    json_path, plot_path = csv_path.with_suffix(".json"), csv_path.with_suffix(".png")
    pairs_dir = csv_path.with_name(f"{csv_path.stem}_pairs")

    # Plan (rank 0, then shared): every (checkpoint, dataset) of the sweep, minus what the results already hold.
    entries = dataset_entries(config)
    results = read_results(json_path) if ranks.main else []
    sweep_keys, todo = ranks.broadcast(plan(config, entries, results) if ranks.main else None)
    if not sweep_keys:
        logger.error("nothing to evaluate in %s", ", ".join(config.model_dirs))
        return 1
    logger.info(
        "%d checkpoints x %d datasets in %d model dirs: %d to evaluate, %d already in %s",
        len(sweep_keys) // len(entries), len(entries), len(config.model_dirs), sum(map(len, todo.values())),
        len(sweep_keys) - sum(map(len, todo.values())), json_path,
    )  # fmt: skip

    # Data: each needed dataset prepared once (token lengths with the first loadable checkpoint's processor), by
    # rank 0 first; the other ranks then load the same cache entry.
    needed = {name for names in todo.values() for name in names}
    encoder = length_encoder([checkpoint for _, checkpoint in todo], config) if todo else None
    if not ranks.main:
        ranks.barrier()
    eval_sets = {name: load_eval_set(config, name, path, encoder) for name, path in entries if name in needed}
    if ranks.main:
        ranks.barrier()

    # Score: each checkpoint loaded once for all its datasets (a LoRA run's base once for all its checkpoints);
    # every output rewritten after every checkpoint.
    scorer = None
    for (model_dir, checkpoint), names in tqdm(
        todo.items(), desc="checkpoints", unit="ckpt", disable=not todo or not ranks.main
    ):
        rows, scorer = evaluate_checkpoint(
            config, model_dir, checkpoint, [eval_sets[name] for name in names], pairs_dir, ranks, scorer
        )
        if ranks.main:
            keys = {result_key(row) for row in rows}
            results = [result for result in results if result_key(result) not in keys] + rows
            write_results(results, config, csv_path, json_path)
    del scorer
    if not ranks.main:
        return ranks.broadcast(None)

    # Report: the table, the published numbers beside ours, the plot.
    in_sweep = set(sweep_keys)
    sweep_rows = sort_rows([row for row in results if result_key(row) in in_sweep])
    table = results_frame(sweep_rows)
    table = table[[column for column in TABLE_COLUMNS if column in table]]
    if "error" in table:
        table["error"] = table["error"].fillna("").astype(str).str.slice(0, 80)
    with pd.option_context("display.width", 250, "display.max_columns", None):
        logger.info("results:\n%s", table.to_string(index=False, float_format="%.4g"))
        if len(entries) > 1:
            logger.info(
                "accuracy by dataset:\n%s", summary_table(sweep_rows).to_string(index=False, float_format="%.4f")
            )
    for line in reference_lines(sweep_rows, list(eval_sets.values())):
        logger.info(line)
    for line in process_reference_lines(sweep_rows, list(eval_sets.values())):
        logger.info(line)
    title = entries[0][0] if len(entries) == 1 else f"{len(entries)} datasets"
    process_rows = [row for row in sweep_rows if row.get("reward_type") == "process"]
    pair_rows = [row for row in sweep_rows if row.get("reward_type") != "process"]
    plots = []
    if pair_rows or not process_rows:
        write_plot(pair_rows, plot_path, title)
        plots.append(plot_path)
    if process_rows:
        plots.append(csv_path.with_name(f"{csv_path.stem}_process.png"))
        write_plot(process_rows, plots[-1], title, PROCESS_PLOT)
    failed = [row for row in sweep_rows if row["status"] == "error"]
    for row in failed:
        logger.error("%s/%s on %s failed: %s", row["model"], row["checkpoint"], row.get("dataset"), row["error"])
    logger.info(
        "results: %s, %s, %s; per-pair (per-solution) scores in %s/; log: %s", csv_path, json_path,
        ", ".join(map(str, plots)), pairs_dir, log_path,
    )  # fmt: skip
    return ranks.broadcast(1 if failed else 0)


def main(argv: list[str]) -> int:
    """``eval_rm.py CONFIG [--key value ...]``: returns the exit code."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ + "\nConfig keys:\n" + HfArgumentParser(EvalConfig).format_help())
        return 0 if argv else 2
    config = load_config(EvalConfig, argv[0], argv[1:])
    ranks = start_ranks(config)
    log_path = Path(config.log_dir) / f"eval_{time.strftime('%Y%m%d_%H%M%S')}.log"
    code = 1
    with run_logging(log_path, ranks.main):
        try:
            code = sweep(config, argv[0], log_path, ranks)
            return code
        except Exception as error:  # the run's log says why it stopped, not only stderr
            logger.error("the evaluation stopped: %s: %s", type(error).__name__, error)
            logger.debug("traceback:\n%s", traceback.format_exc())
            raise
        finally:
            # The process group freed now, its threads joined, not in the interpreter's teardown; if something still
            # holds it, the process ends here (vlrm.train.process_group).
            if finish_process_group():
                exit_now(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
