"""Evaluating process checkpoints: VisualProcessBench's step F1s and best-of-N against numbers worked out by hand,
and eval_rm.py on a tiny process checkpoint over a synthetic step set and a VisualProcessBench-layout stand-in (CSV
and JSON columns, per-source rows, the per-solution file, published references, resume on step_threshold); an outcome
checkpoint's sweep keeps its pair outputs."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest

from vlrm.data.synthetic_steps import make_steps_dataset
from vlrm.metrics import best_of_n, step_classification, step_metrics
from vlrm.use.scoring import RewardScorer

NAN = math.nan
PROCESS = {"vlrm_reward_type": "process", "vlrm_step_separator": "\n\n", "vlrm_step_aggregation": "mean"}


# ----------------------------------------------------------------------------------------------------------------
# Metrics by hand


def test_step_f1s_leave_neutral_steps_out_and_read_soft_labels_above_one_half():
    # step:     0    1    2    3    4 (neutral)  5 (soft 0.75)  6 (soft 0.25)  7 (soft 0.5)  8 (score at threshold)
    labels = [1.0, 1.0, 0.0, 0.0, NAN, 0.75, 0.25, 0.5, 1.0]
    scores = [0.9, 0.4, 0.6, 0.1, 0.99, 0.7, 0.2, 0.3, 0.5]
    # Predicted correct: 0, 2, 5 (8 sits on the threshold: wrong). Correct by label: 0, 1, 5, 8.
    # Correct as positive: TP 0, 5; FP 2; FN 1, 8 -> F1 = 4 / 7. Wrong as positive: TP 3, 6, 7; FP 1, 8; FN 2 -> 6 / 9.
    metrics = step_classification(scores, labels)
    assert metrics["f1_correct"] == pytest.approx(4 / 7)
    assert metrics["f1_wrong"] == pytest.approx(2 / 3)
    assert metrics["macro_f1"] == pytest.approx((4 / 7 + 2 / 3) / 2)
    assert metrics["step_accuracy"] == pytest.approx(5 / 8)  # 0, 3, 5, 6, 7 right of 8 labelled
    assert (metrics["num_steps"], metrics["num_neutral_steps"]) == (8, 1)
    assert (metrics["num_correct_steps"], metrics["num_wrong_steps"]) == (4, 4)
    # A neutral step's score never counts, even NaN (an unscored one).
    assert step_classification(scores[:4] + [NAN] + scores[5:], labels) == metrics
    # A lower threshold: 1 (0.4) and 8 (0.5) turn correct. Correct: TP 0, 1, 5, 8; FP 2 -> 8 / 9; wrong: TP 3, 6, 7;
    # FN 2 -> 6 / 7.
    lower = step_classification(scores, labels, threshold=0.35)
    assert (lower["f1_correct"], lower["f1_wrong"]) == (pytest.approx(8 / 9), pytest.approx(6 / 7))
    assert lower["step_accuracy"] == pytest.approx(7 / 8)


def test_a_class_in_neither_labels_nor_predictions_leaves_its_f1_undefined():
    metrics = step_classification([0.9, 0.8], [1.0, 1.0])
    assert metrics["f1_correct"] == 1.0 and metrics["f1_wrong"] is None and metrics["macro_f1"] is None
    assert step_classification([0.9, 0.1], [1.0, 1.0])["f1_wrong"] == 0.0  # predicted but never labelled: 0, defined
    with pytest.raises(ValueError, match="no finite score"):
        step_classification([NAN, 0.1], [1.0, 0.0])


def test_overall_pools_every_step_and_sources_are_scored_on_their_own():
    # Source A: labels 1, 0; scores 0.9, 0.8 -> correct: TP 1, FP 1 -> 2/3; wrong: FN 1 -> 0; macro 1/3.
    # Source B: labels 0, 0, 1; scores 0.1, 0.2, 0.3 -> correct: FN 1 -> 0; wrong: TP 2, FP 1 -> 4/5; macro 2/5.
    # Pooled: correct TP 1, FP 1, FN 1 -> 1/2; wrong TP 2, FP 1, FN 1 -> 2/3; macro 7/12 (not the sources' mean 11/30).
    metrics = step_metrics([0.9, 0.8, 0.1, 0.2, 0.3], [1, 0, 0, 0, 1], ["A", "A", "B", "B", "B"])
    assert metrics["macro_f1"] == pytest.approx(7 / 12)
    assert metrics["per_category"]["A"]["macro_f1"] == pytest.approx(1 / 3)
    assert metrics["per_category"]["B"]["macro_f1"] == pytest.approx(2 / 5)
    assert metrics["per_category"]["B"]["f1_wrong"] == pytest.approx(4 / 5)
    assert step_metrics([0.9, 0.1], [1, 0])["per_category"] == {}


def test_best_of_n_breaks_ties_by_the_lowest_index_next_to_oracle_and_random():
    scores = [[0.9, 0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.5]]
    correct = [[False, True, True], [False, True], [False, False], [True]]
    # Row 0: a tie at 0.9 goes to solution 0 (wrong); row 1 picks 1 (right); row 2 has none right; row 3 has one
    # solution: left out. Random: (2/3 + 1/2 + 0) / 3.
    result = best_of_n(scores, correct)
    assert result == {
        "best_of_n": pytest.approx(1 / 3), "best_of_n_oracle": pytest.approx(2 / 3),
        "best_of_n_random": pytest.approx(7 / 18), "num_best_of_n_questions": 3,
    }  # fmt: skip
    correct[0] = [True, False, True]  # the tie's first solution now right
    assert best_of_n(scores, correct)["best_of_n"] == pytest.approx(2 / 3)
    assert best_of_n([[0.5]], [[True]])["best_of_n"] is None


# ----------------------------------------------------------------------------------------------------------------
# eval_rm.py on process checkpoints


def _write_visual_process_bench(directory, image):
    """A VisualProcessBench-layout stand-in (its released test.jsonl's fields): 1 correct, 0 neutral, -1 wrong."""
    shutil.copy(image, directory / "question.png")
    rows = [
        ("MMMU", ["There are two shapes.", "So the answer is 2."], [1, -1]),
        ("MathVision", ["Count the red shapes.", "There are three.", "The answer is 3."], [0, 1, 1]),
        ("MathVerse", ["There is one blue shape.", "Add them.", "The answer is 4."], [-1, 0, -1]),
        ("MathVerse", ["The shapes are red and blue.", "The answer is 5."], [1, 1]),
    ]
    path = directory / "visualprocessbench.jsonl"
    path.write_text("".join(
        json.dumps({"image": ["question.png"], "question": "How many shapes?", "answer": "4",
                    "response": {"steps": steps, "process_correctness": labels}, "policy_model": "GPT-4o",
                    "data_source": source}) + "\n"
        for source, steps, labels in rows
    ))  # fmt: skip
    return path, rows


@pytest.fixture(scope="module")
def step_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("step_sets")
    make_steps_dataset(root / "synthetic", num_train=4, num_eval=6, image_size=56)
    bench, bench_rows = _write_visual_process_bench(root, root / "synthetic" / "images" / "steps_eval_00000.png")
    return root / "synthetic" / "steps_eval.jsonl", bench, bench_rows


def _config(tmp_path, model_dirs, datasets, base_model, **extra):
    values = {
        "model_dirs": [str(path) for path in model_dirs], "dataset_path": datasets, "base_model_path": str(base_model),
        "eval_batch_size": 3, "results_dir": str(tmp_path / "results"), "log_dir": str(tmp_path / "logs"),
    } | extra  # fmt: skip
    path = tmp_path / "eval.yaml"
    path.write_text(json.dumps(values))
    return str(path)


def test_process_sweep_reports_step_f1s_per_source_best_of_n_and_per_step_scores(
    tmp_path, eval_rm, save_reward_checkpoint, tiny_model_dir, step_sets, synthetic_dir
):
    synthetic, bench, bench_rows = step_sets
    run = tmp_path / "run"
    for step in (2, 4):
        save_reward_checkpoint(run / f"checkpoint-{step}", seed=step, **PROCESS)
    datasets = [f"steps={synthetic}", f"vpb={bench}", f"pairs={synthetic_dir / 'eval.jsonl'}"]
    config = _config(tmp_path, [run], datasets, tiny_model_dir, num_irrelevant_pairs=0)
    assert eval_rm.main([config]) == 0

    results = tmp_path / "results"
    table = pd.read_csv(results / "evaluation_results.csv")
    assert len(table) == 6 and set(table["status"]) == {"ok"}
    steps, vpb, pairs = (table[table["dataset"] == name].reset_index(drop=True) for name in ("steps", "vpb", "pairs"))
    # The step sets are scored step by step; the pair set (no steps) as an outcome reward, with pair accuracy.
    assert set(steps["reward_type"]) == set(vpb["reward_type"]) == {"process"}
    assert pairs["reward_type"].isna().all() and pairs["accuracy"].notna().all() and steps["accuracy"].isna().all()
    for column in ("step_macro_f1", "step_f1_correct", "step_f1_wrong", "step_accuracy", "best_of_n",
                   "best_of_n_oracle", "best_of_n_random", *(f"best_of_n/{how}" for how in ("mean", "min", "last",
                                                                                         "product"))):  # fmt: skip
        assert steps[column].between(0, 1).all(), column
    # The synthetic set: 6 questions of 4 solutions, two fully right in each (oracle 1, random 1/2), 3 steps each.
    assert steps["num_solutions"].tolist() == [24, 24] and steps["num_steps"].tolist() == [72, 72]
    assert steps["best_of_n_oracle"].tolist() == [1.0, 1.0] and steps["best_of_n_random"].tolist() == [0.5, 0.5]
    assert (steps["best_of_n"] == steps["best_of_n/mean"]).all()  # the checkpoint's recorded aggregation
    assert steps["step_macro_f1"].nunique() == 2  # the two checkpoints' heads differ
    # The stand-in: recognised as VisualProcessBench, its neutral steps (0) left out, one row per data source.
    assert set(vpb["dataset_benchmark"]) == {"visualprocessbench"}
    assert vpb["num_steps"].tolist() == [8, 8] and vpb["num_neutral_steps"].tolist() == [2, 2]
    assert vpb["num_best_of_n_questions"].tolist() == [0, 0] and vpb["best_of_n"].isna().all()  # one solution each
    for source in ("MMMU", "MathVision", "MathVerse"):
        assert vpb[f"macro_f1/{source}"].notna().all() or vpb[f"f1_correct/{source}"].notna().all(), source
    assert vpb["num_steps/MathVerse"].tolist() == [4, 4] and "macro_f1/DynaMath" not in vpb

    # The per-solution file: in the data's order, the scorer's step scores, the labels (null: neutral), the mean.
    payload = json.loads((results / "evaluation_results.json").read_text())
    row = next(r for r in payload["results"] if r["dataset"] == "vpb" and r["checkpoint"] == "checkpoint-4")
    assert set(row["per_source"]) == {"MMMU", "MathVision", "MathVerse"} and payload["config"]["step_threshold"] == 0.5
    solutions = pd.read_csv(row["pairs_file"])
    assert solutions["id"].tolist() == [f"visualprocessbench-{i}" for i in range(4)]
    assert solutions["solution"].tolist() == [0, 0, 0, 0]
    labels = [json.loads(text) for text in solutions["step_labels"]]
    assert labels == [[1.0, 0.0], [None, 1.0, 1.0], [0.0, None, 0.0], [1.0, 1.0]]
    scorer = RewardScorer.from_pretrained(run / "checkpoint-4", base_model_path=tiny_model_dir)
    expected = scorer.score_steps(
        [{"prompt": "How many shapes?", "images": [str(bench.parent / "question.png")], "steps": steps_of}
         for _, steps_of, _ in bench_rows]
    )  # fmt: skip
    written = [np.asarray(json.loads(text)) for text in solutions["step_scores"]]
    for ours, theirs in zip(written, expected.steps, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    np.testing.assert_allclose(solutions["score"], [values.mean() for values in written], atol=1e-6)
    assert solutions["correct"].tolist() == [False, True, False, True]
    # The row's numbers are the metric functions' on the file's scores and labels.
    flat_labels = np.array([np.nan if label is None else label for row_labels in labels for label in row_labels])
    categories = [c for c, steps_of in zip(solutions["category"], written, strict=True) for _ in steps_of]
    again = step_metrics(np.concatenate(written), flat_labels, categories)
    assert row["step_macro_f1"] == pytest.approx(again["macro_f1"])
    assert row["per_source"]["MathVerse"]["f1_wrong"] == again["per_category"]["MathVerse"]["f1_wrong"]

    synthetic_file = pd.read_csv(steps["pairs_file"][1])
    assert len(synthetic_file) == 24 and synthetic_file["solution"].tolist() == [0, 1, 2, 3] * 6
    assert synthetic_file.groupby("id")["selected"].sum().tolist() == [1] * 6  # one pick per question
    picks = synthetic_file.groupby("id", sort=False)["score"].idxmax()  # the first of equal scores, as best_of_n
    assert synthetic_file.loc[picks.values, "correct"].mean() == pytest.approx(steps["best_of_n"][1])

    assert (results / "evaluation_results_process.png").stat().st_size > 0
    assert (results / "evaluation_results.png").stat().st_size > 0  # the pair set's plot
    log = next((tmp_path / "logs").glob("eval_*.log")).read_text()
    assert "VisualPRM-8B" in log and "62.0" in log and "arXiv 2503.10291, Table 3" in log

    # A result depends on step_threshold: changed, the process results are scored again, the pair ones are not.
    assert eval_rm.main([config, "--step_threshold", "0.9"]) == 0
    log = sorted((tmp_path / "logs").glob("eval_*.log"))[-1].read_text()
    assert "step_threshold 0.5 -> 0.9" in log and "4 to evaluate" in log
    again = pd.read_csv(results / "evaluation_results.csv")
    assert again.loc[again["reward_type"] == "process", "step_threshold"].tolist() == [0.9] * 4
    assert again.loc[again["dataset"] == "pairs", "evaluated_at"].tolist() == pairs["evaluated_at"].tolist()


def test_outcome_checkpoint_sweep_keeps_its_pair_outputs(
    tmp_path, eval_rm, save_reward_checkpoint, tiny_model_dir, synthetic_dir
):
    save_reward_checkpoint(tmp_path / "run" / "checkpoint-3", seed=3)
    config = _config(tmp_path, [tmp_path / "run"], [str(synthetic_dir / "eval.jsonl")], tiny_model_dir)
    assert eval_rm.main([config]) == 0
    results = tmp_path / "results"
    table = pd.read_csv(results / "evaluation_results.csv")
    assert table["accuracy"].between(0, 1).all() and table["num_pairs"].tolist() == [24]
    assert not [column for column in table if "step" in column and column != "step" or "best_of_n" in column]
    assert "reward_type" not in table and "step_threshold" not in table
    pair_file = pd.read_csv(table["pairs_file"][0])
    assert pair_file.columns.tolist() == ["id", "category", "chosen_score", "rejected_score"]
    assert (results / "evaluation_results.png").exists() and not (results / "evaluation_results_process.png").exists()
