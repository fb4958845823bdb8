"""Prepared data (vlrm.prepare): the cache and its key, drawing rows before decoding, mixtures, parallel preparation,
hub ids, and the package itself importable from anywhere."""

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from transformers import AutoProcessor

from vlrm.data.prepare import DataSettings, load_preference_dataset, mixture_targets, pair_lengths, prepare_mixture
from vlrm.errors import BadSampleError
from vlrm.layout.encoder import PreferenceEncoder, apply_pixel_limits

ROOT = Path(__file__).resolve().parents[1]


def _png(color, size=(40, 40)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _rows(count, prefix="r", images=True):
    return [
        {
            "id": f"{prefix}{i}",
            "question": f"What is item {i}?",
            "images": [{"bytes": _png((i * 20 % 256, 10, 10)), "path": None}] if images else [],
            "chosen": f"Item {i}.",
            "rejected": f"Not item {i}.",
        }
        for i in range(count)
    ]


def _write_parquet(path, rows, row_group_size=None):
    pd.DataFrame(rows).to_parquet(path, row_group_size=row_group_size)
    return path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_second_call_loads_the_cache_and_says_so(tmp_path, encoder):
    path = _write_parquet(tmp_path / "pairs.parquet", _rows(12))
    first, report = load_preference_dataset(path, encoder=encoder, cache_dir=tmp_path / "cache")
    assert report.builds == 1 and report.cache_hits == 0 and "prepared in" in report.summary()
    again, report = load_preference_dataset(path, encoder=encoder, cache_dir=tmp_path / "cache", num_proc=2)
    assert report.builds == 0 and report.cache_hits == 1  # the process count does not change the content
    assert "loaded from the prepared cache" in report.summary()
    assert again["id"] == first["id"] and pair_lengths(again) == pair_lengths(first)
    # Memory-mapped from the cache dir, no index mapping; images still encoded (bytes), decoded only on access.
    assert again._indices is None and all(str(tmp_path / "cache") in f["filename"] for f in again.cache_files)
    undecoded = again.cast_column("images", datasets.List(datasets.Image(decode=False)))
    assert undecoded[0]["images"][0]["bytes"] == _png((0, 10, 10))
    assert again[0]["images"][0].size == (40, 40)


def test_every_setting_that_changes_the_content_rebuilds(tmp_path, encoder, tiny_model_dir):
    path = _write_jsonl(
        tmp_path / "pairs.jsonl", [{k: v for k, v in row.items() if k != "images"} for row in _rows(8)]
    )
    cache = tmp_path / "cache"

    def builds(file=path, encoder=encoder, **settings):
        return load_preference_dataset(file, encoder=encoder, cache_dir=cache, **settings)[1].builds

    assert builds() == 1 and builds() == 0
    smaller_images = AutoProcessor.from_pretrained(tiny_model_dir)
    apply_pixel_limits(smaller_images, None, 28 * 28 * 2)
    assert builds(encoder=PreferenceEncoder(smaller_images)) == 1  # the processor (here its pixel limits)
    assert builds(encoder=None) == 1  # no processor: no token lengths
    assert builds(max_seq_length=100) == 1
    assert builds(on_bad_sample="skip") == 1
    assert builds(max_samples=5) == 1 and builds(max_samples=5) == 0
    assert builds(max_samples=5, seed=1) == 1
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[3]["chosen"] = "Item 3, changed."
    _write_jsonl(path, rows)  # same path, new content (and size)
    assert builds() == 1
    rows[3]["chosen"] = "Item 3, CHANGED."
    _write_jsonl(path, rows)  # same size, possibly the same mtime tick: the content hash tells them apart
    assert builds() == 1
    assert builds() == 0


def test_max_samples_draws_rows_before_decoding_any_image(tmp_path, encoder):
    rows = _rows(10)
    drawn = set(np.random.default_rng([0, 0]).permutation(10)[:3].tolist())  # the seeded draw of prepare_source
    for index, row in enumerate(rows):
        if index not in drawn:
            row["images"] = [{"bytes": b"not an image", "path": None}]
    path = _write_parquet(tmp_path / "pairs.parquet", rows, row_group_size=4)  # 3 row groups
    subset, report = load_preference_dataset(path, max_samples=3, seed=0, encoder=encoder, cache_dir=tmp_path / "c")
    assert sorted(subset["id"]) == sorted(f"r{i}" for i in drawn) and report.rows_read == 10
    with pytest.raises(BadSampleError, match=r"pairs.parquet: row \d: field `images`: cannot decode"):
        load_preference_dataset(path, encoder=encoder, cache_dir=tmp_path / "c")


def test_skipped_rows_are_topped_up_to_max_samples(tmp_path, encoder):
    rows = _rows(20)
    for index in (1, 2, 3, 5, 8, 13):
        rows[index]["chosen"] = rows[index]["rejected"]
    path = _write_jsonl(tmp_path / "pairs.jsonl", [{k: v for k, v in row.items() if k != "images"} for row in rows])
    subset, report = load_preference_dataset(path, "skip", max_samples=12, encoder=encoder, cache_dir=tmp_path / "c")
    assert len(subset) == 12 and len(set(subset["id"])) == 12
    assert not {"r1", "r2", "r3", "r5", "r8", "r13"} & set(subset["id"])
    assert report.rows_kept == 12 and report.num_skipped >= 1


@pytest.mark.parametrize("num_proc", [1, 2])
def test_bad_rows_name_file_row_and_field_in_parallel_preparation(tmp_path, encoder, num_proc):
    rows = _rows(9)
    rows[6]["images"] = [{"bytes": _png((1, 2, 3))[:50], "path": None}]
    rows[7]["rejected"] = "   "
    path = _write_parquet(tmp_path / "pairs.parquet", rows)
    settings = {"encoder": encoder, "cache_dir": tmp_path / "cache", "num_proc": num_proc}
    with pytest.raises(BadSampleError, match=r"pairs.parquet: row 6: field `images`: cannot decode"):
        load_preference_dataset(path, **settings)
    assert not list((tmp_path / "cache").glob("pairs-*/vlrm_prepared.json"))  # nothing cached by a failed build
    kept, report = load_preference_dataset(path, "skip", **settings)
    assert len(kept) == 7 and report.num_skipped == 2
    assert report.skipped == ["row 6 `images`: " + report.skipped[0].split(": ", 1)[1], "row 7 `rejected`: is empty"]
    assert "2 bad rows skipped" in report.summary()


def test_mixture_targets_follow_weights_counts_and_the_cap():
    assert mixture_targets([10, 6]) == [None, None]
    assert mixture_targets([10, 6], weights=[0.5, 2.0]) == [5, 12]
    assert mixture_targets([10, 6], num_samples=[3, 6]) == [3, None]
    # 8 x 5/17 and 8 x 12/17, rounded by largest remainder: 2 and 6 (None: all 6 rows, once)
    assert mixture_targets([10, 6], weights=[0.5, 2.0], max_samples=8) == [2, None]
    assert mixture_targets([10], max_samples=4) == [4]
    with pytest.raises(ValueError, match="dataset_weights has 1 entries for 2 sources"):
        mixture_targets([10, 6], weights=[1.0])


def test_mixture_draws_seeded_counts_per_source(tmp_path, encoder):
    first = _write_parquet(tmp_path / "first.parquet", _rows(10, "a"))
    second = _write_jsonl(tmp_path / "second.jsonl", [{**row, "images": []} for row in _rows(6, "b")])
    settings = DataSettings(seed=3, cache_dir=str(tmp_path / "cache"))
    mixed, reports = prepare_mixture([first, second], settings, encoder, weights=[0.5, 2.0])
    sources = pd.Series(mixed["source"]).value_counts().to_dict()
    assert sources == {str(first): 5, str(second): 12} and [r.rows_kept for r in reports] == [5, 12]
    counts = pd.Series([i for i in mixed["id"] if i.startswith("b")]).value_counts()
    assert sorted(counts.tolist()) == [2] * 6  # 12 from 6 rows: each exactly twice
    assert mixed._indices is None  # plain concatenation of Arrow files: adding a column copies nothing
    again, _ = prepare_mixture([first, second], settings, encoder, weights=[0.5, 2.0])
    assert again["id"] == mixed["id"]
    reseeded, _ = prepare_mixture([first, second], DataSettings(seed=4, cache_dir=settings.cache_dir), encoder,
                                  weights=[0.5, 2.0])  # fmt: skip
    assert sorted(reseeded["id"][:5]) != sorted(mixed["id"][:5])
    capped, reports = prepare_mixture([first, second], settings, encoder, num_samples=[3, 9], max_samples=6)
    assert [r.rows_kept for r in reports] == [2, 4] and len(capped) == 6


def test_hub_dataset_ids_go_through_load_dataset(tmp_path, encoder, monkeypatch):
    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(_rows(3, images=False))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    settings = DataSettings(cache_dir=str(tmp_path / "cache"), hub_config="default", hub_split="test")
    dataset, (report,) = prepare_mixture("someorg/some-prefs", settings, encoder)
    assert calls == [("someorg/some-prefs", "default", "test")] and dataset["id"] == ["r0", "r1", "r2"]
    assert report.source == "someorg/some-prefs:test" and set(dataset["source"]) == {"someorg/some-prefs:test"}

    def offline(name, config=None, split=None):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"read as a Hugging Face Hub dataset.*no network.*hf download someorg/x"):
        prepare_mixture("someorg/x", settings, encoder)
    with pytest.raises(FileNotFoundError, match="preference data not found: data/missing.jsonl"):
        prepare_mixture("data/missing.jsonl", settings, encoder)  # a file name is never taken for a hub id


def test_vlrm_imports_from_any_directory_after_install(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    finished = subprocess.run(
        [sys.executable, "-c", "import vlrm, vlrm.use.scoring, vlrm.data.prepare; print(vlrm.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    assert Path(finished.stdout.strip()) == ROOT / "vlrm" / "__init__.py"


def test_the_wheel_contains_the_package(tmp_path):
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ and *.egg-info behind
    shutil.copytree(ROOT / "vlrm", source / "vlrm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    finished = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    (wheel,) = tmp_path.glob("vlrm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"vlrm/__init__.py", "vlrm/data/prepare.py", "vlrm/use/scoring.py", "vlrm/model/reward_model.py"} <= names
