"""Pure translation of the mesh into Envoy resources: deterministic, no I/O, no clock.

Names, in one place:

- Cluster and its ClusterLoadAssignment: `<namespace>/<service>:<port>`, where `<port>` is the
  Service port's name, or its number when unnamed. The EDS service name is the cluster name.
- Listener: `port:<port>`, one for each distinct Service port number whatever its protocol, bound
  to `Settings.listener_address` on `<port> + Settings.listener_port_offset`. An address can be
  bound by one listener only, so every Service on a port number shares its listener, each through
  filter chains of its own.
- RouteConfiguration: `http:<port>`, named by the listener's HttpConnectionManager through RDS,
  holding the virtual hosts of the port's HTTP (and undeclared) Services.
- Virtual host: `<namespace>/<service>`, one per Service in the route configuration of each of its
  port numbers.
- API listener (proxyless gRPC): named as a gRPC client names its target `xds:///<host>:<port>`,
  for every HTTP-family port (http, http2, grpc, undeclared): `svc.ns:port`, `svc.ns.svc:port`,
  `svc.ns.svc.<cluster domain>:port`, and `<ClusterIP>:port` (`[<ip>]:port` for IPv6) when the
  Service owns its ClusterIP. Each holds an HttpConnectionManager that takes the port's route
  configuration `http:<port>` over ADS (the one Envoy uses: its virtual hosts hold these
  domains) and the router. The short name is left out: `svc:port` could be a Service named
  `port`'s listener `port:<n>` in form, and a short name means a namespace only to DNS. They are
  kept under `API_LISTENER` in a snapshot, served only to clients that name them.

Each port keeps its protocol (`xds.protocols`): HTTP ports share the HttpConnectionManager of their
port; TLS ports are passed through, matched by SNI on the Service's host names; TCP ports go
through tcp_proxy; undeclared ports are detected (http_inspector: HTTP to the connection manager,
anything else to tcp_proxy). Bytes that are not HTTP carry no host name, so when several Services
share a port number they are told apart by the destination address, as a node proxy receiving
redirected traffic sees it: a Service's ClusterIP selects its chain (the `original_dst` listener
filter restores the address that iptables rewrote). Connections to any other address go to the
port's default: its HTTP connection manager for HTTP, and for the rest the first Service (by
namespace/name) that has no ClusterIP, else the first one. A Service that has no ClusterIP and is
not that default cannot be reached on the port, and gets a warning. TLS Services are also told
apart by SNI. UDP and SCTP ports are not proxied (an info note).

A virtual host's domains are `svc.ns`, `svc.ns.svc`, `svc.ns.svc.<cluster domain>`, the short
name `svc` and the ClusterIP, each with and without `:<port>`. Envoy rejects a route configuration
in which two virtual hosts share a domain, so when several namespaces use the same name the short
name goes to the Service in `default` (else to none), and a ClusterIP to the first Service that
claims it.

Per-Service annotations (prefix `xds.dev/`):

- `lb-policy`: RANDOM, ROUND_ROBIN or LEAST_REQUEST, overriding `Settings.lb_policy`.
- `connect-timeout`: a duration such as `250ms` or `2s`, at most an hour.
- `cluster-patch`: a JSON object of Envoy `Cluster` fields (proto3 JSON or field names) merged into
  every cluster of the Service, for traffic policy this control plane does not model. Off unless
  the Service's namespace is in `Settings.cluster_patch_namespaces` (`xds serve
  --allow-cluster-patch NS`, `*` for all), at most 8 KiB, and limited to the fields of
  `PATCHABLE_CLUSTER_FIELDS` (connection limits, timeouts, outlier detection, load balancer
  tuning, DNS refresh: what Istio's DestinationRule lets a user set), with no typed extension
  config inside them. A patch can never change a cluster's name, discovery or endpoints, TLS,
  metadata or extensions, so a Service cannot take over or redirect another's cluster (one did, by
  patching `name`). Envoy validates the values and NACKs what it cannot accept.

Annotations are tenant-written: a value too long, invalid or refused is an error naming the Service
and `metadata.annotations["<annotation>"]` (and, in a patch, the offending field), and the Service
is served without it.

No route to the proxy's own node: an endpoint address (EndpointSlice, Endpoints) in a loopback
(127.0.0.0/8, ::1), link-local (169.254.0.0/16, fe80::/10) or unspecified (0.0.0.0/8, ::) range,
IPv4-mapped forms included, is left out of its clusters with an error naming the object and the
address's field, unless `Settings.allowed_endpoint_ranges` (`--allow-endpoints CIDR`) covers it:
from a proxy, such an address reaches the proxy's node itself (Envoy's admin API, whose
`/quitquitquit` stops it; the cloud metadata service at 169.254.169.254). The same goes for an
ExternalName target that is an IP literal (in any form a resolver reads as one: `127.1`,
`2130706433`) or a name of the local host (`localhost`, `*.localhost`, `localhost.localdomain`,
`ip6-localhost`, ...; allowed only if both 127.0.0.1 and ::1 are): its clusters keep their names
and have no endpoint. Other host names are not resolved here (translation does no I/O, and Envoy
resolves them again at every DNS refresh, so an answer checked here could differ from the one
Envoy connects to): a DNS name that resolves to such an address is not caught here. Where
tenants may create ExternalName Services, the DNS the proxies use must not answer such addresses
for outside names (most resolvers can filter them: dnsmasq's --stop-dns-rebind, Unbound's
private-address).

The work is incremental: a Translator remembers each Service's output and translates again only
the Services whose inputs changed; route configurations are assembled by joining the virtual hosts'
serialized bytes.

The package, by concern (each module imports only those listed before it, `translator` the others):

- `common`: helpers they share (Any packing, the ADS config source, durations, scope marks);
- `names`: the resource names above;
- `clusters`: load balancing policy, durations, the annotations and cluster patches, outlier
  detection of locality-aware clusters;
- `endpoints`: the destinations refused (loopback, link-local, unspecified; ExternalName targets)
  and ClusterLoadAssignments;
- `listeners`: port listeners (HTTP, TLS and TCP chains, tracing) and API listeners;
- `translator`: `Translator`, `Translation`, per-Service output, claims and per-port bookkeeping,
  `for_scope` and `translate()`.
"""

from xds.translate.clusters import (
    ANNOTATION_PREFIX,
    CLUSTER_PATCH_ANNOTATION,
    CONNECT_TIMEOUT_ANNOTATION,
    LB_POLICY_ANNOTATION,
    MAX_CLUSTER_PATCH_CHARS,
    MAX_CONNECT_TIMEOUT_S,
    MAX_SHORT_ANNOTATION_CHARS,
    PATCHABLE_CLUSTER_FIELDS,
    load_balancing_policy,
    parse_duration,
)
from xds.translate.endpoints import encode_assignment
from xds.translate.listeners import DETECTED_HTTP, PortClaim, api_listener, port_listener
from xds.translate.names import cluster_name, listener_name, route_name
from xds.translate.translator import ServiceOutput, Translation, Translator, for_scope, translate

__all__ = [
    "ANNOTATION_PREFIX",
    "CLUSTER_PATCH_ANNOTATION",
    "CONNECT_TIMEOUT_ANNOTATION",
    "DETECTED_HTTP",
    "LB_POLICY_ANNOTATION",
    "MAX_CLUSTER_PATCH_CHARS",
    "MAX_CONNECT_TIMEOUT_S",
    "MAX_SHORT_ANNOTATION_CHARS",
    "PATCHABLE_CLUSTER_FIELDS",
    "PortClaim",
    "ServiceOutput",
    "Translation",
    "Translator",
    "api_listener",
    "cluster_name",
    "encode_assignment",
    "for_scope",
    "listener_name",
    "load_balancing_policy",
    "parse_duration",
    "port_listener",
    "route_name",
    "translate",
]
