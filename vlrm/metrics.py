"""Preference metrics on reward arrays, shared by evaluation (``eval_rm.py``) and anything else that holds scores.

Pure functions on numpy arrays: no model, no I/O. ``chosen[i]`` and ``rejected[i]`` are the rewards of pair ``i``.

Ties: a pair with ``chosen == rejected`` counts as wrong, as RewardBench scores it (Lambert et al. 2024), and is
also counted on its own (``num_ties``), so a model that gives every response the same score reads 0.0, not 0.5.

Process rewards (a score per step, ``vlrm.use.process``): ``step_classification`` / ``step_metrics`` score steps by
VisualProcessBench's protocol (F1 of the correct and of the wrong steps and their mean, neutral steps left out), and
``best_of_n`` scores choosing one of a question's N solutions by their aggregated scores (ties to the lowest index).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

UNCATEGORIZED = "uncategorized"


def _as_reward_array(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} rewards must be one-dimensional, got shape {array.shape}")
    bad = int((~np.isfinite(array)).sum())
    if bad:
        raise ValueError(f"{name} rewards contain {bad} non-finite values (NaN or inf) of {array.size}")
    return array


def _check_pairs(chosen: Any, rejected: Any) -> tuple[np.ndarray, np.ndarray]:
    chosen, rejected = _as_reward_array(chosen, "chosen"), _as_reward_array(rejected, "rejected")
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen and rejected differ in length: {chosen.size} vs {rejected.size}")
    if chosen.size == 0:
        raise ValueError("no pairs to score")
    return chosen, rejected


def preference_metrics(chosen: Any, rejected: Any) -> dict[str, float | int]:
    """Accuracy (share of pairs with chosen > rejected; ties are wrong), tie count, and the margin
    ``chosen - rejected``: mean and population std (ddof=0, so one pair gives 0, not NaN)."""
    chosen, rejected = _check_pairs(chosen, rejected)
    margin = chosen - rejected
    return {
        "accuracy": float((margin > 0).mean()),
        "num_ties": int((margin == 0).sum()),
        "margin_mean": float(margin.mean()),
        "margin_std": float(margin.std()),
        "num_pairs": int(margin.size),
    }


def category_accuracy(correct: Any, categories: Any) -> tuple[dict[str, dict[str, float | int]], float | None]:
    """Accuracy and pair count per category, and their unweighted (macro) mean: VL-RewardBench reports both this
    and the pooled accuracy, because a large easy category can hide a small hard one. Pairs without a category go
    to ``"uncategorized"``; with no category at all, returns ``({}, None)``."""
    correct = np.asarray(correct, dtype=bool)
    labels = [UNCATEGORIZED if category is None else str(category) for category in categories]
    if len(labels) != correct.size:
        raise ValueError(f"{len(labels)} categories for {correct.size} pairs")
    if all(category is None for category in categories):
        return {}, None
    labels = np.asarray(labels, dtype=object)
    per_category = {
        label: {"accuracy": float(correct[labels == label].mean()), "num_pairs": int((labels == label).sum())}
        for label in sorted(set(labels))
    }
    macro = float(np.mean([values["accuracy"] for values in per_category.values()]))
    return per_category, macro


def bootstrap_interval(
    correct: Any, confidence: float = 0.95, num_resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval for accuracy (Efron & Tibshirani 1993), resampling pairs with replacement.

    The number of correct pairs in a resample of a 0/1 vector is Binomial(n, observed accuracy), so that is drawn
    directly: the same distribution as indexing ``n`` pairs ``num_resamples`` times, in O(num_resamples) memory
    (indexing would need num_resamples x n integers, 800 MB for 100k pairs)."""
    correct = np.asarray(correct, dtype=bool)
    if correct.size == 0:
        raise ValueError("no pairs to bootstrap")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    resampled = rng.binomial(correct.size, correct.mean(), size=num_resamples) / correct.size
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return float(low), float(high)


def reward_statistics(*rewards: Any) -> dict[str, float]:
    """Mean and population std over every scored response (chosen and rejected pooled): the constants to
    standardise this reward model's outputs before using them as an RL reward."""
    pooled = np.concatenate([_as_reward_array(values, "reward") for values in rewards])
    return {"reward_mean": float(pooled.mean()), "reward_std": float(pooled.std())}


def irrelevant_metrics(chosen: Any, irrelevant: Any) -> dict[str, float]:
    """How often a pair's chosen response scores higher under its own prompt than under an irrelevant one
    (``irrelevant[i, j]``: chosen_i under the j-th other prompt), and the mean of that margin. Ties count as wrong."""
    chosen = _as_reward_array(chosen, "chosen")
    irrelevant = np.asarray(irrelevant, dtype=np.float64)
    if irrelevant.ndim != 2 or irrelevant.shape[0] != chosen.size or not np.isfinite(irrelevant).all():
        raise ValueError(f"irrelevant rewards must be finite, shape ({chosen.size}, K); got {irrelevant.shape}")
    margin = chosen[:, None] - irrelevant
    return {"irrelevant_accuracy": float((margin > 0).mean()), "irrelevant_margin": float(margin.mean())}


def evaluate_pairs(
    chosen: Any, rejected: Any, categories: Any = None, seed: int = 0, num_resamples: int = 1000, groups: Any = None
) -> dict[str, Any]:
    """Every preference metric of one scored set: a flat dict of numbers plus ``per_category`` (a dict, empty when
    the rows carry no category). ``accuracy_ci_low``/``accuracy_ci_high`` bound a 95% bootstrap interval; with
    ``groups``, ``acc_plus`` (``group_accuracy``) and ``num_groups``, overall and in each category (MM-RLHF-RewardBench
    reports Acc+ per category too)."""
    chosen, rejected = _check_pairs(chosen, rejected)
    metrics: dict[str, Any] = preference_metrics(chosen, rejected)
    correct = chosen > rejected
    metrics["accuracy_ci_low"], metrics["accuracy_ci_high"] = bootstrap_interval(
        correct, num_resamples=num_resamples, seed=seed
    )
    per_category, macro = category_accuracy(correct, categories if categories is not None else [None] * correct.size)
    metrics["macro_accuracy"] = macro
    metrics["per_category"] = per_category
    metrics["acc_plus"], metrics["num_groups"] = group_accuracy(correct, groups)
    if metrics["acc_plus"] is not None and per_category:
        labels = np.asarray([UNCATEGORIZED if category is None else str(category) for category in categories])
        group_labels = np.asarray(list(groups), dtype=object)
        for label, values in per_category.items():
            in_category = labels == label
            values["acc_plus"], values["num_groups"] = group_accuracy(correct[in_category], group_labels[in_category])
    metrics.update(reward_statistics(chosen, rejected))
    return metrics


def group_accuracy(correct: Any, groups: Any) -> tuple[float | None, int]:
    """Acc+ (MM-RLHF-RewardBench): the share of groups whose pairs are **all** right (ties are wrong), and the number
    of groups. Pairs without a group count as groups of one; with no group at all, returns (None, 0)."""
    correct = np.asarray(correct, dtype=bool)
    if groups is None or all(group is None for group in groups):
        return None, 0
    frame = pd.DataFrame(
        {"group": [f"pair-{i}" if g is None else str(g) for i, g in enumerate(groups)], "correct": correct}
    )
    all_right = frame.groupby("group", sort=False)["correct"].all()
    return float(all_right.mean()), int(all_right.size)


def bias_diagnostics(
    chosen: Any, rejected: Any, chosen_lengths: Any = None, rejected_lengths: Any = None, positions: Any = None
) -> dict[str, Any]:
    """What reward-model users check for shortcuts: accuracy by where the preferred answer stood in the source row
    (position bias), the Spearman correlation of the reward with the response's length in tokens over every scored
    response (length bias), and the accuracy on the pairs whose preferred response is the shorter one."""
    chosen, rejected = _check_pairs(chosen, rejected)
    correct = chosen > rejected
    diagnostics: dict[str, Any] = {}
    if positions is not None and any(position is not None for position in positions):
        frame = pd.DataFrame({"position": positions, "correct": correct}).dropna()
        diagnostics["accuracy_by_preferred_position"] = {
            str(int(position)): {"accuracy": float(values.mean()), "num_pairs": int(values.size)}
            for position, values in frame.groupby("position")["correct"]
        }
    if (
        chosen_lengths is not None
        and rejected_lengths is not None
        and all(length is not None for length in list(chosen_lengths) + list(rejected_lengths))
    ):
        chosen_lengths, rejected_lengths = np.asarray(chosen_lengths), np.asarray(rejected_lengths)
        rewards = pd.Series(np.concatenate([chosen, rejected]))
        lengths = pd.Series(np.concatenate([chosen_lengths, rejected_lengths]))
        # Spearman's rho: the Pearson correlation of the ranks (ties share their mean rank).
        correlation = rewards.rank().corr(lengths.rank()) if lengths.nunique() > 1 and rewards.nunique() > 1 else None
        diagnostics["reward_length_spearman"] = (
            None if correlation is None or np.isnan(correlation) else float(correlation)
        )
        shorter = chosen_lengths < rejected_lengths
        diagnostics["accuracy_when_preferred_is_shorter"] = float(correct[shorter].mean()) if shorter.any() else None
        diagnostics["num_pairs_preferred_is_shorter"] = int(shorter.sum())
    return diagnostics


# ----------------------------------------------------------------------------------------------------------------
# Rows of N responses: rankings (ties allowed), scores, attribute ratings


def ranking_pairs(row_ranks: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, better response, worse response) of every ordered pair of a row's responses whose ranks differ (lower
    rank is better): a ranking binarised, so that every pair metric (accuracy, its interval, margins, per category)
    reads it as it reads pairs. Tied responses make no pair."""
    rows, better, worse = [], [], []
    for row, ranks in enumerate(row_ranks):
        for first, second in ((i, j) for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j]):
            rows.append(row), better.append(first), worse.append(second)
    return np.asarray(rows, dtype=np.int64), np.asarray(better, dtype=np.int64), np.asarray(worse, dtype=np.int64)


def kendall_tau_b(x: Any, y: Any) -> float | None:
    """Kendall's tau-b (Kendall 1945, "The treatment of ties in ranking problems"): concordant minus discordant pairs
    over the geometric mean of the pairs untied in x and in y; None when either is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    first, second = np.triu_indices(len(x), k=1)
    dx, dy = np.sign(x[first] - x[second]), np.sign(y[first] - y[second])
    untied_x, untied_y = np.count_nonzero(dx), np.count_nonzero(dy)
    if not untied_x or not untied_y:
        return None
    return float((dx * dy).sum() / np.sqrt(untied_x * untied_y))


def ranking_metrics(row_rewards: Any, row_ranks: Any) -> dict[str, Any]:
    """What users compare rankings by, per row of N responses:

    - ``top1_accuracy``: the share of rows whose highest reward is a best-ranked response; a row whose highest reward
      is shared by several responses counts only if every one of them is best-ranked (ties in reward count against
      the model, as ties count as wrong in pair accuracy);
    - ``kendall_tau``: Kendall's tau-b between the rewards and the ranking, averaged over the rows where it is defined;
    - ``ranking_accuracy``: the share of rows whose every strict pair is ordered right (Acc+ of a ranking);
    - ``tie_reward_gap``: the mean |r_i - r_j| over pairs the data ranks as tied (they make no pair for accuracy: a
      tie can be neither right nor wrong; the gap shows how far apart the model puts them).
    The pair accuracy over every strict pair comes from ``evaluate_pairs`` on ``ranking_pairs``."""
    top1, taus, fully_right, tie_gaps = [], [], [], []
    for rewards, ranks in zip(row_rewards, row_ranks, strict=True):
        rewards, ranks = np.asarray(rewards, dtype=np.float64), np.asarray(ranks, dtype=np.float64)
        highest = rewards == rewards.max()
        top1.append(bool((ranks[highest] == ranks.min()).all()))
        tau = kendall_tau_b(rewards, -ranks)
        if tau is not None:
            taus.append(tau)
        first, second = np.triu_indices(len(ranks), k=1)
        strict = ranks[first] != ranks[second]
        right = np.sign(rewards[first] - rewards[second]) == np.sign(ranks[second] - ranks[first])
        fully_right.append(bool(right[strict].all()))
        tie_gaps += np.abs(rewards[first] - rewards[second])[~strict].tolist()
    return {
        "num_rankings": len(top1),
        "top1_accuracy": float(np.mean(top1)),
        "kendall_tau": float(np.mean(taus)) if taus else None,
        "ranking_accuracy": float(np.mean(fully_right)),
        "num_tied_pairs": len(tie_gaps),
        "tie_reward_gap": float(np.mean(tie_gaps)) if tie_gaps else None,
    }


def attribute_metrics(predicted: Any, ratings: Any, names: list[str]) -> dict[str, dict[str, float]]:
    """Per attribute, over the rated responses (NaN ratings left out): ``mae`` and ``rmse`` of the attribute reward
    against the rating, and ``pairwise_accuracy``: within each row, over response pairs the rating orders, the share
    the attribute reward orders the same way (ties in reward wrong). ``predicted`` and ``ratings``: per row, [N, A]."""
    result = {}
    for column, name in enumerate(names):
        errors, correct = [], []
        for row_predicted, row_ratings in zip(predicted, ratings, strict=True):
            values, targets = np.asarray(row_predicted)[:, column], np.asarray(row_ratings)[:, column]
            known = ~np.isnan(targets)
            errors += (values[known] - targets[known]).tolist()
            values, targets = values[known], targets[known]
            first, second = np.triu_indices(len(targets), k=1)
            ordered = targets[first] != targets[second]
            correct += (np.sign(values[first] - values[second]) == np.sign(targets[first] - targets[second]))[
                ordered
            ].tolist()
        errors = np.asarray(errors)
        result[name] = {
            "mae": float(np.abs(errors).mean()) if errors.size else None,
            "rmse": float(np.sqrt((errors**2).mean())) if errors.size else None,
            "pairwise_accuracy": float(np.mean(correct)) if correct else None,
            "num_rated": int(errors.size),
        }
    return result


# ----------------------------------------------------------------------------------------------------------------
# Process rewards: each step's score against its label, and choosing one of N solutions by their scores


def _f1(true_positive: int, false_positive: int, false_negative: int) -> float | None:
    """F1 = 2 TP / (2 TP + FP + FN); None when the class is in neither the labels nor the predictions (undefined)."""
    denominator = 2 * true_positive + false_positive + false_negative
    return 2 * true_positive / denominator if denominator else None


def step_classification(scores: Any, labels: Any, threshold: float = 0.5) -> dict[str, float | int | None]:
    """VisualProcessBench's protocol (VisualPRM, Wang et al. 2025, arXiv 2503.10291, Sec. 3.3 and 4.2): each labelled
    step is a binary decision, predicted correct when its score (a probability) is above ``threshold``, wrong
    otherwise (a score equal to the threshold is wrong); a label is correct above 0.5 (1.0, or a soft label such as a
    Monte-Carlo estimate of 0.75), wrong otherwise (0.0, 0.25, and 0.5 itself). Neutral steps (NaN labels) are left out.

    - ``f1_correct``: F1 with the correct steps as the positive class; ``f1_wrong``: with the wrong steps as it;
    - ``macro_f1``: their mean, the paper's score (random guessing reads 0.5 whatever the class balance; a model that
      calls every step correct does not, unlike accuracy); None when either F1 is undefined (a class in neither the
      labels nor the predictions);
    - ``step_accuracy``: the share of labelled steps on the right side of the threshold;
    - ``num_steps`` (labelled), ``num_neutral_steps``, ``num_correct_steps``, ``num_wrong_steps`` (by label)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores and labels must be flat arrays of one length, got {scores.shape} and {labels.shape}")
    known = ~np.isnan(labels)
    if not np.isfinite(scores[known]).all():
        raise ValueError(f"{int((~np.isfinite(scores[known])).sum())} labelled steps have no finite score")
    predicted, actual = scores[known] > threshold, labels[known] > 0.5
    true_correct, true_wrong = int((predicted & actual).sum()), int((~predicted & ~actual).sum())
    false_correct, false_wrong = int((predicted & ~actual).sum()), int((~predicted & actual).sum())
    f1_correct = _f1(true_correct, false_correct, false_wrong)
    f1_wrong = _f1(true_wrong, false_wrong, false_correct)
    return {
        "f1_correct": f1_correct,
        "f1_wrong": f1_wrong,
        "macro_f1": None if f1_correct is None or f1_wrong is None else (f1_correct + f1_wrong) / 2,
        "step_accuracy": float((predicted == actual).mean()) if actual.size else None,
        "num_steps": int(actual.size),
        "num_neutral_steps": int((~known).sum()),
        "num_correct_steps": int(actual.sum()),
        "num_wrong_steps": int((~actual).sum()),
    }


def step_metrics(scores: Any, labels: Any, categories: Any = None, threshold: float = 0.5) -> dict[str, Any]:
    """``step_classification`` over every step pooled (VisualProcessBench's Overall: Table 3 of arXiv 2503.10291 calls
    it the micro average over its sources, that is, one F1 over all their steps), and in ``per_category`` the same
    per source (``categories[i]``: step i's row's category; None goes to ``"uncategorized"``; with no category at
    all, ``per_category`` is empty)."""
    metrics: dict[str, Any] = step_classification(scores, labels, threshold)
    metrics["per_category"] = {}
    if categories is not None and any(category is not None for category in categories):
        names = np.asarray([UNCATEGORIZED if category is None else str(category) for category in categories])
        if names.size != np.asarray(scores).size:
            raise ValueError(f"{names.size} categories for {np.asarray(scores).size} steps")
        scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
        metrics["per_category"] = {
            name: step_classification(scores[names == name], labels[names == name], threshold)
            for name in sorted(set(names))
        }
    return metrics


def best_of_n(row_scores: Any, row_correct: Any) -> dict[str, float | int | None]:
    """Best-of-N selection (as VisualPRM evaluates a PRM, arXiv 2503.10291, Sec. 4.1; Lightman et al. 2023, "Let's
    Verify Step by Step"), over the rows of two or more solutions (rows of one are left out: nothing to choose):

    - ``best_of_n``: the share of rows whose highest-scored solution is correct; a tie for the highest score goes to
      the solution listed first (the lowest index, as ``np.argmax``);
    - ``best_of_n_oracle``: the share of rows with at least one correct solution (what a perfect chooser reaches);
    - ``best_of_n_random``: the expected share when choosing uniformly at random (each row's share of correct
      solutions, averaged over the rows);
    - ``num_best_of_n_questions``: the rows counted. All None (count 0) when no row has two solutions.

    ``row_scores[i]``: the scores of row i's solutions (finite); ``row_correct[i]``: whether each is correct."""
    selected, oracle, expected = [], [], []
    for scores, correct in zip(row_scores, row_correct, strict=True):
        scores, correct = np.asarray(scores, dtype=np.float64), np.asarray(correct, dtype=bool)
        if scores.shape != correct.shape:
            raise ValueError(f"{scores.size} scores for {correct.size} solutions")
        if scores.size < 2:
            continue
        if not np.isfinite(scores).all():
            raise ValueError("best-of-N needs a finite score for every solution of a row")
        selected.append(bool(correct[int(np.argmax(scores))]))
        oracle.append(bool(correct.any()))
        expected.append(float(correct.mean()))
    if not selected:
        return {"best_of_n": None, "best_of_n_oracle": None, "best_of_n_random": None, "num_best_of_n_questions": 0}
    return {
        "best_of_n": float(np.mean(selected)),
        "best_of_n_oracle": float(np.mean(oracle)),
        "best_of_n_random": float(np.mean(expected)),
        "num_best_of_n_questions": len(selected),
    }
