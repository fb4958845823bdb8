"""Rows of N responses (vlrm.data.rankings): every accepted layout read into the canonical row, bad rows named, and a
micro-batch of them laid out with the row's responses under one prompt node (its image through the vision tower once)
and the labels the objectives read."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from vlrm.data.prepare import branch_lengths, load_preference_dataset
from vlrm.errors import BadSampleError
from vlrm.layout.labels import LABEL_FIELDS, reward_positions
from vlrm.layout.packed import PackedPreferenceCollator, row_tokens
from vlrm.layout.padded import PaddedPreferenceCollator
from vlrm.model.reward_model import VLRewardModel

ASPECTS = ("Helpfulness", "Visual Faithfulness", "Ethical Considerations")


def vlfeedback_row(ratings, as_columns=False):
    """A VLFeedback row as released: 4 completions, each rated 1-5 (as strings) on the three aspects."""
    completions = [
        {"model": f"model-{index}", "response": f"Answer number {index}.",
         "annotations": {aspect: {"Rating": rating, "Rationale": "because"} for aspect, rating in zip(ASPECTS, row, strict=True)}}
        for index, row in enumerate(ratings)
    ]  # fmt: skip
    if as_columns:  # datasets' Sequence of a struct reads back as a mapping of lists
        completions = {key: [completion[key] for completion in completions] for key in completions[0]}
    return {
        "id": "vlf-0",
        "prompt": "What does the image show?",
        "img_path": "red.png",
        "models": [],
        "completions": completions,
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rankings")
    Image.new("RGB", (56, 56), (220, 30, 30)).save(directory / "red.png")
    Image.new("RGB", (56, 56), (30, 60, 220)).save(directory / "blue.png")
    return directory


def write(directory, rows, name="rows.jsonl"):
    path = directory / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_every_ranking_layout_reads_into_the_canonical_row(data_dir, encoder):
    rows = [
        vlfeedback_row([["5", "5", "5"], ["2", "1", "5"], ["4", "5", "N/A"], ["1", "1", "5"]]),
        vlfeedback_row([["3", "3", "3"], ["5", "4", "5"], ["1", "2", "5"], ["3", "3", "3"]], as_columns=True),
        {"question": "Color?", "images": ["red.png"], "responses": ["Red.", "Crimson.", "Blue.", "Green."], "ranks": [0, 0, 1, 2]},
        {"question": "Color?", "images": ["red.png"], "responses": ["Blue.", "Red.", "Green."], "ranking": [1, [0, 2]]},
        {"question": "Color?", "images": ["red.png"], "responses": ["Red.", "Blue."], "scores": [0.9, 0.1]},
        {"question": "Color?", "images": ["red.png"], "responses": ["Red.", "Blue."],
         "ratings": [{"truth": 5, "style": 3}, {"truth": 1, "style": 4}]},
        {"question": "Color?", "images": ["red.png"], "chosen": "Red.", "rejected": "Crimson.", "tie": True},
        {"question": "Color?", "images": ["red.png"], "chosen": "Red.", "rejected": "Blue."},
    ]  # fmt: skip
    dataset, report = load_preference_dataset(write(data_dir, rows), encoder=encoder)
    assert report.rows_kept == len(rows)
    vlf, columns, ranked, ranking, scored, rated, tie, pair = list(dataset)
    assert vlf["rating_names"] == ["helpfulness", "visual_faithfulness", "ethical_considerations"]
    assert math.isnan(vlf["ratings"][2][2]) and vlf["scores"][2] == pytest.approx(4.5)  # N/A left out of the mean
    assert vlf["ranks"] == [0.0, 2.0, 1.0, 3.0] and (vlf["chosen"], vlf["rejected"]) == (
        "Answer number 0.",
        "Answer number 3.",
    )
    assert len(vlf["images"]) == 1 and vlf["prompt"][0]["content"][0]["type"] == "image"
    assert columns["ranks"] == [1.0, 0.0, 2.0, 1.0]  # the same layout read through datasets' column form
    assert ranked["ranks"] == [0.0, 0.0, 1.0, 2.0] and ranked["chosen"] == "Red." and ranked["rejected"] == "Green."
    assert ranking["ranks"] == [1.0, 0.0, 1.0]
    assert scored["ranks"] == [0.0, 1.0] and scored["responses"] == ["Red.", "Blue."]
    assert (
        rated["rating_names"] == ["truth", "style"] and rated["scores"] == [4.0, 2.5] and rated["ranks"] == [0.0, 1.0]
    )
    assert tie["tie"] is True and tie["responses"] is None and pair["tie"] is False and pair["ranks"] is None
    prompt_length, responses, best = branch_lengths(dataset)[0]
    assert len(responses) == 4 and best == responses[0] and vlf["response_lengths"] == responses


@pytest.mark.parametrize(
    "row, field, reason",
    [
        ({"responses": ["Red.", "Blue."], "ranks": [0, 1, 2]}, "ranks", "3 values for 2 responses"),
        ({"responses": ["Red.", " "], "ranks": [0, 1]}, "responses", "response 1 is empty"),
        ({"responses": ["Red."], "ranks": [0]}, "responses", "at least 2 responses"),
        ({"responses": ["Red.", "Blue."], "ranks": [1, 1]}, "ranks", "the same rank"),
        ({"responses": ["Red.", "Red."], "ranks": [0, 1]}, "responses", "same text with different ranks"),
        ({"responses": ["Red.", "Blue."], "scores": [0.5, "high"]}, "scores", "expected a number"),
        ({"responses": ["Red.", "Blue."], "ranking": [0, 0]}, "ranking", "each response index"),
        ({"chosen": "Red.", "rejected": "Blue.", "tie": "yes"}, "tie", "expected true or false"),
    ],
)
def test_a_bad_ranking_row_names_file_row_and_field(data_dir, row, field, reason):
    good = {"question": "Color?", "images": ["red.png"], "responses": ["Red.", "Blue."], "ranks": [0, 1]}
    path = write(data_dir, [good, {"question": "Color?", "images": ["red.png"], **row}], "bad.jsonl")
    with pytest.raises(BadSampleError, match=rf"bad.jsonl: row 1: field `{field}`: .*{reason}"):
        load_preference_dataset(path)


def ranking_example(image, responses, ranks, question="Color?"):
    return {
        "prompt": [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": question}]}],
        "images": [image], "responses": responses, "ranks": ranks, "scores": None, "ratings": None,
        "rating_names": None, "chosen": responses[ranks.index(min(ranks))],
        "rejected": responses[len(ranks) - 1 - ranks[::-1].index(max(ranks))],
    }  # fmt: skip


@pytest.fixture(scope="module")
def micro_batch(data_dir):
    red, blue = str(data_dir / "red.png"), str(data_dir / "blue.png")
    return [
        ranking_example(red, ["Red.", "Crimson.", "Blue.", "Green."], [0.0, 0.0, 1.0, 2.0]),
        {**ranking_example(blue, ["Blue.", "Red."], [0.0, 1.0]), "responses": None, "ranks": None, "tie": False},
        ranking_example(blue, ["Navy.", "Blue.", "Red."], [0.0, 0.0, 1.0], question="Which color?"),
    ]


def test_a_row_s_n_responses_hang_under_one_prompt_node_and_its_image_is_encoded_once(micro_batch, encoder):
    batch = PackedPreferenceCollator(encoder)(micro_batch)
    layout = batch["packed_layout"]
    assert [len(spans) for spans in layout.branch_spans] == [4, 2, 3]  # each row: one node, its responses under it
    assert layout.deduplicated_images and batch["image_grid_thw"].shape[0] == 2  # red once, blue once for two nodes
    # Response-major reward order: the first response of every row, then the second..., as the labels say.
    assert reward_positions([4, 2, 3]) == [[0, 3, 6, 8], [1, 4], [2, 5, 7]]
    labels = batch["reward_labels"]
    assert labels.num_responses.tolist() == [4, 2, 3] and labels.matrix[0].tolist() == [0, 3, 6, 8]
    assert sorted(zip(labels.better.tolist(), labels.worse.tolist(), strict=True)) == sorted(
        [(0, 6), (0, 8), (3, 6), (3, 8), (6, 8), (1, 4), (2, 7), (5, 7)]
    )
    assert sorted(zip(labels.tie_first.tolist(), labels.tie_second.tolist(), strict=True)) == [(0, 3), (2, 5)]
    assert labels.best.tolist() == [0, 1, 2]
    padded = PaddedPreferenceCollator(encoder)(micro_batch)
    assert padded["input_ids"].shape[0] == 9 and torch.equal(padded["reward_labels"].better, labels.better)
    assert row_tokens(100, [10, 20, 30], 10, num_irrelevant=1, packing=True) == 100 + 60 + 10


def test_packed_and_padded_give_the_same_rewards_for_rows_of_n(micro_batch, encoder, tiny_model_dir):
    """The reward order and the labels are the layouts' own business: the model must not see a difference (1e-5)."""
    from vlrm.layout.attention import enable_packed_attention

    model = VLRewardModel.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    enable_packed_attention(model)
    with torch.no_grad():
        rewards = [
            model(
                **{key: value for key, value in collator(encoder)(micro_batch).items() if key not in LABEL_FIELDS}
            ).rewards
            for collator in (PaddedPreferenceCollator, PackedPreferenceCollator)
        ]
    torch.testing.assert_close(rewards[1], rewards[0], rtol=1e-5, atol=1e-5)
    assert rewards[0].shape == (9,) and rewards[0].std() > 0


def text_only(example):
    """The same row without its image: a text-only row (no image part in the prompt, no images)."""
    content = [part for part in example["prompt"][0]["content"] if part["type"] != "image"]
    return {**example, "prompt": [{"role": "user", "content": content}], "images": []}


def test_text_only_rows_mix_with_image_rows_in_one_packed_micro_batch(micro_batch, encoder, tiny_model_dir):
    """Skywork-VL-Reward's and BaseReward's mixed training: text-only rows (pairs and rankings) in the same packed
    micro-batch as image rows, packed = padded (1e-5); a micro-batch of text-only rows runs no vision forward."""
    from vlrm.layout.attention import enable_packed_attention

    model = VLRewardModel.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    enable_packed_attention(model)
    vision_calls = []
    model.model.visual.register_forward_hook(lambda *_: vision_calls.append(1))
    mixed = [text_only(micro_batch[1]), micro_batch[0], text_only(micro_batch[2])]
    with torch.no_grad():
        rewards = []
        for collator in (PaddedPreferenceCollator, PackedPreferenceCollator):
            batch = collator(encoder)(mixed)
            # The one image row's image: once per branch padded (4 responses), once packed.
            assert batch["image_grid_thw"].shape[0] == (4 if collator is PaddedPreferenceCollator else 1)
            rewards.append(model(**{key: value for key, value in batch.items() if key not in LABEL_FIELDS}).rewards)
        torch.testing.assert_close(rewards[1], rewards[0], rtol=1e-5, atol=1e-5)
        assert rewards[0].shape == (9,) and len(vision_calls) == 2
        text_batch = PackedPreferenceCollator(encoder)([text_only(row) for row in micro_batch])
        assert "pixel_values" not in text_batch
        text_rewards = model(**{key: value for key, value in text_batch.items() if key not in LABEL_FIELDS}).rewards
    assert len(vision_calls) == 2 and torch.isfinite(text_rewards).all()
    # A text-only row scores the same alone as next to image rows: nothing of the image rows leaks into it.
    torch.testing.assert_close(text_rewards[[1, 4]], rewards[1][[0, 3]], rtol=1e-5, atol=1e-5)
