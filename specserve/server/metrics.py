"""Prometheus metrics of the server (prometheus-client), in a registry of their own so that several
servers in one process (tests) do not collide."""

from __future__ import annotations

import collections
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

_LATENCY_BUCKETS_MS = (1, 2.5, 5, 10, 20, 30, 50, 75, 100, 150, 250, 500, 1000, 2500, 5000)
_ROLLING_WINDOWS = 64  # verify windows behind the rolling acceptance rate


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_open_fds, ... (the soak reads them)
        self.draft_latency_ms = Histogram(
            "specserve_draft_latency_ms",
            "Drafting time per step (all sequences of the step)",
            buckets=_LATENCY_BUCKETS_MS,
            registry=r,
        )
        self.verifier_latency_ms = Histogram(
            "specserve_verifier_latency_ms",
            "Target verify pass per step (all sequences of the step)",
            buckets=_LATENCY_BUCKETS_MS,
            registry=r,
        )
        self.acceptance_rate = Gauge(
            "specserve_acceptance_rate", f"Accepted / drafted over the last {_ROLLING_WINDOWS} windows", registry=r
        )
        self.tokens_per_second = Gauge(
            "specserve_tokens_per_second", "Generated tokens per second, all streams, over the last step", registry=r
        )
        self.rejected_keys = Counter(
            "specserve_rejected_api_keys", "Requests refused for a missing or wrong API key", registry=r
        )
        self.stalled_streams = Counter(
            "specserve_stalled_streams", "Streams cancelled because their client stopped reading", registry=r
        )
        self.drafted = Counter("specserve_drafted_tokens", "Draft tokens proposed", registry=r)
        self.accepted = Counter("specserve_accepted_tokens", "Draft tokens accepted", registry=r)
        self.generated = Counter("specserve_generated_tokens", "Tokens emitted to clients", registry=r)
        self.position_drafted = Counter(
            "specserve_position_drafted", "Draft tokens proposed at each window position", ["position"], registry=r
        )
        self.position_accepted = Counter(
            "specserve_position_accepted", "Draft tokens accepted at each window position", ["position"], registry=r
        )
        self.requests = Counter(
            "specserve_requests", "Requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.queue_depth = Gauge("specserve_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.active = Gauge("specserve_active_sequences", "Sequences in the running batch", registry=r)
        self.batch_size = Histogram(
            "specserve_batch_size", "Sequences per step", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.cache_hits = Counter("specserve_cache_hits", "Response cache hits", registry=r)
        self.cache_misses = Counter("specserve_cache_misses", "Response cache misses", registry=r)
        self.prefix_reused = Counter("specserve_prefix_reused_tokens", "Prompt tokens whose KV was reused", registry=r)
        self.logged_errors = Counter(
            "specserve_logged_errors", "Log records at ERROR or above, from any logger of the process", registry=r
        )
        self.error_log = _CountErrors(self.logged_errors)  # on the root logger while the server runs (app.py)
        self._windows: collections.deque[tuple[int, int]] = collections.deque(maxlen=_ROLLING_WINDOWS)

    def observe_window(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        self.drafted.inc(drafted)
        self.accepted.inc(accepted)
        for position in range(drafted):
            self.position_drafted.labels(position=str(position + 1)).inc()
            if position < accepted:
                self.position_accepted.labels(position=str(position + 1)).inc()
        self._windows.append((drafted, accepted))
        total = sum(d for d, _ in self._windows)
        self.acceptance_rate.set(sum(a for _, a in self._windows) / total)

    def on_cache_lookup(self, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CountErrors(logging.Handler):
    """Counts what is logged at ERROR or above: a soak (bench/soak.py) reads it to say nothing went wrong."""

    def __init__(self, counter: Counter):
        super().__init__(level=logging.ERROR)
        self.counter = counter

    def emit(self, record: logging.LogRecord) -> None:
        self.counter.inc()
