"""The HTTP reward server with a process checkpoint: ``/score`` replies carry each item's step scores next to its
aggregated reward, equal to ``RewardScorer.score_steps``; items give ``steps`` or ``response`` (split at the step
separator); ``/info`` says the reward type; solutions of one prompt share a prompt node across merged requests; bad
items are 4xx errors naming the item and the field. The app runs under uvicorn on 127.0.0.1 (``tests/test_server.py``'s
``serving``), with small limits."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tests.test_server import _data_url, _png, _send_while_held, call, serving
from vlrm.use.scoring import RewardScorer
from vlrm.use.server.app import create_app
from vlrm.use.server.settings import ServerSettings, require_reward_stats

MAX_SEQ_LENGTH = 128  # the tiny model's 56 x 56 images are 4 visual tokens
QUESTION = "How many shapes are there?"
LIMITS = {"max_items": 8, "max_images": 2, "max_pixels_per_image": 100_000, "max_body_bytes": 256 * 1024}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, save_reward_checkpoint):
    base = tmp_path_factory.mktemp("server_process")
    process = save_reward_checkpoint(
        base / "process", seed=7, vlrm_reward_type="process", vlrm_step_separator="\n\n", vlrm_step_aggregation="min"
    )
    return {"process": process, "outcome": save_reward_checkpoint(base / "outcome", seed=7)}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("server_process_images")
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        (root / f"{name}.png").write_bytes(_png(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)))
    return root


@pytest.fixture(scope="module")
def reference(checkpoints):
    return RewardScorer.from_pretrained(checkpoints["process"], max_seq_length=MAX_SEQ_LENGTH)


class HeldForwards:
    """Wraps the server scorer's ``score_steps`` (count the rows of each call, optionally hold the first until
    released, so that requests queue behind it) and its ``_forward`` (keep each collated micro-batch)."""

    def __init__(self, scorer: RewardScorer):
        self.sizes, self.batches, self.active = [], [], 0
        self.hold: threading.Event | None = None
        score_steps, forward = scorer.score_steps, scorer._forward

        def held_score_steps(rows, **kwargs):
            self.active += 1
            try:
                if self.hold is not None:
                    assert self.hold.wait(timeout=30), "the test never released the held forward"
                self.sizes.append(len(rows))
                return score_steps(rows, **kwargs)
            finally:
                self.active -= 1

        scorer.score_steps = held_score_steps
        scorer._forward = lambda batch: self.batches.append(batch) or forward(batch)


@pytest.fixture(scope="module")
def server(checkpoints, images):
    scorer = RewardScorer.from_pretrained(checkpoints["process"], max_seq_length=MAX_SEQ_LENGTH)
    forwards = HeldForwards(scorer)
    settings = ServerSettings(image_root=str(images), max_batch_size=16, max_wait_ms=5, **LIMITS)
    app = create_app(scorer, settings, checkpoints["process"])
    with serving(app) as port:
        yield {"port": port, "app": app, "forwards": forwards}


def _items(images) -> tuple[list[dict], list[dict]]:
    """(HTTP items, the same rows for score_steps): 4 solutions of one image prompt (steps, or a response to split),
    2 of another (chat messages), one text-only."""
    a_url = _data_url((images / "a.png").read_bytes())
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count them."}]}]
    solutions = [
        ["I see a red circle.", "I see a blue square.", "So there are two shapes."],
        ["There is one shape.", "So the answer is one."],
        ["Counting carefully.", "Three shapes."],
        ["Two."],
        ["The shapes are green.", "There are three."],
        ["One triangle.", "One shape."],
        ["Nothing to see.", "Zero."],
    ]
    items = [
        {"prompt": QUESTION, "images": [a_url], "steps": solutions[0]},
        {"prompt": QUESTION, "images": ["a.png"], "response": "\n\n".join(solutions[1])},
        {"prompt": QUESTION, "images": ["a.png"], "response": "Counting carefully.\n\n\n\nThree shapes.\n\n"},
        {"prompt": QUESTION, "images": [a_url], "steps": solutions[3]},
        {"prompt": messages, "images": ["b.png"], "steps": solutions[4]},
        {"prompt": messages, "images": ["b.png"], "response": "One triangle.\n\nOne shape."},
        {"prompt": "Say how many.", "steps": solutions[6]},
    ]
    image_of = [images / "a.png"] * 4 + [images / "b.png"] * 2 + [None]
    rows = [
        {"prompt": item["prompt"], "images": [] if image is None else [str(image)], "steps": steps}
        for item, image, steps in zip(items, image_of, solutions, strict=True)
    ]
    return items, rows


def test_replies_carry_step_scores_equal_to_the_scorer(server, images, reference):
    items, rows = _items(images)
    expected = reference.score_steps(rows)
    assert expected.aggregation == "min" and len(set(expected.scores.tolist())) == len(rows)
    status, reply = call(server["port"], "POST", "/score", {"items": items}, key=None)
    assert status == 200, reply
    assert set(reply) == {"rewards", "steps"}
    np.testing.assert_allclose(reply["rewards"], expected.scores, rtol=0, atol=1e-5)
    assert [len(values) for values in reply["steps"]] == [len(row["steps"]) for row in rows]
    for got, want in zip(reply["steps"], expected.steps, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(reply["rewards"], [min(values) for values in reply["steps"]], rtol=0, atol=1e-6)
    # /get_reward: the query's response is split at the separator alike.
    query = {"query": [QUESTION + " " + "\n\n".join(rows[6]["steps"])], "prompts": [QUESTION + " "]}
    status, reply = call(server["port"], "POST", "/get_reward", query, key=None)
    assert status == 200, reply
    direct = reference.score_steps([{"prompt": QUESTION + " ", "images": [], "steps": rows[6]["steps"]}])
    np.testing.assert_allclose(reply["rewards"], direct.scores, rtol=0, atol=1e-5)
    np.testing.assert_allclose(reply["steps"][0], direct.steps[0], rtol=0, atol=1e-5)


def test_solutions_of_one_prompt_sent_apart_share_a_prompt_node(server, images, reference):
    """Three requests queued behind a held forward merge into one forward with one prompt node and one image."""
    forwards = server["forwards"]
    bodies = [{"items": [{"prompt": QUESTION, "images": ["b.png"], "steps": [f"Step {n}.", f"So {n}."]}]}
              for n in range(3)]  # fmt: skip
    plug = {"items": [{"prompt": "Plug.", "steps": ["Plug."]}]}
    replies = _send_while_held(server, bodies, queued_items=3, recorder=forwards, plug=plug, key=None)
    assert forwards.sizes == [1, 3]
    merged = forwards.batches[1]
    assert len(merged["packed_layout"].prompt_spans) == 1 and merged["image_grid_thw"].shape[0] == 1
    rows = [{"prompt": QUESTION, "images": [str(images / "b.png")], "steps": body["items"][0]["steps"]}
            for body in bodies]  # fmt: skip
    expected = reference.score_steps(rows)
    for (status, reply), want, want_steps in zip(replies, expected.scores, expected.steps, strict=True):
        assert status == 200, reply
        np.testing.assert_allclose(reply["rewards"], [want], rtol=0, atol=1e-5)
        np.testing.assert_allclose(reply["steps"][0], want_steps, rtol=0, atol=1e-5)


def test_info_says_the_reward_type(server, checkpoints):
    status, info = call(server["port"], "GET", "/info", key=None)
    assert status == 200
    model = info["model"]
    assert (model["reward_type"], model["step_separator"], model["step_aggregation"]) == ("process", "\n\n", "min")
    scorer = RewardScorer.from_pretrained(checkpoints["outcome"], max_seq_length=MAX_SEQ_LENGTH)
    with serving(create_app(scorer, ServerSettings(max_wait_ms=1), checkpoints["outcome"])) as port:
        status, info = call(port, "GET", "/info", key=None)
        assert status == 200 and info["model"]["reward_type"] == "outcome"
        assert info["model"]["step_separator"] is None and info["model"]["step_aggregation"] is None
        # An outcome checkpoint's replies keep their shape; steps are refused with the reason.
        status, reply = call(port, "POST", "/score", {"items": [{"prompt": QUESTION, "response": "Two."}]}, key=None)
        assert status == 200 and set(reply) == {"rewards"} and len(reply["rewards"]) == 1
        body = {"items": [{"prompt": QUESTION, "steps": ["Two."]}]}
        status, reply = call(port, "POST", "/score", body, key=None)
        assert (status, reply["item"], reply["field"]) == (400, 0, "steps")
        assert "outcome reward model" in reply["error"]


def _item(**fields) -> dict:
    return {"prompt": QUESTION, "images": ["a.png"], "steps": ["One shape.", "So one."]} | fields


def _without(name: str, **fields) -> dict:
    item = _item(**fields)
    item.pop(name)
    return item


# (id, items, status, item, field, words in the error)
BAD_ITEMS = [
    ("steps_not_list", [_item(steps="One shape.")], 400, 0, "steps", "expected a list of steps (strings), got str"),
    ("steps_empty", [_item(), _item(steps=[])], 400, 1, "steps", "is empty: a solution needs at least one step"),
    ("step_not_string", [_item(steps=["One.", 2])], 400, 0, "steps[1]", "expected a string, got int"),
    ("step_null", [_item(steps=[None])], 400, 0, "steps[0]", "expected a string, got null"),
    ("step_empty", [_item(), _item(), _item(steps=["  ", "So one."])], 400, 2, "steps[0]", "is empty"),
    ("steps_and_response", [_item(response="One.")], 400, 0, "steps", "not both"),
    ("neither", [_without("steps")], 400, 0, "steps", "one of them is missing"),
    ("response_not_string", [_without("steps", response=["One."])], 400, 0, "response", "expected a string"),
    ("response_empty", [_without("steps", response="\n\n \n\n")], 400, 0, "response", "is empty"),
    ("over_long_steps", [_item(steps=["word " * 40] * 3)], 400, 0, "steps", "over max_seq_length=128"),
    ("over_long_response", [_without("steps", response="\n\n".join(["word " * 40] * 3))], 400, 0, "response",
     "over max_seq_length=128"),
    ("unknown_field", [_item(labels=[1, 0])], 400, 0, "labels", "expected: prompt, images, videos, steps, response"),
]  # fmt: skip


@pytest.mark.parametrize(
    "items, status, item, field, words", [case[1:] for case in BAD_ITEMS], ids=[case[0] for case in BAD_ITEMS]
)
def test_bad_items_get_a_4xx_naming_item_and_field(server, items, status, item, field, words):
    status_code, reply = call(server["port"], "POST", "/score", {"items": items}, key=None)
    assert (status_code, reply["item"], reply["field"]) == (status, item, field), reply
    assert words in reply["error"] and set(reply) == {"error", "item", "field"}, reply


def test_normalize_is_refused_with_the_reason(server, checkpoints):
    status, reply = call(server["port"], "POST", "/score", {"items": [_item()], "normalize": True}, key=None)
    assert (status, reply["field"]) == (400, "normalize") and "probability in [0, 1] already" in reply["error"]
    assert call(server["port"], "POST", "/score", {"items": [_item()]}, key=None)[0] == 200  # still serving
    scorer = RewardScorer.from_pretrained(checkpoints["process"])
    with pytest.raises(ValueError, match="process reward model.*serve without --normalize"):
        create_app(scorer, ServerSettings(normalize=True), checkpoints["process"])
    with pytest.raises(ValueError, match="process reward model.*serve without --normalize"):
        require_reward_stats(checkpoints["process"])  # serve_rm.py's check, before any weight is loaded
