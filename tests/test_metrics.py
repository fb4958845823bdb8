import numpy as np
import pytest

from vlrm.metrics import (
    bootstrap_interval,
    category_accuracy,
    evaluate_pairs,
    preference_metrics,
    reward_statistics,
)


def test_ties_count_as_wrong_and_are_reported():
    chosen = np.array([2.0, 1.0, 0.5, 3.0])
    rejected = np.array([1.0, 1.0, 0.5, 4.0])
    metrics = preference_metrics(chosen, rejected)
    assert metrics["accuracy"] == 0.25
    assert metrics["num_ties"] == 2
    assert metrics["num_pairs"] == 4


def test_model_that_scores_everything_the_same_reads_zero_not_half():
    assert preference_metrics(np.ones(10), np.ones(10))["accuracy"] == 0.0


def test_margin_mean_and_population_std():
    metrics = preference_metrics([3.0, 1.0, 0.0], [1.0, 1.0, 1.0])  # margins 2, 0, -1
    assert metrics["margin_mean"] == pytest.approx(1 / 3)
    assert metrics["margin_std"] == pytest.approx(np.std([2.0, 0.0, -1.0]))
    assert preference_metrics([1.0], [0.0])["margin_std"] == 0.0


def test_per_category_and_macro_differ_from_pooled_accuracy():
    # 8 easy pairs all right, 2 hard pairs all wrong: pooled 0.8, macro 0.5.
    correct = np.array([True] * 8 + [False] * 2)
    categories = ["easy"] * 8 + ["hard"] * 2
    per_category, macro = category_accuracy(correct, categories)
    assert per_category == {"easy": {"accuracy": 1.0, "num_pairs": 8}, "hard": {"accuracy": 0.0, "num_pairs": 2}}
    assert macro == 0.5
    assert correct.mean() == 0.8


def test_rows_without_category_give_no_macro_and_mixed_ones_go_to_uncategorized():
    assert category_accuracy([True, False], [None, None]) == ({}, None)
    per_category, macro = category_accuracy([True, False, False], ["a", None, None])
    assert per_category == {"a": {"accuracy": 1.0, "num_pairs": 1}, "uncategorized": {"accuracy": 0.0, "num_pairs": 2}}
    assert macro == 0.5


def test_bootstrap_interval_matches_resampling_pairs():
    rng = np.random.default_rng(1)
    correct = rng.random(300) < 0.7
    low, high = bootstrap_interval(correct, num_resamples=4000, seed=0)
    # The same percentile bootstrap done the slow way: resample pair indices with replacement.
    indices = rng.integers(0, correct.size, size=(4000, correct.size))
    naive_low, naive_high = np.percentile(correct[indices].mean(axis=1), [2.5, 97.5])
    assert low < correct.mean() < high
    assert low == pytest.approx(naive_low, abs=0.015)
    assert high == pytest.approx(naive_high, abs=0.015)


def test_bootstrap_interval_is_seeded_and_narrows_with_more_pairs():
    correct = np.array([True, False] * 50)
    assert bootstrap_interval(correct, seed=3) == bootstrap_interval(correct, seed=3)
    low, high = bootstrap_interval(correct)
    wide_low, wide_high = bootstrap_interval(correct[:20])
    assert (high - low) < (wide_high - wide_low)
    assert bootstrap_interval(np.ones(30, dtype=bool)) == (1.0, 1.0)


def test_reward_statistics_pool_chosen_and_rejected():
    stats = reward_statistics([1.0, 3.0], [5.0, 7.0])
    assert stats["reward_mean"] == 4.0
    assert stats["reward_std"] == pytest.approx(np.std([1.0, 3.0, 5.0, 7.0]))


def test_evaluate_pairs_combines_everything():
    chosen = np.array([1.0, 2.0, 0.0, 1.0], dtype=np.float32)
    rejected = np.array([0.0, 3.0, 0.0, 0.5], dtype=np.float32)
    metrics = evaluate_pairs(chosen, rejected, ["a", "a", "b", "b"], seed=0)
    assert metrics["accuracy"] == 0.5
    assert metrics["num_ties"] == 1
    assert metrics["per_category"]["a"]["accuracy"] == 0.5
    assert metrics["macro_accuracy"] == 0.5
    assert metrics["accuracy_ci_low"] <= 0.5 <= metrics["accuracy_ci_high"]
    assert metrics["reward_mean"] == pytest.approx(np.concatenate([chosen, rejected]).mean())
    assert evaluate_pairs(chosen, rejected)["per_category"] == {}


@pytest.mark.parametrize(
    ("chosen", "rejected", "message"),
    [
        ([1.0, np.nan], [0.0, 0.0], "non-finite"),
        ([1.0, 2.0], [0.0], "differ in length"),
        ([], [], "no pairs"),
    ],
)
def test_bad_score_arrays_raise(chosen, rejected, message):
    with pytest.raises(ValueError, match=message):
        evaluate_pairs(chosen, rejected)


def test_irrelevant_metrics_by_hand():
    from vlrm.metrics import irrelevant_metrics

    chosen = np.array([1.0, 0.0])
    irrelevant = np.array([[0.5, 1.0], [-1.0, -2.0]])  # margins 0.5, 0 (a tie: wrong), 1, 2
    metrics = irrelevant_metrics(chosen, irrelevant)
    assert metrics == {"irrelevant_accuracy": pytest.approx(0.75), "irrelevant_margin": pytest.approx(3.5 / 4)}
    with pytest.raises(ValueError, match="shape"):
        irrelevant_metrics(chosen, np.array([0.5, 1.0]))
