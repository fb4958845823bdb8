"""The video benchmarks and layouts: MM-RLHF-RewardBench's video rows inside Acc / Acc+, VideoRewardBench's dimensions,
LLaVA-Video / ShareGPT video pairs, eval_rm.py end to end on the synthetic stand-ins with the published numbers beside,
and bad video rows named by file, row and field (or counted out)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vlrm.data.benchmarks import REFERENCE_RESULTS, VIDEO_REWARDBENCH_DIMENSIONS
from vlrm.data.prepare import load_preference_dataset
from vlrm.data.rows import map_row
from vlrm.data.synthetic import write_video_benchmark_standins
from vlrm.data.videos import VideoSettings, write_clip
from vlrm.errors import BadSampleError, RowProblem
from vlrm.layout.encoder import PreferenceEncoder
from vlrm.metrics import evaluate_pairs

# Small frames for fast tests: 56 x 112 fits the cap exactly (4 x 8 patches of 14, 8 merged tokens a frame).
SMALL = {"video_min_pixels": 784, "video_max_pixels": 6272}
DIMENSIONS = list(VIDEO_REWARDBENCH_DIMENSIONS)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _kinds(prompt: list[dict]) -> list[str]:
    return [part["type"] for message in prompt for part in message["content"]]


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    """The two video stand-ins: 10 clips of 8 frames, 56 x 112 (MM-RLHF: 30 pairs in 15 groups; VideoRewardBench: 10
    pairs, 2 per dimension)."""
    return write_video_benchmark_standins(tmp_path_factory.mktemp("video_standins"), num_clips=10)


@pytest.fixture(scope="module")
def small_encoder(processor):
    return PreferenceEncoder(processor, VideoSettings(min_pixels=784, max_pixels=6272))


def _clip(path: Path, seed: int = 0) -> Path:
    frames = np.random.default_rng(seed).integers(0, 255, size=(8, 56, 112, 3), dtype=np.uint8)
    return write_clip(path, frames, 4.0)


# ----------------------------------------------------------------------------------------------------------------
# Layouts


def test_mm_rlhf_video_rows_are_scored_grouped_and_categorised(standins, small_encoder):
    mm_rlhf, _ = standins
    raw = [json.loads(line) for line in mm_rlhf.read_text().splitlines()]
    dataset, report = load_preference_dataset(mm_rlhf, encoder=small_encoder)
    assert report.num_unsupported == 0 and report.num_skipped == 0 and len(dataset) == len(raw) == 30
    assert set(dataset["benchmark"]) == {"mm_rlhf"}
    for row, source in zip(dataset, raw, strict=True):
        assert row["group"] == source["id"] and row["id"].startswith(source["id"] + "#")
        assert (row["chosen"], row["rejected"]) == (source["chosen"], source["rejected"])
        if source["video"]:  # the clip is the row's one video, before the text, its frames sampled and stored
            assert _kinds(row["prompt"]) == ["video", "text"] and row["images"] == []
            assert len(row["videos"]) == 1 and row["videos"][0]["frames_indices"] == [0, 2, 5, 7]
            assert np.asarray(row["videos"][0]["frames"][0]).shape == (56, 112, 3)
            assert row["category"] == "video"
        else:
            assert _kinds(row["prompt"]) == ["image", "text"] and len(row["images"]) == 1 and row["videos"] == []
            assert row["category"] == "short"  # the first of MM-RLHF's words in images/short_standin_*.png
    assert len(set(dataset["group"])) == 15


def test_mm_rlhf_fields_follow_its_evaluation_script():
    """The image wins over the video, the prompt's media token goes and the media go first, empty columns are absent,
    and a row without an id is no group."""
    base = {"prompt": "<image>\nWhich way?", "chosen": "Right.", "rejected": "Left.", "chosen_reason": "r",
            "rejected_reason": "r"}  # fmt: skip
    row = map_row(base | {"id": "g", "image": "data/long/1.png", "video": "data/video/1.mp4"})
    assert row["images"] == ["data/long/1.png"] and row["videos"] == [] and row["category"] == "long"
    row = map_row(base | {"image": "", "video": b"\x00bytes"})  # recognised by its reasons; bytes as the video
    assert row["benchmark"] == "mm_rlhf" and row["videos"] == [b"\x00bytes"] and row["images"] == []
    assert _kinds(row["prompt"]) == ["video", "text"] and row["prompt"][0]["content"][1]["text"] == "Which way?"
    assert row["group"] is None and row["category"] is None


def test_videorewardbench_rows_map_to_dimensions(standins, small_encoder, tmp_path):
    _, video_rewardbench = standins
    raw = [json.loads(line) for line in video_rewardbench.read_text().splitlines()]
    dataset, _ = load_preference_dataset(video_rewardbench, encoder=small_encoder)
    assert set(dataset["benchmark"]) == {"videorewardbench"} and dataset["group"] == [None] * 10
    assert dataset["category"] == [DIMENSIONS[index % 5] for index in range(10)]
    assert dataset["chosen"] == [row["chosen"] for row in raw] and dataset["rejected"] == [
        row["rejected"] for row in raw
    ]
    assert all(_kinds(prompt) == ["video", "text"] for prompt in dataset["prompt"])
    assert all(len(videos) == 1 and len(videos[0]["frames"]) == 4 for videos in dataset["videos"])

    # Named with `benchmark`, the dimension may come from `category`, in another spelling, and the video from `videos`.
    _clip(tmp_path / "a.mp4")
    rows = [
        {"videos": ["a.mp4"], "question": "Q?", "chosen": "A.", "rejected": "B.", "category": spelling}
        for spelling in ("long_perception", "Short-form Perception", "KNOWLEDGE", "temporal reasoning", "safety")
    ]
    dataset, _ = load_preference_dataset(_jsonl(tmp_path / "named.jsonl", rows), benchmark="videorewardbench",
                                         encoder=small_encoder)  # fmt: skip
    assert dataset["category"] == DIMENSIONS
    rows[2]["category"] = "perception"  # long or short: neither
    with pytest.raises(BadSampleError, match=r"named_bad.jsonl: row 2: field `category`: expected one of long-form"):
        load_preference_dataset(_jsonl(tmp_path / "named_bad.jsonl", rows), benchmark="videorewardbench")
    with pytest.raises(RowProblem, match="every VideoRewardBench pair is judged on its video"):
        map_row({"question": "Q?", "chosen": "A.", "rejected": "B.", "dimension": "safety"}, "videorewardbench")


def test_which_benchmark_a_video_pair_is():
    """`dimension` beside a video: VideoRewardBench; MM-RLHF's `id`, `prompt` and `video` (a parquet row drops a null
    `image`): MM-RLHF; a `video` pair asking its `question`: a plain pair, no group, an image beside it kept."""
    pair = {"chosen": "Right.", "rejected": "Left."}
    assert map_row(pair | {"question": "Q?", "video": "a.mp4", "dimension": "Reasoning"})["benchmark"] == (
        "videorewardbench"
    )
    assert map_row(pair | {"prompt": "Q?", "video": "a.mp4", "id": "g"})["group"] == "g"
    plain = map_row(pair | {"question": "Q?", "video": "a.mp4", "image": "b.png", "id": "g"})
    assert plain["benchmark"] is None and plain["group"] is None
    assert plain["videos"] == ["a.mp4"] and plain["images"] == ["b.png"]


def test_llava_video_and_sharegpt_video_pairs(tmp_path, small_encoder):
    human = {"from": "human", "value": "<video>\nWhich way does it move?"}
    llava_video = {"video": "a.mp4", "conversations": [human, {"from": "gpt", "value": "Right."}],
                   "rejected_conversations": [human, {"from": "gpt", "value": "Left."}]}  # fmt: skip
    # LLaVA-Video-178K writes <image> for its video: read as the video's place.
    llava_178k = {"video": "a.mp4", "rejected": "Left.",
                  "conversations": [{"from": "human", "value": "<image>\nWhich way does it move?"},
                                    {"from": "gpt", "value": "Right."}]}  # fmt: skip
    sharegpt = {"videos": ["a.mp4", "b.mp4"], "images": ["c.png"],
                "conversations": [{"from": "human", "value": "First <video>, then <image> and <video>: which way?"}],
                "chosen": {"from": "gpt", "value": "Right."},
                "rejected": {"from": "gpt", "value": "Left."}}  # fmt: skip
    plain = {"videos": ["a.mp4"], "prompt": "Which way does it move?", "chosen": "Right.", "rejected": "Left."}
    for row in (llava_video, llava_178k, plain):
        mapped = map_row(row)
        assert mapped["videos"] == ["a.mp4"] and mapped["images"] == [] and mapped["benchmark"] is None
        assert _kinds(mapped["prompt"]) == ["video", "text"]
        assert mapped["prompt"][0]["content"][1]["text"] == "Which way does it move?"
        assert (mapped["chosen"], mapped["rejected"]) == ("Right.", "Left.")
    mapped = map_row(sharegpt)
    assert _kinds(mapped["prompt"]) == ["text", "video", "text", "image", "text", "video", "text"]
    assert mapped["videos"] == ["a.mp4", "b.mp4"] and mapped["images"] == ["c.png"]
    assert (mapped["chosen"], mapped["rejected"]) == ("Right.", "Left.")
    with pytest.raises(RowProblem, match="0 images but 2 image places"):  # two <image> for one video: no guess
        map_row(llava_178k | {"conversations": [{"from": "human", "value": "<image><image>Q?"},
                                                {"from": "gpt", "value": "A."}]})  # fmt: skip

    # Read from a file: the video path is relative to it, sampled once into the prepared row.
    (tmp_path / "clips").mkdir()
    _clip(tmp_path / "clips" / "a.mp4")
    rows = [dict(row, video="clips/a.mp4") if "video" in row else dict(row, videos=["clips/a.mp4"])
            for row in (llava_video, llava_178k, plain)]  # fmt: skip
    dataset, report = load_preference_dataset(_jsonl(tmp_path / "video_pairs.jsonl", rows), encoder=small_encoder)
    assert len(dataset) == 3 and report.num_skipped == 0
    assert len({videos[0]["key"] for videos in dataset["videos"]}) == 1  # the same clip, the same sampled video
    assert all(videos[0]["frames_indices"] == [0, 2, 5, 7] for videos in dataset["videos"])


# ----------------------------------------------------------------------------------------------------------------
# Bad video rows


def test_bad_video_rows_are_named_or_counted(tmp_path, small_encoder):
    _clip(tmp_path / "good.mp4")
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video at all" * 10)
    rows = [{"id": f"v{i}", "video": video, "prompt": "Which way?", "chosen": "Right.", "rejected": "Left.",
             "dimension": "reasoning"}
            for i, video in enumerate(["good.mp4", "missing.mp4", "corrupt.mp4"])]  # fmt: skip
    path = _jsonl(tmp_path / "vrb.jsonl", rows)
    with pytest.raises(BadSampleError, match=r"vrb.jsonl: row 1: field `videos`: video file not found: .*missing.mp4"):
        load_preference_dataset(path, encoder=small_encoder)
    with pytest.raises(BadSampleError, match=r"vrb_corrupt.jsonl: row 1: field `videos`: cannot open video"):
        load_preference_dataset(_jsonl(tmp_path / "vrb_corrupt.jsonl", [rows[0], rows[2]]), encoder=small_encoder)
    dataset, report = load_preference_dataset(path, "skip", encoder=small_encoder)
    assert dataset["id"] == ["v0"] and report.num_skipped == 2
    assert (
        "row 1 `videos`: video file not found" in report.summary()
        and "row 2 `videos`: cannot open" in report.summary()
    )

    # Video bytes in a parquet column, good then corrupt; an MM-RLHF video row is an error like any other now, not an
    # unsupported skip.
    videos = [(tmp_path / "good.mp4").read_bytes(), b"\x00corrupt"]
    rows = [{"id": f"g{i}", "image": None, "video": video, "prompt": "Which way?", "chosen": "Right.",
             "rejected": "Left."} for i, video in enumerate(videos)]  # fmt: skip
    pd.DataFrame(rows).to_parquet(tmp_path / "mmrlhf.parquet")
    with pytest.raises(BadSampleError, match=r"mmrlhf.parquet: row 1: field `videos`: cannot open video <bytes>"):
        load_preference_dataset(tmp_path / "mmrlhf.parquet", encoder=small_encoder)
    dataset, report = load_preference_dataset(tmp_path / "mmrlhf.parquet", "skip", encoder=small_encoder)
    assert report.num_skipped == 1 and report.num_unsupported == 0 and dataset["group"] == ["g0"]
    assert len(dataset[0]["videos"][0]["frames"]) == 4


# ----------------------------------------------------------------------------------------------------------------
# Protocols and published numbers


def test_acc_plus_per_category_by_hand():
    """MM-RLHF reports Acc+ per category too: a group counts in its category when all its pairs are right."""
    chosen = np.array([2.0, 2.0, 2.0, 0.0, 2.0, 2.0])
    rejected = np.ones(6)
    categories = ["video", "video", "video", "video", "mcq", "mcq"]
    groups = ["a", "a", "b", "b", "c", "d"]
    metrics = evaluate_pairs(chosen, rejected, categories, groups=groups)
    assert metrics["acc_plus"] == pytest.approx(3 / 4) and metrics["num_groups"] == 4
    assert metrics["per_category"]["video"] == {"accuracy": 0.75, "num_pairs": 4, "acc_plus": 0.5, "num_groups": 2}
    assert metrics["per_category"]["mcq"]["acc_plus"] == 1.0


def test_videorewardbench_references_are_its_table():
    """Each overall is its five dimensions' pair-weighted mean (the paper's overall is micro accuracy), to the
    table's rounding: a mistyped number breaks this; the macro is their plain mean."""
    counts = np.array([count for _, count in VIDEO_REWARDBENCH_DIMENSIONS.values()])
    assert counts.sum() == 1563
    references = {ref["model"]: ref for ref in REFERENCE_RESULTS["videorewardbench"]}
    assert {name: references[name]["overall"] for name in ("Gemini-2.5-Pro", "Skywork-VL-Reward-7B",
            "IXC-2.5-Reward-7B")} == {"Gemini-2.5-Pro": 63.6, "Skywork-VL-Reward-7B": 60.5,
                                      "IXC-2.5-Reward-7B": 53.4}  # fmt: skip
    for ref in references.values():
        dimensions = np.array([ref["per_category"][name] for name in DIMENSIONS])
        assert abs((dimensions * counts).sum() / counts.sum() - ref["overall"]) <= 0.1, ref["model"]
        assert ref["macro"] == pytest.approx(round(dimensions.mean(), 1)) and "2509.00484" in ref["source"]


def test_eval_on_video_standins_reports_protocols_and_references(tmp_path, eval_rm, save_reward_checkpoint, standins):
    mm_rlhf, video_rewardbench = standins
    run = tmp_path / "run"
    save_reward_checkpoint(run / "checkpoint-1", seed=3)
    config = tmp_path / "eval.yaml"
    config.write_text(json.dumps({
        "model_dirs": [str(run)], "dataset_path": {"vrb": str(video_rewardbench), "mmrlhf": str(mm_rlhf)},
        "num_irrelevant_pairs": 0, "results_dir": str(tmp_path / "results"), "log_dir": str(tmp_path / "logs"),
        **SMALL,
    }))  # fmt: skip
    assert eval_rm.main([str(config)]) == 0

    results = pd.read_csv(tmp_path / "results" / "evaluation_results.csv").set_index("dataset")
    report = {row["dataset"]: row for row in json.loads((tmp_path / "results" / "evaluation_results.json").read_text())
              ["results"]}  # fmt: skip
    # VideoRewardBench: overall (micro), each dimension and their macro, recomputed from the per-pair scores.
    vrb = results.loc["vrb"]
    assert vrb["dataset_benchmark"] == "videorewardbench" and vrb["num_pairs"] == 10
    pairs = pd.read_csv(report["vrb"]["pairs_file"])
    pairs["right"] = pairs["chosen_score"] > pairs["rejected_score"]
    assert vrb["accuracy"] == pytest.approx(pairs["right"].mean())
    per_dimension = pairs.groupby("category")["right"].mean()
    assert sorted(per_dimension.index) == sorted(DIMENSIONS)
    for name in DIMENSIONS:
        assert vrb[f"accuracy/{name}"] == pytest.approx(per_dimension[name])
    assert vrb["macro_accuracy"] == pytest.approx(per_dimension.mean())
    # MM-RLHF with video rows: Acc and Acc+ over the ids' groups, overall and per category.
    mm = results.loc["mmrlhf"]
    assert mm["dataset_benchmark"] == "mm_rlhf" and mm["num_pairs"] == 30 and mm["num_groups"] == 15
    pairs = pd.read_csv(report["mmrlhf"]["pairs_file"])
    pairs["right"], pairs["group"] = pairs["chosen_score"] > pairs["rejected_score"], pairs["id"].str.split("#").str[0]
    assert mm["accuracy"] == pytest.approx(pairs["right"].mean())
    assert mm["acc_plus"] == pytest.approx(pairs.groupby("group")["right"].all().mean())
    video_pairs = pairs[pairs["category"] == "video"]
    assert len(video_pairs) == 20
    assert report["mmrlhf"]["per_category"]["video"]["acc_plus"] == pytest.approx(
        video_pairs.groupby("group")["right"].all().mean()
    )
    # The published numbers beside ours, per dimension for VideoRewardBench, Acc+ for MM-RLHF.
    logs = "".join(path.read_text() for path in (tmp_path / "logs").glob("eval_*.log"))
    assert "vrb (videorewardbench), published results (percent):" in logs
    for model, overall in (("Gemini-2.5-Pro", 63.6), ("Skywork-VL-Reward-7B", 60.5), ("IXC-2.5-Reward-7B", 53.4)):
        assert f"{model:<24} overall {overall:>5}" in logs
    assert "long-form perception 70.7 | short-form perception 55.9 | knowledge 65.5" in logs
    ours = f"long-form perception {100 * vrb['accuracy/long-form perception']:.1f} | short-form perception"
    assert ours in logs
    assert "mmrlhf (mm_rlhf), published results (percent):" in logs
    assert f"acc+ {100 * mm['acc_plus']:.1f}" in logs and "acc+  67.0" in logs
