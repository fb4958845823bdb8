"""Serve a reward checkpoint over HTTP on this machine: micro-batched, bounded, with JSON errors.

Start it (binds 127.0.0.1:8000 unless --host/--port say otherwise; `python serve_rm.py --help` lists every flag):
    python serve_rm.py outputs/run/checkpoint-200
    python serve_rm.py outputs/tiny_demo --port 8001 --normalize                      # (r - mean) / std by default
    VLRM_API_KEY=secret python serve_rm.py outputs/run --image_root /data/images      # key required, paths allowed
    python serve_rm.py outputs/run --device cuda --dtype bfloat16 --attn_implementation flash_attention_2
    python serve_rm.py outputs/run72b --dtype bfloat16 --device_map auto --max_memory 75GiB   # over every GPU

Call it:
    curl -s localhost:8000/health                                                     # {"status": "ok"}
    curl -s localhost:8000/info                                                       # checkpoint, step, limits
    curl -s localhost:8000/score -H 'Content-Type: application/json' \\
        -d '{"items": [{"prompt": "What is shown?", "images": ["cat.png"], "response": "A cat."}]}'
    curl -s localhost:8000/score -H 'Content-Type: application/json' \\
        -d '{"items": [{"prompt": "What happens?", "videos": ["clips/a.mp4"], "response": "A cat jumps."}]}'
    curl -s localhost:8000/get_reward -H 'Content-Type: application/json' \\
        -d '{"query": ["What is shown? A cat."], "prompts": ["What is shown?"]}'
    # a process checkpoint (reward_type: process): steps, or a response split at its step separator
    curl -s localhost:8000/score -H 'Content-Type: application/json' \\
        -d '{"items": [{"prompt": "How many?", "images": ["a.png"], "steps": ["Two red.", "So two."]}]}'
    # -> {"rewards": [solution score], "steps": [[each step's score]]}
    # a joint checkpoint (scoring_mode: joint): a group's items in one request are judged in one chain
    # -> {"rewards": [...], "joint": [{"chain": 0, "size": 2, "batch": 7}, ...]}: which items were judged together

Images are data: URLs (`data:image/png;base64,...`), raw base64, or paths under --image_root (only then); videos are
data: URLs (`data:video/mp4;base64,...`) or paths under --image_root, sampled with the checkpoint's recorded video
settings; nothing is fetched from a URL. Concurrent requests are merged into micro-batches (--max_batch_size items,
--max_wait_ms); one thread runs the model. Every limit (--max_items, --max_images, --max_pixels_per_image,
--max_body_bytes, --max_seq_length; for videos --max_videos, --max_video_bytes, --max_video_seconds,
--max_video_frames, --max_video_pixels, read from the container's header before a frame is decoded) answers with a
4xx JSON error {"error", "item", "field"}, never with a truncated score.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

import torch
import uvicorn

from vlrm.errors import CheckpointError
from vlrm.model.loading import parse_device_map, parse_max_memory
from vlrm.use.scoring import DEFAULT_MAX_SEQ_LENGTH, RewardScorer
from vlrm.use.server import ServerSettings, create_app, require_reward_stats

logger = logging.getLogger("serve_rm")

# ----------------------------------------------------------------------------------------------------------------
# Arguments: the server's own flags come from ServerSettings (defaults and help live there, once)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "checkpoint", help="Reward checkpoint dir: config.json, weights and a processor (else set --base_model_path)."
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind; 0.0.0.0 exposes the server.")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--base_model_path", default=None, help="Processor source when the checkpoint has none.")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument("--attn_implementation", choices=["sdpa", "eager", "flash_attention_2"], default="sdpa")
    parser.add_argument("--device", default=None, help="Default: cuda when visible, else cpu.")
    parser.add_argument(
        "--device_map", default=None,
        help="Split the model over several GPUs (a model larger than one): auto, balanced, sequential, or a JSON "
        "object {module: device}. Default: the whole model on --device.",
    )  # fmt: skip
    parser.add_argument(
        "--max_memory", default=None,
        help='With --device_map: memory per GPU ("70GiB") or a JSON object ({"0": "70GiB", "cpu": "100GiB"}).',
    )  # fmt: skip
    parser.add_argument("--min_pixels", type=int, default=None, help="Smallest image area after resizing.")
    parser.add_argument("--max_pixels", type=int, default=None, help="Largest image area after resizing.")
    parser.add_argument(
        "--max_seq_length", type=int, default=DEFAULT_MAX_SEQ_LENGTH,
        help="Most tokens of an item (prompt with visual tokens + response); longer gets a 400, never truncation.",
    )  # fmt: skip
    parser.add_argument("--log_level", choices=["debug", "info", "warning", "error"], default="info")
    for setting in dataclasses.fields(ServerSettings):
        flag, help_text = f"--{setting.name}", setting.metadata["help"]
        if setting.default is False:
            parser.add_argument(flag, action="store_true", help=help_text)
        elif setting.name == "api_key":
            parser.add_argument(flag, default=os.environ.get("VLRM_API_KEY"), help=help_text)
        else:
            kind = str if setting.default is None else type(setting.default)
            parser.add_argument(flag, type=kind, default=setting.default, help=f"{help_text} Default: %(default)s.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # ------------------------------------------------------------------------------------------------------------
    # Settings and the checks that need no weights: a mistake stops here, before the model is loaded
    try:
        settings = ServerSettings(
            **{name.name: getattr(args, name.name) for name in dataclasses.fields(ServerSettings)}
        )
        if settings.normalize:
            require_reward_stats(args.checkpoint)
        device_map, max_memory = parse_device_map(args.device_map), parse_max_memory(args.max_memory)
        if max_memory is not None and device_map is None:
            raise ValueError("--max_memory bounds a --device_map: set --device_map auto (or balanced) too")
    except (ValueError, OSError) as error:
        print(f"serve_rm.py: error: {error}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        logger.warning("binding %s without --api_key: anyone who can reach this address can use the model", args.host)

    # ------------------------------------------------------------------------------------------------------------
    # Model
    try:
        scorer = RewardScorer.from_pretrained(
            args.checkpoint, base_model_path=args.base_model_path, dtype=args.dtype,
            attn_implementation=args.attn_implementation, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
            device=args.device, max_seq_length=args.max_seq_length, device_map=device_map, max_memory=max_memory,
        )  # fmt: skip
    except CheckpointError as error:
        print(f"serve_rm.py: error: {error}", file=sys.stderr)
        return 2
    logger.info(
        "loaded %s on %s (%s, torch threads %d)", args.checkpoint, scorer.device, scorer.model.dtype,
        torch.get_num_threads(),
    )  # fmt: skip

    # ------------------------------------------------------------------------------------------------------------
    # App and server (uvicorn stops on SIGINT/SIGTERM: the forward in progress finishes, then the process exits)
    app = create_app(scorer, settings, args.checkpoint)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
