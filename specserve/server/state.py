"""What one server process holds: the runtime (possibly still loading), the scheduler, the response cache,
metrics and tracer; and the life of one request from its token ids to its stream of events.

Events are `Piece`s then one `Finished`; routes.py turns them into OpenAI's shapes. A stream that is left
early (client gone, error) cancels its job, and only a completed greedy request without logprobs is cached.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from opentelemetry import propagate, trace

from specserve import SpecserveError
from specserve.config import ServerConfig
from specserve.engine import compute
from specserve.engine.model import ContextOverflowError
from specserve.engine.sampling import SamplingParams
from specserve.runtime import Runtime
from specserve.server.metrics import Metrics
from specserve.server.openai_format import (
    ApiError,
    Finished,
    Piece,
    TokenOrigin,
    finished,
    request_log,
    token_origin,
)
from specserve.server.response_cache import CachedResponse, ConversationStore, ResponseCache, cache_key
from specserve.server.scheduler import Job, QueueFull, Scheduler, StreamStalled
from specserve.server.schemas import CompletionParams
from specserve.server.tools import repeats_a_call

log = logging.getLogger("specserve.server")
_DISCONNECT_POLL_S = 0.5
# Request fields that change a deterministic response (the drafter does not: output is the target's), with
# max_tokens as resolved (a request without one may take the context's room, which the server's n_ctx sets).
_KEY_FIELDS = {
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
    "json_schema",
    "gbnf",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
}

Event = Piece | Finished
_CLIENT_GONE = object()
# A 503's Retry-After: loading reports progress, a verifier is re-checked every second, a draining server
# is gone in its grace period (a balancer's next try goes elsewhere): poll again soon in each case.
NOT_READY_RETRY_S = 1.0


class ServerState:
    def __init__(
        self,
        runtime: Runtime | Callable[[Callable[[str], None]], Runtime],
        metrics: Metrics,
        cache: ResponseCache,
        config: ServerConfig,
    ):
        """`runtime` may be a factory: `start` then loads it on a thread and `ready` answers 503 until done."""
        self.metrics, self.cache = metrics, cache
        self.conversations = ConversationStore(cache)  # finished /v1/responses, for previous_response_id
        self.config = config
        self.started = int(time.time())  # /v1/models' `created`
        self.draining = False  # shutting down: running requests finish, new ones get 503
        self.runtime: Runtime | None = runtime if isinstance(runtime, Runtime) else None
        self._factory = None if isinstance(runtime, Runtime) else runtime
        if self.runtime is not None:
            metrics.set_model_name(self.model_name(self.runtime))
        self.load_error: str | None = None
        self.load_status: str | None = None  # what loading waits for, as the factory reports it
        self.scheduler: Scheduler | None = None
        self.on_load_failure: Callable[[], None] | None = None  # what ends the server (`app.serve` sets it)
        self.tracer = trace.get_tracer("specserve")

    def start(self) -> None:
        self.scheduler = Scheduler(self.metrics, config=self.config, when_idle=self._refresh_costs)
        if self._factory is not None:
            threading.Thread(target=self._load, name="specserve-load", daemon=True).start()

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        self.cache.close()

    def _load(self) -> None:
        try:
            self.runtime = self._factory(self._report)
            self.metrics.set_model_name(self.model_name(self.runtime))
            rt = self.runtime
            log.info("serving %s on %s: %s", rt.target_name, rt.target_backend, rt.target_weights)
            if rt.draft is not None:
                log.info("drafting with %s on %s: %s", rt.draft.model_path.name, rt.draft.name, rt.draft_weights)
        except SpecserveError as exc:  # a reason said in one line: a missing file, a model a backend cannot run
            log.error("loading the models failed: %s", exc)
            self._failed(str(exc))
        except Exception as exc:
            log.exception("loading the models failed")
            self._failed(str(exc))

    def _failed(self, error: str) -> None:
        """/health says why from now on; unless the config asks to stay up, the server then ends."""
        self.load_error = error
        if self.on_load_failure is not None and not self.config.stay_up_on_failure:
            self.on_load_failure()

    def _report(self, status: str) -> None:
        self.load_status = status

    def _refresh_costs(self, wanted: Callable[[], bool]) -> None:  # on the scheduler thread, when no request runs
        if self.runtime is not None:
            self.runtime.refresh_costs(wanted)

    @property
    def in_flight(self) -> int:
        return self.scheduler.in_flight if self.scheduler is not None else 0

    def model_names(self, rt: Runtime) -> tuple[str, ...]:
        """The names the model is served under (`--served-model-name`; by default the file's)."""
        return self.config.served_model_names or (rt.target_name,)

    def model_name(self, rt: Runtime) -> str:
        """The name replies give: the first it is served under."""
        return self.model_names(rt)[0]

    def ready(self) -> Runtime:
        if self.draining:
            raise _unavailable("the server is shutting down")
        if self.runtime is None:
            reason = self.load_error or self.load_status or "the models are still loading"
            raise _unavailable(reason)
        return self.runtime

    async def events(
        self, endpoint: str, request: Request, body: CompletionParams, ids: list[int]
    ) -> AsyncIterator[Event]:
        """Start the request (or find it in the response cache); raises ApiError before anything runs."""
        rt = self.ready()
        self._check_model(rt, body.model)
        _check(rt, body, ids)
        if (reason := rt.unavailable()) is not None:
            raise _unavailable(reason)
        sampling = body.sampling(room=rt.n_ctx - len(ids))
        traced = body.stream and body.speculation.trace
        key = None
        # deterministic: the same request gives the same text, whatever the drafter (the cache keeps no logprobs)
        if sampling.greedy and body.logprob_count() is None:
            key_fields = {**body.model_dump(include=_KEY_FIELDS), "max_tokens": sampling.max_tokens}
            if body.speculation.acceptance != "exact":  # lossy verification changes the text: part of the key
                key_fields["speculation"] = body.speculation.model_dump(exclude={"trace"})
            key = cache_key(rt.target_name, ids, {"endpoint": endpoint, **key_fields})
            if (hit := await asyncio.to_thread(self.cache.get, key)) is not None:
                self.metrics.requests.labels(endpoint=endpoint, status="200").inc()
                return _replay(hit, traced)
        job = await self._submit(rt, endpoint, body, sampling, ids)
        return self._follow(job, request, key, endpoint, traced)

    async def _submit(
        self, rt: Runtime, endpoint: str, body: CompletionParams, sampling: SamplingParams, ids: list[int]
    ) -> Job:
        method = body.speculation.method or self.config.speculation
        if method not in rt.methods:  # no draft model loaded: fall back to a model-free drafter
            method = "suffix" if method == "suffix-draft" else "ngram"
        attributes = {"specserve.endpoint": endpoint, "specserve.method": method, "specserve.prompt_tokens": len(ids)}
        span = self.tracer.start_span("specserve.request", attributes=attributes)
        trace_context: dict[str, str] = {}  # W3C trace context: a remote verifier's spans join this trace
        propagate.inject(trace_context, context=trace.set_span_in_context(span))
        try:
            # A new generation copies cached prompt prefixes (KV): work for the compute thread (engine/compute.py),
            # where it cannot overlap a pass, and which the event loop does not wait for.
            generation = await asyncio.to_thread(
                compute.run,
                rt.generate,
                ids,
                sampling,
                method=method,
                k=body.speculation.k,
                tolerance=body.speculation.tolerance(),
                user=body.user,
                logprobs=body.logprob_count(),
                grammar=body.grammar(rt.tokenizer),
                trace_context=trace_context,
            )
        except (ContextOverflowError, SpecserveError, ValueError) as exc:
            span.end()
            raise ApiError(400, str(exc)) from None
        try:
            return self.scheduler.submit(generation, span, ends_at=repeats_a_call if body.may_call_tools else None)
        except QueueFull as exc:
            span.end()
            self.metrics.requests.labels(endpoint=endpoint, status="429").inc()
            message = f"server busy: {exc}; retry after Retry-After seconds"
            raise ApiError(429, message, kind="rate_limit_error", retry_after_s=exc.retry_after_s) from None

    async def _follow(
        self, job: Job, request: Request, key: str | None, endpoint: str, traced: bool
    ) -> AsyncIterator[Event]:
        """Events of a running job. Cancels it if the client goes away; caches the result when it completed.
        `traced`: each piece says where its token came from."""
        pieces: list[str] = []
        status = "499"
        try:
            while (item := await self._next_item(job, request)) is not None:
                if item is _CLIENT_GONE:
                    return
                if isinstance(item, StreamStalled):
                    status = "408"
                    raise ApiError(408, str(item), kind="timeout_error")
                if isinstance(item, BaseException):
                    status = "500"
                    raise ApiError(500, f"generation failed: {item}", kind="server_error")
                for emitted in item:
                    if emitted.text:
                        pieces.append(emitted.text)
                    if emitted.text or emitted.logprob is not None:
                        logprobs = (emitted.logprob,) if emitted.logprob is not None else ()
                        yield Piece(emitted.text, logprobs, token_origin(emitted) if traced else None)
            status = "200"
            done = finished(job.generation)
            self.metrics.prefix_reused.inc(job.generation.stats.prefix_reused)
            log.info(json.dumps({"event": "request", "endpoint": endpoint, **request_log(job.generation)}))
            if key is not None:
                cached = CachedResponse(
                    pieces=pieces,
                    finish_reason=done.finish_reason,
                    prompt_tokens=done.prompt_tokens,
                    completion_tokens=done.completion_tokens,
                    spec_stats=done.speculative,
                    stop_string=done.stop_string,
                )
                await asyncio.to_thread(self.cache.put, key, cached)
            yield done
        finally:
            if status != "200":
                self.scheduler.cancel(job)
            self.metrics.requests.labels(endpoint=endpoint, status=status).inc()
            stats = job.generation.stats
            job.span.set_attribute("specserve.status", status)
            job.span.set_attribute("specserve.completion_tokens", stats.generated)
            job.span.set_attribute("specserve.accepted", stats.accepted)
            job.span.end()

    def _check_model(self, rt: Runtime, requested: str | None) -> None:
        names = self.model_names(rt)
        if self.config.strict_model_name and requested not in (None, rt.target_name, *names):
            raise ApiError(404, f"model {requested!r} does not exist; this server has {names[0]!r}", "model")

    @staticmethod
    async def _next_item(job: Job, request: Request):
        """The job's next item: a list of Emitted, an error, None at its end, or _CLIENT_GONE."""
        while True:
            try:
                item = await asyncio.wait_for(job.events.get(), _DISCONNECT_POLL_S)
                job.taken += 1
                return item
            except TimeoutError:
                if await request.is_disconnected():
                    return _CLIENT_GONE


def _unavailable(reason: str) -> ApiError:
    return ApiError(503, reason, kind="service_unavailable", retry_after_s=NOT_READY_RETRY_S)


def _check(rt: Runtime, body: CompletionParams, ids: list[int]) -> None:
    vocab = rt.tokenizer.n_vocab
    if bad := [token for token in body.logit_bias or {} if not 0 <= token < vocab]:
        raise ApiError(400, f"logit_bias names tokens outside the vocabulary of {vocab}: {bad[:5]}", "logit_bias")
    if bad := [token for token in body.stop_token_ids or () if not 0 <= token < vocab]:
        raise ApiError(
            400, f"stop_token_ids names tokens outside the vocabulary of {vocab}: {bad[:5]}", "stop_token_ids"
        )
    n_ctx = rt.n_ctx
    if len(ids) >= n_ctx:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; the context holds {n_ctx}", "prompt")
    if body.max_tokens is not None and len(ids) + body.max_tokens > n_ctx:
        raise ApiError(
            400,
            f"prompt ({len(ids)} tokens) + max_tokens ({body.max_tokens}) exceeds the context of {n_ctx} tokens",
            "max_tokens",
        )


async def _replay(hit: CachedResponse, traced: bool) -> AsyncIterator[Event]:
    origin = TokenOrigin("cache") if traced else None
    for piece in hit.pieces:
        yield Piece(piece, origin=origin)
    stats = {**hit.spec_stats, "cached": True}
    yield Finished(hit.finish_reason, hit.prompt_tokens, hit.completion_tokens, stats, stop_string=hit.stop_string)
