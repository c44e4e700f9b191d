"""OpenAI's Responses API (POST /v1/responses), which the OpenAI Agents SDK and newer clients speak.

A request becomes a chat request (`ResponsesRequest.to_chat`): its `instructions` a system message, its input
items messages (`function_call` items an assistant's tool calls, `function_call_output` items tool
messages), its function tools, `tool_choice` and `text.format` the chat request's; so speculation, grammars
and tool calls work as they do for chat completions. The reply's text and calls become output items
(`response_body`), streamed as the documented events (`ResponseEvents`). `previous_response_id` continues a
conversation kept in a bounded store (response_cache.py `ConversationStore`: in process, or in the response
cache's Redis).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from specserve.engine.sampling import TokenLogprob
from specserve.server.http import (
    COMPLETION_RESPONSES,
    chat_prompt,
    collect,
    converted,
    ignored_fields_header,
    json_response,
    server_state,
)
from specserve.server.openai_format import ApiError, Finished, Piece, TokenBytes, chat_logprobs
from specserve.server.schemas import MAX_TOP_LOGPROBS, ChatRequest, Speculation
from specserve.server.state import Event, ServerState
from specserve.server.tools import StreamSplit, ToolCall
from specserve.server.tools import parse as parse_tool_calls

router = APIRouter()
LOGPROBS = "message.output_text.logprobs"  # the `include` value that asks for the text's log-probabilities


class InputText(BaseModel):
    type: Literal["input_text", "output_text", "text"]
    text: str


class MessageItem(BaseModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class FunctionCallItem(BaseModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(BaseModel):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]
    id: str | None = None
    status: str | None = None


class FunctionTool(BaseModel):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class NamedFunction(BaseModel):
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str = "response"
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextOptions(BaseModel):
    format: TextFormat = TextFormat()


class ResponsesRequest(BaseModel):
    # Fields this server does not know (store, metadata, reasoning, truncation, ...) are accepted and named in
    # a response header, as for chat completions.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[MessageItem | FunctionCallItem | FunctionCallOutputItem] = Field(min_length=1)
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool = True
    text: TextOptions | None = None
    max_output_tokens: int | None = Field(default=None, gt=0)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    user: str | None = None
    stream: bool = False
    # Of `include`, only LOGPROBS changes what this server returns; the others name outputs of tools it has not.
    include: list[str] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    speculation: Speculation = Speculation()

    @model_validator(mode="before")
    @classmethod
    def _function_tools_only(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for tool in data.get("tools") or ():
                if isinstance(tool, dict) and tool.get("type") != "function":
                    raise ValueError(f"tools: only function tools are supported, not {tool.get('type')!r}")
        return data

    @property
    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or ())

    @property
    def logprobs(self) -> bool:
        """Whether the text parts carry their tokens' log-probabilities (OpenAI: only when `include` asks)."""
        return LOGPROBS in (self.include or ())

    def conversation(self, earlier: list[dict]) -> list[dict]:
        """The conversation as chat messages: `earlier` turns (of `previous_response_id`), then this input's
        items. The instructions are not part of it: a later response has its own (OpenAI's rule)."""
        messages = list(earlier)
        items = [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for item in items:
            if isinstance(item, MessageItem):
                messages.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments},
                }
                if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                    messages[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                output = item.output if isinstance(item.output, str) else "".join(p.text for p in item.output)
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
        return messages

    def to_chat(self, conversation: list[dict], max_tokens: int | None) -> ChatRequest:
        """The chat request that runs this one (its validation errors are this request's)."""
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        chat: dict[str, Any] = {
            "model": self.model,
            "messages": system + conversation,
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "user": self.user,
            "stream": self.stream,
            "parallel_tool_calls": self.parallel_tool_calls,
            "speculation": self.speculation,
        }
        if self.logprobs:
            chat |= {"logprobs": True, "top_logprobs": self.top_logprobs or 0}
        if self.tools:
            chat["tools"] = [
                {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)} for t in self.tools
            ]
        if isinstance(self.tool_choice, NamedFunction):
            chat["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            chat["tool_choice"] = self.tool_choice
        form = self.text.format if self.text is not None else TextFormat()
        if form.type == "json_object":
            chat["response_format"] = {"type": "json_object"}
        elif form.type == "json_schema":
            schema = {"name": form.name, "schema": form.schema_ or {}, "strict": form.strict}
            chat["response_format"] = {"type": "json_schema", "json_schema": schema}
        return ChatRequest.model_validate(chat)

    def echo(self) -> dict:
        """The request's settings as a response repeats them."""
        tool_choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, NamedFunction) else self.tool_choice
        form = self.text.format if self.text is not None else TextFormat()
        return {
            "instructions": self.instructions,
            "tools": [t.model_dump(exclude_none=True) for t in self.tools or ()],
            "tool_choice": tool_choice or "auto",
            "parallel_tool_calls": self.parallel_tool_calls,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_logprobs": self.top_logprobs,
            "max_output_tokens": self.max_output_tokens,
            "previous_response_id": self.previous_response_id,
            "text": {
                "format": {"type": "text"} if form.type == "text" else form.model_dump(by_alias=True, exclude_none=True)
            },
            "metadata": (self.model_extra or {}).get("metadata") or {},
        }


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def text_part(text: str, logprobs: list[dict]) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}


def message_item(text: str, item_id: str, status: str = "completed", logprobs: list[dict] = ()) -> dict:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [text_part(text, list(logprobs))],
    }


def call_item(call: ToolCall, item_id: str, status: str = "completed") -> dict:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments,
        "status": status,
    }


def response_body(
    *, response_id: str, request: ResponsesRequest, model: str, output: list[dict], done: Finished | None
) -> dict:
    """A Response object: in progress (`done` None) or finished, `incomplete` when max_output_tokens cut it."""
    status = "in_progress" if done is None else "incomplete" if done.finish_reason == "length" else "completed"
    body = {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "model": model,
        "output": output,
        **request.echo(),
        "usage": None,
    }
    if done is not None:
        body["usage"] = {
            "input_tokens": done.prompt_tokens,
            "input_tokens_details": {"cached_tokens": done.cached_tokens},
            "output_tokens": done.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": done.prompt_tokens + done.completion_tokens,
        }
        body["speculative"] = done.speculative
    return body


def output_items(content: str | None, calls: list[ToolCall], logprobs: list[dict]) -> list[dict]:
    items = [message_item(content, new_id("msg"), logprobs=logprobs)] if content else []
    return items + [call_item(call, new_id("fc")) for call in calls]


def text_logprobs(pieces: list[Piece], text: str | None, token_bytes: TokenBytes) -> list[dict]:
    """The log-probabilities of the tokens that wrote `text`, the reply's text before any tool call: those of
    the pieces up to its length (a call's tokens are not the message's)."""
    entries, written = [], 0
    for piece in pieces:
        if written >= len(text or ""):
            break
        entries += piece.logprobs
        written += len(piece.text)
    return chat_logprobs(entries, token_bytes)["content"]


def assistant_turn(output: list[dict]) -> list[dict]:
    """The output items as the chat messages a later request continues from."""
    text = "".join(part["text"] for item in output if item["type"] == "message" for part in item["content"])
    calls = [
        {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
        for item in output
        if item["type"] == "function_call"
    ]
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return [message]


class ResponseEvents:
    """The stream of one response: `response.created`, text deltas of one message item, function call items,
    `response.completed` (or `response.incomplete`, after which `final` is the whole response); each a
    server-sent event naming its type."""

    def __init__(self, *, response_id: str, request: ResponsesRequest, model: str):
        self.response_id, self.request, self.model = response_id, request, model
        self.sequence = 0
        self.output: list[dict] = []
        self.message_id: str | None = None
        self.text = ""
        self.logprobs: list[dict] = []
        self.final: dict | None = None

    def _event(self, kind: str, **fields: Any) -> str:
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(body)}\n\n"

    def _text_event(self, kind: str, **fields: Any) -> str:
        """An event of the message item's one text part."""
        return self._event(kind, item_id=self.message_id, output_index=0, content_index=0, **fields)

    def _body(self, done: Finished | None) -> dict:
        return response_body(
            response_id=self.response_id, request=self.request, model=self.model, output=self.output, done=done
        )

    def start(self) -> list[str]:
        body = self._body(None)
        return [self._event("response.created", response=body), self._event("response.in_progress", response=body)]

    def delta(self, text: str, logprobs: list[dict]) -> list[str]:
        """The events of more text, with the log-probabilities of the tokens that wrote it."""
        if not text:
            return []
        events = []
        if self.message_id is None:
            self.message_id = new_id("msg")
            item = {**message_item("", self.message_id, "in_progress"), "content": []}
            events.append(self._event("response.output_item.added", output_index=0, item=item))
            events.append(self._text_event("response.content_part.added", part=text_part("", [])))
        self.text += text
        self.logprobs += logprobs
        events.append(self._text_event("response.output_text.delta", delta=text, logprobs=logprobs))
        return events

    def finish(self, done: Finished, calls: list[ToolCall]) -> list[str]:
        events = []
        if self.message_id is not None:
            part = text_part(self.text, self.logprobs)
            events.append(self._text_event("response.output_text.done", text=self.text, logprobs=self.logprobs))
            events.append(self._text_event("response.content_part.done", part=part))
            self.output.append(message_item(self.text, self.message_id, logprobs=self.logprobs))
            events.append(self._event("response.output_item.done", output_index=0, item=self.output[-1]))
        for call in calls:
            at, item_id = {"output_index": len(self.output)}, new_id("fc")
            added = call_item(ToolCall(call.name, "", call.id), item_id, "in_progress")
            events.append(self._event("response.output_item.added", **at, item=added))
            events.append(
                self._event("response.function_call_arguments.delta", item_id=item_id, **at, delta=call.arguments)
            )
            events.append(
                self._event("response.function_call_arguments.done", item_id=item_id, **at, arguments=call.arguments)
            )
            self.output.append(call_item(call, item_id))
            events.append(self._event("response.output_item.done", **at, item=self.output[-1]))
        self.final = self._body(done)
        kind = "response.incomplete" if self.final["status"] == "incomplete" else "response.completed"
        events.append(self._event(kind, response=self.final))
        return events


@router.post("/v1/responses", responses=COMPLETION_RESPONSES)
async def responses(body: ResponsesRequest, request: Request):
    """OpenAI's Responses API, run as the chat request it amounts to (`ResponsesRequest.to_chat`). The store
    may be Redis: it is read and written off the event loop, as the response cache is."""
    state = server_state(request)
    runtime = state.ready()
    earlier: list[dict] = []
    if body.previous_response_id is not None:
        if (found := await asyncio.to_thread(state.conversations.get, body.previous_response_id)) is None:
            message = f"previous_response_id: no stored response has id {body.previous_response_id!r}"
            raise ApiError(404, message, "previous_response_id")
        stored, before = found
        earlier = before + assistant_turn(stored["output"])
    conversation = body.conversation(earlier)
    chat = converted(lambda: body.to_chat(conversation, max_tokens=body.max_output_tokens), param="input")
    ids = chat_prompt(runtime, chat, param="input")
    events = await state.events("responses", request, chat, ids)
    response_id, model = new_id("resp"), state.model_name(runtime)
    headers = ignored_fields_header(body.ignored_fields)
    token_bytes = runtime.tokenizer.token_bytes
    if body.stream:
        writer = ResponseEvents(response_id=response_id, request=body, model=model)
        stream = _responses_sse(state, conversation, events, writer, tools=chat.may_call_tools, token_bytes=token_bytes)
        headers["Cache-Control"] = "no-cache"
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
    pieces, done = await collect(events)
    text: str | None = "".join(p.text for p in pieces)
    calls = []
    if chat.may_call_tools:
        text, calls = parse_tool_calls(text)
    output = output_items(text, calls, text_logprobs(pieces, text, token_bytes))
    reply = response_body(response_id=response_id, request=body, model=model, output=output, done=done)
    await asyncio.to_thread(state.conversations.put, reply, conversation)
    return json_response(reply, headers)


async def _responses_sse(
    state: ServerState,
    conversation: list[dict],
    events: AsyncIterator[Event],
    stream: ResponseEvents,
    *,
    tools: bool,
    token_bytes: TokenBytes,
) -> AsyncIterator[str]:
    """The documented event sequence; text streams until a tool call begins, the calls come last. Text held
    back (it may begin a call) keeps its tokens' log-probabilities until it is released; a call's are dropped."""
    calls = StreamSplit() if tools else None
    held: list[TokenLogprob] = []
    for line in stream.start():
        yield line
    try:
        async with aclosing(events):
            async for event in events:
                if isinstance(event, Finished):
                    rest, found = calls.finish() if calls is not None else ("", [])
                    logprobs = chat_logprobs(held, token_bytes)["content"] if rest and not found else []
                    for line in stream.delta(rest, logprobs) + stream.finish(event, found):
                        yield line
                    await asyncio.to_thread(state.conversations.put, stream.final, conversation)
                    continue
                held += event.logprobs
                text = calls.push(event.text) if calls is not None else event.text
                if text:
                    logprobs, held = chat_logprobs(held, token_bytes)["content"], []
                    for line in stream.delta(text, logprobs):
                        yield line
    except ApiError as exc:  # the headers are gone: report in-band, as the Responses API does
        yield f"event: error\ndata: {json.dumps({'type': 'error', 'code': exc.kind, 'message': exc.message})}\n\n"
