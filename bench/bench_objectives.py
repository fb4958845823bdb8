"""N-way objectives: which head x objective learns an image-dependent ranking, and what N-way training costs per
prompt against the binarised pairs of the same prompts, both in the packed layout.

    python bench/bench_objectives.py                       # both parts, CPU
    python bench/bench_objectives.py --part accuracy --steps 300
    python bench/bench_objectives.py --part cost --prompts 2 --steps 4

**accuracy** trains the tiny Qwen2.5-VL (``python -m vlrm tiny``) from the CLI (``train_rm.py``, one fresh process per
cell, the same seed and number of steps) on the synthetic set of N = 4 answers per image (``ranking_train.jsonl`` of ``python -m vlrm synthetic``:
colour and count questions, ranks with ties, scores, two attribute ratings) and reports the held-out
pairwise accuracy (over every strict pair), top-1 accuracy and Kendall tau-b (per prompt, averaged) that the run's
final evaluation writes to ``eval_results.json``. Heads: ``linear`` (last token), ``mlp`` (2-layer SiLU MLP),
``attention`` (linear head over attention pooling of the response tokens), ``attributes`` (one linear output per rated
attribute, summed). ``bt`` trains on the set's binarised pairs (every strict pair of a row, ties dropped: what a user
had to do before N-way rows, and what ``bt`` refuses to do silently); the other objectives on the N-way rows.

**cost** times training steps (forward, backward, AdamW) of the mid-size random Qwen2.5-VL of ``bench_packing.py``
(~``--visual_tokens`` visual tokens per image, responses of 64-256 tokens) on the same prompts three ways, interleaved
step by step in one process: ``nway`` (``--prompts`` rows of 4 ranked responses per micro-batch, loss ``bt`` over their
6 pairs each), ``grouped`` (the 6 binarised pairs of the same prompts in one micro-batch) and ``spread`` (as many
pairs per micro-batch, each from a different prompt, as a shuffled binarised set gives them). Cost per prompt = the
median step time / prompts covered (a prompt of the spread layout costs 6 pairs). It also checks that N-way is its
pairs: on the first micro-batch (eval mode, float32) each response's reward under the N-way prompt node equals its
rewards in the pairs (max |diff| at most 1e-4) and the N-way ``bt`` loss equals the mean loss of the 6 pairs (relative
1e-4). Prints the tables, then one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

NUM_RESPONSES = 4
PAIRS_PER_PROMPT = NUM_RESPONSES * (NUM_RESPONSES - 1) // 2
REWARD_TOLERANCE = 1e-4  # float32, eval mode: |N-way reward - pair reward|, and the relative loss difference

# The head of each row of the accuracy table: its train_rm.py overrides.
HEADS = {
    "linear": [],
    "mlp": ["--score_head", "mlp"],
    "attention": ["--reward_pooling", "attention"],
    "attributes": ["--reward_attributes", "accuracy", "closeness"],
}
OBJECTIVES = ("bt", "bt_ties", "listwise", "hps", "mse")

BASE_CONFIG = """\
model_name_or_path: {model}
dataset_path: {train}
eval_dataset_path: {eval}
output_dir: {output}
log_dir: {output}/logs
attn_implementation: sdpa
max_seq_length: 512
max_steps: {steps}
per_device_train_batch_size: {batch_size}
per_device_eval_batch_size: 16
learning_rate: {learning_rate}
lr_scheduler_type: cosine
warmup_steps: {warmup}
weight_decay: 0.0
bf16: false
disable_dropout: true
eval_strategy: 'no'
save_strategy: 'no'
logging_steps: {logging_steps}
reward_stats_samples: 0
dataloader_num_workers: 0
seed: {seed}
use_cpu: true
report_to: none
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["accuracy", "cost", "both"], default="both")
    parser.add_argument("--work_dir", default=".cache/bench_objectives", help="tiny model, data and runs")
    accuracy = parser.add_argument_group("accuracy")
    accuracy.add_argument("--heads", default=",".join(HEADS))
    accuracy.add_argument("--objectives", default=",".join(OBJECTIVES))
    accuracy.add_argument("--steps", type=int, default=300, help="training steps of every cell")
    accuracy.add_argument("--batch_size", type=int, default=8, help="rows per step (N-way rows or pairs)")
    accuracy.add_argument("--learning_rate", type=float, default=5e-4)
    accuracy.add_argument("--num_train", type=int, default=600)
    accuracy.add_argument("--num_eval", type=int, default=200)
    cost = parser.add_argument_group("cost")
    cost.add_argument("--prompts", type=int, default=2, help="prompts per N-way (and grouped) micro-batch")
    cost.add_argument("--cost_steps", type=int, default=4, help="timed steps per layout")
    cost.add_argument("--warmup", type=int, default=1)
    cost.add_argument("--visual_tokens", type=int, default=1000)
    cost.add_argument("--question_tokens", type=int, default=40)
    cost.add_argument("--min_response_tokens", type=int, default=64)
    cost.add_argument("--max_response_tokens", type=int, default=256)
    cost.add_argument("--family", default="qwen2_5_vl")
    cost.add_argument("--preset", default="mid")
    cost.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------------
# Accuracy: head x objective, each trained from the CLI


def binarised(source: Path, target: Path) -> Path:
    """Every strict pair of each N-way row of ``source`` as a pair row (ties dropped), in ``target``."""
    with open(source) as file, open(target, "w") as out:
        for line in file:
            row = json.loads(line)
            responses, ranks = row.pop("responses"), row.pop("ranks")
            for key in ("scores", "ratings"):
                row.pop(key, None)
            for first, second in itertools.permutations(range(len(responses)), 2):
                if ranks[first] < ranks[second]:
                    pair = dict(row, id=f"{row['id']}-{first}{second}", group=row["id"])
                    out.write(json.dumps(dict(pair, chosen=responses[first], rejected=responses[second])) + "\n")
    return target


def prepare_accuracy(args, work: Path) -> dict[str, Path]:
    from vlrm.data.synthetic import make_ranking_dataset
    from vlrm.tiny import build_tiny_model_dir

    model = work / "tiny-qwen2.5-vl"
    if not (model / "config.json").is_file():
        build_tiny_model_dir(model)
    data = work / "data"
    train, held_out = make_ranking_dataset(data, args.num_train, args.num_eval, seed=args.seed)
    return {"model": model, "train": train, "pairs": binarised(train, data / "ranking_train_pairs.jsonl"),
            "eval": held_out}  # fmt: skip


def train_cell(args, paths: dict[str, Path], work: Path, head: str, objective: str) -> dict:
    """One cell: a fresh ``train_rm.py`` run; its final held-out metrics (``eval_results.json``) and wall time."""
    output = work / "runs" / f"{head}-{objective}"
    output.mkdir(parents=True, exist_ok=True)
    config = output / "config.yaml"
    config.write_text(
        BASE_CONFIG.format(
            model=paths["model"],
            train=paths["pairs" if objective == "bt" else "train"],
            eval=paths["eval"],
            output=output,
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            warmup=max(1, args.steps // 10),
            logging_steps=max(1, args.steps // 10),
            seed=args.seed,
        )  # fmt: skip
    )
    overrides = ["--loss_type", objective, *HEADS[head]]
    start = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, str(ROOT / "train_rm.py"), str(config), *overrides], capture_output=True, text=True, cwd=ROOT
    )
    seconds = time.perf_counter() - start
    if completed.returncode:
        sys.stderr.write(completed.stderr[-4000:])
        return {"head": head, "objective": objective, "error": completed.stderr.strip().splitlines()[-1]}
    metrics = json.loads((output / "eval_results.json").read_text())
    losses = [entry["loss"] for entry in json.loads((output / "trainer_state.json").read_text())["log_history"]
              if "loss" in entry]  # fmt: skip
    return {
        "head": head,
        "objective": objective,
        "pairwise_accuracy": metrics.get("eval_pairwise_accuracy", metrics.get("eval_accuracy")),
        "top1_accuracy": metrics.get("eval_top1_accuracy"),
        "kendall_tau": metrics.get("eval_kendall_tau"),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "seconds": round(seconds, 1),
    }


def run_accuracy(args, work: Path) -> list[dict]:
    paths = prepare_accuracy(args, work)
    cells = []
    grid = [(head, objective) for head in args.heads.split(",") for objective in args.objectives.split(",")]
    for number, (head, objective) in enumerate(grid, 1):
        cells.append(train_cell(args, paths, work, head, objective))
        cell = cells[-1]
        result = cell.get("error") or f"pairwise {cell['pairwise_accuracy']:.3f}, top-1 {cell['top1_accuracy']:.3f}"
        print(f"[{number}/{len(grid)}] {head} x {objective}: {result}", flush=True)
    print_accuracy(args, cells)
    return cells


def print_accuracy(args, cells: list[dict]) -> None:
    print(f"\nheld-out accuracy after {args.steps} steps of {args.batch_size} rows (N-way rows; bt: binarised pairs)")
    header = f"{'head':<11} {'objective':<9} {'pairwise':>8} {'top-1':>6} {'tau':>6} {'loss first->last':>17} {'s':>5}"
    print(header)
    print("-" * len(header))
    for cell in cells:
        if "error" in cell:
            print(f"{cell['head']:<11} {cell['objective']:<9} failed: {cell['error']}")
            continue
        print(
            f"{cell['head']:<11} {cell['objective']:<9} {cell['pairwise_accuracy']:>8.3f} {cell['top1_accuracy']:>6.3f} "
            f"{cell['kendall_tau']:>6.3f} {cell['first_loss']:>8.3f}->{cell['last_loss']:<8.3f} {cell['seconds']:>5.0f}"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Cost: N-way against its binarised pairs, packed, one process, steps interleaved


def cost_rows(args, tokenizer, count: int) -> list[dict]:
    """``count`` N-way rows: one image of ~``visual_tokens`` merged tokens, a question, 4 ranked responses."""
    import random

    import numpy as np
    from bench_packing import merged_token_pixels, token_text
    from PIL import Image

    rng = random.Random(args.seed)
    side, block = math.isqrt(args.visual_tokens), merged_token_pixels(args.family)
    width, height = block * math.ceil(args.visual_tokens / side), block * side
    rows = []
    for _ in range(count):
        pixels = np.random.default_rng(rng.randrange(2**31)).integers(0, 256, (height, width, 3), np.uint8)
        question = token_text(tokenizer, rng, args.question_tokens)
        responses = [token_text(tokenizer, rng, rng.randint(args.min_response_tokens, args.max_response_tokens) - 1)
                     for _ in range(NUM_RESPONSES)]  # fmt: skip
        rows.append({
            "prompt": [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": question}]}],
            "images": [Image.fromarray(pixels)],
            "responses": responses,
            "ranks": [float(rank) for rank in range(NUM_RESPONSES)],
            "chosen": responses[0],
            "rejected": responses[-1],
        })  # fmt: skip
    return rows


def pairs_of(row: dict) -> list[dict]:
    """The 6 binarised pairs of an N-way row (each its own copy of the prompt and the image)."""
    responses, ranks = row["responses"], row["ranks"]
    return [
        {"prompt": row["prompt"], "images": [image.copy() for image in row["images"]], "chosen": responses[first],
         "rejected": responses[second]}
        for first, second in itertools.permutations(range(len(responses)), 2)
        if ranks[first] < ranks[second]
    ]  # fmt: skip


def cost_worker(args) -> dict:
    import torch
    from bench_packing import build_model, build_processor

    from vlrm.layout.attention import enable_packed_attention
    from vlrm.layout.encoder import PreferenceEncoder
    from vlrm.layout.labels import LABEL_FIELDS
    from vlrm.layout.packed import PackedPreferenceCollator
    from vlrm.train.objectives import Objective, ObjectiveArguments

    torch.set_num_threads(args.threads)
    bench_args = argparse.Namespace(family=args.family, preset=args.preset, attn="sdpa", device="cpu",
                                    dtype="float32", seed=args.seed, visual_tokens=args.visual_tokens)  # fmt: skip
    processor = build_processor(bench_args)
    model = build_model(bench_args, processor.tokenizer)
    enable_packed_attention(model)
    collator = PackedPreferenceCollator(PreferenceEncoder(processor))
    objective = Objective(ObjectiveArguments(loss_type="bt"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    steps = args.warmup + args.cost_steps
    spread_pairs = args.prompts * PAIRS_PER_PROMPT  # pairs per spread micro-batch, each of another prompt
    rows = cost_rows(args, processor.tokenizer, steps * (args.prompts + spread_pairs))
    nway_rows, spread_sources = rows[: steps * args.prompts], rows[steps * args.prompts :]
    batches = {"nway": [], "grouped": [], "spread": []}
    for step in range(steps):
        group = nway_rows[step * args.prompts : (step + 1) * args.prompts]
        batches["nway"].append(group)
        batches["grouped"].append([pair for row in group for pair in pairs_of(row)])
        sources = spread_sources[step * spread_pairs : (step + 1) * spread_pairs]
        batches["spread"].append([pairs_of(row)[step % PAIRS_PER_PROMPT] for row in sources])
    prompts_per_step = {"nway": args.prompts, "grouped": args.prompts, "spread": spread_pairs / PAIRS_PER_PROMPT}

    def inputs_of(batch):
        return {key: value for key, value in batch.items() if key not in LABEL_FIELDS}

    def loss_of(batch, output):
        return objective(output.rewards, batch["num_pairs"], batch["num_irrelevant"], batch.get("margin"),
                         batch.get("reward_labels"))[0]  # fmt: skip

    model.eval()  # N-way is its pairs: the first micro-batch, no dropout
    with torch.inference_mode():
        nway_batch, pairs_batch = collator(batches["nway"][0]), collator(batches["grouped"][0])
        nway_output, pairs_output = model(**inputs_of(nway_batch)), model(**inputs_of(pairs_batch))
        nway_loss, pairs_loss = loss_of(nway_batch, nway_output).item(), loss_of(pairs_batch, pairs_output).item()
        labels, pair_count = nway_batch["reward_labels"], pairs_batch["num_pairs"]
        nway_pairs = torch.stack([nway_output.rewards[labels.better], nway_output.rewards[labels.worse]], -1)
        pair_rewards = pairs_output.rewards.reshape(2, pair_count).T
        # Both enumerate each row's pairs in the same order (better response first, by position).
        reward_difference = (nway_pairs - pair_rewards).abs().max().item()
    model.train()

    seconds, tokens = {name: [] for name in batches}, {name: 0 for name in batches}
    order = list(batches)
    for step in range(steps):
        for name in order if step % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            batch = collator(batches[name][step])
            loss = loss_of(batch, model(**inputs_of(batch)))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= args.warmup:
                seconds[name].append(time.perf_counter() - start)
                tokens[name] += batch["input_ids"].numel()
    return {
        "layouts": {
            name: {
                "step_s_median": statistics.median(seconds[name]),
                "step_s_all": [round(value, 3) for value in seconds[name]],
                "prompts_per_step": prompts_per_step[name],
                "s_per_prompt": statistics.median(seconds[name]) / prompts_per_step[name],
                "lm_tokens_per_prompt": tokens[name] / args.cost_steps / prompts_per_step[name],
            }
            for name in batches
        },
        "nway_is_its_pairs": {
            "reward_max_abs_diff": reward_difference,
            "nway_loss": nway_loss,
            "pairs_loss": pairs_loss,
            "loss_relative_diff": abs(nway_loss - pairs_loss) / abs(pairs_loss),
        },
    }


def run_cost(args, argv: list[str]) -> dict:
    completed = subprocess.run([sys.executable, __file__, *argv, "--worker"], capture_output=True, text=True)
    if completed.returncode:
        sys.stderr.write(completed.stderr)
        raise SystemExit("the cost worker failed")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    layouts, check = result["layouts"], result["nway_is_its_pairs"]
    print(f"\ncost per prompt, packed, training step ({args.preset} {args.family}, ~{args.visual_tokens} visual tokens, "
          f"{NUM_RESPONSES} responses of {args.min_response_tokens}-{args.max_response_tokens} tokens)")  # fmt: skip
    header = (
        f"{'layout':<8} {'prompts/step':>12} {'step s':>7} {'s/prompt':>9} {'LM tokens/prompt':>17} {'vs N-way':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, layout in layouts.items():
        ratio = layout["s_per_prompt"] / layouts["nway"]["s_per_prompt"]
        print(f"{name:<8} {layout['prompts_per_step']:>12.0f} {layout['step_s_median']:>7.2f} "
              f"{layout['s_per_prompt']:>9.2f} {layout['lm_tokens_per_prompt']:>17.0f} {ratio:>8.2f}x")  # fmt: skip
    result["speedup_vs_grouped"] = layouts["grouped"]["s_per_prompt"] / layouts["nway"]["s_per_prompt"]
    result["speedup_vs_spread"] = layouts["spread"]["s_per_prompt"] / layouts["nway"]["s_per_prompt"]
    agree = check["reward_max_abs_diff"] <= REWARD_TOLERANCE and check["loss_relative_diff"] <= REWARD_TOLERANCE
    result["nway_is_its_pairs"]["agree"] = agree
    print(f"N-way {'is' if agree else 'IS NOT'} its pairs: max |reward diff| {check['reward_max_abs_diff']:.2e}, bt loss "
          f"{check['nway_loss']:.6f} vs {check['pairs_loss']:.6f} (tolerance {REWARD_TOLERANCE})")  # fmt: skip
    print(f"N-way per prompt: {result['speedup_vs_grouped']:.2f}x faster than its pairs grouped, "
          f"{result['speedup_vs_spread']:.2f}x than spread (goal >= 2x)")  # fmt: skip
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(cost_worker(args)))
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    work = Path(args.work_dir)
    if not work.is_absolute():
        work = ROOT / work
    work.mkdir(parents=True, exist_ok=True)
    summary = {"config": vars(args)}
    if args.part in ("accuracy", "both"):
        summary["accuracy"] = run_accuracy(args, work)
    if args.part in ("cost", "both"):
        summary["cost"] = run_cost(args, argv)
    print(json.dumps(summary))
    failed = [cell for cell in summary.get("accuracy", []) if "error" in cell]
    if failed or summary.get("cost", {}).get("nway_is_its_pairs", {}).get("agree") is False:
        raise SystemExit("some cells failed or N-way differs from its pairs")


if __name__ == "__main__":
    main()
