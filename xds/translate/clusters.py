"""Cluster options: the load balancing policy, durations, the per-Service annotations
(`xds.dev/lb-policy`, `xds.dev/connect-timeout`, `xds.dev/cluster-patch`) and how they are parsed
and bounded, the fields a cluster patch may set, the upstream HTTP protocol options and the
outlier detection of locality-aware clusters."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf import duration_pb2, json_format, wrappers_pb2
from google.protobuf.message import Message

from xds._pb.envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2
from xds._pb.envoy.config.core.v3 import extension_pb2, protocol_pb2
from xds._pb.envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from xds._pb.envoy.extensions.load_balancing_policies.random.v3 import random_pb2
from xds._pb.envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2
from xds._pb.envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from xds.config import LB_POLICIES
from xds.model import Problem, Service, error
from xds.protocols import Kind
from xds.scopes import ServiceScope
from xds.translate.common import _any, _show

# Locality-aware clusters leave failing endpoints at once, so that a zone whose backends fail
# (5xx responses, refused connections: both count as 5xx here) gives its traffic to the next
# priority: after 3 failures in a row an endpoint is ejected for 30 s (longer each time), and a
# whole zone may be (the default would keep 90 % of it in). Envoy's own defaults are 5 in a row,
# 10 s checks and 10 %.
_FAILOVER_DETECTION = outlier_detection_pb2.OutlierDetection(
    consecutive_5xx=wrappers_pb2.UInt32Value(value=3),
    interval=duration_pb2.Duration(seconds=1),
    base_ejection_time=duration_pb2.Duration(seconds=30),
    max_ejection_percent=wrappers_pb2.UInt32Value(value=100),
)

ANNOTATION_PREFIX = "xds.dev/"
LB_POLICY_ANNOTATION = ANNOTATION_PREFIX + "lb-policy"
CONNECT_TIMEOUT_ANNOTATION = ANNOTATION_PREFIX + "connect-timeout"
CLUSTER_PATCH_ANNOTATION = ANNOTATION_PREFIX + "cluster-patch"

# Annotation sizes: a value is tenant-written (up to 256 KiB in Kubernetes) and is parsed on every
# translation of its Service, and quoted in problems.
MAX_SHORT_ANNOTATION_CHARS = 64
MAX_CLUSTER_PATCH_CHARS = 8192
# Beyond this a connect timeout is a typo (and Envoy's Duration has a range: a longer value would
# fail the whole translation, not just this Service).
MAX_CONNECT_TIMEOUT_S = 3600.0

# The top-level Cluster fields a cluster-patch may set: traffic policy, as Istio's DestinationRule
# allows (connection limits, outlier detection, load balancer tuning, timeouts), and nothing that
# says which cluster this is or where its traffic goes. Left out, and why:
# - name, alt_stat_name, type/cluster_type, eds_cluster_config, load_assignment, lb_subset_config,
#   original_dst_lb_config, upstream_bind_config, dns_resolvers, dns_resolution_config,
#   typed_dns_resolver_config: identity, discovery and destinations (`name` once took over
#   another namespace's cluster, `load_assignment` sent traffic to another namespace's pods);
# - transport_socket(_matches/_matcher), metadata: TLS origination names SDS secrets and files on
#   the proxy's node, and metadata selects transport sockets;
# - typed_extension_protocol_options, upstream_config, filters, load_balancing_policy, lrs_server,
#   health_checks: typed extensions (upstream HTTP filters, custom pools), load reporting to a
#   cluster by name, health checkers whose event loggers write files on the proxy's node; the
#   xds.dev/lb-policy annotation covers the balancer, and health comes from Kubernetes readiness;
# - the deprecated lb_policy, *_lb_config, max_requests_per_connection and *_protocol_options:
#   superseded by fields above or overridden by what this control plane sets.
PATCHABLE_CLUSTER_FIELDS = frozenset(
    {
        "connect_timeout",
        "per_connection_buffer_limit_bytes",
        "circuit_breakers",
        "outlier_detection",
        "common_lb_config",
        "upstream_connection_options",
        "close_connections_on_host_health_failure",
        "ignore_health_on_host_removal",
        "preconnect_policy",
        "track_timeout_budgets",
        # ExternalName clusters resolve their target with DNS; these tune how often and how.
        "dns_refresh_rate",
        "dns_failure_refresh_rate",
        "dns_jitter",
        "respect_dns_ttl",
        "dns_lookup_family",
    }
)

T = TypeVar("T")


def _typed_policy(name: str, message: Message) -> cluster_pb2.LoadBalancingPolicy.Policy:
    return cluster_pb2.LoadBalancingPolicy.Policy(
        typed_extension_config=extension_pb2.TypedExtensionConfig(
            name=name, typed_config=_any(message)
        )
    )


def load_balancing_policy(policy: str) -> cluster_pb2.LoadBalancingPolicy:
    """The typed policy, then round_robin: proxyless gRPC clients take the first they support."""
    round_robin = _typed_policy(
        "envoy.load_balancing_policies.round_robin", round_robin_pb2.RoundRobin()
    )
    first = {
        "RANDOM": lambda: _typed_policy(
            "envoy.load_balancing_policies.random", random_pb2.Random()
        ),
        "LEAST_REQUEST": lambda: _typed_policy(
            "envoy.load_balancing_policies.least_request", least_request_pb2.LeastRequest()
        ),
        "ROUND_ROBIN": None,
    }[policy]
    policies = [round_robin] if first is None else [first(), round_robin]
    return cluster_pb2.LoadBalancingPolicy(policies=policies)


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)$")
_DURATION_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0}


def parse_duration(text: str) -> float:
    """`250ms`, `1.5s`, `2m` -> seconds. Raises ValueError with the accepted form."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"{_show(text)} is not a duration like 250ms, 1.5s or 2m")
    return float(match.group(1)) * _DURATION_UNIT_S[match.group(2)]


@dataclass(frozen=True, slots=True)
class _ClusterOptions:
    lb_policy: str
    connect_timeout_s: float
    patch: cluster_pb2.Cluster | None
    # Under scoping, whom the Service's clusters and assignments are visible to.
    scope: ServiceScope | None = None
    # Whether the Service keeps its traffic close (`xds.localities`).
    locality_aware: bool = False


def _upstream_http(kind: Kind) -> http_protocol_options_pb2.HttpProtocolOptions | None:
    """HTTP/2 to the upstream of a declared HTTP/2 port; on a detected port the protocol the client
    spoke (h2c in, HTTP/2 out); nothing for the rest (HTTP/1.1, or bytes)."""
    options = http_protocol_options_pb2.HttpProtocolOptions
    if kind is Kind.HTTP2:
        return options(
            explicit_http_config=options.ExplicitHttpConfig(
                http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
            )
        )
    if kind is Kind.DETECT:
        return options(
            use_downstream_protocol_config=options.UseDownstreamHttpConfig(
                http_protocol_options=protocol_pb2.Http1ProtocolOptions(),
                http2_protocol_options=protocol_pb2.Http2ProtocolOptions(),
            )
        )
    return None


def _annotation(
    service: Service,
    name: str,
    parse: Callable[[str], T],
    problems: list[Problem],
    instead: str,
) -> T | None:
    """The parsed value of a Service annotation; None when absent or invalid (with an error
    naming the annotation and saying what is done `instead`)."""
    value = service.annotation(name)
    if value is None:
        return None
    try:
        return parse(value)
    except ValueError as exc:
        problems.append(
            error(f"Service {service.key}", f'metadata.annotations["{name}"]', f"{exc}; {instead}")
        )
        return None


def _true_or_false(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered not in ("true", "false"):
        raise ValueError(f"{_show(value)} is not true or false")
    return lowered == "true"


def _lb_policy(value: str) -> str:
    if value.upper() not in LB_POLICIES:
        raise ValueError(f"{_show(value)} is not one of {', '.join(LB_POLICIES)}")
    return value.upper()


def _bounded(limit: int, parse: Callable[[str], T]) -> Callable[[str], T]:
    """`parse`, refusing values longer than `limit` characters before looking at them."""

    def parse_bounded(value: str) -> T:
        if len(value) > limit:
            raise ValueError(f"is {len(value)} characters long, more than the {limit} allowed")
        return parse(value)

    return parse_bounded


def _connect_timeout(value: str) -> float:
    seconds = parse_duration(value)
    if not 0 < seconds <= MAX_CONNECT_TIMEOUT_S:
        raise ValueError(f"{value!r} is not in (0s, {MAX_CONNECT_TIMEOUT_S:g}s]")
    return seconds


_CLUSTER_FIELDS = {
    **{f.name: f for f in cluster_pb2.Cluster.DESCRIPTOR.fields},
    **{f.json_name: f for f in cluster_pb2.Cluster.DESCRIPTOR.fields},
}
_TYPED_CONFIGS = ("google.protobuf.Any", "envoy.config.core.v3.TypedExtensionConfig")


def _typed_configs(message: Message, path: str = "") -> Iterable[str]:
    """The paths of the typed (Any) configs set anywhere in `message`: they can carry any
    extension, so a patch may not set one even inside a field it may patch."""
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        if descriptor.message_type.GetOptions().map_entry:
            continue  # no patchable field is a map of messages
        typed = descriptor.message_type.full_name in _TYPED_CONFIGS
        repeated = descriptor.is_repeated
        for index, item in enumerate(value if repeated else (value,)):
            at = f"{path}.{descriptor.json_name}" + (f"[{index}]" if repeated else "")
            if typed:
                yield at
            else:
                yield from _typed_configs(item, at)


def _cluster_patch(
    service: Service, value: str, problems: list[Problem]
) -> cluster_pb2.Cluster | None:
    """The cluster-patch annotation as a Cluster holding only patchable fields, or None with an
    error for each field refused (the whole patch is then ignored: half a patch is a
    configuration nobody wrote)."""
    where = f'metadata.annotations["{CLUSTER_PATCH_ANNOTATION}"]'
    refused: list[Problem] = []

    def refuse(field_path: str, message: str) -> None:
        refused.append(
            error(f"Service {service.key}", where + field_path, f"{message}; the patch is ignored")
        )

    if len(value) > MAX_CLUSTER_PATCH_CHARS:
        refuse(
            "", f"is {len(value)} characters long, more than the {MAX_CLUSTER_PATCH_CHARS} allowed"
        )
    else:
        try:
            data = json.loads(value)
        except (ValueError, RecursionError) as exc:
            data = None
            refuse("", f"is not JSON: {exc}")
        if data is not None and not isinstance(data, dict):
            refuse("", "must be a JSON object of envoy.config.cluster.v3.Cluster fields")
        elif isinstance(data, dict):
            for key in data:
                descriptor = _CLUSTER_FIELDS.get(key)
                if descriptor is None:
                    refuse(f".{key}", "is not a field of envoy.config.cluster.v3.Cluster")
                elif descriptor.name not in PATCHABLE_CLUSTER_FIELDS:
                    refuse(
                        f".{key}",
                        "may not be patched: a patch may set only "
                        + ", ".join(sorted(PATCHABLE_CLUSTER_FIELDS)),
                    )
            if not refused:
                cluster = cluster_pb2.Cluster()
                try:
                    json_format.ParseDict(data, cluster)
                except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
                    refuse("", f"is not a valid envoy.config.cluster.v3.Cluster: {exc}")
                else:
                    for path in _typed_configs(cluster):
                        refuse(path, "is a typed extension config, which a patch may not set")
                    if not refused:
                        return cluster
    problems.extend(refused)
    return None
