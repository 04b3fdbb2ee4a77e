"""Each port keeps its protocol, with a real Envoy: TLS passed through by SNI to real TLS backends,
a binary protocol and HTTP on one undeclared port, declared TCP and server-first protocols, and
Services sharing a port told apart by the destination address. All on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from tests.integration.conftest import LOOPBACK, endpoint_slice, service, write_manifests
from tests.protocols import (
    GreetingBackend,
    RespBackend,
    TlsBackend,
    read_greeting,
    resp_ping,
    tls_handshake,
)
from xds.app import ControlPlane
from xds.config import Settings
from xds.local import Envoy, backends, free_port, request_backend, wait_for

# Long enough that a connection which had to wait for detection could not pass for one that did not.
DETECTION_TIMEOUT_S = 30.0


@dataclass
class Plane:
    """A control plane on a manifests directory and an Envoy, listening on the service ports
    themselves (offset 0), so that every Service can have a port of its own."""

    plane: ControlPlane
    manifests: Path
    envoy: Envoy
    session: aiohttp.ClientSession

    def apply(self, *objects: dict[str, Any]) -> None:
        write_manifests(self.manifests / "mesh.yaml", *objects)


@pytest.fixture
def listener_address() -> str:
    return "127.0.0.1"


@pytest.fixture
async def plane(tmp_path: Path, listener_address: str) -> AsyncIterator[Plane]:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    settings = Settings(
        manifests=(manifests,),
        xds_port=0,
        admin_port=0,
        listener_address=listener_address,
        protocol_detection_timeout_s=DETECTION_TIMEOUT_S,
        allowed_endpoint_ranges=LOOPBACK,
    )
    control_plane = ControlPlane(settings)
    ports = await control_plane.start()
    envoy = Envoy(f"127.0.0.1:{ports.xds}", workdir=tmp_path)
    session = aiohttp.ClientSession()
    try:
        await envoy.start()
        yield Plane(control_plane, manifests, envoy, session)
    finally:
        await session.close()
        await envoy.stop()
        await control_plane.stop()


def tcp_service(
    name: str,
    port: int,
    port_name: str = "",
    app_protocol: str | None = None,
    cluster_ip: str | None = None,
    namespace: str = "default",
) -> dict[str, Any]:
    """A Service of one port whose protocol is declared (or not) as given; endpoint port name ""."""
    entry: dict[str, Any] = {"port": port}
    if port_name:
        entry["name"] = port_name
    if app_protocol:
        entry["appProtocol"] = app_protocol
    obj = service(name, port, namespace=namespace, cluster_ip=cluster_ip)
    obj["spec"]["ports"] = [entry]
    return obj


def slice_for(name: str, address: str, port: int, port_name: str = "", **kw: Any) -> dict[str, Any]:
    return endpoint_slice(name, [address], port, port_name=port_name, **kw)


async def eventually(probe: Any, expected: object, what: str, timeout: float = 20.0) -> None:
    """Waits until `await probe()` returns `expected` (connection errors count as not yet)."""

    async def settled() -> bool:
        try:
            return await probe() == expected
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            return False

    await wait_for(settled, timeout, interval=0.1, what=what)


async def test_tls_is_passed_through_by_sni_to_the_backend_that_owns_the_name(plane: Plane):
    port = free_port()
    ca = trustme.CA()
    alpha_names = ["alpha.default.svc.cluster.local", "alpha.default.svc", "alpha.default"]
    beta_names = ["beta.shop.svc.cluster.local", "beta.shop.svc", "beta.shop"]
    async with (
        TlsBackend("alpha-1", ca, alpha_names, "127.0.0.2") as alpha,
        TlsBackend("beta-1", ca, beta_names, "127.0.0.3") as beta,
    ):
        plane.apply(
            # Two TLS Services on one port: appProtocol https, and a `tls-` port name.
            tcp_service("alpha", port, "secure", app_protocol="https", cluster_ip="10.96.1.1"),
            slice_for("alpha", alpha.host, alpha.port, "secure"),
            tcp_service("beta", port, "tls-api", namespace="shop", cluster_ip="10.96.1.2"),
            slice_for("beta", beta.host, beta.port, "tls-api", namespace="shop"),
        )
        for server_name, backend_name, names in (
            ("alpha.default.svc.cluster.local", "alpha-1", alpha_names),
            ("beta.shop.svc.cluster.local", "beta-1", beta_names),
            ("beta.shop", "beta-1", beta_names),
        ):

            async def handshake(server_name: str = server_name) -> tuple[str, list[str]]:
                peer = await tls_handshake("127.0.0.1", port, server_name, ca)
                return peer.backend, sorted(peer.dns_names)

            # The client verifies the chain and the name itself: Envoy terminates nothing, the
            # certificate it sees is the backend's.
            await eventually(handshake, (backend_name, sorted(names)), f"TLS to {server_name}")
        # Without SNI nothing names a Service: the port's default, the first by namespace/name.
        peer = await tls_handshake("127.0.0.1", port, None, ca)
        assert (peer.backend, sorted(peer.dns_names)) == ("alpha-1", sorted(alpha_names))
        assert alpha.server_names[-1] is None and None not in beta.server_names


async def test_an_undeclared_port_carries_http_and_a_binary_protocol(plane: Plane):
    port = free_port()
    async with backends(["web-1", "web-2"]) as web, RespBackend("cache-1", "127.0.0.4") as cache:
        plane.apply(
            # Neither port declares a protocol: Envoy tells HTTP from the rest per connection.
            tcp_service("cache", port, cluster_ip="10.96.2.1"),
            slice_for("cache", cache.host, cache.port),
            tcp_service("web", port, cluster_ip="10.96.2.2"),
            endpoint_slice("web", [b.host for b in web], web[0].port, port_name=""),
        )
        await eventually(lambda: resp_ping("127.0.0.1", port), "cache-1", "RESP through Envoy")
        url = f"http://127.0.0.1:{port}/"

        async def web_answers() -> set[str | None]:
            return {await request_backend(plane.session, url, "web.default") for _ in range(20)}

        await eventually(web_answers, {"web-1", "web-2"}, "HTTP through the same port")
        # Both at once, on the same listener.
        ping, answer = await asyncio.gather(
            resp_ping("127.0.0.1", port), request_backend(plane.session, url, "web")
        )
        assert ping == "cache-1" and answer in {"web-1", "web-2"}


async def test_declared_tcp_and_server_first_protocols_work_and_undeclared_server_first_waits(
    plane: Plane,
):
    redis_port, mysql_port, undeclared_port = free_port(), free_port(), free_port()
    async with (
        RespBackend("redis-1", "127.0.0.5") as redis,
        GreetingBackend("mysql-1", "127.0.0.6") as mysql,
        GreetingBackend("legacy-1", "127.0.0.7") as legacy,
    ):
        plane.apply(
            tcp_service("redis", redis_port, "tcp-redis", cluster_ip="10.96.3.1"),
            slice_for("redis", redis.host, redis.port, "tcp-redis"),
            tcp_service("mysql", mysql_port, "db", app_protocol="mysql", cluster_ip="10.96.3.2"),
            slice_for("mysql", mysql.host, mysql.port, "db"),
            tcp_service("legacy", undeclared_port, cluster_ip="10.96.3.3"),
            slice_for("legacy", legacy.host, legacy.port),
        )
        await eventually(lambda: resp_ping("127.0.0.1", redis_port), "redis-1", "declared tcp")
        # The server speaks first and the client waits: only a declared port lets it through
        # at once (well within 5 s, against a detection timeout of 30 s).
        await eventually(
            lambda: read_greeting("127.0.0.1", mysql_port, timeout=5), "mysql-1", "declared mysql"
        )
        # Undeclared, the same protocol meets detection, which waits for bytes that never come.
        listener = f"port:{undeclared_port}"

        async def listening() -> bool:
            dump = await plane.envoy.config_dump()
            return any(
                listener == entry.get("name") and "active_state" in entry
                for section in dump["configs"]
                for entry in section.get("dynamic_listeners", [])
            )

        await wait_for(listening, 20, what=f"Envoy's listener {listener}")
        with pytest.raises(TimeoutError):
            await read_greeting("127.0.0.1", undeclared_port, timeout=2)


@pytest.mark.parametrize("listener_address", ["0.0.0.0"])
async def test_tcp_services_sharing_a_port_are_told_apart_by_cluster_ip(plane: Plane):
    """Envoy binds every address here, so that connecting to a loopback ClusterIP reaches it with
    that address as the destination, as traffic redirected to a node proxy does."""
    port = free_port("0.0.0.0")
    async with (
        RespBackend("first-1", "127.0.0.8") as first,
        RespBackend("second-1", "127.0.0.9") as second,
    ):
        plane.apply(
            tcp_service("first", port, "tcp", cluster_ip="127.0.10.1"),
            slice_for("first", first.host, first.port, "tcp"),
            tcp_service("second", port, "tcp", cluster_ip="127.0.10.2"),
            slice_for("second", second.host, second.port, "tcp"),
        )
        await eventually(lambda: resp_ping("127.0.10.2", port), "second-1", "second by its IP")
        assert await resp_ping("127.0.10.1", port) == "first-1"
        # Any other destination: the first by namespace/name.
        assert await resp_ping("127.0.0.1", port) == "first-1"
