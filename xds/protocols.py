"""What a Service port speaks, read the way Kubernetes and Istio users declare it.

A port's protocol comes from its `appProtocol` (the Kubernetes field; standard values `http`,
`https`, `h2c`, `kubernetes.io/h2c`, `kubernetes.io/ws`, `kubernetes.io/wss`, and the common names
below), else from its name by Istio's convention `<protocol>[-<suffix>]` (`http-web`, `grpc`,
`tls-db`, `redis-cache`), else it is undeclared and Envoy detects it per connection. An
`appProtocol` this table does not know (`example.com/custom`) leaves the decision to the name.

- HTTP (http, ws, kubernetes.io/ws): the HTTP connection manager, routing by Host.
- HTTP2 (http2, h2c, kubernetes.io/h2c, grpc, grpc-web): the same, with HTTP/2 to the upstream.
- TLS (https, tls, wss, kubernetes.io/wss): TLS passthrough, chains matched by SNI, tcp_proxy.
- TCP (tcp and the known non-HTTP protocols: redis, mysql, postgres, mongo, kafka, amqp, ...):
  tcp_proxy.
- DETECT (nothing recognised): http_inspector; HTTP goes to the connection manager, the rest to
  tcp_proxy.

Server-first protocols (the server speaks first: MySQL's greeting, SMTP's banner) cannot be
detected, because detection waits for the client's first bytes: they must be declared.

Pure and tiny: no Envoy types here, so the rules can be read (and tested) on their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from xds.model import ServicePort


class Kind(StrEnum):
    HTTP = "http"
    HTTP2 = "http2"
    TLS = "tls"
    TCP = "tcp"
    DETECT = "detect"

    @property
    def speaks_http(self) -> bool:
        """Whether the port's traffic (all of it, or what detection finds to be HTTP) is routed
        by the HTTP connection manager."""
        return self in (Kind.HTTP, Kind.HTTP2, Kind.DETECT)


_KNOWN: dict[str, Kind] = {
    "http": Kind.HTTP,
    "http1": Kind.HTTP,
    "ws": Kind.HTTP,
    "kubernetes.io/ws": Kind.HTTP,
    "http2": Kind.HTTP2,
    "h2c": Kind.HTTP2,
    "kubernetes.io/h2c": Kind.HTTP2,
    "grpc": Kind.HTTP2,
    "grpc-web": Kind.HTTP2,
    "https": Kind.TLS,
    "tls": Kind.TLS,
    "wss": Kind.TLS,
    "kubernetes.io/wss": Kind.TLS,
    "tcp": Kind.TCP,
}
# Protocols that are not HTTP and are proxied as bytes. Those whose server speaks first are kept
# apart: they break when a connection has to wait for detection.
SERVER_FIRST = frozenset({"mysql", "mariadb", "smtp", "ftp", "pop3", "imap"})
CLIENT_FIRST_TCP = frozenset(
    {
        "redis",
        "postgres",
        "postgresql",
        "mongo",
        "mongodb",
        "kafka",
        "amqp",
        "amqps",
        "mqtt",
        "nats",
        "zookeeper",
        "memcache",
        "memcached",
        "cassandra",
        "cql",
        "dns",
        "ldap",
        "thrift",
        "dubbo",
        "rabbitmq",
        "etcd",
    }
)
_KNOWN.update(dict.fromkeys(SERVER_FIRST | CLIENT_FIRST_TCP, Kind.TCP))


@dataclass(frozen=True, slots=True)
class PortProtocol:
    kind: Kind
    # The declared protocol as written, lowercased (`redis`, `kubernetes.io/h2c`), or "" when
    # the port is undeclared.
    declared: str = ""

    @property
    def server_first(self) -> bool:
        return self.declared in SERVER_FIRST


def port_protocol(port: ServicePort) -> PortProtocol:
    """The protocol of a Service port: appProtocol, else the name's prefix, else detection."""
    app_protocol = (port.app_protocol or "").lower()
    if app_protocol in _KNOWN:
        return PortProtocol(_KNOWN[app_protocol], app_protocol)
    prefix = port.name.lower().split("-", 1)[0]
    if prefix in _KNOWN:
        return PortProtocol(_KNOWN[prefix], prefix)
    return PortProtocol(Kind.DETECT)


__all__ = ["Kind", "PortProtocol", "SERVER_FIRST", "port_protocol"]
