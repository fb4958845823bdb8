"""eval_rm.py on a joint checkpoint (scoring_mode: joint, vlrm.use.joint): the position-bias diagnostic (accuracy with
the preferred response first and last, and their gap) next to the order-averaged accuracy, each order's rewards in
the per-pair file; an independent checkpoint's outputs as before; the torchrun shards carry the orders."""

import json

import numpy as np
import pandas as pd
import pytest

from vlrm.data.prepare import load_preference_dataset
from vlrm.use.scoring import PairScores, RewardScorer

JOINT_COLUMNS = ["accuracy_preferred_first", "accuracy_preferred_last", "position_gap"]
ORDER_COLUMNS = ["chosen_score_preferred_first", "rejected_score_preferred_first", "chosen_score_preferred_last",
                 "rejected_score_preferred_last"]  # fmt: skip
NUM_PAIRS = 12


@pytest.fixture(scope="module")
def runs(tmp_path_factory, save_reward_checkpoint):
    """A joint run and an independent run, the same weights."""
    root = tmp_path_factory.mktemp("eval_joint")
    save_reward_checkpoint(root / "joint" / "checkpoint-1", seed=3, vlrm_scoring_mode="joint",
                           vlrm_joint_permutations=2, vlrm_joint_group_size=3)  # fmt: skip
    save_reward_checkpoint(root / "independent" / "checkpoint-1", seed=3)
    return {"joint": root / "joint", "independent": root / "independent"}


def _config(tmp_path, name, model_dirs, synthetic_dir, tiny_model_dir):
    values = {
        "model_dirs": [str(path) for path in model_dirs], "dataset_path": str(synthetic_dir / "eval.jsonl"),
        "base_model_path": str(tiny_model_dir), "eval_batch_size": 5, "max_eval_samples": NUM_PAIRS,
        "results_dir": str(tmp_path / name), "log_dir": str(tmp_path / name / "logs"),
    }  # fmt: skip  # num_irrelevant_pairs stays 1: a joint checkpoint has no such branch and skips those metrics
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(values))
    return str(path)


def test_the_bias_columns_are_what_the_per_pair_file_gives(tmp_path, eval_rm, runs, synthetic_dir, tiny_model_dir):
    config = _config(tmp_path, "mixed", [runs["joint"], runs["independent"]], synthetic_dir, tiny_model_dir)
    assert eval_rm.main([config]) == 0
    results = pd.read_csv(tmp_path / "mixed" / "evaluation_results.csv")
    assert (results["status"] == "ok").all(), results["error"].tolist()
    columns = results.columns.tolist()
    at = columns.index("accuracy_ci_high")
    assert columns[at + 1 : at + 4] == JOINT_COLUMNS  # beside the order-averaged accuracy
    report = {row["model"].split("/")[-1]: row for row in json.loads((tmp_path / "mixed" / "evaluation_results.json")
                                                                     .read_text())["results"]}  # fmt: skip
    joint = results[results["model"].str.endswith("joint")].iloc[0]
    pairs = pd.read_csv(report["joint"]["pairs_file"])
    assert pairs.columns.tolist() == ["id", "category", "chosen_score", "rejected_score", *ORDER_COLUMNS]
    assert len(pairs) == NUM_PAIRS
    first = (pairs["chosen_score_preferred_first"] > pairs["rejected_score_preferred_first"]).mean()
    last = (pairs["chosen_score_preferred_last"] > pairs["rejected_score_preferred_last"]).mean()
    assert joint["accuracy_preferred_first"] == pytest.approx(first)
    assert joint["accuracy_preferred_last"] == pytest.approx(last)
    assert joint["position_gap"] == pytest.approx(first - last)
    assert report["joint"]["position_gap"] == pytest.approx(first - last)  # and in the JSON
    # The order-averaged accuracy is over the means of the two orders' rewards; the orders do differ.
    np.testing.assert_allclose(pairs["chosen_score"], (pairs["chosen_score_preferred_first"]
                                                       + pairs["chosen_score_preferred_last"]) / 2, atol=1e-5)  # fmt: skip
    assert joint["accuracy"] == pytest.approx((pairs["chosen_score"] > pairs["rejected_score"]).mean())
    assert not np.allclose(pairs["chosen_score_preferred_first"], pairs["chosen_score_preferred_last"], atol=1e-4)
    assert "irrelevant_accuracy" not in report["joint"] and "irrelevant_accuracy" in report["independent"]
    # An independent checkpoint in the same CSV: empty cells; its per-pair file as before.
    independent = results[results["model"].str.endswith("independent")].iloc[0]
    assert independent[JOINT_COLUMNS].isna().all()
    assert pd.read_csv(report["independent"]["pairs_file"]).columns.tolist() == [
        "id", "category", "chosen_score", "rejected_score",
    ]  # fmt: skip
    log = next((tmp_path / "mixed" / "logs").glob("eval_*.log")).read_text()
    assert "with the preferred response first" in log


def test_an_independent_sweep_has_no_bias_columns(tmp_path, eval_rm, runs, synthetic_dir, tiny_model_dir):
    config = _config(tmp_path, "independent", [runs["independent"]], synthetic_dir, tiny_model_dir)
    assert eval_rm.main([config]) == 0
    results = pd.read_csv(tmp_path / "independent" / "evaluation_results.csv")
    assert not set(JOINT_COLUMNS) & set(results.columns)
    row = json.loads((tmp_path / "independent" / "evaluation_results.json").read_text())["results"][0]
    assert not set(JOINT_COLUMNS) & set(row)


def test_shards_carry_each_orders_rewards(runs, synthetic_dir):
    """eval_rm.py under torchrun: each rank scores every size-th batch (score_pairs(shard=...)) and rank 0 combines
    them (PairScores.combine): the per-order rewards of one process, exactly."""
    dataset, _ = load_preference_dataset(synthetic_dir / "eval.jsonl", max_samples=NUM_PAIRS)
    scorer = RewardScorer.from_pretrained(runs["joint"] / "checkpoint-1", dtype="float32", device="cpu")
    whole = scorer.score_pairs(dataset, batch_size=5, progress=False)
    shards = [scorer.score_pairs(dataset, batch_size=5, progress=False, shard=(rank, 2)) for rank in range(2)]
    assert all(np.isnan(shard.order_chosen).any() for shard in shards)  # each scored a part
    combined = PairScores.combine(shards)
    assert whole.order_chosen.shape == (NUM_PAIRS, 2)
    np.testing.assert_array_equal(combined.order_chosen, whole.order_chosen)
    np.testing.assert_array_equal(combined.order_rejected, whole.order_rejected)
