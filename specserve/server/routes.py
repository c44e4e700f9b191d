"""The HTTP routes: OpenAI's /v1/models, /v1/completions and /v1/chat/completions, plus /health, /metrics,
specserve's /v1/specserve/info and the web page (/ and /dashboard, static/).

Each completion route encodes its prompt, asks the server state for the request's events, and answers
with one JSON body or a stream of Server-Sent Events.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from specserve import SpecserveError
from specserve.server import openai_format as fmt
from specserve.server.openai_format import ApiError, Finished
from specserve.server.schemas import ChatRequest, CompletionParams, CompletionRequest, ErrorResponse
from specserve.server.state import NOT_READY_RETRY_S, Event, ServerState
from specserve.server.tools import StreamSplit

router = APIRouter()


def _errors(*statuses: int) -> dict:
    """The OpenAPI entries of the errors a route answers with (schemathesis holds the server to them)."""
    return {status: {"model": ErrorResponse, "description": ERRORS[status]} for status in statuses}


ERRORS = {
    400: "malformed or unsatisfiable request",
    401: "missing or wrong API key (with --api-key)",
    404: "unknown model",
    413: "request body too large",
    429: "queue full; retry after Retry-After seconds",
    499: "the client closed the request",
    500: "the generation failed",
    503: "models loading, no verifier reachable, or shutting down; retry after Retry-After seconds",
}
# A completion is one JSON body, or with `stream: true` a stream of server-sent events.
_COMPLETION = {
    200: {"content": {"application/json": {}, "text/event-stream": {}}, "description": "the completion"},
    **_errors(400, 401, 404, 413, 429, 499, 500, 503),
}
STATIC = Path(__file__).parent / "static"  # the web page (GET / and /dashboard); plain files, no build step


def _state(request: Request) -> ServerState:
    return request.app.state.server


@router.get("/health", responses={503: {"description": "not ready (why in the body)"}})
async def health(request: Request):
    state = _state(request)
    if state.draining:
        return _not_ready({"status": "draining", "in_flight": state.in_flight})
    if state.runtime is None:
        status = "failed" if state.load_error else "loading"
        return _not_ready({"status": status, "error": state.load_error or state.load_status})
    if (reason := state.runtime.unavailable()) is not None:  # every verifier down: back when one answers
        return _not_ready({"status": "unavailable", "error": reason})
    return {"status": "ok", "model": state.runtime.target_name, "in_flight": state.scheduler.in_flight}


def _not_ready(body: dict) -> JSONResponse:
    return JSONResponse(status_code=503, content=body, headers=fmt.retry_after(NOT_READY_RETRY_S))


@router.get("/", include_in_schema=False)
async def chat_page() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@router.get("/dashboard", include_in_schema=False)
async def dashboard_page() -> FileResponse:
    return FileResponse(STATIC / "dashboard.html")


@router.get("/v1/specserve/info", responses=_errors(401, 503))
async def info(request: Request) -> dict:
    """specserve's extension: the models, backends, methods and limits of this server (the web page's panel)."""
    state = _state(request)
    return {**state.ready().summary(), "speculation": state.config.speculation}


@router.get("/metrics", responses={200: {"content": {"text/plain": {}}}, **_errors(401)})
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models", responses=_errors(401, 503))
async def models(request: Request) -> dict:
    name = _state(request).ready().target_name
    return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "specserve"}]}


@router.post("/v1/completions", responses=_COMPLETION)
async def completions(body: CompletionRequest, request: Request):
    state = _state(request)
    ids = state.ready().encode_prompt(prompt=body.prompt)
    return await _answer(state, request, body, ids)


@router.post("/v1/chat/completions", responses=_COMPLETION)
async def chat_completions(body: ChatRequest, request: Request):
    state = _state(request)
    if body.max_completion_tokens is not None:
        body.max_tokens = body.max_completion_tokens
    try:
        messages = [m.rendered() for m in body.messages]
        ids = state.ready().encode_prompt(messages=messages, tools=body.offered_tools)
    except (SpecserveError, ValueError) as exc:
        raise ApiError(400, str(exc), "messages") from None
    return await _answer(state, request, body, ids)


async def _answer(state: ServerState, request: Request, body: CompletionParams, ids: list[int]):
    chat = isinstance(body, ChatRequest)
    events = await state.events("chat" if chat else "completions", request, body, ids)
    runtime = state.ready()
    token_bytes = None
    if body.logprob_count() is not None:
        token_bytes = functools.partial(_token_bytes, runtime)
    reply = fmt.ReplyFormat(
        head=fmt.response_head(chat, runtime.target_name),
        chat=chat,
        token_bytes=token_bytes,
        tools=chat and body.offered_tools is not None,  # the reply may call them
    )
    if body.stream:
        stream = _sse(reply, events)
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    pieces = []
    async with aclosing(events):  # leaving early closes it, which cancels the job
        async for event in events:
            if isinstance(event, Finished):
                return fmt.completion(reply, pieces, event)
            pieces.append(event)
    raise ApiError(499, "client closed the request")


def _token_bytes(runtime, token: int) -> bytes:
    return runtime.tokenizer.decode_bytes([token])


async def _sse(reply: fmt.ReplyFormat, events: AsyncIterator[Event]) -> AsyncIterator[str]:
    """A reply that may hold tool calls streams its text until one begins; the calls come last."""
    calls = StreamSplit() if reply.tools else None
    if reply.chat:
        yield fmt.sse_chunk(reply, None)
    offset = 0  # where the next piece starts in the text (completions' text_offset)
    try:
        async with aclosing(events):  # a client that disconnects cancels the job
            async for event in events:
                if calls is not None and isinstance(event, Finished):
                    rest, tool_calls = calls.finish()
                    if rest:
                        yield fmt.sse_chunk(reply, fmt.Piece(rest))
                    yield fmt.sse_chunk(reply, event, tool_calls=tool_calls)
                    continue
                if calls is not None:
                    event = dataclasses.replace(event, text=calls.push(event.text))
                yield fmt.sse_chunk(reply, event, offset)
                offset += len(event.text) if isinstance(event, fmt.Piece) else 0
    except ApiError as exc:  # the headers are gone: report in-band
        yield fmt.sse_error(exc)
    yield fmt.SSE_DONE
