"""The names of the resources translation makes: a Service port's cluster (and its
ClusterLoadAssignment), a port number's listener and its route configuration. The rules, with
those of virtual hosts and API listeners, are in the package docstring (`xds.translate`)."""

from __future__ import annotations

from xds.model import ServiceKey, ServicePort


def cluster_name(key: ServiceKey, port: ServicePort) -> str:
    return f"{key.namespace}/{key.name}:{port.label}"


def listener_name(port: int) -> str:
    return f"port:{port}"


def route_name(port: int) -> str:
    return f"http:{port}"
