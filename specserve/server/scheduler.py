"""One thread owns the models and runs every admitted request in a shared batch.

Requests wait in a bounded queue (full -> `QueueFull`, which the HTTP layer turns into 429 with the
time the waiting requests need to start as its Retry-After, so that turned-away clients come back when
there is room rather than every second); up to
`max_batch` of them run together, each `engine.loop.step` drafting for all of them in lockstep and
verifying all their windows in one target pass. Events go back to each request's asyncio queue.
A cancelled request (client gone) leaves the batch at the next step and its KV cache is dropped. So does one
whose client stopped reading: its queue is the stream's buffer, and past `stream_buffer` unread steps the
request ends with `StreamStalled` (the other streams never wait for it: posting does not block).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from opentelemetry import trace

from specserve.config import ServerConfig
from specserve.engine.loop import Emitted, Generation, Step, step
from specserve.server.metrics import Metrics

log = logging.getLogger("specserve.scheduler")
_RATE_WINDOW = 32  # recent request completions behind the completion rate (the 429's Retry-After)
_EPOCH_OFFSET_NS = time.time_ns() - time.perf_counter_ns()  # perf_counter -> wall clock, for span times


class QueueFull(Exception):
    """More requests in flight than the server admits; `retry_after_s`: when a retry is likely admitted."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StreamStalled(Exception):
    """The client left too much of its stream unread: the request was cancelled."""


@dataclass(eq=False)
class Job:
    generation: Generation
    loop: asyncio.AbstractEventLoop
    span: trace.Span | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # lists of Emitted, then None or an error
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None  # when its first token came out of a step
    ends_at: Callable[[str], bool] | None = None  # ends the reply early when true of its text so far
    deadline: float = float("inf")  # perf_counter time past which it ends with finish_reason "length"
    posted: int = 0  # items the scheduler put in `events` ...
    taken: int = 0  # ... and the items the stream took out (its consumer counts them)

    def post(self, item: list[Emitted] | BaseException | None) -> None:
        self.posted += 1
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Scheduler:
    def __init__(
        self,
        metrics: Metrics,
        *,
        config: ServerConfig,
        when_idle: Callable[[Callable[[], bool]], object] | None = None,
    ):
        """Limits from `config`: `max_batch` requests run together, `max_queue` more wait; a request still
        running (or waiting) `request_timeout_s` after it came ends there with finish_reason "length"; a
        client `stream_buffer` steps behind its stream is cancelled. `when_idle(wanted)`: called on the
        scheduler thread after a step that leaves no request running or waiting (the runtime's cost refresh:
        it takes the models for seconds, which no running stream should wait for), with a function that says
        when a request has come, for it to stop there."""
        self.metrics = metrics
        self.max_batch, self.max_queue = config.max_batch, config.max_queue
        self.request_timeout_s, self.stream_buffer = config.request_timeout_s, config.stream_buffer
        self.when_idle = when_idle
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._finished: collections.deque[float] = collections.deque(maxlen=_RATE_WINDOW)  # perf_counter times
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="specserve-scheduler", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        return len(self._waiting) + len(self._active)

    def submit(
        self, generation: Generation, span: trace.Span | None = None, *, ends_at: Callable[[str], bool] | None = None
    ) -> Job:
        """`ends_at`: ends the reply (finish_reason "stop") after a step whose text so far it is true of."""
        job = Job(generation, asyncio.get_running_loop(), span, ends_at=ends_at)
        if self.request_timeout_s is not None:
            job.deadline = job.submitted + self.request_timeout_s
        with self._wake:
            # Bound the total, not just the waiting list: jobs wait there until the scheduler thread's next
            # step boundary even when a batch slot is free.
            if self.in_flight >= self.max_batch + self.max_queue:
                raise QueueFull(
                    f"{self.in_flight} requests in flight; the server takes {self.max_batch} running "
                    f"+ {self.max_queue} waiting",
                    self._time_to_start_waiting(),
                )
            self._waiting.append(job)
            self.metrics.queue_depth.set(len(self._waiting))
            self._wake.notify()
        return job

    def _time_to_start_waiting(self) -> float:
        """Seconds until every request waiting now has a batch slot, at the recent completion rate (1 s
        before any completed). The rate counts to now, so it falls while nothing completes."""
        if len(self._finished) < 2:
            return 1.0
        rate = (len(self._finished) - 1) / (time.perf_counter() - self._finished[0])
        return len(self._waiting) / rate

    def cancel(self, job: Job) -> None:
        job.cancelled = True  # the scheduler thread drops it before its next step

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def _admit(self) -> bool:
        """Move waiting jobs into the batch; False when the scheduler is stopping."""
        with self._wake:
            self._publish()  # before idling, so that /metrics shows the batch that just ended
            while not self._stopping and not self._active and not self._waiting:
                self._wake.wait()
            if self._stopping:
                return False
            now = time.perf_counter()
            for job in [j for j in self._waiting if j.deadline <= now]:  # timed out before it ran
                self._waiting.remove(job)
                self._end(job, job.generation.stop("length"))
            while self._waiting and len(self._active) < self.max_batch:
                job = self._waiting.popleft()
                if not job.cancelled:
                    self._active.append(job)
            for job in [j for j in self._active if j.cancelled]:
                job.generation.target.close()  # a verifier frees its KV cache now, not when collected
            self._active = [j for j in self._active if not j.cancelled]
            self._publish()
        return True

    def _publish(self) -> None:
        self.metrics.queue_depth.set(len(self._waiting))
        self.metrics.active.set(len(self._active))

    def _run(self) -> None:
        while self._admit():
            if not self._active:
                continue
            batch = list(self._active)
            prefilling = [not job.generation.tokens for job in batch]
            try:
                result = step([job.generation for job in batch])
            except Exception as exc:  # a failed pass fails the requests in it, not the server
                log.exception("step failed for %d sequences", len(batch))
                for job in batch:
                    job.post(exc)
                self._active = [j for j in self._active if j not in batch]
                continue
            self._account(batch, prefilling, result)
            self._deliver(batch, result)
            if self.when_idle is not None and not self._active and not self._waiting:
                try:
                    self.when_idle(lambda: bool(self._waiting) or self._stopping)  # a request, or shutdown
                except Exception:  # housekeeping: the requests go on without it
                    log.exception("idle-time work failed")

    def _deliver(self, batch: list[Job], result: Step) -> None:
        """Post each job its step's events; end the finished and the timed-out, cancel the unread."""
        now = time.perf_counter()
        events = [self._ended(job, produced, now) for job, produced in zip(batch, result.events, strict=True)]
        # Leave the batch before the client hears the end, so that in_flight is exact by then.
        self._active = [j for j in self._active if not j.generation.done]
        for job, produced in zip(batch, events, strict=True):
            if job.generation.done:
                self._end(job, produced)
            elif job.posted - job.taken >= self.stream_buffer:
                self._stall(job)
            elif produced:
                job.post(produced)

    def _stall(self, job: Job) -> None:
        unread = job.posted - job.taken
        log.warning("a client left %d steps of its stream unread: cancelled", unread)
        self.metrics.stalled_streams.inc()
        job.cancelled = True  # leaves the batch at the next admission, like a client that went away
        job.post(StreamStalled(f"the stream was cancelled: its client left {unread} steps unread"))

    @staticmethod
    def _ended(job: Job, produced: list[Emitted], now: float) -> list[Emitted]:
        """The step's events, ending the job's reply if its deadline passed or its text says it is over."""
        if job.generation.done:
            return produced
        if job.deadline <= now:
            return produced + job.generation.stop("length")
        if job.ends_at is not None and job.ends_at(job.generation.text):
            return produced + job.generation.stop("stop")
        return produced

    def _end(self, job: Job, events: list[Emitted]) -> None:
        ended = time.perf_counter()
        self._finished.append(ended)
        stats = job.generation.stats
        self.metrics.observe_request(
            prompt_tokens=stats.prompt_tokens,
            generated=stats.generated,
            submitted=job.submitted,
            first_token=job.first_token,
            ended=ended,
        )
        if events:
            job.post(events)
        job.post(None)

    def _account(self, batch: list[Job], prefilling: list[bool], result: Step) -> None:
        t0, t1, t2, t3 = result.started, result.drafted, result.verified, result.accepted
        m = self.metrics
        m.batch_size.observe(len(batch))
        m.draft_latency_ms.observe((t1 - t0) * 1000)
        m.verifier_latency_ms.observe((t2 - t1) * 1000)
        emitted = sum(1 for events in result.events for e in events if e.token is not None)
        m.generated.inc(emitted)
        if t3 > t0:
            m.tokens_per_second.set(emitted / (t3 - t0))
        tracer = trace.get_tracer("specserve")
        for job, prefill, events in zip(batch, prefilling, result.events, strict=True):
            if not prefill:
                m.observe_window(*job.generation.stats.last_window)
            if job.first_token is None and any(e.token is not None for e in events):
                job.first_token = t3
                m.ttft_s.observe(t3 - job.submitted)
            if job.span is not None and job.span.is_recording():
                context = trace.set_span_in_context(job.span)
                phases = (
                    (("prefill", t1, t2),) if prefill else (("draft", t0, t1), ("verify", t1, t2), ("accept", t2, t3))
                )
                for name, start, end in phases:
                    child = tracer.start_span(name, context=context, start_time=_EPOCH_OFFSET_NS + int(start * 1e9))
                    if name == "verify":
                        child.set_attribute("specserve.batch_size", len(batch))
                    child.end(end_time=_EPOCH_OFFSET_NS + int(end * 1e9))
