"""What every route shares: the error statuses it documents (schemathesis holds the server to them), the
server state of a request, the model's metadata, the header naming a request's fields the server did not
know, and the pings of a quiet stream."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import TypeVar

from fastapi import Request, Response
from pydantic import BaseModel, ValidationError

from specserve import SpecserveError
from specserve.runtime import Runtime
from specserve.server.openai_format import ApiError, Finished, Piece
from specserve.server.schemas import ChatRequest, ErrorResponse
from specserve.server.state import Event, ServerState

log = logging.getLogger("specserve.server")
T = TypeVar("T")
IGNORED_FIELDS_HEADER = "X-Specserve-Ignored-Fields"  # the request's fields the server did not know
# A stream quiet this long (a long prompt prefilling on a CPU) gets a ping, so that clients with read time-outs
# wait (llama-server's SSE pings, Anthropic's `ping` events).
PING_EVERY_S = 10.0

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


def error_responses(*statuses: int, body: type[BaseModel] = ErrorResponse) -> dict:
    """The OpenAPI entries of the errors a route answers with (`body`: their shape)."""
    return {status: {"model": body, "description": ERRORS[status]} for status in statuses}


COMPLETION_ERRORS = (400, 401, 404, 413, 429, 499, 500, 503)
# A completion is one JSON body, or with `stream: true` a stream of server-sent events.
COMPLETION_RESPONSES = {
    200: {"content": {"application/json": {}, "text/event-stream": {}}, "description": "the completion"},
    **error_responses(*COMPLETION_ERRORS),
}


def json_response(body: dict, headers: dict[str, str]) -> Response:
    """A JSON body that echoes request text safely: ASCII-escaped, so a lone surrogate a client sent (valid
    JSON, not UTF-8) cannot fail the reply."""
    return Response(json.dumps(body), media_type="application/json", headers=headers)


def model_meta(runtime: Runtime) -> dict:
    """llama-server's `meta` of /v1/models, from the GGUF's metadata: the architecture, the context it was
    trained for and the one served, the vocabulary, the width, the size label and the file's bytes."""
    tokenizer = runtime.tokenizer
    meta = tokenizer.metadata
    arch = meta.get("general.architecture", "")
    trained, width = (meta.get(f"{arch}.{key}") for key in ("context_length", "embedding_length"))
    return {
        "arch": arch,
        "n_vocab": tokenizer.n_vocab,
        "n_ctx_train": int(trained) if trained else None,
        "n_ctx": runtime.n_ctx,
        "n_embd": int(width) if width else None,
        "params": meta.get("general.size_label"),
        "size": tokenizer.path.stat().st_size,
        "file": runtime.target_name,
    }


def converted(make: Callable[[], T], *, param: str) -> T:
    """The request another protocol's body converts into (a ChatRequest, ...), or a 400 naming the field that
    made it invalid (`param` where none is named)."""
    try:
        return make()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or param
        raise ApiError(400, f"{where}: {first.get('msg', 'invalid request')}", where) from None
    except ValueError as exc:
        raise ApiError(400, str(exc), param) from None


def chat_prompt(runtime: Runtime, chat: ChatRequest, *, param: str = "messages") -> list[int]:
    """The chat's prompt tokens (its messages and tools in the chat template), or a 400 naming `param` when
    the template refuses them."""
    try:
        return runtime.encode_prompt(messages=[m.rendered() for m in chat.messages], tools=chat.offered_tools)
    except (SpecserveError, ValueError) as exc:
        raise ApiError(400, str(exc), param) from None


def server_state(request: Request) -> ServerState:
    return request.app.state.server


_logged_fields: set[str] = set()
_logged_lock = threading.Lock()


def ignored_fields_header(fields: list[str]) -> dict[str, str]:
    """The response header naming the request's unknown fields; each name is logged once per process. Names
    are written as JSON string contents (ASCII; commas and spaces escaped), since a header takes no other bytes."""
    if not fields:
        return {}
    escapes = {",": "\\u002c", "\x7f": "\\u007f", " ": "\\u0020"}  # a value may not end in a space (h11)
    names = [json.dumps(name)[1:-1].translate(str.maketrans(escapes)) for name in fields]
    with _logged_lock:
        new = [name for name in names if name not in _logged_fields]
        _logged_fields.update(new)
    if new:
        log.warning("ignoring request fields this server does not know: %s", ", ".join(new))
    return {IGNORED_FIELDS_HEADER: ", ".join(names)}


async def collect(events: AsyncIterator[Event]) -> tuple[list[Piece], Finished]:
    """A whole reply's pieces and its end; leaving early (an error, a client gone) cancels the job."""
    pieces = []
    async with aclosing(events):
        async for event in events:
            if isinstance(event, Finished):
                return pieces, event
            pieces.append(event)
    raise ApiError(499, "client closed the request")


async def with_pings(events: AsyncIterator[Event], every_s: float = PING_EVERY_S) -> AsyncIterator[Event | None]:
    """The events, with None whenever none came for `every_s` seconds (the next one is still awaited)."""

    async def next_event() -> Event | None:
        return await anext(events, None)

    async with aclosing(events):
        pending: asyncio.Future | None = None
        try:
            while True:
                pending = asyncio.ensure_future(next_event())
                while not (await asyncio.wait({pending}, timeout=every_s))[0]:
                    yield None
                if (event := pending.result()) is None:
                    return
                yield event
        finally:  # left early: the events are closed once nothing awaits them
            if pending is not None and not pending.done():
                pending.cancel()
                await asyncio.wait({pending})
