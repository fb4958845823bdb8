"""The batching HTTP reward server that ``serve_rm.py`` runs: ``create_app(scorer, settings, checkpoint_dir)``.

Its parts: settings and the error shape (``settings``), media decoding (``media``), request parsing and limits
(``requests``), micro-batching (``batcher``), and the app itself (this module: routes, body limits, the API key,
``/info``, error handlers).

    POST /score       {"items": [{"prompt", "images", "videos", "response"}, ...], "normalize": bool?}
                      -> {"rewards": [...]}
                      a process checkpoint: items give "steps" (a list) or "response" (split at its step separator)
                      -> {"rewards": [each solution's aggregated score], "steps": [[each step's score], ...]}
    POST /get_reward  OpenRLHF's remote reward shape: {"query": [text, ...], "prompts"?, "images"?} -> {"rewards"}
                      both take "attributes": true for a checkpoint with attribute heads (reward_attributes): the
                      reply adds {"attributes": {name: [...]}}, each attribute's rewards (normalised with "normalize")
                      a joint checkpoint (scoring_mode: joint): both replies add {"joint": [{"chain", "size",
                      "batch"}, ...]}, per item the chain it was judged in, its size (1: alone) and the micro-batch
    GET  /health      {"status": "ok"} (no API key needed, for probes)
    GET  /info        checkpoint, step, normalisation statistics, reward type (outcome | process, with the step
                      separator and aggregation), scoring mode (independent | joint, with the permutations and the
                      group size), limits, video limits and sampling, batching settings, counters

Requests are checked in Starlette's thread pool (JSON, fields, images and videos decoded, tokens counted), then
queued. One asyncio task takes requests off the queue and merges them into micro-batches of at most
``max_batch_size`` items, waiting at most ``max_wait_ms`` after the first one; one thread runs the model, so there are
never two forwards at once. ``RewardScorer.score`` on the merged rows puts rows with equal prompt and media under one
prompt node (a video by its content, however it was sent), so a prompt sent by several concurrent requests (the
completions of one GRPO group) is computed once. With a joint checkpoint the same merged rows are chained: a request
carrying a whole group is judged as one chain (or chains of at most ``joint_group_size``), and items of one prompt
from separate requests are chained when they meet in a micro-batch; the reply's ``joint`` says which were.

Every bad request gets a 4xx JSON ``{"error", "item", "field"}`` naming the item and the field; nothing is ever
truncated, no URL is fetched, no file outside ``image_root`` is read, and no video frame is decoded before the
video's header has passed the limits.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from vlrm.model.checkpoints import checkpoint_step
from vlrm.use.scoring import RewardScorer
from vlrm.use.server.batcher import MicroBatcher
from vlrm.use.server.requests import RequestParser
from vlrm.use.server.settings import NO_REWARD_STATS, PROCESS_NOT_NORMALIZED, RequestError, ServerSettings

logger = logging.getLogger(__name__)


INFO_LIMITS = ("max_items", "max_images", "max_pixels_per_image", "max_body_bytes", "max_drain_bytes",
               "max_pending_items")  # fmt: skip
# In /info's "video" object (beside the video sampling), so that "limits" keeps its shape for existing clients.
INFO_VIDEO_LIMITS = ("max_videos", "max_video_bytes", "max_video_seconds", "max_video_frames", "max_video_pixels")

# How long the rest of a body is read after a reply that went out before it (nginx's lingering_time is 30 s too).
DRAIN_SECONDS = 30.0


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 as soon as it is over ``limit``: a declared Content-Length before anything is read, a
    chunked body as it arrives. Records in ``request.state.body_follows`` whether more of it is still to come."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"body of {declared} bytes, over --max_body_bytes={limit}", status=413)
    chunks, size = [], 0
    while True:  # ASGI messages rather than request.stream(): a refusal must know whether more body follows
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        request.state.body_follows = message.get("more_body", False)
        size += len(chunk)
        if size > limit:
            raise RequestError(f"body over --max_body_bytes={limit}", status=413)
        chunks.append(chunk)
        if not request.state.body_follows:
            return b"".join(chunks)


def _body_follows(request: Request) -> bool:
    """Whether request body bytes are still to come when the reply goes out: the rest of a body refused midway, or
    a whole body never read (a 401, 404 or a declared length over the limit), unless the client asked
    ``Expect: 100-continue``: with nothing received, uvicorn has not told it to go on, so it sends no body."""
    follows = getattr(request.state, "body_follows", None)  # set by _read_body
    if follows is not None:
        return follows
    if request.headers.get("expect", "").lower() == "100-continue":
        return False
    return "transfer-encoding" in request.headers or request.headers.get("content-length", "0") != "0"


class _ReplyBeforeBody(JSONResponse):
    """An error reply sent whole at once while the request body is still coming; then the rest of the body read
    and discarded, at most ``drain_bytes`` within ``DRAIN_SECONDS``, and only then the response ended.

    Why: closing a connection with request bytes unread makes the kernel send a reset, which destroys the reply
    before a client that is still sending has read it; and uvicorn closes as soon as the response ends when the
    request said `Connection: close` (urllib always does, and reads the reply only once its body is out). Reading
    the rest keeps the connection open until the client has sent everything; a client that stops sending on an
    early reply and closes (curl) ends the discarding at once. Past the bounds the connection is closed anyway."""

    def __init__(self, content: dict, status_code: int, drain_bytes: int):
        super().__init__(content, status_code=status_code)
        self.drain_bytes = drain_bytes

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": True})
        discarded = 0
        try:
            async with asyncio.timeout(DRAIN_SECONDS):
                while discarded < self.drain_bytes:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        logger.info("client disconnected after its %d reply (%d body bytes discarded)",
                                    self.status_code, discarded)  # fmt: skip
                        break
                    discarded += len(message.get("body", b""))
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            logger.info("stopped discarding a request body after %.0f s (%d bytes)", DRAIN_SECONDS, discarded)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _error_reply(request: Request, error: RequestError, drain_bytes: int) -> JSONResponse:
    if _body_follows(request):
        content = {"error": error.message, "item": error.item, "field": error.field}
        return _ReplyBeforeBody(content, error.status, drain_bytes)
    return error.response()


def _authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("x-api-key")
    authorization = request.headers.get("authorization", "")
    if given is None and authorization[:7].lower() == "bearer ":
        given = authorization[7:].strip()
    if given is None:
        raise RequestError("missing API key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`", status=401)
    if not hmac.compare_digest(given.encode(), api_key.encode()):  # constant time: no timing hint at the key
        raise RequestError("wrong API key", status=401)


def create_app(scorer: RewardScorer, settings: ServerSettings, checkpoint_dir: str | Path) -> FastAPI:
    """The FastAPI app serving ``scorer``. Raises ValueError when ``settings.normalize`` is set and the checkpoint
    records no reward statistics, or is a process reward model (its scores are probabilities already)."""
    if settings.normalize and scorer.process["reward_type"] == "process":
        raise ValueError(f"{checkpoint_dir}: {PROCESS_NOT_NORMALIZED}: serve without --normalize")
    if settings.normalize and not scorer.can_normalize:
        raise ValueError(f"{checkpoint_dir}: {NO_REWARD_STATS}: serve without --normalize")
    parser = RequestParser(scorer, settings)
    batcher = MicroBatcher(scorer, settings)
    joint = scorer.joint["scoring_mode"] == "joint" and not parser.process  # the config refuses joint with process

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="vlrm reward server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher, app.state.parser = batcher, parser
    _add_error_handlers(app, settings.max_drain_bytes)

    async def rewards_for(request: Request, parse) -> dict:
        _authorize(request, settings.api_key)
        body = await _read_body(request, settings.max_body_bytes)
        # Decoding images and videos must block neither the event loop nor the model thread.
        rows, options = await run_in_threadpool(parse, body)
        batcher.stats.requests += 1
        if joint:  # and which items were judged together (vlrm.use.server.batcher)
            result, chained = await batcher.score(rows, options.normalize, options.attributes, joint=True)
            rewards, named = result if options.attributes else (result, None)
            reply = {"rewards": rewards.tolist(), "joint": chained}
            if named is not None:
                reply["attributes"] = {name: values.tolist() for name, values in named.items()}
            return reply
        if parser.process:  # each solution's score (the checkpoint's aggregation) and its steps' scores
            rewards, steps = await batcher.score(rows, options.normalize)
            return {"rewards": rewards.tolist(), "steps": [values.tolist() for values in steps]}
        if not options.attributes:
            return {"rewards": (await batcher.score(rows, options.normalize)).tolist()}
        rewards, named = await batcher.score(rows, options.normalize, attributes=True)
        return {"rewards": rewards.tolist(), "attributes": {name: values.tolist() for name, values in named.items()}}

    @app.post("/score")
    async def score(request: Request) -> dict:
        return await rewards_for(request, parser.score_request)

    @app.post("/get_reward")
    async def get_reward(request: Request) -> dict:
        return await rewards_for(request, parser.get_reward_request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/info")
    async def info(request: Request) -> dict:
        _authorize(request, settings.api_key)
        return _info(scorer, settings, checkpoint_dir, batcher)

    return app


def _info(scorer: RewardScorer, settings: ServerSettings, checkpoint_dir: str | Path, batcher: MicroBatcher) -> dict:
    normalization = None
    if scorer.reward_mean is not None and scorer.reward_std:
        normalization = {"reward_mean": float(scorer.reward_mean), "reward_std": float(scorer.reward_std)}
    limits = {name: getattr(settings, name) for name in INFO_LIMITS}
    process = scorer.process if scorer.process["reward_type"] == "process" else None
    joint = scorer.joint["scoring_mode"] == "joint"
    return {
        "checkpoint": str(Path(checkpoint_dir).resolve()),
        "step": checkpoint_step(checkpoint_dir),
        "normalization": normalization,
        "normalize_default": settings.normalize,
        "limits": dict(limits, max_seq_length=scorer.max_seq_length, image_root=settings.image_root),
        "video": {
            "limits": {name: getattr(settings, name) for name in INFO_VIDEO_LIMITS},
            "sampling": scorer.encoder.video_settings.identity(),  # how frames are drawn and sized (the checkpoint's)
        },
        "batching": {"max_batch_size": settings.max_batch_size, "max_wait_ms": settings.max_wait_ms},
        "model": {
            "device": str(scorer.device),
            "dtype": str(scorer.model.dtype),
            "packing": scorer.packing,
            "reward_attributes": None if scorer.attribute_names is None else list(scorer.attribute_names),
            # outcome: one reward per response; process: a score per step, the reward their aggregation.
            "reward_type": scorer.process["reward_type"],
            "step_separator": process["step_separator"] if process else None,
            "step_aggregation": process["step_aggregation"] if process else None,
            # independent: each response judged alone; joint: one prompt's responses judged in chains (vlrm.use.joint)
            "scoring_mode": scorer.joint["scoring_mode"],
            "joint_permutations": scorer.joint["joint_permutations"] if joint else None,
            "joint_group_size": scorer.joint["joint_group_size"] if joint else None,
        },
        "api_key_required": settings.api_key is not None,
        "stats": asdict(batcher.stats) | {"pending_items": batcher.pending_items},
    }


def _add_error_handlers(app: FastAPI, drain_bytes: int) -> None:
    """Every error in one JSON shape, ``{"error", "item", "field"}``, 4xx for the client's mistakes; a reply sent
    before the body has all arrived reads the rest of it (``_ReplyBeforeBody``)."""

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        where = "" if error.item is None else f" item {error.item}"
        where += "" if error.field is None else f" field {error.field}"
        logger.info("%s %s -> %d%s: %s", request.method, request.url.path, error.status, where, error.message)
        return _error_reply(request, error, drain_bytes)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:  # 404, 405
        return _error_reply(request, RequestError(str(error.detail), status=error.status_code), drain_bytes)

    @app.exception_handler(ClientDisconnect)
    async def client_disconnected(request: Request, error: ClientDisconnect) -> None:
        # The client went away while sending its body: nobody to answer, and not the server's error. No response is
        # sent (Starlette sends none for None), and uvicorn logs nothing for a disconnected client.
        logger.info("%s %s: client disconnected before its body was complete", request.method, request.url.path)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return RequestError("internal error; see the server log", status=500).response()
