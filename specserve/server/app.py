"""OpenAI-compatible HTTP API over the speculative engine (FastAPI + uvicorn).

Wiring only: state.py holds the runtime, scheduler, cache and one request's life; routes.py the endpoints;
openai_format.py the response shapes; scheduler.py runs every admitted request in a shared batch.
"""

from __future__ import annotations

import functools
import hmac
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from types import FrameType

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from specserve import __version__
from specserve.config import ServerConfig
from specserve.runtime import Runtime, open_runtime
from specserve.server import anthropic, infill, ollama, responses
from specserve.server.http import IGNORED_FIELDS_HEADER
from specserve.server.metrics import Metrics
from specserve.server.openai_format import ApiError, error_body
from specserve.server.response_cache import ResponseCache, open_cache
from specserve.server.routes import STATIC, router
from specserve.server.state import ServerState
from specserve.tracing import setup_tracing

# With --api-key every other route needs the key: whatever runs or reveals the model (/v1/*, /infill,
# /tokenize, /detokenize, /api/*). These only say the server is up, or serve the web page's files and the API
# description; /metrics too unless `metrics_need_key`.
OPEN_PATHS = frozenset({"/health", "/", "/dashboard", "/metrics", "/openapi.json", "/docs", "/redoc"})
MAX_BODY_BYTES = 1 << 20  # 1 MiB: far beyond any prompt the context can hold
log = logging.getLogger("specserve.server")


def _error(
    request: Request,
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    headers: dict[str, str] | None = None,
    code: str | None = None,
) -> JSONResponse:
    """An error in the shape the route's clients parse: Anthropic's on its Messages API, Ollama's on its
    API, else OpenAI's."""
    if request.url.path.startswith(anthropic.PATH):
        body = anthropic.error_body(status, message)
    elif request.url.path.startswith(ollama.PATH):
        body = ollama.error_body(message)
    else:
        body = error_body(message, kind, param, code)
    return JSONResponse(status_code=status, content=body, headers=headers)


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema without its 422 responses: a request that fails validation gets a 400 here, with
    OpenAI's error body (the handler in `create_app`), as the routes document."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=__version__, routes=app.routes)
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(
    runtime: Runtime | Callable[[Callable[[str], None]], Runtime],
    config: ServerConfig | None = None,
    cache: ResponseCache | None = None,
) -> FastAPI:
    """`runtime` may be a factory: the server then starts at once and loads the models in the background,
    answering /health with 503 until they are ready (the factory gets a function to say why it waits).
    `config` holds the server's limits (its `engine` is what the runtime was built from); `cache` replaces
    the one `config.cache_url` names (the defaults without a config)."""
    config = config or ServerConfig()
    metrics = Metrics()
    cache = cache or open_cache(config.cache_url, on_lookup=metrics.on_cache_lookup)
    state = ServerState(runtime, metrics, cache, config)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        logging.getLogger().addHandler(metrics.error_log)
        state.start()
        yield
        state.stop()
        logging.getLogger().removeHandler(metrics.error_log)

    app = FastAPI(title="specserve", lifespan=lifespan)
    app.openapi = functools.partial(_openapi, app)
    app.state.server = state
    app.include_router(router)
    app.include_router(responses.router)
    app.include_router(infill.router)
    app.include_router(anthropic.router)
    app.include_router(ollama.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    key = config.api_key.encode() if config.api_key else None
    open_paths = OPEN_PATHS - ({"/metrics"} if config.metrics_need_key else set())

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        path = request.url.path
        if key is None or path in open_paths or path.startswith("/static/"):
            return await call_next(request)
        # OpenAI's clients send `Authorization: Bearer KEY`, Anthropic's `x-api-key: KEY`
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ").encode()
        given = request.headers.get("x-api-key", "").encode() or bearer
        if hmac.compare_digest(given, key):  # constant time: the key is not guessed byte by byte
            return await call_next(request)
        metrics.rejected_keys.inc()
        peer = request.client.host if request.client else "unknown"
        log.warning("refused %s %s from %s: %s API key", request.method, path, peer, "wrong" if given else "no")
        message = "Incorrect or missing API key (send Authorization: Bearer KEY, or x-api-key: KEY)"
        return _error(request, 401, message, headers={"WWW-Authenticate": "Bearer"}, code="invalid_api_key")

    @app.middleware("http")
    async def json_bodies(request: Request, call_next):
        """Every body here is JSON, whatever its content type says: `curl -d '{...}'`, as Ollama's and
        llama-server's documentation write their examples, labels it a form."""
        if request.method == "POST" and "json" not in request.headers.get("content-type", ""):
            headers = [(name, value) for name, value in request.scope["headers"] if name != b"content-type"]
            request.scope["headers"] = [*headers, (b"content-type", b"application/json")]
        return await call_next(request)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return _error(request, 413, f"request body of {length} bytes exceeds {MAX_BODY_BYTES} bytes")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error(request, 400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(request, exc.status, exc.message, exc.kind, exc.param, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(request, exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else "error")

    if config.cors_origins:  # added last, so outermost: preflights are answered before the key is asked for
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["Retry-After", IGNORED_FIELDS_HEADER],
        )
    return app


SEND_BUFFER_BYTES = 64 * 1024  # per connection; the kernel doubles it for its bookkeeping


class _DrainingServer(uvicorn.Server):
    """uvicorn, where SIGTERM first drains: new requests get 503, running ones may finish for `grace`
    seconds; then uvicorn's own shutdown cancels what is left (a cancelled request is never cached)."""

    def __init__(self, config: uvicorn.Config, state: ServerState, grace_s: float):
        super().__init__(config)
        self.state, self.grace_s = state, grace_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self.state.draining:  # Ctrl-C, or a second SIGTERM: at once
            return super().handle_exit(sig, frame)
        self.state.draining = True
        log.info("SIGTERM: no new requests; %d running may finish within %g s", self.state.in_flight, self.grace_s)
        threading.Thread(target=self._drain, name="specserve-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.grace_s
        while self.state.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        # Not super().handle_exit: uvicorn would raise the captured SIGTERM again at the end (exit 143, not 0).
        self.should_exit = True


def serve(config: ServerConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    setup_tracing()
    engine = config.engine
    app = create_app(lambda on_wait: open_runtime(engine, on_wait=on_wait), config)
    print(f"specserve: loading {engine.target} (draft {engine.draft}); serving http://{config.host}:{config.port}/v1")
    # What the drain leaves running gets a second to end its response before uvicorn cancels it.
    options = uvicorn.Config(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=1)
    listener = options.bind_socket()
    # Connections inherit this from the listener, and it turns the kernel's send-buffer autotuning (up to
    # 4 MiB a connection) off: a client that stops reading then holds up its stream after a few hundred KB
    # rather than after its whole reply, so the scheduler's stream buffer (`--stream-buffer`) sees it and
    # cancels it. A stream needs ~10 KB/s.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    state: ServerState = app.state.server
    server = _DrainingServer(options, state, config.shutdown_grace_s)
    state.on_load_failure = functools.partial(setattr, server, "should_exit", True)
    server.run(sockets=[listener])
    if state.load_error is not None and not config.stay_up_on_failure:
        print(f"specserve: error: loading the models failed: {state.load_error}", file=sys.stderr)
        return 1
    return 0
