"""Endpoints and destinations: which addresses the proxy may be sent to (loopback, link-local
and unspecified ones are refused unless allowed; ExternalName targets that are IP literals or names
of the local host likewise), the field of an address in its EndpointSlice or Endpoints object, the
endpoint port serving a Service port, and ClusterLoadAssignments serialized by hand."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

from xds._pb.envoy.config.core.v3 import address_pb2, health_check_pb2
from xds._pb.envoy.config.endpoint.v3 import endpoint_components_pb2
from xds.config import parse_cidr
from xds.model import EndpointGroup, Problem, Service, ServicePort, error
from xds.resources import encode_len_field, encode_varint
from xds.translate.names import cluster_name

# Why an address is refused, by the kind of range it is in.
_WHY_REFUSED = {
    "loopback": "is a loopback address: from the proxy it reaches the proxy's own node (Envoy's "
    "admin API among others)",
    "link-local": "is a link-local address: from the proxy it reaches the node's link (the cloud "
    "metadata service at 169.254.169.254 among others)",
    "unspecified": "is an unspecified address: a connection to it reaches the proxy's own node",
    "invalid": "is not an IP address",
}
# Names that resolve to the local host whatever DNS says: RFC 6761's localhost (and *.localhost),
# and the loopback names of common /etc/hosts files.
_LOCAL_HOST_NAMES = frozenset(
    {
        "localhost",
        "localhost.localdomain",
        "localhost4",
        "localhost4.localdomain4",
        "localhost6",
        "localhost6.localdomain6",
        "ip6-localhost",
        "ip6-loopback",
    }
)
_LOCAL_HOST_ADDRESSES = (socket.inet_pton(socket.AF_INET, "127.0.0.1"), bytes(15) + b"\x01")


def _local_kind(packed: bytes) -> str | None:
    """The refused range a packed IPv4 or IPv6 address is in: loopback (127.0.0.0/8, ::1),
    link-local (169.254.0.0/16, fe80::/10) or unspecified (0.0.0.0/8, which Linux connects
    locally, and ::); IPv4-mapped IPv6 addresses (::ffff:127.0.0.1) as their IPv4 address."""
    if len(packed) == 16:
        if packed[:12] == _MAPPED_PREFIX:
            return _local_kind(packed[12:])
        if packed[:15] == bytes(15) and packed[15] < 2:
            return "loopback" if packed[15] else "unspecified"
        if packed[0] == 0xFE and packed[1] & 0xC0 == 0x80:
            return "link-local"
        return None
    first = packed[0]
    if first == 127:
        return "loopback"
    if first == 169 and packed[1] == 254:
        return "link-local"
    if first == 0:
        return "unspecified"
    return None


_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


def _packed_ipv4_literal(host: str) -> bytes | None:
    """`host` as a packed address when a resolver would take it for one: inet_aton's forms
    (`127.0.0.1`, `127.1`, `2130706433`, `0x7f.1`) and IPv6 literals; None for a host name."""
    try:
        return socket.inet_aton(host)
    except (OSError, ValueError):
        pass
    try:
        return socket.inet_pton(socket.AF_INET6, host.strip("[]"))
    except (OSError, ValueError):
        return None


class _Destinations:
    """Where the proxy may be sent: anywhere but its own node (loopback, link-local and
    unspecified addresses), except in the allowed ranges (`Settings.allowed_endpoint_ranges`)."""

    def __init__(self, allowed: Sequence[str]) -> None:
        self._allowed = tuple(parse_cidr(cidr) for cidr in allowed)

    def refusal_of_text(self, address: str) -> str | None:
        """Why the proxy must not be sent to `address` (an IP literal), or None. Parsed with
        inet_pton, as Envoy parses it; this runs for every endpoint, so most addresses cost
        one parse and a look at their first bytes."""
        try:
            packed = socket.inet_pton(socket.AF_INET, address)
        except (OSError, ValueError):
            try:
                packed = socket.inet_pton(socket.AF_INET6, address)
            except (OSError, ValueError):
                return _WHY_REFUSED["invalid"]
        return self.refusal(packed)

    def refusal(self, packed: bytes) -> str | None:
        kind = _local_kind(packed)
        if kind is None or self.allows(packed):
            return None
        return _WHY_REFUSED[kind]

    def allows(self, packed: bytes) -> bool:
        if not self._allowed:
            return False
        addresses = [ipaddress.ip_address(packed)]
        if len(packed) == 16 and packed[:12] == _MAPPED_PREFIX:
            addresses.append(ipaddress.ip_address(packed[12:]))
        return any(
            address in network
            for address in addresses
            for network in self._allowed
            if network.version == address.version
        )


def _address_field(group: EndpointGroup, subset: int, position: int) -> str:
    """The field of an endpoint's address in the object its group came from (the sources keep
    an EndpointSlice's endpoints in order, and an Endpoints subset's ready addresses first)."""
    if group.source.startswith("Endpoints "):
        ready = sum(1 for endpoint in group.endpoints if endpoint.ready)
        if position < ready:
            return f"subsets[{subset}].addresses[{position}].ip"
        return f"subsets[{subset}].notReadyAddresses[{position - ready}].ip"
    return f"endpoints[{position}].addresses[0]"


def _resolve_port(
    service: Service, port: ServicePort, group: EndpointGroup, problems: list[Problem]
) -> int | None:
    """The endpoint port serving `port`: the group's port named like the Service port."""
    for candidate in group.ports:
        if candidate.name == port.name and candidate.protocol == port.protocol:
            return candidate.port
    wanted = f"named {port.name!r}" if port.name else "without a name"
    problems.append(
        error(
            group.source,
            "ports",
            f"has no {port.protocol} port {wanted} for Service {service.key} port {port.port} "
            f"(targetPort {port.target_port!r}); its endpoints are left out of cluster "
            f"{cluster_name(service.key, port)}",
        )
    )
    return None


# A socket address this short keeps every enclosing length (up to the LbEndpoint's: socket + 6
# bytes, + 2 for health) within one varint byte.
_SHORT_SOCKET = 120


def encode_assignment(
    name: str,
    localities: Sequence[tuple[str, str, str, Sequence[tuple[tuple[str, int], int]]]],
) -> bytes:
    """A ClusterLoadAssignment, serialized by hand: the biggest part of a build is endpoints, and
    framing their few fields directly costs a fraction of building messages. The bytes are those
    of protobuf's deterministic serialization (fields in number order, defaults left out), which
    `tests/unit/test_translate.py` checks. `localities`: (region, zone, sub-zone, [((address,
    port), health)]), in order.

    Every locality carries a `load_balancing_weight`: its number of HEALTHY endpoints, at least 1.
    gRPC's clients drop a locality without one, and split traffic between localities by weight
    before round_robin within each, so weighting by endpoints gives every endpoint an equal share,
    as Envoy's own balancing does (Envoy reads locality weights only when a cluster asks). DRAINING
    endpoints count for nothing: gRPC picks none of them, as Envoy does not. The priority is 0,
    the default (so not on the wire)."""
    out = [encode_len_field(1, name.encode())] if name else []  # cluster_name
    for region, zone, sub_zone, endpoints in localities:
        locality = b""
        if region:
            locality += encode_len_field(1, region.encode())  # Locality.region
        if zone:
            locality += encode_len_field(2, zone.encode())  # Locality.zone
        if sub_zone:
            locality += encode_len_field(3, sub_zone.encode())  # Locality.sub_zone
        body = [encode_len_field(1, locality)]  # LocalityLbEndpoints.locality
        healthy = 0
        for (address, port), health in endpoints:
            healthy += health == health_check_pb2.HEALTHY
            # SocketAddress: address = 2, port_value = 3; in Address.socket_address (1), in
            # Endpoint.address (1), in LbEndpoint.endpoint (1); LbEndpoint.health_status = 2.
            raw = address.encode()
            socket = b"\x12" + encode_varint(len(raw)) + raw
            if port:
                socket += b"\x18" + encode_varint(port)
            size = len(socket)
            if size < _SHORT_SOCKET:
                # Every length below fits in one byte: frame the three levels at once.
                lb_endpoint = bytes((10, size + 4, 10, size + 2, 10, size)) + socket
            else:
                lb_endpoint = encode_len_field(1, encode_len_field(1, encode_len_field(1, socket)))
            if health:
                lb_endpoint += b"\x10" + encode_varint(health)
            body.append(encode_len_field(2, lb_endpoint))  # LocalityLbEndpoints.lb_endpoints
        # LocalityLbEndpoints.load_balancing_weight (3): UInt32Value{value (1)}.
        body.append(encode_len_field(3, b"\x08" + encode_varint(max(healthy, 1))))
        out.append(encode_len_field(2, b"".join(body)))  # ClusterLoadAssignment.endpoints
    return b"".join(out)


def _lb_endpoint(
    address: str, port: int, health: health_check_pb2.HealthStatus = health_check_pb2.UNKNOWN
) -> endpoint_components_pb2.LbEndpoint:
    return endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(address=address, port_value=port)
            )
        ),
        health_status=health,
    )
