"""vlrm's commands, one entry point whatever module holds each:

    python -m vlrm prepare CONFIG [--key value ...]     prepare a training config's data into the cache ahead of a run
    python -m vlrm export CHECKPOINT OUTPUT_DIR         write a copy vLLM's pooling runner serves (--merge: LoRA)
    python -m vlrm synthetic --output_dir DIR           write the demo's synthetic image preference set
    python -m vlrm tiny --output_dir DIR [--family F]   build a tiny offline model of a family

``python -m vlrm COMMAND --help`` lists each command's flags. The training, evaluation and serving scripts are
``train_rm.py``, ``eval_rm.py`` and ``serve_rm.py`` at the top of the repository.
"""

from __future__ import annotations

import argparse
import logging
import sys

COMMANDS = ("prepare", "export", "synthetic", "tiny")


def prepare(argv: list[str]) -> int:
    """``python -m vlrm prepare CONFIG [--key value ...]``: prepare a training config's data into the cache (the same
    cache ``train_rm.py`` reads, under the same key), e.g. before a cluster job."""
    from transformers import AutoConfig, AutoProcessor

    from vlrm.data.prepare import prepare_training_data
    from vlrm.data.videos import VideoSettings
    from vlrm.layout.encoder import PreferenceEncoder, apply_pixel_limits
    from vlrm.train.config import TrainConfig
    from vlrm.train.config_files import load_config

    parser = argparse.ArgumentParser(prog="python -m vlrm prepare", description=prepare.__doc__)
    parser.add_argument("config", help="a training config (YAML/JSON); any --key value after it overrides it")
    arguments, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(TrainConfig, arguments.config, overrides)
    processor = AutoProcessor.from_pretrained(config.model_name_or_path)
    apply_pixel_limits(processor, config.min_pixels, config.max_pixels)
    recorded = getattr(AutoConfig.from_pretrained(config.model_name_or_path), "vlrm_video_sampling", None)
    video_settings = VideoSettings.from_values(recorded, **config.video_overrides())
    train, evaluation = prepare_training_data(config, PreferenceEncoder(processor, video_settings))
    logging.getLogger("vlrm").info(
        "prepared %d training and %d eval pairs", len(train), 0 if evaluation is None else len(evaluation)
    )
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "prepare":
        return prepare(rest)
    if command == "export":
        from vlrm.use.export import main as export_main

        return export_main(rest)
    if command == "synthetic":  # --video: vlrm.data.synthetic_video; --steps: vlrm.data.synthetic_steps
        if "--video" in rest:
            from vlrm.data.synthetic_video import main as synthetic_main
        elif "--steps" in rest:
            from vlrm.data.synthetic_steps import main as synthetic_main
        else:
            from vlrm.data.synthetic import main as synthetic_main
        return synthetic_main([part for part in rest if part not in ("--video", "--steps")]) or 0
    from vlrm.tiny.__main__ import main as tiny_main

    return tiny_main(rest) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
