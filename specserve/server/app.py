"""OpenAI-compatible HTTP API over the speculative engine (FastAPI + uvicorn).

This first version serves one generation at a time (an asyncio lock around the engine, which runs in a
worker thread); concurrent batching, the response cache and metrics come with the server issue.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from specserve import SpecserveError
from specserve.backends.base import ContextOverflowError
from specserve.engine.loop import Emitted, Generation
from specserve.engine.sampling import SamplingParams
from specserve.runtime import DRAFT_METHODS, Runtime, RuntimeConfig


class Speculation(BaseModel):
    method: Literal["draft", "ngram", "none"] = "draft"
    k: int | Literal["auto"] | None = Field(default=None)


class CompletionParams(BaseModel):
    model: str | None = None
    max_tokens: int = Field(default=128, gt=0)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    user: str | None = None
    speculation: Speculation = Speculation()


class CompletionRequest(CompletionParams):
    prompt: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(CompletionParams):
    messages: list[ChatMessage] = Field(min_length=1)


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": None}}
    )


def create_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(title="specserve")
    lock = asyncio.Lock()
    model_id = runtime.target_name

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "owned_by": "specserve"}]}

    def _start(params: CompletionParams, ids: list[int]) -> Generation | JSONResponse:
        if params.model not in (None, model_id):
            return _error(404, f"model {params.model!r} does not exist; this server has {model_id!r}", param="model")
        if params.n != 1:
            return _error(400, "only n=1 is supported", param="n")
        if len(ids) + params.max_tokens > runtime.target.n_ctx:
            return _error(
                400,
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                f"of {runtime.target.n_ctx} tokens",
                param="max_tokens",
            )
        stop = (params.stop,) if isinstance(params.stop, str) else tuple(params.stop or ())
        sampling = SamplingParams(
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            seed=params.seed,
            max_tokens=params.max_tokens,
            stop=stop,
        )
        method = params.speculation.method
        if method == "draft" and "draft" not in runtime.proposers:
            method = "ngram"  # no draft model loaded: fall back to the model-free drafter
        try:
            return runtime.generate(ids, sampling, method=method, k=params.speculation.k)
        except (ContextOverflowError, SpecserveError, ValueError) as exc:
            return _error(400, str(exc))

    def _usage(generation: Generation) -> dict:
        s = generation.stats
        return {
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.generated,
            "total_tokens": s.prompt_tokens + s.generated,
        }

    def _speculative(generation: Generation) -> dict:
        s = generation.stats
        return {"drafted": s.drafted, "accepted": s.accepted, "acceptance_rate": round(s.acceptance_rate, 4)}

    async def _respond(generation: Generation, chat: bool, stream: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def choice(text: str, finish: str | None, delta: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            body = {"role": "assistant", "content": text} if not delta else ({"content": text} if text else {})
            return {"index": 0, ("delta" if delta else "message"): body, "finish_reason": finish}

        if not stream:
            async with lock:
                await asyncio.to_thread(lambda: [None for _ in generation])
            return {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model_id,
                "choices": [choice(generation.text, generation.finish_reason, delta=False)],
                "usage": _usage(generation),
                "speculative": _speculative(generation),
            }

        async def events() -> AsyncIterator[str]:
            chunk_obj = "chat.completion.chunk" if chat else "text_completion"
            head = {"id": rid, "object": chunk_obj, "created": created, "model": model_id}

            def sse(choices: list[dict], **extra) -> str:
                return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

            async with lock:
                steps: Iterator[Emitted] = iter(generation)
                if chat:
                    yield sse([{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}])
                while (emitted := await asyncio.to_thread(next, steps, None)) is not None:
                    if emitted.text:
                        yield sse([choice(emitted.text, None, True)])
            yield sse(
                [choice("", generation.finish_reason, True)],
                usage=_usage(generation),
                speculative=_speculative(generation),
            )
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        started = _start(body, runtime.encode_prompt(prompt=body.prompt))
        return started if isinstance(started, JSONResponse) else await _respond(started, False, body.stream)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        messages = [m.model_dump() for m in body.messages]
        try:
            ids = runtime.encode_prompt(messages=messages)
        except SpecserveError as exc:
            return _error(400, str(exc), param="messages")
        started = _start(body, ids)
        return started if isinstance(started, JSONResponse) else await _respond(started, True, body.stream)

    return app


def serve(args: argparse.Namespace) -> int:
    runtime = Runtime(RuntimeConfig.from_args(args))
    print(
        f"specserve: {runtime.target_name} loaded in {runtime.load_s:.1f}s; methods {', '.join(DRAFT_METHODS)}; "
        f"listening on http://{args.host}:{args.port}/v1"
    )
    uvicorn.run(create_app(runtime), host=args.host, port=args.port, log_level="info")
    return 0
