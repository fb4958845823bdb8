"""python -m vlrm tiny [--family F] [--output_dir DIR] [--seed N]: write one tiny model directory."""

from __future__ import annotations

import argparse
import sys

from vlrm.tiny import TINY_FAMILIES, build_tiny_model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlrm tiny", description=__doc__)
    parser.add_argument("--family", choices=TINY_FAMILIES, default="qwen2_5_vl")
    parser.add_argument("--output_dir", default=None, help="default: .cache/tiny-<family>")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_model_dir(args.output_dir or f".cache/tiny-{args.family}", seed=args.seed, family=args.family)
    print(f"tiny {args.family} written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
