"""Prometheus metrics of the server (prometheus-client), in a registry of their own so that several
servers in one process (tests) do not collide."""

from __future__ import annotations

import collections
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

_LATENCY_BUCKETS_MS = (1, 2.5, 5, 10, 20, 30, 50, 75, 100, 150, 250, 500, 1000, 2500, 5000)
_SECONDS_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
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
        self.prompt_tokens = Counter("specserve_prompt_tokens", "Prompt tokens of the requests run", registry=r)
        self.verify_windows = Counter(
            "specserve_verify_windows",
            "Target passes of a sequence after its prompt, each a window of 0 or more drafts (tokens per window"
            " = generated tokens / windows)",
            registry=r,
        )
        self.ttft_s = Histogram(
            "specserve_time_to_first_token_seconds",
            "From the request's submission to its first token",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.tpot_s = Histogram(
            "specserve_time_per_output_token_seconds",
            "A request's time after its first token per further token",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.e2e_s = Histogram(
            "specserve_e2e_request_latency_seconds",
            "From the request's submission to its end",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        # The speculation counters under vLLM's names too, so that dashboards made for vLLM find them.
        self.model_name = ""  # the label vLLM puts on them (`set_model_name` once the model is loaded)
        self.vllm_drafts = Counter(
            "vllm:spec_decode_num_drafts", "Windows with at least one draft token", ["model_name"], registry=r
        )
        self.vllm_draft_tokens = Counter(
            "vllm:spec_decode_num_draft_tokens", "Draft tokens proposed", ["model_name"], registry=r
        )
        self.vllm_accepted_tokens = Counter(
            "vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted", ["model_name"], registry=r
        )
        self.vllm_accepted_per_pos = Counter(
            "vllm:spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted at each window position (from 0)",
            ["model_name", "position"],
            registry=r,
        )
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

    def set_model_name(self, name: str) -> None:
        """The served model: vLLM's counters carry its name, and exist (at 0) from now on."""
        self.model_name = name
        for counter in (self.vllm_drafts, self.vllm_draft_tokens, self.vllm_accepted_tokens):
            counter.labels(model_name=name)

    def observe_window(self, drafted: int, accepted: int) -> None:
        self.verify_windows.inc()
        if drafted == 0:
            return
        self.drafted.inc(drafted)
        self.accepted.inc(accepted)
        self.vllm_drafts.labels(model_name=self.model_name).inc()
        self.vllm_draft_tokens.labels(model_name=self.model_name).inc(drafted)
        self.vllm_accepted_tokens.labels(model_name=self.model_name).inc(accepted)
        for position in range(drafted):
            self.position_drafted.labels(position=str(position + 1)).inc()
            if position < accepted:
                self.position_accepted.labels(position=str(position + 1)).inc()
                self.vllm_accepted_per_pos.labels(model_name=self.model_name, position=str(position)).inc()
        self._windows.append((drafted, accepted))
        total = sum(d for d, _ in self._windows)
        self.acceptance_rate.set(sum(a for _, a in self._windows) / total)

    def observe_request(
        self, *, prompt_tokens: int, generated: int, submitted: float, first_token: float | None, ended: float
    ) -> None:
        """A finished request's latencies (`time.perf_counter()` values)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.e2e_s.observe(ended - submitted)
        if first_token is not None and generated > 1:
            self.tpot_s.observe((ended - first_token) / (generated - 1))

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
