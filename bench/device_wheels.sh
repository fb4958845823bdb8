#!/usr/bin/env bash
# The wheels bench/gpu_check.py needs on a lent GPU machine whose image lacks them (Python 3.12, x86-64): its
# transformers (5.17) is older than vlrm's minimum (5.24; the packed layout needs mm_encoder_outputs, from 5.18) and it
# has no qwen-vl-utils.
# Everything else gpu_check.py imports (torch, peft, accelerate, safetensors, tokenizers, huggingface_hub, pillow,
# pandas) is in that image; scoring and the packed layout import no TRL, datasets or DeepSpeed (tests/test_package.py).
#
#   bench/device_wheels.sh          # here, once: writes .whl/ (git-ignored, about 14 MB)
#
# then one device call, carrying .whl (the README's "The GPU check" gives it whole):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 bench/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
# transformers 5.24 is the newest that runs on that image's huggingface_hub 1.x (5.25 needs huggingface_hub 2.4).
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
    "transformers==${VLRM_DEVICE_TRANSFORMERS:-5.24.0}" "qwen-vl-utils==0.0.14"
ls -l .whl
