"""The HTTP routes: OpenAI's /v1/models, /v1/completions and /v1/chat/completions, llama-server's /tokenize
and /detokenize, plus /health, /metrics, specserve's /v1/specserve/info and the web page (/ and /dashboard,
static/). The Responses API's route is in responses.py, /infill's in infill.py.

Each completion route encodes its prompt, asks the server state for the request's events, and answers
with one JSON body or a stream of Server-Sent Events.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from specserve.server import openai_format as fmt
from specserve.server.http import (
    COMPLETION_RESPONSES,
    chat_prompt,
    collect,
    error_responses,
    ignored_fields_header,
    model_meta,
    server_state,
    with_pings,
)
from specserve.server.infill import infill_ids, prompt_room
from specserve.server.openai_format import ApiError, Finished
from specserve.server.schemas import (
    ChatRequest,
    CompletionParams,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from specserve.server.state import NOT_READY_RETRY_S, Event, ServerState
from specserve.server.tools import StreamSplit

router = APIRouter()
STATIC = Path(__file__).parent / "static"  # the web page (GET / and /dashboard); plain files, no build step


@router.get("/health", responses={503: {"description": "not ready (why in the body)"}})
async def health(request: Request):
    state = server_state(request)
    if state.draining:
        return _not_ready({"status": "draining", "in_flight": state.in_flight})
    if state.runtime is None:
        status = "failed" if state.load_error else "loading"
        return _not_ready({"status": status, "error": state.load_error or state.load_status})
    if (reason := state.runtime.unavailable()) is not None:  # every verifier down: back when one answers
        return _not_ready({"status": "unavailable", "error": reason})
    model = state.model_name(state.runtime)
    return {"status": "ok", "model": model, "in_flight": state.scheduler.in_flight}


def _not_ready(body: dict) -> JSONResponse:
    return JSONResponse(status_code=503, content=body, headers=fmt.retry_after(NOT_READY_RETRY_S))


@router.get("/", include_in_schema=False)
async def chat_page() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@router.get("/dashboard", include_in_schema=False)
async def dashboard_page() -> FileResponse:
    return FileResponse(STATIC / "dashboard.html")


@router.get("/v1/specserve/info", responses=error_responses(401, 503))
async def info(request: Request) -> dict:
    """specserve's extension: the models, backends, methods and limits of this server (the web page's panel)."""
    state = server_state(request)
    return {**state.ready().summary(), "speculation": state.config.speculation}


@router.get("/metrics", responses={200: {"content": {"text/plain": {}}}, **error_responses(401)})
async def metrics(request: Request) -> Response:
    return Response(server_state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models", responses=error_responses(401, 503))
async def models(request: Request) -> dict:
    """Each name the model is served under, with its context (vLLM's `max_model_len`) and llama-server's
    `meta`; without --strict-model-name any other name is answered too, by the same model."""
    state = server_state(request)
    runtime = state.ready()
    meta = model_meta(runtime)
    model = {
        "object": "model",
        "created": state.started,
        "owned_by": "specserve",
        "max_model_len": runtime.n_ctx,
        "weights": runtime.target_weights,
        "meta": meta,
    }
    return {"object": "list", "data": [{"id": name, **model} for name in state.model_names(runtime)]}


@router.post("/tokenize", responses=error_responses(400, 401, 503))
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    """llama-server's: the prompt's token ids, with `with_pieces` each one's text (its bytes as a list where
    they are not whole UTF-8 characters)."""
    tokenizer = server_state(request).ready().tokenizer
    tokens = tokenizer.encode(body.content, body.parse_special, add_special=body.add_special)
    if not body.with_pieces:
        return {"tokens": tokens}
    return {
        "tokens": [{"id": token, "piece": _piece(tokenizer.decode_bytes([token], special=True))} for token in tokens]
    }


def _piece(raw: bytes) -> str | list[int]:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


@router.post("/detokenize", responses=error_responses(400, 401, 503))
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    """llama-server's: the text of token ids (control tokens as their text)."""
    tokenizer = server_state(request).ready().tokenizer
    if bad := [token for token in body.tokens if not 0 <= token < tokenizer.n_vocab]:
        raise ApiError(400, f"tokens outside the vocabulary of {tokenizer.n_vocab}: {bad[:5]}", "tokens")
    return {"content": tokenizer.decode_bytes(body.tokens, special=True).decode("utf-8", errors="replace")}


@router.post("/v1/completions", responses=COMPLETION_RESPONSES)
async def completions(body: CompletionRequest, request: Request):
    state = server_state(request)
    runtime = state.ready()
    if body.suffix is None:
        ids = runtime.encode_prompt(prompt=body.prompt)
    else:  # fill in the middle between the prompt and the suffix
        room = prompt_room(runtime.n_ctx, body.max_tokens)
        ids = infill_ids(runtime.tokenizer, prefix=body.prompt, suffix=body.suffix, room=room)
    return await _answer(state, request, body, ids)


@router.post("/v1/chat/completions", responses=COMPLETION_RESPONSES)
async def chat_completions(body: ChatRequest, request: Request):
    state = server_state(request)
    if body.max_completion_tokens is not None:
        body.max_tokens = body.max_completion_tokens
    return await _answer(state, request, body, chat_prompt(state.ready(), body))


async def _answer(state: ServerState, request: Request, body: CompletionParams, ids: list[int]):
    """The reply: one choice, or with `n` several, choice i being the reply to the same request with seed
    + i (decoded together, as concurrent requests are, after the first prefilled the prompt for all)."""
    chat = isinstance(body, ChatRequest)
    choices = [body]
    if body.n > 1:
        choices = [
            body.model_copy(update={"seed": None if body.seed is None else body.seed + i}) for i in range(body.n)
        ]
    endpoint = "chat" if chat else "completions"
    streams = [await state.events(endpoint, request, choices[0], ids)]
    if len(choices) > 1:  # the others start once the first has prefilled: they copy its KV (engine/prefix.py)
        streams[0] = await _after_first_event(streams[0])
        streams += [await state.events(endpoint, request, choice, ids) for choice in choices[1:]]
    runtime = state.ready()
    token_bytes = None
    if body.logprob_count() is not None:
        token_bytes = runtime.tokenizer.token_bytes
    head = fmt.response_head(chat, state.model_name(runtime))
    replies = [
        fmt.ReplyFormat(head=head, chat=chat, token_bytes=token_bytes, tools=body.may_call_tools, index=i)
        for i in range(len(choices))
    ]
    headers = ignored_fields_header(body.ignored_fields)
    if body.stream:
        headers["Cache-Control"] = "no-cache"
        stream = _merged([_sse(reply, events) for reply, events in zip(replies, streams, strict=True)])
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
    try:
        async with asyncio.TaskGroup() as group:  # one failing choice cancels the others
            tasks = [group.create_task(collect(events)) for events in streams]
    except* ApiError as failed:  # the group's error as the route's own (a JSON body, not a bare 500)
        raise failed.exceptions[0] from None
    bodies = [fmt.completion(reply, *task.result()) for reply, task in zip(replies, tasks, strict=True)]
    return JSONResponse(fmt.merged_choices(bodies), headers=headers)


async def _after_first_event(events: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """The same events, once the first has come (the prompt is prefilled by then)."""
    try:
        first = await anext(events)
    except StopAsyncIteration:  # the client left
        raise ApiError(499, "client closed the request") from None

    async def chained() -> AsyncIterator[Event]:
        yield first
        async with aclosing(events):
            async for event in events:
                yield event

    return chained()


async def _sse(reply: fmt.ReplyFormat, events: AsyncIterator[Event]) -> AsyncIterator[str]:
    """One choice's chunks, with a ping while none comes (a long prompt prefilling). A reply that may hold
    tool calls streams its text until one begins; the calls come last."""
    calls = StreamSplit() if reply.tools else None
    if reply.chat:
        yield fmt.sse_chunk(reply, None)
    offset = 0  # where the next piece starts in the text (completions' text_offset)
    try:
        async with aclosing(with_pings(events)) as paced:  # a client that disconnects cancels the job
            async for event in paced:
                if event is None:  # an SSE comment, which clients skip: the connection is alive
                    yield ": ping\n\n"
                    continue
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


async def _merged(choices: list[AsyncIterator[str]]) -> AsyncIterator[str]:
    """The choices' chunks as they come, then `[DONE]`; a client that leaves closes every choice."""
    if len(choices) == 1:
        async with aclosing(choices[0]) as only:
            async for chunk in only:
                yield chunk
        yield fmt.SSE_DONE
        return
    # Bounded, so that a client that stops reading stops the pumps too, and its jobs' unread steps pile up
    # where the scheduler sees them (`--stream-buffer`), as with one choice.
    queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=len(choices))

    async def pump(choice: AsyncIterator[str]) -> None:
        async with aclosing(choice):
            async for chunk in choice:
                await queue.put(chunk)
        await queue.put(None)

    tasks = [asyncio.create_task(pump(choice)) for choice in choices]
    try:
        running = len(tasks)
        while running:
            if (chunk := await queue.get()) is None:
                running -= 1
            else:
                yield chunk
        yield fmt.SSE_DONE
    finally:
        for task in tasks:
            task.cancel()
