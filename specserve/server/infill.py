"""Fill-in-the-middle: the prompt a code model completes between a prefix and a suffix, as llama-server
builds it for POST /infill (llama.vim, Continue, Tabby, Twinny ask servers for it) and for OpenAI's `suffix`
on /v1/completions; and llama-server's reply shape for /infill.

The prompt is the repository-level pattern of Qwen2.5-Coder (arXiv 2409.12186), which llama-server uses for
every model that has the separator tokens:

    [REPO]myproject\\n [SEP]filename0\\n extra chunk 0 ... [SEP]filename\\n [PRE]prefix prompt [SUF]suffix [MID]

The prefix keeps its end and the suffix its start, within llama-server's split of a 2048-token batch (3/4 and
1/4); the extra chunks keep what fits of their end. The suffix and the extra files are in the prompt, so the
model-free drafters (prompt lookup, suffix trees) draft from them too: code a completion repeats is often
there. Output is the target's own, as for any prompt.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from specserve.models.tokenizer import Tokenizer
from specserve.server.http import COMPLETION_RESPONSES, ignored_fields_header, json_response, server_state
from specserve.server.openai_format import ApiError, Finished, sse_error
from specserve.server.schemas import CompletionParams
from specserve.server.state import Event

router = APIRouter()
FIM_PREFIX_TOKENS = 1536  # llama-server's: 3/4 of its default batch of 2048 ...
FIM_SUFFIX_TOKENS = 512  # ... and 1/4, shared with the prompt after the middle token
FIM_PROJECT = "myproject"  # the repository name llama-server writes (it takes none from the request)
FIM_FILENAME = "filename"  # and the current file's


class ExtraChunk(BaseModel):
    text: str
    filename: str = "tmp"


class InfillRequest(CompletionParams):
    """llama-server's POST /infill (its sampling fields by their OpenAI names, plus `n_predict`)."""

    input_prefix: str
    input_suffix: str
    input_extra: list[ExtraChunk] = Field(default_factory=list)
    prompt: str = ""  # the cursor line's text before the cursor: it ends the prefix
    n_predict: int | None = Field(default=None, ge=-1)  # llama-server's max_tokens (-1: up to the context)
    # llama-server's: the reply has only these fields, nested ones named by their path ("timings/prompt_n")
    response_fields: list[str] | None = None


def infill_prompt(
    tokenizer: Tokenizer, *, prefix: str, suffix: str, extra: list[ExtraChunk] = (), prompt: str = "", room: int
) -> list[int]:
    """The FIM prompt's tokens; `room`: how many the prompt may take (extra chunks give way first). Raises
    ValueError for a model without FIM tokens."""
    fim = tokenizer.fim
    if fim is None:
        raise ValueError("this model has no fill-in-the-middle tokens: infill needs a code model trained for it")

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, special=False)

    after = encode(prompt)
    prefix_ids = encode(prefix)[-FIM_PREFIX_TOKENS:]
    suffix_ids = encode(suffix)[: max(0, FIM_SUFFIX_TOKENS - (2 + len(after)))]
    extra_ids: list[int] = []
    if fim.repo is not None:
        extra_ids += [fim.repo, *encode(f"{FIM_PROJECT}\n")]
    for chunk in extra:
        if fim.file_sep is not None:
            extra_ids += [fim.file_sep, *encode(f"{chunk.filename}\n")]
        else:  # llama-server's chunk separator for models without file tokens
            extra_ids += encode("\n\n--- snippet ---\n\n")
        extra_ids += encode(chunk.text)
    if fim.file_sep is not None:
        extra_ids += [fim.file_sep, *encode(f"{FIM_FILENAME}\n")]
    body = [fim.prefix, *prefix_ids, *after, fim.suffix, *suffix_ids, fim.middle]
    keep = max(0, min(len(extra_ids), room - len(body)))
    return extra_ids[len(extra_ids) - keep :] + body


def infill_reply(
    *,
    content: str,
    done: Finished,
    prompt: str,
    model: str,
    prompt_ms: float,
    predicted_ms: float,
    fields: list[str] | None = None,
) -> dict:
    """llama-server's /infill (and /completion) body: the text, the prompt (its control tokens as text) and
    the counts; `timings` as measured here
    (prompt: to the first token; predicted: after it), `prompt_n` the prompt tokens evaluated and `cache_n`
    those reused;
    with `fields` only those (llama-server's `response_fields`)."""
    stop_type = {"stop": "eos", "length": "limit"}.get(done.finish_reason, done.finish_reason)
    predicted = done.completion_tokens
    body = {
        "index": 0,
        "content": content,
        "model": model,
        "stop": True,
        "stop_type": stop_type,
        "tokens_predicted": predicted,
        "tokens_evaluated": done.prompt_tokens,
        "prompt": prompt,
        "tokens_cached": max(0, done.prompt_tokens + predicted - 1),  # in the KV cache at the end, as llama-server
        "truncated": False,
        "timings": {
            "cache_n": done.cached_tokens,
            "prompt_n": done.prompt_tokens - done.cached_tokens,
            "prompt_ms": round(prompt_ms, 3),
            "predicted_n": predicted,
            "predicted_ms": round(predicted_ms, 3),
            "predicted_per_second": round(predicted / (predicted_ms / 1000), 3) if predicted_ms > 0 else None,
        },
        "speculative": done.speculative,
    }
    return body if fields is None else pick_fields(body, fields)


def pick_fields(body: dict, paths: list[str]) -> dict:
    """The values at these paths ("timings/prompt_n"), keyed by path; a path that leads nowhere is left out."""
    picked = {}
    for path in paths:
        value: Any = body
        for key in path.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            picked[path] = value
    return picked


def prompt_room(n_ctx: int, max_tokens: int | None) -> int:
    """How many tokens a FIM prompt may take: what max_tokens leaves of the context, or without one half."""
    return n_ctx // 2 if max_tokens is None else n_ctx - max_tokens


def infill_ids(tokenizer: Tokenizer, *, param: str = "suffix", **prompt) -> list[int]:
    """`infill_prompt`, or a 400 naming `param` for a model without FIM tokens."""
    try:
        return infill_prompt(tokenizer, **prompt)
    except ValueError as exc:
        raise ApiError(400, str(exc), param) from None


@router.post("/infill", responses=COMPLETION_RESPONSES)
async def infill(body: InfillRequest, request: Request):
    """llama-server's fill-in-the-middle, in its request and reply shapes (its native /completion's)."""
    state = server_state(request)
    runtime = state.ready()
    started = time.perf_counter()
    if body.n_predict is not None:  # -1: llama-server's "up to the context"
        body.max_tokens = None if body.n_predict == -1 else max(1, body.n_predict)
    prompt = {"prefix": body.input_prefix, "suffix": body.input_suffix, "extra": body.input_extra}
    room = prompt_room(runtime.n_ctx, body.max_tokens)
    ids = infill_ids(runtime.tokenizer, param="input_suffix", **prompt, prompt=body.prompt, room=room)
    events = await state.events("infill", request, body, ids)
    prompt_text = runtime.tokenizer.decode_bytes(ids, special=True).decode("utf-8", errors="replace")
    infill = _Infill(body=body, prompt=prompt_text, model=state.model_name(runtime), started=started)
    headers = ignored_fields_header(body.ignored_fields)
    if body.stream:
        stream = _infill_sse(events, infill)
        return StreamingResponse(
            stream, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"}
        )
    pieces: list[str] = []
    first = None
    async with aclosing(events):
        async for event in events:
            if isinstance(event, Finished):
                reply = _infill_end("".join(pieces), event, infill, first)
                return json_response(reply, headers)
            first = first or time.perf_counter()
            pieces.append(event.text)
    raise ApiError(499, "client closed the request")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Infill:
    """What an /infill reply repeats of its request."""

    body: InfillRequest
    prompt: str  # the FIM prompt's text, control tokens included
    model: str
    started: float  # `time.perf_counter()` when the request came


def _infill_end(content: str, done: Finished, infill: _Infill, first: float | None) -> dict:
    end = time.perf_counter()
    first = first or end
    timings = {"prompt_ms": (first - infill.started) * 1000, "predicted_ms": (end - first) * 1000}
    fields = infill.body.response_fields
    return infill_reply(content=content, done=done, prompt=infill.prompt, model=infill.model, fields=fields, **timings)


async def _infill_sse(events: AsyncIterator[Event], infill: _Infill) -> AsyncIterator[str]:
    """llama-server's stream: `{"content": ..., "stop": false}` per piece, then the whole reply's counts."""
    first = None
    try:
        async with aclosing(events):
            async for event in events:
                if isinstance(event, Finished):
                    yield f"data: {json.dumps(_infill_end('', event, infill, first))}\n\n"
                    continue
                first = first or time.perf_counter()
                yield f"data: {json.dumps({'index': 0, 'content': event.text, 'stop': False})}\n\n"
    except ApiError as exc:  # the headers are gone: report in-band
        yield sse_error(exc)
