"""Rows for process reward models: a question, one or several solutions split into steps, and a label per step.

The canonical step row is a row of N >= 1 solutions (``vlrm.data.rankings``' N-response row, each response one
solution) with two more fields:

    steps         [N][K_n]: each solution's steps, in order
    step_labels   [N][K_n]: one label per step: 1.0 correct, 0.0 wrong, a soft value in [0, 1] (a Monte-Carlo
                  estimate of reaching the right answer from this step, as VisualPRM400K's ``mc``), or NaN for a
                  step with no label (``neutral``: left out of the loss and of the metrics)

and ``responses`` (each solution's steps joined by a blank line: what pair-only parts of vlrm read), ``chosen`` (the
best solution: highest least step label, then highest mean) and ``rejected`` (the worst). Images and videos are the
row's, as for any row (``vlrm.data.rows``); all solutions of a question share its prompt node in the packed layout.

Accepted layouts:

- **Generic**: ``{"question", "images", "steps": [...], "step_labels": [...]}``; labels are true/false, 1/0,
  "correct"/"wrong"/"+"/"-", "neutral"/null, or numbers in [0, 1] (soft).
- **Several solutions**: ``{"question", "images", "solutions": [{"steps": [...], "step_labels": [...]}, ...]}``
  (or ``"solutions": [[...], ...]`` with ``"step_labels": [[...], ...]``).
- **VisualProcessBench** (Wang et al. 2025, arXiv 2503.10291, the released ``test.jsonl``): ``{"image": [...],
  "question", "answer", "response": {"steps": [...], "process_correctness": [1, 0, -1, ...]}, "policy_model",
  "data_source"}``: 1 correct, 0 neutral, -1 wrong; ``data_source`` becomes the row's ``category`` (MMMU,
  MathVision, MathVerse, DynaMath, WeMath).
- **Steps with scores** (VisualPRM400K-Raw's Monte-Carlo values, VL-PRM300K): ``{"question", "image",
  "steps_with_score": [{"step": ..., "score": mc}, ...]}``: soft labels in [0, 1].
- **VisualPRM400K's chat layout** (the released ``annotations``): ``{"image", "conversations": [{"from": "human",
  "value": question + step 1}, {"from": "gpt", "value": "+"}, {"from": "human", "value": step 2}, {"from": "gpt",
  "value": "-"}, ...]}``: one step per user turn, its label the next assistant turn. The first user turn holds the
  question and the first step: the question is the row's ``question`` when it has one (removed from the front of
  the turn), else everything before the turn's last blank line.

A step row whose label count differs from its step count, an empty step, or a label that is none of the above is a
``RowProblem`` naming the field (the caller adds the file and row).
"""

from __future__ import annotations

import math
from typing import Any

from vlrm.data.rankings import list_field
from vlrm.errors import RowProblem

STEP_FIELDS = ("steps", "step_labels")
CORRECT = ("correct", "+", "true", "yes", "positive", "good")
WRONG = ("wrong", "-", "false", "no", "negative", "bad", "incorrect")
NEUTRAL = ("neutral", "unknown", "")
VISUAL_PROCESS_BENCH = {1: 1.0, 0: math.nan, -1: 0.0}  # process_correctness: 1 correct, 0 neutral, -1 wrong
JOIN = "\n\n"


def is_step_row(raw: dict[str, Any]) -> bool:
    """A row of step-labelled solutions in any layout of the module docstring."""
    if "steps" in raw or "solutions" in raw or "steps_with_score" in raw:
        return True
    if isinstance(raw.get("response"), dict) and "steps" in raw["response"]:
        return True
    return _is_chat_layout(raw)


def _is_chat_layout(raw: dict[str, Any]) -> bool:
    turns = raw.get("conversations")
    if not isinstance(turns, (list, tuple)) or len(turns) < 2:
        return False
    answers = [
        turn.get("value") for turn in turns if isinstance(turn, dict) and turn.get("from") in ("gpt", "assistant")
    ]
    return bool(answers) and all(isinstance(value, str) and value.strip() in ("+", "-") for value in answers)


def step_label(value: Any, field_name: str) -> float:
    """One step's label as a float: 1.0 correct, 0.0 wrong, a soft value in [0, 1], NaN neutral."""
    if value is None:
        return math.nan
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        if math.isnan(value):
            return math.nan
        if not 0.0 <= value <= 1.0:
            raise RowProblem(field_name, f"a step label is in [0, 1] (or true/false, +/-, neutral), got {value!r}")
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in CORRECT:
            return 1.0
        if text in WRONG:
            return 0.0
        if text in NEUTRAL:
            return math.nan
    raise RowProblem(
        field_name, f"unknown step label {value!r}: true/false, 1/0, +/-, correct/wrong, neutral, or [0, 1]"
    )


def _steps(values: Any, field_name: str) -> list[str]:
    steps = list_field(values, field_name)
    if not steps:
        raise RowProblem(field_name, "a solution has no step")
    for index, step in enumerate(steps):
        if not isinstance(step, str) or not step.strip():
            raise RowProblem(field_name, f"step {index} is empty" if isinstance(step, str) else
                             f"step {index} is not a string ({type(step).__name__})")  # fmt: skip
    return steps


def _solution(steps: Any, labels: Any, steps_field: str, labels_field: str, mapping=None) -> tuple[list, list]:
    steps = _steps(steps, steps_field)
    labels = list_field(labels, labels_field)
    if len(labels) != len(steps):
        raise RowProblem(labels_field, f"{len(labels)} labels for {len(steps)} steps")
    if mapping is not None:
        unknown = [label for label in labels if label not in mapping]
        if unknown:
            raise RowProblem(labels_field, f"expected 1, 0 or -1, got {unknown[0]!r}")
        return steps, [mapping[label] for label in labels]
    return steps, [step_label(label, labels_field) for label in labels]


def _chat_solution(raw: dict[str, Any]) -> tuple[str, list[str], list[float]]:
    """(question, steps, labels) of VisualPRM400K's chat layout (module docstring)."""
    question, steps, labels = None, [], []
    pending = None
    for turn in list_field(raw["conversations"], "conversations"):
        speaker, value = turn.get("from"), turn.get("value")
        if speaker in ("human", "user"):
            if pending is not None:
                raise RowProblem("conversations", "two user turns in a row: every step needs its +/- turn")
            pending = value
        elif speaker in ("gpt", "assistant"):
            if pending is None:
                raise RowProblem("conversations", "a +/- turn with no step before it")
            steps.append(pending)
            labels.append(step_label(value, "conversations"))
            pending = None
    if not steps:
        raise RowProblem("conversations", "no step")
    first = steps[0]
    given = raw.get("question")
    if isinstance(given, str) and first.startswith(given):
        question, steps[0] = given, first[len(given) :].strip()
    elif JOIN in first.strip():
        question, steps[0] = (part.strip() for part in first.strip().rsplit(JOIN, 1))
    else:
        raise RowProblem(
            "conversations", "cannot tell the question from the first step: give the row a `question` field, or "
            "end the question with a blank line"
        )  # fmt: skip
    return question, _steps(steps, "conversations"), labels


def step_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The step fields of a step row (module docstring), and ``question`` / ``category`` where the layout carries
    them elsewhere than the row's own fields."""
    found: dict[str, Any] = {}
    if isinstance(raw.get("response"), dict) and "steps" in raw["response"]:  # VisualProcessBench
        response = raw["response"]
        solutions = [_solution(response["steps"], response.get("process_correctness"), "response.steps",
                               "response.process_correctness", VISUAL_PROCESS_BENCH)]  # fmt: skip
        if raw.get("data_source") is not None:
            found["category"] = str(raw["data_source"])
    elif "steps_with_score" in raw:
        entries = list_field(raw["steps_with_score"], "steps_with_score")
        if not all(isinstance(entry, dict) for entry in entries):
            raise RowProblem("steps_with_score", "expected a list of {step, score}")
        steps = [entry.get("step") for entry in entries]
        solutions = [_solution(steps, [entry.get("score") for entry in entries], "steps_with_score",
                               "steps_with_score")]  # fmt: skip
    elif "solutions" in raw:
        solutions = []
        for index, solution in enumerate(list_field(raw["solutions"], "solutions")):
            if isinstance(solution, dict):
                solutions.append(_solution(solution.get("steps"), solution.get("step_labels"),
                                           f"solutions[{index}].steps", f"solutions[{index}].step_labels"))  # fmt: skip
            else:
                labels = list_field(raw.get("step_labels"), "step_labels")
                if len(labels) != len(list_field(raw["solutions"], "solutions")):
                    raise RowProblem("step_labels", "one list of labels per solution")
                solutions.append(_solution(solution, labels[index], f"solutions[{index}]", f"step_labels[{index}]"))
        if not solutions:
            raise RowProblem("solutions", "no solution")
    elif "steps" in raw:
        solutions = [_solution(raw["steps"], raw.get("step_labels"), "steps", "step_labels")]
    else:
        question, steps, labels = _chat_solution(raw)
        found["question"] = question
        solutions = [(steps, labels)]
    steps = [solution_steps for solution_steps, _ in solutions]
    labels = [solution_labels for _, solution_labels in solutions]
    order = sorted(range(len(solutions)), key=lambda index: _quality(labels[index]), reverse=True)
    texts = [JOIN.join(solution_steps) for solution_steps in steps]
    return found | {
        "steps": steps,
        "step_labels": labels,
        "responses": texts,
        "chosen": texts[order[0]],
        "rejected": texts[order[-1]],
    }


def _quality(labels: list[float]) -> tuple[float, float]:
    known = [label for label in labels if not math.isnan(label)] or [0.5]
    return min(known), sum(known) / len(known)


def is_correct_solution(labels: list[float], threshold: float = 0.5) -> bool:
    """A solution every labelled step of which is correct (hard labels; a soft label counts above ``threshold``)."""
    return all(math.isnan(label) or label > threshold for label in labels)
