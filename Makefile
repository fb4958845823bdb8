# The two commands a new user needs: `make demo` and `make test`. Each creates .venv and installs into it first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TINY_MODEL := .cache/tiny-qwen2.5-vl
SYNTHETIC := .cache/synthetic

.PHONY: demo test lint setup clean

setup: $(STAMP)

# torch and torchvision are pinned to the builds this kind of machine has on disk; pip's own cap allows no newer.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

$(TINY_MODEL)/config.json: vlrm/tiny.py | $(STAMP)
	$(PY) -m vlrm.tiny --output_dir $(TINY_MODEL)

$(SYNTHETIC)/train.jsonl: vlrm/synthetic.py | $(STAMP)
	$(PY) -m vlrm.synthetic --output_dir $(SYNTHETIC)

demo: $(STAMP) $(TINY_MODEL)/config.json $(SYNTHETIC)/train.jsonl
	$(PY) train_rm.py training_configs/tiny_demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf .cache outputs
