"""Request bodies of the OpenAI-compatible API (pydantic), with specserve's `speculation` extension."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from specserve.config import METHODS, REMOTE_K_MAX, TOLERANCE_MAX_DELTA
from specserve.engine.grammar import choice_grammar, gbnf_grammar, json_schema_grammar, regex_grammar
from specserve.engine.sampling import SamplingParams
from specserve.engine.verify import ToleranceController, tolerance_rule
from specserve.server.tools import CALL_CLOSE, CALL_OPEN, call_grammar

if TYPE_CHECKING:
    from specserve.models.tokenizer import Tokenizer


class Speculation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal[METHODS] | None = None  # None: the server's default (`specserve serve --speculation`)
    # capped by the runtime at what is exact on its target (`Runtime.k_limit`)
    k: Annotated[int, Field(ge=0, le=REMOTE_K_MAX)] | Literal["auto"] | None = None
    # Lossy, opt-in: accept draft tokens the target finds at most `delta` nats less likely than the draft;
    # with `target_acceptance`, delta is calibrated online to hold that acceptance rate instead.
    acceptance: Literal["exact", "tolerance"] = "exact"
    delta: float = Field(default=1.0, ge=0.0, le=TOLERANCE_MAX_DELTA)
    target_acceptance: float | None = Field(default=None, gt=0.0, le=1.0)
    # Streams only: each chunk says where its token came from (`specserve.token`, openai_format.TokenOrigin)
    trace: bool = False

    def tolerance(self) -> ToleranceController | None:
        if self.acceptance == "exact":
            return None
        return tolerance_rule(self.delta, self.target_acceptance)


class JsonSchema(BaseModel):
    name: str = "response"
    description: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: one of a JSON schema, a regex, a choice of strings or a grammar."""

    model_config = ConfigDict(extra="forbid")
    json_: dict | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(default=None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None


ANY_OBJECT = {"type": "object"}  # the schema of JSON mode (`json_object`)


def _schema_grammar(schema: dict | str) -> str:
    """The grammar of a JSON schema given as an object or as its JSON text (vLLM takes both)."""
    if isinstance(schema, dict):
        return json_schema_grammar(schema)
    try:
        parsed = json.loads(schema)
    except json.JSONDecodeError as exc:
        raise ValueError(f"a JSON schema given as text must be JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise ValueError("a JSON schema must be an object")
    return json_schema_grammar(parsed)


class StreamOptions(BaseModel):
    include_usage: bool = False


# Fields that would change the reply but are not honoured: a 400 names them rather than a reply that silently
# differs from what was asked (the value that changes nothing is accepted).
_CANNOT_HONOUR = {
    "best_of": (lambda v: v not in (None, 1), "best_of above 1 is not supported; use n"),
    "functions": (lambda v: v is not None, "the legacy functions field is not supported; use tools"),
    "function_call": (lambda v: v is not None, "the legacy function_call field is not supported; use tool_choice"),
    "modalities": (lambda v: v not in (None, ["text"]), "only text output is supported"),
    "audio": (lambda v: v is not None, "audio output is not supported"),
    "echo": (
        lambda v: v not in (None, False),
        "echo is not supported: prompt log-probabilities are not computed",
    ),
}


MAX_CHOICES = 16


class CompletionParams(BaseModel):
    # Clients send more than a server needs (OpenAI's store, metadata, service_tier, newer fields): unknown
    # fields are accepted, logged once per name and listed in a response header (`ignored_fields`).
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    # None (or -1, as llama.vscode sends): until the model stops or the context ends, as OpenAI, vLLM and
    # llama-server do; clients that never send it (Open WebUI, agent frameworks) get whole replies.
    max_tokens: int | None = Field(default=None, ge=-1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)  # vLLM's and llama-server's extension
    seed: int | None = None
    stop: str | list[str] | None = Field(default=None)
    stop_token_ids: list[int] | None = None  # vLLM's: token ids that end the reply like the end-of-sequence token
    ignore_eos: bool = False  # vLLM's: decode past end-of-sequence until max_tokens
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # vLLM's extension; logits are divided by it, so not so small that they overflow to infinity
    repetition_penalty: float = Field(default=1.0, ge=0.01, le=10.0)
    logit_bias: dict[int, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None  # token id -> bias
    response_format: ResponseFormat | None = None
    # vLLM's extensions: the reply follows this JSON schema, regex, choice of strings or Lark grammar ...
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(default=None, min_length=1)
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None  # ... as the newer vLLM spells them
    # llama-server's: a JSON schema, or a GBNF grammar
    json_schema: dict | None = None
    gbnf: str | None = Field(default=None, alias="grammar")
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)  # choice i: the reply with seed + i
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    speculation: Speculation = Speculation()

    @field_validator("max_tokens")
    @classmethod
    def _until_the_end(cls, max_tokens: int | None) -> int | None:
        if max_tokens == 0:
            raise ValueError("max_tokens must be at least 1 (or -1 or null: until the model stops)")
        return None if max_tokens == -1 else max_tokens

    @model_validator(mode="after")
    def _honoured(self) -> CompletionParams:
        for name, value in (self.model_extra or {}).items():
            if name in _CANNOT_HONOUR and _CANNOT_HONOUR[name][0](value):
                raise ValueError(f"{name}: {_CANNOT_HONOUR[name][1]}")
        return self

    @property
    def may_call_tools(self) -> bool:
        """Whether the reply may hold tool calls (chat with tools offered)."""
        return False

    @property
    def ignored_fields(self) -> list[str]:
        """The request's fields this server does not know (accepted: they change nothing it can tell)."""
        return sorted(self.model_extra or ())

    def logprob_count(self) -> int | None:
        """How many alternatives to report with each token's log-probability (None: no logprobs)."""
        return None

    def grammar(self, tokenizer: Tokenizer) -> str | None:
        """The llguidance grammar the reply must follow (engine/grammar.py), from whichever field asks (one at
        most: a 400 names them when several do)."""
        form, so = self.response_format, self.structured_outputs or StructuredOutputs()
        response_schema = None
        if form is not None and form.type != "text":
            response_schema = form.json_schema.schema_ if form.type == "json_schema" else ANY_OBJECT
        fields = {
            "response_format": (response_schema, _schema_grammar),
            "guided_json": (self.guided_json, _schema_grammar),
            "structured_outputs.json": (so.json_, _schema_grammar),
            "structured_outputs.json_object": (ANY_OBJECT if so.json_object else None, _schema_grammar),
            "json_schema": (self.json_schema, _schema_grammar),
            "guided_regex": (self.guided_regex, regex_grammar),
            "structured_outputs.regex": (so.regex, regex_grammar),
            "guided_choice": (self.guided_choice, choice_grammar),
            "structured_outputs.choice": (so.choice, choice_grammar),
            "guided_grammar": (self.guided_grammar, gbnf_grammar),
            "structured_outputs.grammar": (so.grammar, gbnf_grammar),
            "grammar": (self.gbnf, gbnf_grammar),
        }
        asked = {name: (value, make) for name, (value, make) in fields.items() if value is not None}
        if len(asked) > 1:
            raise ValueError(f"give one of {', '.join(asked)}, not several")
        return next(make(value) for value, make in asked.values()) if asked else None

    def sampling(self, *, room: int) -> SamplingParams:
        """The engine's settings; without max_tokens the reply may take the `room` the context has left."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            seed=self.seed,
            max_tokens=room if self.max_tokens is None else self.max_tokens,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=tuple(sorted((self.logit_bias or {}).items())),
        )


MAX_TOP_LOGPROBS = 20


class CompletionRequest(CompletionParams):
    prompt: str = Field(min_length=1)
    suffix: str | None = None  # fill in the middle: the reply goes between the prompt and this (server/infill.py)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def logprob_count(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class OtherPart(BaseModel):
    """A content part this text-only model cannot take (image_url, input_audio, file, ...)."""

    model_config = ConfigDict(extra="allow")
    type: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text

    def parsed(self) -> dict:
        try:
            arguments = json.loads(self.arguments or "{}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"tool call arguments of {self.name} are not JSON: {exc}") from None
        return {"name": self.name, "arguments": arguments}


class ToolCallIn(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart | OtherPart] | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    @field_validator("content")
    @classmethod
    def _text_only(cls, content: str | list[TextPart | OtherPart] | None) -> str | None:
        """Content parts are joined into one text, as OpenAI's own text models read them."""
        if content is None or isinstance(content, str):
            return content
        if other := sorted({part.type for part in content if not isinstance(part, TextPart)}):
            raise ValueError(f"content parts of type {', '.join(other)} are not supported: the model reads text only")
        return "".join(part.text for part in content)

    def rendered(self) -> dict:
        """The message as the chat template takes it (`developer` is the newer name of `system`; calls with
        their arguments as objects, as Hugging Face templates expect them)."""
        message = {"role": "system" if self.role == "developer" else self.role, "content": self.content or ""}
        if self.tool_calls:
            message["tool_calls"] = [{"type": "function", "function": c.function.parsed()} for c in self.tool_calls]
        return message


class Function(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: Function


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: dict[Literal["name"], str]


class ChatRequest(CompletionParams):
    max_completion_tokens: int | None = Field(default=None, gt=0)  # the newer name of max_tokens
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.get("name")
            if name not in {t.function.name for t in self.tools}:
                raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
        return self

    @property
    def may_call_tools(self) -> bool:
        return self.offered_tools is not None

    @property
    def offered_tools(self) -> list[dict] | None:
        """The tools the chat template lists (none with tool_choice "none")."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def grammar(self, tokenizer: Tokenizer) -> str | None:
        """With tool_choice "required" or a named function the reply is calls of those functions."""
        choice, asked = self.tool_choice, super().grammar(tokenizer)
        if not self.tools or choice in (None, "none", "auto"):
            return asked
        if asked is not None:
            raise ValueError(
                "tool_choice required or a named function cannot be combined with response_format or another "
                "field that constrains the reply"
            )
        named = choice.function["name"] if isinstance(choice, NamedToolChoice) else None
        functions = [t.function.model_dump() for t in self.tools if named in (None, t.function.name)]
        (open_token,), (close_token,) = (tokenizer.encode(tag, special=True) for tag in (CALL_OPEN, CALL_CLOSE))
        return call_grammar(functions, open_token, close_token, self.parallel_tool_calls)

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    """llama-server's POST /tokenize."""

    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    """llama-server's POST /detokenize."""

    tokens: list[int]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body, which every 4xx and 5xx of this server has (openai_format.error_body); Anthropic's
    on its Messages API has these fields too, and `"type": "error"` beside them (anthropic.error_body)."""

    error: ErrorDetail
