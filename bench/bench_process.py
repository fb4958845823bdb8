"""Process rewards: every step of a solution scored in one pass, against the K prefixes an outcome reward model needs.

    python bench/bench_process.py                        # CPU default: mid-size Qwen2.5-VL, ~1,000 visual tokens
    python bench/bench_process.py --solutions 4 16 32 --rounds 5 --threads 1
    python bench/bench_process.py --device cuda --dtype bfloat16 --attn flash_attention_2 --preset 3b

Each micro-batch is one question (an image of ``--visual_tokens`` visual tokens, a ``--question_tokens`` question)
with ``--solutions`` solutions of K = ``--steps_per_solution`` steps of ``--min_step_tokens`` to
``--max_step_tokens`` tokens, scored on the mid-size random Qwen2.5-VL of ``bench_packing.py`` in two ways, both in
the packed layout with the question and its image computed once per micro-batch:

- **one pass** (``RewardScorer.score_steps``, ``vlrm.layout.steps``): one branch per solution, a score read at the end
  of every step: S x K scores from S branches.
- **K prefixes** (``RewardScorer.score``, ``pack_responses``): what an outcome reward model needs for the same S x K
  scores, prefix k = steps 1..k joined by the step separator, each scored as its own response (S x K branches under
  the same prompt node, the outcome reward read at the end-of-turn token after step k).

Both paths are timed with their tokenization and image processing, in one process, interleaved round by round (their
order alternates; on a shared machine the load changes within seconds), several ``--solutions`` workloads side by
side; figures from the median round. Ideal ratio = language-model tokens of the K prefixes / tokens of the one pass
(visual tokens counted once on each side): the prompt node is shared, so the ratio stays under (K + 1) / 2 and reaches
it only as the solutions' tokens outweigh the prompt's.

**Agreement.** Prefix K's outcome score and step K's process score read the end-of-turn token after the same text,
so they must agree where the tokens are the same. That is checked first (``PreferenceEncoder.encode_response`` of the
joined text against ``encode_steps``, which tokenizes each step and its separator apart); then, on the first
micro-batch of each workload, step K's reward is compared with prefix K's reward from the timed run (when the
tokens agree) and with prefix K scored from ``encode_steps``' very ids (always): at most 1e-3 in float32, or the run
fails. Steps 1..K-1 are read at their separator in the one pass and at an end-of-turn token as prefixes: different
quantities, not compared.

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_packing  # noqa: E402  (the mid-size random model and its token-sized texts)

GOAL_ONE_PASS_OVER_PREFIXES = 4.0
AGREEMENT_TOLERANCE = 1e-3  # float32; half precision: reported, not enforced
SEPARATOR = "\n\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--solutions", type=int, nargs="+", default=[4, 12], help="solutions per micro-batch (one "
                        "workload each)")  # fmt: skip
    parser.add_argument("--steps_per_solution", type=int, default=8, help="K")
    parser.add_argument("--min_step_tokens", type=int, default=20)
    parser.add_argument("--max_step_tokens", type=int, default=40)
    parser.add_argument("--visual_tokens", type=int, default=1000)
    parser.add_argument("--question_tokens", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="timed micro-batches per workload and path")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--preset", choices=sorted(bench_packing.PRESETS), default="mid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"], default="sdpa")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# The scorer and the micro-batches


def build_scorer(args):
    """A ``RewardScorer`` of bench_packing's random model (seeded: the same weights every run) as a process checkpoint
    would load: reward type, separator and aggregation in its config."""
    import torch

    from vlrm.use.scoring import RewardScorer

    torch.set_num_threads(args.threads)
    options = argparse.Namespace(family="qwen2_5_vl", preset=args.preset, seed=args.seed, device=args.device,
                                 dtype=args.dtype, attn=args.attn, visual_tokens=args.visual_tokens)  # fmt: skip
    processor = bench_packing.build_processor(options)
    model = bench_packing.build_model(options, processor.tokenizer)
    model.config.vlrm_reward_type, model.config.vlrm_step_separator = "process", SEPARATOR
    model.config.vlrm_step_aggregation = "mean"
    return RewardScorer(model, processor, device=args.device, packing=True, max_seq_length=None)


def micro_batches(args, tokenizer, num_solutions: int, rng: random.Random) -> list[dict]:
    """``warmup + rounds`` questions, each an image prompt with ``num_solutions`` solutions of K steps."""
    import math

    import numpy as np
    from PIL import Image

    block = bench_packing.merged_token_pixels("qwen2_5_vl")
    side = math.isqrt(args.visual_tokens)
    width, height = block * math.ceil(args.visual_tokens / side), block * side
    batches = []
    for _ in range(args.warmup + args.rounds):
        pixels = np.random.default_rng(rng.randrange(2**31)).integers(0, 256, (height, width, 3), np.uint8)
        question = bench_packing.token_text(tokenizer, rng, args.question_tokens)
        solutions = [
            [bench_packing.token_text(tokenizer, rng, rng.randint(args.min_step_tokens, args.max_step_tokens)).strip()
             for _ in range(args.steps_per_solution)]
            for _ in range(num_solutions)
        ]  # fmt: skip
        messages = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": question}]}]
        batches.append({"prompt": messages, "image": Image.fromarray(pixels), "solutions": solutions})
    return batches


def process_rows(batch: dict) -> list[dict]:
    return [{"prompt": batch["prompt"], "images": [batch["image"]], "steps": steps} for steps in batch["solutions"]]


def prefix_rows(batch: dict) -> list[dict]:
    """Solution by solution, prefix 1..K: prefix k's reward is at index ``solution * K + k - 1``."""
    return [
        {"prompt": batch["prompt"], "images": [batch["image"]], "response": SEPARATOR.join(steps[:count])}
        for steps in batch["solutions"]
        for count in range(1, len(steps) + 1)
    ]


def lm_tokens(encoder, batch: dict) -> tuple[int, int]:
    """(one pass, K prefixes): language-model tokens of each packed micro-batch, the prompt with its visual tokens
    counted once."""
    prompt = encoder.prompt_length(batch["prompt"], [batch["image"]])
    one_pass = prompt + sum(len(encoder.encode_steps(steps)[0]) for steps in batch["solutions"])
    prefixes = prompt + sum(len(encoder.encode_response(row["response"])) for row in prefix_rows(batch))
    return one_pass, prefixes


# ----------------------------------------------------------------------------------------------------------------
# Agreement: step K of the one pass against prefix K


def agreement(scorer, batch: dict, steps_scores, prefix_rewards) -> dict:
    """Whether the joined text tokenizes as the steps do, and |step K reward - prefix K reward| from the timed run
    (when it does) and from the same ids (always)."""
    import numpy as np
    import torch

    from vlrm.layout.packed import pack_responses

    encoder, count = scorer.encoder, len(batch["solutions"][0])
    same_tokens = [
        encoder.encode_response(SEPARATOR.join(steps)) == encoder.encode_steps(steps)[0]
        for steps in batch["solutions"]
    ]
    last_steps = np.array([values[-1] for values in steps_scores.rewards])
    last_prefixes = np.asarray(prefix_rewards)[count - 1 :: count]
    sequences = [(batch["prompt"], [batch["image"]], encoder.encode_steps(steps)[0]) for steps in batch["solutions"]]
    with torch.inference_mode():
        from_ids = scorer._forward(pack_responses(encoder, sequences)).float().cpu().numpy()
    texts = [abs(float(a - b)) for a, b, same in zip(last_steps, last_prefixes, same_tokens, strict=True) if same]
    return {
        "same_tokens": f"{sum(same_tokens)}/{len(same_tokens)}",
        "max_diff_timed": max(texts) if texts else None,
        "max_diff_same_ids": float(np.abs(last_steps - from_ids).max()),
    }


# ----------------------------------------------------------------------------------------------------------------
# Timing, interleaved


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    scorer = build_scorer(args)
    tokenizer, rng = scorer.encoder.tokenizer, random.Random(args.seed)
    workloads = {count: micro_batches(args, tokenizer, count, rng) for count in args.solutions}
    seconds = {count: {"one_pass": [], "prefixes": []} for count in workloads}
    checks = {}
    for round_index in range(args.warmup + args.rounds):
        for count, batches in workloads.items():
            batch = batches[round_index]
            order = ("one_pass", "prefixes") if round_index % 2 == 0 else ("prefixes", "one_pass")
            outputs = {}
            for path in order:
                start = time.perf_counter()
                if path == "one_pass":
                    rows = process_rows(batch)
                    outputs[path] = scorer.score_steps(rows, batch_size=len(rows))
                else:
                    rows = prefix_rows(batch)
                    outputs[path] = scorer.score(rows, batch_size=len(rows))
                if round_index >= args.warmup:
                    seconds[count][path].append(time.perf_counter() - start)
            if round_index == 0:
                checks[count] = agreement(scorer, batch, outputs["one_pass"], outputs["prefixes"])

    results = {}
    for count, batches in workloads.items():
        one_pass, prefixes = (statistics.median(seconds[count][path]) for path in ("one_pass", "prefixes"))
        tokens = lm_tokens(scorer.encoder, batches[0])
        results[count] = {
            "one_pass_s": round(one_pass, 3),
            "prefixes_s": round(prefixes, 3),
            "one_pass_steps_per_s": round(count * args.steps_per_solution / one_pass, 2),
            "prefixes_steps_per_s": round(count * args.steps_per_solution / prefixes, 2),
            "speedup": round(prefixes / one_pass, 2),
            "speedup_best": round(min(seconds[count]["prefixes"]) / min(seconds[count]["one_pass"]), 2),
            "lm_tokens": {"one_pass": tokens[0], "prefixes": tokens[1]},
            "ideal": round(tokens[1] / tokens[0], 2),
        } | checks[count]

    k = args.steps_per_solution
    print(f"\nprocess rewards, {args.preset} Qwen2.5-VL ({args.device}, {args.dtype}, {args.threads} threads), one image "
          f"of ~{args.visual_tokens} visual tokens and a {args.question_tokens}-token question per micro-batch, K = {k} "
          f"steps of {args.min_step_tokens}-{args.max_step_tokens} tokens, median of {args.rounds} rounds")  # fmt: skip
    header = (f"{'solutions':>9} {'path':<11} {'s/micro-batch':>14} {'steps/s':>8} {'LM tokens':>10} {'speed-up':>9} "
              f"{'best':>6} {'ideal':>6}")  # fmt: skip
    print(f"{header}\n{'-' * len(header)}")
    for count, result in results.items():
        print(f"{count:>9} {'one pass':<11} {result['one_pass_s']:>14} {result['one_pass_steps_per_s']:>8} "
              f"{result['lm_tokens']['one_pass']:>10}")  # fmt: skip
        print(f"{'':>9} {f'{k} prefixes':<11} {result['prefixes_s']:>14} {result['prefixes_steps_per_s']:>8} "
              f"{result['lm_tokens']['prefixes']:>10} {result['speedup']:>8}x {result['speedup_best']:>5}x "
              f"{result['ideal']:>5}x")  # fmt: skip
    failures = []
    for count, result in results.items():
        verdict = "meets" if result["speedup"] >= GOAL_ONE_PASS_OVER_PREFIXES else "MISSES"
        timed = result["max_diff_timed"]
        print(f"{count} solutions: one pass {result['speedup']:.2f}x the {k} prefixes ({verdict} the "
              f"{GOAL_ONE_PASS_OVER_PREFIXES}x goal; ideal {result['ideal']:.2f}x, limit {(k + 1) / 2:.1f}x); joined "
              f"text tokenized as the steps: {result['same_tokens']} solutions; |step {k} - prefix {k}| reward: "
              f"{'n/a' if timed is None else f'{timed:.1e}'} (timed run), {result['max_diff_same_ids']:.1e} (same ids)")  # fmt: skip
        worst = max(value for value in (timed, result["max_diff_same_ids"]) if value is not None)
        if args.dtype == "float32" and worst > AGREEMENT_TOLERANCE:
            failures.append(f"{count} solutions: step {k} and prefix {k} differ by {worst:.2e}")
    wall = time.perf_counter() - started
    print(f"wall time {wall:.0f} s")
    config = {key: value for key, value in vars(args).items()}
    print(json.dumps({"config": config, "results": results, "goal": GOAL_ONE_PASS_OVER_PREFIXES,
                      "wall_s": round(wall, 1)}))  # fmt: skip
    if failures:
        raise SystemExit("; ".join(failures))


if __name__ == "__main__":
    main()
