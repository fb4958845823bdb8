"""Videos over HTTP (vlrm/use/server/): the real app under uvicorn on 127.0.0.1 (``tests.test_server.serving``),
scores equal to ``RewardScorer.score`` on the same files, decoded off the model thread and once per request, a GRPO
group's requests meeting under one prompt node, and every video limit and kind of bad file answered with a 4xx
naming the item and the field, the limits checked from the header before a frame is decoded."""

from __future__ import annotations

import base64
import importlib.util
import threading
from pathlib import Path

import av
import numpy as np
import pytest

from tests.test_server import ROOT, _png, _send_while_held, call, serving
from tests.test_use_video import GROUP, QUESTION, SMALL, clip_frames
from vlrm.data import videos as video_module
from vlrm.data.videos import write_clip
from vlrm.use.scoring import RewardScorer
from vlrm.use.server.app import create_app
from vlrm.use.server.settings import ServerSettings

MAX_SEQ_LENGTH = 128  # a tiny clip is 12-16 visual tokens
VIDEO_LIMITS = {"max_videos": 2, "max_video_bytes": 100_000, "max_video_seconds": 5.0, "max_video_frames": 32,
                "max_video_pixels": 10_000}  # fmt: skip


def _data_url(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    """A root with good clips (an mp4, a Matroska file whose header gives no frame count, an image), clips over each
    limit, bad files of every kind; a secret clip outside the root and a symlink to it."""
    base = tmp_path_factory.mktemp("server_videos")
    root, outside = base / "root", base / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    write_clip(root / "a.mp4", clip_frames(1), 4.0)
    write_clip(root / "sub" / "b.mkv", clip_frames(2, 12, (84, 56)), 6.0)
    (root / "c.png").write_bytes(_png(np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8)))
    write_clip(outside / "secret.mp4", clip_frames(3), 4.0)
    (root / "escape.mp4").symlink_to(outside / "secret.mp4")
    # Over a limit each (VIDEO_LIMITS), every other one within them.
    noise = np.random.default_rng(1).integers(0, 255, (8, 56, 112, 3), dtype=np.uint8)
    write_clip(root / "noise.mp4", noise, 4.0)  # lossless noise: about 200 kB
    write_clip(root / "large.mp4", clip_frames(4, 8, (256, 128)), 4.0)  # 32768 pixels a frame
    write_clip(root / "slow.mp4", clip_frames(5, 6), 1.0)  # 6 seconds
    write_clip(root / "many.mp4", clip_frames(6, 40), 20.0)  # 40 frames in 2 seconds
    write_clip(root / "many.mkv", clip_frames(6, 40), 20.0)  # the same, no frame count in its header
    # Bad files.
    (root / "junk.mp4").write_bytes(b"this is not a video file " * 10)
    write_clip(root / "one_frame.mp4", clip_frames(7, 1), 4.0)
    matroska = (root / "sub" / "b.mkv").read_bytes()
    cluster = matroska.find(bytes.fromhex("1F43B675"))  # the first frames' cluster: a header and no frame
    (root / "no_frames.mkv").write_bytes(matroska[: cluster + 4])
    with av.open(str(root / "truncated.mp4"), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=4)  # its index first, so a cut file still opens
        stream.width, stream.height, stream.pix_fmt, stream.options = 112, 56, "yuv444p", {"qp": "0"}
        for frame in clip_frames(8, 8):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    whole = (root / "truncated.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(whole[: len(whole) * 2 // 3])
    with av.open(str(root / "audio.wav"), "w") as container:  # a container without a video stream
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    files = {path.name: path for path in root.rglob("*") if path.is_file()}
    return {"root": root, "secret": outside / "secret.mp4", "files": files,
            "bytes": {name: path.read_bytes() for name, path in files.items()}}  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, save_reward_checkpoint) -> Path:
    """Records its video sampling (SMALL), as a training run's checkpoint does: the server samples with it."""
    return save_reward_checkpoint(tmp_path_factory.mktemp("server_video") / "final", seed=6,
                                  vlrm_video_sampling=SMALL.identity())  # fmt: skip


@pytest.fixture(scope="module")
def reference(checkpoint) -> RewardScorer:
    return RewardScorer.from_pretrained(checkpoint, max_seq_length=MAX_SEQ_LENGTH)


class HeldScorer:
    """Stands in for the server scorer's ``score``: records each call's thread and can hold the next call until
    released (so that requests queue behind it); the collated batches of the scorer's forwards are recorded too."""

    def __init__(self, scorer: RewardScorer):
        self.scorer, self.score = scorer, scorer.score
        self.threads: list[str] = []
        self.batches: list[dict] = []
        self.active = 0
        self.hold: threading.Event | None = None
        forward = scorer._forward_outputs
        scorer._forward_outputs = lambda batch: self.batches.append(batch) or forward(batch)

    def __call__(self, rows, **kwargs):
        self.threads.append(threading.current_thread().name)
        self.active += 1
        try:
            if self.hold is not None:
                assert self.hold.wait(timeout=30), "the test never released the held forward"
            return self.score(rows, **kwargs)
        finally:
            self.active -= 1


@pytest.fixture(scope="module")
def server(checkpoint, media):
    scorer = RewardScorer.from_pretrained(checkpoint, max_seq_length=MAX_SEQ_LENGTH)
    held = HeldScorer(scorer)
    scorer.score = held
    settings = ServerSettings(image_root=str(media["root"]), max_batch_size=16, max_wait_ms=5,
                              max_body_bytes=2**20, **VIDEO_LIMITS)  # fmt: skip
    app = create_app(scorer, settings, checkpoint)
    with serving(app) as port:
        yield {"port": port, "app": app, "held": held}


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """The thread of every video decode meanwhile (``vlrm.data.videos._decode``: the frames, not the header)."""
    threads: list[str] = []
    original = video_module._decode

    def counted(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(video_module, "_decode", counted)
    return threads


def _score(port: int, *items: dict) -> tuple[int, dict]:
    return call(port, "POST", "/score", {"items": list(items)}, key=None)


# ----------------------------------------------------------------------------------------------------------------
# Scores equal RewardScorer.score; decoded off the model thread, once per request; one prompt node per group


def test_scores_equal_the_scorer(server, media, reference, decodes):
    """A group of four completions on one clip (a data: URL, a relative and an absolute path), chat messages with a
    video part (a Matroska file), a video beside an image, two videos, and no video."""
    root, files = media["root"], media["files"]
    a, b, c = str(files["a.mp4"]), str(files["b.mkv"]), str(files["c.png"])
    a_forms = [_data_url(media["bytes"]["a.mp4"]), "a.mp4", a, str(root / "sub" / ".." / "a.mp4")]
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What colour?"}]}]
    items = [
        {"prompt": QUESTION, "videos": [form], "response": text} for form, text in zip(a_forms, GROUP, strict=True)
    ]
    items += [
        {"prompt": messages, "videos": ["sub/b.mkv"], "response": "Grey."},
        {"prompt": "Is <image> in <video>?", "images": ["c.png"], "videos": [a_forms[0]], "response": "No."},
        {"prompt": "Compare <video> with <video>.", "videos": ["a.mp4", "sub/b.mkv"], "response": "Same."},
        {"prompt": "Say something.", "response": "Something."},
    ]
    rows = [{"prompt": QUESTION, "videos": [a], "response": text} for text in GROUP]
    rows += [
        {"prompt": messages, "videos": [b], "response": "Grey."},
        {"prompt": "Is <image> in <video>?", "images": [c], "videos": [a], "response": "No."},
        {"prompt": "Compare <video> with <video>.", "videos": [a, b], "response": "Same."},
        {"prompt": "Say something.", "response": "Something."},
    ]
    expected = reference.score(rows)
    assert len(set(expected.tolist())) == len(rows)  # distinct rewards: a mix-up of rows would show
    decodes.clear()
    held = server["held"]
    held.batches.clear()
    status, reply = _score(server["port"], *items)
    assert status == 200, reply
    np.testing.assert_allclose(reply["rewards"], expected, rtol=1e-5, atol=1e-6)
    assert len(decodes) == 2  # a.mp4 (however it was sent) and b.mkv, once each for the request
    assert not any(name.startswith("vlrm-model") for name in decodes)  # in Starlette's thread pool
    assert held.threads[-1].startswith("vlrm-model")
    (batch,) = held.batches
    assert len(batch["packed_layout"].prompt_spans) == 5  # the group, then one node per other prompt
    assert batch["video_grid_thw"].shape[0] == 2  # each clip through the vision tower once


def test_a_groups_requests_meet_under_one_prompt_node(server, media, reference):
    """Two requests of two completions each, the clip sent as a data: URL in one and as a path in the other, queued
    behind a forward: scored in one forward under one prompt node, the video through the vision tower once."""
    held = server["held"]
    forms = [_data_url(media["bytes"]["a.mp4"]), "a.mp4"]
    bodies = [
        {"items": [{"prompt": QUESTION, "videos": [form], "response": text} for text in texts]}
        for form, texts in zip(forms, (GROUP[:2], GROUP[2:]), strict=True)
    ]
    plug = {"items": [{"prompt": "Say something.", "response": "Plug."}]}
    replies = _send_while_held(server, bodies, queued_items=4, recorder=held, plug=plug, key=None)
    assert [len(batch["reward_index"]) for batch in held.batches] == [1, 4]
    assert len(held.batches[1]["packed_layout"].prompt_spans) == 1 and held.batches[1]["video_grid_thw"].shape[0] == 1
    expected = reference.score(
        [{"prompt": QUESTION, "videos": [media["files"]["a.mp4"]], "response": t} for t in GROUP]
    )
    for (status, reply), part in zip(replies, (expected[:2], expected[2:]), strict=True):
        assert status == 200, reply
        np.testing.assert_allclose(reply["rewards"], part, rtol=1e-5, atol=1e-6)


def test_info_lists_the_video_limits_and_sampling(server):
    status, info = call(server["port"], "GET", "/info", key=None)
    assert status == 200
    assert info["video"] == {"limits": VIDEO_LIMITS, "sampling": SMALL.identity()}
    assert not any("video" in name for name in info["limits"])  # "limits" keeps its shape


def test_video_tokens_count_against_max_seq_length(server, media, reference):
    """A response that fits with the question alone, but not with the video's visual tokens: a 400 naming it."""
    encoder = reference.encoder
    video_tokens = encoder.video_expansion(encoder.sample_video(media["files"]["a.mp4"]))
    assert video_tokens >= 15
    prompt_tokens = encoder.prompt_length([{"role": "user", "content": [{"type": "text", "text": QUESTION}]}], [])
    words = next(n for n in range(200) if prompt_tokens + len(encoder.encode_response("go " * n)) > MAX_SEQ_LENGTH - 8)
    response = "go " * words  # the question and this response fit; with the video's tokens they do not
    assert _score(server["port"], {"prompt": QUESTION, "response": response})[0] == 200
    status, reply = _score(server["port"], {"prompt": QUESTION, "videos": ["a.mp4"], "response": response})
    assert (status, reply["item"], reply["field"]) == (400, 0, "response"), reply
    assert "visual tokens" in reply["error"] and f"over max_seq_length={MAX_SEQ_LENGTH}" in reply["error"]


# ----------------------------------------------------------------------------------------------------------------
# Bad videos: each a 4xx naming the item and the field; the limits before any frame is decoded


def _item(**fields) -> dict:
    return {"prompt": QUESTION, "videos": ["a.mp4"], "response": GROUP[0]} | fields


def _body(*items) -> dict:
    return {"items": [_item(), *items]}  # the bad item is item 1: a good one before it


# (id, item fields (a function of the media fixture), field, words in the error, refused before any decode)
BAD_VIDEOS = [
    ("videos_not_a_list", lambda m: _item(videos="a.mp4"), "videos", "expected a list of videos, got str", True),
    ("video_not_a_string", lambda m: _item(videos=[5]), "videos[0]", "expected a string (a data: URL", True),
    ("video_places_mismatch", lambda m: _item(prompt="<video> or <video>?"), "videos",
     "1 videos but 2 video places in the prompt", True),
    ("video_part_without_video", lambda m: _item(prompt=[{"role": "user", "content": [{"type": "video"}]}],
     videos=[]), "videos", "0 videos but 1 video places", True),
    ("inline_video_part", lambda m: _item(prompt=[{"role": "user", "content": [{"type": "video", "video": "a.mp4"}]}]),
     "prompt", "expected {type: text", True),
    ("too_many_videos", lambda m: _item(prompt="Q?", videos=["a.mp4"] * 3), "videos", "3 videos, over --max_videos=2",
     True),
    ("data_url_not_base64", lambda m: _item(videos=["data:video/mp4,rawbytes"]), "videos[0]",
     "only base64 data: URLs are accepted (data:video/mp4;base64,...)", True),
    ("data_url_bad_base64", lambda m: _item(videos=["data:video/mp4;base64,!!notb64"]), "videos[0]",
     "invalid base64", True),
    ("http_url", lambda m: _item(videos=["http://127.0.0.1:9/a.mp4"]), "videos[0]", "fetches nothing", True),
    ("file_url", lambda m: _item(videos=["file:///etc/passwd"]), "videos[0]", "fetches nothing", True),
    ("path_dotdot_escape", lambda m: _item(videos=["../outside/secret.mp4"]), "videos[0]", "outside --image_root",
     True),
    ("path_absolute_outside", lambda m: _item(videos=[str(m["secret"])]), "videos[0]", "outside --image_root", True),
    ("path_symlink_outside", lambda m: _item(videos=["escape.mp4"]), "videos[0]", "outside --image_root", True),
    ("path_missing", lambda m: _item(videos=["missing.mp4"]), "videos[0]", "video file not found under --image_root",
     True),
    ("path_is_a_directory", lambda m: _item(videos=["sub"]), "videos[0]", "not found", True),
    ("path_nul_byte", lambda m: _item(videos=["a.mp4\x00.mp4"]), "videos[0]", "bad video path", True),
    ("file_over_max_video_bytes", lambda m: _item(videos=["noise.mp4"]), "videos[0]",
     "video file 'noise.mp4' is over 100000 bytes (--max_video_bytes=100000)", True),
    ("data_url_over_max_video_bytes", lambda m: _item(videos=[_data_url(m["bytes"]["noise.mp4"])]), "videos[0]",
     "bytes, over --max_video_bytes=100000", True),
    ("over_max_video_pixels", lambda m: _item(videos=["large.mp4"]), "videos[0]",
     "256x128 = 32768 pixels, over --max_video_pixels=10000 (read from its header, not decoded)", True),
    ("over_max_video_seconds", lambda m: _item(videos=["slow.mp4"]), "videos[0]",
     "6.00 seconds long, over --max_video_seconds=5.0 (read from its header, not decoded)", True),
    ("over_max_video_frames", lambda m: _item(videos=["many.mp4"]), "videos[0]",
     "40 frames, over --max_video_frames=32 (read from its header, not decoded)", True),
    ("over_max_video_frames_no_count_in_header", lambda m: _item(videos=[_data_url(m["bytes"]["many.mkv"])]),
     "videos[0]", "over --max_video_frames=32 (its packets counted, none decoded)", True),
    ("not_a_video", lambda m: _item(videos=["junk.mp4"]), "videos[0]", "cannot open video", True),
    ("not_a_video_data_url", lambda m: _item(videos=[_data_url(m["bytes"]["junk.mp4"])]), "videos[0]",
     "cannot open video", True),
    ("no_video_stream", lambda m: _item(videos=["audio.wav"]), "videos[0]", "no video stream", True),
    ("no_frames", lambda m: _item(videos=["no_frames.mkv"]), "videos[0]", "video has no frames", True),
    ("one_frame", lambda m: _item(videos=["one_frame.mp4"]), "videos[0]", "has 1 frame(s); at least 2", False),
    ("an_image_as_a_video", lambda m: _item(videos=[_data_url(m["bytes"]["c.png"], "video/mp4")]), "videos[0]",
     "has 1 frame(s)", False),
    ("truncated", lambda m: _item(videos=["truncated.mp4"]), "videos[0]", "cannot decode video", False),
]  # fmt: skip


@pytest.mark.parametrize(
    "make_item, field, words, before_decoding", [case[1:] for case in BAD_VIDEOS], ids=[case[0] for case in BAD_VIDEOS]
)
def test_bad_video_gets_a_4xx_naming_item_and_field(server, media, decodes, make_item, field, words, before_decoding):
    status, reply = call(server["port"], "POST", "/score", _body(make_item(media)), key=None)
    assert (status, reply["item"], reply["field"]) == (400, 1, field), reply
    assert words in reply["error"], reply
    assert set(reply) == {"error", "item", "field"}
    # Item 0's clip is decoded; the bad one's frames only when its header passed every limit.
    assert len(decodes) == (1 if before_decoding else 2), decodes
    assert call(server["port"], "GET", "/health", key=None)[0] == 200


def test_without_image_root_video_paths_are_refused(checkpoint, media, reference):
    scorer = RewardScorer.from_pretrained(checkpoint, max_seq_length=MAX_SEQ_LENGTH)
    with serving(create_app(scorer, ServerSettings(max_wait_ms=1), checkpoint)) as port:
        for value in ("a.mp4", str(media["files"]["a.mp4"])):
            status, reply = _score(port, _item(videos=[value]))
            assert (status, reply["item"], reply["field"]) == (400, 0, "videos[0]"), reply
            assert "file paths are refused (the server was started without --image_root)" in reply["error"]
        status, reply = _score(port, _item(videos=[_data_url(media["bytes"]["a.mp4"])]))
        assert status == 200, reply
        expected = reference.score([{"prompt": QUESTION, "videos": [media["files"]["a.mp4"]], "response": GROUP[0]}])
        np.testing.assert_allclose(reply["rewards"], expected, rtol=1e-5, atol=1e-6)


def test_serve_rm_has_a_flag_per_video_limit():
    spec = importlib.util.spec_from_file_location("serve_rm", ROOT / "serve_rm.py")
    serve_rm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_rm)
    defaults = serve_rm.parse_args(["checkpoint"])
    settings = ServerSettings()
    assert {name: getattr(defaults, name) for name in VIDEO_LIMITS} == {
        name: getattr(settings, name) for name in VIDEO_LIMITS
    }
    flags = [f"--{name}={value}" for name, value in VIDEO_LIMITS.items()]
    assert {name: getattr(serve_rm.parse_args(["checkpoint", *flags]), name) for name in VIDEO_LIMITS} == VIDEO_LIMITS
    for name in ("max_video_bytes", "max_video_frames", "max_video_pixels", "max_video_seconds"):
        with pytest.raises(ValueError, match=name):
            ServerSettings(**{name: 0})
