"""The clients RL frameworks call (vlrm/use/clients.py): vLLM's /classify request renders to exactly the ids vlrm
scores; serve_rm.py's client, verl's ``compute_score`` and OpenRLHF's ``reward_func``, each loaded as its framework
loads it, against the real app under uvicorn on 127.0.0.1 with images, give ``RewardScorer.score``'s rewards.
bench/check_vllm.py runs the /classify client against a real vLLM server."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import random
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from tests.test_server import serving as serving_port
from vlrm.data.rows import user_prompt
from vlrm.data.synthetic import draw_shapes
from vlrm.layout.encoder import PreferenceEncoder, open_image
from vlrm.use import clients
from vlrm.use.clients import RewardRequestError, RewardServerClient, VllmClassifyClient, classify_request
from vlrm.use.scoring import RewardScorer
from vlrm.use.server.app import create_app
from vlrm.use.server.settings import ServerSettings

ATOL = 1e-5  # the server batches rows differently from one scorer call: float32 round-off only
QUESTION = "What color are the shapes?"


def _shapes(index: int) -> Image.Image:
    return draw_shapes(("red", "blue", "green")[index % 3], 1 + index % 3, 56, random.Random(index))


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _translucent() -> Image.Image:
    """An RGBA image whose transparent half vlrm composites on white (a plain convert("RGB") would make it black)."""
    pixels = np.zeros((56, 56, 4), dtype=np.uint8)
    pixels[:, :28] = (200, 30, 30, 255)
    return Image.fromarray(pixels, "RGBA")


# ----------------------------------------------------------------------------------------------------------------
# vLLM's /classify request, checked without vLLM: what the chat template renders from it is what vlrm scores


def _as_vllm_renders(request: dict) -> tuple[list[dict], list[Image.Image]]:
    """The request's messages as vLLM hands them to the chat template (image_url parts become image parts) and the
    images decoded from their data: URLs."""
    messages, images = [], []
    for message in request["messages"]:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part["type"] == "image_url":
                    header, payload = part["image_url"]["url"].split(",", 1)
                    assert header == "data:image/png;base64"
                    images.append(Image.open(io.BytesIO(base64.b64decode(payload))))
                    parts.append({"type": "image"})
                else:
                    parts.append(part)
            content = parts
        messages.append({"role": message["role"], "content": content})
    return messages, images


MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"}, {"type": "text", "text": "?"}]},
]
CASES = [  # (prompt, images, response): the shapes a reward request takes
    (QUESTION, [0], "The shapes are red."),
    ("How many shapes?", [1, 2], " Two shapes, \n"),  # leading and trailing whitespace is the response's own
    ("Left <image> right <image>: same colour?", [0, 2], "No."),
    (MESSAGES, [1], "Blue."),
    ("Describe the image in one sentence.", [], "It is a circle."),
]


@pytest.mark.parametrize("prompt, image_indices, response", CASES)
def test_classify_request_renders_to_the_ids_vlrm_scores(processor, prompt, image_indices, response):
    images = [_shapes(index) for index in image_indices]
    request = classify_request(prompt, response, images, model="vlrm")
    assert request["model"] == "vlrm" and request["use_activation"] is False
    assert request["continue_final_message"] is True and request["add_generation_prompt"] is False
    messages, sent_images = _as_vllm_renders(request)
    text = processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, continue_final_message=True
    )
    if sent_images:
        ids = processor(text=[text], images=sent_images, add_special_tokens=False)["input_ids"][0]
    else:
        ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    encoder = PreferenceEncoder(processor)
    vlrm_prompt = user_prompt(prompt, len(images)) if isinstance(prompt, str) else prompt
    expected = encoder.encode_prompt(vlrm_prompt, images).input_ids + encoder.encode_response(response)
    assert list(ids) == expected
    assert ids[-1] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")  # the reward token, nothing after it
    for sent, image in zip(sent_images, images, strict=True):
        assert np.array_equal(np.asarray(sent), np.asarray(open_image(image)))


def test_classify_request_sends_the_pixels_vlrm_decodes_and_refuses_a_count_mismatch():
    translucent = _translucent()
    (sent,) = _as_vllm_renders(classify_request(QUESTION, "Red.", [translucent]))[1]
    assert sent.mode == "RGB" and np.asarray(sent)[0, 40].tolist() == [255, 255, 255]  # alpha on white, as vlrm
    assert np.array_equal(np.asarray(sent), np.asarray(open_image(translucent)))
    with pytest.raises(ValueError, match="2 <image> markers for 1 images"):
        classify_request("A <image> B <image>", "Red.", [translucent])
    with pytest.raises(ValueError, match="1 image parts for 0 images"):
        classify_request(MESSAGES, "Red.", [])


# ----------------------------------------------------------------------------------------------------------------
# serve_rm.py's app, live on 127.0.0.1


@contextmanager
def serving(app):
    """The app live on 127.0.0.1 (``tests.test_server.serving``), as the URL a client is given."""
    with serving_port(app) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, save_reward_checkpoint):
    return save_reward_checkpoint(tmp_path_factory.mktemp("clients") / "run", seed=5, reward_mean=0.5, reward_std=2.0)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The scorer the clients' rewards are checked against (not the server's instance)."""
    return RewardScorer.from_pretrained(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def server(checkpoint):
    scorer = RewardScorer.from_pretrained(checkpoint, device="cpu")
    settings = ServerSettings(api_key="client-key", max_wait_ms=2)
    with serving(create_app(scorer, settings, checkpoint)) as url:
        yield url


def _rows(tmp_path) -> list[dict]:
    path = tmp_path / "shapes.png"
    path.write_bytes(_png_bytes(_shapes(2)))
    return [  # every form an image takes in a row: PIL (RGBA too), raw bytes, a dataset's dict, a local path
        {"prompt": QUESTION, "images": [_shapes(0)], "response": "The shapes are red."},
        {"prompt": QUESTION, "images": [_shapes(0)], "response": "The shapes are blue."},
        {"prompt": QUESTION, "images": [_translucent()], "response": "The shapes are red."},
        {"prompt": "How many shapes?", "images": [_png_bytes(_shapes(1))], "response": "There are two shapes."},
        {
            "prompt": "How many shapes?",
            "images": [{"bytes": _png_bytes(_shapes(1)), "path": None}],
            "response": "One.",
        },
        {"prompt": MESSAGES, "images": [str(path)], "response": "Green."},
        {"prompt": "Describe the image in one sentence.", "images": [], "response": "It is a circle."},
    ]


def test_reward_server_client_gives_the_scorer_s_rewards(server, reference, tmp_path):
    rows = _rows(tmp_path)
    expected = reference.score(rows)
    assert np.ptp(expected) > 0.1 and expected[0] != expected[1]  # the images and the responses move the reward
    client = RewardServerClient(server, api_key="client-key")
    np.testing.assert_allclose(client.score(rows), expected, rtol=0, atol=ATOL)
    np.testing.assert_allclose(client.score(rows, normalize=True), (expected - 0.5) / 2.0, rtol=0, atol=ATOL)
    with pytest.raises(RewardRequestError, match="HTTP 400: 1 images but 2 image places in the prompt"):
        client.score([{"prompt": "A <image> B <image>", "images": [_shapes(0)], "response": "Red."}])
    with pytest.raises(RewardRequestError, match="HTTP 401"):
        RewardServerClient(server).score(rows[:1])


def _load_by_path(module_name: str):
    """clients.py loaded from its file, as verl (``custom_module``) and OpenRLHF (``reward_func``) load theirs."""
    spec = importlib.util.spec_from_file_location(module_name, clients.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_verl_compute_score_sends_the_images_from_extra_info(server, reference, tmp_path):
    verl_module = _load_by_path("custom_module")
    rows = _rows(tmp_path)
    expected = reference.score(rows)
    reward_kwargs = {"reward_url": server, "api_key": "client-key"}  # verl's custom_reward_function.reward_kwargs
    extra_infos = [{"question": row["prompt"], "images": row["images"], "index": i} for i, row in enumerate(rows)]
    scores = [
        verl_module.compute_score(
            data_source="synthetic", solution_str=row["response"], ground_truth="unused", extra_info=extra,
            reward_router_address=None, reward_model_tokenizer=None, **reward_kwargs,
        )
        for row, extra in zip(rows, extra_infos, strict=True)
    ]  # fmt: skip
    np.testing.assert_allclose(scores, expected, rtol=0, atol=ATOL)
    batch = verl_module.compute_score_batch(
        data_sources=["synthetic"] * len(rows), solution_strs=[row["response"] for row in rows],
        ground_truths=[None] * len(rows), extra_infos=extra_infos, **reward_kwargs,
    )  # fmt: skip
    np.testing.assert_allclose(batch, expected, rtol=0, atol=ATOL)
    with pytest.raises(TypeError, match=r"unknown reward_kwargs \['reward_ur'\]"):  # a typo in the config
        verl_module.compute_score("s", "Red.", None, extra_infos[0], reward_ur=server)
    with pytest.raises(ValueError, match="extra_info has no `question`"):
        verl_module.compute_score("s", "Red.", None, {"images": rows[0]["images"]}, **reward_kwargs)
    with pytest.raises(ValueError, match="engine must be"):
        verl_module.compute_score("s", "Red.", None, extra_infos[0], engine="sglang", **reward_kwargs)


def test_openrlhf_reward_func_adds_the_images_from_the_labels(server, reference, processor, monkeypatch):
    monkeypatch.setenv("VLRM_REWARD_URL", server)
    monkeypatch.setenv("VLRM_API_KEY", "client-key")
    reward_module = _load_by_path("reward_func")
    encoder = PreferenceEncoder(processor)
    images = [_shapes(0), _shapes(1), _shapes(2)]
    responses = ["The shapes are red.", "The shapes are blue.", "There are three shapes."]
    prompts, queries = [], []
    for image, response in zip(images, responses, strict=True):
        # As OpenRLHF builds them: the templated prompt text, and the query decoded from the prompt's token ids (the
        # processor's image pads expanded) + the generated ids (the end-of-turn, then padding).
        prompt = encoder.prompt_text(user_prompt(QUESTION, 1))
        prompt_ids = encoder.encode_prompt(user_prompt(QUESTION, 1), [image]).input_ids
        response_ids = encoder.encode_response(response) + [processor.tokenizer.pad_token_id] * 2
        prompts.append(prompt)
        queries.append(processor.tokenizer.decode(prompt_ids + response_ids, skip_special_tokens=False))
    assert queries[0].count("<|image_pad|>") > 1 and not queries[0].startswith(prompts[0])
    labels = [json.dumps({"images": [clients.image_data_url(image)]}) for image in images]
    result = reward_module.reward_func(queries, prompts, labels)
    expected = reference.score(
        [{"prompt": QUESTION, "images": [image], "response": r} for image, r in zip(images, responses, strict=True)]
    )
    assert set(result) == {"rewards", "scores", "extra_logs"}
    np.testing.assert_allclose(result["rewards"].numpy(), expected, rtol=0, atol=ATOL)
    np.testing.assert_allclose(result["scores"].numpy(), expected, rtol=0, atol=ATOL)
    # Without its images the query's image placeholder has nothing to show: the server refuses rather than guess.
    with pytest.raises(reward_module.RewardRequestError, match="HTTP 400: 0 images but 1 image places"):
        reward_module.reward_func(queries, prompts, ["no images"] * 3)


# ----------------------------------------------------------------------------------------------------------------
# The /classify client's HTTP side, against a stand-in for vLLM's server on 127.0.0.1 (the real one: check_vllm.py)


@contextmanager
def classify_stand_in(reward_of):
    """A /classify endpoint answering as vLLM does (``data[0].probs``) with ``reward_of(body)``; records the bodies."""
    bodies = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            bodies.append((self.path, body))
            reply = json.dumps({"data": [{"index": 0, "label": "reward", "probs": reward_of(body), "num_classes": 1}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", bodies
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)


def _response_length(body: dict) -> list[float]:
    return [float(len(body["messages"][-1]["content"]))]


def test_vllm_classify_client_posts_the_request_and_reads_the_score_in_row_order():
    rows = [{"prompt": QUESTION, "images": [_shapes(i)], "response": "x" * (i + 1)} for i in range(6)]
    with classify_stand_in(_response_length) as (url, bodies):
        rewards = VllmClassifyClient(url, model="vlrm", max_workers=4).score(rows)
        # verl's compute_score with engine="vllm" sends the same request
        verl_reward = clients.compute_score(
            "s", "abc", None, {"question": QUESTION, "images": [_shapes(0)]}, reward_url=url, engine="vllm",
            model="vlrm",
        )  # fmt: skip
    assert rewards == [float(i + 1 + len("<|im_end|>")) for i in range(6)]  # each row its own score, in order
    assert verl_reward == 3 + len("<|im_end|>")
    path, body = bodies[-1]
    assert path == "/classify" and body == classify_request(QUESTION, "abc", [_shapes(0)], model="vlrm")
    with classify_stand_in(lambda body: [0.1, 0.9]) as (url, _):  # a two-label classifier is not a vlrm export
        with pytest.raises(RewardRequestError, match="expected one score"):
            VllmClassifyClient(url).score(rows[:1])
