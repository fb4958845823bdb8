import json
import math

import pytest
import torch
from PIL import Image

from tests.test_train import losses, run_train
from vlrm.data.prepare import load_preference_dataset
from vlrm.layout.padded import PaddedPreferenceCollator, split_rewards
from vlrm.train.irrelevant import IrrelevantPairSampler, IrrelevantQueryCollator, prompt_keys, with_row_index
from vlrm.train.trainer import reward_losses


@pytest.fixture(scope="module")
def dataset(synthetic_dir):
    return with_row_index(load_preference_dataset(synthetic_dir / "train.jsonl")[0])


def test_partners_are_never_self_same_image_or_same_chosen(dataset):
    keys = prompt_keys(dataset)
    sampler = IrrelevantPairSampler(dataset, num_pairs=3, seed=0)
    for index in range(len(dataset)):
        partners = sampler.partners(index, epoch=0)
        assert len(set(partners)) == 3 and index not in partners
        for other in partners:
            assert keys[other] != keys[index]
            assert dataset[other]["chosen"] != dataset[index]["chosen"]


def test_shared_images_are_never_partners(tmp_path):
    rows = [
        {"question": f"Q{i}?", "images": [f"img{i % 2}.png"], "chosen": f"answer {i}", "rejected": "no"}
        for i in range(6)
    ]
    for i in range(2):
        Image.new("RGB", (30, 30), (i * 200, 0, 0)).save(tmp_path / f"img{i}.png")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset, _ = load_preference_dataset(tmp_path / "rows.jsonl")
    sampler = IrrelevantPairSampler(dataset, num_pairs=2, seed=1)
    for index in range(6):
        for epoch in range(5):
            assert all(other % 2 != index % 2 for other in sampler.partners(index, epoch))


def test_text_only_rows_get_partners_with_other_questions(tmp_path):
    rows = [{"question": f"Question {i}?", "images": [], "chosen": f"answer {i}", "rejected": "no"} for i in range(4)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset, _ = load_preference_dataset(tmp_path / "rows.jsonl")
    sampler = IrrelevantPairSampler(dataset, num_pairs=3, seed=0)
    assert sorted(sampler.partners(0, 0)) == [1, 2, 3]
    with pytest.raises(ValueError, match="row 0: only 3 other pairs"):
        IrrelevantPairSampler(dataset, num_pairs=4, seed=0).partners(0, 0)


def test_partners_come_from_the_micro_batch_when_it_has_enough(dataset):
    sampler = IrrelevantPairSampler(dataset, num_pairs=1, seed=0)
    keys = prompt_keys(dataset)
    pool = list(range(8))
    for index in pool:
        (partner,) = sampler.partners(index, epoch=0, pool=pool)
        assert partner in pool and partner != index and keys[partner] != keys[index]
    # A pool with no valid partner (only the row itself) falls back to the whole dataset.
    (partner,) = sampler.partners(3, epoch=0, pool=[3])
    assert partner != 3 and dataset[partner]["chosen"] != dataset[3]["chosen"]


def test_draws_are_seeded_and_change_across_epochs(dataset):
    sampler = IrrelevantPairSampler(dataset, num_pairs=2, seed=5)
    again = IrrelevantPairSampler(dataset, num_pairs=2, seed=5)
    epoch0 = [sampler.partners(i, 0) for i in range(len(dataset))]
    assert epoch0 == [again.partners(i, 0) for i in range(len(dataset))]
    assert epoch0 != [sampler.partners(i, 1) for i in range(len(dataset))]
    assert epoch0 != [IrrelevantPairSampler(dataset, 2, seed=6).partners(i, 0) for i in range(len(dataset))]


def test_collator_modes_put_the_chosen_response_under_other_prompts(dataset, encoder):
    examples = [dataset[0], dataset[1]]
    for mode in ("query", "image"):
        sampler = IrrelevantPairSampler(dataset, num_pairs=2, seed=0, mode=mode)
        collator = IrrelevantQueryCollator(PaddedPreferenceCollator(encoder), dataset, sampler)
        attached = collator.irrelevant_prompts(examples[0])
        partners = sampler.partners(0, 0)
        for prompt, other in zip(attached, partners, strict=True):
            expected_prompt = dataset[other]["prompt"] if mode == "query" else examples[0]["prompt"]
            assert prompt["prompt"] == expected_prompt
            assert [image.tobytes() for image in prompt["images"]] == [
                image.tobytes() for image in dataset[other]["images"]
            ]
        batch = collator(examples)
        assert batch["num_irrelevant"] == 2 and batch["input_ids"].shape[0] == 2 * 2 + 2 * 2


def test_image_mode_prefers_partners_asking_the_same_question(dataset, tmp_path):
    sampler = IrrelevantPairSampler(dataset, num_pairs=2, seed=0, mode="image")
    pool = list(range(8))
    for index in range(len(dataset)):
        for partners in (sampler.partners(index, 0), sampler.partners(index, 0, pool)):
            assert all(dataset[other]["prompt"] == dataset[index]["prompt"] for other in partners), index
            assert all(dataset[other]["chosen"] != dataset[index]["chosen"] for other in partners)
    # A question no other row asks still gets partners (any valid row).
    rows = [{"question": f"Q{i}?", "images": [f"img{i}.png"], "chosen": f"a{i}", "rejected": "no"} for i in range(4)]
    for i in range(4):
        Image.new("RGB", (30, 30), (i * 60, 0, 0)).save(tmp_path / f"img{i}.png")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    unique, _ = load_preference_dataset(tmp_path / "rows.jsonl")
    assert sorted(IrrelevantPairSampler(unique, num_pairs=3, seed=0, mode="image").partners(0, 0)) == [1, 2, 3]


def test_loss_matches_a_hand_computation():
    chosen, rejected = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.5])
    irrelevant = torch.tensor([[0.2, 2.0], [0.5, -1.0]])
    margin = torch.tensor([0.5, 0.0])

    def nls(x):
        return -math.log(1 / (1 + math.exp(-x)))

    bt = (nls(1.0 - 0.0 - 0.5) + nls(0.5 - 1.5)) / 2
    irr = (nls(1.0 - 0.2) + nls(1.0 - 2.0) + nls(0.5 - 0.5) + nls(0.5 + 1.0)) / 4
    center = 0.1 * ((1.0 + 0.0) ** 2 + (0.5 + 1.5) ** 2) / 2
    loss, parts = reward_losses(chosen, rejected, irrelevant, margin, 0.1, irrelevant_loss_weight=0.7)
    assert parts["bt_loss"].item() == pytest.approx(bt, rel=1e-6)
    assert parts["irrelevant_loss"].item() == pytest.approx(irr, rel=1e-6)
    assert loss.item() == pytest.approx(bt + center + 0.7 * irr, rel=1e-6)


def test_split_rewards_order():
    rewards = torch.arange(8.0)
    chosen, rejected, irrelevant = split_rewards(rewards, num_pairs=2, num_irrelevant=2)
    assert chosen.tolist() == [0, 1] and rejected.tolist() == [2, 3] and irrelevant.tolist() == [[4, 5], [6, 7]]


def test_weight_zero_trains_exactly_like_vanilla(tmp_path, tiny_model_dir, synthetic_dir):
    vanilla = run_train(tmp_path / "vanilla", tiny_model_dir, synthetic_dir)
    augmented = run_train(
        tmp_path / "augmented",
        tiny_model_dir,
        synthetic_dir,
        "--use_irrelevant_queries",
        "true",
        "--irrelevant_loss_weight",
        "0",
    )
    vanilla_losses, augmented_losses = losses(tmp_path / "vanilla" / "out"), losses(tmp_path / "augmented" / "out")
    assert sorted(vanilla_losses) == [1, 2, 3, 4]
    for step, loss in vanilla_losses.items():
        assert augmented_losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    # Parameters agree to float round-off: the extra rows change summation order in batched kernels, and Adam's
    # normalised step magnifies that on near-zero gradients, so compare the trained models' rewards instead.
    rows = list(load_preference_dataset(synthetic_dir / "eval.jsonl", max_samples=8)[0])
    batch = PaddedPreferenceCollator(augmented["encoder"])(rows)
    inputs = {key: value for key, value in batch.items() if key not in ("num_pairs", "num_irrelevant", "margin")}
    with torch.no_grad():
        torch.testing.assert_close(
            augmented["model"].eval()(**inputs).rewards,
            vanilla["model"].eval()(**inputs).rewards,
            rtol=1e-4,
            atol=1e-5,
        )
    history = json.loads((tmp_path / "augmented" / "out" / "checkpoint-4" / "trainer_state.json").read_text())
    assert any("irrelevant_accuracy" in entry for entry in history["log_history"])
