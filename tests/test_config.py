import importlib.util

import pytest
import torch

from vlrm.errors import ConfigError
from vlrm.train.config import TrainConfig
from vlrm.train.config_files import load_config


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "model_name_or_path: some/model\ndataset_path: data.jsonl\noutput_dir: out\nbf16: false\nlearning_rate: 0.001\n"
    )
    return path


def test_file_values_and_command_line_overrides(config_file):
    config = load_config(
        TrainConfig, config_file, ["--learning_rate", "5e-4", "--max_steps", "7", "--freeze_vit", "true"]
    )
    assert config.learning_rate == 5e-4 and config.max_steps == 7 and config.freeze_vit is True
    assert config.model_name_or_path == "some/model" and config.remove_unused_columns is False


def test_json_config_loads(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_name_or_path": "m", "dataset_path": "d.jsonl", "output_dir": "o", "bf16": false}')
    assert load_config(TrainConfig, path).dataset_path == ["d.jsonl"]


def test_unknown_key_in_file_suggests_closest(config_file):
    config_file.write_text(config_file.read_text() + "learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key `learning_rat`.*Did you mean `learning_rate`"):
        load_config(TrainConfig, config_file)


def test_unknown_key_on_command_line_suggests_closest(config_file):
    with pytest.raises(ConfigError, match=r"`freeze_vision`.*command line.*Did you mean `freeze_vit`"):
        load_config(TrainConfig, config_file, ["--freeze_vision", "true"])


def test_invalid_choice_is_rejected(config_file):
    with pytest.raises(SystemExit):
        load_config(TrainConfig, config_file, ["--attn_implementation", "flash"])


def test_invalid_choice_in_file_is_rejected(config_file):
    config_file.write_text(config_file.read_text() + "on_bad_sample: skipp\n")
    with pytest.raises(ConfigError, match="config.yaml: `on_bad_sample` must be one of 'error', 'skip', got 'skipp'"):
        load_config(TrainConfig, config_file)


def test_max_length_points_to_max_seq_length(config_file):
    with pytest.raises(ConfigError, match="max_seq_length"):
        load_config(TrainConfig, config_file, ["--max_length", "100"])


@pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available(), reason="flash-attn usable here"
)
def test_flash_attention_without_flash_attn_or_cuda_fails_before_loading(config_file):
    with pytest.raises(ConfigError, match="flash_attention_2 needs .*sdpa"):
        load_config(TrainConfig, config_file, ["--attn_implementation", "flash_attention_2"])


def test_missing_local_model_path_is_named(config_file):
    with pytest.raises(ConfigError, match=r"model_name_or_path not found: \.cache/tiny-x .*make demo"):
        load_config(TrainConfig, config_file, ["--model_name_or_path", ".cache/tiny-x"])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(TrainConfig, tmp_path / "nope.yaml")
