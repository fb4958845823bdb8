"""The GPU check: one script, about 10 minutes on one H100 or H200, that measures what only a GPU can show.

    python bench/gpu_check.py                  # on a GPU machine (flash-attn used when installed)
    python bench/gpu_check.py --smoke          # the same code on the CPU with the tiny model (the tests run this)

What it runs, each part through the code users run:

1. **Packed vs padded training and scoring**, Qwen2.5-VL at 3B size (the real widths of Qwen2.5-VL-3B, random
   weights), bf16, ~1,000 visual tokens per image, 4 pairs of 64-256-token responses per micro-batch: with
   flash-attn's varlen kernel (when installed) and with SDPA. ``bench/bench_packing.py`` does the timing (the two
   layouts interleaved in one process) and the peak memory (one process per layout); this script adds the **MFU**:
   model FLOPs of the useful work, ``6 x parameters x tokens`` for a training step and ``2 x`` for scoring (language
   model on the packed layout's tokens, vision tower on each distinct image's patches once), over the step time and
   the GPU's dense bf16 peak. The padded layout computes more than the useful work, so its MFU is lower by what it
   wastes. The two layouts' rewards on the first micro-batch are compared in bf16.
2. **Scoring a model split over devices** (``RewardScorer.from_pretrained(device_map=...)``): over every visible GPU
   when there are several (``balanced``), and on one GPU with part of the model held in CPU memory (``max_memory``),
   so a split is exercised even on a one-GPU machine; rewards compared with the one-device scorer's, time per pair.

Prints a table and, last, one line of JSON. ``--smoke``: the tiny preset on the CPU in float32 (SDPA only; the
split puts layers on disk, as accelerate allows without a GPU), seconds instead of minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# Dense bf16 peak FLOP/s without sparsity (NVIDIA's datasheets): H100 SXM and H200 share the GH100 die's 989.4
# TFLOP/s; H100 PCIe 756; A100 312.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def peak_flops(device_name: str) -> float | None:
    return next((peak for name, peak in PEAK_BF16.items() if name in device_name), None)


def parameter_counts(preset: str) -> tuple[int, int]:
    """(language model + head, vision tower) parameters of the preset, counted on the meta device."""
    import torch
    from bench_packing import build_config

    from vlrm.model.reward_model import VLRewardModel
    from vlrm.tiny.qwen import build_tokenizer

    config = build_config(argparse.Namespace(preset=preset, attn="sdpa", family="qwen2_5_vl"), build_tokenizer())
    with torch.device("meta"):
        model = VLRewardModel._from_config(config)
    vision = sum(parameter.numel() for parameter in model.model.visual.parameters())
    return sum(parameter.numel() for parameter in model.parameters()) - vision, vision


def packing_check(args, attn: str) -> dict:
    """bench_packing.py for one attention kernel; its last line of JSON, with the MFU of each layout and mode."""
    command = [
        sys.executable, str(ROOT / "bench" / "bench_packing.py"), "--preset", args.preset, "--dtype", args.dtype,
        "--device", args.device, "--attn", attn, "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--visual_tokens", str(args.visual_tokens), "--min_response_tokens", str(args.min_response_tokens),
        "--max_response_tokens", str(args.max_response_tokens),
    ]  # fmt: skip
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if finished.returncode:
        return {"attn": attn, "error": finished.stderr[-2000:] or finished.stdout[-2000:]}
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    language, vision = args.parameter_counts
    for mode, summary in result["results"].items():
        useful = summary["packed"]  # the work a reward needs: every prompt and image once
        flops = (6 if mode == "train" else 2) * (language * useful["lm_tokens"] + vision * useful["vision_patches"])
        for layout in ("padded", "packed"):
            timing = summary[layout]
            timing["tflops"] = flops / timing["step_s_median"] / 1e12
            timing["mfu"] = None if args.peak is None else flops / timing["step_s_median"] / args.peak
    result.update(attn=attn, seconds=round(time.perf_counter() - started, 1))
    return result


def split_check(args) -> dict:
    """A random reward model of the preset, saved; scored whole on one device and split over devices."""
    import numpy as np
    import torch
    from bench_packing import build_micro_batches, build_model, build_processor

    from vlrm.tiny.qwen import build_tokenizer
    from vlrm.use.scoring import RewardScorer

    bench_args = argparse.Namespace(
        preset=args.preset, family="qwen2_5_vl", attn="sdpa", dtype=args.dtype, device="cpu", seed=0, pairs=4,
        images=1, irrelevant=0, visual_tokens=args.visual_tokens, question_tokens=40,
        min_response_tokens=args.min_response_tokens, max_response_tokens=args.max_response_tokens, steps=1, warmup=0,
    )  # fmt: skip
    tokenizer = build_tokenizer()
    processor = build_processor(bench_args)
    rows = build_micro_batches(bench_args, tokenizer)[0]
    with tempfile.TemporaryDirectory(dir=args.work_dir) as checkpoint:
        model = build_model(bench_args, tokenizer)
        model.save_pretrained(checkpoint)
        processor.save_pretrained(checkpoint)
        del model
        whole = RewardScorer.from_pretrained(checkpoint, dtype=args.dtype, device=args.device)
        started = time.perf_counter()
        expected = whole.score_pairs(rows, batch_size=len(rows), progress=False)
        whole_seconds = time.perf_counter() - started
        del whole
        gpus = torch.cuda.device_count()
        if gpus > 1:
            how, placement = f"balanced over {gpus} GPUs", {"device_map": "balanced"}
        elif gpus == 1:
            size = sum(path.stat().st_size for path in Path(checkpoint).glob("*.safetensors"))
            how = "GPU 0 holding half the weights, the rest in CPU memory"
            placement = {"device_map": "auto", "max_memory": {0: int(size / 2), "cpu": int(4 * size)}}
        else:
            how = "CPU and disk (layer 1, the norm and the head offloaded)"
            placement = {"device_map": SMOKE_SPLIT, "offload_folder": Path(checkpoint) / "offload"}
        split = RewardScorer.from_pretrained(checkpoint, dtype=args.dtype, **placement)
        devices = sorted({str(device) for device in split.model.hf_device_map.values()})
        started = time.perf_counter()
        got = split.score_pairs(rows, batch_size=len(rows), progress=False)
        split_seconds = time.perf_counter() - started
    difference = float(
        np.nanmax(np.abs(np.concatenate([got.chosen - expected.chosen, got.rejected - expected.rejected])))
    )
    return {
        "how": how, "devices": devices, "pairs": len(rows), "reward_max_abs_diff": difference,
        "whole_s_per_pair": whole_seconds / len(rows), "split_s_per_pair": split_seconds / len(rows),
    }  # fmt: skip


SMOKE_SPLIT = {
    "model.visual": "cpu", "model.language_model.embed_tokens": "cpu", "model.language_model.rotary_emb": "cpu",
    "model.language_model.layers.0": "cpu", "model.language_model.layers.1": "disk",
    "model.language_model.norm": "disk", "score": "disk",
}  # fmt: skip


def print_table(environment: dict, checks: list[dict], split: dict) -> None:
    print(f"device: {environment['device_name']} x {environment['gpus']}, torch {environment['torch']}, "
          f"transformers {environment['transformers']}, flash-attn {environment['flash_attn']}")  # fmt: skip
    header = f"{'attn':<18} {'mode':<6} {'layout':<7} {'pairs/s':>8} {'TFLOP/s':>8} {'MFU':>6} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    for check in checks:
        if "error" in check:
            print(f"{check['attn']:<18} failed: {check['error'].splitlines()[-1] if check['error'] else '?'}")
            continue
        for mode, summary in check["results"].items():
            for layout in ("padded", "packed"):
                timing = summary[layout]
                mfu = "n/a" if timing["mfu"] is None else f"{timing['mfu']:.1%}"
                print(f"{check['attn']:<18} {mode:<6} {layout:<7} {timing['pairs_per_s']:>8.2f} "
                      f"{timing['tflops']:>8.1f} {mfu:>6} {timing['peak_mem_mib']:>9.0f}")  # fmt: skip
            print(
                f"{'':<18} {mode:<6} packed/padded {summary['speedup']:.2f}x, memory {summary['peak_mem_ratio']:.2f}"
            )
        print(f"{'':<18} packed - padded reward, first micro-batch: {check['layouts']['reward_max_abs_diff']:.2e}")
    print(f"split scoring ({split['how']}; {', '.join(split['devices'])}): max reward difference "
          f"{split['reward_max_abs_diff']:.2e}, {split['split_s_per_pair']:.3f} s/pair vs "
          f"{split['whole_s_per_pair']:.3f} on one device")  # fmt: skip


def progress(message: str, started: float) -> None:
    """A line on stderr as each part starts and ends: a run stopped at a time limit still says how far it got."""
    print(f"[gpu_check {time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the tiny model on the CPU, float32, in seconds")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--work_dir", default=None, help="where the split check writes its checkpoint (default /tmp)")
    args = parser.parse_args(argv)
    if args.work_dir is not None:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    import torch
    import transformers

    if args.smoke:
        args.preset, args.dtype, args.device, args.visual_tokens = "tiny", "float32", "cpu", 16
        args.min_response_tokens, args.max_response_tokens, args.warmup = 8, 16, 0
        args.steps = args.steps or 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU visible: run with --smoke on the CPU")
        args.preset, args.dtype, args.device, args.visual_tokens = "3b", "bfloat16", "cuda", 1000
        args.min_response_tokens, args.max_response_tokens, args.warmup = 64, 256, 2
        args.steps = args.steps or 6
    device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    args.peak = peak_flops(device_name)
    args.parameter_counts = parameter_counts(args.preset)
    flash = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    environment = {
        "device_name": device_name, "gpus": torch.cuda.device_count(), "torch": torch.__version__,
        "transformers": transformers.__version__, "flash_attn": flash, "peak_bf16_flops": args.peak,
        "parameters": {"language_and_head": args.parameter_counts[0], "vision": args.parameter_counts[1]},
    }  # fmt: skip
    started = time.perf_counter()
    checks = []
    for attn in (["flash_attention_2"] if flash else []) + ["sdpa"]:
        progress(f"packed vs padded with {attn} (bench_packing.py, {args.preset}, {args.dtype})", started)
        checks.append(packing_check(args, attn))
        progress(f"{attn}: {'failed' if 'error' in checks[-1] else 'done'}", started)
    progress("scoring split over devices", started)
    split = split_check(args)
    progress("split scoring: done", started)
    print_table(environment, checks, split)
    result = {"smoke": args.smoke, "environment": environment, "packing": checks, "split": split,
              "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    print(json.dumps(result))
    failed = any("error" in check for check in checks)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
