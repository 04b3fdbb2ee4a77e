"""OpenTelemetry SDK setup: called from the entry point only, and only when the standard `OTEL_*`
environment variables ask for traces. Everything else uses the OpenTelemetry API, whose tracer is a
no-op until a provider is installed here."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the SDK is imported only when tracing is asked for
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

SERVICE_NAME = "xds-control-plane"


def tracing_requested(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "")
    if exporters and "otlp" not in exporters.split(","):
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or "otlp" in exporters.split(",")
    )


def setup_tracing() -> TracerProvider | None:
    """Installs a TracerProvider exporting over OTLP/gRPC as `OTEL_*` configures it; returns it
    (to be shut down at exit, which flushes), or None when tracing is off."""
    if not tracing_requested():
        return None
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", SERVICE_NAME)})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    log.info("tracing: exporting spans over OTLP")
    return provider


def shutdown(provider: TracerProvider | None) -> None:
    if provider is not None:
        provider.shutdown()
