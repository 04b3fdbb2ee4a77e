"""What the discovery server reports as it works: streams opening and closing, responses pushed,
ACKs and NACKs. Metrics and tracing implement it; the server calls it and knows neither (as
go-control-plane's server callbacks). Every method is a no-op unless overridden."""

from __future__ import annotations

from typing import Any, TypeAlias

from xds.server.delta import DeltaResponse
from xds.server.sotw import Response
from xds.server.stream import StreamBase

Stream: TypeAlias = StreamBase[Any, Any, Any]
AnyResponse: TypeAlias = Response | DeltaResponse


class Callbacks:
    def stream_opened(self, stream_id: int, stream: Stream) -> None:
        """A client opened a stream (after the first snapshot exists)."""

    def stream_closed(self, stream_id: int, stream: Stream) -> None:
        """The stream ended, for whatever reason."""

    def pushed(
        self,
        stream_id: int,
        stream: Stream,
        response: AnyResponse,
        size: int,
        trace_context: object,
    ) -> None:
        """A response of `size` bytes went out; `trace_context` is the snapshot's change trace."""

    def replied(
        self, stream_id: int, type_url: str, error_message: str | None, seconds: float
    ) -> None:
        """The client ACKed (error_message None) or NACKed a response sent `seconds` ago."""


class CallbackList(Callbacks):
    """Several callbacks as one, called in order."""

    def __init__(self, *callbacks: Callbacks) -> None:
        self.callbacks = callbacks

    def stream_opened(self, stream_id: int, stream: Stream) -> None:
        for callback in self.callbacks:
            callback.stream_opened(stream_id, stream)

    def stream_closed(self, stream_id: int, stream: Stream) -> None:
        for callback in self.callbacks:
            callback.stream_closed(stream_id, stream)

    def pushed(
        self,
        stream_id: int,
        stream: Stream,
        response: AnyResponse,
        size: int,
        trace_context: object,
    ) -> None:
        for callback in self.callbacks:
            callback.pushed(stream_id, stream, response, size, trace_context)

    def replied(
        self, stream_id: int, type_url: str, error_message: str | None, seconds: float
    ) -> None:
        for callback in self.callbacks:
            callback.replied(stream_id, type_url, error_message, seconds)
