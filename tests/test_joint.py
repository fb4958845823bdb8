"""Joint scoring: a prompt's responses as one chain; packed = the padded chain; response k sees responses 1..k-1 and
never the ones after it; seeded orders; over-long chains split, never truncated."""

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, set_seed

from tests.test_families import _sequential_delta_rule
from tests.test_packing import _assert_close, _image, _text
from vlrm.layout.attention import enable_packed_attention
from vlrm.layout.encoder import PreferenceEncoder
from vlrm.layout.joint import JointCollator, chain_order, split_chain
from vlrm.layout.labels import LABEL_FIELDS
from vlrm.model.families import family_of
from vlrm.model.reward_model import VLRewardModel
from vlrm.train.objectives import Objective, ObjectiveArguments


def _prompt(num_images: int, question: str) -> list[dict]:
    content = [{"type": "image", "text": None} for _ in range(num_images)] + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def _pair(seed: int, num_images: int) -> dict:
    return {"id": f"pair-{seed}", "prompt": _prompt(num_images, _text(seed, 5)),
            "images": [_image(seed * 10 + i, (56, 56)) for i in range(num_images)],
            "chosen": _text(seed + 1, 4), "rejected": _text(seed + 2, 6)}  # fmt: skip


def _ranking(seed: int, ranks: list[float]) -> dict:
    responses = [_text(seed * 7 + index, 3 + index) for index in range(len(ranks))]
    best, worst = ranks.index(min(ranks)), len(ranks) - 1 - ranks[::-1].index(max(ranks))
    return {"id": f"ranking-{seed}", "prompt": _prompt(1, _text(seed, 4)), "images": [_image(seed, (56, 56))],
            "responses": responses, "ranks": ranks, "chosen": responses[best], "rejected": responses[worst]}  # fmt: skip


def _model(name, family_dirs, monkeypatch):
    set_seed(0)
    model = VLRewardModel.from_pretrained(family_dirs(name), dtype=torch.float32)
    if family_of(model.config).recurrent:
        _sequential_delta_rule(monkeypatch, model)
    enable_packed_attention(model)
    return model


def _rewards(model, batch):
    return model(**{key: value for key, value in batch.items() if key not in LABEL_FIELDS}).rewards


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_packed_joint_chains_equal_the_padded_chain(name, family_dirs, monkeypatch):
    """Rewards and every parameter's gradient (1e-5 relative), through the bt_ties objective on pairs (N = 2) and a
    ranking of 4 with a tie, in shuffled orders."""
    model = _model(name, family_dirs, monkeypatch)
    model.train()
    encoder = PreferenceEncoder(AutoProcessor.from_pretrained(family_dirs(name)))
    rows = [_pair(1, 1), _ranking(2, [0.0, 1.0, 1.0, 2.0]), _pair(3, 0)]
    objective = Objective(ObjectiveArguments(loss_type="bt_ties"))
    results = {}
    for packing in (False, True):
        batch = JointCollator(encoder, packing, seed=3)(rows)
        model.zero_grad(set_to_none=True)
        rewards = _rewards(model, batch)
        loss, _ = objective(rewards, batch["num_pairs"], batch["num_irrelevant"], batch.get("margin"),
                            batch.get("reward_labels"))  # fmt: skip
        loss.backward()
        grads = {key: value.grad.clone() for key, value in model.named_parameters() if value.grad is not None}
        results[packing] = (rewards.detach(), grads, batch)
    (padded, padded_grads, padded_batch), (packed, packed_grads, packed_batch) = results[False], results[True]
    assert packed.shape == (8,)
    _assert_close(packed, padded, "rewards")
    assert packed_grads.keys() == padded_grads.keys()
    for key, grad in padded_grads.items():
        _assert_close(packed_grads[key], grad, key)
    layout = packed_batch["packed_layout"]
    assert len(layout.segments) == 3  # one causal segment per chain: prompt and its responses
    assert padded_batch["input_ids"].shape[0] == 3  # the padded reference: one row per chain


def test_a_response_sees_the_ones_before_it_and_never_the_ones_after(tiny_model_dir):
    set_seed(0)
    model = VLRewardModel.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    enable_packed_attention(model)
    encoder = PreferenceEncoder(AutoProcessor.from_pretrained(tiny_model_dir))
    row = _ranking(5, [0.0, 1.0, 2.0, 3.0])
    order = [[0, 1, 2, 3]]

    def rewards(responses):
        changed = row | {"responses": responses, "chosen": responses[0], "rejected": responses[3]}
        with torch.no_grad():
            return _rewards(model, JointCollator(encoder, True, shuffle=False)([changed], order))

    base = rewards(row["responses"])
    later = rewards(row["responses"][:3] + ["Something else entirely."])  # the last response changed
    earlier = rewards([row["responses"][0], "Something else entirely.", *row["responses"][2:]])  # the second
    assert torch.equal(base[:3], later[:3]) and base[3] != later[3]
    assert torch.equal(base[:1], earlier[:1]) and (base[1:] != earlier[1:]).all()
    # And unlike independent scoring, the same response scores differently after other responses: the third one alone
    # (a chain of one, which is independent scoring) against its reward after the first two.
    third = row["responses"][2]
    lone = row | {"responses": [third], "ranks": [0.0], "chosen": third, "rejected": third}
    with torch.no_grad():
        alone = _rewards(model, JointCollator(encoder, True, shuffle=False)([lone], [[0]]))
    assert not torch.allclose(alone[0], base[2])


def test_rewards_come_back_in_the_rows_order_whatever_the_chain_order(tiny_model_dir):
    """Reward position j is response j's, read at its own end token, in any order."""
    set_seed(0)
    model = VLRewardModel.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    enable_packed_attention(model)
    encoder = PreferenceEncoder(AutoProcessor.from_pretrained(tiny_model_dir))
    row = _ranking(6, [0.0, 1.0, 2.0])
    collator = JointCollator(encoder, True, shuffle=False)
    with torch.no_grad():
        forward = _rewards(model, collator([row], [[0, 1, 2]]))
        backward = _rewards(model, collator([row], [[2, 1, 0]]))
        reordered = row | {"responses": row["responses"][::-1], "ranks": row["ranks"][::-1]}
        manual = _rewards(model, collator([reordered], [[0, 1, 2]]))
    assert torch.equal(backward, manual.flip(0))  # response j of the row is where labels expect it
    assert not torch.equal(forward, backward)  # the order matters: the comparison is in the context


def test_orders_are_seeded_per_row_and_epoch():
    assert chain_order(4, 0, 0, "a") == chain_order(4, 0, 0, "a")
    draws = {tuple(chain_order(4, 0, epoch, "a")) for epoch in range(20)}
    assert len(draws) > 5  # a fresh order most epochs
    firsts = [chain_order(2, 0, epoch, key)[0] for epoch in range(10) for key in "abcdefghij"]
    assert 30 < sum(firsts) < 70  # the first response leads about half the time: position carries no label


def test_over_long_chains_split_never_truncated(tiny_model_dir):
    encoder = PreferenceEncoder(AutoProcessor.from_pretrained(tiny_model_dir))
    assert split_chain(10, [5, 5, 5], None) == [[0, 1, 2]]
    assert split_chain(10, [5, 5, 5], 21) == [[0, 1], [2]]
    with pytest.raises(ValueError, match="response 1 .* exceeds max_seq_length=20"):
        split_chain(10, [5, 11, 5], 20)
    row = _ranking(7, [0.0, 1.0, 2.0, 3.0])
    prompt = encoder.prompt_length(row["prompt"], row["images"])
    collator = JointCollator(encoder, True, shuffle=False, max_seq_length=prompt + 20)
    batch = collator([row])
    assert collator.split_chains >= 1
    layout = batch["packed_layout"]
    assert all(end - start <= prompt + 20 for start, end, _, _ in layout.segments)
    assert len(batch["reward_index"]) == 4  # every response scored, none dropped or cut


# ----------------------------------------------------------------------------------------------------------------
# In use: a joint checkpoint is scored in chains, averaged over orders


@pytest.fixture(scope="module")
def joint_checkpoint(tmp_path_factory, save_reward_checkpoint):
    return save_reward_checkpoint(
        tmp_path_factory.mktemp("joint") / "checkpoint", seed=3, vlrm_scoring_mode="joint",
        vlrm_joint_permutations=2, vlrm_joint_group_size=3,
    )  # fmt: skip


def test_pairs_on_a_joint_checkpoint_average_both_orders(joint_checkpoint):
    from vlrm.use.scoring import RewardScorer

    scorer = RewardScorer.from_pretrained(joint_checkpoint, dtype="float32", device="cpu")
    assert scorer.joint["scoring_mode"] == "joint"
    rows = [_pair(11, 1), _pair(12, 0), _pair(13, 1)]
    scores = scorer.score_pairs(rows, batch_size=2, progress=False)
    assert scores.order_chosen.shape == (3, 2)
    encoder, model = scorer.encoder, scorer.model
    collator = JointCollator(encoder, True, shuffle=False)
    with torch.no_grad():
        first = _rewards(model, collator(rows, [[0, 1]] * 3))  # chosen first
        last = _rewards(model, collator(rows, [[1, 0]] * 3))  # chosen last
    torch.testing.assert_close(torch.from_numpy(scores.order_chosen[:, 0]), first[:3], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(scores.order_chosen[:, 1]), last[:3], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(scores.chosen), (first[:3] + last[:3]) / 2, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(scores.rejected), (first[3:] + last[3:]) / 2, rtol=0, atol=1e-5)
    padded = RewardScorer.from_pretrained(joint_checkpoint, dtype="float32", device="cpu", packing=False)
    np_chosen = padded.score_pairs(rows, batch_size=2, progress=False).chosen
    torch.testing.assert_close(torch.from_numpy(np_chosen), torch.from_numpy(scores.chosen), rtol=1e-5, atol=1e-5)


def test_a_grpo_group_is_chained_and_a_lone_response_scored_alone(joint_checkpoint):
    from vlrm.use.scoring import RewardScorer

    scorer = RewardScorer.from_pretrained(joint_checkpoint, dtype="float32", device="cpu")
    group = [{"prompt": "What is shown?", "images": [_image(21, (56, 56))], "response": _text(30 + i, 4)}
             for i in range(5)]  # fmt: skip
    lone = {"prompt": "Something else?", "images": [], "response": "Alone."}
    rewards = scorer.score(group + [lone], batch_size=4, progress=False)
    # 5 completions, chains of at most 3: split 3 + 2; the lone one a chain of one, and the report says so.
    assert scorer.last_joint_report == {"chains": 3, "alone": 1, "chained": 5}
    independent = RewardScorer.from_pretrained(joint_checkpoint, dtype="float32", device="cpu")
    independent.joint = {**independent.joint, "scoring_mode": "independent"}
    alone = independent.score([lone], progress=False)
    assert rewards[5] == pytest.approx(alone[0], abs=1e-5)  # a chain of one is the response alone
    chained = independent.score(group, progress=False)
    assert not np.allclose(rewards[:5], chained)  # in a chain, each completion is judged beside the others
