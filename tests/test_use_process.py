"""A process reward in RL: ``VLRewardFunction`` on a process checkpoint gives each completion its aggregated step score
and each step's score, equal to ``RewardScorer.score_steps``; an outcome checkpoint's rewards are unchanged; packed =
padded."""

import random

import numpy as np
import pytest

from vlrm.data.synthetic import draw_shapes
from vlrm.use.process import split_steps
from vlrm.use.rewards import VLRewardFunction
from vlrm.use.scoring import RewardScorer

QUESTION = "How many shapes are there?"
# A GRPO-like batch: 4 completions of one image prompt, 2 of another; plain strings and conversational messages.
COMPLETIONS = [
    "I see a red circle.\n\nI see a blue square.\n\nSo there are two shapes.",
    "There is one shape.\n\nSo the answer is one.",
    "Counting carefully.\n\n\n\nThree shapes.\n\n",  # an empty piece between separators, a trailing separator
    "Two.",
    [{"role": "assistant", "content": "The shapes are green.\n\nThere are three."}],
    [{"role": "assistant", "content": [{"type": "text", "text": "One triangle.\n\nOne shape."}]}],
]


def _shapes(index):
    return draw_shapes(("red", "blue", "green")[index % 3], 1 + index % 3, 56, random.Random(index))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, save_reward_checkpoint):
    base = tmp_path_factory.mktemp("use_process")
    process = save_reward_checkpoint(
        base / "process", seed=5, vlrm_reward_type="process", vlrm_step_separator="\n\n", vlrm_step_aggregation="mean"
    )
    outcome = save_reward_checkpoint(base / "outcome", seed=5, reward_mean=0.25, reward_std=2.0)
    return {"process": process, "outcome": outcome}


@pytest.fixture(scope="module")
def batch():
    """(prompts, completions, images column, the same rows for score_steps with their steps)."""
    images = [_shapes(1)] * 4 + [_shapes(2)] * 2
    prompts = [[{"role": "user", "content": QUESTION}]] * 6
    texts = [c if isinstance(c, str) else "".join(_text(m["content"]) for m in c) for c in COMPLETIONS]
    rows = [
        {"prompt": QUESTION, "images": [image], "steps": split_steps(text, "\n\n")}
        for image, text in zip(images, texts, strict=True)
    ]
    return prompts, COMPLETIONS, images, rows


def _text(content):
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def test_rewards_are_aggregated_step_scores_and_step_rewards_are_the_steps(checkpoints, batch):
    prompts, completions, images, rows = batch
    assert [len(row["steps"]) for row in rows] == [3, 2, 2, 1, 2, 2]  # split at the separator, empty pieces dropped
    scorer = RewardScorer.from_pretrained(checkpoints["process"], device="cpu")
    reward = VLRewardFunction.from_pretrained(checkpoints["process"], device="cpu", batch_size=8)
    assert reward.aggregation == "mean" and reward.process
    expected = scorer.score_steps(rows, batch_size=8)
    assert len(set(expected.scores.tolist())) == len(rows)  # distinct: a mix-up of completions would show
    rewards = reward(prompts, completions, image=images)
    np.testing.assert_allclose(rewards, expected.scores, rtol=0, atol=1e-6)
    steps = reward.step_rewards(prompts, completions, image=images)
    assert [len(values) for values in steps] == [len(row["steps"]) for row in rows]
    for got, want in zip(steps, expected.steps, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert reward.last_step_rewards == steps
    # An aggregation given to the function replaces the checkpoint's.
    minimum = VLRewardFunction(scorer, aggregation="min", batch_size=8)
    np.testing.assert_allclose(
        minimum(prompts, completions, image=images), scorer.score_steps(rows, 8, "min").scores, rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(
        minimum(prompts, completions, image=images), [min(values) for values in steps], rtol=0, atol=1e-6
    )


def test_a_completion_with_no_step_gets_nan_reward(checkpoints):
    scorer = RewardScorer.from_pretrained(checkpoints["process"], device="cpu")
    reward = VLRewardFunction(scorer, nan_reward=0.0)
    image = _shapes(0)
    rewards = reward([QUESTION] * 3, ["One.\n\nTwo.", "\n\n  \n\n", ""], image=[image] * 3)
    assert rewards[1:] == [0.0, 0.0] and 0 < rewards[0] < 1
    assert reward.last_step_rewards[1:] == [[], []] and len(reward.last_step_rewards[0]) == 2
    expected = scorer.score_steps([{"prompt": QUESTION, "images": [image], "response": "One.\n\nTwo."}])
    assert rewards[0] == pytest.approx(float(expected.scores[0]), abs=1e-6)


def test_process_refusals_name_the_reason(checkpoints):
    with pytest.raises(ValueError, match="probability in \\[0, 1\\] already"):
        VLRewardFunction.from_pretrained(checkpoints["process"], normalize=True, device="cpu")
    with pytest.raises(ValueError, match="aggregation 'max': one of mean, min, last, product"):
        VLRewardFunction.from_pretrained(checkpoints["process"], aggregation="max", device="cpu")
    with pytest.raises(ValueError, match="outcome reward model .* leave aggregation unset"):
        VLRewardFunction.from_pretrained(checkpoints["outcome"], aggregation="min", device="cpu")
    outcome = VLRewardFunction.from_pretrained(checkpoints["outcome"], device="cpu")
    with pytest.raises(ValueError, match="step rewards need a checkpoint trained with reward_type: process"):
        outcome.step_rewards([QUESTION], ["One.\n\nTwo."])


def test_an_outcome_checkpoint_is_unchanged(checkpoints, batch):
    """The whole completion is the response, the separator means nothing, normalize works as before."""
    prompts, completions, images, rows = batch
    scorer = RewardScorer.from_pretrained(checkpoints["outcome"], device="cpu")
    assert scorer.process["reward_type"] == "outcome"
    responses = [c if isinstance(c, str) else _text(c[0]["content"]) for c in completions]
    pairs = zip(rows, responses, strict=True)
    direct = scorer.score([{"prompt": QUESTION, "images": row["images"], "response": text} for row, text in pairs])
    reward = VLRewardFunction.from_pretrained(checkpoints["outcome"], device="cpu", batch_size=8)
    np.testing.assert_allclose(reward(prompts, completions, image=images), direct, rtol=0, atol=1e-6)
    assert reward.last_step_rewards is None and reward.aggregation is None
    normalised = VLRewardFunction(scorer, normalize=True, batch_size=8)
    np.testing.assert_allclose(normalised(prompts, completions, image=images), (direct - 0.25) / 2.0, atol=1e-6)


def test_packed_equals_padded_and_a_group_shares_one_prompt_node(checkpoints, batch):
    prompts, completions, images, _ = batch
    packed_scorer = RewardScorer.from_pretrained(checkpoints["process"], device="cpu")
    seen = []
    original = packed_scorer._forward
    packed_scorer._forward = lambda collated: seen.append(collated) or original(collated)
    packed = VLRewardFunction(packed_scorer, batch_size=8)
    padded = VLRewardFunction(
        RewardScorer.from_pretrained(checkpoints["process"], device="cpu", packing=False), batch_size=8
    )
    np.testing.assert_allclose(
        packed(prompts, completions, image=images), padded(prompts, completions, image=images), rtol=0, atol=1e-5
    )
    for got, want in zip(packed.last_step_rewards, padded.last_step_rewards, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    (collated,) = seen  # one forward: 6 completions of 2 prompts, each prompt (and its image) once
    assert len(collated["packed_layout"].prompt_spans) == 2 and collated["image_grid_thw"].shape[0] == 2
