"""Request bodies of the OpenAI-compatible API (pydantic), with specserve's `speculation` extension."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from specserve.config import METHODS, REMOTE_K_MAX, TOLERANCE_MAX_DELTA
from specserve.engine.sampling import SamplingParams
from specserve.engine.verify import ToleranceController, tolerance_rule


class Speculation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal[METHODS] = "draft"
    # capped by the runtime at what is exact on its target (`Runtime.k_limit`)
    k: Annotated[int, Field(ge=0, le=REMOTE_K_MAX)] | Literal["auto"] | None = None
    # Lossy, opt-in: accept draft tokens the target finds at most `delta` nats less likely than the draft;
    # with `target_acceptance`, delta is calibrated online to hold that acceptance rate instead.
    acceptance: Literal["exact", "tolerance"] = "exact"
    delta: float = Field(default=1.0, ge=0.0, le=TOLERANCE_MAX_DELTA)
    target_acceptance: float | None = Field(default=None, gt=0.0, le=1.0)

    def tolerance(self) -> float | ToleranceController | None:
        if self.acceptance == "exact":
            return None
        return tolerance_rule(self.delta, self.target_acceptance)


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionParams(BaseModel):
    model: str | None = None
    max_tokens: int = Field(default=128, gt=0)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = Field(default=None)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    speculation: Speculation = Speculation()

    def logprob_count(self) -> int | None:
        """How many alternatives to report with each token's log-probability (None: no logprobs)."""
        return None

    def sampling(self) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            max_tokens=self.max_tokens,
            stop=stop,
        )


MAX_TOP_LOGPROBS = 20


class CompletionRequest(CompletionParams):
    prompt: str = Field(min_length=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: Literal[False] = False  # the prompt's own log-probabilities are not computed

    def logprob_count(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class OtherPart(BaseModel):
    """A content part this text-only model cannot take (image_url, input_audio, file, ...)."""

    model_config = ConfigDict(extra="allow")
    type: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart | OtherPart]

    @field_validator("content")
    @classmethod
    def _text_only(cls, content: str | list[TextPart | OtherPart]) -> str:
        """Content parts are joined into one text, as OpenAI's own text models read them."""
        if isinstance(content, str):
            return content
        if other := sorted({part.type for part in content if not isinstance(part, TextPart)}):
            raise ValueError(f"content parts of type {', '.join(other)} are not supported: the model reads text only")
        return "".join(part.text for part in content)

    def rendered(self) -> dict[str, str]:
        """The message as the chat template takes it (`developer` is the newer name of `system`)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class ChatRequest(CompletionParams):
    max_completion_tokens: int | None = Field(default=None, gt=0)  # the newer name of max_tokens
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None
