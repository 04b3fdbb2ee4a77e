"""Small helpers the translation modules share: packing a message into an Any, the ADS config
source, protobuf Durations, quoting a tenant-written value for a message, and a Service resource's
scope marks (detail and salt)."""

from __future__ import annotations

from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message

from xds._pb.envoy.config.core.v3 import config_source_pb2
from xds.scopes import ServiceScope


def _any(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _ads_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def _duration(seconds: float) -> duration_pb2.Duration:
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=round((seconds - whole) * 1e9))


def _show(value: str, limit: int = 40) -> str:
    """A value quoted for a message, cut short: annotations are tenant-written and up to 256 KiB."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."


def _marks(scope: ServiceScope | None) -> tuple[ServiceScope | None, bytes]:
    """A Service resource's detail and salt: its scope under scoping, nothing without."""
    return (scope, scope.salt) if scope is not None else (None, b"")
