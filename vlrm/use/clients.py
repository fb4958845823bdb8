"""Clients for the reward where RL runs: vLLM's ``/classify``, ``serve_rm.py``'s ``/score`` and ``/get_reward``, and
the reward-function contracts of verl and OpenRLHF. Every one sends the images. Standard library only (``urllib``).

vLLM, on an export (``python -m vlrm export RUN EXPORT``; the flags are in the export's ``config.json``,
``vlrm.vllm.serve_flags``):

    python -m vllm.entrypoints.openai.api_server --model EXPORT --runner pooling --host 127.0.0.1 --port 8001

    from vlrm.use.clients import VllmClassifyClient, RewardServerClient
    rows = [{"prompt": "What is shown?", "images": ["cat.png"], "response": "A cat."}]
    rewards = VllmClassifyClient("http://127.0.0.1:8001").score(rows)          # one /classify request per row
    rewards = RewardServerClient("http://127.0.0.1:8000").score(rows)          # serve_rm.py's /score

verl (its reward loop's custom reward function, ``compute_score(data_source, solution_str, ground_truth,
extra_info, **reward_kwargs)``; the row's ``extra_info`` carries the question and the images, since verl passes the
reward function no images of its own):

    reward.custom_reward_function.path=$(python -c "import vlrm.use.clients as m; print(m.__file__)")
    reward.custom_reward_function.name=compute_score      # compute_score_batch with reward.reward_manager.name=batch
    +reward.custom_reward_function.reward_kwargs.reward_url=http://127.0.0.1:8000
    +reward.custom_reward_function.reward_kwargs.engine=vlrm                    # or vllm: reward_url is vLLM's server
    # each dataset row: extra_info = {"question": "What is shown?", "images": [path | bytes | {"bytes": ...}]}

OpenRLHF (``--remote_rm_url`` a Python file: OpenRLHF calls its ``reward_func(queries, prompts, labels)``; it sends a
URL reward model text only, so this file is the adapter that adds the images, read from each row's label):

    VLRM_REWARD_URL=http://127.0.0.1:8000 python -m openrlhf.cli.train_ppo_ray ... \\
        --remote_rm_url $(python -c "import vlrm.use.clients as m; print(m.__file__)") --label_key vlrm
    # each dataset row: "vlrm": {"images": [...]} (or its JSON string); VLRM_API_KEY when the server wants a key

The ``/classify`` request (``classify_request``) that gives vlrm's reward, and why each field is there:

- the images go as ``image_url`` parts with ``data:`` URLs inside chat ``messages``: a ``/classify`` request carries
  images no other way, and token ids taken from vlrm's processor (image pads already expanded) are expanded again by
  vLLM without an error. Each image is sent as the PNG of the pixels vlrm decodes (``open_image``: alpha on white),
  so vLLM's own decoding cannot differ;
- the response is the final assistant message with the end-of-turn token (``<|im_end|>``) appended, and
  ``continue_final_message: true``, ``add_generation_prompt: false``: the chat template ends every turn with
  ``<|im_end|>\\n``; rendered this way the text stops right after the appended token, where vlrm reads the reward.
  Without it vLLM scores the newline after ``<|im_end|>`` (on the trained demo model up to 10.1 away);
- ``use_activation: false``: vLLM applies a sigmoid to a one-label classifier's output by default (the export's
  ``problem_type: regression`` turns that off for clients that forget it, but the request should say it).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from PIL import Image

from vlrm.data.rows import IMAGE_MARKER, user_prompt
from vlrm.layout.encoder import open_image

DEFAULT_END_OF_TURN = "<|im_end|>"  # Qwen's; an export records its own as config.json vlrm.reward_token
DEFAULT_TIMEOUT = 120.0  # seconds per request
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Keyword arguments verl's reward managers pass besides the documented four (when a reward model is configured).
VERL_EXTRAS = ("reward_router_address", "reward_model_tokenizer")
IMAGE_PADS = re.compile(r"(?:<\|image_pad\|>)+")  # OpenRLHF's queries hold one pad per visual token


class RewardRequestError(RuntimeError):
    """A reward server answered with an error (the server's message is in it) or could not be reached."""


# ----------------------------------------------------------------------------------------------------------------
# Images and HTTP


def image_data_url(image: Any) -> str:
    """``data:image/png;base64,...`` of the RGB pixels vlrm decodes from ``image`` (a path, bytes, a ``{"bytes",
    "path"}`` dict or a PIL image): what vLLM must see to score what vlrm scores. PNG is lossless, so vLLM decodes
    exactly these pixels."""
    buffer = io.BytesIO()
    open_image(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _is_local_file(path: str | Path) -> bool:
    try:
        return Path(path).is_file()
    except (OSError, ValueError):  # a base64 string is no file name (ENAMETOOLONG), nor one with a NUL byte
        return False


def _server_image(image: Any) -> str:
    """An image for serve_rm.py, which decodes it as the scorer does: the file's own bytes as a data: URL (a local
    path is read here), a ``data:`` URL as it is, or a path this machine does not have, left to the server's
    ``--image_root``."""
    if isinstance(image, dict):
        image = image["bytes"] if image.get("bytes") is not None else image["path"]
    if isinstance(image, (str, Path)):
        if str(image).startswith("data:") or not _is_local_file(image):
            return str(image)
        image = Path(image).read_bytes()
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        try:
            image.save(buffer, format="PNG")  # its mode as it is: the server composites alpha on white, as training
        except OSError:  # a mode PNG cannot hold (CMYK...): the RGB pixels vlrm would decode
            return image_data_url(image)
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    try:
        kind = (Image.open(io.BytesIO(image)).format or "png").lower()  # reads the header only
    except OSError as error:
        raise ValueError(f"{len(image)} bytes that are no image PIL reads: {error}") from error
    return f"data:image/{kind};base64," + base64.b64encode(bytes(image)).decode()


def _error_message(body: bytes) -> str:
    """serve_rm.py's ``{"error", "item", "field"}`` or vLLM's ``{"error": {"message"}}``, else the body's start."""
    try:
        reply = json.loads(body)
    except ValueError:
        return body[:500].decode(errors="replace")
    if not isinstance(reply, dict):
        return str(reply)[:500]
    error = reply.get("error", reply.get("detail", reply))
    message = error.get("message", error) if isinstance(error, dict) else error
    where = ", ".join(f"{key} {reply[key]}" for key in ("item", "field") if reply.get(key) is not None)
    return f"{message} ({where})" if where else str(message)


def _post(url: str, payload: dict, api_key: str | None, timeout: float) -> dict:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
    # A proxy set in the environment must not take loopback traffic (urllib would send it there too).
    handlers = [urllib.request.ProxyHandler({})] if urlsplit(url).hostname in LOOPBACK else []
    try:
        with urllib.request.build_opener(*handlers).open(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise RewardRequestError(f"{url}: HTTP {error.code}: {_error_message(error.read())}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        raise RewardRequestError(f"{url}: {getattr(error, 'reason', error)}") from error


# ----------------------------------------------------------------------------------------------------------------
# vLLM's /classify


def _openai_messages(prompt: list[dict] | str, images: Sequence[Any]) -> list[dict]:
    """vlrm's prompt (a question string, ``<image>`` markers placing the images, else before the text; or messages
    with ``{"type": "image"}`` parts) as OpenAI chat messages, each image part an ``image_url`` with its data: URL."""
    if isinstance(prompt, str):
        markers = prompt.count(IMAGE_MARKER)
        if markers and markers != len(images):
            raise ValueError(f"the question has {markers} {IMAGE_MARKER} markers for {len(images)} images")
        prompt = user_prompt(prompt, len(images))
    parts_of = [[{"type": "text", "text": content}] if isinstance(content := message["content"], str) else content
                for message in prompt]  # fmt: skip
    num_parts = sum(part.get("type") == "image" for parts in parts_of for part in parts)
    if num_parts != len(images):
        raise ValueError(f"the prompt has {num_parts} image parts for {len(images)} images")
    urls = iter([image_data_url(image) for image in images])
    return [
        {
            "role": message["role"],
            "content": [
                {"type": "image_url", "image_url": {"url": next(urls)}} if part.get("type") == "image"
                else {"type": "text", "text": part.get("text") or ""}
                for part in parts
            ],
        }
        for message, parts in zip(prompt, parts_of, strict=True)
    ]  # fmt: skip


def classify_request(
    prompt: list[dict] | str,
    response: str,
    images: Sequence[Any] = (),
    end_of_turn: str = DEFAULT_END_OF_TURN,
    model: str | None = None,
) -> dict:
    """The JSON body of a vLLM ``/classify`` request whose reward is vlrm's for (prompt, images, response): the
    module docstring says why each field is there. ``prompt``: a question string or chat messages, as
    ``RewardScorer.score`` takes them; ``end_of_turn``: the export's ``vlrm.reward_token``; ``model``: the served
    model name (vLLM's only model when None)."""
    messages = _openai_messages(prompt, list(images))
    messages.append({"role": "assistant", "content": response + end_of_turn})
    body = {
        "messages": messages,
        "add_generation_prompt": False,
        "continue_final_message": True,
        "use_activation": False,
    }
    return body if model is None else {"model": model, **body}


class VllmClassifyClient:
    """Scores rows through a vLLM server's ``/classify`` (an export served with ``--runner pooling``): one request
    per row (a chat request holds one conversation), ``max_workers`` in flight so vLLM batches them."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        end_of_turn: str = DEFAULT_END_OF_TURN,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_workers: int = 8,
    ):
        self.url = base_url.rstrip("/") + "/classify"
        self.model, self.end_of_turn, self.api_key, self.timeout = model, end_of_turn, api_key, timeout
        self.max_workers = max_workers

    def score_one(self, prompt: list[dict] | str, response: str, images: Sequence[Any] = ()) -> float:
        body = classify_request(prompt, response, images, self.end_of_turn, self.model)
        data = _post(self.url, body, self.api_key, self.timeout)["data"]
        if len(data) != 1 or len(data[0]["probs"]) != 1:
            raise RewardRequestError(f"{self.url}: expected one score, got {data!r:.200} (not a vlrm export?)")
        return float(data[0]["probs"][0])

    def score(self, rows: Sequence[dict]) -> list[float]:
        """Rows as ``RewardScorer.score`` takes them (``prompt``, ``images``, ``response``): one reward each."""
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_workers, len(rows)))) as pool:
            futures = [
                pool.submit(self.score_one, row["prompt"], row["response"], row.get("images") or []) for row in rows
            ]
            return [future.result() for future in futures]


# ----------------------------------------------------------------------------------------------------------------
# serve_rm.py


class RewardServerClient:
    """Scores rows through ``serve_rm.py``: ``/score`` (items) and ``/get_reward`` (OpenRLHF's query texts)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT):
        self.base_url, self.api_key, self.timeout = base_url.rstrip("/"), api_key, timeout

    def score(self, rows: Sequence[dict], normalize: bool | None = None) -> list[float]:
        """Rows as ``RewardScorer.score`` takes them; ``normalize``: the server's default when None."""
        items = [
            {"prompt": row["prompt"], "images": [_server_image(image) for image in row.get("images") or []],
             "response": row["response"]}
            for row in rows
        ]  # fmt: skip
        payload: dict[str, Any] = {"items": items}
        if normalize is not None:
            payload["normalize"] = normalize
        return _post(self.base_url + "/score", payload, self.api_key, self.timeout)["rewards"]

    def get_reward(
        self,
        queries: Sequence[str],
        prompts: Sequence[str] | None = None,
        images: Sequence[Sequence[Any]] | None = None,
        normalize: bool | None = None,
    ) -> list[float]:
        """OpenRLHF's request: full chat texts (prompt + response), optionally their prompts, and each one's images."""
        payload: dict[str, Any] = {"query": list(queries)}
        if prompts is not None:
            payload["prompts"] = list(prompts)
        if images is not None:
            payload["images"] = [[_server_image(image) for image in row] for row in images]
        if normalize is not None:
            payload["normalize"] = normalize
        return _post(self.base_url + "/get_reward", payload, self.api_key, self.timeout)["rewards"]


# ----------------------------------------------------------------------------------------------------------------
# verl: the reward loop's custom reward function


def _verl_row(solution_str: str, extra_info: dict | None) -> dict:
    extra_info = extra_info or {}
    prompt = extra_info.get("prompt", extra_info.get("question"))
    if prompt is None:
        raise ValueError(
            "extra_info has no `question` (or `prompt` messages): put the question and its images in each row's "
            "extra_info when preparing the data set, e.g. extra_info={'question': q, 'images': [...]}"
        )
    images = extra_info.get("images")
    if images is None:
        images = [extra_info["image"]] if extra_info.get("image") is not None else []
    return {"prompt": prompt, "images": list(images), "response": solution_str}


def _verl_scores(rows: list[dict], engine: str, reward_url: str | None, options: dict) -> list[float]:
    unknown = sorted(set(options) - {"api_key", "timeout", "normalize", "model", "end_of_turn", *VERL_EXTRAS})
    if unknown:
        raise TypeError(f"unknown reward_kwargs {unknown}; vlrm's compute_score takes reward_url, engine, api_key, "
                        "timeout, normalize (vlrm), model and end_of_turn (vllm)")  # fmt: skip
    url = reward_url or os.environ.get("VLRM_REWARD_URL", "http://127.0.0.1:8000")
    api_key = options.get("api_key") or os.environ.get("VLRM_API_KEY")
    timeout = float(options.get("timeout", DEFAULT_TIMEOUT))
    if engine == "vlrm":
        return RewardServerClient(url, api_key, timeout).score(rows, options.get("normalize"))
    if engine == "vllm":
        if options.get("normalize"):
            raise ValueError("normalize is serve_rm.py's; with vLLM, normalise with the export's vlrm.reward_mean/std")
        client = VllmClassifyClient(
            url, options.get("model"), options.get("end_of_turn", DEFAULT_END_OF_TURN), api_key, timeout
        )
        return client.score(rows)
    raise ValueError(f"engine must be 'vlrm' (serve_rm.py) or 'vllm' (vLLM's /classify), got {engine!r}")


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict | None = None,
    reward_url: str | None = None,
    engine: Literal["vlrm", "vllm"] = "vlrm",
    **options: Any,
) -> float:
    """verl's custom reward function: the reward of ``solution_str`` (the decoded response) for the question and
    images in ``extra_info`` (``question`` or ``prompt`` messages, ``images``). ``reward_url``: serve_rm.py
    (``engine="vlrm"``) or a vLLM server of an export (``engine="vllm"``); default ``$VLRM_REWARD_URL``, else
    http://127.0.0.1:8000. ``options`` (verl's ``reward_kwargs``): ``api_key`` (default ``$VLRM_API_KEY``),
    ``timeout``, ``normalize`` (serve_rm.py), ``model`` and ``end_of_turn`` (vLLM). ``data_source`` and
    ``ground_truth`` are not read: a reward model scores the response itself."""
    return _verl_scores([_verl_row(solution_str, extra_info)], engine, reward_url, options)[0]


def compute_score_batch(
    data_sources: Sequence[str],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[dict | None],
    reward_url: str | None = None,
    engine: Literal["vlrm", "vllm"] = "vlrm",
    **options: Any,
) -> list[float]:
    """verl's ``batch`` reward manager's form of ``compute_score``: a chunk of rows in one call (one ``/score``
    request to serve_rm.py, whose packed layout then scores a GRPO group's shared prompt once)."""
    rows = [_verl_row(solution, extra) for solution, extra in zip(solution_strs, extra_infos, strict=True)]
    return _verl_scores(rows, engine, reward_url, options)


# ----------------------------------------------------------------------------------------------------------------
# OpenRLHF: the `--remote_rm_url file.py` reward function


def _label_images(label: Any) -> list:
    """The images of one OpenRLHF row, from its label (``--label_key``): ``{"images": [...]}``, its JSON string, or
    a list of images; a label without images means a text-only row."""
    if isinstance(label, str):
        try:
            label = json.loads(label)
        except ValueError:
            return []
    if isinstance(label, dict):
        return list(label.get("images") or [])
    return list(label) if isinstance(label, list) else []


def reward_func(queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any], **kwargs: Any) -> dict:
    """OpenRLHF's custom reward function (``--remote_rm_url`` this file): posts the queries, with each row's images
    from its label, to serve_rm.py's ``/get_reward`` at ``$VLRM_REWARD_URL`` (default http://127.0.0.1:8000; key:
    ``$VLRM_API_KEY``). Returns OpenRLHF's ``{"rewards", "scores", "extra_logs"}``."""
    import torch

    images = [_label_images(label) for label in labels]
    # OpenRLHF decodes the query from token ids in which the processor expanded each image to one pad per visual
    # token, while its prompt text has one: the server reads either, but `prompts` must be a prefix of the query.
    queries = [IMAGE_PADS.sub("<|image_pad|>", query) for query in queries]
    prompts = [IMAGE_PADS.sub("<|image_pad|>", prompt) for prompt in prompts]
    aligned = all(query.startswith(prompt) for query, prompt in zip(queries, prompts, strict=True))
    client = RewardServerClient(
        os.environ.get("VLRM_REWARD_URL", "http://127.0.0.1:8000"), os.environ.get("VLRM_API_KEY")
    )
    rewards = torch.tensor(
        client.get_reward(queries, prompts if aligned else None, images if any(images) else None), dtype=torch.float32
    )
    return {"rewards": rewards, "scores": rewards, "extra_logs": {}}
