# The two commands a new user needs: `make demo` and `make test`. Each creates .venv and installs into it first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TINY_MODEL := .cache/tiny-qwen2.5-vl
SYNTHETIC := .cache/synthetic
SYNTHETIC_VIDEO := .cache/synthetic-video
SYNTHETIC_STEPS := .cache/synthetic-steps

.PHONY: demo demo-video demo-process test lint setup clean

setup: $(STAMP)

# torch and torchvision are pinned to the builds this kind of machine has on disk; pip's own cap allows no newer.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

$(TINY_MODEL)/config.json: vlrm/tiny/qwen.py | $(STAMP)
	$(PY) -m vlrm tiny --output_dir $(TINY_MODEL)

$(SYNTHETIC)/train.jsonl: vlrm/data/synthetic.py | $(STAMP)
	$(PY) -m vlrm synthetic --output_dir $(SYNTHETIC)

# Train on the synthetic set, sweep every checkpoint over the held-out split, then score the final model once more
# with every image blanked: near 0.5 there shows the model learned from the pixels, not from the answer texts.
demo: $(STAMP) $(TINY_MODEL)/config.json $(SYNTHETIC)/train.jsonl
	$(PY) train_rm.py training_configs/tiny_demo.yaml
	$(PY) eval_rm.py training_configs/eval_config_example.yaml
	$(PY) eval_rm.py training_configs/eval_config_example.yaml --checkpoint_pattern final-only \
		--dataset_path $(SYNTHETIC)/eval_blank.jsonl --output_file tiny_demo_blank_images.csv --num_irrelevant_pairs 0

$(SYNTHETIC_VIDEO)/video_train.jsonl: vlrm/data/synthetic_video.py | $(STAMP)
	$(PY) -m vlrm synthetic --video --output_dir $(SYNTHETIC_VIDEO)

# The video demo: 8-frame clips of a square moving left or right, where only the order of the frames decides. Train,
# sweep the checkpoints, then score the final model on the held-out clips and three controls: every frame blanked and
# one frame repeated (no order to read: near 0.5), and the frames reversed (the motion flips: far below 0.5).
demo-video: $(STAMP) $(TINY_MODEL)/config.json $(SYNTHETIC_VIDEO)/video_train.jsonl
	$(PY) train_rm.py training_configs/tiny_video_demo.yaml
	$(PY) eval_rm.py training_configs/eval_config_video_demo.yaml
	$(PY) eval_rm.py training_configs/eval_config_video_demo.yaml --checkpoint_pattern final-only \
		--output_file tiny_video_demo_controls.csv --dataset_path $(SYNTHETIC_VIDEO)/video_eval.jsonl \
		$(SYNTHETIC_VIDEO)/video_eval_blank.jsonl $(SYNTHETIC_VIDEO)/video_eval_frozen.jsonl \
		$(SYNTHETIC_VIDEO)/video_eval_reversed.jsonl

$(SYNTHETIC_STEPS)/steps_train.jsonl: vlrm/data/synthetic_steps.py | $(STAMP)
	$(PY) -m vlrm synthetic --steps --output_dir $(SYNTHETIC_STEPS)

# The process-reward demo: count shapes step by step, one wrong count in half the solutions. Train (a score at every
# step), then sweep the checkpoints: step macro-F1, step accuracy and best-of-4, and the same with the images blanked.
demo-process: $(STAMP) $(TINY_MODEL)/config.json $(SYNTHETIC_STEPS)/steps_train.jsonl
	$(PY) train_rm.py training_configs/tiny_process_demo.yaml
	$(PY) eval_rm.py training_configs/eval_config_process_demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf .cache outputs
