"""Every recipe in training_configs/ loads and validates, so none can rot.

Training configs are validated against TrainConfig, eval configs (``eval_config*``) against EvalConfig, through the
same ``load_config`` the scripts use (unknown keys are errors). This machine has no GPU, so two values are checked as
far as they can be here and then swapped for ones it can run, never dropped:
- ``attn_implementation: flash_attention_2`` must be an allowed choice, and is validated as ``sdpa``;
- ``bf16: true`` is validated with ``use_cpu: true`` (transformers refuses bf16 without a GPU otherwise).
The DeepSpeed config (a file or inline) is filled from the TrainConfig as the Trainer fills it, and must agree.
Nothing is downloaded: model ids are checked by name, and dataset paths such as data/... need not exist.
"""

import dataclasses
import json
import re
import typing
from pathlib import Path

import pytest
import torch
import yaml
from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

import vlrm.train.config as config_module
from vlrm.train.config import TrainConfig
from vlrm.train.config_files import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "training_configs"
CONFIG_FILES = sorted(p for p in CONFIG_DIR.iterdir() if p.suffix in (".yaml", ".yml", ".json"))
TRAIN_FILES = [p for p in CONFIG_FILES if not p.name.startswith("eval_config")]
EVAL_FILES = [p for p in CONFIG_FILES if p.name.startswith("eval_config")]

# The recipes the README lists (and the issue that asked for them).
README_RECIPES = [
    "7b_config", "32b_config", "72b_config",
    "qwen3b_config_balance_vanilla", "qwen3b_config_balance_irrelevant",
    "qwen7b_config_balance_vanilla", "qwen7b_config_balance_irrelevant",
    "mimo7b_config_balance_vanilla", "mimo7b_config_balance_irrelevant",
    "mimo7bRL_config_balance_aug2",
    "eval_config_example", "eval_config_example7b",
    "tiny_demo",
    "qwen2vl7b_config", "qwen3vl8b_config", "qwen3vl30b_a3b_config", "qwen3_5_27b_config", "gemma3_12b_config",
]  # fmt: skip
# One recipe per further model family (vlrm.families): model id, ZeRO stage, packed layout, attention kernel.
FAMILY_RECIPES = {
    "qwen2vl7b_config": ("Qwen/Qwen2-VL-7B-Instruct", 2, True, "flash_attention_2"),
    "qwen3vl8b_config": ("Qwen/Qwen3-VL-8B-Instruct", 2, True, "flash_attention_2"),
    "qwen3vl30b_a3b_config": ("Qwen/Qwen3-VL-30B-A3B-Instruct", 3, True, "flash_attention_2"),
    "qwen3_5_27b_config": ("Qwen/Qwen3.5-27B", 3, True, "flash_attention_2"),
    "gemma3_12b_config": ("google/gemma-3-12b-it", 3, False, "sdpa"),
}
PUBLIC_MODELS = {
    "3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "32b": "Qwen/Qwen2.5-VL-32B-Instruct",
    "72b": "Qwen/Qwen2.5-VL-72B-Instruct",
    "mimo7b": "XiaomiMiMo/MiMo-VL-7B-SFT",
    "mimo7bRL": "XiaomiMiMo/MiMo-VL-7B-RL",
}


def read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())


def check_choices(config_class: type, values: dict) -> None:
    """Every value the file gives a ``Literal[...]`` field is one of its choices (argparse never checks defaults)."""
    hints = typing.get_type_hints(config_class)
    for key, value in values.items():
        choices = typing.get_args(hints.get(key))
        if typing.get_origin(hints.get(key)) is typing.Literal:
            assert value in choices, f"{key}={value!r} is not one of {choices}"


def runnable_here(values: dict) -> list[str]:
    """Overrides for the values only a GPU machine accepts (see the module docstring)."""
    overrides = []
    if values.get("attn_implementation") == "flash_attention_2":
        overrides += ["--attn_implementation", "sdpa"]
    if values.get("bf16") and not torch.cuda.is_available():
        overrides += ["--use_cpu", "true"]
    return overrides


def recipe_size(name: str) -> str:
    for size in ("mimo7bRL", "mimo7b", "qwen3b", "qwen7b", "72b", "32b", "7b"):
        if name.startswith(size):
            return size.removeprefix("qwen")
    raise AssertionError(f"{name}: cannot tell the model size from the name")


def test_every_recipe_the_readme_names_exists():
    names = {path.stem for path in CONFIG_FILES}
    assert not set(README_RECIPES) - names
    readme = ROOT / "README.md"
    if readme.exists():  # and whatever else the README names
        named = set(re.findall(r"training_configs/([\w.-]+)\.(?:yaml|yml|json)", readme.read_text()))
        assert not named - names, f"README.md names configs that do not exist: {sorted(named - names)}"


@pytest.mark.parametrize("path", TRAIN_FILES, ids=lambda path: path.name)
def test_training_config_validates(path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(ROOT)  # paths in the recipes (zero3.json, .cache/...) are relative to the repository
    values = read(path)
    check_choices(TrainConfig, values)
    overrides = runnable_here(values)
    if path.stem.startswith(
        "tiny_"
    ):  # CPU demos: their model is built by `make demo*`, which a fresh clone has not run
        overrides += ["--model_name_or_path", str(tiny_model_dir)]
    try:
        config = load_config(TrainConfig, path, overrides)
        if config.deepspeed:
            # Fill the "auto" values as the Trainer does; a hand-set value that disagrees with the YAML is a mismatch.
            deepspeed_config = HfTrainerDeepSpeedConfig(config.deepspeed)
            deepspeed_config.trainer_config_process(config)
            assert not deepspeed_config.mismatches, deepspeed_config.mismatches
            stage = deepspeed_config.config["zero_optimization"]["stage"]
    finally:
        unset_hf_deepspeed_config()  # ZeRO-3 must not stay switched on for the rest of the test session
    if path.stem.startswith("tiny_"):
        assert not config.deepspeed and config.use_cpu and not config.bf16
        return

    assert config.deepspeed, f"{path.name}: real models train with DeepSpeed (zero2.json / zero3.json)"
    assert values["bf16"] is True and config.gradient_checkpointing and config.eval_dataset_path
    if path.stem in FAMILY_RECIPES:
        model, zero_stage, packing, attention = FAMILY_RECIPES[path.stem]
        assert (config.model_name_or_path, stage, config.packing) == (model, zero_stage, packing)
        assert values["attn_implementation"] == attention and config.freeze_vit
        return
    size = recipe_size(path.stem)
    assert config.model_name_or_path == PUBLIC_MODELS[size]
    assert values["bf16"] is True and values["attn_implementation"] == "flash_attention_2"
    assert config.gradient_checkpointing or config.activation_checkpointing
    assert config.eval_dataset_path and config.output_dir.startswith("outputs/")
    # ZeRO-3 shards the weights too: needed from 32B up; ZeRO-2 is faster and enough below.
    assert stage == (3 if size in ("32b", "72b") else 2)
    if stage == 3:
        zero = deepspeed_config.config["zero_optimization"]
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # checkpoints eval_rm.py can load
    irrelevant = "irrelevant" in path.stem or "aug" in path.stem
    assert config.use_irrelevant_queries is irrelevant
    if irrelevant:
        assert config.num_irrelevant_pairs == (2 if path.stem.endswith("aug2") else 1)


def test_training_output_dirs_are_distinct():
    output_dirs = [read(path)["output_dir"] for path in TRAIN_FILES]
    assert len(output_dirs) == len(set(output_dirs))


@pytest.mark.parametrize("path", EVAL_FILES, ids=lambda path: path.name)
def test_eval_config_validates(path, monkeypatch):
    eval_config_class = getattr(config_module, "EvalConfig", None)
    if eval_config_class is None:
        pytest.fail("vlrm.train.config.EvalConfig is missing, but there are eval configs to validate")
    monkeypatch.chdir(ROOT)
    values = read(path)
    check_choices(eval_config_class, values)
    config = load_config(eval_config_class, path, runnable_here(values))
    # The runs it sweeps are ones the training recipes write.
    output_dirs = {read(train_path)["output_dir"] for train_path in TRAIN_FILES}
    assert not set(config.model_dirs) - output_dirs, f"{path.name} sweeps runs no training config writes"


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_files_leave_batch_and_precision_to_the_yaml(stage):
    config = json.loads((ROOT / f"zero{stage}.json").read_text())
    assert config["zero_optimization"]["stage"] == stage
    # "auto": filled from the training config, so the YAML is the one place these are set.
    auto_keys = [
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
    ]
    assert all(config[key] == "auto" for key in auto_keys)
    assert config["bf16"]["enabled"] == config["fp16"]["enabled"] == "auto"
    # No optimizer/scheduler block: the Trainer's (optim, lr_scheduler_type, learning_rate...) are used as is.
    assert "optimizer" not in config and "scheduler" not in config
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_train_config_fields_used_by_recipes_exist():
    # A key TrainConfig drops would make every recipe using it fail to load; name the key, not just the file.
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for path in TRAIN_FILES:
        unknown = set(read(path)) - known
        assert not unknown, f"{path.name}: unknown keys {sorted(unknown)}"
