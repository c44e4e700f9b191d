"""OpenAI-compatible HTTP API over the speculative engine (FastAPI + uvicorn).

Wiring only: state.py holds the runtime, scheduler, cache and one request's life; routes.py the endpoints;
openai_format.py the response shapes; scheduler.py runs every admitted request in a shared batch.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from specserve.cache import ResponseCache, open_cache
from specserve.config import SERVER_MAX_BATCH, SERVER_MAX_QUEUE, ServerConfig
from specserve.runtime import Runtime, open_runtime
from specserve.server.metrics import Metrics
from specserve.server.openai_format import ApiError, error_body
from specserve.server.routes import router
from specserve.server.state import ServerState
from specserve.server.tracing import setup_tracing

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far beyond any prompt the context can hold
log = logging.getLogger("specserve.server")


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, headers=None):
    return JSONResponse(status_code=status, content=error_body(message, kind, param), headers=headers)


def create_app(
    runtime: Runtime | Callable[[], Runtime],
    *,
    max_batch: int = SERVER_MAX_BATCH,
    max_queue: int = SERVER_MAX_QUEUE,
    cache: ResponseCache | None = None,
    cache_url: str | None = None,
    api_key: str | None = None,
    metrics_need_key: bool = False,
) -> FastAPI:
    """`runtime` may be a factory: the server then starts at once and loads the models in the background,
    answering /health with 503 until they are ready. `api_key`: every /v1 route (and /metrics with
    `metrics_need_key`) requires `Authorization: Bearer <api_key>`."""
    metrics = Metrics()
    cache = cache or open_cache(cache_url, on_lookup=metrics.on_cache_lookup)
    state = ServerState(runtime, metrics, cache, max_batch=max_batch, max_queue=max_queue)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state.start()
        yield
        state.stop()

    app = FastAPI(title="specserve", lifespan=lifespan)
    app.state.server = state
    app.include_router(router)

    expected = f"Bearer {api_key}".encode() if api_key else None

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        path = request.url.path
        if expected is None or not (path.startswith("/v1/") or (metrics_need_key and path == "/metrics")):
            return await call_next(request)
        given = request.headers.get("authorization", "").encode()
        if hmac.compare_digest(given, expected):  # constant time: the key is not guessed byte by byte
            return await call_next(request)
        metrics.rejected_keys.inc()
        peer = request.client.host if request.client else "unknown"
        log.warning("refused %s %s from %s: %s API key", request.method, path, peer, "wrong" if given else "no")
        body = error_body("Incorrect or missing API key (send Authorization: Bearer KEY)", code="invalid_api_key")
        return JSONResponse(status_code=401, content=body, headers={"WWW-Authenticate": "Bearer"})

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return _error(413, f"request body of {length} bytes exceeds {MAX_BODY_BYTES} bytes")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind, exc.param, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else "error")

    return app


def serve(config: ServerConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    setup_tracing()
    engine = config.engine
    app = create_app(
        lambda: open_runtime(engine),
        max_batch=config.max_batch,
        max_queue=config.max_queue,
        cache_url=config.cache_url,
        api_key=config.api_key,
        metrics_need_key=config.metrics_need_key,
    )
    print(f"specserve: loading {engine.target} (draft {engine.draft}); serving http://{config.host}:{config.port}/v1")
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
    return 0
