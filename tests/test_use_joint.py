"""A joint checkpoint in use (vlrm.use.joint): the GRPO reward function chains a group's completions through
``RewardScorer.score`` (chains of at most ``joint_group_size``), the scorer says per row which chain it was in, and the
HTTP server chains a request's group and the items of one prompt that meet in a micro-batch, and says so in its reply;
an independent checkpoint's replies are unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_packing import _image, _text
from tests.test_server import ForwardRecorder, _data_url, _png, _send_while_held, call, serving
from vlrm.use.rewards import VLRewardFunction
from vlrm.use.scoring import RewardScorer
from vlrm.use.server.app import create_app
from vlrm.use.server.settings import ServerSettings

MAX_SEQ_LENGTH = 256
QUESTION = "What is shown?"


@pytest.fixture(scope="module")
def joint_checkpoint(tmp_path_factory, save_reward_checkpoint):
    return save_reward_checkpoint(
        tmp_path_factory.mktemp("use_joint") / "checkpoint", seed=3, vlrm_scoring_mode="joint",
        vlrm_joint_permutations=2, vlrm_joint_group_size=3,
    )  # fmt: skip


@pytest.fixture(scope="module")
def independent_checkpoint(tmp_path_factory, save_reward_checkpoint):
    return save_reward_checkpoint(tmp_path_factory.mktemp("use_independent") / "checkpoint", seed=3)


@pytest.fixture(scope="module")
def scorer(joint_checkpoint):
    return RewardScorer.from_pretrained(joint_checkpoint, dtype="float32", device="cpu", max_seq_length=MAX_SEQ_LENGTH)


def _independent(scorer: RewardScorer) -> RewardScorer:
    """The same weights scored independently (the mode is all that differs)."""
    other = RewardScorer(scorer.model, scorer.processor, "cpu", max_seq_length=MAX_SEQ_LENGTH)
    other.joint = {**other.joint, "scoring_mode": "independent"}
    return other


# ----------------------------------------------------------------------------------------------------------------
# The scorer's per-row report and the GRPO reward function


def test_score_reports_each_rows_chain_and_its_size(scorer):
    image = _image(41, (56, 56))
    rows = [{"prompt": QUESTION, "images": [image], "response": _text(50 + i, 4)} for i in range(4)]
    rows.insert(2, {"prompt": "Alone?", "images": [], "response": "Yes."})
    rows.append({"prompt": QUESTION, "images": [image], "response": " ".join(["word"] * 400)})  # over the limit
    rewards = scorer.score(rows, progress=False)
    assert np.isnan(rewards[5]) and not np.isnan(rewards[:5]).any()
    # 4 of one prompt in chains of at most 3: 2 + 2, numbered one after the other; then the lone one, a chain of one.
    assert scorer.last_joint_rows.chain.tolist() == [0, 0, 2, 1, 1, -1]
    assert scorer.last_joint_rows.size.tolist() == [2, 2, 1, 2, 2, 1]
    assert scorer.last_joint_rows.entries(3, 5) == [{"chain": 1, "size": 2}, {"chain": 1, "size": 2}]
    assert scorer.last_joint_report == {"chains": 3, "alone": 1, "chained": 4}
    # A chain scores the same wherever it stands among the call's chains (its orders are keyed on its responses).
    group = [{"prompt": QUESTION, "images": [image], "response": _text(70 + i, 3 + i)} for i in range(3)]
    first = scorer.score(group, progress=False)
    np.testing.assert_allclose(scorer.score([rows[2], *group], progress=False)[1:], first, rtol=1e-5, atol=1e-5)
    assert _independent(scorer).score(rows[:2], progress=False).tolist() != pytest.approx(rewards[:2].tolist())


def test_the_grpo_reward_function_chains_a_group_as_the_scorer_does(scorer):
    """TRL's arguments: 5 completions of one conversational prompt and image, group size 3 -> chains of 3 + 2; each
    chain's rewards are those of the scorer on that chain alone, unlike scoring each completion alone."""
    image = _image(42, (56, 56))
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    completions = [[{"role": "assistant", "content": _text(60 + i, 3 + i)}] for i in range(5)]
    reward = VLRewardFunction(scorer, batch_size=4)
    rewards = reward([prompt] * 5, completions, image=[image] * 5)
    assert scorer.last_joint_report == {"chains": 2, "alone": 0, "chained": 5}
    assert scorer.last_joint_rows.chain.tolist() == [0, 0, 0, 1, 1]
    assert scorer.last_joint_rows.size.tolist() == [3, 3, 3, 2, 2]
    rows = reward.rows([prompt] * 5, completions, image=[image] * 5)
    np.testing.assert_allclose(rewards, scorer.score(rows, batch_size=4), rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        rewards[:3], scorer.score(rows[:3]), rtol=1e-5, atol=1e-5
    )  # one chain of 3 (round-off: other rows packed)
    np.testing.assert_allclose(rewards[3:], scorer.score(rows[3:]), rtol=1e-5, atol=1e-5)  # one chain of 2
    alone = _independent(scorer).score(rows)
    assert not np.allclose(rewards, alone, atol=1e-4), "chained, each completion is judged beside the others"


# ----------------------------------------------------------------------------------------------------------------
# The server: a request's group in one chain, requests of one prompt merged in a micro-batch chained, /info


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("use_joint_images") / "a.png"
    path.write_bytes(_png(np.random.default_rng(5).integers(0, 256, (56, 56, 3), dtype=np.uint8)))
    return {"path": str(path), "url": _data_url(path.read_bytes())}


@pytest.fixture(scope="module")
def joint_server(joint_checkpoint):
    served = RewardScorer.from_pretrained(joint_checkpoint, dtype="float32", max_seq_length=MAX_SEQ_LENGTH)
    recorder = ForwardRecorder(served.score)
    served.score = recorder
    app = create_app(served, ServerSettings(max_batch_size=16, max_wait_ms=5), joint_checkpoint)
    with serving(app) as port:
        yield {"port": port, "app": app, "recorder": recorder}


def test_a_request_carrying_a_group_is_scored_in_one_chain(joint_server, scorer, picture):
    texts = ["Red shapes.", "Two green squares.", "Nothing at all."]
    items = [{"prompt": QUESTION, "images": [picture["url"]], "response": text} for text in texts]
    items.append({"prompt": "Say something.", "response": "Something."})
    status, reply = call(joint_server["port"], "POST", "/score", {"items": items})
    assert status == 200, reply
    rows = [{"prompt": QUESTION, "images": [picture["path"]], "response": text} for text in texts]
    rows.append({"prompt": "Say something.", "images": [], "response": "Something."})
    np.testing.assert_allclose(reply["rewards"], scorer.score(rows), rtol=1e-5, atol=1e-6)
    assert [{"chain": entry["chain"], "size": entry["size"]} for entry in reply["joint"]] == [
        {"chain": 0, "size": 3}, {"chain": 0, "size": 3}, {"chain": 0, "size": 3}, {"chain": 1, "size": 1},
    ]  # fmt: skip
    assert len({entry["batch"] for entry in reply["joint"]}) == 1
    # OpenRLHF's shape too: two queries of one prompt, one chain.
    body = {"query": ["Say something. One.", "Say something. Two."], "prompts": ["Say something. "] * 2}
    status, reply = call(joint_server["port"], "POST", "/get_reward", body)
    assert status == 200, reply
    assert [entry["size"] for entry in reply["joint"]] == [2, 2] and reply["joint"][0]["chain"] == 0


def test_requests_of_one_prompt_merged_in_a_micro_batch_are_chained(joint_server, scorer, picture):
    texts = ["Red shapes.", "Two green squares."]
    bodies = [{"items": [{"prompt": QUESTION, "images": [picture["url"]], "response": text}]} for text in texts]
    replies = _send_while_held(joint_server, bodies, queued_items=2)
    assert joint_server["recorder"].sizes == [1, 2], "both requests in one forward"
    (first_status, first), (second_status, second) = replies
    assert first_status == 200 and second_status == 200, replies
    assert first["joint"] == second["joint"] and first["joint"][0]["size"] == 2  # one chain, same micro-batch
    rows = [{"prompt": QUESTION, "images": [picture["path"]], "response": text} for text in texts]
    chained = scorer.score(rows)
    np.testing.assert_allclose([first["rewards"][0], second["rewards"][0]], chained, rtol=1e-5, atol=1e-6)
    alone = [scorer.score([row])[0] for row in rows]
    assert not np.allclose(chained, alone, atol=1e-4), "scored alone they would differ"
    # Sent one at a time, each is scored alone and the reply says so.
    status, reply = call(joint_server["port"], "POST", "/score", bodies[0])
    assert status == 200 and reply["joint"][0]["size"] == 1, reply
    np.testing.assert_allclose(reply["rewards"], alone[:1], rtol=1e-5, atol=1e-6)


def test_info_states_the_scoring_mode_and_an_independent_checkpoint_is_unchanged(
    joint_server, independent_checkpoint, picture
):
    status, info = call(joint_server["port"], "GET", "/info")
    assert status == 200
    model = info["model"]
    assert (model["scoring_mode"], model["joint_permutations"], model["joint_group_size"]) == ("joint", 2, 3)
    independent = RewardScorer.from_pretrained(independent_checkpoint, dtype="float32", max_seq_length=MAX_SEQ_LENGTH)
    with serving(create_app(independent, ServerSettings(max_wait_ms=1), independent_checkpoint)) as port:
        items = [{"prompt": QUESTION, "images": [picture["url"]], "response": text} for text in ("A.", "B.")]
        status, reply = call(port, "POST", "/score", {"items": items})
        assert status == 200 and list(reply) == ["rewards"], reply
        status, info = call(port, "GET", "/info")
        assert info["model"]["scoring_mode"] == "independent" and info["model"]["joint_group_size"] is None
