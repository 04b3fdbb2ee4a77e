"""Envoy bootstrap generation: a static cluster for the control plane, all else over ADS."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from xds.config import OTEL_CLUSTER_NAME, XDS_CLUSTER_NAME

XDS_CLUSTER = XDS_CLUSTER_NAME


def parse_address(text: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); raises ValueError naming the expected form."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


MODES = ("ads", "xds", "delta-ads", "delta")
PROTOCOL_OPTIONS_TYPE = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _grpc_source(delta: bool) -> dict[str, Any]:
    return {
        "api_type": "DELTA_GRPC" if delta else "GRPC",
        "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
        # Envoy's node (its extension list alone is tens of KB) then comes once per stream.
        "set_node_on_first_message_only": True,
    }


def dynamic_resources(mode: str) -> dict[str, Any]:
    """ADS (one stream for every type) or one stream per type; state-of-the-world or delta."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    delta = mode.startswith("delta")
    if mode in ("ads", "delta-ads"):
        ads = {"ads": {}, "resource_api_version": "V3"}
        return {"ads_config": _grpc_source(delta), "cds_config": ads, "lds_config": ads}
    per_type = {"api_config_source": _grpc_source(delta), "resource_api_version": "V3"}
    return {"cds_config": per_type, "lds_config": per_type}


def grpc_cluster(name: str, address: str) -> dict[str, Any]:
    """A static cluster speaking HTTP/2 (gRPC) to HOST:PORT: the control plane, or a collector."""
    host, port = parse_address(address)
    endpoint = {"address": {"socket_address": {"address": host, "port_value": port}}}
    return {
        "name": name,
        "type": "STATIC" if _is_ip(host) else "STRICT_DNS",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": PROTOCOL_OPTIONS_TYPE,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
        },
    }


def _check_loopback_admin(address: str) -> None:
    """Envoy's admin API answers anyone who reaches it (/quitquitquit stops Envoy, /config_dump
    shows every secret name): it stays on a loopback address, which the control plane never sends
    mesh traffic to (xds.translate refuses loopback endpoints unless allowed)."""
    try:
        loopback = ipaddress.ip_address(address).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"Envoy's admin address must be a loopback IP address, not {address!r}")


def bootstrap(
    node_id: str,
    xds_address: str,
    admin_port: int = 9901,
    admin_address: str = "127.0.0.1",
    node_cluster: str = "xds-proxies",
    mode: str = "ads",
    otel_collector: str | None = None,
) -> dict[str, Any]:
    """The bootstrap as a dict in Envoy's JSON/YAML shape. With `otel_collector` (HOST:PORT of an
    OTLP/gRPC collector) it defines the cluster `otel_collector` that request tracing sends to
    (`xds serve --tracing-cluster otel_collector`)."""
    _check_loopback_admin(admin_address)
    clusters = [grpc_cluster(XDS_CLUSTER, xds_address)]
    if otel_collector is not None:
        clusters.append(grpc_cluster(OTEL_CLUSTER_NAME, otel_collector))
    return {
        "node": {"id": node_id, "cluster": node_cluster},
        "admin": {
            "address": {"socket_address": {"address": admin_address, "port_value": admin_port}}
        },
        "dynamic_resources": dynamic_resources(mode),
        "static_resources": {"clusters": clusters},
        "layered_runtime": {
            "layers": [{"name": "static", "static_layer": {}}, {"name": "admin", "admin_layer": {}}]
        },
    }


def bootstrap_text(**kwargs: Any) -> str:
    """The bootstrap as JSON, which Envoy reads as YAML too. Not YAML itself: Envoy's YAML parser
    takes bare words like `n`, `no` or `on` for booleans, so a node id like that would break it."""
    return json.dumps(bootstrap(**kwargs), indent=2) + "\n"
