"""Benchmarks by their own protocols: VL-RewardBench categories and macro, Multimodal RewardBench's `Better`,
MM-RLHF-RewardBench's Acc+ with ties and skipped videos, bias diagnostics, and several datasets in one sweep."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vlrm.data.prepare import load_preference_dataset
from vlrm.data.videos import write_clip
from vlrm.metrics import bias_diagnostics, evaluate_pairs
from vlrm.use.scoring import RewardScorer


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def images(tmp_path):
    (tmp_path / "img").mkdir()
    for index, color in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        Image.new("RGB", (56, 56), color).save(tmp_path / "img" / f"{index}.png")
    return [f"img/{index}.png" for index in range(3)]


def vl_rewardbench_rows(images):
    sources = ["vlfeedback", "wildvision-battle", "povid", "rlhf-v", "rlaif-v", "reasoning_tasks"]
    rows = [
        {"id": f"{source}-{i}", "query": f"Question {i}?", "image": images[i % 3], "response": [f"A{i}.", f"B{i}."],
         "human_ranking": [0, 1] if i % 2 == 0 else [1, 0], "query_source": source}
        for i, source in enumerate(sources)
    ]  # fmt: skip
    # No query_source: the id's prefix tells (RLAIF-V is a hallucination source); the second response preferred.
    rows.append(
        {
            "id": "RLAIF-V-77",
            "query": "Q?",
            "image": images[0],
            "response": ["worse", "better"],
            "human_ranking": [1, 0],
        }
    )
    return rows


def test_vl_rewardbench_categories_positions_and_macro(tmp_path, images):
    dataset, _ = load_preference_dataset(_jsonl(tmp_path / "vlrb.jsonl", vl_rewardbench_rows(images)))
    assert dataset["category"] == ["general", "general", "hallucination", "hallucination", "hallucination",
                                   "reasoning", "hallucination"]  # fmt: skip
    assert dataset["preferred_position"] == [0, 1, 0, 1, 0, 1, 1]
    assert dataset[1]["chosen"] == "B1." and dataset[6]["chosen"] == "better" and dataset[6]["rejected"] == "worse"
    assert set(dataset["benchmark"]) == {"vl_rewardbench"}
    # Scores chosen by hand: right on pairs 0, 2, 3, 5; wrong on 1 and 4; a tie (wrong) on 6.
    chosen = np.array([1.0, 0.0, 2.0, 1.0, 0.0, 3.0, 0.5])
    rejected = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.5])
    metrics = evaluate_pairs(chosen, rejected, dataset["category"])
    assert metrics["accuracy"] == pytest.approx(4 / 7) and metrics["num_ties"] == 1  # Overall: micro
    per_category = {name: values["accuracy"] for name, values in metrics["per_category"].items()}
    assert per_category == pytest.approx({"general": 1 / 2, "hallucination": 2 / 4, "reasoning": 1.0})
    assert metrics["macro_accuracy"] == pytest.approx((1 / 2 + 2 / 4 + 1.0) / 3)  # Macro: mean of the three
    assert metrics["acc_plus"] is None


def test_multimodal_rewardbench_better_both_ways(tmp_path, images):
    rows = [
        {"ID": "m1", "Text": "What is shown?", "Image": images[0], "Output1": "Right.", "Output2": "Wrong.",
         "Better": "Output1", "Category": "reasoning"},
        {"ID": "m2", "Text": "Count them.", "Image": images[1], "Output1": "Wrong.", "Output2": "Right.",
         "Better": "Output2", "Meta": {"Category": "safety"}},
    ]  # fmt: skip
    dataset, _ = load_preference_dataset(_jsonl(tmp_path / "mmrb.jsonl", rows))
    assert dataset["chosen"] == ["Right.", "Right."] and dataset["rejected"] == ["Wrong.", "Wrong."]
    assert dataset["category"] == ["reasoning", "safety"] and dataset["preferred_position"] == [0, 1]
    assert dataset["id"] == ["m1", "m2"] and set(dataset["benchmark"]) == {"multimodal_rewardbench"}
    rows[0]["Better"] = "Output3"
    with pytest.raises(ValueError, match=r"row 0: field `Better`: expected Output1 or Output2"):
        load_preference_dataset(_jsonl(tmp_path / "bad_mmrb.jsonl", rows))


def test_mm_rlhf_acc_plus_ties_and_video_rows(tmp_path, images):
    def pair(group, index, video=None):
        return {"id": group, "image": None if video else images[index % 3], "video": video,
                "prompt": f"Prompt {group}?", "chosen": f"good {index}", "rejected": f"bad {index}"}  # fmt: skip

    (tmp_path / "video").mkdir()
    frames = np.zeros((4, 56, 56, 3), dtype=np.uint8)
    write_clip(tmp_path / "video" / "clip.mp4", frames + np.arange(4, dtype=np.uint8)[:, None, None, None] * 60, 2.0)
    rows = [pair("g1", 0), pair("g1", 1), pair("g1", 2), pair("g2", 3), pair("g2", 4), pair("g3", 5),
            pair("g4", 6, video="video/clip.mp4")]  # fmt: skip
    dataset, report = load_preference_dataset(_jsonl(tmp_path / "mmrlhf.jsonl", rows))  # on_bad_sample="error"
    assert report.num_unsupported == 0 and len(dataset) == 7  # video rows are scored, inside the protocol
    assert dataset["group"] == ["g1", "g1", "g1", "g2", "g2", "g3", "g4"] and len(set(dataset["id"])) == 7
    assert len(dataset[6]["videos"]) == 1 and dataset[6]["category"] == "video" and not dataset[6]["images"]
    # g1: all right; g2: one tie (wrong); g3: wrong; g4 (the video row): right. Acc+ = 2/4.
    chosen = np.array([2.0, 2.0, 2.0, 1.0, 3.0, 0.0, 1.0])
    rejected = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    metrics = evaluate_pairs(chosen, rejected, dataset["category"], groups=dataset["group"])
    assert metrics["accuracy"] == pytest.approx(5 / 7) and metrics["num_ties"] == 1
    assert metrics["acc_plus"] == pytest.approx(2 / 4) and metrics["num_groups"] == 4


def test_bias_diagnostics_by_hand():
    chosen, rejected = np.array([3.0, 1.0, 2.0, 0.0]), np.array([1.0, 2.0, 1.0, 1.0])
    chosen_lengths, rejected_lengths = [10, 40, 20, 5], [30, 20, 25, 50]
    diagnostics = bias_diagnostics(chosen, rejected, chosen_lengths, rejected_lengths, [0, 1, 1, 0])
    assert diagnostics["accuracy_by_preferred_position"] == {
        "0": {"accuracy": 0.5, "num_pairs": 2}, "1": {"accuracy": 0.5, "num_pairs": 2},
    }  # fmt: skip
    rewards = pd.Series([3.0, 1.0, 2.0, 0.0, 1.0, 2.0, 1.0, 1.0])
    lengths = pd.Series([10, 40, 20, 5, 30, 20, 25, 50])
    assert diagnostics["reward_length_spearman"] == pytest.approx(rewards.rank().corr(lengths.rank()))
    # The preferred response is the shorter in pairs 0, 2, 3: right in 0 and 2.
    assert diagnostics["accuracy_when_preferred_is_shorter"] == pytest.approx(2 / 3)
    assert diagnostics["num_pairs_preferred_is_shorter"] == 3


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, save_reward_checkpoint):
    run = tmp_path_factory.mktemp("bench_run") / "run"
    for step in (1, 2):
        save_reward_checkpoint(run / f"checkpoint-{step}", seed=step)
    return run


def test_one_sweep_over_three_datasets_rows_plot_references_and_resume(
    tmp_path, eval_rm, run_dir, images, synthetic_dir, monkeypatch
):
    mmrb = [
        {"ID": f"m{i}", "Text": "Which?", "Image": images[i % 3], "Output1": f"One {i}.", "Output2": f"Two {i}.",
         "Better": "Output1" if i % 2 else "Output2", "Category": "general"}
        for i in range(4)
    ]  # fmt: skip
    config = tmp_path / "eval.yaml"
    config.write_text(
        json.dumps(
            {
                "model_dirs": [str(run_dir)],
                "dataset_path": {
                    "synthetic": str(synthetic_dir / "eval.jsonl"),
                    "vlrb": str(_jsonl(tmp_path / "vlrb.jsonl", vl_rewardbench_rows(images))),
                    "mmrb": str(_jsonl(tmp_path / "mmrb.jsonl", mmrb)),
                },
                "num_irrelevant_pairs": 0,
                "results_dir": str(tmp_path / "results"),
                "log_dir": str(tmp_path / "logs"),
            }
        )
    )
    # Killed after the first checkpoint: its three rows are written, the second checkpoint's are not.
    original = RewardScorer.score_pairs
    calls = []

    def killed_on_the_second_checkpoint(self, *args, **kwargs):
        calls.append(kwargs.get("desc", ""))
        if str(kwargs.get("desc", "")).startswith("checkpoint-2"):
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RewardScorer, "score_pairs", killed_on_the_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        eval_rm.main([str(config)])
    partial = json.loads((tmp_path / "results" / "evaluation_results.json").read_text())["results"]
    assert sorted((row["checkpoint"], row["dataset"]) for row in partial) == [
        ("checkpoint-1", "mmrb"), ("checkpoint-1", "synthetic"), ("checkpoint-1", "vlrb"),
    ]  # fmt: skip
    monkeypatch.setattr(RewardScorer, "score_pairs", original)
    labels, original_plot = [], eval_rm.write_plot
    monkeypatch.setattr(eval_rm, "write_plot", lambda *args: labels.extend(original_plot(*args)))
    assert eval_rm.main([str(config)]) == 0

    results = pd.read_csv(tmp_path / "results" / "evaluation_results.csv")
    assert sorted(zip(results["checkpoint"], results["dataset"], strict=True)) == [
        (c, d) for c in ("checkpoint-1", "checkpoint-2") for d in ("mmrb", "synthetic", "vlrb")
    ]
    by_dataset = results.set_index(["checkpoint", "dataset"])
    assert by_dataset.loc[("checkpoint-2", "vlrb"), "num_pairs"] == 7
    assert by_dataset.loc[("checkpoint-2", "vlrb"), "dataset_benchmark"] == "vl_rewardbench"
    assert by_dataset.loc[("checkpoint-2", "mmrb"), "num_pairs"] == 4
    logs = "".join(path.read_text() for path in (tmp_path / "logs").glob("eval_*.log"))
    assert "0 already in" in logs and "3 to evaluate, 3 already in" in logs  # resumed: only checkpoint-2 scored
    assert "vlrb (vl_rewardbench), published results" in logs and "Skywork-VL-Reward-7B" in logs
    assert "accuracy by dataset" in logs
    assert sorted(labels) == [f"{run_dir.as_posix()} · {name}" for name in ("mmrb", "synthetic", "vlrb")]
    report = json.loads((tmp_path / "results" / "evaluation_results.json").read_text())
    vlrb_row = next(row for row in report["results"] if row["dataset"] == "vlrb")
    assert set(vlrb_row["bias"]) >= {"accuracy_by_preferred_position", "reward_length_spearman"}


def test_benchmark_layouts_read_from_parquet_and_save_to_disk(tmp_path, images):
    """The columnar forms: parquet (nulls for absent values) and `datasets.save_to_disk` with image features."""
    import datasets

    rows = [
        {"id": "g1", "image": images[0], "video": None, "prompt": "P?", "chosen": "good", "rejected": "bad"},
        {"id": "g1", "image": images[1], "video": None, "prompt": "P?", "chosen": "good", "rejected": "worse"},
        {"id": "g2", "image": None, "video": "clip.mp4", "prompt": "V?", "chosen": "good", "rejected": "bad"},
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "mmrlhf.parquet")
    dataset, report = load_preference_dataset(tmp_path / "mmrlhf.parquet", on_bad_sample="skip")
    # The video row is read (a null image column next to it), and its clip, not shipped here, counted as bad.
    assert dataset["group"] == ["g1", "g1"] and report.num_skipped == 1 and "video file not found" in report.skipped[0]
    assert set(dataset["benchmark"]) == {"mm_rlhf"}
    vlrb = datasets.Dataset.from_list(
        [
            {
                "id": "povid-1",
                "query": "Q?",
                "image": Image.open(tmp_path / images[0]),
                "response": ["a", "b"],
                "human_ranking": [1, 0],
                "query_source": "povid",
            }
        ]  # fmt: skip
    ).cast_column("image", datasets.Image())
    vlrb.save_to_disk(tmp_path / "vlrb_disk")
    dataset, _ = load_preference_dataset(tmp_path / "vlrb_disk")
    assert (
        dataset["category"] == ["hallucination"]
        and dataset["chosen"] == ["b"]
        and dataset["preferred_position"] == [1]
    )
