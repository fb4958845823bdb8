"""Shared fixtures: one tiny offline Qwen2.5-VL (and one model per family, on demand) and one small synthetic preference
set per test session."""

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch
from transformers import AutoProcessor

from vlrm.data.synthetic import make_synthetic_dataset
from vlrm.layout.encoder import PreferenceEncoder
from vlrm.model.reward_model import VLRewardModel
from vlrm.tiny import build_tiny_model_dir


@pytest.fixture(scope="session", autouse=True)
def prepared_data_cache(tmp_path_factory):
    """Prepared data sets go to a fresh cache for the session (subprocesses inherit it), never to ~/.cache."""
    os.environ["VLRM_CACHE_DIR"] = str(tmp_path_factory.mktemp("vlrm_cache"))
    return Path(os.environ["VLRM_CACHE_DIR"]) / "prepared"


@pytest.fixture(scope="session")
def eval_rm():
    """eval_rm.py as a module, so tests call its ``main`` in-process."""
    spec = importlib.util.spec_from_file_location("eval_rm", Path(__file__).resolve().parents[1] / "eval_rm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["eval_rm"] = module  # as an import would: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "tiny-qwen2.5-vl")


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory, tiny_model_dir):
    """``get(family)``: the tiny model of a family (``vlrm.tiny.TINY_FAMILIES``; the session's Qwen2.5-VL is reused),
    built on first use."""
    root, built = tmp_path_factory.mktemp("families"), {"qwen2_5_vl": tiny_model_dir}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_model_dir(root / family, family=family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(output_dir, num_train=48, num_eval=24, seed=0, image_size=56)  # 4 visual tokens: fast tests
    return output_dir


@pytest.fixture(scope="session")
def save_reward_checkpoint(tiny_model_dir, processor):
    """``save(path, seed=0, **config)``: the tiny backbone with a score head drawn from ``seed`` (so checkpoints of
    different seeds score differently), ``config`` values set on its config (e.g. reward_mean), and the processor."""

    def save(path, seed: int = 0, **config):
        model = VLRewardModel.from_pretrained(tiny_model_dir)
        with torch.no_grad():
            model.score.weight.normal_(generator=torch.Generator().manual_seed(seed))
        for name, value in config.items():
            setattr(model.config, name, value)
        model.save_pretrained(path)
        processor.save_pretrained(path)
        return Path(path)

    return save


@pytest.fixture(scope="session")
def processor(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def encoder(processor):
    return PreferenceEncoder(processor)
