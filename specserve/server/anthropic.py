"""Anthropic's Messages API (POST /v1/messages and /v1/messages/count_tokens), which Claude Code, the Anthropic
SDK and the tools built on them speak.

A request becomes the chat request it amounts to (`MessagesRequest.to_chat`): `system` a system message, each
user turn's `tool_result` blocks tool messages, each assistant turn's `tool_use` blocks its tool calls, the
tools and `tool_choice` the chat request's (`any` is "required"); so speculation, grammars and tool calls work
as they do for chat completions. The reply's text and calls become `text` and `tool_use` content blocks,
streamed as Anthropic's event sequence (`MessageEvents`) with `ping`s while the prompt is prefilled. Errors
on these routes have Anthropic's shape (`error_body`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from specserve.server.http import (
    COMPLETION_RESPONSES,
    chat_prompt,
    collect,
    converted,
    ignored_fields_header,
    json_response,
    server_state,
    with_pings,
)
from specserve.server.openai_format import ApiError, Finished
from specserve.server.responses import new_id
from specserve.server.schemas import ChatRequest, Speculation
from specserve.server.state import Event
from specserve.server.tools import StreamSplit, ToolCall
from specserve.server.tools import parse as parse_tool_calls

router = APIRouter()
PATH = "/v1/messages"
# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors)
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}}


class TextBlock(BaseModel):
    model_config = ConfigDict(extra="allow")  # cache_control, citations: nothing this server acts on
    type: Literal["text"]
    text: str


class ToolUseBlock(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool = False

    def text(self) -> str:
        text = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)
        return f"Error: {text}" if self.is_error else text


class ThinkingBlock(BaseModel):
    """An earlier turn's thinking, which the conversation carries back: not part of the prompt."""

    model_config = ConfigDict(extra="allow")
    type: Literal["thinking", "redacted_thinking"]


Block = TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock
_BLOCK_TYPES = {"text", "tool_use", "tool_result", "thinking", "redacted_thinking"}


class Message(BaseModel):
    role: Literal["user", "assistant"]
    content: str | list[Block]

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        blocks = data.get("content") if isinstance(data, dict) else None
        if isinstance(blocks, list):
            if other := sorted({b.get("type") for b in blocks if isinstance(b, dict)} - _BLOCK_TYPES, key=str):
                raise ValueError(f"content blocks of type {', '.join(map(str, other))} are not supported: text only")
        return data

    def chat_messages(self) -> list[dict]:
        """The turn as chat messages: a user turn's tool results first (as tool messages), then its text; an
        assistant turn's text with its tool calls."""
        if isinstance(self.content, str):
            return [{"role": self.role, "content": self.content}]
        text = "".join(b.text for b in self.content if isinstance(b, TextBlock))
        if self.role == "user":
            results = [
                {"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()}
                for b in self.content
                if isinstance(b, ToolResultBlock)
            ]
            return results + ([{"role": "user", "content": text}] if text or not results else [])
        calls = [
            {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
            for b in self.content
            if isinstance(b, ToolUseBlock)
        ]
        return [{"role": "assistant", "content": text or (None if calls else ""), "tool_calls": calls or None}]


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")  # cache_control
    name: str
    description: str | None = None
    input_schema: dict = Field(default_factory=lambda: {"type": "object"})
    type: Literal["custom"] | None = None  # Anthropic's server tools (web search, ...) are not run here


class ToolChoice(BaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _named(self) -> ToolChoice:
        if (self.type == "tool") != (self.name is not None):
            raise ValueError('tool_choice: a name goes with type "tool", and only with it')
        return self


class OutputFormat(BaseModel):
    type: Literal["json_schema"]
    schema_: dict = Field(alias="schema")


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="allow")  # effort: nothing a model without thinking acts on
    format: OutputFormat | None = None


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    user_id: str | None = None


class MessagesRequest(BaseModel):
    # Fields this server does not know (thinking, service_tier, container, ...) are accepted and named in a
    # response header, as for chat completions.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    # Anthropic requires it; here, as on every endpoint, none means until the model stops
    max_tokens: int | None = Field(default=None, ge=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    output_config: OutputConfig | None = None  # `format`: a JSON schema the reply follows
    # The sampling fields of Anthropic's earlier API (its current SDK has none): its defaults and ranges
    temperature: float = Field(default=1.0, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    metadata: Metadata | None = None
    speculation: Speculation = Speculation()

    @model_validator(mode="before")
    @classmethod
    def _custom_tools_only(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for tool in data.get("tools") or ():
                if isinstance(tool, dict) and tool.get("type") not in (None, "custom"):
                    raise ValueError(f"tools: only custom tools are supported, not {tool.get('type')!r}")
        return data

    @property
    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or ())

    def chat_messages(self) -> list[dict]:
        system = self.system if isinstance(self.system, str) else "".join(b.text for b in self.system or ())
        messages = [{"role": "system", "content": system}] if system else []
        return messages + [m for turn in self.messages for m in turn.chat_messages()]

    def to_chat(self) -> ChatRequest:
        """The chat request that runs this one (its validation errors are this request's)."""
        chat: dict[str, Any] = {
            "model": self.model,
            "messages": self.chat_messages(),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stop": self.stop_sequences,
            "user": self.metadata.user_id if self.metadata is not None else None,
            "speculation": self.speculation,
        }
        if self.output_config is not None and self.output_config.format is not None:
            schema = {"name": "output", "schema": self.output_config.format.schema_}
            chat["response_format"] = {"type": "json_schema", "json_schema": schema}
        if self.top_p is not None:
            chat["top_p"] = self.top_p
        if self.top_k is not None:
            chat["top_k"] = self.top_k
        if self.tools:
            chat["tools"] = [
                {
                    "type": "function",
                    "function": {"name": t.name, "description": t.description, "parameters": t.input_schema},
                }
                for t in self.tools
            ]
        if (choice := self.tool_choice) is not None:
            named = {"type": "function", "function": {"name": choice.name}}
            chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none", "tool": named}[choice.type]
            chat["parallel_tool_calls"] = not choice.disable_parallel_tool_use
        return ChatRequest.model_validate(chat)


class CountTokensRequest(MessagesRequest):
    """The same fields; only the prompt they make is counted."""


def tool_use_block(call: ToolCall) -> dict:
    return {"type": "tool_use", "id": f"toolu_{call.id.removeprefix('call_')}", "name": call.name, "input": call.input}


def stop_reason(done: Finished, calls: list[ToolCall]) -> str:
    if calls:
        return "tool_use"
    if done.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if done.stop_string is not None else "end_turn"


def usage(done: Finished) -> dict:
    """Anthropic counts prompt tokens read from a cache apart from those evaluated."""
    return {
        "input_tokens": done.prompt_tokens - done.cached_tokens,
        "cache_read_input_tokens": done.cached_tokens,
        "cache_creation_input_tokens": 0,
        "output_tokens": done.completion_tokens,
    }


def message_body(*, message_id: str, model: str, content: list[dict], done: Finished, calls: list[ToolCall]) -> dict:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(done, calls),
        "stop_sequence": done.stop_string,
        "usage": usage(done),
        "speculative": done.speculative,
    }


@router.post(PATH, responses=COMPLETION_RESPONSES)
async def messages(body: MessagesRequest, request: Request):
    state = server_state(request)
    chat = converted(body.to_chat, param="messages")
    ids = chat_prompt(state.ready(), chat)
    events = await state.events("messages", request, chat, ids)
    message_id, model = new_id("msg"), state.model_name(state.ready())
    headers = ignored_fields_header(body.ignored_fields)
    if body.stream:
        writer = MessageEvents(message_id=message_id, model=model, prompt_tokens=len(ids))
        stream = writer.stream(events, tools=chat.may_call_tools)
        return StreamingResponse(
            stream, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"}
        )
    pieces, done = await collect(events)
    text: str | None = "".join(p.text for p in pieces)
    calls: list[ToolCall] = []
    if chat.may_call_tools:
        text, calls = parse_tool_calls(text)
    content = ([{"type": "text", "text": text}] if text else []) + [tool_use_block(c) for c in calls]
    reply = message_body(message_id=message_id, model=model, content=content, done=done, calls=calls)
    return json_response(reply, headers)


@router.post(f"{PATH}/count_tokens", responses=COMPLETION_RESPONSES)
async def count_tokens(body: CountTokensRequest, request: Request) -> dict:
    """The prompt's tokens, as the request would be run (its chat template, its tools)."""
    runtime = server_state(request).ready()
    return {"input_tokens": len(chat_prompt(runtime, converted(body.to_chat, param="messages")))}


class MessageEvents:
    """The stream of one message: `message_start`, a `text` block's deltas, one `tool_use` block a call (its
    input as one `input_json_delta`), `message_delta` with the stop reason and usage, `message_stop`; a `ping`
    first and whenever the stream was quiet for `http.PING_EVERY_S`."""

    def __init__(self, *, message_id: str, model: str, prompt_tokens: int):
        self.message_id, self.model, self.prompt_tokens = message_id, model, prompt_tokens
        self.blocks = 0  # content blocks started
        self.text_open = False

    @staticmethod
    def _event(kind: str, **fields: Any) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n"

    def start(self) -> list[str]:
        message = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0},
        }
        return [self._event("message_start", message=message), self._event("ping")]

    def text(self, text: str) -> list[str]:
        if not text:
            return []
        events = []
        if not self.text_open:
            self.text_open = True
            block = {"type": "text", "text": ""}
            events.append(self._event("content_block_start", index=self.blocks, content_block=block))
        delta = {"type": "text_delta", "text": text}
        return events + [self._event("content_block_delta", index=self.blocks, delta=delta)]

    def finish(self, done: Finished, calls: list[ToolCall]) -> list[str]:
        events = []
        if self.text_open:
            events.append(self._event("content_block_stop", index=self.blocks))
            self.blocks, self.text_open = self.blocks + 1, False
        for call in calls:
            block = {**tool_use_block(call), "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(call.input)}
            events.append(self._event("content_block_start", index=self.blocks, content_block=block))
            events.append(self._event("content_block_delta", index=self.blocks, delta=delta))
            events.append(self._event("content_block_stop", index=self.blocks))
            self.blocks += 1
        delta = {"stop_reason": stop_reason(done, calls), "stop_sequence": done.stop_string}
        events.append(self._event("message_delta", delta=delta, usage=usage(done)))
        return events + [self._event("message_stop")]

    async def stream(self, events: AsyncIterator[Event], *, tools: bool) -> AsyncIterator[str]:
        """The documented event sequence; text streams until a tool call begins, the calls come last."""
        calls = StreamSplit() if tools else None
        for line in self.start():
            yield line
        try:
            async with aclosing(with_pings(events)) as paced:
                async for event in paced:
                    if event is None:
                        yield self._event("ping")
                    elif isinstance(event, Finished):
                        rest, found = calls.finish() if calls is not None else ("", [])
                        for line in self.text(rest) + self.finish(event, found):
                            yield line
                    else:
                        for line in self.text(calls.push(event.text) if calls is not None else event.text):
                            yield line
        except ApiError as exc:  # the headers are gone: report in-band, as Anthropic's streams do
            yield self._event("error", error=error_body(exc.status, exc.message)["error"])
