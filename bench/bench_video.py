"""Video at scale: preparation (each clip decoded once, memory flat in the number of clips) and training with video
prompts, packed vs padded.

    python bench/bench_video.py                                # both parts, CPU (about 6 minutes on 2 cores)
    python bench/bench_video.py --part prepare --sizes 500 2000
    python bench/bench_video.py --part train --steps 3

**prepare** writes ``--sizes`` sets of mp4 clips (``--frames`` frames of ``--clip_size`` pixels at ``--clip_fps``, a
shape moving over a textured background, H.264), one preference pair per clip, and prepares each with
``vlrm.data.prepare`` into an empty cache with ``--num_proc`` processes (decode, sample 2 frames a second as
qwen-vl-utils does, resize, store the frames), each size in a fresh process: rows/s, and the peak RSS of the
preparing process and of its largest worker (VmHWM; a worker's includes what it shares with its parent at fork).
Then a warm start of the same set (a cache hit) counts the videos it decodes: it must be 0.

**train** times training steps (forward, backward, AdamW) of the mid-size random Qwen2.5-VL of ``bench_packing.py``
on micro-batches of ``--pairs`` pairs whose prompts hold one ``--frames``-frame clip of ``--train_size`` pixels (4
temporal patches of 256 merged patches: ~1,000 visual tokens) and a 40-token question, responses of 64-256 tokens;
padded and packed interleaved step by step in one process (the same load for both), pairs/s from the median step.
Both layouts score the first micro-batch (eval mode, float32) and must agree to 1e-3.

Prints the tables, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_packing  # noqa: E402  (the mid-size random model, its training step and the subprocess runner)
from bench_data import peak_rss_children_mb, peak_rss_mb  # noqa: E402

GOAL_PACKED_OVER_PADDED = 1.7


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["prepare", "train", "both"], default="both")
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000], help="clips per preparation run")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip (sampled at 2 fps: all of them)")
    parser.add_argument("--clip_fps", type=float, default=2.0)
    parser.add_argument("--clip_size", type=int, nargs=2, default=[224, 224], help="width height of prepared clips")
    parser.add_argument("--num_proc", type=int, default=2)
    parser.add_argument("--work_dir", default="/tmp/bench_video")
    parser.add_argument("--train_size", type=int, default=448, help="side of the training clips' frames")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per micro-batch")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # prepare|warm|train: a worker subprocess
    parser.add_argument("--data", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# Preparation


def write_clips(directory: Path, count: int, args) -> Path:
    """``count`` clips and a jsonl of one pair per clip (paths relative to it); reused when already written."""
    import numpy as np

    from vlrm.data.videos import write_clip

    path = directory / f"clips_{count}.jsonl"
    if path.is_file():
        return path
    (directory / "clips").mkdir(parents=True, exist_ok=True)
    width, height = args.clip_size
    # A smooth background with mild grain, closer to camera footage than noise (which no codec or PNG compresses).
    rng = np.random.default_rng(args.seed)
    ys, xs = np.mgrid[0:height, 0:width]
    smooth = 128 + 60 * np.sin(xs[..., None] / 17.0 + np.arange(3)) * np.cos(ys[..., None] / 23.0)
    texture = np.clip(smooth + rng.normal(0, 4, (height, width, 3)), 0, 255).astype(np.uint8)
    rows = []
    for index in range(count):
        frames = np.repeat(np.roll(texture, index, axis=1)[None], args.frames, axis=0)
        for frame_index, frame in enumerate(frames):
            x = (index * 7 + frame_index * width // args.frames) % (width - 32)
            frame[40:72, x : x + 32] = (index * 37 % 256, 20, 200)
        clip = write_clip(directory / "clips" / f"{index:05d}.mp4", frames, args.clip_fps)
        rows.append({"id": f"clip-{index}", "question": "Which way does the shape move?", "videos": [
            str(clip.relative_to(directory))], "chosen": f"Right, clip {index}.", "rejected": f"Left, clip {index}."})  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _encoder():
    from vlrm.data.videos import VideoSettings
    from vlrm.layout.encoder import PreferenceEncoder
    from vlrm.tiny.qwen import build_processor, build_tokenizer

    # qwen-vl-utils' defaults but the smallest frame area: 224 x 224 frames stay as they are (64 merged patches).
    return PreferenceEncoder(build_processor(build_tokenizer(), "qwen2_5_vl"), VideoSettings(min_pixels=28 * 28))


def measure_prepare(args, warm: bool) -> dict:
    """One preparation (cold: into an empty cache; warm: the same call again), counting decoded videos."""
    from vlrm.data import videos
    from vlrm.data.prepare import DataSettings, prepare_mixture

    decoded = Path(args.work_dir) / f"decoded-{os.getpid()}"
    original = videos._decode

    def counting(*arguments, **keywords):  # runs in forked workers too: each appends to the file
        with open(decoded, "a") as file:
            file.write("1")
        return original(*arguments, **keywords)

    videos._decode = counting
    settings = DataSettings(max_seq_length=8192, num_proc=args.num_proc, cache_dir=str(Path(args.work_dir) / "cache"))
    started = time.perf_counter()
    dataset, (report,) = prepare_mixture(args.data, settings, _encoder())
    seconds = time.perf_counter() - started
    count = len(decoded.read_text()) if decoded.is_file() else 0
    decoded.unlink(missing_ok=True)
    return {
        "rows": len(dataset),
        "seconds": round(seconds, 2),
        "rows_per_s": round(len(dataset) / seconds, 1),
        "cache_hit": bool(report.cache_hits),
        "videos_decoded": count,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_rss_worker_mb": round(peak_rss_children_mb(), 1),
        "frames_per_row": len(dataset[0]["videos"][0]["frames"]),
        "prompt_tokens": dataset[0]["prompt_length"],
    }


def run_measure(args, name: str, data: Path | None = None) -> dict:
    command = [sys.executable, __file__, *sys.argv[1:], "--measure", name]
    if data is not None:
        command += ["--data", str(data)]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode:
        sys.stderr.write(completed.stderr[-5000:])
        raise SystemExit(f"measure {name} failed")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def prepare_part(args) -> dict:
    work = Path(args.work_dir)
    results = {}
    for size in args.sizes:
        data = write_clips(work, size, args)
        shutil.rmtree(work / "cache", ignore_errors=True)
        cold = run_measure(args, "prepare", data)
        warm = run_measure(args, "warm", data)
        results[size] = {"cold": cold, "warm": warm, "file_mb": round(_clips_mb(work, size), 1)}
    header = (f"{'clips':>6} {'clips MB':>9} {'cold rows/s':>12} {'cold s':>7} {'peak RSS MB':>12} "
              f"{'worker MB':>10} {'warm s':>7} {'warm decodes':>13}")  # fmt: skip
    print(f"\npreparation, num_proc={args.num_proc}, {args.frames} frames of {args.clip_size[0]}x{args.clip_size[1]} "
          f"per clip\n{header}\n{'-' * len(header)}")  # fmt: skip
    for size, result in results.items():
        cold, warm = result["cold"], result["warm"]
        print(f"{size:>6} {result['file_mb']:>9} {cold['rows_per_s']:>12} {cold['seconds']:>7} "
              f"{cold['peak_rss_mb']:>12} {cold['peak_rss_worker_mb']:>10} {warm['seconds']:>7} "
              f"{warm['videos_decoded']:>13}")  # fmt: skip
    sizes = sorted(results)
    growth = {
        key: results[sizes[-1]]["cold"][key] - results[sizes[0]]["cold"][key]
        for key in ("peak_rss_mb", "peak_rss_worker_mb")
    }
    print(f"peak RSS growth from {sizes[0]} to {sizes[-1]} clips: preparing process {growth['peak_rss_mb']:+.1f} MB, "
          f"largest worker {growth['peak_rss_worker_mb']:+.1f} MB")  # fmt: skip
    return {"sizes": results, "rss_growth_mb": growth}


def _clips_mb(work: Path, size: int) -> float:
    return sum((work / "clips" / f"{index:05d}.mp4").stat().st_size for index in range(size)) / 1e6


# ----------------------------------------------------------------------------------------------------------------
# Training, packed vs padded


def train_args(args) -> argparse.Namespace:
    """bench_packing's arguments for its mid-size Qwen2.5-VL and training step."""
    return argparse.Namespace(family="qwen2_5_vl", preset="mid", seed=args.seed, device="cpu", dtype="float32",
                              attn="sdpa", visual_tokens=1000, modes="train")  # fmt: skip


def video_micro_batches(args, tokenizer, encoder) -> list[list[dict]]:
    import numpy as np
    from PIL import Image

    rng = random.Random(args.seed)
    batches = []
    for _ in range(args.warmup + args.steps):
        rows = []
        for _ in range(args.pairs):
            noise = np.random.default_rng(rng.randrange(2**31))
            frames = [Image.fromarray(noise.integers(0, 256, (args.train_size, args.train_size, 3), np.uint8))
                      for _ in range(args.frames)]  # fmt: skip
            question = bench_packing.token_text(tokenizer, rng, 40)
            lengths = [rng.randint(64, 256) - 1 for _ in range(2)]
            rows.append({
                "prompt": [{"role": "user", "content": [{"type": "video", "text": None},
                                                        {"type": "text", "text": question}]}],
                "images": [], "videos": [encoder.sample_video(frames)],
                "chosen": bench_packing.token_text(tokenizer, rng, lengths[0]),
                "rejected": bench_packing.token_text(tokenizer, rng, lengths[1]),
            })  # fmt: skip
        batches.append(rows)
    return batches


def measure_train(args) -> dict:
    import torch

    from vlrm.data.videos import VideoSettings
    from vlrm.layout.attention import enable_packed_attention
    from vlrm.layout.encoder import PreferenceEncoder
    from vlrm.layout.packed import PackedPreferenceCollator
    from vlrm.layout.padded import PaddedPreferenceCollator

    torch.set_num_threads(args.threads)
    options = train_args(args)
    processor = bench_packing.build_processor(options)
    side = args.train_size * args.train_size
    encoder = PreferenceEncoder(processor, VideoSettings(min_pixels=side, max_pixels=side, total_pixels=side * 64))
    model = bench_packing.build_model(options, processor.tokenizer)
    enable_packed_attention(model)
    model.train()
    collators = {"padded": PaddedPreferenceCollator(encoder), "packed": PackedPreferenceCollator(encoder)}
    batches = video_micro_batches(args, processor.tokenizer, encoder)
    step = bench_packing.make_step(options, model, "train")
    seconds, tokens = {"padded": [], "packed": []}, {}
    for index, rows in enumerate(batches):
        for layout in ("padded", "packed") if index % 2 == 0 else ("packed", "padded"):
            batch = collators[layout](rows)
            elapsed = step(batch)
            tokens[layout] = (batch["input_ids"].numel(), batch["pixel_values_videos"].shape[0])
            if index >= args.warmup:
                seconds[layout].append(elapsed)
    difference = bench_packing.reward_difference(options, model, collators, batches[0])
    return {
        layout: {
            "pairs_per_s": round(args.pairs / statistics.median(values), 3),
            "step_s_median": round(statistics.median(values), 3),
            "lm_tokens": tokens[layout][0],
            "video_patches": tokens[layout][1],
        }
        for layout, values in seconds.items()
    } | {"reward_max_abs_diff": difference, "visual_tokens_per_clip": tokens["packed"][1] // 4 // args.pairs}


def train_part(args) -> dict:
    result = run_measure(args, "train")
    padded, packed = result["padded"], result["packed"]
    header = f"{'layout':<7} {'pairs/s':>8} {'step s':>7} {'LM tokens':>10} {'video patches':>14}"
    print(f"\ntraining, mid-size Qwen2.5-VL, {args.pairs} pairs a micro-batch, one {args.frames}-frame "
          f"{args.train_size}x{args.train_size} clip a prompt (~{result['visual_tokens_per_clip']} visual tokens)\n"
          f"{header}\n{'-' * len(header)}")  # fmt: skip
    for layout in ("padded", "packed"):
        row = result[layout]
        print(f"{layout:<7} {row['pairs_per_s']:>8} {row['step_s_median']:>7} {row['lm_tokens']:>10} "
              f"{row['video_patches']:>14}")  # fmt: skip
    speedup = packed["pairs_per_s"] / padded["pairs_per_s"]
    verdict = "meets" if speedup >= GOAL_PACKED_OVER_PADDED else "MISSES"
    print(f"packed/padded {speedup:.2f}x ({verdict} the {GOAL_PACKED_OVER_PADDED}x goal); ideal (LM tokens) "
          f"{padded['lm_tokens'] / packed['lm_tokens']:.2f}x; max |packed - padded| reward "
          f"{result['reward_max_abs_diff']:.1e}")  # fmt: skip
    if result["reward_max_abs_diff"] > 1e-3:
        raise SystemExit(f"the layouts disagree by {result['reward_max_abs_diff']:.2e}")
    return result | {"speedup": round(speedup, 3), "goal": GOAL_PACKED_OVER_PADDED}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.measure in ("prepare", "warm"):
        print(json.dumps(measure_prepare(args, warm=args.measure == "warm")))
        return
    if args.measure == "train":
        print(json.dumps(measure_train(args)))
        return
    summary = {"config": {key: value for key, value in vars(args).items() if key not in ("measure", "data")}}
    if args.part in ("prepare", "both"):
        summary["prepare"] = prepare_part(args)
    if args.part in ("train", "both"):
        summary["train"] = train_part(args)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
