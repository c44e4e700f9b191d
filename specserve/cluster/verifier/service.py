"""`specserve verifier`: the target model behind gRPC, for front-ends that run the draft elsewhere.

Each gRPC stream is one generation session with its own KV cache on the target (a `LocalTarget`), so only
new tokens travel. The asyncio event loop handles the network and the session table; one worker thread owns
the model and runs `target_pass` on every window that is waiting, so windows from several clients that
arrive together share one forward pass. Sessions are bounded (least recently used is evicted) and expire
when idle; a client whose session is gone gets FAILED_PRECONDITION and replays its context.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import queue
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field

import grpc
import numpy as np
from opentelemetry import propagate, trace

from specserve import SpecserveError
from specserve.cluster import verifier_pb2 as pb
from specserve.cluster import verifier_pb2_grpc as pb_grpc
from specserve.cluster.protocol import AUTH_HEADER, ProtocolError, params_from_wire, window_from_wire
from specserve.cluster.verifier.metrics import VerifierMetrics
from specserve.config import PREFILL_CHUNK, REMOTE_K_MAX, VERIFIER_MAX_BATCH, VERIFIER_MAX_SESSIONS, VerifierConfig
from specserve.engine.costs import CALIBRATION_TEXT, measure_rows
from specserve.engine.model import Model
from specserve.engine.sampling import SamplingParams
from specserve.engine.target import LocalTarget, Window, target_pass
from specserve.engine.verify import Verdict
from specserve.models.quantize import weights_in_words
from specserve.models.tokenizer import Tokenizer
from specserve.tracing import setup_tracing

log = logging.getLogger("specserve.verifier")
_tracer = trace.get_tracer("specserve.verifier")
# Generated tokens are replayed in windows this small: a batch-invariant backend computes them row by row,
# exactly like the one-token steps and draft windows they first came in (torch_int8: up to 32 rows).
REPLAY_WINDOW = 16
CALIBRATED_WINDOWS = tuple(range(1, REMOTE_K_MAX + 2))  # window sizes whose cost front-ends get


class SessionEvicted(Exception):
    pass


@dataclass(eq=False)
class _Session:
    id: str
    target: LocalTarget
    params: SamplingParams
    rng: np.random.Generator  # verification randomness lives here, seeded from the request's seed
    last_used: float = field(default_factory=time.monotonic)
    evicted: str | None = None  # why, once evicted


@dataclass(eq=False)
class _Job:
    session: _Session
    window: Window
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


@dataclass(eq=False)
class _Release:
    session: _Session  # closed, evicted or expired: its KV (a llama.cpp context) goes back now


class TargetWorker:
    """One thread that owns the target model: drains the queue, one batched pass per drain. Sessions that
    end are released on this thread too (their KV reset, a llama.cpp context back to its pool, so the next
    session reuses it): releasing on the event loop could race a pass that is still evaluating them."""

    def __init__(self, metrics: VerifierMetrics, max_batch: int = VERIFIER_MAX_BATCH) -> None:
        self.metrics, self.max_batch = metrics, max_batch
        self._queue: queue.Queue[_Job | _Release | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="specserve-verifier-worker", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def run(self, session: _Session, window: Window) -> Verdict | None:
        loop = asyncio.get_running_loop()
        job = _Job(session, window, loop, loop.create_future())
        self._queue.put(job)
        return await job.future

    def release(self, session: _Session) -> None:
        self._queue.put(_Release(session))

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            batch: list[_Job] = []
            released: list[_Session] = []
            while item is not None:
                if isinstance(item, _Release):
                    released.append(item.session)
                else:
                    batch.append(item)
                if len(batch) == self.max_batch:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this batch
            for session in released:  # first: a window of theirs still queued is skipped, not run on a reset cache
                session.evicted = session.evicted or "session closed"
                session.target.close()
            if batch:
                self._pass(batch)

    def _pass(self, batch: list[_Job]) -> None:
        live = []
        for j in batch:
            if j.session.evicted:
                self._finish(j, exc=SessionEvicted(j.session.evicted))
            else:
                live.append(j)
        if not live:
            return
        self.metrics.batch_windows.observe(len(live))
        self.metrics.batch_rows.observe(sum(len(j.window.append) + len(j.window.drafts) for j in live))
        try:
            verdicts = target_pass([j.session.target for j in live], [j.window for j in live])
        except Exception as exc:  # the sessions' caches are in an unknown state: evict, clients replay
            log.exception("target pass failed for %d windows", len(live))
            for j in live:
                j.session.evicted = f"session evicted: the target pass failed ({exc})"
                self.metrics.evictions.labels(reason="failed-pass").inc()
                self._finish(j, exc=SessionEvicted(j.session.evicted))
            return
        for j, verdict in zip(live, verdicts, strict=True):
            self._finish(j, result=verdict)

    @staticmethod
    def _finish(job: _Job, result: Verdict | None = None, exc: BaseException | None = None) -> None:
        def settle() -> None:
            if job.future.done():  # the stream went away meanwhile
                return
            if exc is not None:
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)

        job.loop.call_soon_threadsafe(settle)


class SessionTable:
    """Live sessions in least-recently-used order; bounded, with idle expiry. Event-loop thread only."""

    def __init__(self, model: Model, max_sessions: int, idle_s: float, metrics: VerifierMetrics, worker: TargetWorker):
        self.model, self.max_sessions, self.idle_s, self.metrics = model, max_sessions, idle_s, metrics
        self.worker = worker  # releases the sessions that leave the table
        self._sessions: collections.OrderedDict[str, _Session] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, params: SamplingParams) -> _Session:
        while len(self._sessions) >= self.max_sessions:
            _, oldest = self._sessions.popitem(last=False)
            oldest.evicted = (
                f"session evicted: the verifier holds at most {self.max_sessions} sessions and this one was the "
                "least recently used; re-open it with its context"
            )
            log.info("evicted session %s (LRU, %d sessions max)", oldest.id, self.max_sessions)
            self.metrics.evictions.labels(reason="lru").inc()
            self.worker.release(oldest)
        session = _Session(
            uuid.uuid4().hex[:12], LocalTarget(self.model.new_sequence()), params, np.random.default_rng(params.seed)
        )
        self._sessions[session.id] = session
        self.metrics.sessions.set(len(self._sessions))
        return session

    def touch(self, session: _Session) -> None:
        session.last_used = time.monotonic()
        if session.id in self._sessions:
            self._sessions.move_to_end(session.id)

    def close(self, session: _Session) -> None:
        if self._sessions.pop(session.id, None) is not None:  # else evicted or expired: released then
            self.worker.release(session)
        self.metrics.sessions.set(len(self._sessions))

    def expire(self) -> None:
        cutoff = time.monotonic() - self.idle_s
        for session in [s for s in self._sessions.values() if s.last_used < cutoff]:
            session.evicted = f"session expired after {self.idle_s:.0f} s idle; re-open it with its context"
            self._sessions.pop(session.id)
            log.info("expired session %s (idle)", session.id)
            self.metrics.evictions.labels(reason="idle").inc()
            self.worker.release(session)
        self.metrics.sessions.set(len(self._sessions))


class VerifierService(pb_grpc.VerifierServicer):
    def __init__(
        self,
        *,
        model: Model,
        tokenizer: Tokenizer,
        model_name: str,
        window_cost_s: dict[int, float],
        max_sessions: int = VERIFIER_MAX_SESSIONS,
        idle_s: float = 300.0,
        auth_token: str | None = None,
        max_batch: int = VERIFIER_MAX_BATCH,
    ):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.weights = weights_in_words(model.model_path, model.converted_to)
        self.window_cost_s = window_cost_s
        self.metrics = VerifierMetrics()
        self.worker = TargetWorker(self.metrics, max_batch)
        self.sessions = SessionTable(model, max_sessions, idle_s, self.metrics, self.worker)
        self.auth_token = auth_token
        self.expiry: asyncio.Task | None = None

    async def expire_idle(self) -> None:
        """Drop sessions idle longer than the timeout (their clients replay if they come back)."""
        while True:
            await asyncio.sleep(max(0.5, min(5.0, self.sessions.idle_s / 4)))
            self.sessions.expire()

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if not self.auth_token:
            return
        sent = dict(context.invocation_metadata() or ()).get(AUTH_HEADER, "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {self.auth_token}".encode()):
            reason = "no auth token" if not sent else "wrong auth token"
            log.warning("refused a call from %s: %s", context.peer(), reason)
            self.metrics.auth_failures.inc()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{reason}: this verifier requires --auth-token")

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoReply:
        await self._authorize(context)
        return pb.InfoReply(
            model=self.model_name,
            backend=self.model.name,
            weights=self.weights,
            n_ctx=self.model.n_ctx,
            n_vocab=self.tokenizer.n_vocab,
            tokenizer_digest=self.tokenizer.digest,
            chat_template=self.tokenizer.chat_template or "",
            window_cost_s=self.window_cost_s,
            sessions=len(self.sessions),
            max_sessions=self.sessions.max_sessions,
            queued=self.worker.queued,
        )

    async def Session(self, request_iterator, context: grpc.aio.ServicerContext):
        await self._authorize(context)
        session: _Session | None = None
        # The front-end's request span (W3C trace context in the metadata): this stream's spans are its children.
        parent = propagate.extract(dict(context.invocation_metadata() or ()))
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("kind")
                if kind == "open":
                    if session is not None:
                        self.sessions.close(session)
                    session = self.sessions.open(params_from_wire(message.open.params))
                    replayed = len(message.open.context)
                    self.metrics.replayed_tokens.inc(replayed)
                    attributes = {"specserve.session": session.id, "specserve.replayed_tokens": replayed}
                    with _tracer.start_as_current_span("verifier.open", context=parent, attributes=attributes):
                        await self._replay(session, list(message.open.context), message.open.prompt_tokens, context)
                elif kind == "window":
                    if session is None:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a window before open")
                    with _tracer.start_as_current_span("verifier.window", context=parent) as span:
                        reply = await self._window(session, message.window, context)
                        if reply.has_verdict:
                            self.metrics.windows.inc()
                            self.metrics.drafted.inc(len(message.window.drafts))
                            self.metrics.accepted.inc(reply.accepted)
                        span.set_attributes(
                            {
                                "specserve.session": session.id,
                                "specserve.rows": len(message.window.append) + len(message.window.drafts),
                                "specserve.drafted": len(message.window.drafts),
                                "specserve.accepted": reply.accepted,
                            }
                        )
                    yield reply
                elif kind == "close":
                    break
                else:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an empty message")
        finally:
            if session is not None:
                self.sessions.close(session)

    async def _replay(
        self, session: _Session, tokens: list[int], prompt_tokens: int, context: grpc.aio.ServicerContext
    ) -> None:
        """Rebuild a session's cache from its context (after failover or eviction) in the same chunks as the
        first time: a prefill chunk and a token window round differently (numerics must not change)."""
        if len(tokens) >= self.model.n_ctx or any(t < 0 or t >= self.tokenizer.n_vocab for t in tokens):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "replay context out of range")
        prompt_tokens = min(max(prompt_tokens, 0), len(tokens))
        bounds = [*range(0, prompt_tokens, PREFILL_CHUNK), *range(prompt_tokens, len(tokens), REPLAY_WINDOW)]
        for i, start in enumerate(bounds):
            end = bounds[i + 1] if i + 1 < len(bounds) else len(tokens)
            chunk = Window(
                append=tokens[start:end], drafts=[], probs=[], predict=False, params=session.params, rng=session.rng
            )
            await self._run(session, chunk, context)

    async def _window(self, session: _Session, wire: pb.Window, context: grpc.aio.ServicerContext) -> pb.Reply:
        start = time.perf_counter()
        try:
            window, added = window_from_wire(wire, self.tokenizer.n_vocab, session.params, session.rng)
        except ProtocolError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if session.target.n_past + added > self.model.n_ctx:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"window past the context of {self.model.n_ctx} tokens"
            )
        verdict = await self._run(session, window, context)
        reply = pb.Reply(server_s=time.perf_counter() - start)
        if verdict is not None:
            reply.has_verdict, reply.accepted, reply.next_token = True, verdict.accepted, verdict.next_token
            if verdict.expected_accepted is not None:
                reply.expected_accepted = verdict.expected_accepted
            if verdict.confidence is not None:
                reply.confidence = verdict.confidence
        return reply

    async def _run(self, session: _Session, window: Window, context: grpc.aio.ServicerContext) -> Verdict | None:
        if session.evicted:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, session.evicted)
        self.sessions.touch(session)
        try:
            verdict = await self.worker.run(session, window)
        except SessionEvicted as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        self.sessions.touch(session)
        return verdict


def server_credentials(cert: str, key: str) -> grpc.ServerCredentials:
    try:
        with open(key, "rb") as k, open(cert, "rb") as c:
            return grpc.ssl_server_credentials([(k.read(), c.read())])
    except OSError as exc:
        raise SpecserveError(f"cannot read TLS certificate or key: {exc}") from None


async def start_server(
    service: VerifierService, listen: str, credentials: grpc.ServerCredentials | None = None
) -> tuple[grpc.aio.Server, int]:
    """Start serving on HOST:PORT (port 0: any free one); returns the server and the bound port."""
    server = grpc.aio.server()
    pb_grpc.add_VerifierServicer_to_server(service, server)
    try:
        port = server.add_secure_port(listen, credentials) if credentials else server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise SpecserveError(f"cannot listen on {listen}: {exc}") from None
    await server.start()
    service.expiry = asyncio.create_task(service.expire_idle())
    return server, port


async def _serve(service: VerifierService, listen: str, credentials: grpc.ServerCredentials | None) -> None:
    server, port = await start_server(service, listen, credentials)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host = listen.rsplit(":", 1)[0]
    tls = "TLS" if credentials else "plaintext"
    auth = "auth token required" if service.auth_token else "no auth"
    print(f"specserve verifier: {service.model_name} listening on {host}:{port} ({tls}, {auth})", flush=True)
    print(f"specserve verifier: the target runs {service.weights}", flush=True)
    await stop.wait()
    service.expiry.cancel()
    await server.stop(grace=2)
    service.worker.stop()


def build_verifier(config: VerifierConfig, show_progress: bool = True) -> VerifierService:
    """The target loaded (`auto` picks its backend), its window costs measured: a verifier ready to serve,
    for `specserve verifier` and Ray's verifier actors alike."""
    from specserve.runtime import LocalRuntime

    runtime = LocalRuntime(config.engine, show_progress=show_progress)
    # front-ends draft at most as many tokens as the windows it reports the cost of: exact ones only
    windows = CALIBRATED_WINDOWS if runtime.exact_window is None else CALIBRATED_WINDOWS[: runtime.exact_window]
    costs = measure_rows(runtime.target.new_sequence(), runtime.tokenizer.encode(CALIBRATION_TEXT), windows, repeats=2)
    return VerifierService(
        model=runtime.target,
        tokenizer=runtime.tokenizer,
        model_name=runtime.target_name,
        window_cost_s=costs,
        max_sessions=config.max_sessions,
        idle_s=config.idle_timeout_s,
        auth_token=config.auth_token,
        max_batch=config.max_batch,
    )


def serve_verifier(config: VerifierConfig) -> int:
    """Load the target, measure its window costs, serve until SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    setup_tracing("specserve-verifier")
    credentials = server_credentials(config.tls_cert, config.tls_key) if config.tls_cert else None
    service = build_verifier(config)
    if config.metrics_port is not None:
        service.metrics.serve(config.metrics_port)
    asyncio.run(_serve(service, config.listen, credentials))
    return 0
