"""Ollama's API (/api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version), which the `ollama`
clients, Open WebUI's Ollama connection, VS Code Copilot's Ollama provider and editor plugins speak.

A request becomes the chat or completion request it amounts to (`OllamaChat.to_chat`, `OllamaGenerate.to_request`):
`options` give the sampling settings (Ollama's defaults where they are left out, `num_predict` -1 or none:
until the model stops), `format` a JSON grammar, tools and their calls the chat request's; so speculation,
grammars and tool calls work as they do for chat completions. Replies stream as newline-delimited JSON
objects unless `stream` is false (Ollama streams by default), the last with the counts and durations
(nanoseconds). Errors are Ollama's `{"error": "..."}`. The one model answers every name.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import gguf
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from specserve import __version__
from specserve.runtime import Runtime
from specserve.server.http import (
    COMPLETION_ERRORS,
    chat_prompt,
    converted,
    error_responses,
    ignored_fields_header,
    json_response,
    model_meta,
    server_state,
)
from specserve.server.infill import infill_ids, prompt_room
from specserve.server.openai_format import ApiError, Finished
from specserve.server.schemas import ChatRequest, CompletionParams, CompletionRequest, Speculation
from specserve.server.state import Event
from specserve.server.tools import StreamSplit, ToolCall
from specserve.server.tools import parse as parse_tool_calls

router = APIRouter()
PATH = "/api/"
# The Ollama version clients are told (they check it for features, e.g. tool calling since 0.3)
OLLAMA_VERSION = "0.9.0"


def error_body(message: str) -> dict:
    return {"error": message}


class OllamaError(BaseModel):
    """Ollama's error body."""

    error: str


ERRORS = {status: error_responses(status, body=OllamaError)[status] for status in COMPLETION_ERRORS}
# A reply is one JSON body, or (Ollama's default) newline-delimited JSON objects.
REPLY = {
    200: {"content": {"application/json": {}, "application/x-ndjson": {}}, "description": "the reply"},
    **ERRORS,
}


class Options(BaseModel):
    """Ollama's model options that change a reply; the rest (num_ctx, num_thread, ...) are the server's own."""

    model_config = ConfigDict(extra="allow")
    temperature: float = Field(default=0.8, ge=0.0, le=2.0)  # Ollama's defaults where a request leaves one out
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    num_predict: int | None = Field(default=None, ge=-2)  # -1: until the model stops (-2: the context's end)
    stop: list[str] | None = None
    seed: int | None = None
    # off, as llama.cpp's default (Ollama's is 1.1): a greedy request gets the model's own greedy reply
    repeat_penalty: float = Field(default=1.0, ge=0.01, le=10.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)

    def sampling(self) -> dict:
        """The completion request's fields."""
        max_tokens = self.num_predict if self.num_predict is not None and self.num_predict > 0 else None
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "max_tokens": max_tokens,
            "stop": self.stop,
            "seed": self.seed,
            "repetition_penalty": self.repeat_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }


class FunctionCall(BaseModel):
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class ToolCallIn(BaseModel):
    function: FunctionCall


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # thinking, tool_name: nothing the prompt needs
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[ToolCallIn] | None = None

    def chat_message(self) -> dict:
        if self.images:
            raise ValueError("messages: images are not supported: the model reads text only")
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": c.function.arguments
                        if isinstance(c.function.arguments, str)
                        else json.dumps(c.function.arguments),
                    },
                }
                for c in self.tool_calls
            ]
        return message


class OllamaRequest(BaseModel):
    # keep_alive, think, context, ...: accepted, named in a response header, as for chat completions
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    options: Options = Options()
    format: Literal["json", ""] | dict | None = None  # "json", or a JSON schema
    stream: bool = True  # Ollama streams unless told not to
    speculation: Speculation = Speculation()

    @property
    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or ())

    def common(self) -> dict:
        """The fields of the completion request every Ollama request amounts to."""
        fields = {"model": self.model, "speculation": self.speculation, **self.options.sampling()}
        if self.format == "json":
            fields["response_format"] = {"type": "json_object"}
        elif isinstance(self.format, dict):
            fields["response_format"] = {"type": "json_schema", "json_schema": {"schema": self.format}}
        return fields


class OllamaChat(OllamaRequest):
    messages: list[OllamaMessage] = Field(min_length=1)
    tools: list[dict] | None = None

    def to_chat(self) -> ChatRequest:
        chat = {**self.common(), "messages": [m.chat_message() for m in self.messages]}
        if self.tools:
            chat["tools"] = self.tools
        return ChatRequest.model_validate(chat)


class OllamaGenerate(OllamaRequest):
    prompt: str = ""  # empty: Ollama's way to load the model, answered at once
    suffix: str | None = None  # fill in the middle: the reply goes between the prompt and this
    system: str | None = None
    raw: bool = False  # the prompt as it is, without the chat template

    def to_request(self) -> CompletionParams:
        """A chat request (the prompt in the chat template), or a completion one (`raw`, or with a suffix)."""
        if self.raw or self.suffix is not None:
            return CompletionRequest.model_validate({**self.common(), "prompt": self.prompt, "suffix": self.suffix})
        system = [{"role": "system", "content": self.system}] if self.system else []
        return ChatRequest.model_validate(
            {**self.common(), "messages": [*system, {"role": "user", "content": self.prompt}]}
        )


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    name: str | None = None  # the older name of `model`


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _details(runtime: Runtime) -> dict:
    """Ollama's `details` of the model, from its GGUF metadata."""
    meta = model_meta(runtime)
    file_type = runtime.tokenizer.metadata.get("general.file_type")
    try:
        quantization = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") if file_type else ""
    except ValueError:
        quantization = ""
    return {
        "parent_model": "",
        "format": "gguf",
        "family": meta["arch"],
        "families": [meta["arch"]],
        "parameter_size": meta["params"] or "",
        "quantization_level": quantization,
    }


def _capabilities(runtime: Runtime) -> list[str]:
    template = runtime.tokenizer.chat_template or ""
    return ["completion"] + (["tools"] if "tools" in template else []) + (["insert"] if runtime.tokenizer.fim else [])


@router.get("/api/version", responses={401: ERRORS[401]})
async def version() -> dict:
    return {"version": OLLAMA_VERSION, "specserve": __version__}


def _model_entries(request: Request) -> list[dict]:
    state = server_state(request)
    runtime = state.ready()
    size = model_meta(runtime)["size"]
    modified = datetime.fromtimestamp(state.started, UTC).isoformat().replace("+00:00", "Z")
    return [
        {
            "name": name,
            "model": name,
            "modified_at": modified,
            "size": size,
            "digest": runtime.tokenizer.digest,
            "details": _details(runtime),
        }
        for name in state.model_names(runtime)
    ]


@router.get("/api/tags", responses={401: ERRORS[401], 503: ERRORS[503]})
async def tags(request: Request) -> dict:
    """The model, under each name it is served by."""
    return {"models": _model_entries(request)}


@router.get("/api/ps", responses={401: ERRORS[401], 503: ERRORS[503]})
async def running(request: Request) -> dict:
    """The loaded model (always loaded: it stays for the server's life)."""
    return {"models": [{**m, "size_vram": 0, "expires_at": None} for m in _model_entries(request)]}


@router.post("/api/show", responses={400: ERRORS[400], 401: ERRORS[401], 503: ERRORS[503]})
async def show(body: ShowRequest, request: Request) -> dict:
    """The model's details, its GGUF metadata as `model_info` (the context length is the server's), its
    chat template and what it can do."""
    state = server_state(request)
    runtime = state.ready()
    meta = runtime.tokenizer.metadata
    arch = meta.get("general.architecture", "")
    info = {key: _number(value) for key, value in meta.items() if not key.startswith("tokenizer.")}
    info[f"{arch}.context_length"] = runtime.n_ctx
    return {
        "modelfile": f"FROM {runtime.tokenizer.path.name}\n",
        "parameters": "",
        "template": runtime.tokenizer.chat_template or "",
        "details": _details(runtime),
        "model_info": info,
        "capabilities": _capabilities(runtime),
        "modified_at": _model_entries(request)[0]["modified_at"],
    }


def _number(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


@dataclass(kw_only=True)
class _Reply:
    """One reply's shape (chat's `message` or generate's `response`) and clock."""

    model: str
    chat: bool
    started: float
    first_at: float | None = None

    def chunk(self, text: str, calls: list[ToolCall] = ()) -> dict:
        if self.first_at is None:
            self.first_at = time.perf_counter()
        if not self.chat:
            return {"model": self.model, "created_at": _now(), "response": text, "done": False}
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = [{"function": {"name": c.name, "arguments": c.input}} for c in calls]
        return {"model": self.model, "created_at": _now(), "message": message, "done": False}

    def last(self, done: Finished, text: str = "", calls: list[ToolCall] = ()) -> dict:
        """The final object: the whole text when not streamed, the counts and durations (ns)."""
        end = time.perf_counter()
        first = self.first_at or end
        return {
            **self.chunk(text, calls),
            "done": True,
            "done_reason": "length" if done.finish_reason == "length" else "stop",
            "total_duration": round((end - self.started) * 1e9),
            "load_duration": 0,
            "prompt_eval_count": done.prompt_tokens,
            "prompt_eval_duration": round((first - self.started) * 1e9),
            "eval_count": done.completion_tokens,
            "eval_duration": round((end - first) * 1e9),
            "speculative": done.speculative,
        }


@router.post("/api/chat", responses=REPLY)
async def chat(body: OllamaChat, request: Request):
    state = server_state(request)
    runtime = state.ready()
    started = time.perf_counter()
    request_body = converted(body.to_chat, param="messages")
    ids = chat_prompt(runtime, request_body)
    return await _answer(request, body, request_body, ids, started)


@router.post("/api/generate", responses=REPLY)
async def generate(body: OllamaGenerate, request: Request):
    state = server_state(request)
    runtime = state.ready()
    started = time.perf_counter()
    if not body.prompt and body.suffix is None:  # Ollama's "load the model": it is loaded
        reply = {"model": state.model_name(runtime), "created_at": _now(), "response": "", "done": True}
        return json_response({**reply, "done_reason": "load"}, {})
    request_body = converted(body.to_request, param="prompt")
    if isinstance(request_body, ChatRequest):
        ids = chat_prompt(runtime, request_body, param="prompt")
    elif body.suffix is not None:
        room = prompt_room(runtime.n_ctx, request_body.max_tokens)
        ids = infill_ids(runtime.tokenizer, prefix=body.prompt, suffix=body.suffix, room=room)
    else:
        ids = runtime.encode_prompt(prompt=body.prompt)
    return await _answer(request, body, request_body, ids, started)


async def _answer(request: Request, body: OllamaRequest, run: CompletionParams, ids: list[int], started: float):
    state = server_state(request)
    chat = isinstance(body, OllamaChat)
    events = await state.events("ollama-chat" if chat else "ollama-generate", request, run, ids)
    reply = _Reply(model=state.model_name(state.ready()), chat=chat, started=started)
    headers = ignored_fields_header(body.ignored_fields)
    tools = run.may_call_tools
    if body.stream:
        stream = _ndjson(reply, events, tools=tools)
        return StreamingResponse(stream, media_type="application/x-ndjson", headers=headers)
    pieces = []
    async with aclosing(events):
        async for event in events:
            if isinstance(event, Finished):
                text, calls = "".join(p.text for p in pieces), []
                if tools:
                    content, calls = parse_tool_calls(text)
                    text = content or ""
                return json_response(reply.last(event, text, calls), headers)
            if reply.first_at is None:
                reply.first_at = time.perf_counter()
            pieces.append(event)
    raise ApiError(499, "client closed the request")


async def _ndjson(reply: _Reply, events: AsyncIterator[Event], *, tools: bool) -> AsyncIterator[str]:
    """One JSON object a line: a piece of text each, the calls in one object at the end, then the last."""
    calls = StreamSplit() if tools else None
    try:
        async with aclosing(events):
            async for event in events:
                if isinstance(event, Finished):
                    rest, found = calls.finish() if calls is not None else ("", [])
                    if rest or found:
                        yield json.dumps(reply.chunk(rest, found)) + "\n"
                    yield json.dumps(reply.last(event)) + "\n"
                elif text := (calls.push(event.text) if calls is not None else event.text):
                    yield json.dumps(reply.chunk(text)) + "\n"
    except ApiError as exc:  # the headers are gone: report in-band, as Ollama does
        yield json.dumps(error_body(exc.message)) + "\n"
