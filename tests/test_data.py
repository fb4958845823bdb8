import io
import json
import random

import datasets
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vlrm.data.prepare import load_preference_dataset, pair_lengths
from vlrm.data.synthetic import draw_shapes, make_synthetic_dataset
from vlrm.errors import BadSampleError


def _png_bytes(color=(200, 10, 10)):
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def image_file(tmp_path):
    (tmp_path / "img").mkdir()
    path = tmp_path / "img" / "a.png"
    path.write_bytes(_png_bytes())
    return path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _canonical(row):
    return {key: row[key] for key in ("prompt", "chosen", "rejected")} | {"n_images": len(row["images"])}


EXPECTED_PROMPT = [
    {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "What is it?"}]}
]


def test_every_layout_maps_to_the_same_canonical_row(tmp_path, image_file):
    rel = "img/a.png"
    layouts = {
        "readme_question": {"question": "What is it?", "images": [rel], "chosen": "A cat.", "rejected": "A dog."},
        "readme_prompt": {"prompt": "What is it?", "images": [rel], "chosen": "A cat.", "rejected": "A dog."},
        "readme_query": {"query": "What is it?", "images": [rel], "chosen": "A cat.", "rejected": "A dog."},
        "trl_conversational": {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
            "rejected": [{"role": "assistant", "content": "A dog."}],
            "images": [rel],
        },
        "rlaif_v": {"question": "What is it?", "image": rel, "chosen": "A cat.", "rejected": "A dog."},
        "vl_rewardbench": {
            "query": "What is it?",
            "image": rel,
            "response": ["A dog.", "A cat."],
            "human_ranking": [1, 0],
        },
        "llava_povid": {
            "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}],
            "rejected_conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "A dog."},
            ],
            "image": rel,
        },
    }
    for name, row in layouts.items():
        dataset, _ = load_preference_dataset(_write_jsonl(tmp_path / f"{name}.jsonl", [row]))
        loaded = dataset[0]
        assert _canonical(loaded) == {
            "prompt": EXPECTED_PROMPT,
            "chosen": "A cat.",
            "rejected": "A dog.",
            "n_images": 1,
        }, name
        assert loaded["images"][0].size == (40, 40), name
        assert loaded["id"] == f"{name}-0"


def test_file_formats_and_image_kinds_load_alike(tmp_path, image_file):
    rows = [
        {"id": "p", "question": "Q?", "images": ["img/a.png"], "chosen": "yes", "rejected": "no", "margin": 2.0},
        {
            "id": "b",
            "question": "Q?",
            "images": [{"bytes": None, "path": "img/a.png"}],
            "chosen": "yes",
            "rejected": "no",
        },
        {"id": "t", "question": "Text only?", "images": [], "chosen": "yes", "rejected": "no", "category": "text"},
    ]
    json_path = tmp_path / "rows.json"
    json_path.write_text(json.dumps(rows))
    jsonl_path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    with_bytes = {
        "question": "Q?",
        "images": [{"bytes": _png_bytes(), "path": None}],
        "chosen": "yes",
        "rejected": "no",
    }
    pd.DataFrame([with_bytes]).to_parquet(tmp_path / "rows.parquet")
    image_rows = [{"question": "Q?", "images": [Image.new("RGB", (30, 20))], "chosen": "yes", "rejected": "no"}]
    datasets.Dataset.from_list(image_rows).save_to_disk(tmp_path / "saved")

    from_json, _ = load_preference_dataset(json_path)
    from_jsonl, _ = load_preference_dataset(jsonl_path)
    assert from_json["id"] == from_jsonl["id"] == ["p", "b", "t"]
    assert from_json[0]["margin"] == 2.0 and from_json[1]["margin"] is None
    assert from_json[2]["images"] == [] and from_json[2]["category"] == "text"
    from_parquet, _ = load_preference_dataset(tmp_path / "rows.parquet")
    assert from_parquet[0]["images"][0].size == (40, 40)
    from_disk, _ = load_preference_dataset(tmp_path / "saved")
    assert from_disk[0]["images"][0].size == (30, 20)


@pytest.mark.parametrize(
    "row, field, message",
    [
        ({"question": "Q?", "images": ["img/missing.png"], "chosen": "a", "rejected": "b"}, "images", "not found"),
        ({"question": "Q?", "images": ["img/corrupt.png"], "chosen": "a", "rejected": "b"}, "images", "cannot decode"),
        ({"question": "Q?", "images": [], "chosen": "  ", "rejected": "b"}, "chosen", "empty"),
        ({"question": "Q?", "images": [], "chosen": "same", "rejected": "same"}, "rejected", "identical"),
        ({"question": "Q?", "images": [], "chosen": 3, "rejected": "b"}, "chosen", "expected a string"),
        ({"images": [], "chosen": "a", "rejected": "b"}, "question", "missing"),
        ({"question": "Q?", "images": [], "chosen": "a", "rejected": "b", "margin": "big"}, "margin", "number"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, image_file, row, field, message):
    (tmp_path / "img" / "corrupt.png").write_bytes(_png_bytes()[:60])
    good = {"question": "Q?", "images": [], "chosen": "a", "rejected": "b"}
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, good, row])
    with pytest.raises(BadSampleError, match=rf"bad.jsonl: row 2: field `{field}`: .*{message}"):
        load_preference_dataset(path)
    dataset, report = load_preference_dataset(path, on_bad_sample="skip")
    assert len(dataset) == 2 and len(report.skipped) == 1
    assert "1 bad rows skipped" in report.summary() and f"row 2 `{field}`" in report.summary()


def test_max_samples_is_a_deterministic_subset(synthetic_dir):
    first, _ = load_preference_dataset(synthetic_dir / "train.jsonl", max_samples=10, seed=3)
    again, _ = load_preference_dataset(synthetic_dir / "train.jsonl", max_samples=10, seed=3)
    other, _ = load_preference_dataset(synthetic_dir / "train.jsonl", max_samples=10, seed=4)
    assert first["id"] == again["id"] and len(first) == 10
    assert first["id"] != other["id"]


def test_overlong_rows_are_dropped_and_counted_never_truncated(tmp_path, encoder):
    rows = [
        {"id": "short", "question": "Q?", "images": [], "chosen": "yes", "rejected": "no"},
        {"id": "long", "question": "Q?", "images": [], "chosen": "word " * 300, "rejected": "no"},
    ]
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    everything, _ = load_preference_dataset(path, encoder=encoder)
    prompt_length, chosen_length, _ = encoder.sequence_lengths(everything[1])
    assert pair_lengths(everything)[1][:2] == (prompt_length, chosen_length)
    kept, report = load_preference_dataset(path, encoder=encoder, max_seq_length=100)
    assert kept["id"] == ["short"] and report.num_overlong == 1 and report.overlong[0].startswith("long")
    assert "dropped 1 pairs longer than max_seq_length=100" in report.summary()
    kept, report = load_preference_dataset(path, encoder=encoder, max_seq_length=prompt_length + chosen_length)
    assert kept["id"] == ["short", "long"] and report.num_overlong == 0
    assert kept[1]["chosen"] == "word " * 300  # kept whole


def test_sequence_length_counts_visual_tokens(synthetic_dir, encoder):
    dataset, _ = load_preference_dataset(synthetic_dir / "train.jsonl", max_samples=1)
    row = dataset[0]
    prompt = encoder.encode_prompt(row["prompt"], row["images"])
    assert encoder.sequence_lengths(row)[0] == len(prompt.input_ids)
    assert prompt.input_ids.count(encoder.image_token_id) == int(prompt.image_grid_thw.prod() // 4)


def test_synthetic_answers_are_balanced_so_text_alone_cannot_win(tmp_path):
    train, _ = make_synthetic_dataset(tmp_path, num_train=120, num_eval=12)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    answers = {row["chosen"] for row in rows} | {row["rejected"] for row in rows}
    for answer in answers:
        as_chosen = sum(row["chosen"] == answer for row in rows)
        as_rejected = sum(row["rejected"] == answer for row in rows)
        assert abs(as_chosen - as_rejected) <= 1, answer


@pytest.mark.parametrize("size", [56, 112])
def test_synthetic_count_is_readable_as_coloured_area(size):
    """Every shape covers the same area, so the coloured pixels grow with the count whatever shapes were drawn."""
    background = np.array([245, 245, 245])
    areas = {count: [] for count in (1, 2, 3)}
    for seed in range(30):
        for count in areas:
            pixels = np.asarray(draw_shapes("blue", count, size, random.Random(seed)))
            areas[count].append(int((pixels != background).any(axis=-1).sum()))
    single = np.mean(areas[1])
    for count, counted in areas.items():
        assert np.allclose(np.array(counted) / single, count, rtol=0.12), (count, counted)
    assert max(areas[1]) < min(areas[2]) and max(areas[2]) < min(areas[3])
