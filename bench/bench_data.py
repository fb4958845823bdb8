"""Data at scale: preparing image preference sets of N pairs, cold and warm, in bounded memory, on every rank.

    python bench/bench_data.py                          # N = 5,000 and 20,000 (about 3.4 GB of parquet, 7 GB disk)
    python bench/bench_data.py --sizes 2000 --num_proc 2 --work_dir /tmp/bench_data

For each N it writes a parquet set of N pairs, each with one 448 x 448 JPEG as bytes (one row group, as pandas'
`to_parquet` writes it), then measures, each in its own subprocess:

    decode floor   read the file and decode every image once, one process: the least any preparation must do
    cold           vlrm.prepare into an empty cache with --num_proc processes (rows/s, wall, peak RSS of the
                   preparing process and of its largest worker)
    warm           the same call again in a new process: a cache hit (wall, peak RSS)
    torchrun       ./run_distributed.sh --gpus 2 with the tiny model, 5 steps, on an empty cache: each rank's
                   data-preparation time (rank 1 waits for rank 0, then loads) and peak RSS

and prints one table, the growth of each process's peak RSS between the smallest and the largest N as a share of the
largest file, and a last line of JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_set(path: Path, num_pairs: int, image_size: int, distinct: int, seed: int) -> None:
    """``num_pairs`` rows cycling through ``distinct`` JPEGs (decoding costs the same whether or not bytes repeat)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    jpegs = []
    for _ in range(distinct):
        # Smooth noise: JPEGs of a realistic size (about 130-180 KB at 448 px), not flat colour.
        coarse = rng.integers(0, 256, (image_size // 8, image_size // 8, 3), dtype=np.uint8)
        fine = rng.integers(-40, 40, (image_size, image_size, 3))
        pixels = np.clip(np.kron(coarse, np.ones((8, 8, 1))) + fine, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        jpegs.append(buffer.getvalue())
    questions = ["What is shown in the picture?", "Describe the image.", "What colour dominates the image?"]
    chunks = []
    for start in range(0, num_pairs, 1000):
        rows = range(start, min(start + 1000, num_pairs))
        chunks.append(
            pa.table(
                {
                    "id": [f"pair-{i}" for i in rows],
                    "question": [questions[i % 3] for i in rows],
                    "images": [[{"bytes": jpegs[i % distinct], "path": None}] for i in rows],
                    "chosen": [f"A detailed and correct answer about image {i}." for i in rows],
                    "rejected": [f"A wrong answer about image {i + 1}." for i in rows],
                }
            )
        )
    table = pa.concat_tables(chunks)
    pq.write_table(table, path, row_group_size=num_pairs, use_dictionary=False)  # no dedup of repeated images


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: Linux carries that over from the parent across fork and
    exec, so a child of a large process would report the parent's size."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def peak_rss_children_mb() -> float:
    """The largest finished child's peak RSS (forked workers: it includes what they share with this process)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------------------------
# Measurements, each run in a fresh subprocess (`--measure NAME`)


def measure_decode(data: Path, _args) -> dict:
    import pyarrow.parquet as pq
    from PIL import Image

    started = time.perf_counter()
    count = 0
    parquet = pq.ParquetFile(data, buffer_size=1 << 20, pre_buffer=False)
    for batch in parquet.iter_batches(batch_size=64, columns=["images"]):
        for images in batch.column("images").to_pylist():
            for image in images:
                with Image.open(io.BytesIO(image["bytes"])) as opened:
                    opened.load()
            count += 1
    seconds = time.perf_counter() - started
    return {"rows": count, "seconds": seconds, "rows_per_s": count / seconds, "peak_rss_mb": peak_rss_mb()}


def measure_prepare(data: Path, args) -> dict:
    from transformers import AutoProcessor

    from vlrm.data.prepare import DataSettings, prepare_mixture
    from vlrm.layout.encoder import PreferenceEncoder

    encoder = PreferenceEncoder(AutoProcessor.from_pretrained(args.model_dir))
    settings = DataSettings(max_seq_length=4096, num_proc=args.num_proc, cache_dir=args.cache_dir)
    started = time.perf_counter()
    dataset, (report,) = prepare_mixture(str(data), settings, encoder)
    seconds = time.perf_counter() - started
    return {
        "rows": len(dataset),
        "seconds": seconds,
        "rows_per_s": len(dataset) / seconds,
        "cache_hit": bool(report.cache_hits),
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_worker_mb": peak_rss_children_mb(),
    }


MEASURES = {"decode": measure_decode, "prepare": measure_prepare}


def run_measure(name: str, data: Path, args, **extra) -> dict:
    command = [sys.executable, __file__, "--measure", name, "--data", str(data), "--model_dir", str(args.model_dir)]
    command += ["--num_proc", str(args.num_proc)]
    for key, value in extra.items():
        command += [f"--{key}", str(value)]
    finished = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if finished.returncode != 0:
        raise SystemExit(f"{name} on {data} failed:\n{finished.stderr[-4000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def run_torchrun(data: Path, work: Path, args) -> dict:
    """2 CPU processes through run_distributed.sh; each rank logs its data time and its peak memory."""
    config = work / "bench_train.yaml"
    cache = work / "torchrun_cache"
    shutil.rmtree(cache, ignore_errors=True)
    config.write_text(
        f"model_name_or_path: {args.model_dir}\ndataset_path: {data}\noutput_dir: {work / 'torchrun_out'}\n"
        f"log_dir: {work / 'logs'}\ndata_cache_dir: {cache}\ndataset_num_proc: {args.num_proc}\n"
        "max_seq_length: 4096\nmax_steps: 5\nper_device_train_batch_size: 2\nlearning_rate: 1.0e-4\n"
        "logging_steps: 1\nsave_strategy: 'no'\neval_strategy: 'no'\nreport_to: none\nbf16: false\nuse_cpu: true\n"
    )
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHON": sys.executable}
    torchrun = Path(sys.executable).with_name("torchrun")
    if torchrun.exists():
        env["TORCHRUN"] = str(torchrun)
    command = [str(ROOT / "run_distributed.sh"), "--gpus", "2", "--port", str(29600 + os.getpid() % 300)]
    command += ["--log-dir", str(work / "launcher"), "--config", str(config)]
    finished = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    if finished.returncode != 0:
        raise SystemExit(f"torchrun on {data} failed:\n{finished.stdout[-4000:]}")
    ranks = {}
    for rank, seconds in re.findall(r"rank (\d): data ready in ([\d.]+) s", finished.stdout):
        ranks.setdefault(int(rank), {})["data_seconds"] = float(seconds)
    for rank, memory in re.findall(r"rank (\d): peak memory ([\d.]+) GB at the end", finished.stdout):
        ranks.setdefault(int(rank), {})["peak_rss_mb"] = float(memory) * 1024
    if sorted(ranks) != [0, 1]:
        raise SystemExit(f"could not read both ranks' figures from the torchrun output:\n{finished.stdout[-4000:]}")
    return ranks


# ----------------------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000], help="pairs per set")
    parser.add_argument("--num_proc", type=int, default=2, help="preparation processes")
    parser.add_argument("--image_size", type=int, default=448)
    parser.add_argument("--work_dir", default=str(ROOT / ".cache" / "bench_data"))
    parser.add_argument("--model_dir", default=None, help="a model dir (default: the tiny model, built if missing)")
    parser.add_argument("--skip_torchrun", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the data sets and caches afterwards")
    parser.add_argument("--measure", choices=sorted(MEASURES), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", help=argparse.SUPPRESS)
    return parser.parse_args()


def measure_size(size: int, work: Path, args: argparse.Namespace) -> dict:
    """Decode floor, cold and warm preparation (and a torchrun start) on a set of ``size`` pairs."""
    data = work / f"pairs_{size}.parquet"
    if not data.exists():
        started = time.perf_counter()
        write_set(data, size, args.image_size, distinct=256, seed=size)
        print(f"wrote {data} ({data.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - started:.0f} s")
    cache = work / f"cache_{size}"
    shutil.rmtree(cache, ignore_errors=True)
    result = {"pairs": size, "file_mb": data.stat().st_size / 2**20}
    result["decode"] = run_measure("decode", data, args)
    result["cold"] = run_measure("prepare", data, args, cache_dir=cache)
    result["warm"] = run_measure("prepare", data, args, cache_dir=cache)
    assert not result["cold"]["cache_hit"] and result["warm"]["cache_hit"]
    if not args.skip_torchrun:
        result["torchrun"] = run_torchrun(data, work, args)
    print(f"N={size}: done", flush=True)
    if not args.keep:
        shutil.rmtree(cache, ignore_errors=True)
    return result


def print_table(results: dict, args: argparse.Namespace) -> None:
    header = (
        f"{'pairs':>7} {'file MB':>8} {'decode r/s':>10} {'cold r/s':>9} {'cold/floor':>10} {'cold s':>7} "
        f"{'warm s':>7} {'RSS prep':>9} {'RSS worker':>10} {'RSS warm':>9}"
    )
    if not args.skip_torchrun:
        header += f" {'rank0 data s':>12} {'rank1 data s':>12} {'r1/r0':>6} {'RSS r0':>7} {'RSS r1':>7}"
    print(f"\npreparation with num_proc={args.num_proc}; RSS in MB (peak resident memory)\n{header}")
    for size, result in results.items():
        decode, cold, warm = result["decode"], result["cold"], result["warm"]
        result["cold_over_floor"] = cold["rows_per_s"] / decode["rows_per_s"]
        line = (
            f"{size:>7} {result['file_mb']:>8.0f} {decode['rows_per_s']:>10.0f} {cold['rows_per_s']:>9.0f} "
            f"{result['cold_over_floor']:>9.2f}x {cold['seconds']:>7.1f} {warm['seconds']:>7.2f} "
            f"{cold['peak_rss_mb']:>9.0f} {cold['peak_rss_worker_mb']:>10.0f} {warm['peak_rss_mb']:>9.0f}"
        )
        if "torchrun" in result:
            ranks = result["torchrun"]
            result["rank1_over_rank0"] = ranks[1]["data_seconds"] / ranks[0]["data_seconds"]
            line += (
                f" {ranks[0]['data_seconds']:>12.1f} {ranks[1]['data_seconds']:>12.2f} "
                f"{result['rank1_over_rank0']:>6.1%} {ranks[0]['peak_rss_mb']:>7.0f} {ranks[1]['peak_rss_mb']:>7.0f}"
            )
        print(line)


def rss_growth(results: dict) -> dict[str, float]:
    """Peak RSS growth of each process from the smallest set to the largest, printed as a share of the file."""
    small, large = results[min(results)], results[max(results)]
    processes = {
        "preparing process": lambda r: r["cold"]["peak_rss_mb"],
        "largest worker": lambda r: r["cold"]["peak_rss_worker_mb"],
        "warm start": lambda r: r["warm"]["peak_rss_mb"],
    }
    if "torchrun" in small:
        processes["rank 0"] = lambda r: r["torchrun"][0]["peak_rss_mb"]
        processes["rank 1"] = lambda r: r["torchrun"][1]["peak_rss_mb"]
    growth = {name: rss(large) - rss(small) for name, rss in processes.items()}
    print(f"\npeak RSS growth from N={min(results)} to N={max(results)} ({large['file_mb']:.0f} MB file):")
    for name, megabytes in growth.items():
        print(f"  {name:<18} {megabytes:+8.0f} MB = {megabytes / large['file_mb']:+.1%} of the file")
    return growth


def main() -> None:
    args = parse_args()
    if args.measure:
        print(json.dumps(MEASURES[args.measure](Path(args.data), args)))
        return
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.model_dir is None:
        from vlrm.tiny import build_tiny_model_dir

        args.model_dir = work / "tiny-qwen2.5-vl"
        if not (args.model_dir / "config.json").exists():
            build_tiny_model_dir(args.model_dir)
    results = {size: measure_size(size, work, args) for size in args.sizes}
    print_table(results, args)
    if len(results) > 1:
        results["rss_growth_mb"] = rss_growth(results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
