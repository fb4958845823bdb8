"""The objectives (vlrm.train.objectives) on hand-made rewards: each formula against its definition, N-way against its
binarised pairs, the plain-pair path against the labelled one, and the data checks that run before any weight loads.
All in float64, compared to 1e-9 unless said otherwise: these are the same sums in another order."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vlrm.errors import ConfigError
from vlrm.layout.labels import reward_labels, reward_positions
from vlrm.train.objectives import LabelCounts, Objective, ObjectiveArguments, _tie_loss, _win_loss, check_objective

TOLERANCE = 1e-9


def ranking(ranks, scores=None, ratings=None, names=None):
    responses = [f"answer {index}" for index in range(len(ranks))]
    return {
        "responses": responses, "ranks": ranks, "scores": scores, "ratings": ratings, "rating_names": names,
        "chosen": responses[ranks.index(min(ranks))], "rejected": responses[ranks.index(max(ranks))],
    }  # fmt: skip


def pair(margin=None, tie=False):
    return {"chosen": "good", "rejected": "bad", "margin": margin, "tie": tie}


def labelled(examples):
    positions = reward_positions([len(example.get("responses") or [0, 0]) for example in examples])
    return reward_labels(examples, positions), positions


def objective(loss_type="bt", **settings):
    return Objective(ObjectiveArguments(loss_type=loss_type, **settings))


def nls(x: float) -> float:  # -log sigmoid(x)
    return math.log1p(math.exp(-x))


def test_bt_on_a_ranking_equals_bt_on_its_binarised_pairs():
    torch.manual_seed(0)
    rows = [ranking([2.0, 0.0, 3.0, 1.0]), ranking([1.0, 0.0, 2.0])]
    labels, positions = labelled(rows)
    rewards = torch.randn(labels.num_rewards, dtype=torch.float64)
    loss, parts = objective("bt")(rewards, 2, 0, labels=labels)
    pairs = [
        (rewards[where[i]], rewards[where[j]])
        for example, where in zip(rows, positions, strict=True)
        for i, j in itertools.permutations(range(len(where)), 2)
        if example["ranks"][i] < example["ranks"][j]
    ]
    assert len(pairs) == 6 + 3
    chosen, rejected = torch.stack([c for c, _ in pairs]), torch.stack([r for _, r in pairs])
    binarised, _ = objective("bt")(torch.cat([chosen, rejected]), len(pairs), 0)
    assert loss.item() == pytest.approx(binarised.item(), abs=TOLERANCE) and "bt_loss" in parts


def test_labelled_pairs_compute_what_plain_pairs_compute():
    """A tie elsewhere in the micro-batch makes it labelled: the pairs' terms must not change."""
    torch.manual_seed(1)
    rewards = torch.randn(6, dtype=torch.float64)
    margin = torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64)
    plain, _ = objective("bt")(rewards, 3, 0, margin)
    labels, _ = labelled([pair(0.5), pair(None), pair(1.0)])
    assert labels.better.tolist() == [0, 1, 2] and labels.worse.tolist() == [3, 4, 5]
    through_labels, _ = objective("bt")(rewards, 3, 0, labels=labels)
    assert through_labels.item() == pytest.approx(plain.item(), abs=TOLERANCE)


def test_plackett_luce_is_bradley_terry_on_a_pair_and_its_definition_on_a_ranking():
    torch.manual_seed(2)
    labels, _ = labelled([ranking([0.0, 1.0])])
    rewards = torch.randn(2, dtype=torch.float64)
    listwise, _ = objective("listwise")(rewards, 1, 0, labels=labels)
    assert listwise.item() == pytest.approx(nls((rewards[0] - rewards[1]).item()), abs=TOLERANCE)
    # A ranking of 4, best to worst 1, 3, 0, 2: PL's negative log-likelihood, term by term.
    labels, positions = labelled([ranking([2.0, 0.0, 3.0, 1.0])])
    rewards = torch.randn(4, dtype=torch.float64)
    order = [positions[0][index] for index in (1, 3, 0, 2)]
    expected = sum(torch.logsumexp(rewards[order[k:]], 0) - rewards[order[k]] for k in range(4)).item()
    listwise, _ = objective("listwise")(rewards, 1, 0, labels=labels)
    assert listwise.item() == pytest.approx(expected, abs=TOLERANCE)


def test_plackett_luce_ties_share_their_risk_set():
    """Breslow: two responses tied at the top each face both (and what is below); in the direction that separates
    the tied two, the loss is flat where their rewards are equal, and pulls them together otherwise."""
    labels, positions = labelled([ranking([0.0, 0.0, 1.0])])
    rewards = torch.tensor([0.3, -0.2, -1.0], dtype=torch.float64)
    a, b, c = (rewards[positions[0][index]] for index in range(3))
    expected = 2 * torch.logsumexp(torch.stack([a, b, c]), 0) - a - b + 0.0  # the last one alone: log e^c - c = 0
    listwise, _ = objective("listwise")(rewards, 1, 0, labels=labels)
    assert listwise.item() == pytest.approx(expected.item(), abs=TOLERANCE)
    tied, _ = labelled([ranking([0.0, 0.0, 1.0])])
    for gap in (0.0, 0.5):
        values = torch.tensor([gap, 0.0, -5.0], dtype=torch.float64, requires_grad=True)
        objective("listwise")(values, 1, 0, labels=tied)[0].backward()
        separating = (values.grad[0] - values.grad[1]).item()  # d loss / d(r_0 - r_1), up to a factor 2
        assert (abs(separating) < TOLERANCE) == (gap == 0.0) and separating >= -TOLERANCE


@pytest.mark.parametrize("tie_model", ["rao_kupper", "davidson"])
def test_tie_models_are_probability_distributions(tie_model):
    """P(i > j) + P(j > i) + P(tie) = 1 for any rewards; bt_ties reads a pair row's tie label and a ranking's ties."""
    args = ObjectiveArguments(loss_type="bt_ties", tie_model=tie_model, tie_strength=0.7)
    for first, second in ((0.0, 0.0), (1.3, -0.4), (-2.0, 3.0)):
        i, j = torch.tensor([first], dtype=torch.float64), torch.tensor([second], dtype=torch.float64)
        total = (-_win_loss(args, i, j)).exp() + (-_win_loss(args, j, i)).exp() + (-_tie_loss(args, i, j)).exp()
        assert total.item() == pytest.approx(1.0, abs=TOLERANCE), (tie_model, first, second)
    labels, _ = labelled([pair(tie=True), pair()])
    assert labels.tie_first.tolist() == [0] and labels.tie_second.tolist() == [2] and labels.better.tolist() == [1]
    rewards = torch.tensor([0.2, 1.0, -0.1, 0.0], dtype=torch.float64)
    loss, _ = Objective(args)(rewards, 2, 0, labels=labels)
    expected = (_tie_loss(args, rewards[:1], rewards[2:3]) + _win_loss(args, rewards[1:2], rewards[3:])) / 2
    assert loss.item() == pytest.approx(expected.item(), abs=TOLERANCE)


def test_hps_is_softmax_cross_entropy_with_the_best_as_target():
    labels, positions = labelled([ranking([1.0, 0.0, 2.0, 0.0])])  # two responses share the top
    rewards = torch.tensor([0.1, 0.9, -0.3, 0.4], dtype=torch.float64)
    temperature = 0.5
    log_probabilities = torch.log_softmax(rewards[positions[0]] / temperature, 0)
    expected = -(log_probabilities[1] + log_probabilities[3]) / 2
    hps, _ = objective("hps", hps_temperature=temperature)(rewards, 1, 0, labels=labels)
    assert hps.item() == pytest.approx(expected.item(), abs=TOLERANCE)
    plain, _ = objective("hps", hps_temperature=temperature)(torch.tensor([0.9, 0.1], dtype=torch.float64), 1, 0)
    assert plain.item() == pytest.approx(nls((0.9 - 0.1) / temperature), abs=TOLERANCE)


def test_mse_regresses_scores_and_named_attribute_ratings():
    labels, _ = labelled([ranking([0.0, 1.0], scores=[4.0, 2.0])])
    rewards = torch.tensor([3.0, 2.5], dtype=torch.float64)
    mse, _ = objective("mse")(rewards, 1, 0, labels=labels)
    assert mse.item() == pytest.approx(((3.0 - 4.0) ** 2 + (2.5 - 2.0) ** 2) / 2, abs=TOLERANCE)
    # The model's attributes are (truth, help), the data rates (help, truth): matched by name. The first response's
    # truth is not rated (NaN): left out.
    labels, _ = labelled([ranking([0.0, 1.0], ratings=[[5.0, math.nan], [1.0, 3.0]], names=["help", "truth"])])
    attribute_rewards = torch.tensor([[0.0, 4.0], [2.0, 2.0]], dtype=torch.float64)  # [response, (truth, help)]
    mse = Objective(ObjectiveArguments(loss_type="mse"), attributes=("truth", "help"))
    value, _ = mse(torch.zeros(2, dtype=torch.float64), 1, 0, labels=labels, attribute_rewards=attribute_rewards)
    assert value.item() == pytest.approx(((4 - 5) ** 2 + (2 - 3) ** 2 + (2 - 1) ** 2) / 3, abs=TOLERANCE)


def test_centring_and_the_irrelevant_term_generalise_the_pair_ones():
    rewards = torch.tensor([1.0, 0.5, 0.0, 1.5, 0.2, 2.0], dtype=torch.float64)  # 2 pairs, 1 irrelevant each
    loss, parts = Objective(ObjectiveArguments(), 0.1, 0.7)(rewards, 2, 1)
    bt = (nls(1.0) + nls(0.5 - 1.5)) / 2
    center = 0.1 * ((1.0 + 0.0) ** 2 + (0.5 + 1.5) ** 2) / 2
    irrelevant = (nls(1.0 - 0.2) + nls(0.5 - 2.0)) / 2
    assert loss.item() == pytest.approx(bt + center + 0.7 * irrelevant, abs=TOLERANCE)
    labels, _ = labelled([pair(), pair(tie=True)])  # labelled: the same centring and irrelevant terms
    args = ObjectiveArguments(loss_type="bt_ties", tie_strength=0.5)
    labelled_loss, labelled_parts = Objective(args, 0.1, 0.7)(rewards, 2, 1, labels=labels)
    assert labelled_parts["irrelevant_loss"].item() == pytest.approx(irrelevant, abs=TOLERANCE)
    terms = (_win_loss(args, rewards[:1], rewards[2:3]) + _tie_loss(args, rewards[1:2], rewards[3:4])) / 2
    assert labelled_loss.item() == pytest.approx(terms.item() + center + 0.7 * irrelevant, abs=TOLERANCE)


class Rows(list):
    """A list of rows with the column access LabelCounts reads (a stand-in for a prepared datasets.Dataset)."""

    column_names = ("ranks", "scores", "rating_names", "tie")

    def select_columns(self, names):
        return self

    def iter(self, batch_size):
        yield {name: [row.get(name) for row in self] for name in self.column_names}


@pytest.mark.parametrize(
    "rows, settings, message",
    [
        ([pair(tie=True), pair()], {"loss_type": "bt"}, "have tied responses, which loss_type bt cannot learn"),
        ([ranking([0.0, 0.0, 1.0])], {"loss_type": "bt"}, "set loss_type bt_ties"),
        ([pair(), ranking([0.0, 1.0], scores=[1.0, 0.0])], {"loss_type": "mse"}, "1 of 2 training rows have none"),
        ([ranking([0.0, 1.0], ratings=[[1.0], [0.0]], names=["help"])],
         {"loss_type": "mse", "reward_attributes": ["help", "truth"]}, "no row rates \\['truth'\\]"),
    ],
)  # fmt: skip
def test_an_objective_the_data_cannot_feed_fails_before_any_weight_loads(rows, settings, message):
    config = type("Config", (), {"reward_attributes": None, **settings})()
    with pytest.raises(ConfigError, match=message):
        check_objective(config, LabelCounts.of(Rows(rows)))


def test_data_that_feeds_the_objective_passes():
    for settings, rows in (
        ({"loss_type": "bt_ties"}, [pair(tie=True), pair()]),
        ({"loss_type": "listwise"}, [ranking([0.0, 0.0, 1.0]), pair()]),
        ({"loss_type": "mse"}, [ranking([0.0, 1.0], scores=[1.0, 0.0])]),
    ):
        config = type("Config", (), {"reward_attributes": None, **settings})()
        check_objective(config, LabelCounts.of(Rows(rows)))


def test_the_trainer_s_ranking_metrics_are_the_eval_metrics():
    """The per-row metrics the trainer logs (vectorised, on the device) equal vlrm.metrics' row-by-row definitions."""
    from vlrm.metrics import ranking_metrics
    from vlrm.train.trainer import ranking_rows

    examples = [ranking([0, 1, 1, 2]), pair(), ranking([0, 0, 1]), ranking([1, 1])]
    positions = reward_positions([4, 2, 3, 2])
    labels = reward_labels(examples, positions)
    for seed in range(5):
        rewards = torch.randn(11, generator=torch.Generator().manual_seed(seed))
        rewards[positions[3][1]] = rewards[positions[3][0]]  # equal rewards on a tie: tau undefined there
        rows = ranking_rows(rewards, labels)
        row_rewards = [[rewards[p].item() for p in where] for where in positions]
        expected = ranking_metrics(row_rewards, [[0, 1, 1, 2], [0, 1], [0, 0, 1], [1, 1]])
        taus = rows["kendall_tau"][~rows["kendall_tau"].isnan()]
        assert rows["top1"].mean().item() == pytest.approx(expected["top1_accuracy"])
        assert taus.mean().item() == pytest.approx(expected["kendall_tau"], abs=1e-6)
        assert rows["ties"].sum() == expected["num_tied_pairs"] == 3
        assert (rows["tie_gap"].sum() / rows["ties"].sum()).item() == pytest.approx(
            expected["tie_reward_gap"], abs=1e-6
        )
        strict = [(win, loss) for where, ranks in zip(positions, [[0, 1, 1, 2], [0, 1], [0, 0, 1], [1, 1]], strict=True)
                  for i, win in enumerate(where) for j, loss in enumerate(where) if ranks[i] < ranks[j]]  # fmt: skip
        assert rows["pairs"].sum() == len(strict)
        assert rows["correct"].sum() == sum(rewards[win] > rewards[loss] for win, loss in strict)


def test_a_learnable_scale_with_regression_fails_at_the_config():
    """mse never reads the scale: it would get no gradient (DDP refuses such a parameter), so the config says so."""

    class WithScale(ObjectiveArguments):
        learnable_reward_scale = True

    with pytest.raises(ConfigError, match="learnable_reward_scale .* mse"):
        WithScale(loss_type="mse")._check_objective_arguments()
    WithScale(loss_type="hps")._check_objective_arguments()
