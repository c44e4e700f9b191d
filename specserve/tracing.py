"""OpenTelemetry set-up: spans are exported over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT is set (the
SDK reads the standard OTEL_* variables); otherwise the API's no-op tracer keeps tracing free."""

from __future__ import annotations

import os

from opentelemetry import trace


def setup_tracing(service_name: str = "specserve") -> bool:
    """Install an exporting tracer provider if an OTLP endpoint is configured; True if it did."""
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return True
