"""Video in the prompt: frame sampling as qwen-vl-utils samples, decoded once into the prepared set, packed = padded
with videos (and a video beside an image), bad videos named by file, row and field."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, set_seed

from tests.test_families import _sequential_delta_rule
from tests.test_packing import _assert_same_rewards_and_grads, _text
from vlrm.data import videos as video_module
from vlrm.data.prepare import load_preference_dataset
from vlrm.data.videos import VideoSettings, read_header, sample_video, write_clip
from vlrm.errors import BadSampleError, RowProblem
from vlrm.layout.attention import enable_packed_attention
from vlrm.layout.encoder import PreferenceEncoder
from vlrm.model.families import family_of
from vlrm.model.reward_model import VLRewardModel

# Small clips for the tiny models: 4-8 frames of 56 x 112 at most, a few merged patches each.
SMALL = VideoSettings(fps=2.0, min_pixels=28 * 28, max_pixels=56 * 112)


def _frames(seed: int, count: int, size=(112, 56)) -> np.ndarray:
    """``count`` frames of a square moving right on a seeded background colour."""
    rng = np.random.default_rng(seed)
    width, height = size
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    frames[:] = rng.integers(0, 255, size=3)
    for index in range(count):
        x = index * (width - 16) // max(count - 1, 1)
        frames[index, 10:26, x : x + 16] = rng.integers(0, 255, size=3)
    return frames


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Three mp4 clips: 16 frames at 4 fps, 12 at 6 fps (another size), 9 at 3 fps."""
    root = tmp_path_factory.mktemp("clips")
    return [
        write_clip(root / "a.mp4", _frames(1, 16), 4.0),
        write_clip(root / "b.mp4", _frames(2, 12, (84, 56)), 6.0),
        write_clip(root / "c.mp4", _frames(3, 9), 3.0),
    ]


def _video_prompt(question: str, media: tuple[str, ...]) -> list[dict]:
    return [{"role": "user", "content": [{"type": kind, "text": None} for kind in media] + [
        {"type": "text", "text": question}]}]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def _reference_fetch_video(path, settings: VideoSettings, factor: int, monkeypatch):
    """qwen-vl-utils' own ``fetch_video`` (its torchvision path), reading the file with PyAV: torchvision 0.29 has
    no ``read_video``, so it is given one that decodes every frame, as the old one did."""
    import av
    from qwen_vl_utils import vision_process

    def read_video(video_path, start_pts=0.0, end_pts=None, pts_unit="sec", output_format="TCHW"):
        with av.open(video_path) as container:
            stream = container.streams.video[0]
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            fps = float(stream.average_rate)
        return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2), None, {"video_fps": fps}

    monkeypatch.setattr(vision_process.io, "read_video", read_video, raising=False)
    monkeypatch.setattr(vision_process, "get_video_reader_backend", lambda: "torchvision")
    min_pixels, max_pixels, total = settings.budget(factor)
    element = {"video": str(path), "fps": settings.fps, "min_frames": settings.min_frames,
               "max_frames": settings.max_frames, "min_pixels": min_pixels, "max_pixels": max_pixels,
               "total_pixels": total}  # fmt: skip
    (video, metadata), _ = vision_process.fetch_video(
        element, image_patch_size=factor // 2, return_video_sample_fps=True, return_video_metadata=True
    )
    return video, metadata


@pytest.mark.parametrize("settings", [SMALL, VideoSettings(fps=1.0, max_frames=4, min_pixels=56 * 56)])
@pytest.mark.parametrize("factor", [28, 32])
def test_frame_sampling_equals_qwen_vl_utils(clips, settings, factor, monkeypatch):
    """The frames qwen-vl-utils' fetch_video draws and resizes, to the 8-bit rounding vlrm stores them with."""
    for clip in clips:
        reference, metadata = _reference_fetch_video(clip, settings, factor, monkeypatch)
        ours = sample_video(clip, settings, factor)
        assert ours["frames_indices"] == [int(index) for index in metadata["frames_indices"]]
        assert ours["fps"] == pytest.approx(metadata["fps"])
        assert ours["total_num_frames"] == metadata["total_num_frames"]
        frames = torch.from_numpy(np.stack([np.asarray(frame) for frame in ours["frames"]])).permute(0, 3, 1, 2)
        assert frames.shape == reference.shape
        assert (frames.float() - reference.clamp(0, 255)).abs().max() <= 0.5 + 1e-4


def test_frame_lists_and_headers(clips):
    header = read_header(clips[0])
    assert (header.num_frames, header.fps, header.width, header.height) == (16, 4.0, 112, 56)
    assert header.duration == pytest.approx(4.0)
    frames = [Image.fromarray(frame) for frame in _frames(4, 5)]
    sampled = sample_video(frames, SMALL, 28)
    assert sampled["frames_indices"] == [0, 1, 2, 3, 4, 5]  # padded to an even count with the last frame
    assert np.array_equal(np.asarray(sampled["frames"][5]), np.asarray(sampled["frames"][4]))
    assert sample_video(sampled) is sampled


def test_processor_receives_the_frames_and_their_timestamps(clips, family_dirs):
    """Qwen2.5-VL: seconds per temporal patch from the sampled fps; Qwen3-VL: the processor's own timestamps."""
    encoder = PreferenceEncoder(AutoProcessor.from_pretrained(family_dirs("qwen2_5_vl")), SMALL)
    video = encoder.sample_video(clips[0])  # 16 frames at 4 fps, sampled at 2 fps: 8 frames
    encoded = encoder.encode_prompt(_video_prompt("Which way?", ("video",)), [], [video])
    assert encoded.video_grid_thw.tolist() == [[4, 4, 8]]
    indices = video["frames_indices"]
    assert encoded.second_per_grid_ts.tolist() == pytest.approx([2 / (len(indices) / 16 * 4.0)])
    assert encoder.prompt_length(_video_prompt("Which way?", ("video",)), [], [video]) == len(encoded.input_ids)

    processor = AutoProcessor.from_pretrained(family_dirs("qwen3_vl"))
    encoder = PreferenceEncoder(processor, SMALL)
    video = encoder.sample_video(clips[0])
    encoded = encoder.encode_prompt(_video_prompt("Which way?", ("video",)), [], [video])
    text = processor.tokenizer.decode(encoded.input_ids)
    timestamps = [(indices[i] + indices[i + 1]) / 2 / 4.0 for i in range(0, len(indices), 2)]
    for seconds in timestamps:
        assert f"<{seconds:.1f} seconds>" in text
    assert encoder.prompt_length(_video_prompt("Which way?", ("video",)), [], [video]) == len(encoded.input_ids)


# ----------------------------------------------------------------------------------------------------------------
# Packed = padded


def _video_rows(clips, encoder) -> list[dict]:
    """A video-only prompt, a video beside an image, and a second question on the first clip (the same video under
    two prompts: one vision forward in the packed layout); a pair of the first row's prompt as the irrelevant
    branch of another row."""
    first, second, third = (encoder.sample_video(clip) for clip in clips)
    image = Image.fromarray(np.random.default_rng(5).integers(0, 255, (56, 56, 3), dtype=np.uint8))
    rows = [
        {"prompt": _video_prompt(_text(1, 5), ("video",)), "images": [], "videos": [first]},
        {"prompt": _video_prompt(_text(2, 4), ("image", "video")), "images": [image], "videos": [second]},
        {"prompt": _video_prompt(_text(3, 6), ("video",)), "images": [], "videos": [first]},
        {"prompt": _video_prompt(_text(4, 3), ("video", "image")), "images": [image.copy()], "videos": [third]},
    ]
    for seed, row in enumerate(rows):
        row["chosen"], row["rejected"] = _text(10 + seed, 3 + seed), _text(20 + seed, 6 - seed)
    rows[1]["irrelevant"] = [{"prompt": rows[0]["prompt"], "images": [], "videos": [first]}]
    rows[0]["irrelevant"] = [{"prompt": rows[3]["prompt"], "images": rows[3]["images"], "videos": [third]}]
    rows[2]["irrelevant"] = [{"prompt": rows[1]["prompt"], "images": rows[1]["images"], "videos": [second]}]
    rows[3]["irrelevant"] = [{"prompt": rows[2]["prompt"], "images": [], "videos": [first]}]
    return rows


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_packed_equals_padded_with_videos(name, clips, family_dirs, monkeypatch):
    """Rewards and every parameter's gradient (1e-5 relative), videos and images mixed; each distinct video
    through the vision tower once."""
    set_seed(0)
    model = VLRewardModel.from_pretrained(family_dirs(name), dtype=torch.float32)
    if family_of(model.config).recurrent:
        _sequential_delta_rule(monkeypatch, model)
    enable_packed_attention(model)
    model.train()
    encoder = PreferenceEncoder(AutoProcessor.from_pretrained(family_dirs(name)), SMALL)
    rows = _video_rows(clips, encoder)
    padded, packed = _assert_same_rewards_and_grads(model, encoder, rows)
    layout = packed["packed_layout"]
    assert len(packed["video_grid_thw"]) == 3 < len(layout.video_order)  # 3 distinct videos, more occurrences
    assert layout.deduplicated_videos
    assert len(padded["video_grid_thw"]) == padded["input_ids"].shape[0]  # one video per padded row
    if name == "qwen2_5_vl":
        assert packed["second_per_grid_ts"].shape == (3,)


# ----------------------------------------------------------------------------------------------------------------
# Prepared once: the cache holds the sampled frames


def _write_rows(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _video_pairs(root, clips) -> list[dict]:
    return [
        {"question": "Which way?", "videos": [str(clip.relative_to(root))], "chosen": f"Right {i}.",
         "rejected": f"Left {i}."}
        for i, clip in enumerate(clips)
    ]  # fmt: skip


@pytest.fixture
def video_set(tmp_path):
    clips = [write_clip(tmp_path / f"clip{i}.mp4", _frames(10 + i, 8 + 2 * i), 4.0) for i in range(3)]
    path = tmp_path / "videos.jsonl"
    _write_rows(path, _video_pairs(tmp_path, clips) + [
        {"question": "<video> then <image>: which?", "videos": ["clip0.mp4"], "images": [_png(tmp_path)],
         "chosen": "The first.", "rejected": "The second."}])  # fmt: skip
    return path


def _png(root) -> str:
    Image.new("RGB", (56, 56), (200, 10, 10)).save(root / "red.png")
    return "red.png"


def test_prepared_set_holds_the_sampled_frames_and_a_second_run_decodes_nothing(video_set, family_dirs, monkeypatch):
    encoder = PreferenceEncoder(AutoProcessor.from_pretrained(family_dirs("qwen2_5_vl")), SMALL)
    cache = video_set.parent / "cache"
    dataset, report = load_preference_dataset(video_set, encoder=encoder, cache_dir=str(cache))
    assert report.builds == 1 and len(dataset) == 4
    row = dataset[1]
    reference = sample_video(video_set.parent / "clip1.mp4", SMALL, 28)
    assert row["videos"][0]["frames_indices"] == reference["frames_indices"]
    assert [np.asarray(frame).tolist() for frame in row["videos"][0]["frames"]] == [
        np.asarray(frame).tolist() for frame in reference["frames"]
    ]  # stored losslessly: the frames the processor receives, with no second decode
    mixed = dataset[3]
    assert [part["type"] for part in mixed["prompt"][0]["content"]] == ["video", "text", "image", "text"]
    assert len(mixed["images"]) == 1 and len(mixed["videos"]) == 1
    lengths = encoder.branch_lengths(mixed)
    assert (
        mixed["prompt_length"]
        == lengths[0]
        == len(encoder.encode_prompt(mixed["prompt"], mixed["images"], mixed["videos"]).input_ids)
    )

    def no_decoding(*args, **kwargs):
        raise AssertionError("a video was decoded again")

    monkeypatch.setattr(video_module, "_decode", no_decoding)
    again, report = load_preference_dataset(video_set, encoder=encoder, cache_dir=str(cache))
    assert report.cache_hits == 1 and report.builds == 0
    batch = PreferenceEncoder(encoder.processor, SMALL).encode_prompt(again[0]["prompt"], [], again[0]["videos"])
    assert batch.video_grid_thw is not None  # the cached frames feed the processor, nothing decoded
    # Other sampling settings are another cache entry (the key covers them).
    other = PreferenceEncoder(encoder.processor, VideoSettings(fps=1.0, min_pixels=28 * 28, max_pixels=56 * 112))
    monkeypatch.undo()
    _, report = load_preference_dataset(video_set, encoder=other, cache_dir=str(cache))
    assert report.builds == 1


# ----------------------------------------------------------------------------------------------------------------
# Bad videos: file, row and field named, or a counted skip


def _bad_videos(root) -> dict[str, object]:
    good = write_clip(root / "good.mp4", _frames(7, 8), 4.0).read_bytes()
    (root / "truncated.mp4").write_bytes(good[: len(good) // 2])
    (root / "garbage.mp4").write_bytes(b"this is not a video" * 50)
    write_clip(root / "one_frame.mp4", _frames(8, 1), 4.0)
    return {
        "missing.mp4": "video file not found",
        "truncated.mp4": "cannot open video|truncated or undecodable|cannot decode video",
        "garbage.mp4": "cannot open video",
        "one_frame.mp4": "has 1 frame",
    }


def test_bad_videos_are_named_by_file_row_and_field(tmp_path, family_dirs):
    encoder = PreferenceEncoder(AutoProcessor.from_pretrained(family_dirs("qwen2_5_vl")), SMALL)
    for name, reason in _bad_videos(tmp_path).items():
        path = tmp_path / f"bad_{name}.jsonl"
        _write_rows(path, [{"question": "Q?", "videos": ["good.mp4"], "chosen": "A.", "rejected": "B."},
                           {"question": "Q?", "videos": [name], "chosen": "A.", "rejected": "B."}])  # fmt: skip
        with pytest.raises(BadSampleError, match=rf"bad_{name}\.jsonl: row 1: field `videos`: .*({reason})"):
            load_preference_dataset(path, encoder=encoder, cache_dir=str(tmp_path / "cache"))
    path = tmp_path / "places.jsonl"
    _write_rows(path, [{"question": "<video> and <video>?", "videos": ["good.mp4"], "chosen": "A.", "rejected": "B."}])
    with pytest.raises(BadSampleError, match=r"row 0: field `videos`: 1 videos but 2 video places"):
        load_preference_dataset(path, encoder=encoder, cache_dir=str(tmp_path / "cache"))


def test_bad_videos_are_skipped_and_counted(tmp_path, family_dirs):
    encoder = PreferenceEncoder(AutoProcessor.from_pretrained(family_dirs("qwen2_5_vl")), SMALL)
    rows = [{"question": "Q?", "videos": [name], "chosen": "A.", "rejected": "B."} for name in _bad_videos(tmp_path)]
    rows.append({"question": "Q?", "videos": ["good.mp4"], "chosen": "A.", "rejected": "B."})
    path = tmp_path / "mixed.jsonl"
    _write_rows(path, rows)
    dataset, report = load_preference_dataset(
        path, encoder=encoder, on_bad_sample="skip", cache_dir=str(tmp_path / "cache")
    )
    assert len(dataset) == 1 and report.num_skipped == 4
    assert all("`videos`" in reason for reason in report.skipped)


def test_a_directory_of_frames_is_a_video(tmp_path):
    """MM-RLHF's evaluation script stores each video as a folder of frames: read in name order at video_fps."""
    frames = _frames(6, 6)
    (tmp_path / "clip").mkdir()
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / "clip" / f"{index:03d}.png")
    sampled = sample_video("clip", SMALL, 28, base_dir=tmp_path)
    assert sampled["frames_indices"] == list(range(6)) and sampled["fps"] == SMALL.fps
    listed = sample_video([Image.fromarray(frame) for frame in frames], SMALL, 28)
    assert [np.asarray(f).tolist() for f in sampled["frames"]] == [np.asarray(f).tolist() for f in listed["frames"]]
    (tmp_path / "empty").mkdir()
    with pytest.raises(RowProblem, match="holds no frame image"):
        sample_video("empty", SMALL, 28, base_dir=tmp_path)
