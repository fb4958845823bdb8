"""Videos in use: ``RewardScorer`` (packed = padded, one prompt node and one decode per GRPO group of a video prompt,
video tokens in the length guard, bad videos named by row and field), ``score_pairs`` with videos, and
``VLRewardFunction``'s ``video`` / ``videos`` columns and video parts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlrm.data import videos as video_module
from vlrm.data.rows import user_prompt
from vlrm.data.videos import VideoSettings, write_clip
from vlrm.errors import BadSampleError
from vlrm.use.rewards import VLRewardFunction
from vlrm.use.scoring import RewardScorer

# Tiny clips for the tiny model: 8 frames of 56 x 112 sampled at 2 fps are 4 frames, 16 visual tokens.
SMALL = VideoSettings(fps=2.0, min_pixels=28 * 28, max_pixels=56 * 112)
QUESTION = "Which way does the square move?"
GROUP = ["To the right.", "To the left.", "It does not move.", "Up and down, then right."]


def clip_frames(seed: int, count: int = 8, size: tuple[int, int] = (112, 56)) -> np.ndarray:
    """``count`` frames [n, H, W, 3] of a square moving right on a seeded background colour (a few kB as mp4)."""
    rng = np.random.default_rng(seed)
    width, height = size
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    frames[:] = rng.integers(0, 255, size=3)
    square = rng.integers(0, 255, size=3)
    for index in range(count):
        x = index * (width - 16) // max(count - 1, 1)
        frames[index, 10:26, x : x + 16] = square
    return frames


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    """Three mp4 clips: 8 frames at 4 fps, 8 at 4 fps (other colours), 12 at 6 fps of another size."""
    root = tmp_path_factory.mktemp("use_clips")
    return [
        write_clip(root / "a.mp4", clip_frames(1), 4.0),
        write_clip(root / "b.mp4", clip_frames(2), 4.0),
        write_clip(root / "c.mp4", clip_frames(3, 12, (84, 56)), 6.0),
    ]


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(7).integers(0, 255, (56, 56, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, save_reward_checkpoint) -> Path:
    """A checkpoint that records its video sampling (``vlrm_video_sampling``), as a training run saves it."""
    path = tmp_path_factory.mktemp("use_video") / "final"
    return save_reward_checkpoint(path, seed=4, vlrm_video_sampling=SMALL.identity(), reward_mean=0.5, reward_std=2.0)


@pytest.fixture(scope="module")
def scorers(checkpoint) -> dict[str, RewardScorer]:
    return {
        "packed": RewardScorer.from_pretrained(checkpoint, device="cpu"),
        "padded": RewardScorer.from_pretrained(checkpoint, device="cpu", packing=False),
    }


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """Every video file decoded meanwhile (``vlrm.data.videos._decode``), by its path or ``<bytes>``."""
    seen: list[str] = []
    original = video_module._decode

    def counted(value, *args, **kwargs):
        seen.append(str(value) if isinstance(value, (str, Path)) else "<bytes>")
        return original(value, *args, **kwargs)

    monkeypatch.setattr(video_module, "_decode", counted)
    return seen


def _forwards(monkeypatch, scorer: RewardScorer) -> list[dict]:
    """The collated batches of the scorer's forwards from now on."""
    batches: list[dict] = []
    original = scorer._forward_outputs
    monkeypatch.setattr(scorer, "_forward_outputs", lambda batch: batches.append(batch) or original(batch))
    return batches


def _video_prompt(*parts: str, text: str = QUESTION) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": part, "text": None} for part in parts] + [{"type": "text", "text": text}],
        }
    ]


# ----------------------------------------------------------------------------------------------------------------
# RewardScorer.score


def test_checkpoint_records_the_video_sampling(scorers):
    assert scorers["packed"].encoder.video_settings == SMALL
    override = RewardScorer(scorers["packed"].model, scorers["packed"].processor, video_settings={"fps": 1.0})
    assert override.encoder.video_settings == VideoSettings(**{**SMALL.identity(), "fps": 1.0})


def test_score_packed_equals_padded_with_videos(scorers, clips, image):
    """Every way a video comes (path, bytes, {"bytes", "path"}, frame list, a sampled video) and every way it is placed
    (before a question string, <video> markers, {"type": "video"} parts): packed = padded to 1e-5; the video is read
    (another clip, another reward)."""
    a, b, c = clips
    frames = [Image.fromarray(frame) for frame in clip_frames(5, 6)]
    sampled = scorers["packed"].encoder.sample_video(c)
    rows = [
        {"prompt": QUESTION, "videos": [str(a)], "response": GROUP[0]},
        {"prompt": QUESTION, "videos": [a.read_bytes()], "response": GROUP[1]},
        {"prompt": QUESTION, "videos": [{"bytes": None, "path": str(b)}], "response": GROUP[0]},
        {"prompt": "In <video>, where does the square go?", "videos": [frames], "response": GROUP[2]},
        {"prompt": _video_prompt("video"), "videos": [sampled], "response": GROUP[3]},
        {"prompt": "Say something.", "response": "Something."},
        {"prompt": "Compare <video> and <video>.", "videos": [b, str(c)], "response": "They differ."},
    ]
    packed = scorers["packed"].score(rows, batch_size=4)
    padded = scorers["padded"].score(rows, batch_size=4)
    assert np.isfinite(packed).all() and len(set(packed.tolist())) == len(rows)  # a mix-up of rows would show
    np.testing.assert_allclose(packed, padded, rtol=1e-5, atol=1e-5)
    # the same question and response on another clip: another reward
    other_clip = scorers["packed"].score([{"prompt": QUESTION, "videos": [b], "response": GROUP[0]}])
    assert abs(other_clip[0] - packed[0]) > 1e-4
    np.testing.assert_allclose(other_clip[0], packed[2], rtol=1e-5, atol=1e-6)  # path or {"path"}: one video


def test_grpo_group_of_a_video_prompt_is_one_prompt_node(scorers, clips, decodes, monkeypatch):
    """4 completions of one video prompt: the clip decoded once, one prompt node, the video through the vision
    tower once; the same clip sent as bytes too still meets the group under its node (the sampled video's key is
    its content)."""
    scorer = scorers["packed"]
    rows = [{"prompt": QUESTION, "videos": [str(clips[0])], "response": text} for text in GROUP]
    batches = _forwards(monkeypatch, scorer)
    rewards = scorer.score(rows, batch_size=8)
    assert decodes == [str(clips[0])]
    (batch,) = batches
    assert len(batch["packed_layout"].prompt_spans) == 1
    assert batch["video_grid_thw"].tolist() == [[2, 4, 8]]  # 4 frames of 56 x 112: one video, once
    np.testing.assert_allclose(rewards, scorers["padded"].score(rows, batch_size=8), rtol=1e-5, atol=1e-5)

    decodes.clear()
    as_bytes = [{**row, "videos": [clips[0].read_bytes()]} for row in rows[:2]]
    mixed = scorer.score(rows[2:] + as_bytes, batch_size=8)
    assert sorted(decodes) == sorted([str(clips[0]), "<bytes>"])  # once per form it came in
    assert len(batches[-1]["packed_layout"].prompt_spans) == 1 and batches[-1]["video_grid_thw"].shape[0] == 1
    np.testing.assert_allclose(mixed, np.concatenate([rewards[2:], rewards[:2]]), rtol=1e-5, atol=1e-6)


def test_a_video_beside_an_image(scorers, clips, image, monkeypatch):
    """A video and an image in one prompt, in either order: packed = padded; both are read; rows of one prompt share
    one node, and the image and the video each go through the vision tower once."""
    a, b, _ = clips
    rows = [
        {"prompt": "Is <image> a frame of <video>?", "images": [image], "videos": [a], "response": text}
        for text in ("Yes.", "No.")
    ]
    rows.append({"prompt": _video_prompt("image", "video"), "images": [image], "videos": [a], "response": "No."})
    rows.append({"prompt": _video_prompt("video", "image"), "images": [image], "videos": [a], "response": "No."})
    rows.append({"prompt": QUESTION, "images": [image], "videos": [a], "response": "Yes."})  # video, then image
    batches = _forwards(monkeypatch, scorers["packed"])
    packed = scorers["packed"].score(rows, batch_size=8)
    np.testing.assert_allclose(packed, scorers["padded"].score(rows, batch_size=8), rtol=1e-5, atol=1e-5)
    # three prompts: "Is <image> a frame of <video>?", image-video parts, video-image parts (the question string's)
    assert len(batches[-1]["packed_layout"].prompt_spans) == 3
    assert batches[-1]["image_grid_thw"].shape[0] == 1 and batches[-1]["video_grid_thw"].shape[0] == 1
    assert len(set(packed.tolist())) == len(rows)
    other_image = Image.fromarray(np.zeros((56, 56, 3), dtype=np.uint8))
    changed = scorers["packed"].score([{**rows[0], "images": [other_image]}, {**rows[0], "videos": [b]}], batch_size=8)
    assert abs(changed[0] - packed[0]) > 1e-4 and abs(changed[1] - packed[0]) > 1e-4


def test_length_guard_counts_video_tokens(scorers, clips, monkeypatch):
    """A row whose text fits max_seq_length but not with its video's visual tokens is not scored (NaN)."""
    scorer = scorers["packed"]
    encoder = scorer.encoder
    video = encoder.sample_video(clips[0])
    response_tokens = len(encoder.encode_response(GROUP[0]))
    with_video = encoder.prompt_length(user_prompt(QUESTION, 0, 1), [], [video]) + response_tokens
    text_only = encoder.prompt_length(user_prompt(QUESTION, 0), []) + response_tokens
    assert with_video >= text_only + 15  # 16 video tokens for one placeholder
    rows = [
        {"prompt": QUESTION, "videos": [clips[0]], "response": GROUP[0]},
        {"prompt": QUESTION, "response": GROUP[0]},
    ]
    monkeypatch.setattr(scorer, "max_seq_length", with_video - 1)
    rewards = scorer.score(rows)
    assert np.isnan(rewards[0]) and np.isfinite(rewards[1])
    monkeypatch.setattr(scorer, "max_seq_length", with_video)
    assert np.isfinite(scorer.score(rows)).all()


def test_bad_videos_name_the_row_and_the_field(scorers, clips, tmp_path):
    scorer = scorers["packed"]
    good = {"prompt": QUESTION, "videos": [clips[0]], "response": GROUP[0]}
    with pytest.raises(BadSampleError, match=r"row 1: field `videos\[0\]`: video file not found"):
        scorer.score([good, {**good, "videos": [tmp_path / "missing.mp4"]}])
    (tmp_path / "junk.mp4").write_bytes(b"not a video" * 20)
    with pytest.raises(BadSampleError, match=r"row 0: field `videos\[1\]`: cannot open video"):
        scorer.score([{**good, "prompt": "<video> or <video>?", "videos": [clips[0], tmp_path / "junk.mp4"]}])
    with pytest.raises(BadSampleError, match=r"row 0: field `videos`: expected a list of videos.*got PosixPath"):
        scorer.score([{**good, "videos": clips[0]}])
    with pytest.raises(BadSampleError, match=r"row 0: field `videos`: 1 videos but 0 video places in the prompt"):
        scorer.score([{**good, "prompt": "Only <image> here.", "images": [Image.new("RGB", (56, 56))]}])


# ----------------------------------------------------------------------------------------------------------------
# RewardScorer.score_pairs


def test_score_pairs_with_videos_packed_equals_padded_and_score(scorers, clips, decodes):
    """Canonical rows with video paths (and an irrelevant prompt with another video): packed = padded, each
    distinct video of a batch decoded once, and a pair's rewards are ``score``'s rewards of its responses."""
    a, b, c = clips
    rows = [
        {"prompt": _video_prompt("video"), "images": [], "videos": [str(a)], "chosen": GROUP[0], "rejected": GROUP[1]},
        {"prompt": _video_prompt("video", text="What colour?"), "images": [], "videos": [str(a)], "chosen": "Red.",
         "rejected": "Blue."},
        {"prompt": _video_prompt("video"), "images": [], "videos": [str(c)], "chosen": GROUP[2], "rejected": GROUP[3]},
    ]  # fmt: skip
    anything = {"prompt": _video_prompt("video", text="Anything?"), "images": [], "videos": [str(b)]}
    for row, other in zip(rows, [anything, rows[2], anything], strict=True):
        row["irrelevant"] = [{name: other[name] for name in ("prompt", "images", "videos")}]
    packed = scorers["packed"].score_pairs(rows, batch_size=3, progress=False)
    assert sorted(decodes) == sorted(map(str, clips))  # a twice in the batch, decoded once
    padded = scorers["padded"].score_pairs(rows, batch_size=3, progress=False)
    for name in ("chosen", "rejected", "irrelevant"):
        np.testing.assert_allclose(getattr(packed, name), getattr(padded, name), rtol=1e-5, atol=1e-5)
    singles = [
        {"prompt": row["prompt"], "videos": row["videos"], "response": row[side]}
        for side in ("chosen", "rejected")
        for row in rows
    ]
    expected = scorers["packed"].score(singles).reshape(2, len(rows))
    np.testing.assert_allclose(packed.chosen, expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed.rejected, expected[1], rtol=1e-5, atol=1e-5)
    irrelevant = [
        {"prompt": row["irrelevant"][0]["prompt"], "videos": row["irrelevant"][0]["videos"], "response": row["chosen"]}
        for row in rows
    ]
    np.testing.assert_allclose(packed.irrelevant[:, 0], scorers["packed"].score(irrelevant), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# VLRewardFunction


def test_reward_function_video_column_equals_the_scorer(scorers, clips):
    """TRL's arguments with a ``video`` column (one per row), a ``videos`` column (a list per row), or the videos in
    the prompt's video parts: the scorer's rewards of the same (video, question, completion)."""
    a, b, _ = clips
    scorer = scorers["packed"]
    reward = VLRewardFunction(scorer, batch_size=8)
    videos = [a, a, b, b]
    completions = [[{"role": "assistant", "content": text}] for text in GROUP]
    expected = scorer.score(
        [{"prompt": QUESTION, "videos": [video], "response": text} for video, text in zip(videos, GROUP, strict=True)]
    )
    assert abs(expected[0] - expected[2]) > 1e-4  # the clip is read: a mix-up of videos would show
    conversational = [[{"role": "user", "content": QUESTION}]] * 4
    from_column = reward(conversational, completions, video=[str(video) for video in videos], trainer_state=None)
    np.testing.assert_allclose(from_column, expected, rtol=1e-5, atol=1e-6)
    from_list_column = reward([QUESTION] * 4, GROUP, videos=[[video] for video in videos])
    np.testing.assert_allclose(from_list_column, expected, rtol=1e-5, atol=1e-6)
    with_parts = [
        [{"role": "user", "content": [{"type": "video", "video": str(video)}, {"type": "text", "text": QUESTION}]}]
        for video in videos
    ]
    np.testing.assert_allclose(reward(with_parts, completions), expected, rtol=1e-5, atol=1e-6)
    normalised = VLRewardFunction(scorer, normalize=True)(conversational, completions, video=videos)
    np.testing.assert_allclose(normalised, (expected - 0.5) / 2.0, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# RewardScorer.score_steps


def test_score_steps_decodes_a_shared_video_once_and_names_a_bad_one(tmp_path, save_reward_checkpoint, clips, decodes):
    """Best-of-4 solutions of one video question: the clip decoded once for the call (not once per solution), the
    four under one prompt node, their step scores those of each solution scored alone (1e-5); a bad video names the
    row and the field."""
    checkpoint = save_reward_checkpoint(
        tmp_path / "process", seed=4, vlrm_video_sampling=SMALL.identity(), vlrm_reward_type="process",
        vlrm_step_separator="\n\n", vlrm_step_aggregation="mean",
    )  # fmt: skip
    scorer = RewardScorer.from_pretrained(checkpoint, device="cpu")
    steps = [["It starts at the left.", answer] for answer in GROUP]
    rows = [{"prompt": QUESTION, "videos": [clips[0]], "steps": solution} for solution in steps]
    together = scorer.score_steps(rows, batch_size=4)
    assert decodes == [str(clips[0])]
    decodes.clear()
    for row, values in zip(rows, together.steps, strict=True):
        np.testing.assert_allclose(scorer.score_steps([row]).steps[0], values, rtol=0, atol=1e-5)
    assert len(decodes) == len(rows)  # one call each: decoded once per call
    assert len({float(score) for score in together.scores}) == len(rows)
    with pytest.raises(BadSampleError, match=r"row 2: field `videos\[0\]`: video file not found"):
        scorer.score_steps(rows[:2] + [{**rows[2], "videos": [tmp_path / "missing.mp4"]}])
