"""The batching HTTP reward server that ``serve_rm.py`` runs: ``create_app(scorer, settings, checkpoint_dir)``.

Its parts: settings and the error shape (``settings``), media decoding (``media``), request parsing and limits
(``requests``), micro-batching (``batcher``), and the app itself (this module: routes, body limits, the API key,
``/info``, error handlers).

    POST /score       {"items": [{"prompt", "images", "response"}, ...], "normalize": bool?} -> {"rewards": [...]}
    POST /get_reward  OpenRLHF's remote reward shape: {"query": [text, ...], "prompts"?, "images"?} -> {"rewards"}
    GET  /health      {"status": "ok"} (no API key needed, for probes)
    GET  /info        checkpoint, step, normalisation statistics, limits, batching settings, counters

Requests are checked in Starlette's thread pool (JSON, fields, images decoded, tokens counted), then queued. One
asyncio task takes requests off the queue and merges them into micro-batches of at most ``max_batch_size`` items,
waiting at most ``max_wait_ms`` after the first one; one thread runs the model, so there are never two forwards at
once. ``RewardScorer.score`` on the merged rows puts rows with equal prompt and images under one prompt node, so a
prompt sent by several concurrent requests (the completions of one GRPO group) is computed once.

Every bad request gets a 4xx JSON ``{"error", "item", "field"}`` naming the item and the field; nothing is ever
truncated, no URL is fetched and no file outside ``image_root`` is read.
"""

from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlrm.model.checkpoints import checkpoint_step
from vlrm.use.scoring import RewardScorer
from vlrm.use.server.batcher import MicroBatcher
from vlrm.use.server.requests import RequestParser
from vlrm.use.server.settings import NO_REWARD_STATS, RequestError, ServerSettings

logger = logging.getLogger(__name__)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"body of {declared} bytes, over --max_body_bytes={limit}", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():  # a chunked body has no Content-Length: count as it arrives
        size += len(chunk)
        if size > limit:
            raise RequestError(f"body over --max_body_bytes={limit}", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


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
    records no reward statistics."""
    if settings.normalize and (scorer.reward_mean is None or not scorer.reward_std):
        raise ValueError(f"{checkpoint_dir}: {NO_REWARD_STATS}: serve without --normalize")
    parser = RequestParser(scorer, settings)
    batcher = MicroBatcher(scorer, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="vlrm reward server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher, app.state.parser = batcher, parser
    _add_error_handlers(app)

    async def rewards_for(request: Request, parse) -> dict:
        _authorize(request, settings.api_key)
        body = await _read_body(request, settings.max_body_bytes)
        rows, normalize = await run_in_threadpool(parse, body)  # decoding images must not block the event loop
        batcher.stats.requests += 1
        return {"rewards": (await batcher.score(rows, normalize)).tolist()}

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
    limits = {
        name: getattr(settings, name)
        for name in ("max_items", "max_images", "max_pixels_per_image", "max_body_bytes", "max_pending_items")
    }
    return {
        "checkpoint": str(Path(checkpoint_dir).resolve()),
        "step": checkpoint_step(checkpoint_dir),
        "normalization": normalization,
        "normalize_default": settings.normalize,
        "limits": dict(limits, max_seq_length=scorer.max_seq_length, image_root=settings.image_root),
        "batching": {"max_batch_size": settings.max_batch_size, "max_wait_ms": settings.max_wait_ms},
        "model": {"device": str(scorer.device), "dtype": str(scorer.model.dtype), "packing": scorer.packing},
        "api_key_required": settings.api_key is not None,
        "stats": asdict(batcher.stats) | {"pending_items": batcher.pending_items},
    }


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in one JSON shape, ``{"error", "item", "field"}``, 4xx for the client's mistakes."""

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        where = "" if error.item is None else f" item {error.item}"
        where += "" if error.field is None else f" field {error.field}"
        logger.info("%s %s -> %d%s: %s", request.method, request.url.path, error.status, where, error.message)
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:  # 404, 405
        return RequestError(str(error.detail), status=error.status_code).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return RequestError("internal error; see the server log", status=500).response()
