"""The HTTP reward server (vlrm/use/server/, serve_rm.py): the real app under uvicorn on 127.0.0.1, scores equal to
``RewardScorer.score``, requests merged into micro-batches with one forward at a time, and every kind of bad request
answered with a 4xx JSON error naming the item and the field while the server keeps serving."""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from PIL import Image

from vlrm.data.rows import user_prompt
from vlrm.use.scoring import RewardScorer
from vlrm.use.server.app import create_app
from vlrm.use.server.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key"
MAX_SEQ_LENGTH = 128  # the tiny model's 56 x 56 images are 4 visual tokens: a prompt is about 30 tokens
REWARD_MEAN, REWARD_STD = 0.25, 2.0
LIMITS = {"max_items": 8, "max_images": 2, "max_pixels_per_image": 100_000, "max_body_bytes": 256 * 1024}


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints, images, servers


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, save_reward_checkpoint):
    """``stats``: reward_mean/reward_std in its config and a trainer_state.json (step 7); ``plain``: neither."""
    base = tmp_path_factory.mktemp("server_checkpoints")
    stats = save_reward_checkpoint(base / "stats" / "checkpoint-7", reward_mean=REWARD_MEAN, reward_std=REWARD_STD)
    (stats / "trainer_state.json").write_text(json.dumps({"global_step": 7, "max_steps": 10}))
    plain = save_reward_checkpoint(base / "plain" / "run")
    return {"stats": stats, "plain": plain}


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels and holds none (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An image root with three images (one in a subdir), a symlink out of it, and a file beside it."""
    base = tmp_path_factory.mktemp("server_images")
    root, outside = base / "root", base / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    rng = np.random.default_rng(0)
    names = {"a": root / "a.png", "b": root / "sub" / "b.png", "c": root / "c.png", "secret": outside / "secret.png"}
    for path in names.values():
        path.write_bytes(_png(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)))
    (root / "escape.png").symlink_to(names["secret"])
    return {"root": root, **names, "bytes": {key: path.read_bytes() for key, path in names.items()}}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + _b64(data)


@pytest.fixture(scope="module")
def reference(checkpoints):
    """The scorer the server's answers are checked against (its own instance, never touched by the server)."""
    return RewardScorer.from_pretrained(checkpoints["stats"], max_seq_length=MAX_SEQ_LENGTH)


class ForwardRecorder:
    """Stands in for the server scorer's ``score``: records each forward's size and how many ran at once; can hold
    the first forward until released (so that requests queue behind it), and fail batches holding ``"boom"``."""

    def __init__(self, score):
        self.score, self.sizes, self.active, self.max_active = score, [], 0, 0
        self.hold: threading.Event | None = None
        self.lock = threading.Lock()

    def __call__(self, rows, **kwargs):
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.hold is not None:
                assert self.hold.wait(timeout=30), "the test never released the held forward"
            self.sizes.append(len(rows))
            if len(rows) > 1 and any(row["response"] == "boom" for row in rows):
                raise RuntimeError("a forward that fails")
            return self.score(rows, **kwargs)
        finally:
            with self.lock:
                self.active -= 1


@contextmanager
def serving(app):
    """The app under uvicorn on a socket bound here (127.0.0.1, a free port: no race for the port), in a thread;
    always stopped."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def server(checkpoints, images):
    """With reward statistics, an image root, an API key and small limits."""
    scorer = RewardScorer.from_pretrained(checkpoints["stats"], max_seq_length=MAX_SEQ_LENGTH)
    recorder = ForwardRecorder(scorer.score)
    scorer.score = recorder
    settings = ServerSettings(
        image_root=str(images["root"]), api_key=API_KEY, max_batch_size=16, max_wait_ms=5, **LIMITS
    )
    app = create_app(scorer, settings, checkpoints["stats"])
    with serving(app) as port:
        yield {"port": port, "app": app, "recorder": recorder}


@pytest.fixture(scope="module")
def open_server(checkpoints):
    """No reward statistics, no image root, no API key."""
    scorer = RewardScorer.from_pretrained(checkpoints["plain"], max_seq_length=MAX_SEQ_LENGTH)
    with serving(create_app(scorer, ServerSettings(max_wait_ms=1), checkpoints["plain"])) as port:
        yield {"port": port}


def call(port: int, method: str, path: str, body=None, key: str | None = API_KEY, headers=None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
        connection.request(method, path, body=data, headers=all_headers | (headers or {}))
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send bytes as they are and read the reply until the server closes (bounded by the socket timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(request)
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
            if b"\r\n\r\n" in reply and reply.rstrip().endswith(b"}"):
                break
    return reply


# ----------------------------------------------------------------------------------------------------------------
# Scores over HTTP equal RewardScorer.score


QUESTION = "What color are the shapes?"


def _items(images) -> tuple[list[dict], list[dict]]:
    """(HTTP items, the same rows for RewardScorer.score): a group of four responses to one image prompt (images as
    a data: URL, raw base64, a relative and an absolute path), chat messages, two images, and no image."""
    a, b, c = (str(images[key]) for key in "abc")
    group = ["The shapes are red.", "The shapes are green.", "There are two shapes.", "Blue."]
    a_forms = [_data_url(images["bytes"]["a"]), _b64(images["bytes"]["a"]), "a.png", a]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes?"}]}]
    items = [
        {"prompt": QUESTION, "images": [form], "response": text} for form, text in zip(a_forms, group, strict=True)
    ]
    items += [
        {"prompt": messages, "images": ["sub/b.png"], "response": "Three."},
        {"prompt": "Compare <image> with <image>.", "images": ["c.png", "sub/b.png"], "response": "Same."},
        {"prompt": "Say something.", "response": "Something."},
        {"prompt": QUESTION, "images": [_data_url(images["bytes"]["c"])], "response": "The shapes are red."},
    ]
    rows = [{"prompt": QUESTION, "images": [a], "response": text} for text in group]
    rows += [
        {"prompt": messages, "images": [b], "response": "Three."},
        {"prompt": "Compare <image> with <image>.", "images": [c, b], "response": "Same."},
        {"prompt": "Say something.", "images": [], "response": "Something."},
        {"prompt": QUESTION, "images": [c], "response": "The shapes are red."},
    ]
    return items, rows


def test_score_equals_the_scorer_and_normalises_with_the_checkpoint_stats(server, images, reference):
    items, rows = _items(images)
    expected = reference.score(rows)
    assert len(set(expected.tolist())) == len(rows)  # distinct rewards: a mix-up of rows would show
    status, reply = call(server["port"], "POST", "/score", {"items": items})
    assert status == 200, reply
    np.testing.assert_allclose(reply["rewards"], expected, rtol=1e-5, atol=1e-6)
    status, reply = call(
        server["port"], "POST", "/score", {"items": items, "normalize": True}, key=None, headers={"X-API-Key": API_KEY}
    )
    assert status == 200, reply
    np.testing.assert_allclose(reply["rewards"], (expected - REWARD_MEAN) / REWARD_STD, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reply["rewards"], reference.score(rows, normalize=True), rtol=1e-5, atol=1e-6)


def test_get_reward_splits_chat_text_or_prompts_and_equals_the_scorer(server, images, reference):
    items, rows = _items(images)
    encoder = reference.encoder
    queries, query_images = [], []
    for row, item in zip(rows[:6], items[:6], strict=True):
        messages = _user_prompt_of(row["prompt"], len(row["images"]))
        queries.append(encoder.prompt_text(messages) + row["response"] + "<|im_end|><|endoftext|>")  # as OpenRLHF
        query_images.append(item["images"])
    status, reply = call(server["port"], "POST", "/get_reward", {"query": queries, "images": query_images})
    assert status == 200, reply
    np.testing.assert_allclose(reply["rewards"], reference.score(rows[:6]), rtol=1e-5, atol=1e-6)
    plain = {"query": ["Say something. Something."], "prompts": ["Say something. "], "labels": ["ignored"]}
    status, reply = call(server["port"], "POST", "/get_reward", plain)
    assert status == 200, reply
    expected = reference.score([{"prompt": "Say something. ", "images": [], "response": "Something."}])
    np.testing.assert_allclose(reply["rewards"], expected, rtol=1e-5, atol=1e-6)


def _user_prompt_of(prompt, num_images):
    return user_prompt(prompt, num_images) if isinstance(prompt, str) else prompt


def test_health_and_info(server, checkpoints, images):
    assert call(server["port"], "GET", "/health", key=None) == (200, {"status": "ok"})
    status, info = call(server["port"], "GET", "/info")
    assert status == 200
    assert info["checkpoint"] == str(checkpoints["stats"].resolve()) and info["step"] == 7
    assert info["normalization"] == {"reward_mean": REWARD_MEAN, "reward_std": REWARD_STD}
    expected_limits = dict(
        LIMITS,
        max_drain_bytes=256 * 2**20,
        max_pending_items=1024,
        max_seq_length=MAX_SEQ_LENGTH,
        image_root=str(images["root"]),
    )
    assert info["limits"] == expected_limits and info["batching"] == {"max_batch_size": 16, "max_wait_ms": 5}
    assert call(server["port"], "GET", "/info", key=None)[0] == 401


# ----------------------------------------------------------------------------------------------------------------
# Micro-batching: concurrent requests merge, one forward at a time, a failing request fails alone


def _send_while_held(
    server, bodies: list[dict], queued_items: int, recorder=None, plug: dict | None = None, key: str | None = API_KEY
) -> list[tuple[int, dict]]:
    """Hold the model on a one-item request (``plug``), send ``bodies`` concurrently, release once all of them are
    queued. ``recorder``: what stands in for the scorer (``server["recorder"]`` unless given: anything with ``hold``
    and ``active``); its ``sizes`` and ``batches`` records, where it has them, start anew."""
    recorder, batcher = recorder or server["recorder"], server["app"].state.batcher
    recorder.hold = threading.Event()
    for record in ("sizes", "batches"):
        if hasattr(recorder, record):
            setattr(recorder, record, [])
    plug = plug or {"items": [{"prompt": QUESTION, "response": "Plug."}]}
    replies: list = [None] * (len(bodies) + 1)

    def send(index: int, body: dict) -> None:
        replies[index] = call(server["port"], "POST", "/score", body, key=key)

    threads = [threading.Thread(target=send, args=(0, plug))]
    threads[0].start()
    try:
        _wait_for(lambda: recorder.active == 1)
        threads += [threading.Thread(target=send, args=(i + 1, body)) for i, body in enumerate(bodies)]
        for thread in threads[1:]:
            thread.start()
        _wait_for(lambda: batcher.pending_items == 1 + queued_items)
    finally:
        recorder.hold.set()  # released even when a wait failed: the model thread must not stay blocked
        for thread in threads:
            thread.join(timeout=60)
        recorder.hold = None
    return replies[1:]


def _wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_concurrent_requests_merge_into_micro_batches(server, images, reference):
    """Requests that queue behind a forward go into the next one together, up to max_batch_size (16) items; a request
    is never split; never two forwards at once; every request gets its own rewards."""
    responses = [f"The shapes are {colour}." for colour in ("red", "green", "blue", "yellow", "pink", "grey")]
    bodies = [
        {"items": [{"prompt": QUESTION, "images": ["a.png"], "response": text} for text in responses]}
        for _ in range(3)
    ]
    bodies[1]["items"] = bodies[1]["items"][::-1]
    replies = _send_while_held(server, bodies, queued_items=18)
    assert server["recorder"].sizes == [1, 12, 6] and server["recorder"].max_active == 1
    expected = reference.score([{"prompt": QUESTION, "images": [str(images["a"])], "response": t} for t in responses])
    for body, (status, reply) in zip(bodies, replies, strict=True):
        assert status == 200, reply
        order = [responses.index(item["response"]) for item in body["items"]]
        np.testing.assert_allclose(reply["rewards"], expected[order], rtol=1e-5, atol=1e-6)


def test_a_failing_request_does_not_fail_the_ones_merged_with_it(server):
    good = {"items": [{"prompt": QUESTION, "response": "Fine."}]}
    bad = {"items": [{"prompt": QUESTION, "response": "boom"}, {"prompt": QUESTION, "response": "Also fine."}]}
    (good_status, good_reply), (bad_status, bad_reply) = _send_while_held(server, [good, bad], queued_items=3)
    assert good_status == 200 and len(good_reply["rewards"]) == 1
    assert bad_status == 500 and bad_reply == {"error": "internal error while scoring; see the server log",
                                               "item": None, "field": None}  # fmt: skip
    assert call(server["port"], "GET", "/health", key=None)[0] == 200


# ----------------------------------------------------------------------------------------------------------------
# Bad requests: each a 4xx JSON error naming the item and the field; the server keeps serving


def _item(**fields) -> dict:
    return {"prompt": QUESTION, "images": ["a.png"], "response": "The shapes are red."} | fields


def _items_body(*items, **extra) -> dict:
    return {"items": list(items)} | extra


# (id, path, body (a function of the images fixture), key, status, item, field, words in the error)
BAD_REQUESTS = [
    ("bad_json", "/score", lambda im: b'{"items": [', API_KEY, 400, None, None, "invalid JSON"),
    ("not_utf8", "/score", lambda im: b"\xff\xfe\xfa", API_KEY, 400, None, None, "invalid JSON"),
    ("body_not_object", "/score", lambda im: [1, 2], API_KEY, 400, None, None, "must be a JSON object"),
    ("missing_items", "/score", lambda im: {}, API_KEY, 400, None, "items", "missing"),
    ("items_not_list", "/score", lambda im: {"items": "x"}, API_KEY, 400, None, "items", "expected a list"),
    ("items_empty", "/score", lambda im: {"items": []}, API_KEY, 400, None, "items", "empty"),
    ("unknown_top_field", "/score", lambda im: _items_body(_item(), extra=1), API_KEY, 400, None, "extra", "unknown"),
    ("non_object_item", "/score", lambda im: _items_body(_item(), 5), API_KEY, 400, 1, None, "expected an object"),
    ("unknown_item_field", "/score", lambda im: _items_body(_item(score=1)), API_KEY, 400, 0, "score", "unknown"),
    ("missing_response", "/score", lambda im: _items_body({"prompt": QUESTION}), API_KEY, 400, 0, "response",
     "missing"),
    ("response_not_string", "/score", lambda im: _items_body(_item(response=5)), API_KEY, 400, 0, "response",
     "expected a string, got int"),
    ("empty_response", "/score", lambda im: _items_body(_item(), _item(response="  ")), API_KEY, 400, 1, "response",
     "empty"),
    ("prompt_wrong_type", "/score", lambda im: _items_body(_item(prompt=7)), API_KEY, 400, 0, "prompt",
     "question string or a non-empty list"),
    ("bad_message_role", "/score", lambda im: _items_body(_item(prompt=[{"role": "robot", "content": "hi"}])),
     API_KEY, 400, 0, "prompt", "message 0"),
    ("inline_image_part", "/score", lambda im: _items_body(_item(
        prompt=[{"role": "user", "content": [{"type": "image", "image": "http://x/y.png"}]}])), API_KEY, 400, 0,
     "prompt", "expected {type: text"),
    ("images_not_list", "/score", lambda im: _items_body(_item(images="a.png")), API_KEY, 400, 0, "images",
     "expected a list"),
    ("image_not_string", "/score", lambda im: _items_body(_item(images=[5])), API_KEY, 400, 0, "images[0]",
     "expected a string"),
    ("image_places_mismatch", "/score", lambda im: _items_body(_item(prompt="<image> and <image>?")), API_KEY, 400,
     0, "images", "1 images but 2 image places"),
    ("corrupt_base64_data_url", "/score", lambda im: _items_body(_item(images=["data:image/png;base64,!!notb64"])),
     API_KEY, 400, 0, "images[0]", "invalid base64"),
    ("data_url_not_base64", "/score", lambda im: _items_body(_item(images=["data:image/png,rawbytes"])), API_KEY,
     400, 0, "images[0]", "only base64 data: URLs"),
    ("base64_not_an_image", "/score", lambda im: _items_body(_item(images=[_data_url(b"hello, not a png")])),
     API_KEY, 400, 0, "images[0]", "cannot decode image"),
    ("truncated_png", "/score", lambda im: _items_body(_item(images=[_data_url(im["bytes"]["a"][:200])])), API_KEY,
     400, 0, "images[0]", "cannot decode image"),
    ("bomb_header_past_pillow_limit", "/score", lambda im: _items_body(
        _item(images=[_data_url(_png_header_only(20000, 20000))])), API_KEY, 400, 0, "images[0]",
     "decompression bomb"),
    ("small_file_huge_pixels", "/score", lambda im: _items_body(
        _item(images=[_data_url(_png(np.zeros((1000, 1000), np.uint8)))])), API_KEY, 400, 0, "images[0]",
     "1000x1000 = 1000000 pixels, over --max_pixels_per_image=100000"),
    ("aspect_ratio_refused", "/score", lambda im: _items_body(_item(images=[_data_url(_png(np.zeros((2, 600),
     np.uint8)))])), API_KEY, 400, 0, "images", "aspect ratio"),
    ("path_dotdot_escape", "/score", lambda im: _items_body(_item(images=["../outside/secret.png"])), API_KEY, 400,
     0, "images[0]", "outside --image_root"),
    ("path_absolute_outside", "/score", lambda im: _items_body(_item(images=[str(im["secret"])])), API_KEY, 400, 0,
     "images[0]", "outside --image_root"),
    ("path_symlink_outside", "/score", lambda im: _items_body(_item(images=["escape.png"])), API_KEY, 400, 0,
     "images[0]", "outside --image_root"),
    ("path_missing", "/score", lambda im: _items_body(_item(images=["missing.png"])), API_KEY, 400, 0, "images[0]",
     "not found"),
    ("path_is_a_directory", "/score", lambda im: _items_body(_item(images=["sub"])), API_KEY, 400, 0, "images[0]",
     "not found"),
    ("http_url", "/score", lambda im: _items_body(_item(images=["http://127.0.0.1:9/a.png"])), API_KEY, 400, 0,
     "images[0]", "fetches nothing"),
    ("file_url", "/score", lambda im: _items_body(_item(images=["file:///etc/passwd"])), API_KEY, 400, 0,
     "images[0]", "fetches nothing"),
    ("too_many_items", "/score", lambda im: _items_body(*[_item()] * 9), API_KEY, 400, None, "items",
     "9 entries, over --max_items=8"),
    ("too_many_images", "/score", lambda im: _items_body(_item(prompt="Q?", images=["a.png"] * 3)), API_KEY, 400, 0,
     "images", "3 images, over --max_images=2"),
    ("over_long_response", "/score", lambda im: _items_body(_item(), _item(response="word " * 300)), API_KEY, 400, 1,
     "response", "over max_seq_length=128: not scored (never truncated)"),
    ("normalize_not_bool", "/score", lambda im: _items_body(_item(), normalize="yes"), API_KEY, 400, None,
     "normalize", "expected true or false"),
    ("missing_api_key", "/score", lambda im: _items_body(_item()), None, 401, None, None, "missing API key"),
    ("wrong_api_key", "/score", lambda im: _items_body(_item()), "not-the-key", 401, None, None, "wrong API key"),
    ("get_reward_no_marker", "/get_reward", lambda im: {"query": ["no chat markers here"]}, API_KEY, 400, 0, "query",
     "no `<|im_start|>assistant"),
    ("get_reward_prompt_not_prefix", "/get_reward", lambda im: {"query": ["A B"], "prompts": ["C"]}, API_KEY, 400, 0,
     "prompts", "does not start with its prompt"),
    ("get_reward_prompts_length", "/get_reward", lambda im: {"query": ["A B"], "prompts": ["A", "B"]}, API_KEY, 400,
     None, "prompts", "one per query"),
    ("get_reward_other_template", "/get_reward", lambda im: {"query": [
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello"]}, API_KEY, 400, 0, "query",
     "differs from what the checkpoint's chat template renders"),
    ("get_reward_empty_response", "/get_reward", lambda im: {"query": ["Q? <|im_end|>"], "prompts": ["Q? "]},
     API_KEY, 400, 0, "query", "empty"),
    # Strings that are base64 but not of an image are tried as paths under --image_root: never a 500.
    ("raw_base64_not_an_image", "/score", lambda im: _items_body(_item(images=[_b64(b"hello, not a png")])),
     API_KEY, 400, 0, "images[0]", "decodes as base64, but not to a PNG, JPEG, GIF, WebP, BMP or TIFF file"),
    ("long_raw_base64_not_an_image", "/score", lambda im: _items_body(_item(), _item(images=[_b64(bytes(3000))])),
     API_KEY, 400, 1, "images[0]", "decodes as base64, but not to a PNG"),
    ("path_component_too_long", "/score", lambda im: _items_body(_item(images=["x" * 300 + ".png"])), API_KEY, 400,
     0, "images[0]", "cannot read image path 'xxxx"),
    ("path_too_long", "/score", lambda im: _items_body(_item(images=["/".join(["x" * 200] * 30)])), API_KEY, 400,
     0, "images[0]", "cannot read image path"),
    ("path_nul_byte", "/score", lambda im: _items_body(_item(images=["a.png\x00.png"])), API_KEY, 400, 0,
     "images[0]", "bad image path"),
]  # fmt: skip


@pytest.mark.parametrize(
    "path, make_body, key, status, item, field, words", [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)  # fmt: skip
def test_bad_request_gets_a_4xx_naming_item_and_field(
    server, images, path, make_body, key, status, item, field, words
):
    assert len(BAD_REQUESTS) >= 20
    status_code, reply = call(server["port"], "POST", path, make_body(images), key=key)
    assert (status_code, reply["item"], reply["field"]) == (status, item, field), reply
    assert words in reply["error"], reply
    assert set(reply) == {"error", "item", "field"}


def test_body_limits_hold_before_the_body_is_read(server):
    """A declared Content-Length over the limit is refused without reading the body; a chunked body is counted as
    it arrives. Raw sockets: the client sends no more than the server reads, so no reset can eat the reply."""
    head = f"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
    reply = raw_exchange(server["port"], (head + "Content-Length: 100000000\r\n\r\n{").encode())
    assert reply.startswith(b"HTTP/1.1 413") and b"body of 100000000 bytes, over --max_body_bytes=262144" in reply
    chunks = [b"x" * 65536] * 4 + [b"x" * 16]  # 16 bytes over the limit
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"
    reply = raw_exchange(server["port"], (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunked)
    assert reply.startswith(b"HTTP/1.1 413") and b"body over --max_body_bytes=262144" in reply


BIG_BODY_BYTES = 16 * 2**20  # 64x the test limit, and more than loopback's socket buffers hold: still sending


def _send_and_read_reply(port: int, head: bytes, body_chunks) -> bytes:
    """Send the head, then every body chunk (a client that keeps sending after the server has answered), then read
    the reply. A connection reset on the way (the server closed with the body unread) raises."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(head)
        for chunk in body_chunks:
            connection.sendall(chunk)
        reply = b""
        while not (b"\r\n\r\n" in reply and reply.rstrip().endswith(b"}")) and (chunk := connection.recv(65536)):
            reply += chunk
    return reply


@pytest.mark.parametrize("connection", ["keep-alive", "close"])
@pytest.mark.parametrize("framing", ["content_length", "chunked"])
def test_a_client_still_sending_an_over_limit_body_receives_the_413(server, framing, connection):
    """The 413 goes out at once; the rest of the body is then read and discarded, so the client that keeps sending
    is never reset before it reads the reply (it would be if the server closed with the body unread: h11 discards
    the rest of a keep-alive request itself, but `Connection: close`, which urllib sends, closed at once)."""
    head = (
        f"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\nConnection: {connection}\r\n"
    )
    piece = b"x" * 65536
    if framing == "content_length":
        head += f"Content-Length: {BIG_BODY_BYTES}\r\n\r\n"
        chunks = [piece] * (BIG_BODY_BYTES // len(piece))
        expected = f"body of {BIG_BODY_BYTES} bytes, over --max_body_bytes=262144"
    else:
        head += "Transfer-Encoding: chunked\r\n\r\n"
        chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * (BIG_BODY_BYTES // len(piece)) + [b"0\r\n\r\n"]
        expected = "body over --max_body_bytes=262144"
    reply = _send_and_read_reply(server["port"], head.encode(), chunks)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert json.loads(reply.partition(b"\r\n\r\n")[2]) == {"error": expected, "item": None, "field": None}
    assert call(server["port"], "GET", "/health", key=None)[0] == 200


@pytest.mark.parametrize(
    "path, key, status, words",
    [("/score", API_KEY, 413, "over --max_body_bytes=262144"), ("/score", None, 401, "missing API key"),
     ("/nowhere", API_KEY, 404, "Not Found")],
    ids=["over_limit", "no_key", "no_route"],
)  # fmt: skip
def test_urllib_reads_a_reply_sent_before_its_body_was_read(server, path, key, status, words):
    """urllib sends `Connection: close` and reads only once its whole body is out: every reply the server gives
    before reading the body (413, 401, 404) must reach it."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(
        f"http://127.0.0.1:{server['port']}{path}", data=b" " * BIG_BODY_BYTES, headers=headers, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == status and words in json.loads(refused.value.read())["error"]
    assert call(server["port"], "GET", "/health", key=None)[0] == 200


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_reads_the_413_of_an_over_limit_body(server, tmp_path):
    """curl asks `Expect: 100-continue` for a large body: the server answers before the body is sent (and must not
    wait for it). With `Expect:` curl sends at once and reads the 413 while still sending; with `Connection: close`
    too, the server must not close before curl has stopped."""
    body = tmp_path / "body.json"
    body.write_bytes(b" " * BIG_BODY_BYTES)
    for expect in ([], ["-H", "Expect:"], ["-H", "Expect:", "-H", "Connection: close"]):
        result = subprocess.run(
            ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "60", "--data-binary", f"@{body}",
             "-H", "Content-Type: application/json", "-H", f"Authorization: Bearer {API_KEY}", *expect,
             f"http://127.0.0.1:{server['port']}/score"],
            capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        reply, _, status = result.stdout.rpartition("\n")
        assert status == "413" and "over --max_body_bytes=262144" in json.loads(reply)["error"], (expect, result)
    assert call(server["port"], "GET", "/health", key=None)[0] == 200


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def server_log():
    """Every record the app and uvicorn log meanwhile, at any level (uvicorn's loggers do not reach caplog)."""
    handler, loggers = _Records(), [logging.getLogger(name) for name in ("uvicorn.error", "vlrm.use.server")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


@pytest.mark.parametrize("framing", ["content_length", "chunked", "over_limit"])
def test_a_client_that_disconnects_mid_body_is_logged_quietly(server, framing):
    """No traceback, no error record, no attempt at a 500: one line at info level, and the server goes on."""
    head = f"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
    if framing == "chunked":
        request = head + "Transfer-Encoding: chunked\r\n\r\n" + "400\r\n" + "x" * 1024 + "\r\n"
    else:  # half of a body under the limit, or the start of one over it (answered 413, then the client leaves)
        declared = 100_000 if framing == "content_length" else BIG_BODY_BYTES
        request = head + f"Content-Length: {declared}\r\n\r\n" + '{"items": [' + "x" * 50_000
    with server_log() as records:
        with socket.create_connection(("127.0.0.1", server["port"]), timeout=30) as connection:
            connection.sendall(request.encode())
            if framing == "over_limit":
                assert connection.recv(65536).startswith(b"HTTP/1.1 413")
            else:
                time.sleep(0.2)  # the server is reading the body when the client goes
        _wait_for(lambda: any("disconnected" in r.getMessage() or r.levelno >= logging.WARNING for r in records))
        time.sleep(0.2)  # anything logged after the first record (a traceback from uvicorn) is caught too
    loud = [(r.name, r.levelname, r.getMessage()) for r in records if r.levelno >= logging.WARNING or r.exc_info]
    assert not loud, loud
    assert any(r.levelno <= logging.INFO and "disconnected" in r.getMessage() for r in records), records
    assert call(server["port"], "GET", "/health", key=None)[0] == 200


def test_unknown_route_and_method_use_the_same_error_shape(server):
    assert call(server["port"], "POST", "/nowhere", {}) == (404, {"error": "Not Found", "item": None, "field": None})
    assert call(server["port"], "GET", "/score")[0] == 405


def test_still_serving_after_every_bad_request(server, images, reference):
    assert call(server["port"], "GET", "/health", key=None) == (200, {"status": "ok"})
    status, reply = call(server["port"], "POST", "/score", _items_body(_item()))
    assert status == 200
    expected = reference.score([{"prompt": QUESTION, "images": [str(images["a"])], "response": "The shapes are red."}])
    np.testing.assert_allclose(reply["rewards"], expected, rtol=1e-5, atol=1e-6)


def test_without_image_root_paths_are_refused_and_without_stats_normalize_is(open_server, images):
    port = open_server["port"]
    status, reply = call(port, "POST", "/score", _items_body(_item(images=["a.png"])), key=None)
    assert (status, reply["item"], reply["field"]) == (400, 0, "images[0]")
    assert "file paths are refused (the server was started without --image_root)" in reply["error"]
    for value in (str(images["a"]), _b64(b"base64, but not of an image")):
        status, reply = call(port, "POST", "/score", _items_body(_item(images=[value])), key=None)
        assert status == 400 and "file paths are refused" in reply["error"], reply
    body = _items_body(_item(images=[_b64(images["bytes"]["a"])]), normalize=True)
    status, reply = call(port, "POST", "/score", body, key=None)
    assert (status, reply["field"]) == (400, "normalize") and "no reward_mean/reward_std" in reply["error"]
    status, reply = call(port, "POST", "/score", dict(body, normalize=False), key=None)
    assert status == 200 and len(reply["rewards"]) == 1
    status, info = call(port, "GET", "/info", key=None)
    assert status == 200 and info["normalization"] is None and info["step"] is None


def test_normalize_by_default_is_refused_at_startup_without_stats(checkpoints):
    scorer = RewardScorer.from_pretrained(checkpoints["plain"])
    with pytest.raises(ValueError, match="no reward_mean/reward_std.*serve without --normalize"):
        create_app(scorer, ServerSettings(normalize=True), checkpoints["plain"])
    with pytest.raises(ValueError, match="image_root is not a directory"):
        ServerSettings(image_root=str(checkpoints["plain"] / "nowhere"))


# ----------------------------------------------------------------------------------------------------------------
# serve_rm.py end to end


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_rm_script_serves_and_refuses_normalize_without_stats(tmp_path, checkpoints, images, reference):
    env = dict(os.environ, VLRM_API_KEY=API_KEY)
    refused = subprocess.run(
        [sys.executable, str(ROOT / "serve_rm.py"), str(checkpoints["plain"]), "--normalize"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert refused.returncode == 2 and "serve without --normalize" in refused.stderr
    port = _free_port()
    command = [sys.executable, str(ROOT / "serve_rm.py"), str(checkpoints["stats"]), "--port", str(port),
               "--max_seq_length", str(MAX_SEQ_LENGTH), "--normalize"]  # fmt: skip
    log = tmp_path / "serve_rm.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "serve_rm.py did not start"
            try:
                if call(port, "GET", "/health", key=None)[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        body = _items_body(_item(images=[_data_url(images["bytes"]["b"])]))
        status, reply = call(port, "POST", "/score", body)
        row = {"prompt": QUESTION, "images": [str(images["b"])], "response": "The shapes are red."}
        assert status == 200
        np.testing.assert_allclose(reply["rewards"], reference.score([row], normalize=True), rtol=1e-5, atol=1e-6)
        assert call(port, "POST", "/score", body, key=None)[0] == 401
    finally:
        process.terminate()
        process.wait(timeout=60)
