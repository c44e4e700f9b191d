"""Prometheus metrics of a verifier service (prometheus-client), in a registry of its own, served over HTTP
on `--metrics-port` beside the gRPC port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class VerifierMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.windows = Counter("specserve_verifier_windows", "Windows verified (prompt chunks not counted)", registry=r)
        self.drafted = Counter("specserve_verifier_drafted_tokens", "Draft tokens received to verify", registry=r)
        self.accepted = Counter("specserve_verifier_accepted_tokens", "Draft tokens accepted", registry=r)
        self.batch_rows = Histogram(
            "specserve_verifier_batch_rows",
            "Rows per target pass (all windows in it)",
            buckets=_ROW_BUCKETS,
            registry=r,
        )
        self.batch_windows = Histogram(
            "specserve_verifier_batch_windows", "Windows per target pass", buckets=(1, 2, 4, 8, 16, 32), registry=r
        )
        self.sessions = Gauge("specserve_verifier_sessions", "Open sessions (KV caches held)", registry=r)
        self.evictions = Counter(
            "specserve_verifier_evictions", "Sessions dropped: lru, idle or failed-pass", ["reason"], registry=r
        )
        self.replayed_tokens = Counter(
            "specserve_verifier_replayed_tokens", "Context tokens replayed when a session (re)opens", registry=r
        )
        self.auth_failures = Counter("specserve_verifier_auth_failures", "Calls refused for their token", registry=r)

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)
