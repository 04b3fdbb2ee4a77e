"""TLS on the xDS port: server credentials reloaded from disk, and the client's node identity.

Credentials. `xds serve --tls-cert --tls-key [--tls-client-ca]` serves xDS over TLS (mTLS with a
client CA). gRPC asks `CertificateReloader.fetch` before every new connection's handshake; it
compares the files' stat stamps (a few microseconds) and reads, checks and hands gRPC new material
only when they changed, so a renewed certificate (cert-manager, a Kubernetes Secret's atomic
`..data` swap, `mv` of a new file) is served to new connections while the connections already open
keep theirs, and their streams go on. A half-written or mismatched pair (the certificate replaced,
its key not yet) is not used: the last good material stays until the files change again.

Node identity. With mTLS, a stream's node must be the one its client certificate names, checked
on its first request (the one that carries the node), as Istio's istiod checks a proxy against its
certificate. `identity_allows` holds the rule; `IdentityGate` applies it to a gRPC stream.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, cast

import grpc

from xds._pb.envoy.service.discovery.v3 import discovery_pb2
from xds.errors import ConfigError
from xds.localities import Locality
from xds.scopes import (
    NAMESPACE_KEY,
    SERVICE_ACCOUNT_KEY,
    metadata_text,
    node_namespace,
)

log = logging.getLogger(__name__)

# What a refusal's log line and status message quote of client-chosen text (node id, SANs).
QUOTED = 200
# Refusals logged per (certificate, node) pair are logged once; past this many pairs, every
# refusal is only counted: a client cycling node ids cannot fill the log or this set.
LOGGED_REFUSALS = 1_000


@dataclass(frozen=True, slots=True)
class ServerTLS:
    """The files of the xDS server's TLS: certificate chain and key (PEM), and the CA that client
    certificates must chain to (None: clients are not asked for a certificate)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def paths(self) -> tuple[Path, ...]:
        if self.client_ca is None:
            return (self.cert, self.key)
        return (self.cert, self.key, self.client_ca)


@dataclass(frozen=True, slots=True)
class Material:
    """The bytes of one consistent read of the files."""

    cert: bytes
    key: bytes
    client_ca: bytes | None


def _refuse_password() -> bytes:
    # ssl would otherwise prompt on the terminal for an encrypted key's passphrase.
    raise ConfigError("the private key is encrypted; give an unencrypted PEM key")


def read_material(tls: ServerTLS) -> Material:
    """The files' bytes, checked: the key is the certificate's, the CA parses. Raises ValueError
    (naming the file) or OSError. The pair is checked by loading it from the paths, so the bytes
    are read before and after: a file replaced in between is refused, not served half-new."""
    before = tuple(path.read_bytes() for path in tls.paths())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(tls.cert, tls.key, password=_refuse_password)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{tls.cert} and {tls.key} are not a PEM certificate chain and its key: {exc}"
        ) from None
    if tls.client_ca is not None:
        try:
            context.load_verify_locations(cadata=before[2].decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"{tls.client_ca} is not a PEM CA certificate: {exc}") from None
    after = tuple(path.read_bytes() for path in tls.paths())
    if after != before:
        raise ConfigError("the files changed while they were read")
    return Material(before[0], before[1], before[2] if tls.client_ca is not None else None)


def _configuration(material: Material) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.key, material.cert)], root_certificates=material.client_ca
    )


Stamp = tuple[tuple[int, int, int, int, int], ...]


class CertificateReloader:
    """The server's certificate configuration, re-read when its files change (see the module's
    docstring). `fetch` is gRPC's per-handshake callback; it may run on gRPC's threads."""

    def __init__(self, tls: ServerTLS) -> None:
        self.tls = tls
        self._lock = threading.Lock()
        # Files missing or wrong at start are a usage error, said at once.
        self._stamp = self._stat()
        self.material = read_material(tls)
        self.reloads = 0  # new material handed to gRPC
        self.failures = 0  # changes not used because the files could not be read or checked

    def _stat(self) -> Stamp:
        # os.stat follows symbolic links, so a Kubernetes Secret's swapped `..data` link shows
        # as a new inode; the change time catches a rewrite within one mtime tick.
        stamps = []
        for path in self.tls.paths():
            st = os.stat(path)
            stamps.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(stamps)

    def initial(self) -> grpc.ServerCertificateConfiguration:
        return _configuration(self.material)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """None (keep the current configuration) unless the files changed to good material."""
        try:
            stamp = self._stat()
        except OSError:
            # Mid-replacement (a file briefly absent): the next handshake looks again.
            return None
        with self._lock:
            if stamp == self._stamp:
                return None
            # Recorded before reading: material that fails its checks is not re-read at every
            # handshake, only when the files change again (the key arriving after its cert).
            self._stamp = stamp
            try:
                material = read_material(self.tls)
            except (OSError, ValueError) as exc:
                self.failures += 1
                log.warning(
                    "xDS TLS files changed but are not used (the previous certificate is still "
                    "served): %s",
                    exc,
                )
                return None
            if material == self.material:
                return None  # touched, not changed
            self.material = material
            self.reloads += 1
        log.info("xDS TLS certificate reloaded from %s: new connections get it", self.tls.cert)
        return _configuration(material)

    def credentials(self) -> grpc.ServerCredentials:
        # grpc documents None from the fetcher as "no change"; its stubs type it as never None.
        fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], self.fetch)
        return grpc.dynamic_ssl_server_credentials(
            self.initial(), fetch, require_client_authentication=self.tls.client_ca is not None
        )


def is_loopback(host: str) -> bool:
    """Whether a listen address is on loopback only (`localhost`, 127.0.0.0/8, ::1)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def log_transport(host: str, port: int, tls: ServerTLS | None) -> None:
    """One line saying how xDS is served; plaintext off loopback is a warning."""
    if tls is None:
        log.log(
            logging.INFO if is_loopback(host) else logging.WARNING,
            "xDS is served in plaintext on %s:%d: any client that reaches it reads every "
            "resource (serve TLS with --tls-cert and --tls-key, mTLS with --tls-client-ca)",
            host,
            port,
        )
    elif tls.client_ca is None:
        log.info(
            "xDS is served over TLS on %s:%d without client certificates: any client that "
            "reaches it reads every resource (--tls-client-ca asks for them)",
            host,
            port,
        )
    else:
        log.info(
            "xDS is served over mTLS on %s:%d: clients need a certificate from %s whose "
            "identity matches their node",
            host,
            port,
            tls.client_ca,
        )


# Node identity.


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """The names a client certificate carries: URI SANs (SPIFFE IDs) and DNS SANs."""

    uris: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()

    def describe(self) -> str:
        names = [*self.uris, *self.dns]
        if not names:
            return "a certificate without URI or DNS names"
        shown = ", ".join(name[:QUOTED] for name in names[:3])
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        return f"a certificate for {shown}{more}"


def peer_identity(auth_context: Mapping[str, Iterable[bytes]]) -> PeerIdentity | None:
    """The client certificate's names from a grpc auth context; None without a client
    certificate (plaintext, or TLS that asked for none). grpcio sets `peer_uri` and `peer_dns`
    per SAN kind, and `x509_subject_alternative_name` for all of them."""
    if not auth_context.get("x509_pem_cert"):
        return None

    def texts(key: str) -> tuple[str, ...]:
        return tuple(value.decode("utf-8", "replace") for value in auth_context.get(key, ()))

    uris, dns = texts("peer_uri"), texts("peer_dns")
    if not uris and not dns:
        # An older grpcio: every SAN under one key; a DNS name never holds "://".
        sans = texts("x509_subject_alternative_name")
        uris = tuple(name for name in sans if "://" in name)
        dns = tuple(name for name in sans if "://" not in name)
    return PeerIdentity(uris, dns)


@dataclass(frozen=True, slots=True)
class Spiffe:
    trust_domain: str
    namespace: str
    service_account: str


def parse_spiffe(uri: str) -> Spiffe | None:
    """`spiffe://<trust domain>/ns/<namespace>/sa/<service account>` (Kubernetes workload IDs, as
    Istio issues them); None for any other URI."""
    scheme, sep, rest = uri.partition("://")
    if scheme.lower() != "spiffe" or not sep:
        return None
    trust_domain, _, path = rest.partition("/")
    parts = path.split("/")
    if not trust_domain or len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
        return None
    if not parts[1] or not parts[3]:
        return None
    return Spiffe(trust_domain, parts[1], parts[3])


def identity_allows(
    node_id: str,
    node_metadata: Mapping[str, Any] | None,
    peer: PeerIdentity,
    trust_domain: str | None = None,
) -> str | None:
    """None when the client certificate `peer` may speak for the node, else why not.

    A node is allowed when a DNS SAN of the certificate equals its node id (case aside), or when
    a SPIFFE ID `spiffe://<trust domain>/ns/<ns>/sa/<sa>` of the certificate is in the namespace
    the node claims (and of the service account it claims, if it claims one). The namespace is
    `claimed_namespace`: the node metadata's `NAMESPACE` (Istio's key) or the one its node id
    names; both given, they must agree. The service account is the metadata's `SERVICE_ACCOUNT`.
    A node that names no namespace (`node-1`) needs the DNS SAN. A DNS SAN vouches for the node id
    alone, so a namespace only the metadata names is refused with it: scoping (`xds.scopes`) trusts
    the namespace a node claims once this check has passed. With `trust_domain`, SPIFFE IDs of
    other trust domains do not count.
    """
    quoted = repr(node_id[:QUOTED])
    if not node_id:
        return "the first request carries no node id"
    from_id = node_namespace(node_id)
    from_metadata = metadata_text(node_metadata, NAMESPACE_KEY)
    if from_id is not None and from_metadata is not None and from_id != from_metadata:
        return (
            f"node {quoted} names namespace {from_id[:QUOTED]!r} but its metadata "
            f"{NAMESPACE_KEY} says {from_metadata[:QUOTED]!r}"
        )
    if any(name.lower() == node_id.lower() for name in peer.dns):
        if from_metadata is not None and from_id is None:
            return (
                f"the client certificate's DNS name vouches for node id {quoted} alone, not for "
                f"the namespace {from_metadata[:QUOTED]!r} of its metadata {NAMESPACE_KEY}: name "
                "it in the node id (<name>.<namespace>) or present a SPIFFE ID of the namespace"
            )
        return None
    namespace = from_metadata or from_id
    if namespace is None:
        return (
            f"node {quoted} names no namespace (<name>.<namespace>, or metadata {NAMESPACE_KEY}) "
            f"and no DNS name of the client certificate equals it (the client presented "
            f"{peer.describe()})"
        )
    service_account = metadata_text(node_metadata, SERVICE_ACCOUNT_KEY)
    for uri in peer.uris:
        spiffe = parse_spiffe(uri)
        if spiffe is None or spiffe.namespace != namespace:
            continue
        if trust_domain is not None and spiffe.trust_domain != trust_domain:
            continue
        if service_account is not None and spiffe.service_account != service_account:
            continue
        return None
    claim = f"namespace {namespace[:QUOTED]!r}"
    if service_account is not None:
        claim += f" and service account {service_account[:QUOTED]!r}"
    return f"node {quoted} claims {claim}, but the client presented {peer.describe()}"


def first_node(request: bytes, delta: bool) -> FirstNode:
    """The node of a stream's first request, as far as views and the identity check read it
    (raises DecodeError)."""
    message: discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest
    if delta:
        message = discovery_pb2.DeltaDiscoveryRequest.FromString(request)
    else:
        message = discovery_pb2.DiscoveryRequest.FromString(request)
    node = message.node
    metadata: dict[str, Any] = {}
    for key in (NAMESPACE_KEY, SERVICE_ACCOUNT_KEY, NODE_NAME_KEY):
        field = node.metadata.fields.get(key)
        if field is not None and field.WhichOneof("kind") == "string_value":
            metadata[key] = field.string_value
    region, zone = node.locality.region, node.locality.zone
    cluster_field = node.metadata.fields.get(CLUSTER_ID_KEY)
    cluster = ""
    if cluster_field is not None and cluster_field.WhichOneof("kind") == "string_value":
        cluster = cluster_field.string_value
    named = (region or zone or cluster) and max(
        len(region), len(zone), len(cluster)
    ) <= MAX_LOCALITY_FIELD
    return FirstNode(node.id, metadata, Locality(region, zone, cluster) if named else None)


class FirstNode(NamedTuple):
    id: str
    metadata: dict[str, Any]
    locality: Locality | None  # None when the node names no region or zone


# Istio's node metadata keys for the Kubernetes cluster and node a proxy runs in.
CLUSTER_ID_KEY = "CLUSTER_ID"
NODE_NAME_KEY = "NODE_NAME"
# Cloud regions and zones are short (`europe-west1-b`); a label value is at most 63 characters.
# A locality is a view's key, kept while its clients are: a longer one is taken for none.
MAX_LOCALITY_FIELD = 128


class IdentityGate:
    """Applies `identity_allows` to a stream's first request, when its client presented a
    certificate; counts refusals and logs each (certificate, node) pair once, boundedly."""

    def __init__(self, trust_domain: str | None = None) -> None:
        self.trust_domain = trust_domain
        self.refused = 0
        self._logged: set[tuple[PeerIdentity, str]] = set()

    def check(
        self,
        auth_context: Mapping[str, Iterable[bytes]],
        node_id: str,
        metadata: Mapping[str, Any],
        peer: str,
    ) -> str | None:
        """None to serve the stream, else the reason to refuse it with PERMISSION_DENIED. The node
        is the stream's first request's (`first_node`)."""
        identity = peer_identity(auth_context)
        if identity is None:
            return None  # no client certificate: the server does not ask for one
        reason = identity_allows(node_id, metadata, identity, self.trust_domain)
        if reason is None:
            return None
        self.refused += 1
        key = (identity, node_id[:QUOTED])
        if key not in self._logged and len(self._logged) < LOGGED_REFUSALS:
            self._logged.add(key)
            log.warning(
                "stream from %s refused (PERMISSION_DENIED): %s (logged once per certificate "
                "and node)",
                peer,
                reason,
            )
        return reason
