"""Joint scoring (``scoring_mode: joint``): what judging a prompt's responses in one chain costs against independent
scoring, and whether a model trained that way ranks as well.

    python bench/bench_joint.py                              # cost (the default part), CPU, a few minutes
    python bench/bench_joint.py --part cost --groups 2 --steps 6
    python bench/bench_joint.py --part accuracy              # trains two tiny models, ~10 minutes on 2 cores

**cost** scores GRPO-like groups (one image of ~``--visual_tokens`` merged visual tokens, a ``--question_tokens``
question, ``--completions`` completions of 64-256 tokens: a row of N responses, ranks all 0) with the mid-size random
Qwen2.5-VL of ``bench_packing.py`` (eval mode, inference mode, float32) three ways, interleaved step by step in one
process (the order rotated each step, so that the three see the same load on a shared machine): ``joint`` (the
``JointCollator``'s packed chain: the prompt once, then the completions as consecutive assistant turns, each seeing
the ones before it), ``packed`` (independent, the prompt once, each completion its own branch under it) and
``padded`` (independent, one padded row per completion, the image through the vision tower once per completion).
Seconds per group = the median step (collate + forward) / ``--groups``. Peak memory: one subprocess per layout
(VmHWM of the process, and its rise over the resident size after setup). Checks on the first step: the joint chain's
language-model tokens are independent packed's plus the separators (the chat template's text between two assistant
turns), token for token; the joint chain's first completion, which sees only the prompt, gets its independent reward;
the joint packed rewards equal the joint padded chain's (float32: at most 1e-3 apart, or the run fails). Goals (issue
25): joint >= 3x padded in speed, and joint within 1.25x of independent packed's time (the same tokens plus the
separators, but longer attention spans).

**accuracy** trains the tiny Qwen2.5-VL (``python -m vlrm tiny``) on the synthetic N = 4 rankings (``python -m vlrm
synthetic``: ``ranking_train.jsonl``, the ranking depends on the image, with ties) from the CLI (``train_rm.py``, one
fresh process per mode, ``bench_objectives.py``'s base config) with ``scoring_mode: independent`` and ``joint``, the
same steps, seed and objective (``bt_ties``), and reports the held-out pairwise (every strict pair) and top-1 accuracy
that the run's final evaluation writes to ``eval_results.json`` (the joint run evaluates with the joint collator, each
row in one seeded order). Then both checkpoints score the held-out set's binarised pairs (every strict pair of a row,
as pair rows) with ``RewardScorer``: a joint checkpoint scores each pair in both orders and averages them; the
accuracy with the preferred response first, with it last, their gap (position bias) and the averaged accuracy (ties
count as wrong). The joint model's per-pair scores are written to ``runs/joint/pair_scores.jsonl``. Goal: joint
within 2 points of independent pairwise accuracy, or better.

Prints the tables, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_packing  # noqa: E402  (the mid-size random model, its processor, token_text, to_device)
from bench_data import peak_rss_mb  # noqa: E402  (VmHWM: ru_maxrss carries over from the parent)
from bench_objectives import BASE_CONFIG, binarised  # noqa: E402  (the accuracy runs' config, the pair rows)

LAYOUTS = ("joint", "packed", "padded")
GOAL_JOINT_OVER_PADDED = 3.0  # speed, joint / independent padded
GOAL_JOINT_OVER_PACKED = 1.25  # time, joint / independent packed
GOAL_ACCURACY_POINTS = 2.0  # joint pairwise accuracy at most this many points under independent's
REWARD_TOLERANCE = 1e-3  # float32, eval mode (bench_packing.py's)
MODES = ("independent", "joint")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["cost", "accuracy", "both"], default="cost")
    parser.add_argument("--seed", type=int, default=0)
    cost = parser.add_argument_group("cost")
    cost.add_argument("--family", default="qwen2_5_vl", help="a family with the packed layout (bench_packing.py)")
    cost.add_argument("--preset", default="mid")
    cost.add_argument("--groups", type=int, default=1, help="groups (prompts) per step")
    cost.add_argument("--completions", type=int, default=8, help="completions per group")
    cost.add_argument("--visual_tokens", type=int, default=1000, help="merged visual tokens per image (about)")
    cost.add_argument("--question_tokens", type=int, default=40)
    cost.add_argument("--min_response_tokens", type=int, default=64)
    cost.add_argument("--max_response_tokens", type=int, default=256)
    cost.add_argument("--steps", type=int, default=4, help="timed steps per layout")
    cost.add_argument("--warmup", type=int, default=1)
    cost.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    accuracy = parser.add_argument_group("accuracy")
    accuracy.add_argument("--work_dir", default=".cache/bench_joint", help="tiny model, data and runs")
    accuracy.add_argument("--train_steps", type=int, default=300, help="training steps of each mode")
    accuracy.add_argument("--batch_size", type=int, default=8, help="rows (of 4 responses) per step")
    accuracy.add_argument("--learning_rate", type=float, default=5e-4)
    accuracy.add_argument("--loss_type", default="bt_ties", help="the objective of both modes (the set has ties)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)  # time|memory, layout(s)
    args = parser.parse_args(argv)
    if args.family not in bench_packing.FAMILY_PRESETS:
        parser.error(f"--family: one of {', '.join(bench_packing.FAMILY_PRESETS)}")
    if args.completions < 2:
        parser.error("--completions: at least 2 (a chain of one is independent scoring)")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Cost: the same groups scored joint, independent packed and independent padded


def model_args(args) -> argparse.Namespace:
    """bench_packing's arguments for its random model and processor."""
    return argparse.Namespace(family=args.family, preset=args.preset, seed=args.seed, device="cpu", dtype="float32",
                              attn="sdpa", visual_tokens=args.visual_tokens)  # fmt: skip


def build_groups(args, tokenizer) -> list[list[dict]]:
    """Per step, ``--groups`` rows of ``--completions`` responses (ranks all 0, as a GRPO group has no ranking)."""
    import numpy as np
    from PIL import Image

    rng = random.Random(args.seed)
    side, block = math.isqrt(args.visual_tokens), bench_packing.merged_token_pixels(args.family)
    width, height = block * math.ceil(args.visual_tokens / side), block * side
    steps = []
    for _ in range(args.warmup + args.steps):
        rows = []
        for _ in range(args.groups):
            pixels = np.random.default_rng(rng.randrange(2**31)).integers(0, 256, (height, width, 3), np.uint8)
            question = bench_packing.token_text(tokenizer, rng, args.question_tokens)
            responses = [
                bench_packing.token_text(tokenizer, rng, rng.randint(args.min_response_tokens, args.max_response_tokens) - 1)
                for _ in range(args.completions)
            ]  # fmt: skip
            rows.append({
                "prompt": [{"role": "user", "content": [{"type": "image", "text": None},
                                                        {"type": "text", "text": question}]}],
                "images": [Image.fromarray(pixels)],
                "responses": responses,
                "ranks": [0.0] * len(responses),
                "chosen": responses[0],
                "rejected": responses[1],
            })  # fmt: skip
        steps.append(rows)
    return steps


def setup(args):
    import torch

    from vlrm.layout.attention import enable_packed_attention
    from vlrm.layout.encoder import PreferenceEncoder
    from vlrm.layout.joint import JointCollator
    from vlrm.layout.packed import PackedPreferenceCollator
    from vlrm.layout.padded import PaddedPreferenceCollator

    torch.set_num_threads(args.threads)
    options = model_args(args)
    processor = bench_packing.build_processor(options)
    encoder = PreferenceEncoder(processor)
    model = bench_packing.build_model(options, processor.tokenizer)
    enable_packed_attention(model)  # the padded layouts run the standard attention on an enabled model
    model.eval()
    collators = {
        "joint": JointCollator(encoder, packing=True, shuffle=False),  # each group in its own order
        "packed": PackedPreferenceCollator(encoder),
        "padded": PaddedPreferenceCollator(encoder),
    }
    return model, encoder, collators, build_groups(args, processor.tokenizer)


def score(model, batch):
    """Rewards of a collated batch (eval mode, inference mode), in the labels' order."""
    import torch

    from vlrm.layout.labels import LABEL_FIELDS

    inputs = bench_packing.to_device(
        {key: value for key, value in batch.items() if key not in LABEL_FIELDS}, model, "cpu"
    )
    with torch.inference_mode():
        return model(**inputs).rewards.float()


def expected_chain_ids(packed_batch, separator_ids: list[int]) -> list[int]:
    """The joint row as independent packed's tokens predict it: each prompt node's prompt, then its branches (the
    responses in order, each with its end-of-turn token) joined by the separator."""
    ids, layout = packed_batch["input_ids"][0].tolist(), packed_batch["packed_layout"]
    expected = []
    for (prompt_start, prompt_end), spans in zip(layout.prompt_spans, layout.branch_spans, strict=True):
        expected += ids[prompt_start:prompt_end]
        for number, (start, end) in enumerate(spans):
            expected += (separator_ids if number else []) + ids[start:end]
    return expected


def layout_checks(args, model, encoder, collators, rows) -> dict:
    """On one step's groups: the joint tokens are packed's plus the separators; the chain's first completion gets its
    independent reward; joint packed = the joint padded chain."""
    from vlrm.layout.joint import JointCollator

    batches = {layout: collators[layout](rows) for layout in ("joint", "packed")}
    separator_ids = encoder.tokenizer(collators["joint"].separator, add_special_tokens=False)["input_ids"]
    joint_ids = batches["joint"]["input_ids"][0].tolist()
    separators = args.groups * (args.completions - 1) * len(separator_ids)
    joint_rewards, packed_rewards = score(model, batches["joint"]), score(model, batches["packed"])
    padded_chain = score(model, JointCollator(encoder, packing=False, shuffle=False)(rows))
    first = slice(0, args.groups)  # response-major reward order: each group's first completion comes first
    return {
        "separator": collators["joint"].separator,
        "separator_tokens": len(separator_ids),
        "joint_tokens": len(joint_ids),
        "packed_tokens": batches["packed"]["input_ids"].numel(),
        "separator_tokens_in_step": separators,
        "tokens_are_packed_plus_separators": len(joint_ids) == batches["packed"]["input_ids"].numel() + separators
        and joint_ids == expected_chain_ids(batches["packed"], separator_ids),
        "first_completion_max_abs_diff": (joint_rewards[first] - packed_rewards[first]).abs().max().item(),
        "joint_packed_vs_padded_max_abs_diff": (joint_rewards - padded_chain).abs().max().item(),
        "later_completions_mean_abs_diff": (joint_rewards[args.groups :] - packed_rewards[args.groups :])
        .abs()
        .mean()
        .item(),
    }


def timing_worker(args) -> dict:
    """The three layouts in one process, step by step, the order rotated each step (the same load for all three)."""
    model, encoder, collators, steps = setup(args)
    seconds = {layout: [] for layout in LAYOUTS}
    forward_seconds = {layout: [] for layout in LAYOUTS}
    tokens = {layout: [0, 0] for layout in LAYOUTS}
    for index, rows in enumerate(steps):
        shift = index % len(LAYOUTS)
        for layout in LAYOUTS[shift:] + LAYOUTS[:shift]:
            start = time.perf_counter()
            batch = collators[layout](rows)  # collated outside inference mode, as the scorer does
            collated = time.perf_counter()
            score(model, batch)
            end = time.perf_counter()
            if index >= args.warmup:
                seconds[layout].append(end - start)
                forward_seconds[layout].append(end - collated)
                tokens[layout][0] += batch["input_ids"].numel()
                tokens[layout][1] += batch["pixel_values"].shape[0]
    per_group = {
        layout: {
            "s_per_group": statistics.median(seconds[layout]) / args.groups,
            "forward_s_per_group": statistics.median(forward_seconds[layout]) / args.groups,
            "best_s_per_group": min(seconds[layout]) / args.groups,
            "completions_per_s": args.groups * args.completions / statistics.median(seconds[layout]),
            "step_s_all": [round(value, 3) for value in seconds[layout]],
            "lm_tokens_per_group": tokens[layout][0] / args.steps / args.groups,
            "vision_patches_per_group": tokens[layout][1] / args.steps / args.groups,
        }
        for layout in LAYOUTS
    }
    return {
        "layouts": per_group,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "checks": layout_checks(args, model, encoder, collators, steps[0]),
    }


def resident_mb() -> float:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


def memory_worker(args, layout: str) -> dict:
    """One layout's peak: VmHWM after scoring the warm-up steps and one more, and its rise over the resident size
    after setup (the high-water mark reset there where the kernel allows it: ``clear_refs`` 5)."""
    model, _, collators, steps = setup(args)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the rise is over setup's own high-water mark, a lower bound
    before = max(resident_mb(), 0.0)
    for rows in steps[: args.warmup + 1]:
        score(model, collators[layout](rows))
    peak = peak_rss_mb()
    return {"peak_mem_mib": peak, "rise_mib": peak - before}


def run_worker(argv: list[str], *worker: str) -> dict:
    """``bench_joint.py --worker ...`` in a fresh process; the last stdout line is its JSON."""
    command = [sys.executable, __file__, *argv, "--worker", *worker]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode:
        sys.stderr.write(completed.stderr[-5000:])
        raise SystemExit(f"worker {' '.join(worker)} failed")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run_cost(args, argv: list[str]) -> dict:
    started = time.perf_counter()
    timing = run_worker(argv, "time", ",".join(LAYOUTS))
    layouts, checks = timing["layouts"], timing["checks"]
    for layout in LAYOUTS:
        layouts[layout].update(run_worker(argv, "memory", layout))
    print(f"\ncost per group, scoring (eval, inference mode, float32), {args.preset} {args.family} "
          f"({timing['parameters'] / 1e6:.1f}M parameters), {args.groups} group(s) a step of one image "
          f"(~{args.visual_tokens} visual tokens), a {args.question_tokens}-token question and {args.completions} "
          f"completions of {args.min_response_tokens}-{args.max_response_tokens} tokens; {args.steps} steps, "
          f"{args.threads} threads")  # fmt: skip
    header = (f"{'layout':<7} {'s/group':>8} {'fwd s/group':>12} {'best s':>7} {'completions/s':>14} "
              f"{'LM tokens/group':>16} {'vision patches':>15} {'peak MiB':>9} {'rise MiB':>9}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for layout in LAYOUTS:
        row = layouts[layout]
        print(f"{layout:<7} {row['s_per_group']:>8.2f} {row['forward_s_per_group']:>12.2f} "
              f"{row['best_s_per_group']:>7.2f} {row['completions_per_s']:>14.2f} "
              f"{row['lm_tokens_per_group']:>16.0f} {row['vision_patches_per_group']:>15.0f} "
              f"{row['peak_mem_mib']:>9.0f} {row['rise_mib']:>9.0f}")  # fmt: skip
    joint, packed, padded = (layouts[layout] for layout in LAYOUTS)
    ratios = {
        "joint_over_padded_speed": padded["s_per_group"] / joint["s_per_group"],
        "joint_over_packed_time": joint["s_per_group"] / packed["s_per_group"],
        "joint_over_padded_speed_forward": padded["forward_s_per_group"] / joint["forward_s_per_group"],
        "joint_over_packed_time_forward": joint["forward_s_per_group"] / packed["forward_s_per_group"],
        "joint_over_padded_speed_best": padded["best_s_per_group"] / joint["best_s_per_group"],
        "joint_over_packed_time_best": joint["best_s_per_group"] / packed["best_s_per_group"],
        "padded_over_joint_lm_tokens": padded["lm_tokens_per_group"] / joint["lm_tokens_per_group"],
        "joint_over_packed_lm_tokens": joint["lm_tokens_per_group"] / packed["lm_tokens_per_group"],
    }
    goals = {
        "joint_over_padded_speed": ratios["joint_over_padded_speed"] >= GOAL_JOINT_OVER_PADDED,
        "joint_over_packed_time": ratios["joint_over_packed_time"] <= GOAL_JOINT_OVER_PACKED,
    }
    print(f"joint/padded speed {ratios['joint_over_padded_speed']:.2f}x (forward only "
          f"{ratios['joint_over_padded_speed_forward']:.2f}x, best steps {ratios['joint_over_padded_speed_best']:.2f}x; "
          f"LM tokens padded/joint {ratios['padded_over_joint_lm_tokens']:.2f}x): "
          f"{'meets' if goals['joint_over_padded_speed'] else 'MISSES'} the >= {GOAL_JOINT_OVER_PADDED}x goal")  # fmt: skip
    print(f"joint/independent packed time {ratios['joint_over_packed_time']:.2f}x (forward only "
          f"{ratios['joint_over_packed_time_forward']:.2f}x, best steps {ratios['joint_over_packed_time_best']:.2f}x; "
          f"LM tokens {ratios['joint_over_packed_lm_tokens']:.3f}x): "
          f"{'meets' if goals['joint_over_packed_time'] else 'MISSES'} the <= {GOAL_JOINT_OVER_PACKED}x goal")  # fmt: skip
    agree = (
        checks["tokens_are_packed_plus_separators"]
        and checks["first_completion_max_abs_diff"] <= REWARD_TOLERANCE
        and checks["joint_packed_vs_padded_max_abs_diff"] <= REWARD_TOLERANCE
    )
    print(f"tokens: joint {checks['joint_tokens']} = packed {checks['packed_tokens']} + "
          f"{checks['separator_tokens_in_step']} separator tokens ({args.groups} x {args.completions - 1} x "
          f"{checks['separator']!r}, {checks['separator_tokens']} tokens): "
          f"{'yes, token for token' if checks['tokens_are_packed_plus_separators'] else 'NO'}")  # fmt: skip
    print(f"rewards: the chain's first completion vs its independent reward, max |diff| "
          f"{checks['first_completion_max_abs_diff']:.1e}; joint packed vs the padded chain, max |diff| "
          f"{checks['joint_packed_vs_padded_max_abs_diff']:.1e} (tolerance {REWARD_TOLERANCE}); later completions, "
          f"which see the ones before them, differ from independent by {checks['later_completions_mean_abs_diff']:.1e} "
          f"on average")  # fmt: skip
    seconds = time.perf_counter() - started
    print(f"cost part: {seconds:.0f} s")
    return {"layouts": layouts, "ratios": ratios, "goals_met": goals, "checks": checks | {"agree": agree},
            "parameters": timing["parameters"], "seconds": round(seconds, 1)}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Accuracy: independent vs joint, each trained from the CLI, then the joint model's position bias


def prepare_accuracy(work: Path) -> dict[str, Path]:
    """The tiny model and the synthetic rankings, through the CLI (reused when already written)."""
    model, data = work / "tiny-qwen2.5-vl", work / "data"
    if not (model / "config.json").is_file():
        run_cli(["-m", "vlrm", "tiny", "--output_dir", str(model)])
    if not (data / "ranking_eval.jsonl").is_file():
        run_cli(["-m", "vlrm", "synthetic", "--output_dir", str(data)])
    pairs = binarised(data / "ranking_eval.jsonl", data / "ranking_eval_pairs.jsonl")  # images resolve from data/
    return {"model": model, "train": data / "ranking_train.jsonl", "eval": data / "ranking_eval.jsonl",
            "eval_pairs": pairs}  # fmt: skip


def run_cli(arguments: list[str]) -> None:
    completed = subprocess.run([sys.executable, *arguments], capture_output=True, text=True, cwd=ROOT)
    if completed.returncode:
        sys.stderr.write(completed.stderr[-4000:])
        raise SystemExit(f"{' '.join(arguments)} failed")


def train_mode(args, paths: dict[str, Path], work: Path, mode: str) -> dict:
    """A fresh ``train_rm.py`` run of one scoring mode; its final held-out metrics and wall time."""
    output = work / "runs" / mode
    output.mkdir(parents=True, exist_ok=True)
    config = output / "config.yaml"
    config.write_text(
        BASE_CONFIG.format(
            model=paths["model"],
            train=paths["train"],
            eval=paths["eval"],
            output=output,
            steps=args.train_steps,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            warmup=max(1, args.train_steps // 10),
            logging_steps=max(1, args.train_steps // 10),
            seed=args.seed,
        )  # fmt: skip
    )
    overrides = ["--loss_type", args.loss_type, "--scoring_mode", mode]
    start = time.perf_counter()
    completed = subprocess.run([sys.executable, str(ROOT / "train_rm.py"), str(config), *overrides],
                               capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    seconds = time.perf_counter() - start
    if completed.returncode:
        sys.stderr.write(completed.stderr[-4000:])
        return {"mode": mode, "error": completed.stderr.strip().splitlines()[-1], "seconds": round(seconds, 1)}
    metrics = json.loads((output / "eval_results.json").read_text())
    return {
        "mode": mode,
        "run_dir": str(output),
        "pairwise_accuracy": metrics.get("eval_pairwise_accuracy", metrics.get("eval_accuracy")),
        "top1_accuracy": metrics.get("eval_top1_accuracy"),
        "kendall_tau": metrics.get("eval_kendall_tau"),
        "seconds": round(seconds, 1),
    }


def pair_accuracy(run_dir: str, pairs_path: Path, work: Path) -> dict:
    """The held-out binarised pairs scored by a checkpoint: averaged accuracy, and for a joint one the accuracy with
    the preferred response first (order 0) and last (order 1). Ties count as wrong."""
    import numpy as np

    from vlrm.data.prepare import load_preference_dataset
    from vlrm.use.scoring import RewardScorer

    scorer = RewardScorer.from_pretrained(run_dir, dtype="float32", device="cpu")
    dataset, _ = load_preference_dataset(pairs_path, cache_dir=str(work / "cache"))
    scores = scorer.score_pairs(dataset, batch_size=16, progress=False)
    scored = scores.scored
    result = {"pairs": int(scored.sum()), "averaged": float((scores.chosen > scores.rejected)[scored].mean())}
    if scores.order_chosen is not None:
        first, last = (scores.order_chosen[:, k] > scores.order_rejected[:, k] for k in (0, 1))
        result |= {"chosen_first": float(first[scored].mean()), "chosen_last": float(last[scored].mean())}
        result["gap"] = result["chosen_first"] - result["chosen_last"]
        with open(Path(run_dir) / "pair_scores.jsonl", "w") as out:  # one row per pair, then the summary above
            for index in np.flatnonzero(scored):
                out.write(json.dumps({
                    "id": dataset[int(index)]["id"],
                    "chosen_first": [float(scores.order_chosen[index, 0]), float(scores.order_rejected[index, 0])],
                    "chosen_last": [float(scores.order_chosen[index, 1]), float(scores.order_rejected[index, 1])],
                    "chosen": float(scores.chosen[index]), "rejected": float(scores.rejected[index]),
                }) + "\n")  # fmt: skip
    return result


def run_accuracy(args) -> dict:
    started = time.perf_counter()
    work = Path(args.work_dir)
    work = work if work.is_absolute() else ROOT / work
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare_accuracy(work)
    cells = {}
    for mode in MODES:
        cells[mode] = train_mode(args, paths, work, mode)
        cell = cells[mode]
        if "error" in cell:
            print(f"{mode}: failed: {cell['error']}", flush=True)
            continue
        cell["binarised_pairs"] = pair_accuracy(cell["run_dir"], paths["eval_pairs"], work)
        print(f"{mode}: pairwise {cell['pairwise_accuracy']:.3f}, top-1 {cell['top1_accuracy']:.3f} "
              f"({cell['seconds']:.0f} s)", flush=True)  # fmt: skip
    failed = [mode for mode, cell in cells.items() if "error" in cell]
    if failed:
        return {"cells": cells, "failed": failed}
    print(f"\nheld-out accuracy after {args.train_steps} steps of {args.batch_size} rows of 4 responses, "
          f"{args.loss_type}, lr {args.learning_rate}, seed {args.seed} (eval_results.json: every strict pair of "
          f"each row; binarised pairs: the same pairs as pair rows, a joint model's chain of two in both orders)")  # fmt: skip
    header = (f"{'mode':<12} {'pairwise':>8} {'top-1':>6} {'tau':>6} {'pairs avg':>10} {'chosen 1st':>11} "
              f"{'chosen last':>12} {'gap':>6} {'train s':>8}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for mode, cell in cells.items():
        pairs = cell["binarised_pairs"]
        tau = "-" if cell["kendall_tau"] is None else f"{cell['kendall_tau']:.3f}"
        first, last, gap = (
            f"{pairs[key]:.3f}" if key in pairs else "-" for key in ("chosen_first", "chosen_last", "gap")
        )
        print(f"{mode:<12} {cell['pairwise_accuracy']:>8.3f} {cell['top1_accuracy']:>6.3f} {tau:>6} "
              f"{pairs['averaged']:>10.3f} {first:>11} {last:>12} {gap:>6} {cell['seconds']:>8.0f}")  # fmt: skip
    points = 100 * (cells["joint"]["pairwise_accuracy"] - cells["independent"]["pairwise_accuracy"])
    met = points >= -GOAL_ACCURACY_POINTS
    print(f"joint - independent pairwise accuracy: {points:+.1f} points: "
          f"{'meets' if met else 'MISSES'} the goal (within {GOAL_ACCURACY_POINTS:.0f} points or better)")  # fmt: skip
    seconds = time.perf_counter() - started
    print(f"accuracy part: {seconds:.0f} s")
    return {"cells": cells, "joint_minus_independent_points": round(points, 2), "goal_met": met,
            "seconds": round(seconds, 1)}  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        kind, layouts = args.worker
        print(json.dumps(timing_worker(args) if kind == "time" else memory_worker(args, layouts)))
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    summary = {"config": {key: value for key, value in vars(args).items() if key != "worker"},
               "load_average": os.getloadavg()}  # fmt: skip
    if args.part in ("cost", "both"):
        summary["cost"] = run_cost(args, argv)
    if args.part in ("accuracy", "both"):
        summary["accuracy"] = run_accuracy(args)
    print(json.dumps(summary))
    if summary.get("cost", {}).get("checks", {}).get("agree") is False:
        raise SystemExit("the joint chain's tokens or rewards do not match the independent layouts")
    if summary.get("accuracy", {}).get("failed"):
        raise SystemExit(f"training failed: {summary['accuracy']['failed']}")


if __name__ == "__main__":
    main()
