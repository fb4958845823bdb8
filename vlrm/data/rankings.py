"""Rows with more than two responses, or with more than a preference: rankings with ties, scores, attribute ratings.

The canonical row of a pair is ``chosen`` + ``rejected``. A row with N >= 2 responses and a label adds these
fields (``vlrm.data.rows.map_row`` reads the prompt and the images as for any row; this module reads the label):

    responses     the N response texts, in the source's order
    ranks         one rank per response, lower is better, equal ranks are ties (derived from scores or ratings
                  when the row gives those instead)
    scores        one score per response (higher is better), when the row gives scores or ratings, else null
    ratings       one list of attribute ratings per response ([N][A]), with ``rating_names`` (the A attributes)
    chosen        the best response (the first of the best rank), and ``rejected`` the worst (the last of the worst):
                  what the pair-only parts of vlrm read (the irrelevant-query sampler, the pair metrics)

and a pair may carry ``tie: true`` (its two responses are equally good). Accepted layouts:

- **VLFeedback** (Li et al. 2023, arXiv 2312.10665), as released: ``{"id", "prompt", "img_path" | "image",
  "models", "completions": [{"model", "response", "annotations": {"Helpfulness": {"Rating", "Rationale"},
  "Visual Faithfulness": {...}, "Ethical Considerations": {...}}}]}`` (4 completions, ratings 1-5 as strings;
  ``completions`` as a list of objects or, read through ``datasets``, as a mapping of lists). The ratings become the
  attributes ``helpfulness``, ``visual_faithfulness``, ``ethical_considerations``; the score of a completion is their
  mean, as VLFeedback builds its preference pairs (an ``N/A`` rating is left out of the mean).
- **A ranked list**: ``{"responses": [...], "ranks": [...]}`` (lower is better, equal ranks tie; MM-RLHF's ranked
  responses), or ``"ranking"`` (the response indices, best first; ties as a nested list).
- **Scores**: ``{"responses": [...], "scores": [...]}`` (higher is better).
- **Attribute ratings**: ``{"responses": [...], "ratings": [{"helpfulness": 4, "faithfulness": 5}, ...]}`` (one
  mapping per response, the same attributes in each), with ``scores`` optional (else the mean of the ratings).
- **A tie on a pair**: any pair layout with ``"tie": true`` (or a ``"label"`` of ``"tie"``).
"""

from __future__ import annotations

import math
import re
from typing import Any

from vlrm.errors import RowProblem

RANKING_FIELDS = ("responses", "ranks", "scores", "ratings", "rating_names", "tie")
VLFEEDBACK_ASPECTS = {
    "Helpfulness": "helpfulness",
    "Visual Faithfulness": "visual_faithfulness",
    "Ethical Considerations": "ethical_considerations",
}
NOT_RATED = ("n/a", "na", "none", "")


def responses_of(row: dict[str, Any]) -> list[str]:
    """A canonical row's responses: its N responses, or a pair's chosen and rejected (in that order)."""
    responses = row.get("responses")
    return list(responses) if responses is not None else [row["chosen"], row["rejected"]]


def is_ranking_row(raw: dict[str, Any]) -> bool:
    """A row of N responses with a label (VLFeedback's completions, or responses with ranks / scores / ratings)."""
    return "completions" in raw or (
        "responses" in raw and any(key in raw for key in ("ranks", "ranking", "scores", "ratings"))
    )


def pair_tie(raw: dict[str, Any]) -> bool:
    """Whether a pair row says its two responses are equally good (``tie: true`` or ``label: "tie"``)."""
    tie, label = raw.get("tie"), raw.get("label")
    if tie is not None and not isinstance(tie, bool):
        raise RowProblem("tie", f"expected true or false, got {type(tie).__name__}")
    return bool(tie) or (isinstance(label, str) and label.strip().lower() == "tie")


def list_field(value: Any, field_name: str) -> list:
    """A row's list field as a list (a numpy array from parquet too); anything else is a ``RowProblem`` naming it."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays from parquet
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise RowProblem(field_name, f"expected a list, got {'null' if value is None else type(value).__name__}")
    return list(value)


def _number(value: Any, field_name: str) -> float | None:
    """A rating or score as a float; None for a value that says it was not rated (VLFeedback writes ``N/A``)."""
    if isinstance(value, bool):
        raise RowProblem(field_name, f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        if value.strip().lower() in NOT_RATED:
            return None
        match = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*", value)
        if match is None:
            raise RowProblem(field_name, f"expected a number, got {value!r}")
        number = float(match.group(1))
    else:
        raise RowProblem(field_name, f"expected a number, got {'null' if value is None else type(value).__name__}")
    if not math.isfinite(number):
        raise RowProblem(field_name, f"expected a finite number, got {value!r}")
    return number


def _texts(values: list, field_name: str) -> list[str]:
    texts = []
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise RowProblem(field_name, f"response {index}: expected a string, got {type(value).__name__}")
        if not value.strip():
            raise RowProblem(field_name, f"response {index} is empty")
        texts.append(value)
    return texts


def ranks_from_scores(scores: list[float]) -> list[float]:
    """Dense ranks of scores, higher score better: ``[3, 5, 3] -> [1, 0, 1]`` (equal scores tie)."""
    order = sorted(set(scores), reverse=True)
    return [float(order.index(score)) for score in scores]


def _completions(raw: dict[str, Any]) -> list[dict]:
    completions = raw["completions"]
    if isinstance(completions, dict):  # datasets' Sequence of a struct: a mapping of lists
        keys = list(completions)
        lengths = {len(list_field(completions[key], "completions")) for key in keys}
        if len(lengths) != 1:
            raise RowProblem("completions", "its fields have different lengths")
        completions = [{key: completions[key][index] for key in keys} for index in range(lengths.pop())]
    items = list_field(completions, "completions")
    if not all(isinstance(item, dict) for item in items):
        raise RowProblem("completions", "expected a list of {response, annotations} objects")
    return items


def _vlfeedback(raw: dict[str, Any]) -> dict[str, Any]:
    completions = _completions(raw)
    responses = _texts([item.get("response") for item in completions], "completions")
    ratings = []
    for index, item in enumerate(completions):
        annotations = item.get("annotations")
        if not isinstance(annotations, dict):
            raise RowProblem("completions", f"completion {index}: no annotations")
        row = []
        for aspect in VLFEEDBACK_ASPECTS:
            annotation = annotations.get(aspect)
            rating = annotation.get("Rating") if isinstance(annotation, dict) else annotation
            row.append(_number(rating, f"completions[{index}].annotations.{aspect}.Rating"))
        ratings.append(row)
    return {"responses": responses, "ratings": ratings, "rating_names": list(VLFEEDBACK_ASPECTS.values())}


def _generic(raw: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {"responses": _texts(list_field(raw["responses"], "responses"), "responses")}
    if raw.get("ratings") is not None:
        ratings = list_field(raw["ratings"], "ratings")
        if not all(isinstance(item, dict) for item in ratings):
            raise RowProblem("ratings", "expected one mapping {attribute: rating} per response")
        names = list(ratings[0]) if ratings else []
        if not names or any(list(item) != names for item in ratings):
            raise RowProblem(
                "ratings", f"every response needs the same attributes, in the same order, got {ratings!r:.120}"
            )
        fields["ratings"] = [[_number(item[name], f"ratings.{name}") for name in names] for item in ratings]
        fields["rating_names"] = names
    if raw.get("scores") is not None:
        fields["scores"] = [_number(value, "scores") for value in list_field(raw["scores"], "scores")]
        if any(score is None for score in fields["scores"]):
            raise RowProblem("scores", "every response needs a score")
    if raw.get("ranks") is not None:
        fields["ranks"] = [_number(value, "ranks") for value in list_field(raw["ranks"], "ranks")]
        if any(rank is None for rank in fields["ranks"]):
            raise RowProblem("ranks", "every response needs a rank")
    elif raw.get("ranking") is not None:
        fields["ranks"] = _ranks_from_ranking(list_field(raw["ranking"], "ranking"), len(fields["responses"]))
    return fields


def _ranks_from_ranking(ranking: list, count: int) -> list[float]:
    """``[2, [0, 3], 1]`` (indices, best first; a nested list ties) -> ranks ``[1, 2, 0, 1]``."""
    ranks: list[float | None] = [None] * count
    for place, entry in enumerate(ranking):
        for index in entry if isinstance(entry, (list, tuple)) else [entry]:
            if not isinstance(index, int) or not 0 <= index < count or ranks[index] is not None:
                raise RowProblem("ranking", f"expected each response index 0..{count - 1} once, got {ranking!r}")
            ranks[index] = float(place)
    if any(rank is None for rank in ranks):
        raise RowProblem("ranking", f"responses {[i for i, rank in enumerate(ranks) if rank is None]} are not ranked")
    return ranks


def ranking_labels(raw: dict[str, Any]) -> dict[str, Any]:
    """The N-way fields of a ranking row (module docstring): responses, ranks, scores, ratings, rating_names, and the
    best and worst response as chosen / rejected. Raises ``RowProblem`` naming the field."""
    fields = _vlfeedback(raw) if "completions" in raw else _generic(raw)
    responses = fields["responses"]
    count = len(responses)
    if count < 2:
        raise RowProblem("responses", f"a ranking needs at least 2 responses, got {count}")
    for name in ("ranks", "scores", "ratings"):
        if fields.get(name) is not None and len(fields[name]) != count:
            raise RowProblem(name, f"{len(fields[name])} values for {count} responses")
    if fields.get("ratings") is not None and fields.get("scores") is None:
        means = []
        for index, ratings in enumerate(fields["ratings"]):
            rated = [rating for rating in ratings if rating is not None]
            if not rated:
                raise RowProblem("ratings", f"response {index} has no rating")
            means.append(sum(rated) / len(rated))
        fields["scores"] = means
    if fields.get("ranks") is None:
        if fields.get("scores") is None:
            raise RowProblem("responses", "needs ranks, a ranking, scores or ratings")
        fields["ranks"] = ranks_from_scores(fields["scores"])
    ranks = fields["ranks"]
    if len(set(ranks)) == 1:
        raise RowProblem("ranks", "every response has the same rank: no preference to learn")
    for first in range(count):
        for second in range(first + 1, count):
            if responses[first].strip() == responses[second].strip() and ranks[first] != ranks[second]:
                raise RowProblem("responses", f"responses {first} and {second} are the same text with different ranks")
    best, worst = min(ranks), max(ranks)
    fields["chosen"] = responses[ranks.index(best)]
    fields["rejected"] = responses[count - 1 - ranks[::-1].index(worst)]
    if fields.get("ratings") is not None:  # N/A ratings are stored as NaN: "not rated", left out of losses and metrics
        fields["ratings"] = [[math.nan if rating is None else rating for rating in row] for row in fields["ratings"]]
    return fields
