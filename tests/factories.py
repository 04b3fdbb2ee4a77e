"""The one home of what tests build and write: Kubernetes objects as the API and manifests carry
them, and files replaced atomically as editors, kubectl-style tools and Secret volumes do (so
that a watcher sees one change)."""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import yaml


def service(
    name: str,
    port: int = 80,
    namespace: str = "default",
    cluster_ip: str | None = None,
    annotations: dict[str, str] | None = None,
    port_name: str = "http",
    labels: dict[str, str] | None = None,
    target_port: int | str | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A Service with one TCP port (`targetPort` the port's name unless given)."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels is not None:
        metadata["labels"] = labels
    if annotations:
        metadata["annotations"] = annotations
    port_spec = {
        "name": port_name,
        "port": port,
        "targetPort": port_name if target_port is None else target_port,
        "protocol": "TCP",
    }
    body: dict[str, Any] = {"ports": [port_spec]}
    if cluster_ip:
        body["clusterIP"] = cluster_ip
    body.update(spec)
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": body}


def endpoint_slice(
    service_name: str,
    addresses: list[str],
    port: int = 8080,
    namespace: str = "default",
    name: str | None = None,
    port_name: str = "http",
    draining: Collection[str] = (),
    zones: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """An IPv4 EndpointSlice of a Service on one port: every address ready, but those `draining`
    (terminating, still serving), each in its zone of `zones` when given."""
    endpoints: list[dict[str, Any]] = []
    for address in addresses:
        endpoint: dict[str, Any] = {"addresses": [address]}
        if zones is not None:
            endpoint["zone"] = zones[address]
        endpoint["conditions"] = (
            {"ready": False, "serving": True, "terminating": True}
            if address in draining
            else {"ready": True}
        )
        endpoints.append(endpoint)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{service_name}-slice",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    }


def replace_atomically(path: Path, data: str | bytes) -> None:
    """Writes a temporary file beside `path`, then renames it over `path`."""
    temporary = path.with_name(f".{path.name}.tmp")
    if isinstance(data, bytes):
        temporary.write_bytes(data)
    else:
        temporary.write_text(data)
    os.replace(temporary, path)


def write_manifests(path: Path, *objects: dict[str, Any]) -> None:
    """Kubernetes objects as one multi-document YAML file, replaced atomically."""
    replace_atomically(path, yaml.safe_dump_all(objects, sort_keys=False))
