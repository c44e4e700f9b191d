"""`RemoteTarget`: a `TargetSession` whose target pass runs on a verifier service (see cluster/verifier/service.py).

The loop in engine/loop.py uses it exactly like a local target. Each session is one gRPC stream to one
replica (session affinity: the replica keeps the KV cache). The client keeps the list of tokens the
verifier's cache holds, so when a replica dies mid-stream or evicts the session, the session re-opens on
another replica with that context, sends the same window again and carries on: no gap, no duplicate.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from dataclasses import dataclass

import grpc

from specserve import SpecserveError
from specserve.cluster import verifier_pb2 as pb
from specserve.cluster.client.router import HEALTH_EVERY_S, Replica, VerifierPool
from specserve.cluster.protocol import params_to_wire, window_to_wire
from specserve.engine.target import Window
from specserve.engine.verify import Verdict

log = logging.getLogger("specserve.remote")
SESSION_TIMEOUT_S = 6 * 3600.0  # deadline of a whole stream; each window has its own (ClientOptions)
MAX_REOPENS = 6  # per window: enough to try every replica of a small pool and wait for one to come back
_FATAL = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class StreamFailed(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name.lower()}: {details}")
        self.code, self.details = code, details


class _Stream:
    """One bidirectional call: messages go out through a queue, replies come in through a reader thread
    (so waiting for a reply can have a deadline)."""

    def __init__(self, replica: Replica, pool: VerifierPool, first: pb.ClientMessage, metadata: tuple):
        self.replica = replica
        self._out: queue.Queue[pb.ClientMessage | None] = queue.Queue()
        self._in: queue.Queue[pb.Reply | StreamFailed] = queue.Queue()
        self._out.put(first)
        self._call = replica.stub.Session(self._requests(), metadata=metadata, timeout=SESSION_TIMEOUT_S)
        threading.Thread(target=self._read, name="specserve-stream-reader", daemon=True).start()

    def _requests(self):
        while (message := self._out.get()) is not None:
            yield message

    def _read(self) -> None:
        try:
            for reply in self._call:
                self._in.put(reply)
            self._in.put(StreamFailed(grpc.StatusCode.ABORTED, "the verifier ended the stream"))
        except grpc.RpcError as exc:
            self._in.put(StreamFailed(exc.code(), exc.details() or ""))

    def send(self, message: pb.ClientMessage) -> None:
        self._out.put(message)

    def receive(self, timeout: float) -> pb.Reply:
        try:
            item = self._in.get(timeout=timeout)
        except queue.Empty:
            self._call.cancel()
            raise StreamFailed(grpc.StatusCode.DEADLINE_EXCEEDED, f"no verdict within {timeout:.0f} s") from None
        if isinstance(item, StreamFailed):
            raise item
        return item

    def close(self) -> None:
        self._out.put(pb.ClientMessage(close=pb.Close()))
        self._out.put(None)


@dataclass(frozen=True)
class RemoteVerifier:
    """The verifier replicas of a pool: every session's window is sent before any verdict is awaited, so the
    round trips overlap and a replica batches the windows that arrive together."""

    pool: VerifierPool

    def run(self, sessions: list[RemoteTarget], windows: list[Window]) -> list[Verdict | None]:
        for session, window in zip(sessions, windows, strict=True):
            session._send(window)
        return [session._receive(window) for session, window in zip(sessions, windows, strict=True)]


def _close_stream(pool: VerifierPool, holder: list) -> None:
    if holder:
        stream = holder.pop()
        stream.close()
        pool.release(stream.replica)


class RemoteTarget:
    """One generation's target session on a verifier replica."""

    def __init__(self, pool: VerifierPool, trace_context: dict[str, str] | None = None):
        """`trace_context`: the request's W3C trace context, sent with each stream so that the verifier's
        spans are children of the request's."""
        self.pool = pool
        self._metadata = (*pool.metadata, *(trace_context or {}).items())
        self.n_ctx = pool.n_ctx
        self.cached_prefix = 0  # a verifier's session starts empty (prefix reuse is a local runtime's)
        self.verifier = RemoteVerifier(pool)
        self.failovers = 0  # sessions re-opened with a replay (for stats and tests)
        self._cache: list[int] = []  # the tokens the verifier's KV cache holds for this session
        self._prompt_tokens = 0  # how many of them came as prompt chunks (up to the first verdict)
        self._prompt_done = False
        self._open_params: pb.SamplingParams | None = None
        self._wire: pb.ClientMessage | None = None  # the window in flight, to resend after a failover
        self._stream_holder: list[_Stream] = []  # a list so the finalizer can close it without holding self
        weakref.finalize(self, _close_stream, pool, self._stream_holder)

    @property
    def round_trip_s(self) -> float:
        return self.pool.round_trip_s

    @property
    def n_past(self) -> int:
        return len(self._cache)

    @property
    def replica(self) -> str | None:
        return self._stream_holder[0].replica.address if self._stream_holder else None

    def reset(self) -> None:
        self.close()
        self._cache = []
        self._prompt_tokens, self._prompt_done = 0, False

    def close(self) -> None:
        _close_stream(self.pool, self._stream_holder)

    def _send(self, window: Window) -> None:
        self._open_params = params_to_wire(window.params)
        self._wire = pb.ClientMessage(window=window_to_wire(window))
        if not self._stream_holder:
            self._open()
        self._stream_holder[0].send(self._wire)

    def _open(self, avoid: Replica | None = None) -> None:
        """A new stream on the least loaded replica, rebuilding the cache there from the known context."""
        replica = self.pool.acquire(avoid)
        first = pb.ClientMessage(
            open=pb.Open(params=self._open_params, context=self._cache, prompt_tokens=self._prompt_tokens)
        )
        self._stream_holder.append(_Stream(replica, self.pool, first, self._metadata))

    def _receive(self, window: Window) -> Verdict | None:
        timeout = self.pool.options.window_timeout_s + self.pool.round_trip_s
        for attempt in range(MAX_REOPENS + 1):
            stream = self._stream_holder[0]
            try:
                reply = stream.receive(timeout)
                break
            except StreamFailed as exc:
                if exc.code in _FATAL:
                    self.close()
                    raise SpecserveError(f"verifier {stream.replica.address} refused the window: {exc}") from None
                self._failover(stream, exc, attempt)
        else:
            raise SpecserveError(f"no verifier could take the session after {MAX_REOPENS} attempts")
        self._cache.extend(window.append)
        if not self._prompt_done:  # prompt chunks run until the first verdict
            self._prompt_tokens, self._prompt_done = len(self._cache), reply.has_verdict
        if not reply.has_verdict:
            return None
        self._cache.extend(window.drafts[: reply.accepted])
        expected = reply.expected_accepted if reply.HasField("expected_accepted") else None
        confidence = reply.confidence if reply.HasField("confidence") else None
        return Verdict(
            accepted=reply.accepted, next_token=reply.next_token, expected_accepted=expected, confidence=confidence
        )

    def _failover(self, stream: _Stream, exc: StreamFailed, attempt: int) -> None:
        evicted = exc.code == grpc.StatusCode.FAILED_PRECONDITION
        if not evicted:  # the replica itself failed: stop routing to it until a health check passes
            self.pool.mark_down(stream.replica, str(exc))
        log.warning(
            "session on %s lost (%s); re-opening with %d tokens of context", stream.replica.address, exc, self.n_past
        )
        self.close()
        while True:
            try:
                self._open(avoid=None if evicted else stream.replica)
                break
            except SpecserveError:
                if attempt >= MAX_REOPENS:
                    raise
                attempt += 1
                time.sleep(HEALTH_EVERY_S)  # every replica is down: wait for a health check to see one back
        self.failovers += 1
        self._stream_holder[0].send(self._wire)
