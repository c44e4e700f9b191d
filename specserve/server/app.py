"""OpenAI-compatible HTTP API over the speculative engine (FastAPI + uvicorn).

Requests become `Generation`s that the scheduler (server/scheduler.py) runs in a shared batch; this module
validates input, answers deterministic repeats from the response cache, streams Server-Sent Events in
OpenAI's chunk format, and exports metrics and traces.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import trace
from starlette.exceptions import HTTPException as StarletteHTTPException

from specserve import SpecserveError
from specserve.cache import CachedResponse, ResponseCache, cache_key, open_cache
from specserve.config import SERVER_MAX_BATCH, SERVER_MAX_QUEUE, ServerConfig
from specserve.engine.model import ContextOverflowError
from specserve.runtime import Runtime, open_runtime
from specserve.server.metrics import Metrics
from specserve.server.scheduler import Job, QueueFull, Scheduler
from specserve.server.schemas import ChatRequest, CompletionParams, CompletionRequest
from specserve.server.tracing import setup_tracing

log = logging.getLogger("specserve.server")
MAX_BODY_BYTES = 1 << 20  # 1 MiB: far beyond any prompt the context can hold
_DISCONNECT_POLL_S = 0.5


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers: dict[str, str] = {}


def _error_response(
    status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, headers=None
):
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(status_code=status, content=body, headers=headers)


def create_app(
    runtime: Runtime | Callable[[], Runtime],
    *,
    max_batch: int = SERVER_MAX_BATCH,
    max_queue: int = SERVER_MAX_QUEUE,
    cache: ResponseCache | None = None,
    cache_url: str | None = None,
) -> FastAPI:
    """`runtime` may be a factory: the server then starts at once and loads the models in the background,
    answering /health with 503 until they are ready."""
    metrics = Metrics()
    cache = cache or open_cache(cache_url, on_lookup=metrics.on_cache_lookup)
    tracer = trace.get_tracer("specserve")
    state: dict = {"runtime": runtime if isinstance(runtime, Runtime) else None, "load_error": None}

    def load() -> None:
        try:
            state["runtime"] = runtime()
        except Exception as exc:  # reported by /health; the process stays up to say why
            log.exception("loading the models failed")
            state["load_error"] = str(exc)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        def refresh_costs() -> None:  # on the scheduler thread, between steps
            if state["runtime"] is not None:
                state["runtime"].refresh_costs()

        scheduler = Scheduler(metrics, max_batch=max_batch, max_queue=max_queue, between_steps=refresh_costs)
        state["scheduler"] = scheduler
        if state["runtime"] is None:
            threading.Thread(target=load, name="specserve-load", daemon=True).start()
        yield
        scheduler.stop()
        cache.close()

    app = FastAPI(title="specserve", lifespan=lifespan)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return _error_response(413, f"request body of {length} bytes exceeds {MAX_BODY_BYTES} bytes")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.kind, exc.param, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else "error")

    def ready() -> Runtime:
        if state["runtime"] is None:
            raise ApiError(503, state["load_error"] or "the models are still loading", kind="service_unavailable")
        return state["runtime"]

    @app.get("/health")
    async def health():
        rt = state["runtime"]
        if rt is None:
            status = "failed" if state["load_error"] else "loading"
            return JSONResponse(status_code=503, content={"status": status, "error": state["load_error"]})
        scheduler: Scheduler = state["scheduler"]
        return {"status": "ok", "model": rt.target_name, "in_flight": scheduler.in_flight}

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        rt = ready()
        return {"object": "list", "data": [{"id": rt.target_name, "object": "model", "owned_by": "specserve"}]}

    def check(rt: Runtime, body: CompletionParams, ids: list[int]) -> None:
        if body.model not in (None, rt.target_name):
            raise ApiError(404, f"model {body.model!r} does not exist; this server has {rt.target_name!r}", "model")
        if body.n != 1:
            raise ApiError(400, "only n=1 is supported", "n")
        n_ctx = rt.n_ctx
        if len(ids) >= n_ctx:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the context holds {n_ctx}", "prompt")
        if len(ids) + body.max_tokens > n_ctx:
            raise ApiError(
                400,
                f"prompt ({len(ids)} tokens) + max_tokens ({body.max_tokens}) exceeds the context of {n_ctx} tokens",
                "max_tokens",
            )

    async def run(endpoint: str, request: Request, body: CompletionParams, ids: list[int], chat: bool):
        rt = ready()
        check(rt, body, ids)
        sampling = body.sampling()
        key = None
        if sampling.greedy:  # deterministic: the same request gives the same text, whatever the drafter
            key_fields = body.model_dump(include=_KEY_FIELDS)
            if body.speculation.acceptance != "exact":  # lossy verification changes the text: part of the key
                key_fields["speculation"] = body.speculation.model_dump()
            key = cache_key(rt.target_name, ids, {"endpoint": endpoint, **key_fields})
            if (hit := await asyncio.to_thread(cache.get, key)) is not None:
                metrics.requests.labels(endpoint=endpoint, status="200").inc()
                return _reply(rt, chat, body, _replay(hit), cached=True)
        method = body.speculation.method
        if method not in rt.methods:
            method = "ngram"  # no draft model loaded: fall back to the model-free drafter
        try:
            tolerance = body.speculation.tolerance()
            generation = rt.generate(ids, sampling, method=method, k=body.speculation.k, tolerance=tolerance)
        except (ContextOverflowError, SpecserveError, ValueError) as exc:
            raise ApiError(400, str(exc)) from None
        span = tracer.start_span(
            "specserve.request",
            attributes={
                "specserve.endpoint": endpoint,
                "specserve.method": method,
                "specserve.prompt_tokens": len(ids),
            },
        )
        try:
            job = state["scheduler"].submit(generation, span)
        except QueueFull as exc:
            span.end()
            metrics.requests.labels(endpoint=endpoint, status="429").inc()
            error = ApiError(429, f"server busy: {exc}; retry shortly", kind="rate_limit_error")
            error.headers["Retry-After"] = "1"
            raise error from None
        return _reply(rt, chat, body, _follow(job, request, key, endpoint), cached=False)

    async def _follow(job: Job, request: Request, key: str | None, endpoint: str) -> AsyncIterator[dict]:
        """Events of a running job: {"text": ...} pieces, then {"done": generation}. Cancels it if the
        client goes away; caches the result when it completed."""
        pieces: list[str] = []
        status = "499"
        try:
            while True:
                try:
                    item = await asyncio.wait_for(job.events.get(), _DISCONNECT_POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if isinstance(item, BaseException):
                    status = "500"
                    raise ApiError(500, f"generation failed: {item}", kind="server_error")
                if item is None:
                    break
                for emitted in item:
                    if emitted.text:
                        pieces.append(emitted.text)
                        yield {"text": emitted.text}
            g = job.generation
            status = "200"
            stats = _speculative(g.stats)
            metrics.prefix_reused.inc(g.stats.prefix_reused)
            log.info(json.dumps({"event": "request", "endpoint": endpoint, "finish": g.finish_reason, **_log_stats(g)}))
            if key is not None:
                done = CachedResponse(pieces, g.finish_reason, g.stats.prompt_tokens, g.stats.generated, stats)
                await asyncio.to_thread(cache.put, key, done)
            yield {"done": (g.finish_reason, g.stats.prompt_tokens, g.stats.generated, stats)}
        finally:
            if status != "200":
                state["scheduler"].cancel(job)
            metrics.requests.labels(endpoint=endpoint, status=status).inc()
            job.span.set_attribute("specserve.status", status)
            job.span.set_attribute("specserve.completion_tokens", job.generation.stats.generated)
            job.span.set_attribute("specserve.accepted", job.generation.stats.accepted)
            job.span.end()

    async def _replay(hit: CachedResponse) -> AsyncIterator[dict]:
        for piece in hit.pieces:
            yield {"text": piece}
        yield {
            "done": (hit.finish_reason, hit.prompt_tokens, hit.completion_tokens, {**hit.spec_stats, "cached": True})
        }

    def _reply(rt: Runtime, chat: bool, body: CompletionParams, events: AsyncIterator[dict], cached: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = {"id": rid, "created": int(time.time()), "model": rt.target_name}

        def choice(text: str, finish: str | None, delta: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            message = {"content": text} if delta else {"role": "assistant", "content": text}
            return {
                "index": 0,
                ("delta" if delta else "message"): message if text or not delta else {},
                "finish_reason": finish,
            }

        def usage(prompt_tokens: int, completion_tokens: int) -> dict:
            total = prompt_tokens + completion_tokens
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}

        if not body.stream:

            async def collect() -> dict:
                text = []
                async with aclosing(events):  # leaving early closes it, which cancels the job
                    async for event in events:
                        if "text" in event:
                            text.append(event["text"])
                            continue
                        finish, prompt_tokens, completion_tokens, stats = event["done"]
                        return {
                            **head,
                            "object": "chat.completion" if chat else "text_completion",
                            "choices": [choice("".join(text), finish, delta=False)],
                            "usage": usage(prompt_tokens, completion_tokens),
                            "speculative": stats,
                        }
                raise ApiError(499, "client closed the request")

            return collect()

        chunk_head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def sse(choices: list[dict], **extra) -> str:
            return f"data: {json.dumps({**chunk_head, 'choices': choices, **extra})}\n\n"

        async def stream() -> AsyncIterator[str]:
            if chat:
                yield sse([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            try:
                async with aclosing(events):  # a client that disconnects cancels the job
                    async for event in events:
                        if "text" in event:
                            yield sse([choice(event["text"], None, True)])
                            continue
                        finish, prompt_tokens, completion_tokens, stats = event["done"]
                        extra = {"usage": usage(prompt_tokens, completion_tokens), "speculative": stats}
                        yield sse([choice("", finish, True)], **extra)
            except ApiError as exc:  # headers are gone: report in-band, the way OpenAI streams do
                yield f"data: {json.dumps({'error': {'message': exc.message, 'type': exc.kind}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        ids = ready().encode_prompt(prompt=body.prompt)
        result = await run("completions", request, body, ids, chat=False)
        return await result if asyncio.iscoroutine(result) else result

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        try:
            ids = ready().encode_prompt(messages=[m.model_dump() for m in body.messages])
        except SpecserveError as exc:
            raise ApiError(400, str(exc), "messages") from None
        result = await run("chat", request, body, ids, chat=True)
        return await result if asyncio.iscoroutine(result) else result

    return app


# Request fields that change a deterministic response (the drafter does not: output is the target's).
_KEY_FIELDS = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop"}


def _speculative(stats) -> dict:
    return {"drafted": stats.drafted, "accepted": stats.accepted, "acceptance_rate": round(stats.acceptance_rate, 4)}


def _log_stats(generation) -> dict:
    s = generation.stats
    return {
        "prompt_tokens": s.prompt_tokens,
        "prefix_reused": s.prefix_reused,
        "completion_tokens": s.generated,
        "drafted": s.drafted,
        "accepted": s.accepted,
        "tokens_per_s": round(s.tokens_per_s, 2),
        "prefill_ms": round(s.prefill_s * 1000, 1),
        "total_ms": round(s.total_s * 1000, 1),
    }


def serve(config: ServerConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    setup_tracing()
    engine = config.engine
    app = create_app(
        lambda: open_runtime(engine),
        max_batch=config.max_batch,
        max_queue=config.max_queue,
        cache_url=config.cache_url,
    )
    print(f"specserve: loading {engine.target} (draft {engine.draft}); serving http://{config.host}:{config.port}/v1")
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
    return 0
