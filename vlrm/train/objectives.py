"""The objectives a reward model trains with (``loss_type``), each formula once, with its paper.

A micro-batch's rewards come in the order of ``vlrm.layout.labels``: ``R`` response rewards, then ``K`` irrelevant
branches per row. A micro-batch of plain pairs carries ``num_pairs`` and ``margin``; one with a ranking, a tie or a
score also carries ``reward_labels`` (``RewardLabels``: the strict pairs, the tied pairs, each row's ranks, the targets). ``s``
below is the learnable logit scale (``learnable_reward_scale``, ``vlrm.model.heads``), 1 without it.

- ``bt``: Bradley-Terry (Bradley & Terry 1952) over every strict pair ``w`` better than ``l``:
  ``-log sigmoid(s (r_w - r_l) - m)``, ``m`` a pair row's margin (Touvron et al. 2023, Llama 2). A ranking of N
  contributes all its pairs with different ranks, each as one pair: the loss equals that of its binarised pairs.
- ``bt_ties``: the same, and tied pairs count too. Rao-Kupper (Rao & Kupper 1967, JASA 62): with ``c = log theta > 0``,
  ``P(w > l) = sigmoid(d - c)`` and ``P(tie) = 1 - sigmoid(d - c) - sigmoid(-d - c)`` for ``d = s (r_w - r_l)``,
  i.e. ``log P(tie) = log(theta^2 - 1) - softplus(c - d) - softplus(c + d)``. Or Davidson (Davidson 1970, JASA 65):
  ``P(w > l) = e^{r_w} / D`` and ``P(tie) = nu sqrt(e^{r_w} e^{r_l}) / D`` with ``D`` their sum plus ``e^{r_l}``.
  ``tie_strength`` is ``log theta`` or ``log nu``. The loss is the mean negative log-likelihood over pairs and ties.
- ``listwise``: Plackett-Luce (Plackett 1975; Luce 1959), the negative log-likelihood of each row's ranking,
  ``sum_k [logsumexp_{j: rank_j >= rank_k} s r_j - s r_k]``, averaged over rows; tied responses share their risk set,
  Breslow's approximation (Breslow 1974). On a pair it is exactly ``bt``.
- ``hps``: softmax cross-entropy over a row's N responses, the best as the target (ties at the top share it), with a
  temperature: ``-log softmax(s r / tau)_best``, the objective of HPS v2 (Wu et al. 2023, arXiv 2306.09341) and of
  LightRFT's reward trainer.
- ``mse``: pointwise regression, ``(r - y)^2`` on each response's score, or, with attribute heads
  (``reward_attributes``), on each attribute's rating (VLFeedback's three aspects; NaN targets, not rated, left out).

With ``reward_type: process`` (``vlrm.layout.steps``) the loss is instead the **step loss**: binary cross-entropy
of each labelled step's reward read as a logit, ``-[y log sigmoid(s r) + (1 - y) log sigmoid(-s r)]``, averaged over
the labelled steps (neutral ones left out), on hard labels (correct / wrong: PRM800K's per-step classification,
Lightman et al. 2023, "Let's Verify Step by Step", arXiv 2305.20050) or soft ones (a Monte-Carlo estimate of reaching
the right answer from the step: Math-Shepherd, Wang et al. 2024, arXiv 2312.08935; VisualPRM, Wang et al. 2025, arXiv
2503.10291, whose VisualPRM400K labels these are); ``train_on_last_step_only`` keeps each solution's last step.

Every outcome objective adds, when set, TRL's reward centring ``c * mean_rows (2 mean_k r_k)^2`` (Eisenstein et al. 2023; on a pair
``c (r_w + r_l)^2``, as before) and the irrelevant-query term ``mean -log sigmoid(s (r(prompt_i, best_i) -
r(prompt_j, best_i)))`` weighted by ``irrelevant_loss_weight`` (``vlrm.train.irrelevant``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from vlrm.errors import ConfigError
from vlrm.layout.labels import RewardLabels
from vlrm.layout.padded import split_rewards

LOSS_TYPES = ("bt", "bt_ties", "listwise", "hps", "mse")


@dataclass
class ObjectiveArguments:
    """The loss (``loss_type``) and its settings; ``TrainConfig`` inherits these fields."""

    loss_type: Literal["bt", "bt_ties", "listwise", "hps", "mse"] = field(
        default="bt",
        metadata={
            "help": "bt: Bradley-Terry over every strict pair (a ranking of N: all its pairs). bt_ties: Bradley-Terry "
            "with ties (tie_model). listwise: Plackett-Luce over each row's ranking, ties sharing their risk set. "
            "hps: softmax cross-entropy over each row's responses, the best as target (hps_temperature). mse: "
            "regression on each response's score, or on each attribute's rating with reward_attributes."
        },
    )
    tie_model: Literal["rao_kupper", "davidson"] = field(
        default="rao_kupper",
        metadata={"help": "How bt_ties gives a tie its probability: Rao-Kupper (1967) or Davidson (1970)."},
    )
    tie_strength: float = field(
        default=1.0,
        metadata={
            "help": "bt_ties: log theta of Rao-Kupper (> 0; the larger, the wider a reward difference still reads as a "
            "tie) or log nu of Davidson."
        },
    )
    hps_temperature: float = field(default=1.0, metadata={"help": "hps: the softmax temperature tau (> 0)."})

    def _check_objective_arguments(self) -> None:
        if self.loss_type == "bt_ties" and self.tie_model == "rao_kupper" and self.tie_strength <= 0:
            raise ConfigError(f"tie_strength is Rao-Kupper's log theta and must be > 0, got {self.tie_strength}.")
        if self.hps_temperature <= 0:
            raise ConfigError(f"hps_temperature must be > 0, got {self.hps_temperature}.")
        if self.loss_type == "mse" and getattr(self, "learnable_reward_scale", False):
            # Regression reads the rewards themselves: the scale would get no gradient (and DDP fails on a parameter
            # without one).
            raise ConfigError(
                "learnable_reward_scale scales reward differences for the ranking losses; loss_type mse regresses the "
                "rewards themselves and never uses it: unset learnable_reward_scale, or use bt, bt_ties, listwise or hps."
            )


# ----------------------------------------------------------------------------------------------------------------
# The losses, on labelled micro-batches


def _pair_loss(better: torch.Tensor, worse: torch.Tensor, margin: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-pair Bradley-Terry negative log-likelihood ``-log sigmoid(s (r_w - r_l) - m)``."""
    return -F.logsigmoid(scale * (better - worse) - margin)


def _win_loss(args: ObjectiveArguments, better: torch.Tensor, worse: torch.Tensor) -> torch.Tensor:
    """Per-pair negative log-likelihood of ``better`` winning under the tie model (scaled rewards, margin applied)."""
    if args.tie_model == "rao_kupper":
        return F.softplus(args.tie_strength - (better - worse))  # -log sigmoid(d - c)
    # Davidson: P(w > l) = e^{r_w} / (e^{r_w} + e^{r_l} + nu e^{(r_w + r_l) / 2})
    denominator = torch.logsumexp(torch.stack([better, worse, args.tie_strength + (better + worse) / 2]), dim=0)
    return denominator - better


def _tie_loss(args: ObjectiveArguments, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Per-pair negative log-likelihood of a tie under the tie model (scaled rewards)."""
    strength = args.tie_strength
    if args.tie_model == "rao_kupper":
        log_theta_term = math.log(math.expm1(2 * strength))  # log(theta^2 - 1)
        return F.softplus(strength - (first - second)) + F.softplus(strength + (first - second)) - log_theta_term
    denominator = torch.logsumexp(torch.stack([first, second, strength + (first + second) / 2]), dim=0)
    return denominator - (strength + (first + second) / 2)


def _tie_losses(args: ObjectiveArguments, rewards: torch.Tensor, labels: RewardLabels, scale) -> torch.Tensor:
    """The strict pairs' and the ties' negative log-likelihoods (module docstring), concatenated; a pair row's margin
    lowers its better response, as in bt."""
    better, worse = rewards[labels.better] * scale - labels.margin, rewards[labels.worse] * scale
    return torch.cat(
        [
            _win_loss(args, better, worse),
            _tie_loss(args, rewards[labels.tie_first] * scale, rewards[labels.tie_second] * scale),
        ]
    )


def _row_matrix(rewards: torch.Tensor, labels: RewardLabels, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """([rows, N_max] scaled rewards with -inf pads, [rows, N_max] valid mask)."""
    valid = labels.matrix >= 0
    matrix = rewards[labels.matrix.clamp(min=0)] * scale
    return matrix.masked_fill(~valid, -math.inf), valid


def _listwise_loss(rewards: torch.Tensor, labels: RewardLabels, scale) -> torch.Tensor:
    """Per-row Plackett-Luce negative log-likelihood, ties by Breslow's risk sets (module docstring)."""
    matrix, valid = _row_matrix(rewards, labels, scale)
    ranks = labels.matrix_ranks
    # risk[b, k, j]: response j is still in play when response k is placed (rank_j >= rank_k).
    risk = (ranks[:, None, :] >= ranks[:, :, None]) & valid[:, None, :] & valid[:, :, None]
    denominators = torch.logsumexp(matrix[:, None, :].masked_fill(~risk, -math.inf), dim=-1)
    terms = (denominators - matrix).masked_fill(~valid, 0.0)
    return terms.sum(-1)


def _hps_loss(args: ObjectiveArguments, rewards: torch.Tensor, labels: RewardLabels, scale) -> torch.Tensor:
    """Per-row softmax cross-entropy, the best-ranked responses as the (shared) target."""
    matrix, valid = _row_matrix(rewards, labels, scale)
    log_probabilities = torch.log_softmax(matrix / args.hps_temperature, dim=-1)
    ranks = labels.matrix_ranks
    target = (ranks == ranks.min(-1, keepdim=True).values) & valid
    target = target.float() / target.sum(-1, keepdim=True)
    return -(target * log_probabilities.masked_fill(~valid, 0.0)).sum(-1)


def _mse_loss(rewards, labels: RewardLabels, attribute_rewards, attributes: tuple[str, ...]) -> torch.Tensor:
    """Squared errors against every known target: attribute ratings with attribute heads, else scores."""
    if attributes:
        columns = [labels.rating_names.index(name) for name in attributes]
        targets = labels.ratings[:, columns]
        predictions = attribute_rewards[: targets.shape[0]]
    else:
        targets = labels.scores[:, None]
        predictions = rewards[: targets.shape[0], None]
    known = ~torch.isnan(targets)
    return (predictions - targets.nan_to_num())[known] ** 2


@dataclass
class Objective:
    """The loss of a micro-batch and what it logs; built once per run from the config (``objective_of``)."""

    args: ObjectiveArguments
    center_rewards_coefficient: float | None = None
    irrelevant_loss_weight: float = 1.0
    attributes: tuple[str, ...] = ()  # the model's attribute heads (vlrm.model.heads), for mse on ratings

    def __call__(self, rewards: torch.Tensor, num_pairs: int, num_irrelevant: int, margin: torch.Tensor | None = None,
                 labels: RewardLabels | None = None, logit_scale: torch.Tensor | None = None,
                 attribute_rewards: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:  # fmt: skip
        """(loss, parts): ``parts`` holds the loss terms and the per-example values the trainer logs."""
        scale = 1.0 if logit_scale is None else logit_scale
        if labels is None:  # plain pairs: the computation of every release before N-way rows
            chosen, rejected, irrelevant = split_rewards(rewards, num_pairs, num_irrelevant)
            margin = torch.zeros_like(chosen) if margin is None else margin.to(chosen)
            labels_free = self._pairs(chosen, rejected, margin, scale)
            return self._add_terms(labels_free, rewards[: 2 * num_pairs].reshape(2, num_pairs).T, chosen, irrelevant,
                                   scale)  # fmt: skip
        total = labels.num_rewards
        responses = rewards[:total]
        irrelevant = rewards[total:].reshape(num_pairs, num_irrelevant)
        loss, parts = self._labelled(responses, labels, scale, attribute_rewards)
        matrix, valid = _row_matrix(responses, labels, 1.0)
        row_means = matrix.masked_fill(~valid, 0.0).sum(-1) / valid.sum(-1)
        return self._add_terms((loss, parts), row_means[:, None], responses[labels.best], irrelevant, scale)

    def _pairs(self, chosen, rejected, margin, scale) -> tuple[torch.Tensor, dict]:
        if self.args.loss_type not in ("bt", "bt_ties", "listwise", "hps"):
            raise ValueError(f"loss_type {self.args.loss_type} needs scores or ratings; a pair has neither")
        kind = self.args.loss_type
        temperature = self.args.hps_temperature if kind == "hps" else 1.0
        # On a strict pair bt and bt_ties are Bradley-Terry with the margin, and listwise (Plackett-Luce) and hps (a
        # softmax over two) are Bradley-Terry without one, hps at temperature tau: as on labelled micro-batches.
        if kind in ("listwise", "hps"):
            margin = torch.zeros_like(margin)
        if kind == "bt_ties":
            per_pair = _win_loss(self.args, chosen * scale - margin, rejected * scale)
        else:
            per_pair = _pair_loss(chosen / temperature, rejected / temperature, margin, scale)
        loss = per_pair.mean()
        return loss, {f"{self.args.loss_type}_loss": loss}

    def _labelled(self, responses, labels: RewardLabels, scale, attribute_rewards) -> tuple[torch.Tensor, dict]:
        kind = self.args.loss_type
        if kind == "bt":
            terms = _pair_loss(responses[labels.better], responses[labels.worse], labels.margin, scale)
        elif kind == "bt_ties":
            terms = _tie_losses(self.args, responses, labels, scale)
        elif kind == "listwise":
            terms = _listwise_loss(responses, labels, scale)
        elif kind == "hps":
            terms = _hps_loss(self.args, responses, labels, scale)
        else:
            terms = _mse_loss(responses, labels, attribute_rewards, self.attributes)
        if terms.numel() == 0:
            raise ValueError(f"this micro-batch has nothing loss_type {kind} can learn from (no pair, tie or target)")
        loss = terms.mean()
        return loss, {f"{kind}_loss": loss}

    def _add_terms(self, loss_parts, row_rewards: torch.Tensor, best: torch.Tensor, irrelevant: torch.Tensor,
                   scale) -> tuple[torch.Tensor, dict]:  # fmt: skip
        """Centring (``row_rewards``: each row's rewards, or their mean) and the irrelevant-query term."""
        loss, parts = loss_parts
        if self.center_rewards_coefficient:
            # 2 x the row's mean reward: (r_w + r_l) on a pair, TRL's centring term.
            loss = loss + self.center_rewards_coefficient * torch.mean((2 * row_rewards.mean(-1)) ** 2)
        if irrelevant is not None and irrelevant.numel():
            parts["irrelevant_loss"] = -F.logsigmoid(scale * (best[:, None] - irrelevant)).mean()
            loss = loss + self.irrelevant_loss_weight * parts["irrelevant_loss"]
        return loss, parts


def step_loss(rewards: torch.Tensor, labels: Any, scale: Any = 1.0, last_only: bool = False
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """The step loss (module docstring) of a micro-batch of process rows: ``rewards`` one per step, ``labels`` its
    ``vlrm.layout.steps.StepLabels``. Returns the loss and, for the logs, ``step_correct`` (each hard-labelled step:
    1 when sigmoid(r) falls on the label's side of 0.5) and ``step_loss``."""
    targets = labels.labels.to(rewards.device)
    keep = ~torch.isnan(targets)
    if last_only:
        keep &= labels.last.to(rewards.device)
    if not keep.any():
        raise ValueError("this micro-batch has no labelled step to learn from (every step neutral)")
    logits = scale * rewards[keep].float()
    loss = F.binary_cross_entropy_with_logits(logits, targets[keep])
    hard = (targets[keep] != 0.5).detach()
    correct = ((logits.detach() > 0) == (targets[keep] > 0.5))[hard].float()
    return loss, {"step_loss": loss, "step_correct": correct}


def objective_of(config: Any, attributes: tuple[str, ...] = ()) -> Objective:
    """The run's ``Objective`` from a TrainConfig (``loss_type`` and its settings, centring, the irrelevant term)."""
    return Objective(config, config.center_rewards_coefficient, config.irrelevant_loss_weight, tuple(attributes))


# ----------------------------------------------------------------------------------------------------------------
# Can the data feed the objective? Checked on the prepared set, before any weight is loaded


@dataclass
class LabelCounts:
    """What a prepared set's rows carry, for ``check_objective``."""

    rows: int = 0
    rankings: int = 0  # rows of N responses
    ties: int = 0  # rows with at least two equally ranked responses (a tie pair, or a ranking with a tie)
    scored: int = 0
    rated: int = 0
    rating_names: set[str] = field(default_factory=set)
    step_rows: int = 0  # rows of step-labelled solutions (vlrm.data.steps)

    @classmethod
    def of(cls, dataset: Any) -> LabelCounts:
        counts = cls(rows=len(dataset))
        names = [name for name in ("ranks", "scores", "rating_names", "tie") if name in dataset.column_names]
        if "step_labels" in dataset.column_names:
            steps = dataset.select_columns(["step_labels"]).with_format("arrow")
            import pyarrow.compute as pc

            for batch in steps.iter(batch_size=65536):
                counts.step_rows += pc.sum(pc.is_valid(batch.column("step_labels"))).as_py() or 0
        for batch in dataset.select_columns(names).iter(batch_size=4096):
            empty = [None] * len(batch[names[0]])
            for ranks, scores, rating_names, tie in zip(*(batch.get(name, empty) for name in ("ranks", "scores",
                                                        "rating_names", "tie")), strict=True):  # fmt: skip
                counts.rankings += ranks is not None
                counts.ties += bool(tie) or (ranks is not None and len(set(ranks)) < len(ranks))
                counts.scored += scores is not None
                if rating_names:
                    counts.rated += 1
                    counts.rating_names.update(rating_names)
        return counts


def check_objective(config: Any, counts: LabelCounts) -> None:
    """Raise ``ConfigError`` (saying what to change) when the training set cannot feed ``loss_type``; warn when a
    setting will do nothing."""
    kind, attributes = config.loss_type, tuple(getattr(config, "reward_attributes", None) or ())
    if getattr(config, "reward_type", "outcome") == "process":
        if counts.step_rows < counts.rows:
            raise ConfigError(
                f"reward_type process learns from step labels, and {counts.rows - counts.step_rows} of {counts.rows} "
                "training rows have none: use rows of solutions split into steps with a label per step "
                "(vlrm.data.steps: steps + step_labels, VisualPRM400K, VisualProcessBench), or reward_type outcome."
            )
        return
    if counts.step_rows:
        raise ConfigError(
            f"{counts.step_rows} of {counts.rows} training rows are step-labelled solutions (vlrm.data.steps): set "
            "reward_type: process to train a process reward on them."
        )
    if kind == "bt" and counts.ties:
        raise ConfigError(
            f"{counts.ties} of {counts.rows} training rows have tied responses, which loss_type bt cannot learn from: "
            "set loss_type bt_ties (Bradley-Terry with ties), listwise or hps, or leave the tied rows out."
        )
    if kind == "mse":
        if attributes:
            missing = sorted(set(attributes) - counts.rating_names)
            if counts.rated < counts.rows or missing:
                raise ConfigError(
                    f"loss_type mse with reward_attributes {list(attributes)} needs ratings of those attributes on "
                    f"every row: {counts.rows - counts.rated} of {counts.rows} rows have none"
                    + (f", and no row rates {missing}" if missing else "")
                    + f" (the data rates {sorted(counts.rating_names)}). Set reward_attributes to the rated ones, "
                    "or use a ranking loss (bt, listwise, hps)."
                )
        elif counts.scored < counts.rows:
            raise ConfigError(
                f"loss_type mse regresses each response's score, and {counts.rows - counts.scored} of {counts.rows} "
                "training rows have none (pairs and ranks carry no scores): use a ranking loss (bt, bt_ties, "
                "listwise, hps), or data with scores (responses + scores, or VLFeedback's ratings)."
            )
    elif attributes:
        warnings.warn(
            f"reward_attributes {list(attributes)} with loss_type {kind}: the ranking loss trains only their weighted "
            "sum, so the attributes do not learn what their names say. Use loss_type mse on rated data to train them.",
            stacklevel=2,
        )
    if kind == "bt_ties" and not counts.ties:
        warnings.warn("loss_type bt_ties, but no training row has a tie: it trains as bt.", stacklevel=2)
