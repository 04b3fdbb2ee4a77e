"""xds.tls without gRPC's network: the node identity rule, reading the auth context and the first
request, and the server's certificate material re-read only when its files change to a good pair.

`Authority` makes the test certificates (nothing secret is committed); the integration tests use
it too."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.message import DecodeError

from tests.factories import replace_atomically as replace
from xds._pb.envoy.service.discovery.v3 import discovery_pb2
from xds.config import Settings
from xds.resources import CLUSTER
from xds.scopes import node_namespace
from xds.tls import (
    CertificateReloader,
    IdentityGate,
    PeerIdentity,
    ServerTLS,
    first_node,
    identity_allows,
    is_loopback,
    log_transport,
    parse_spiffe,
    peer_identity,
    read_material,
)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Pair:
    cert: bytes  # PEM
    key: bytes  # PEM, PKCS#8, unencrypted

    def write(self, directory: Path, cert: str = "tls.crt", key: str = "tls.key") -> ServerTLS:
        directory.mkdir(parents=True, exist_ok=True)
        replace(directory / cert, self.cert)
        replace(directory / key, self.key)
        return ServerTLS(directory / cert, directory / key)


class Authority:
    """A test CA issuing leaf certificates with DNS, IP and URI (SPIFFE) SANs."""

    def __init__(self, name: str = "xds test CA") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return _pem(self.cert)

    def issue(self, *sans: str, name: str = "leaf") -> Pair:
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        for san in sans:
            if "://" in san:
                names.append(x509.UniformResourceIdentifier(san))
                continue
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                names.append(x509.DNSName(san))
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return Pair(_pem(cert), key_pem)


SPIFFE_A = "spiffe://cluster.local/ns/team-a/sa/envoy"


# The identity rule.


@pytest.mark.parametrize(
    ("node_id", "metadata", "peer"),
    [
        # <name>.<namespace>: a SPIFFE ID of that namespace.
        ("envoy-7f9c.team-a", None, PeerIdentity(uris=(SPIFFE_A,))),
        # A pod name may hold dots; the namespace is the last label.
        ("web.v2.team-a", None, PeerIdentity(uris=(SPIFFE_A,))),
        # Istio's sidecar form: the namespace of <pod>.<ns>.
        (
            "sidecar~10.0.0.1~web-1.team-a~team-a.svc.cluster.local",
            None,
            PeerIdentity(uris=(SPIFFE_A,)),
        ),
        # Istio's metadata, and the service account it names.
        ("node-1", {"NAMESPACE": "team-a", "SERVICE_ACCOUNT": "envoy"}, PeerIdentity((SPIFFE_A,))),
        # One of several URIs suffices.
        ("x.team-a", None, PeerIdentity(uris=("https://example.org/", SPIFFE_A))),
        # A DNS SAN equal to the node id, whatever it names (case aside, as DNS).
        ("node-1", None, PeerIdentity(dns=("other.example", "Node-1"))),
        ("proxy.node-1.example", None, PeerIdentity(dns=("proxy.node-1.example",))),
    ],
)
def test_identity_allows_a_node_its_certificate_names(node_id, metadata, peer):
    assert identity_allows(node_id, metadata, peer) is None


@pytest.mark.parametrize(
    ("node_id", "metadata", "peer", "reason"),
    [
        ("envoy.team-b", None, PeerIdentity((SPIFFE_A,)), "claims namespace 'team-b'"),
        (
            "sidecar~10.0.0.1~web-1.team-b~team-b.svc.cluster.local",
            None,
            PeerIdentity((SPIFFE_A,)),
            "claims namespace 'team-b'",
        ),
        (
            "node-1",
            {"NAMESPACE": "team-a", "SERVICE_ACCOUNT": "admin"},
            PeerIdentity((SPIFFE_A,)),
            "and service account 'admin'",
        ),
        # Two claims that disagree are refused whatever the certificate.
        (
            "envoy.team-a",
            {"NAMESPACE": "team-b"},
            PeerIdentity((SPIFFE_A,)),
            "but its metadata NAMESPACE says 'team-b'",
        ),
        # A DNS SAN vouches for the node id, not for a namespace the metadata adds.
        (
            "node-1",
            {"NAMESPACE": "team-a"},
            PeerIdentity(dns=("node-1",)),
            "vouches for node id 'node-1' alone",
        ),
        # ... nor for one that disagrees with the node id's.
        (
            "node-1.team-a",
            {"NAMESPACE": "team-b"},
            PeerIdentity(dns=("node-1.team-a",)),
            "but its metadata NAMESPACE says 'team-b'",
        ),
        # No namespace, no DNS SAN equal to the node id.
        ("node-1", None, PeerIdentity((SPIFFE_A,), ("node-2",)), "names no namespace"),
        # Not a SPIFFE workload ID: wrong scheme, path, empty parts.
        ("x.team-a", None, PeerIdentity(("https://cluster.local/ns/team-a/sa/e",)), "presented"),
        ("x.team-a", None, PeerIdentity(("spiffe://cluster.local/ns/team-a",)), "presented"),
        ("x.team-a", None, PeerIdentity(("spiffe://td/ns/team-a/sa/",)), "presented"),
        ("x.team-a", None, PeerIdentity(), "a certificate without URI or DNS names"),
        ("", None, PeerIdentity(dns=("",)), "carries no node id"),
    ],
)
def test_identity_refuses_with_the_reason(node_id, metadata, peer, reason):
    refusal = identity_allows(node_id, metadata, peer)
    assert refusal is not None and reason in refusal, refusal


def test_a_trust_domain_excludes_spiffe_ids_of_others():
    peer = PeerIdentity(("spiffe://other.domain/ns/team-a/sa/envoy",))
    assert identity_allows("x.team-a", None, peer) is None
    assert identity_allows("x.team-a", None, peer, trust_domain="cluster.local") is not None
    assert identity_allows("x.team-a", None, PeerIdentity((SPIFFE_A,)), "cluster.local") is None


def test_refusals_quote_client_text_boundedly():
    peer = PeerIdentity(tuple(f"spiffe://td/ns/n{i}/sa/{'s' * 5000}" for i in range(50)))
    refusal = identity_allows("x" * 10_000 + ".ns", {"NAMESPACE": "ns"}, peer)
    assert refusal is not None and len(refusal) < 1_000, len(refusal or "")
    assert "and 47 more" in refusal


def test_node_namespace_and_spiffe_parsing():
    assert node_namespace("node-1") is None
    assert node_namespace("a.b") == "b"
    assert node_namespace(".b") is None and node_namespace("a.") is None
    assert node_namespace("router~10.0.0.1~gw-1.istio-system~istio-system.svc.cluster.local") == (
        "istio-system"
    )
    assert node_namespace("sidecar~10.0.0.1~pod~ns.svc.cluster.local") is None
    spiffe = parse_spiffe(SPIFFE_A)
    assert spiffe is not None
    assert (spiffe.trust_domain, spiffe.namespace, spiffe.service_account) == (
        "cluster.local",
        "team-a",
        "envoy",
    )
    assert parse_spiffe("spiffe://cluster.local/ns/a/sa/b/extra") is None
    assert parse_spiffe("spiffe:///ns/a/sa/b") is None


def test_peer_identity_from_grpcs_auth_context():
    # The keys grpcio 1.85 sets (checked against a real mTLS handshake in the integration tests).
    assert peer_identity({"transport_security_type": [b"ssl"]}) is None
    context = {
        "x509_pem_cert": [b"-----BEGIN CERTIFICATE-----..."],
        "x509_subject_alternative_name": [SPIFFE_A.encode(), b"node-1"],
        "peer_uri": [SPIFFE_A.encode()],
        "peer_dns": [b"node-1"],
    }
    assert peer_identity(context) == PeerIdentity((SPIFFE_A,), ("node-1",))
    del context["peer_uri"], context["peer_dns"]
    assert peer_identity(context) == PeerIdentity((SPIFFE_A,), ("node-1",))


def test_first_node_reads_id_and_istio_metadata_of_either_variant():
    node = {
        "id": "node-1",
        "metadata": {"NAMESPACE": "team-a", "SERVICE_ACCOUNT": "envoy", "OTHER": "x", "N": 1},
    }
    sotw = discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node=node).SerializeToString()
    delta = discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER, node=node).SerializeToString()
    expected = ("node-1", {"NAMESPACE": "team-a", "SERVICE_ACCOUNT": "envoy"}, None)
    assert first_node(sotw, delta=False) == expected
    assert first_node(delta, delta=True) == expected
    assert first_node(b"", delta=False) == ("", {}, None)
    with pytest.raises(DecodeError):
        first_node(b"\xff\xff", delta=False)


def test_first_node_reads_the_locality_and_takes_an_oversized_one_for_none():
    def locality_of(cluster: str | None = None, **locality: str) -> object:
        node: dict[str, object] = {"id": "n", "locality": locality}
        if cluster is not None:
            node["metadata"] = {"CLUSTER_ID": cluster}
        request = discovery_pb2.DiscoveryRequest(node=node)
        return first_node(request.SerializeToString(), delta=False).locality

    assert locality_of(region="eu", zone="eu-a", sub_zone="rack-1") == ("eu", "eu-a", "")
    assert locality_of(zone="eu-a") == ("", "eu-a", "")
    assert locality_of("east", zone="eu-a") == ("", "eu-a", "east")
    assert locality_of("east") == ("", "", "east")
    assert locality_of(sub_zone="rack-1") is None
    assert locality_of(zone="z" * 129) is None
    assert locality_of("c" * 129, zone="eu-a") is None


def test_identity_gate_skips_streams_without_a_client_certificate_and_logs_a_pair_once(caplog):
    gate = IdentityGate()
    assert gate.check({"transport_security_type": [b"insecure"]}, "x.team-b", {}, "p") is None
    context = {"x509_pem_cert": [b"pem"], "peer_uri": [SPIFFE_A.encode()]}
    with caplog.at_level(logging.WARNING, logger="xds.tls"):
        for _ in range(3):
            assert "claims namespace 'team-b'" in (gate.check(context, "x.team-b", {}, "p") or "")
    assert gate.refused == 3
    assert len([r for r in caplog.records if "refused" in r.message]) == 1
    assert gate.check(context, "x.team-a", {}, "p") is None


# Credentials.


@pytest.fixture(scope="module")
def authority() -> Authority:
    return Authority()


def test_material_is_read_and_its_pair_checked(tmp_path, authority):
    tls = authority.issue("localhost").write(tmp_path)
    tls = ServerTLS(tls.cert, tls.key, tmp_path / "ca.crt")
    replace(tmp_path / "ca.crt", authority.pem)
    material = read_material(tls)
    assert material.cert == tls.cert.read_bytes() and material.client_ca == authority.pem

    replace(tls.key, authority.issue("localhost").key)  # another certificate's key
    with pytest.raises(ValueError, match="not a PEM certificate chain and its key"):
        read_material(tls)
    authority.issue("localhost").write(tmp_path)
    replace(tmp_path / "ca.crt", b"not a certificate")
    with pytest.raises(ValueError, match="ca.crt is not a PEM CA certificate"):
        read_material(tls)
    (tmp_path / "ca.crt").unlink()
    with pytest.raises(FileNotFoundError):
        read_material(tls)


def test_an_encrypted_key_is_refused_without_a_prompt(tmp_path, authority):
    pair = authority.issue("localhost")
    key = serialization.load_pem_private_key(pair.key, password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    tls = Pair(pair.cert, encrypted).write(tmp_path)
    with pytest.raises(ValueError, match="encrypted"):
        CertificateReloader(tls)


def test_the_reloader_hands_grpc_new_material_only_when_the_files_change_to_a_good_pair(
    tmp_path, authority, caplog
):
    first = authority.issue("localhost")
    tls = first.write(tmp_path)
    reloader = CertificateReloader(tls)
    assert reloader.initial() is not None
    assert reloader.fetch() is None  # nothing changed: every handshake keeps the configuration
    assert reloader.reloads == 0

    os.utime(tls.cert)  # touched, same bytes: still no new configuration
    assert reloader.fetch() is None and reloader.reloads == 0

    second = authority.issue("localhost", name="renewed")
    # The certificate arrives before its key: the pair does not match, and is not used.
    replace(tls.cert, second.cert)
    with caplog.at_level(logging.WARNING, logger="xds.tls"):
        assert reloader.fetch() is None
        assert reloader.fetch() is None  # not re-read (nor re-logged) until the files change
    assert reloader.failures == 1
    assert len([r for r in caplog.records if "not used" in r.message]) == 1
    assert reloader.material.cert == first.cert

    replace(tls.key, second.key)
    assert reloader.fetch() is not None
    assert reloader.material == read_material(tls)
    assert reloader.material.cert == second.cert and reloader.reloads == 1
    assert reloader.fetch() is None

    tls.key.unlink()  # mid-replacement: keep what is served
    assert reloader.fetch() is None and reloader.material.cert == second.cert


def test_the_reloader_follows_a_swapped_symlink_as_kubernetes_secret_volumes_do(
    tmp_path, authority
):
    # A Secret volume: tls.crt -> ..data/tls.crt, ..data -> ..<timestamp>, swapped by rename.
    def generation(name: str, pair: Pair) -> None:
        pair.write(tmp_path / name)
        (tmp_path / "..data_tmp").symlink_to(name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")

    first, second = authority.issue("localhost"), authority.issue("localhost")
    generation("..2024_01", first)
    for name in ("tls.crt", "tls.key"):
        (tmp_path / name).symlink_to(f"..data/{name}")
    reloader = CertificateReloader(ServerTLS(tmp_path / "tls.crt", tmp_path / "tls.key"))
    assert reloader.material.cert == first.cert
    generation("..2024_02", second)
    assert reloader.fetch() is not None and reloader.material.cert == second.cert


def test_settings_want_cert_and_key_together():
    with pytest.raises(ValueError, match="both a certificate"):
        Settings(manifests=(Path("m"),), tls_cert=Path("c"))
    with pytest.raises(ValueError, match="both a certificate"):
        Settings(manifests=(Path("m"),), tls_key=Path("k"))
    with pytest.raises(ValueError, match="needs --tls-cert"):
        Settings(manifests=(Path("m"),), tls_client_ca=Path("ca"))
    Settings(manifests=(Path("m"),), tls_cert=Path("c"), tls_key=Path("k"))


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True)]
    + [("localhost", True), ("0.0.0.0", False), ("::", False), ("10.0.0.1", False)]
    + [("xds.example", False)],
)
def test_plaintext_is_said_at_start_and_warned_about_off_loopback(caplog, host, loopback):
    assert is_loopback(host) == loopback
    with caplog.at_level(logging.INFO, logger="xds.tls"):
        log_transport(host, 18000, None)
    [record] = caplog.records
    assert record.levelno == (logging.INFO if loopback else logging.WARNING)
    assert f"xDS is served in plaintext on {host}:18000" in record.message
    assert "reads every resource" in record.message
