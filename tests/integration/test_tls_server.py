"""TLS and mTLS on the xDS port over real gRPC on loopback: who gets served, who is refused and how,
and a server certificate renewed on disk while a stream stays open."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.integration.conftest import LOOPBACK, endpoint_slice, service, write_manifests
from tests.integration.test_grpc_stream import ads_call, resources
from tests.unit.test_scopes import SCOPED, the_mesh
from tests.unit.test_tls import Authority, Pair, replace
from xds._pb.envoy.config.cluster.v3 import cluster_pb2
from xds._pb.envoy.service.discovery.v3 import discovery_pb2
from xds.app import ControlPlane
from xds.cache import Cache
from xds.config import Settings
from xds.resources import CLUSTER
from xds.scopes import scope_rule
from xds.server.service import DiscoveryServer, start_server
from xds.server.stream import SHARED
from xds.server.views import Scoping
from xds.tls import CertificateReloader, IdentityGate, ServerTLS
from xds.translate import for_scope, translate

DELTA_ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
SPIFFE_A = "spiffe://cluster.local/ns/team-a/sa/envoy"


@dataclass
class Served:
    cache: Cache
    server: DiscoveryServer
    port: int
    authority: Authority
    tls: ServerTLS

    def channel(self, client: Pair | None, roots: bytes | None = None) -> grpc.aio.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=roots or self.authority.pem,
            private_key=client.key if client else None,
            certificate_chain=client.cert if client else None,
        )
        return grpc.aio.secure_channel(f"127.0.0.1:{self.port}", credentials)


@pytest.fixture
async def mtls(tmp_path: Path) -> AsyncIterator[Served]:
    """An mTLS server (certificate and client CA from one test authority) holding one cluster."""
    authority = Authority()
    server_tls = authority.issue("localhost", "127.0.0.1", name="xds").write(tmp_path)
    replace(tmp_path / "ca.crt", authority.pem)
    tls = ServerTLS(server_tls.cert, server_tls.key, tmp_path / "ca.crt")
    cache = Cache()
    cache.publish(resources(b"\x0a\x01a"))
    server = DiscoveryServer(cache, identity=IdentityGate())
    grpc_server, port = await start_server(
        server, "127.0.0.1", 0, credentials=CertificateReloader(tls).credentials()
    )
    try:
        yield Served(cache, server, port, authority, tls)
    finally:
        await grpc_server.stop(None)


async def first_response(
    channel: grpc.aio.Channel, node_id: str
) -> discovery_pb2.DiscoveryResponse:
    call = ads_call(channel)
    await call.write(discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node={"id": node_id}))
    response = await asyncio.wait_for(call.read(), 10)
    assert isinstance(response, discovery_pb2.DiscoveryResponse), response
    return response


async def test_mtls_serves_a_client_whose_certificate_names_its_node(mtls: Served):
    async with mtls.channel(mtls.authority.issue(SPIFFE_A)) as channel:
        response = await first_response(channel, "envoy-1.team-a")
    assert [r.value for r in response.resources] == [b"\x0a\x01a"]
    # Istio's node form, and a node id equal to a DNS SAN.
    async with mtls.channel(mtls.authority.issue(SPIFFE_A)) as channel:
        await first_response(channel, "sidecar~10.0.0.1~web-1.team-a~team-a.svc.cluster.local")
    async with mtls.channel(mtls.authority.issue("node-1")) as channel:
        await first_response(channel, "node-1")
    assert mtls.server.identity is not None and mtls.server.identity.refused == 0


@pytest.mark.parametrize("client", ["another CA", "no certificate"])
async def test_a_client_without_a_certificate_of_the_client_ca_is_refused(mtls: Served, client):
    pair = Authority("another CA").issue(SPIFFE_A) if client == "another CA" else None
    async with mtls.channel(pair) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await first_response(channel, "envoy-1.team-a")
    # The handshake fails (TLS 1.3 reports it to the client after its own side completed).
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    assert not mtls.server.streams


async def test_a_node_its_certificate_does_not_name_is_refused_with_permission_denied(
    mtls: Served, caplog
):
    with caplog.at_level(logging.WARNING, logger="xds.tls"):
        async with mtls.channel(mtls.authority.issue(SPIFFE_A)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await first_response(channel, "envoy-1.team-b")
            # Delta: the node is in field 1 of its request, not 2.
            delta = channel.stream_stream(
                DELTA_ADS_METHOD,
                request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
            )()
            await delta.write(
                discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER, node={"id": "node-1"})
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused_delta:
                await asyncio.wait_for(delta.read(), 10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "claims namespace 'team-b'" in (refused.value.details() or "")
    assert SPIFFE_A in (refused.value.details() or "")
    assert refused_delta.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "names no namespace" in (refused_delta.value.details() or "")
    assert mtls.server.identity is not None and mtls.server.identity.refused == 2
    logged = [r.message for r in caplog.records if "PERMISSION_DENIED" in r.message]
    assert len(logged) == 2 and "127.0.0.1" in logged[0]


def server_certificate(port: int, authority: Authority, client: Pair, tmp: Path) -> bytes:
    """The DER certificate the server presents to a new connection (a plain TLS handshake)."""
    context = ssl.create_default_context(cadata=authority.pem.decode())
    (tmp / "client.crt").write_bytes(client.cert)
    (tmp / "client.key").write_bytes(client.key)
    context.load_cert_chain(tmp / "client.crt", tmp / "client.key")
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


async def test_a_renewed_server_certificate_reaches_new_connections_and_open_streams_go_on(
    mtls: Served, tmp_path: Path
):
    client = mtls.authority.issue(SPIFFE_A)
    before = await asyncio.to_thread(
        server_certificate, mtls.port, mtls.authority, client, tmp_path
    )
    assert before == der(mtls.tls.cert.read_bytes())

    async with mtls.channel(client) as channel:
        call = ads_call(channel)
        await call.write(
            discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node={"id": "envoy-1.team-a"})
        )
        first = await asyncio.wait_for(call.read(), 10)
        await call.write(
            discovery_pb2.DiscoveryRequest(
                type_url=CLUSTER, version_info=first.version_info, response_nonce=first.nonce
            )
        )

        renewed = mtls.authority.issue("localhost", "127.0.0.1", name="xds renewed")
        replace(mtls.tls.cert, renewed.cert)
        replace(mtls.tls.key, renewed.key)
        after = await asyncio.to_thread(
            server_certificate, mtls.port, mtls.authority, client, tmp_path
        )
        assert after == der(renewed.cert) != before

        # A gRPC client on a new connection is served under the renewed certificate...
        async with mtls.channel(client) as fresh:
            assert (await first_response(fresh, "envoy-2.team-a")).resources

        # ...while the stream opened before keeps its connection and its updates.
        mtls.cache.publish(resources(b"\x0a\x01b"))
        second = await asyncio.wait_for(call.read(), 10)
        assert [r.value for r in second.resources] == [b"\x0a\x01b"]
        assert second.version_info != first.version_info


async def test_the_control_plane_serves_tls_from_its_settings_and_says_so(tmp_path: Path, caplog):
    authority = Authority()
    tls = authority.issue("localhost", "127.0.0.1").write(tmp_path / "tls")
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    write_manifests(
        manifests / "mesh.yaml",
        service("web", 8080),
        endpoint_slice("web", ["127.0.0.1"], 9000),
    )
    settings = Settings(
        manifests=(manifests,),
        xds_port=0,
        allowed_endpoint_ranges=LOOPBACK,
        tls_cert=tls.cert,
        tls_key=tls.key,
    )
    plane = ControlPlane(settings)
    with caplog.at_level(logging.INFO, logger="xds.tls"):
        ports = await plane.start()
    try:
        assert any("served over TLS on 127.0.0.1" in r.message for r in caplog.records)
        credentials = grpc.ssl_channel_credentials(root_certificates=authority.pem)
        async with grpc.aio.secure_channel(f"127.0.0.1:{ports.xds}", credentials) as channel:
            response = await first_response(channel, "node-1")  # no client CA: no identity check
        assert response.resources
        # Plaintext clients are not served on a TLS port.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports.xds}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await first_response(channel, "node-1")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # Reloads are counted in /metrics: a renewed certificate is read at the next handshake.
        exposition = plane.metrics.exposition().decode()
        assert "xds_tls_certificate_reloads_total 0.0" in exposition
        assert "xds_identity_refusals_total 0.0" in exposition
        authority.issue("localhost", "127.0.0.1", name="renewed").write(tmp_path / "tls")
        async with grpc.aio.secure_channel(f"127.0.0.1:{ports.xds}", credentials) as channel:
            assert (await first_response(channel, "node-1")).resources
        assert "xds_tls_certificate_reloads_total 1.0" in plane.metrics.exposition().decode()
    finally:
        await plane.stop(grace_s=0)


async def test_missing_tls_files_stop_the_start_with_their_name(tmp_path: Path):
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    settings = Settings(
        manifests=(manifests,), xds_port=0, tls_cert=tmp_path / "no.crt", tls_key=tmp_path / "k"
    )
    with pytest.raises(FileNotFoundError, match="no.crt"):
        ControlPlane(settings)


async def test_under_mtls_a_client_sees_the_scope_its_certificate_proves(tmp_path: Path):
    """Namespace scoping trusts the namespace only once the certificate has proved it: a team-a
    certificate gets team-a's view, shared byte for byte with every team-a client, and cannot
    claim a mesh-wide namespace; a node proxy's certificate gets everything."""
    authority = Authority()
    server_tls = authority.issue("localhost", "127.0.0.1", name="xds").write(tmp_path)
    replace(tmp_path / "ca.crt", authority.pem)
    tls = ServerTLS(server_tls.cert, server_tls.key, tmp_path / "ca.crt")
    settings = Settings(scope="namespace", mesh_wide_namespaces=("xds-system",))
    cache = Cache()
    cache.publish(translate(the_mesh(), SCOPED).resources)
    server = DiscoveryServer(
        cache,
        identity=IdentityGate(),
        scoping=Scoping(
            scope_rule(settings.mesh_wide_namespaces),
            functools.partial(for_scope, settings=SCOPED),
        ),
    )
    grpc_server, port = await start_server(
        server, "127.0.0.1", 0, credentials=CertificateReloader(tls).credentials()
    )
    served = Served(cache, server, port, authority, tls)
    try:
        built = SHARED.built
        bodies = []
        for node_id in ("envoy-1.team-a", "envoy-2.team-a"):
            async with served.channel(authority.issue(SPIFFE_A)) as channel:
                response = await first_response(channel, node_id)
            assert sorted(decode_name(r.value) for r in response.resources) == [
                "team-a/db:tcp-db",
                "team-a/web:http",
                "team-c/api:http",
                "team-c/shared:http",
            ]
            response.nonce = ""
            bodies.append(response.SerializeToString())
        assert bodies[0] == bodies[1] and SHARED.built == built + 1  # one encoding for both
        # A team-a certificate claiming the mesh-wide namespace is refused, not widened.
        async with served.channel(authority.issue(SPIFFE_A)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await first_response(channel, "envoy-1.xds-system")
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        node_proxy = authority.issue("spiffe://cluster.local/ns/xds-system/sa/node-proxy")
        async with served.channel(node_proxy) as channel:
            response = await first_response(channel, "node-1.xds-system")
        assert len(response.resources) == len(cache.snapshot.of_type(CLUSTER)) == 6
    finally:
        await grpc_server.stop(None)


def decode_name(body: bytes) -> str:
    return cluster_pb2.Cluster.FromString(body).name
