"""Bootstrap generation: Envoy's (a static cluster for the control plane, all else over ADS) and
that of proxyless gRPC clients (`grpc_bootstrap`, the GRPC_XDS_BOOTSTRAP file).

With TLS (`BootstrapTLS`), the control plane's cluster speaks TLS (mTLS: Envoy presents a client
certificate) whose certificate, key and CA come through file-based SDS: two SDS files in a
directory Envoy watches (`watched_directory`) name the PEM files, so renewed certificates are
picked up without a restart. `sds_files` gives their content (`xds bootstrap --write-sds`).
A gRPC client reads and re-reads the PEM files itself (`GrpcTLS`): no SDS files.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
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


SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
UPSTREAM_TLS_TYPE = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
)
# The SDS secrets of the xDS connection, each in a file of its name (`<name>.yaml`).
CLIENT_CERTIFICATE_SECRET = "xds_client_certificate"
VALIDATION_CONTEXT_SECRET = "xds_validation_context"


@dataclass(frozen=True)
class BootstrapTLS:
    """Where Envoy finds its TLS material for the control plane. `directory` is watched: it holds
    the two SDS files and, by default, the PEM files under the names of a Kubernetes TLS Secret
    (as cert-manager writes it): `ca.crt` (the control plane's CA), `tls.crt` and `tls.key`
    (Envoy's client certificate). On Kubernetes, a projected volume of the Secret and of a
    ConfigMap holding the SDS files is one such directory, updated by one atomic rename."""

    directory: Path
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @property
    def ca_path(self) -> Path:
        return self.ca or self.directory / "ca.crt"

    @property
    def cert_path(self) -> Path:
        return self.cert or self.directory / "tls.crt"

    @property
    def key_path(self) -> Path:
        return self.key or self.directory / "tls.key"

    def sds_path(self, secret: str) -> Path:
        return self.directory / f"{secret}.yaml"


def _absolute(path: Path) -> str:
    # Envoy resolves relative paths against its working directory, not the bootstrap's.
    return os.path.abspath(path)


def sds_files(tls: BootstrapTLS) -> dict[str, str]:
    """The SDS files' names and content (JSON, which Envoy reads as YAML too)."""
    # Envoy re-reads the PEM files when something is moved into the directory a secret names
    # (`watched_directory`); the cert and key are then read together and checked to match.
    certificate = {
        "@type": SECRET_TYPE,
        "name": CLIENT_CERTIFICATE_SECRET,
        "tls_certificate": {
            "certificate_chain": {"filename": _absolute(tls.cert_path)},
            "private_key": {"filename": _absolute(tls.key_path)},
            "watched_directory": {"path": _absolute(tls.cert_path.parent)},
        },
    }
    validation = {
        "@type": SECRET_TYPE,
        "name": VALIDATION_CONTEXT_SECRET,
        "validation_context": {
            "trusted_ca": {"filename": _absolute(tls.ca_path)},
            "watched_directory": {"path": _absolute(tls.ca_path.parent)},
        },
    }
    return {
        f"{secret['name']}.yaml": json.dumps({"resources": [secret]}, indent=2) + "\n"
        for secret in (certificate, validation)
    }


def write_sds_files(tls: BootstrapTLS, directory: Path | None = None) -> list[Path]:
    """Writes the SDS files into `directory` (default: the watched one), each atomically: Envoy
    reads them when something is moved into the directory, never half-written."""
    directory = directory or tls.directory
    written = []
    for name, text in sds_files(tls).items():
        path = directory / name
        tmp = directory / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, path)
        written.append(path)
    return written


def _sds_config(tls: BootstrapTLS, secret: str) -> dict[str, Any]:
    return {
        "name": secret,
        "sds_config": {
            "path_config_source": {
                "path": _absolute(tls.sds_path(secret)),
                "watched_directory": {"path": _absolute(tls.directory)},
            },
            "resource_api_version": "V3",
        },
    }


def transport_socket(tls: BootstrapTLS, host: str) -> dict[str, Any]:
    """mTLS to the control plane at `host`, whose certificate must name it (a DNS or IP SAN):
    without a SAN matcher Envoy would accept any certificate of the CA. ALPN h2: gRPC."""
    san_type = "IP_ADDRESS" if _is_ip(host) else "DNS"
    context: dict[str, Any] = {
        "@type": UPSTREAM_TLS_TYPE,
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificate_sds_secret_configs": [_sds_config(tls, CLIENT_CERTIFICATE_SECRET)],
            "combined_validation_context": {
                "default_validation_context": {
                    "match_typed_subject_alt_names": [
                        {"san_type": san_type, "matcher": {"exact": host}}
                    ]
                },
                "validation_context_sds_secret_config": _sds_config(tls, VALIDATION_CONTEXT_SECRET),
            },
        },
    }
    if san_type == "DNS":
        context["sni"] = host
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}


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
    tls: BootstrapTLS | None = None,
    *,
    region: str | None = None,
    zone: str | None = None,
    sub_zone: str | None = None,
    namespace: str | None = None,
    cluster_id: str | None = None,
) -> dict[str, Any]:
    """The bootstrap as a dict in Envoy's JSON/YAML shape. With `otel_collector` (HOST:PORT of an
    OTLP/gRPC collector) it defines the cluster `otel_collector` that request tracing sends to
    (`xds serve --tracing-cluster otel_collector`). With `tls`, xDS goes over mTLS. The node's
    locality and namespace are those of `node_section`."""
    _check_loopback_admin(admin_address)
    xds_cluster = grpc_cluster(XDS_CLUSTER, xds_address)
    if tls is not None:
        xds_cluster["transport_socket"] = transport_socket(tls, parse_address(xds_address)[0])
    clusters = [xds_cluster]
    if otel_collector is not None:
        clusters.append(grpc_cluster(OTEL_CLUSTER_NAME, otel_collector))
    node: dict[str, Any] = {"id": node_id, "cluster": node_cluster}
    if region or zone or sub_zone or namespace or cluster_id:
        node = node_section(
            node_id,
            node_cluster=node_cluster,
            region=region,
            zone=zone,
            sub_zone=sub_zone,
            namespace=namespace,
            cluster_id=cluster_id,
        )
    return {
        "node": node,
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


@dataclass(frozen=True)
class GrpcTLS:
    """A proxyless gRPC client's TLS material for the control plane: the CA that signed the
    control plane's certificate and, for mTLS, the client's certificate and key. gRPC reads the
    PEM files itself and re-reads them every 10 minutes (the `tls` channel credentials of gRFC
    A65, a file-watcher certificate provider underneath)."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError(
                "a client certificate needs its private key, and a key its certificate"
            )

    @classmethod
    def of(cls, tls: BootstrapTLS) -> GrpcTLS:
        """The files an Envoy bootstrapped with `tls` would use: mTLS, the same certificate."""
        return cls(ca=tls.ca_path, cert=tls.cert_path, key=tls.key_path)

    def channel_creds(self) -> dict[str, Any]:
        # Absolute: the client resolves a relative path against its working directory.
        config = {"ca_certificate_file": _absolute(self.ca)}
        if self.cert is not None and self.key is not None:
            config["certificate_file"] = _absolute(self.cert)
            config["private_key_file"] = _absolute(self.key)
        return {"type": "tls", "config": config}


def _server_uri(address: str) -> str:
    """HOST:PORT as a gRPC target: an IPv6 address in brackets, whether or not it came in them."""
    host, port = parse_address(address)
    try:
        v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        v6 = False
    return f"[{host}]:{port}" if v6 else f"{host}:{port}"


def node_section(
    node_id: str,
    *,
    node_cluster: str | None = None,
    region: str | None = None,
    zone: str | None = None,
    sub_zone: str | None = None,
    namespace: str | None = None,
    cluster_id: str | None = None,
) -> dict[str, Any]:
    """A bootstrap's `node`, Envoy's or a gRPC client's: id, cluster, locality (only the keys
    given: the control plane prioritizes endpoints by it, `xds.localities`) and, with
    `namespace`, metadata NAMESPACE (read by namespace scoping). Raises ValueError, one line, for
    a value the control plane would refuse or misread."""
    # Imported here: they bring protobuf, which a plain Envoy bootstrap goes without.
    from xds.scopes import NAMESPACE_KEY, NAMESPACE_NAME, node_namespace
    from xds.server.stream import MAX_NODE_FIELD

    # The control plane refuses a stream whose node id or cluster is longer (INVALID_ARGUMENT).
    if not node_id:
        raise ValueError("the node id is empty")
    for what, value in (("node id", node_id), ("node cluster", node_cluster or "")):
        if len(value) > MAX_NODE_FIELD:
            raise ValueError(
                f"the {what} is {len(value)} characters: the control plane accepts at most "
                f"{MAX_NODE_FIELD}"
            )
    node: dict[str, Any] = {"id": node_id}
    if node_cluster:
        node["cluster"] = node_cluster
    # proto3: an empty string is no value, so an empty key is left out like a missing one.
    locality = {k: v for k, v in (("region", region), ("zone", zone), ("sub_zone", sub_zone)) if v}
    if locality:
        node["locality"] = locality
    if namespace is not None:
        if not NAMESPACE_NAME.fullmatch(namespace):
            raise ValueError(f"namespace {namespace!r} is not a Kubernetes namespace name")
        # The control plane takes the namespace from the metadata and from a node id of the form
        # NAME.NAMESPACE; when the two differ it takes neither (xds.scopes.claimed_namespace).
        named = node_namespace(node_id)
        if named is not None and named != namespace:
            raise ValueError(
                f"node id {node_id!r} names namespace {named!r}, not {namespace!r}: the control "
                "plane would scope the client to neither"
            )
        node["metadata"] = {NAMESPACE_KEY: namespace}
    if cluster_id:
        if not NAMESPACE_NAME.fullmatch(cluster_id):
            raise ValueError(f"cluster id {cluster_id!r} is not a cluster name (a DNS label)")
        # Where the client runs, when the control plane reads several clusters: its own
        # cluster's endpoints come first (xds.localities; Istio's key).
        node.setdefault("metadata", {})["CLUSTER_ID"] = cluster_id
    return node


def grpc_bootstrap(
    node_id: str,
    xds_address: str,
    *,
    node_cluster: str | None = None,
    region: str | None = None,
    zone: str | None = None,
    sub_zone: str | None = None,
    namespace: str | None = None,
    cluster_id: str | None = None,
    tls: GrpcTLS | BootstrapTLS | None = None,
) -> dict[str, Any]:
    """The bootstrap of a proxyless gRPC client (grpcio, grpc-java, grpc-go, grpc-js-xds) as a
    dict in the GRPC_XDS_BOOTSTRAP JSON shape (gRFC A27; `tls` channel credentials: A65). The
    locality keys and the cluster appear only when given; `namespace` goes into the node's
    metadata as `NAMESPACE`, where namespace scoping (`xds serve --scope namespace`) reads it.
    Raises ValueError, one line, for a value the control plane would refuse or misread."""
    node = node_section(
        node_id,
        node_cluster=node_cluster,
        region=region,
        zone=zone,
        sub_zone=sub_zone,
        namespace=namespace,
        cluster_id=cluster_id,
    )
    if isinstance(tls, BootstrapTLS):
        tls = GrpcTLS.of(tls)
    server = {
        "server_uri": _server_uri(xds_address),
        "channel_creds": [{"type": "insecure"} if tls is None else tls.channel_creds()],
        # The control plane speaks xDS v3 only; clients from before v2 was dropped ask for v2
        # unless the server lists this feature.
        "server_features": ["xds_v3"],
    }
    return {"xds_servers": [server], "node": node}
