"""Push spans: one per response, from its write to the client's ACK or NACK, in the trace of the
change whose snapshot it carries. Uses the OpenTelemetry API only: without an SDK installed at the
entry point every call here is a no-op, and attributes are not even computed."""

from __future__ import annotations

from typing import cast

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode

from xds.resources import short_name
from xds.server.callbacks import AnyResponse, Callbacks, Stream
from xds.server.delta import DeltaResponse
from xds.server.sotw import Response

tracer = trace.get_tracer("xds.server")


class PushTraces:
    """The open push spans of one stream, by resource type."""

    def __init__(self) -> None:
        self._open: dict[str, Span] = {}
        # Without an SDK installed the API hands out a proxy provider: skip even the no-op spans.
        self.enabled = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)

    def pushed(
        self,
        response: Response | DeltaResponse,
        size: int,
        trace_context: object,
        node_id: str,
        peer: str,
    ) -> None:
        if not self.enabled:
            return
        short = short_name(response.type_url)
        # Snapshots hold the context as an opaque object (xds.cache stays free of OpenTelemetry);
        # the app puts a Context there, or nothing.
        context = cast(Context | None, trace_context)
        span = tracer.start_span(f"push {short}", context=context)
        if span.is_recording():
            version = (
                response.version if isinstance(response, Response) else response.system_version
            )
            span.set_attributes(
                {
                    "xds.type": short,
                    "xds.version": version,
                    "xds.nonce": response.nonce,
                    "xds.node_id": node_id,
                    "xds.peer": peer,
                    "xds.resource_count": len(response.resources),
                    "xds.bytes": size,
                }
            )
            if isinstance(response, DeltaResponse):
                span.set_attribute("xds.removed_count", len(response.removed))
        superseded = self._open.pop(response.type_url, None)
        if superseded is not None:
            superseded.end()
        self._open[response.type_url] = span

    def replied(self, type_url: str, error_message: str | None) -> None:
        span = self._open.pop(type_url, None)
        if span is None:
            return
        if span.is_recording():
            span.set_attribute("xds.outcome", "ACK" if error_message is None else "NACK")
            if error_message is not None:
                span.set_attribute("xds.nack_message", error_message[-2000:])
                span.set_status(Status(StatusCode.ERROR, "NACK"))
        span.end()

    def close(self) -> None:
        for span in self._open.values():
            if span.is_recording():
                span.set_attribute("xds.outcome", "disconnected")
            span.end()
        self._open.clear()


class TracingCallbacks(Callbacks):
    """The server's callbacks that keep one PushTraces per stream."""

    def __init__(self) -> None:
        self._streams: dict[int, PushTraces] = {}

    def stream_opened(self, stream_id: int, stream: Stream) -> None:
        traces = PushTraces()
        if traces.enabled:
            self._streams[stream_id] = traces

    def stream_closed(self, stream_id: int, stream: Stream) -> None:
        traces = self._streams.pop(stream_id, None)
        if traces is not None:
            traces.close()

    def pushed(
        self,
        stream_id: int,
        stream: Stream,
        response: AnyResponse,
        size: int,
        trace_context: object,
    ) -> None:
        traces = self._streams.get(stream_id)
        if traces is not None:
            traces.pushed(response, size, trace_context, stream.node_id, stream.peer)

    def replied(
        self, stream_id: int, type_url: str, error_message: str | None, seconds: float
    ) -> None:
        traces = self._streams.get(stream_id)
        if traces is not None:
            traces.replied(type_url, error_message)
