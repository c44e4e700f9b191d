"""OpenAI's response, chunk and error shapes as pure functions of what a generation produced (no I/O).

A request's output is a stream of events: `Piece`s (text, with the target's log-probabilities of its tokens
when the request asked for them), then one `Finished`. Non-streaming replies join the pieces into one body;
streaming replies send each event as a Server-Sent Event chunk.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

from specserve.engine.loop import Emitted, Generation, WindowTrace
from specserve.engine.sampling import TokenLogprob
from specserve.engine.stats import GenerationStats
from specserve.server.tools import ToolCall
from specserve.server.tools import parse as parse_tool_calls

LOGPROB_FLOOR = -9999.0  # what OpenAI reports for a token of probability 0 (JSON has no -inf)
TokenBytes = Callable[[int], bytes]  # a token's bytes (a piece of UTF-8 text, perhaps not a whole character)


# Beyond a minute an estimate from recent completions says little; the openai SDK honours up to two.
MAX_RETRY_AFTER_S = 60


def retry_after(seconds: float) -> dict[str, str]:
    """The Retry-After header of a 429 or 503: whole seconds (HTTP's delta-seconds), 1 to MAX_RETRY_AFTER_S."""
    return {"Retry-After": str(min(MAX_RETRY_AFTER_S, max(1, math.ceil(seconds))))}


class ApiError(Exception):
    """A request the server refuses or could not finish: becomes `{"error": ...}` with `status`.
    `retry_after_s`: the client may try again then (429 busy, 503 not ready)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        retry_after_s: float | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers: dict[str, str] = retry_after(retry_after_s) if retry_after_s is not None else {}


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class TokenOrigin:
    """Who produced a streamed token (`speculation.trace`, an extension OpenAI clients ignore): an accepted
    draft token, the target's own (a correction or the bonus token), or a response-cache replay; its verify
    window (drafts proposed and accepted, the step's draft and verify milliseconds) and the target's
    log-probability of it when the request asked for logprobs."""

    source: Literal["draft", "target", "cache"]
    window: int = 0  # the request's verify window (0: the prompt's last chunk, or a replay)
    drafted: int = 0
    accepted: int = 0
    draft_ms: float = 0.0
    verify_ms: float = 0.0
    logprob: float | None = None


def token_origin(emitted: Emitted) -> TokenOrigin:
    window = emitted.window or WindowTrace(index=0, drafted=0, accepted=0, draft_s=0.0, verify_s=0.0)
    return TokenOrigin(
        "draft" if emitted.from_draft else "target",
        window.index,
        window.drafted,
        window.accepted,
        round(window.draft_s * 1000, 2),
        round(window.verify_s * 1000, 2),
        _logprob(emitted.logprob.logprob) if emitted.logprob is not None else None,
    )


@dataclass(frozen=True)
class Piece:
    """Text released to the client, the log-probabilities of the tokens that produced it, and (traced
    streams) where its token came from."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    origin: TokenOrigin | None = None


@dataclass(frozen=True)
class Finished:
    """The last event of a request."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    speculative: dict  # drafted / accepted / acceptance_rate (+ cached) — specserve's extension field
    cached_tokens: int = 0  # prompt tokens whose KV was reused, not evaluated again
    stop_string: str | None = None  # the stop string that ended the reply (Anthropic's `stop_sequence`)


def finished(generation: Generation) -> Finished:
    s = generation.stats
    return Finished(
        generation.finish_reason,
        s.prompt_tokens,
        s.generated,
        speculative_stats(s),
        s.prefix_reused,
        generation.stop_string,
    )


def speculative_stats(stats: GenerationStats) -> dict:
    return {"drafted": stats.drafted, "accepted": stats.accepted, "acceptance_rate": round(stats.acceptance_rate, 4)}


def request_log(generation: Generation) -> dict:
    """The fields of the one structured log line per finished request."""
    s = generation.stats
    return {
        "finish": generation.finish_reason,
        "prompt_tokens": s.prompt_tokens,
        "prefix_reused": s.prefix_reused,
        "completion_tokens": s.generated,
        "drafted": s.drafted,
        "accepted": s.accepted,
        "tokens_per_s": round(s.tokens_per_s, 2),
        "prefill_ms": round(s.prefill_s * 1000, 1),
        "total_ms": round(s.total_s * 1000, 1),
    }


def response_head(chat: bool, model: str) -> dict:
    """Fields shared by a response and all its chunks (one id per request)."""
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    return {"id": rid, "created": int(time.time()), "model": model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


def _logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def chat_logprobs(entries: list[TokenLogprob], token_bytes: TokenBytes) -> dict:
    """`choices[].logprobs` of a chat completion: per token its text, bytes, log-probability and the top ones."""

    def entry(token: int, logprob: float) -> dict:
        raw = token_bytes(token)
        return {"token": raw.decode("utf-8", "replace"), "logprob": _logprob(logprob), "bytes": list(raw)}

    content = [{**entry(e.token, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[TokenLogprob], token_bytes: TokenBytes, offset: int = 0) -> dict:
    """`choices[].logprobs` of a (legacy) completion: parallel lists, `text_offset` counted from `offset`."""
    tokens = [token_bytes(e.token).decode("utf-8", "replace") for e in entries]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [_logprob(e.logprob) for e in entries],
        "top_logprobs": [{token_bytes(t).decode("utf-8", "replace"): _logprob(lp) for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


def logprobs_body(chat: bool, entries: list[TokenLogprob], token_bytes: TokenBytes, offset: int = 0) -> dict:
    return chat_logprobs(entries, token_bytes) if chat else completion_logprobs(entries, token_bytes, offset)


@dataclass(frozen=True, kw_only=True)
class ReplyFormat:
    """How one request's reply is written: its head (id, created, model), as chat or as a (legacy)
    completion, with logprobs (`token_bytes`, when the request asked for them) and tool calls (`tools`, when
    it offered tools: tools.py)."""

    head: dict
    chat: bool
    token_bytes: TokenBytes | None = None
    tools: bool = False
    index: int = 0  # the choice (requests with n > 1)


def _completion_choice(text: str | None, finish: str | None, logprobs: dict | None) -> dict:
    return {"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}


def _with_logprobs(body: dict, logprobs: dict | None) -> dict:
    return body | ({"logprobs": logprobs} if logprobs is not None else {})


def message_choice(
    chat: bool, text: str | None, finish: str | None, logprobs: dict | None, tool_calls: list[ToolCall]
) -> dict:
    """`choices[0]` of a whole reply."""
    if not chat:
        return _completion_choice(text, finish, logprobs)
    message = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = [c.body() for c in tool_calls]
        finish = "tool_calls" if finish is not None else finish
    return _with_logprobs({"index": 0, "message": message, "finish_reason": finish}, logprobs)


def delta_choice(
    chat: bool, text: str | None, finish: str | None, logprobs: dict | None = None, tool_calls: list[ToolCall] = ()
) -> dict:
    """`choices[0]` of one streamed chunk."""
    if not chat:
        return _completion_choice(text, finish, logprobs)
    content = {"content": text} if text else {}
    calls = {"tool_calls": [c.body(index) for index, c in enumerate(tool_calls)]} if tool_calls else {}
    if tool_calls and finish is not None:
        finish = "tool_calls"
    return _with_logprobs({"index": 0, "delta": content | calls, "finish_reason": finish}, logprobs)


def completion(reply: ReplyFormat, pieces: list[Piece], done: Finished) -> dict:
    """The body of a non-streaming reply."""
    text: str | None = "".join(p.text for p in pieces)
    calls: list[ToolCall] = []
    if reply.tools:
        text, calls = parse_tool_calls(text)
    logprobs = None
    if reply.token_bytes is not None:
        logprobs = logprobs_body(reply.chat, [e for p in pieces for e in p.logprobs], reply.token_bytes)
    return {
        **reply.head,
        "object": "chat.completion" if reply.chat else "text_completion",
        "choices": [{**message_choice(reply.chat, text, done.finish_reason, logprobs, calls), "index": reply.index}],
        "usage": usage(done.prompt_tokens, done.completion_tokens),
        "speculative": done.speculative,
    }


def merged_choices(bodies: list[dict]) -> dict:
    """One body for several choices of one prompt: the prompt counted once, the completions summed."""
    if len(bodies) == 1:
        return bodies[0]
    drafted = sum(b["speculative"]["drafted"] for b in bodies)
    accepted = sum(b["speculative"]["accepted"] for b in bodies)
    completion_tokens = sum(b["usage"]["completion_tokens"] for b in bodies)
    return {
        **bodies[0],
        "choices": [b["choices"][0] for b in bodies],
        "usage": usage(bodies[0]["usage"]["prompt_tokens"], completion_tokens),
        "speculative": {
            "drafted": drafted,
            "accepted": accepted,
            "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0,
        },
    }


def sse_chunk(
    reply: ReplyFormat, event: Piece | Finished | None, offset: int = 0, tool_calls: list[ToolCall] = ()
) -> str:
    """One Server-Sent Event: a text piece, the final chunk (with usage, and the reply's tool calls), or
    (None) chat's opening role chunk. `offset`: the piece's place in the text (completions)."""
    chat = reply.chat
    body = {**reply.head, "object": "chat.completion.chunk" if chat else "text_completion"}
    if event is None:
        body["choices"] = [{"delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
    elif isinstance(event, Finished):
        body["choices"] = [delta_choice(chat, "", event.finish_reason, tool_calls=tool_calls)]
        body["usage"] = usage(event.prompt_tokens, event.completion_tokens)
        body["speculative"] = event.speculative
    else:
        token_bytes = reply.token_bytes
        logprobs = logprobs_body(chat, list(event.logprobs), token_bytes, offset) if token_bytes else None
        body["choices"] = [delta_choice(chat, event.text, None, logprobs)]
        if event.origin is not None:
            body["specserve"] = {"token": asdict(event.origin)}
    body["choices"] = [{**body["choices"][0], "index": reply.index}]
    return f"data: {json.dumps(body)}\n\n"


def sse_error(error: ApiError) -> str:
    """An error after the headers went out is reported in-band, the way OpenAI streams do."""
    return f"data: {json.dumps({'error': {'message': error.message, 'type': error.kind}})}\n\n"


SSE_DONE = "data: [DONE]\n\n"
