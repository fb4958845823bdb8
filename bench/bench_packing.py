"""Padded vs packed layout: same random weights, same pairs; a training step and scoring, side by side.

Speed: per mode, one subprocess runs the two layouts step by step in turn on the same micro-batches (on a shared
machine the load changes within seconds; interleaving exposes both layouts to the same load); pairs/s from the median
step. Peak memory: one subprocess per (layout, mode), so that peaks are comparable (CPU: ru_maxrss of the process;
GPU: torch.cuda.max_memory_allocated). Prints a table, then one JSON line.

    python bench/bench_packing.py                      # CPU default: mid-size Qwen2.5-VL, ~1000 visual tokens
    python bench/bench_packing.py --irrelevant 1       # + one irrelevant branch per pair, partners in the batch
    python bench/bench_packing.py --device cuda --attn flash_attention_2 --dtype bfloat16 --preset 3b

Ideal ratio = language-model tokens the padded layout computes / tokens the packed layout computes. The packed
layout also runs each image through the vision tower once instead of once per branch, so the achieved ratio can
exceed it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PAIR_FIELDS = ("num_pairs", "num_irrelevant", "margin")

# Qwen2.5-VL-3B-Instruct's shapes (random weights).
PRESETS = {
    "mid": {
        "text": {"hidden_size": 384, "num_hidden_layers": 4, "num_attention_heads": 6, "num_key_value_heads": 2,
                 "intermediate_size": 1024, "mrope_section": [8, 12, 12]},
        "vision": {"depth": 2, "hidden_size": 128, "num_heads": 2, "intermediate_size": 256,
                   "fullatt_block_indexes": [1]},
    },
    "3b": {
        "text": {"hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
                 "intermediate_size": 11008, "mrope_section": [16, 24, 24]},
        "vision": {"depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420,
                   "fullatt_block_indexes": [7, 15, 23, 31]},
    },
}  # fmt: skip

WORDS = "the shapes are red green blue yellow circle one two three image picture answer question yes no".split()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="mid")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per micro-batch")
    parser.add_argument("--irrelevant", type=int, default=0, help="irrelevant branches per pair, from the same batch")
    parser.add_argument("--visual_tokens", type=int, default=1000, help="merged visual tokens per image (about)")
    parser.add_argument("--images", type=int, default=1, help="images per prompt")
    parser.add_argument("--question_tokens", type=int, default=40)
    parser.add_argument("--min_response_tokens", type=int, default=64)
    parser.add_argument("--max_response_tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (micro-batches) per layout and mode")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--modes", default="train,score")
    parser.add_argument("--layouts", default="padded,packed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"], default="sdpa")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # time|memory, mode, layout(s)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------------
# Model, processor and pairs: all deterministic from the arguments, so every subprocess sees the same ones


def build_processor(args):
    from vlrm.tiny import build_processor as tiny_processor
    from vlrm.tiny import build_tokenizer

    processor = tiny_processor(build_tokenizer())
    # Room for the requested visual tokens (28 x 28 pixels each: patch 14, merge 2).
    processor.image_processor.size = {"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * (args.visual_tokens + 128)}
    return processor


def build_model(args, tokenizer):
    import torch
    from transformers import Qwen2_5_VLConfig

    from vlrm.model import VLRewardModel
    from vlrm.tiny import build_tiny_config

    preset = PRESETS[args.preset]
    config = build_tiny_config(tokenizer).to_dict()  # special token ids, patch/merge sizes; shapes from the preset
    text = dict(
        config["text_config"], **{key: value for key, value in preset["text"].items() if key != "mrope_section"}
    )
    text.pop("layer_types", None)  # recomputed from num_hidden_layers
    text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=preset["text"]["mrope_section"])
    vision = dict(config["vision_config"], **preset["vision"], out_hidden_size=text["hidden_size"])
    text["initializer_range"] = vision["initializer_range"] = 0.02
    config = Qwen2_5_VLConfig(
        **{
            key: config[key]
            for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        },
        text_config=text,
        vision_config=vision,
        initializer_range=0.02,
        attn_implementation=args.attn,
    )
    torch.manual_seed(args.seed)  # the same weights in every subprocess (on the same device)
    with torch.device(args.device):
        model = VLRewardModel._from_config(config, dtype=getattr(torch, args.dtype), attn_implementation=args.attn)
    return model


def token_text(tokenizer, rng, num_tokens: int) -> str:
    """Text of about ``num_tokens`` tokens."""
    words = " ".join(rng.choice(WORDS) for _ in range(num_tokens))
    ids = tokenizer(words, add_special_tokens=False)["input_ids"][:num_tokens]
    return tokenizer.decode(ids)


def build_micro_batches(args, tokenizer) -> list[list[dict]]:
    import random

    import numpy as np
    from PIL import Image

    rng = random.Random(args.seed)
    side = math.isqrt(args.visual_tokens)
    width, height = 28 * math.ceil(args.visual_tokens / side), 28 * side
    batches = []
    for _ in range(args.warmup + args.steps):
        rows = []
        for _ in range(args.pairs):
            images = [
                Image.fromarray(
                    np.random.default_rng(rng.randrange(2**31)).integers(0, 256, (height, width, 3), np.uint8)
                )
                for _ in range(args.images)
            ]
            question = token_text(tokenizer, rng, args.question_tokens)
            content = [{"type": "image", "text": None} for _ in images] + [{"type": "text", "text": question}]
            response_tokens = [rng.randint(args.min_response_tokens, args.max_response_tokens) - 1 for _ in range(2)]
            rows.append(
                {
                    "prompt": [{"role": "user", "content": content}],
                    "images": images,
                    "chosen": token_text(tokenizer, rng, response_tokens[0]),
                    "rejected": token_text(tokenizer, rng, response_tokens[1]),
                }
            )
        for index, row in enumerate(rows):  # partners from the same micro-batch, as the irrelevant sampler draws them
            partners = [rows[(index + 1 + k) % len(rows)] for k in range(args.irrelevant)]
            row["irrelevant"] = [
                {"prompt": other["prompt"], "images": [image.copy() for image in other["images"]]}
                for other in partners
            ]
        batches.append(rows)
    return batches


# ----------------------------------------------------------------------------------------------------------------------
# Workers: timing (both layouts interleaved, one process) and peak memory (one layout per process)


def peak_memory_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def setup(args, mode: str):
    import torch

    from vlrm.batching import PaddedPreferenceCollator, PreferenceEncoder
    from vlrm.packing import PackedPreferenceCollator, enable_packed_attention

    torch.set_num_threads(args.threads)
    processor = build_processor(args)
    encoder = PreferenceEncoder(processor)
    model = build_model(args, processor.tokenizer)
    enable_packed_attention(model)  # the padded layout runs the standard attention on an enabled model
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train(mode == "train")
    collators = {"padded": PaddedPreferenceCollator(encoder), "packed": PackedPreferenceCollator(encoder)}
    return model, collators, build_micro_batches(args, processor.tokenizer)


def make_step(args, model, mode: str):
    import torch
    import torch.nn.functional as F

    from vlrm.batching import split_rewards

    device = torch.device(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6) if mode == "train" else None

    def to_device(batch):
        inputs = {}
        for key, value in batch.items():
            if key in PAIR_FIELDS:
                continue
            if torch.is_tensor(value):
                value = value.to(device, dtype=model.dtype if value.is_floating_point() else None)
            inputs[key] = value
        return inputs

    def step(batch) -> float:
        """Seconds for one step: forward (+ backward + AdamW step when training)."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        inputs = to_device(batch)
        if mode == "score":
            with torch.inference_mode():
                model(**inputs).rewards.float().cpu()
        else:
            rewards = model(**inputs).rewards
            chosen, rejected, irrelevant = split_rewards(rewards, batch["num_pairs"], batch["num_irrelevant"])
            loss = -F.logsigmoid(chosen - rejected).mean()
            if irrelevant.numel():
                loss = loss - F.logsigmoid(chosen[:, None] - irrelevant).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return step


def timing_worker(args, mode: str, layouts: list[str]) -> dict:
    """Both layouts in one process, step by step in turn: on a shared machine the load changes within seconds, and
    interleaving exposes both layouts to the same load."""
    import statistics

    model, collators, micro_batches = setup(args, mode)
    step = make_step(args, model, mode)
    seconds = {layout: [] for layout in layouts}
    tokens = {layout: [0, 0] for layout in layouts}
    for index, rows in enumerate(micro_batches):
        for layout in layouts if index % 2 == 0 else layouts[::-1]:
            batch = collators[layout](rows)
            elapsed = step(batch)
            if index >= args.warmup:
                seconds[layout].append(elapsed)
                tokens[layout][0] += batch["input_ids"].numel()
                tokens[layout][1] += batch["pixel_values"].shape[0] if "pixel_values" in batch else 0
    return {
        layout: {
            "pairs_per_s": args.pairs / statistics.median(seconds[layout]),
            "step_s_median": statistics.median(seconds[layout]),
            "step_s_min": min(seconds[layout]),
            "step_s_all": [round(value, 3) for value in seconds[layout]],
            "lm_tokens": tokens[layout][0] // args.steps,
            "vision_patches": tokens[layout][1] // args.steps,
        }
        for layout in layouts
    }


def memory_worker(args, mode: str, layout: str) -> dict:
    model, collators, micro_batches = setup(args, mode)
    step = make_step(args, model, mode)
    for rows in micro_batches[: args.warmup + 1]:
        step(collators[layout](rows))
    return {"peak_mem_mib": peak_memory_mib(next(model.parameters()).device)}


# ----------------------------------------------------------------------------------------------------------------------
# Driver


def run_worker(argv: list[str], *worker: str, script: str = __file__) -> dict:
    """``script --worker ...`` in a fresh process (its peak RSS is its own); the last stdout line is its JSON."""
    completed = subprocess.run([sys.executable, script, *argv, "--worker", *worker], capture_output=True, text=True)
    if completed.returncode:
        sys.stderr.write(completed.stderr)
        raise SystemExit(f"worker {' '.join(worker)} failed")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        kind, mode, layouts = args.worker
        if kind == "time":
            print(json.dumps(timing_worker(args, mode, layouts.split(","))))
        else:
            print(json.dumps(memory_worker(args, mode, layouts)))
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    layouts, results = args.layouts.split(","), {}
    for mode in args.modes.split(","):
        timings = run_worker(argv, "time", mode, args.layouts)
        for layout in layouts:
            results[(layout, mode)] = dict(timings[layout], **run_worker(argv, "memory", mode, layout))

    header = (
        f"{'mode':<6} {'layout':<7} {'pairs/s':>8} {'step s':>7} {'best s':>7} {'LM tokens':>10} "
        f"{'vision patches':>15} {'peak MiB':>9}"
    )
    print(header)
    print("-" * len(header))
    for (layout, mode), result in results.items():
        print(
            f"{mode:<6} {layout:<7} {result['pairs_per_s']:>8.3f} {result['step_s_median']:>7.2f} "
            f"{result['step_s_min']:>7.2f} {result['lm_tokens']:>10} {result['vision_patches']:>15} "
            f"{result['peak_mem_mib']:>9.0f}"
        )
    summary = {"config": {key: value for key, value in vars(args).items() if key != "worker"}, "results": {}}
    for mode in args.modes.split(","):
        padded, packed = results.get(("padded", mode)), results.get(("packed", mode))
        if not (padded and packed):
            continue
        speedup = packed["pairs_per_s"] / padded["pairs_per_s"]
        best_speedup = padded["step_s_min"] / packed["step_s_min"]
        ideal = padded["lm_tokens"] / packed["lm_tokens"]
        memory = packed["peak_mem_mib"] / padded["peak_mem_mib"]
        summary["results"][mode] = {
            "padded": padded,
            "packed": packed,
            "speedup": round(speedup, 3),
            "speedup_best_steps": round(best_speedup, 3),
            "ideal_lm_token_ratio": round(ideal, 3),
            "achieved_over_ideal": round(speedup / ideal, 3),
            "vision_patch_ratio": round(padded["vision_patches"] / max(packed["vision_patches"], 1), 3),
            "peak_mem_ratio": round(memory, 3),
        }
        print(
            f"{mode}: packed/padded speed {speedup:.2f}x (median steps; best steps {best_speedup:.2f}x), ideal "
            f"(LM tokens) {ideal:.2f}x, achieved/ideal {speedup / ideal:.0%}, peak memory packed/padded {memory:.2f}"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
