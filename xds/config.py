"""The one Settings object: every knob of the control plane, with its default, in one place."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

LB_POLICIES = ("RANDOM", "ROUND_ROBIN", "LEAST_REQUEST")
SCOPES = ("mesh", "namespace")
# The name generated bootstraps give the cluster that reaches the control plane.
XDS_CLUSTER_NAME = "xds_cluster"
# The name generated bootstraps give the cluster that reaches an OpenTelemetry collector.
OTEL_CLUSTER_NAME = "otel_collector"


@dataclass(frozen=True)
class ClusterSource:
    """One Kubernetes cluster of several (`xds.sources.clusters`): its manifest files or
    directories, or its kubeconfig context."""

    name: str
    manifests: tuple[Path, ...] = ()
    kube_context: str | None = None


@dataclass(frozen=True)
class Settings:
    # Where configuration comes from: manifest files or directories (the embedded default), or
    # the Kubernetes API (in-cluster config unless a kubeconfig or context is given).
    manifests: tuple[Path, ...] = ()
    kubernetes: bool = False
    kubeconfig: str | None = None
    kube_context: str | None = None
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    # A watch is ended by the API server after this long and resumed; a connection silent for
    # longer than the read timeout (no event, no bookmark) is taken for dead and replaced.
    kube_watch_timeout_s: int = 300
    kube_read_timeout_s: float = 330.0
    # Several clusters read as one mesh (namespace sameness, `xds.sources.clusters`), instead of
    # `manifests` or `kubernetes` alone. A cluster whose source fails keeps its last endpoints
    # served for this long, then they are dropped (None: never).
    clusters: tuple[ClusterSource, ...] = ()
    cluster_stale_limit_s: float | None = 3600.0

    # Serving.
    xds_host: str = "127.0.0.1"
    xds_port: int = 18000
    # The admin server (health, metrics and /debug/*: every resource and every client) binds
    # loopback unless told otherwise; `admin_token`, when set, is required for /debug/*.
    admin_host: str = "127.0.0.1"
    admin_port: int | None = None
    admin_token: str | None = field(default=None, repr=False)
    # Health, readiness and metrics alone, for probes and scraping on the pod's own address.
    health_host: str = "127.0.0.1"
    health_port: int | None = None
    # TLS on the xDS port (see xds.tls): certificate chain and key (PEM), both or neither; with
    # a client CA, clients need a certificate from it whose identity matches their node (mTLS).
    # None: plaintext, said at start (a warning off loopback).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # With mTLS, a SPIFFE identity must be in this trust domain (None: any).
    trust_domain: str | None = None
    # Limits on xDS clients; None: the server's default (see xds.server.service).
    max_receive_bytes: int | None = None
    max_connection_age_s: float | None = None
    max_streams_per_peer: int | None = None

    # Translation defaults.
    lb_policy: str = "RANDOM"
    connect_timeout_s: float = 1.0
    cluster_domain: str = "cluster.local"
    listener_address: str = "0.0.0.0"
    listener_port_offset: int = 0
    # Envoy request tracing: the name of a cluster in Envoy's bootstrap that reaches an OTLP/gRPC
    # collector (`xds bootstrap --otel-collector` defines `otel_collector`); None: no tracing.
    tracing_cluster: str | None = None
    tracing_service_name: str = "envoy"
    tracing_sampling_percent: float = 100.0
    # Ports whose protocol is undeclared are detected from the client's first bytes. A client that
    # sends nothing for this long (a server-first protocol such as MySQL, which should be declared)
    # is then proxied as TCP instead of being cut off.
    protocol_detection_timeout_s: float = 5.0
    # Namespaces whose Services may use the `xds.dev/cluster-patch` annotation (`*`: every
    # namespace). Off by default: a patch is tenant-written Envoy config, so enabling it is the
    # operator's decision; even then only the fields in xds.translate.PATCHABLE_CLUSTER_FIELDS.
    cluster_patch_namespaces: tuple[str, ...] = ()
    # Endpoint addresses (and ExternalName IP literals) in loopback, link-local and unspecified
    # ranges are refused, because from the proxy they reach its own node: Envoy's admin API, the
    # cloud metadata service. These CIDRs re-allow such addresses (tests and the demo run their
    # backends on loopback), e.g. ("127.0.0.0/8",).
    allowed_endpoint_ranges: tuple[str, ...] = ()
    # What each client sees (see xds.scopes): "mesh", everything (node proxies serve the whole
    # mesh); or "namespace", the Services of its own namespace and those exported to it with the
    # `xds.dev/export-to` annotation, except for clients in `mesh_wide_namespaces`.
    scope: str = "mesh"
    mesh_wide_namespaces: tuple[str, ...] = ()
    # Keep every Service's traffic close (xds.localities): each client gets endpoints of its own
    # zone first, then its region, then the rest. Without it, only Services that ask for it do
    # (spec.trafficDistribution, EndpointSlice hints, the `xds.dev/locality-aware` annotation).
    locality_aware: bool = False
    # Clients on per-type streams are told to fetch endpoints and routes through this cluster.
    xds_cluster_name: str = XDS_CLUSTER_NAME

    # Event coalescing: an event after `debounce_quiet_s` without a rebuild is rebuilt at once
    # (leading edge); events that follow are coalesced: their rebuild waits for `debounce_quiet_s`
    # without new events, but never longer than `debounce_max_s` after the first of them.
    debounce_quiet_s: float = 0.01
    debounce_max_s: float = 1.0

    @property
    def scoped(self) -> bool:
        """Whether clients may see less than everything: translation then attaches the details
        that scoped views are derived from (`xds.scopes`)."""
        return self.scope != "mesh"

    def __post_init__(self) -> None:
        if self.admin_token is not None and not self.admin_token.strip():
            raise ValueError("admin_token must not be empty")
        for name in ("max_receive_bytes", "max_connection_age_s", "max_streams_per_peer"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive")
        if self.trust_domain is not None and self.tls_client_ca is None:
            raise ValueError("a trust domain (--trust-domain) needs mTLS (--tls-client-ca)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("a client CA (--tls-client-ca) needs --tls-cert and --tls-key")
        if self.lb_policy not in LB_POLICIES:
            raise ValueError(f"lb_policy {self.lb_policy!r} is not one of {', '.join(LB_POLICIES)}")
        if self.connect_timeout_s <= 0:
            raise ValueError("connect_timeout_s must be positive")
        if not 0 <= self.listener_port_offset < 65535:
            raise ValueError("listener_port_offset must be in [0, 65535)")
        if self.protocol_detection_timeout_s <= 0:
            raise ValueError("protocol_detection_timeout_s must be positive")
        for cidr in self.allowed_endpoint_ranges:
            parse_cidr(cidr)
        if any(not namespace for namespace in self.cluster_patch_namespaces):
            raise ValueError("cluster_patch_namespaces: a namespace cannot be empty")
        if self.scope not in SCOPES:
            raise ValueError(f"scope {self.scope!r} is not one of {', '.join(SCOPES)}")
        if self.mesh_wide_namespaces and self.scope == "mesh":
            raise ValueError("mesh-wide namespaces (--mesh-wide-namespace) need --scope namespace")
        if any(not namespace for namespace in self.mesh_wide_namespaces):
            raise ValueError("mesh_wide_namespaces: a namespace cannot be empty")
        names = [cluster.name for cluster in self.clusters]
        if len(set(names)) != len(names):
            raise ValueError("cluster names must be unique")
        for cluster in self.clusters:
            if bool(cluster.manifests) == (cluster.kube_context is not None):
                raise ValueError(f"cluster {cluster.name}: give manifests or a context, not both")
        if self.clusters and self.manifests:
            raise ValueError("give clusters, or one source (manifests or the Kubernetes API)")
        if self.cluster_stale_limit_s is not None and self.cluster_stale_limit_s <= 0:
            raise ValueError("cluster_stale_limit_s must be positive (None: never drop)")
        if self.debounce_quiet_s < 0 or self.debounce_max_s < self.debounce_quiet_s:
            raise ValueError("need 0 <= debounce_quiet_s <= debounce_max_s")


def parse_cidr(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An address range such as `127.0.0.2/32` or `::1/128` (an address alone is its own /32 or
    /128). Host bits set (`127.0.0.1/8`) are refused: the author probably meant something else."""
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a CIDR range such as 127.0.0.2/32: {exc}") from None
