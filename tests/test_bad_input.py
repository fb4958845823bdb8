"""Hostile input: over-long pairs in evaluation and scoring, config values of the wrong type, transparent and 16-bit
images, errors in the run's log, result reuse across settings, null prompts and RLAIF-V ids."""

import io
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from vlrm.data.images import to_rgb
from vlrm.data.prepare import load_preference_dataset
from vlrm.errors import BadSampleError, ConfigError
from vlrm.layout.encoder import open_image
from vlrm.train.config import TrainConfig
from vlrm.train.config_files import load_config
from vlrm.use.scoring import RewardScorer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, save_reward_checkpoint):
    return save_reward_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint-1", seed=0)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _eval_config(tmp_path, checkpoint, dataset, **extra):
    values = {
        "model_dirs": [str(checkpoint.parent)],
        "dataset_path": str(dataset),
        "eval_batch_size": 4,
        "results_dir": str(tmp_path / "results"),
        "log_dir": str(tmp_path / "logs"),
    } | extra
    path = tmp_path / "eval.yaml"
    path.write_text(json.dumps(values))
    return path


# ----------------------------------------------------------------------------------------------------------------
# 1. Length guard in evaluation and scoring


def test_eval_drops_an_overlong_pair_counts_it_and_scores_the_rest(tmp_path, eval_rm, checkpoint, synthetic_dir):
    rows = [json.loads(line) for line in (synthetic_dir / "eval.jsonl").read_text().splitlines()][:6]
    for row in rows:
        row["images"] = [str(synthetic_dir / image) for image in row["images"]]
    rows[2]["rejected"] = "word " * 20000
    dataset = _write_jsonl(tmp_path / "with_long.jsonl", rows)
    assert eval_rm.main([str(_eval_config(tmp_path, checkpoint, dataset, num_irrelevant_pairs=0))]) == 0
    (result,) = pd.read_csv(tmp_path / "results" / "evaluation_results.csv").to_dict("records")
    assert result["status"] == "ok" and result["num_pairs"] == 5 and result["num_overlong"] == 1
    (row,) = json.loads((tmp_path / "results" / "evaluation_results.json").read_text())["results"]
    assert row["overlong_ids"][0].startswith(f"{rows[2]['id']} (") and row["max_seq_length"] == 4096
    (log_file,) = (tmp_path / "logs").glob("eval_*.log")
    assert f"dropped 1 pairs longer than max_seq_length=4096 (first: {rows[2]['id']}" in log_file.read_text()


def test_scorer_skips_overlong_rows_and_scores_the_rest(checkpoint, synthetic_dir, caplog):
    scorer = RewardScorer.from_pretrained(checkpoint, max_seq_length=200)
    image = str(synthetic_dir / "images" / sorted(p.name for p in (synthetic_dir / "images").iterdir())[0])
    responses = ["A short answer.", "word " * 400, "Another short one."]
    rows = [{"prompt": "What is shown?", "images": [image], "response": response} for response in responses]
    rewards = scorer.score(rows)
    assert np.isnan(rewards[1]) and np.isfinite(rewards[[0, 2]]).all()
    unlimited = RewardScorer.from_pretrained(checkpoint, max_seq_length=None).score([rows[0], rows[2]])
    np.testing.assert_allclose(rewards[[0, 2]], unlimited, rtol=1e-5)
    assert "1 rows longer than max_seq_length=200 not scored" in caplog.text
    pairs, _ = load_preference_dataset(synthetic_dir / "eval.jsonl", max_samples=4)
    pairs = [dict(row) for row in pairs]
    pairs[3]["chosen"] = "word " * 400
    scores = scorer.score_pairs(pairs, batch_size=2, progress=False)
    assert [index for index, _ in scores.overlong] == [3] and scores.scored.tolist() == [True, True, True, False]


# ----------------------------------------------------------------------------------------------------------------
# 2. Config values are checked against their declared types, in the file and on the command line


BASE = "model_name_or_path: some/model\ndataset_path: data.jsonl\noutput_dir: out\nbf16: false\n"


@pytest.mark.parametrize(
    "line, expected",
    [
        ("learning_rate: true", "`learning_rate` must be a number, got True \\(bool\\)"),
        ("per_device_train_batch_size: 8.5", "`per_device_train_batch_size` must be an integer, got 8.5 \\(float\\)"),
        ("max_seq_length: 512.7", "`max_seq_length` must be an integer, got 512.7 \\(float\\)"),
        ("learning_rate: [0.1]", r"`learning_rate` must be a number, got \[0.1\] \(list\)"),
        ("eval_strategy: no", "`eval_strategy` must be a string.*got False.*quote the word"),
        ("learning_rate: 1e-5", "`learning_rate` must be a number, got '1e-5' \\(str\\).*write 1.0e-5"),
        ("dataset_weights: [1.0, yes]", "`dataset_weights` must be a number or a list of them"),
    ],
)
def test_file_values_of_the_wrong_type_name_file_key_value_and_type(tmp_path, line, expected):
    path = tmp_path / "config.yaml"
    path.write_text(BASE + line + "\n")
    with pytest.raises(ConfigError, match=rf"config.yaml: {expected}"):
        load_config(TrainConfig, path)


def test_file_values_that_fit_their_type_are_taken(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(BASE + "max_steps: 10.0\nlearning_rate: 1\ndataset_weights: 2\n")
    config = load_config(TrainConfig, path)
    assert config.max_steps == 10 and isinstance(config.max_steps, int) and config.learning_rate == 1.0
    assert config.dataset_weights == [2.0]


def test_command_line_values_of_the_wrong_type_name_the_flag(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(BASE)
    for flag, value in (("--per_device_train_batch_size", "8.5"), ("--learning_rate", "true")):
        with pytest.raises(SystemExit):
            load_config(TrainConfig, path, [flag, value])
        error = capsys.readouterr().err.splitlines()[-1]
        assert f"error: argument {flag}/" in error and "invalid" in error and f"'{value}'" in error


# ----------------------------------------------------------------------------------------------------------------
# 3-4. Images: transparency on white as the processor does it; 16-bit greyscale scaled, not saturated


def _transparent_png():
    pixels = np.zeros((56, 56, 4), np.uint8)
    pixels[..., 2] = 200  # blue where opaque
    pixels[:28, :, 3] = 0  # top half fully transparent
    pixels[28:, :, 3] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def test_transparent_images_reach_the_model_as_the_processor_makes_them(encoder, processor):
    data = _transparent_png()
    rgb = np.asarray(open_image({"bytes": data, "path": None}))
    assert (rgb[:28] == 255).all() and (rgb[28:] == [0, 0, 200]).all()  # on white, not black
    palette = Image.open(io.BytesIO(data)).convert("P")
    palette.info["transparency"] = palette.getpixel((0, 0))
    assert (np.asarray(to_rgb(palette))[:28] == 255).all()
    prompt = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Colour?"}]}]
    ours = encoder.encode_prompt(prompt, [{"bytes": data, "path": None}]).pixel_values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = processor(
            text=[encoder.prompt_text(prompt)], images=[Image.open(io.BytesIO(data))], return_tensors="pt"
        )["pixel_values"]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_16_bit_greyscale_keeps_its_range(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)  # 0 .. 63000
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    with Image.open(tmp_path / "ramp16.png") as image:
        assert image.mode.startswith("I")
        grey = np.asarray(to_rgb(image))[..., 0].astype(int)
    np.testing.assert_array_equal(grey, np.rint(ramp.astype(float) * 255 / 65535).astype(int))
    assert grey.min() == 0 and grey.max() == 245 and len(np.unique(grey)) == 64


# ----------------------------------------------------------------------------------------------------------------
# 5. A run that stops on bad input says why in its own log


def test_training_stopped_by_bad_input_logs_the_error(tmp_path, tiny_model_dir):
    data = _write_jsonl(
        tmp_path / "bad.jsonl", [{"question": "Q?", "images": ["gone.png"], "chosen": "a", "rejected": "b"}]
    )
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model_dir}\ndataset_path: {data}\noutput_dir: {tmp_path / 'out'}\n"
        f"log_dir: {tmp_path / 'logs'}\nbf16: false\nuse_cpu: true\nreport_to: none\n"
    )
    finished = subprocess.run(
        [sys.executable, str(ROOT / "train_rm.py"), str(config)], capture_output=True, text=True, timeout=300
    )
    assert finished.returncode != 0
    (log_file,) = (tmp_path / "logs").glob("train_*.log")
    text = log_file.read_text()
    assert (
        "the run stopped: BadSampleError" in text and "bad.jsonl: row 0: field `images`: image file not found" in text
    )


def test_evaluation_stopped_by_bad_input_logs_the_error(tmp_path, eval_rm, checkpoint):
    data = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "Q?", "images": [], "chosen": "a", "rejected": "a"}])
    with pytest.raises(BadSampleError):
        eval_rm.main([str(_eval_config(tmp_path, checkpoint, data))])
    (log_file,) = (tmp_path / "logs").glob("eval_*.log")
    assert "the evaluation stopped: BadSampleError: " in log_file.read_text()
    assert "field `rejected`: identical to chosen" in log_file.read_text()


# ----------------------------------------------------------------------------------------------------------------
# 6. A result is reused only under the settings that produced its numbers


def test_rerun_with_other_irrelevant_settings_evaluates_again(tmp_path, eval_rm, checkpoint, synthetic_dir):
    dataset = synthetic_dir / "eval.jsonl"
    assert eval_rm.main([str(_eval_config(tmp_path, checkpoint, dataset, num_irrelevant_pairs=0))]) == 0
    first = pd.read_csv(tmp_path / "results" / "evaluation_results.csv")
    assert "irrelevant_accuracy" not in first or first["irrelevant_accuracy"].isna().all()
    assert eval_rm.main([str(_eval_config(tmp_path, checkpoint, dataset, num_irrelevant_pairs=1))]) == 0
    second = pd.read_csv(tmp_path / "results" / "evaluation_results.csv")
    assert len(second) == 1 and second["irrelevant_accuracy"].notna().all()
    assert (
        eval_rm.main(
            [str(_eval_config(tmp_path, checkpoint, dataset, num_irrelevant_pairs=1, irrelevant_mode="image"))]
        )
        == 0
    )
    logs = "".join(path.read_text() for path in (tmp_path / "logs").glob("eval_*.log"))
    assert "num_irrelevant_pairs 0 -> 1; evaluating again" in logs
    assert "irrelevant_mode 'query' -> 'image'; evaluating again" in logs
    assert (
        eval_rm.main(
            [
                str(
                    _eval_config(
                        tmp_path, checkpoint, dataset, num_irrelevant_pairs=1, irrelevant_mode="image", packing=False
                    )
                )
            ]
        )
        == 0
    )
    logs = "".join(path.read_text() for path in (tmp_path / "logs").glob("eval_*.log"))
    assert "0 to evaluate, 1 already in" in logs  # packing changes numbers by round-off only: reused


# ----------------------------------------------------------------------------------------------------------------
# 7. Null prompts name their field; RLAIF-V's idx is the row id


def test_null_prompt_names_the_field_the_row_used(tmp_path):
    rows = [{"prompt": None, "images": [], "chosen": "a", "rejected": "b"}]
    with pytest.raises(BadSampleError, match=r"row 0: field `prompt`: expected a question string .* got null"):
        load_preference_dataset(_write_jsonl(tmp_path / "null.jsonl", rows))


def test_rlaif_v_idx_becomes_the_row_id(tmp_path):
    rows = [{"idx": 7301, "question": "Q?", "chosen": "a", "rejected": "b"}]
    dataset, _ = load_preference_dataset(_write_jsonl(tmp_path / "rlaif.jsonl", rows))
    assert dataset["id"] == ["7301"]


def test_a_data_file_rewritten_at_the_same_path_is_evaluated_again(tmp_path, eval_rm, checkpoint, synthetic_dir):
    rows = [json.loads(line) for line in (synthetic_dir / "eval.jsonl").read_text().splitlines()][:6]
    rows = [row | {"images": [str(synthetic_dir / image) for image in row["images"]]} for row in rows]
    dataset = _write_jsonl(tmp_path / "held_out.jsonl", rows)
    config = str(_eval_config(tmp_path, checkpoint, dataset, num_irrelevant_pairs=0))
    assert eval_rm.main([config]) == 0
    first = pd.read_csv(tmp_path / "results" / "evaluation_results.csv")["accuracy"].item()
    swapped = [row | {"chosen": row["rejected"], "rejected": row["chosen"]} for row in rows]  # every label flipped
    os.utime(_write_jsonl(dataset, swapped), (time.time() + 5, time.time() + 5))
    assert eval_rm.main([config]) == 0
    logs = "".join(path.read_text() for path in (tmp_path / "logs").glob("eval_*.log"))
    assert "the data set changed since it was evaluated; evaluating again" in logs
    second = pd.read_csv(tmp_path / "results" / "evaluation_results.csv")["accuracy"].item()
    assert second == pytest.approx(1 - first)  # the new file's numbers, not the old ones
