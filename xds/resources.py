"""xDS resource types and the serialized form every stage after translation shares.

A `Resource` holds a resource's bytes, already wrapped in `google.protobuf.Any`, so that a
DiscoveryResponse for any number of streams is built by joining bytes: nothing is serialized twice.
The hand-written wire encoding here covers only the few fields of the discovery messages the server
frames itself; everything else is upb's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

PREFIX = "type.googleapis.com/"
CLUSTER = PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = PREFIX + "envoy.config.route.v3.RouteConfiguration"
# Where a snapshot keeps the listeners served only to clients that ask for them by name: proxyless
# gRPC's API listeners, named like the client's target (`svc.ns:port`). They are Listeners on the
# wire; kept apart from LISTENER, which a wildcard subscriber (Envoy) gets whole, they never reach
# Envoy, which takes an API listener for its own and refuses a second.
API_LISTENER = LISTENER + "#api"

# Make-before-break: a cluster exists before its endpoints are needed, endpoints before a listener
# sends traffic, a listener before the routes it names.
ADS_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, LISTENER, ROUTE)

# CDS and LDS are sent whole in state-of-the-world; EDS and RDS only for the names asked for.
FULL_STATE_TYPES = frozenset({CLUSTER, LISTENER})
# Every kind of resource a snapshot holds, by the key it is held under.
SNAPSHOT_TYPES: tuple[str, ...] = (*ADS_ORDER, API_LISTENER)

SHORT_NAMES = {
    CLUSTER: "CDS",
    ENDPOINT: "EDS",
    LISTENER: "LDS",
    ROUTE: "RDS",
    API_LISTENER: "API",
}
TYPES_BY_SHORT_NAME = {short: url for url, short in SHORT_NAMES.items()}


def short_name(type_url: str) -> str:
    """CDS, EDS, LDS or RDS (API for API listeners); for any other type, its message name."""
    return SHORT_NAMES.get(type_url) or type_url.rsplit(".", 1)[-1]


def encode_varint(value: int) -> bytes:
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_len_field(field_number: int, payload: bytes) -> bytes:
    """One length-delimited field (string, bytes or sub-message) in protobuf wire format."""
    return encode_varint(field_number << 3 | 2) + encode_varint(len(payload)) + payload


# Every response frames a few fields per resource: the one-byte varints are made once.
_ONE_BYTE = tuple(bytes((value,)) for value in range(0x80))


def content_hash(*parts: bytes | str) -> str:
    digest = hashlib.blake2b(digest_size=12)
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(encode_varint(len(data)))
        digest.update(data)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Resource:
    """One named resource at one version, serialized once."""

    type_url: str
    name: str
    version: str  # content hash of `body`
    any_bytes: bytes  # google.protobuf.Any wrapping `body`, what responses carry
    # (type_url, name) of every resource this one needs to work: a cluster's endpoints, a listener's
    # routes. The cache refuses a snapshot in which one is missing.
    refs: tuple[tuple[str, str], ...] = ()
    # What translation knows of the resource beyond its bytes, for views that derive a client's
    # own form of it (`xds.translate.for_scope`); whatever it holds is folded into `version`
    # (as `salt`), so a change to it alone is a change of the resource.
    detail: object = field(default=None, compare=False)

    @classmethod
    def from_bytes(
        cls,
        type_url: str,
        name: str,
        body: bytes,
        refs: tuple[tuple[str, str], ...] = (),
        detail: object = None,
        salt: bytes = b"",
    ) -> Resource:
        """For resources built elsewhere (any protobuf library): only their bytes are needed.
        `salt` stands for `detail` in the version: equal details must give equal salts."""
        any_bytes = encode_len_field(1, type_url.encode()) + encode_len_field(2, body)
        version = content_hash(type_url, body, salt) if salt else content_hash(type_url, body)
        return cls(type_url, name, version, any_bytes, refs, detail)

    @classmethod
    def from_message(
        cls,
        name: str,
        message: Message,
        refs: tuple[tuple[str, str], ...] = (),
        detail: object = None,
        salt: bytes = b"",
    ) -> Resource:
        type_url = PREFIX + message.DESCRIPTOR.full_name
        body = message.SerializeToString(deterministic=True)
        return cls.from_bytes(type_url, name, body, refs, detail, salt)

    @property
    def body(self) -> bytes:
        """The resource message, serialized deterministically: `any_bytes` without the Any's
        framing, cut out when asked (only display and tests ask; responses send `any_bytes`, and
        keeping both held every resource's bytes twice)."""
        data = self.any_bytes
        position = len(encode_len_field(1, self.type_url.encode())) + 1  # Any.value's tag (0x12)
        length = shift = 0
        while True:
            byte = data[position]
            position += 1
            length |= (byte & 0x7F) << shift
            if byte < 0x80:
                return data[position : position + length]
            shift += 7


def type_version(resources: Iterable[Resource]) -> str:
    """A version for a set of resources: equal sets give equal versions on every replica."""
    return format_version(type_digest(resources))


def type_digest(resources: Iterable[Resource]) -> int:
    """`type_version` as a number: the XOR of the resources' shares."""
    digest = 0
    for resource in resources:
        digest ^= version_share(resource.name, resource.version)
    return digest


def version_share(name: str, version: str) -> int:
    """One resource's share of a set's version. Shares are combined with XOR, which is order-free
    and its own inverse: a set's version follows one changed resource in constant time (XOR out
    its old share, XOR in the new), and stays a content hash (128 bits of BLAKE2b per share)."""
    share = _SHARES.get((name, version))
    if share is None:
        if len(_SHARES) >= _SHARES_KEPT:
            _SHARES.clear()  # a bound on memory, not a policy: shares are recomputed on demand
        raw = hashlib.blake2b(f"{name}\0{version}".encode(), digest_size=16).digest()
        share = _SHARES[(name, version)] = int.from_bytes(raw, "big")
    return share


def format_version(digest: int) -> str:
    return f"{digest:032x}"


_SHARES: dict[tuple[str, str], int] = {}
_SHARES_KEPT = 1_000_000


def decode(resource: Resource) -> Message:
    """The message behind a resource, for display and tests; the hot path never needs it."""
    # Imported here: the generated modules load only where resources are shown.
    from xds._pb.envoy.config.cluster.v3 import cluster_pb2
    from xds._pb.envoy.config.endpoint.v3 import endpoint_pb2
    from xds._pb.envoy.config.listener.v3 import listener_pb2
    from xds._pb.envoy.config.route.v3 import route_pb2

    message_types: dict[str, type[Message]] = {
        CLUSTER: cluster_pb2.Cluster,
        ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
        LISTENER: listener_pb2.Listener,
        ROUTE: route_pb2.RouteConfiguration,
    }
    message = message_types[resource.type_url]()
    message.ParseFromString(resource.body)
    return message


def to_json(
    resources_by_type: Mapping[str, Mapping[str, Resource]],
) -> dict[str, list[dict[str, Any]]]:
    """Resources as proto3 JSON, grouped by short type name (CDS, EDS, LDS, RDS, API)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for type_url in SNAPSHOT_TYPES:
        items = resources_by_type.get(type_url, {})
        out[SHORT_NAMES[type_url]] = [
            json_format.MessageToDict(decode(items[name])) for name in sorted(items)
        ]
    return out
