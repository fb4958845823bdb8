"""Irrelevant-query augmentation, side by side: the tiny model trained on the synthetic set with and without it,
for the same steps, then both scored on the held-out split for preference accuracy and irrelevant accuracy (the
share of pairs whose chosen response scores higher under its own prompt than under another pair's prompt).

    python bench/bench_irrelevant.py                 # builds .cache/ assets if missing; about 4 minutes on 2 cores
    python bench/bench_irrelevant.py --irrelevant_mode image --train_seed 1 --num_irrelevant_pairs 2

Prints a table, then one JSON line with the figures.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlrm.data.prepare import load_preference_dataset  # noqa: E402
from vlrm.data.synthetic import make_synthetic_dataset  # noqa: E402
from vlrm.metrics import irrelevant_metrics, preference_metrics  # noqa: E402
from vlrm.tiny import build_tiny_model_dir  # noqa: E402
from vlrm.train.irrelevant import RowsWithIrrelevantPrompts  # noqa: E402
from vlrm.use.scoring import RewardScorer  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--config", default=str(ROOT / "training_configs" / "tiny_demo.yaml"))
parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "bench_irrelevant"))
parser.add_argument(
    "--max_steps",
    type=int,
    default=1200,
    help="training steps of both runs (the demo's 750 leave the augmented run's preference accuracy still climbing)",
)
parser.add_argument("--train_seed", type=int, default=None, help="training seed of both runs (default: the config's)")
parser.add_argument("--num_irrelevant_pairs", type=int, default=1)
parser.add_argument("--irrelevant_loss_weight", type=float, default=1.0)
parser.add_argument("--irrelevant_mode", choices=["query", "image"], default="query")
parser.add_argument("--seed", type=int, default=0, help="seed of the held-out irrelevant draws")
args = parser.parse_args()

# ----------------------------------------------------------------------------------------------------------------
# Assets (the demo's) and the two training runs, identical but for the augmentation

tiny_dir, synthetic_dir = ROOT / ".cache" / "tiny-qwen2.5-vl", ROOT / ".cache" / "synthetic"
if not (tiny_dir / "config.json").is_file():
    build_tiny_model_dir(tiny_dir)
if not (synthetic_dir / "train.jsonl").is_file():
    make_synthetic_dataset(synthetic_dir)

runs = {
    "vanilla": [],
    "irrelevant": [
        "--use_irrelevant_queries", "true",
        "--num_irrelevant_pairs", str(args.num_irrelevant_pairs),
        "--irrelevant_loss_weight", str(args.irrelevant_loss_weight),
        "--irrelevant_mode", args.irrelevant_mode,
    ],
}  # fmt: skip
train_seconds = {}
for name, extra in runs.items():
    command = [
        sys.executable, str(ROOT / "train_rm.py"), args.config,
        "--model_name_or_path", str(tiny_dir),
        "--dataset_path", str(synthetic_dir / "train.jsonl"),
        "--eval_dataset_path", str(synthetic_dir / "eval.jsonl"),
        "--output_dir", f"{args.output_dir}/{name}",
        "--save_strategy", "no", "--eval_strategy", "no",
        "--max_steps", str(args.max_steps),
        *(["--seed", str(args.train_seed)] if args.train_seed is not None else []),
        *extra,
    ]  # fmt: skip
    print(f"training {name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    train_seconds[name] = time.perf_counter() - start

# ----------------------------------------------------------------------------------------------------------------
# Held-out scoring: the same pairs and the same irrelevant draws for both models

dataset, _ = load_preference_dataset(synthetic_dir / "eval.jsonl")
rows = RowsWithIrrelevantPrompts(dataset, max(1, args.num_irrelevant_pairs), args.seed, args.irrelevant_mode, 16)
figures = {}
for name in runs:
    scores = RewardScorer.from_pretrained(f"{args.output_dir}/{name}").score_pairs(rows, batch_size=16)
    figures[name] = {
        "preference_accuracy": preference_metrics(scores.chosen, scores.rejected)["accuracy"],
        **irrelevant_metrics(scores.chosen, scores.irrelevant),
        "train_seconds": train_seconds[name],
    }

header = f"{'model':<12} {'preference accuracy':>20} {'irrelevant accuracy':>20} {'irrelevant margin':>18}"
print(f"\n{header} {'training s':>11}")
for name, values in figures.items():
    print(
        f"{name:<12} {values['preference_accuracy']:>20.3f} {values['irrelevant_accuracy']:>20.3f} "
        f"{values['irrelevant_margin']:>18.3f} {values['train_seconds']:>11.0f}"
    )
difference = figures["irrelevant"]["preference_accuracy"] - figures["vanilla"]["preference_accuracy"]
print(f"preference accuracy difference (irrelevant - vanilla): {difference * 100:+.1f} points; {len(dataset)} pairs")
print(json.dumps({"num_pairs": len(dataset), **{f"{n}_{k}": v for n, fig in figures.items() for k, v in fig.items()}}))
