"""The protocol test servers of tests/protocols.py against their own clients, on loopback, no Envoy:
SNI picks the certificate, verification holds, RESP answers PING, the greeting comes unasked."""

from __future__ import annotations

import asyncio
import ssl
import struct

import aiohttp
import pytest
import trustme

from tests.protocols import (
    MYSQL_VERSION,
    PING,
    GreetingBackend,
    ProtocolError,
    RespBackend,
    TlsBackend,
    read_greeting,
    resp_ping,
    tls_handshake,
)


def hostnames(service: str, namespace: str = "protocols") -> list[str]:
    """The names a TLS-passthrough proxy matches a Service's SNI on."""
    host = f"{service}.{namespace}"
    return [host, f"{host}.svc", f"{host}.svc.cluster.local"]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_sni_picks_the_certificate(ca: trustme.CA) -> None:
    async with TlsBackend(
        "tls-a", ca, hostnames("tls-a"), "127.0.40.1", sni_certificates=[hostnames("tls-b")]
    ) as backend:
        for name in ("tls-a.protocols", "tls-a.protocols.svc.cluster.local"):
            peer = await tls_handshake(backend.host, backend.port, name, ca)
            assert peer.dns_names == tuple(hostnames("tls-a"))
            assert (peer.backend, peer.body) == ("tls-a", "tls-a")
        peer = await tls_handshake(backend.host, backend.port, "tls-b.protocols.svc", ca)
        assert peer.dns_names == tuple(hostnames("tls-b"))
        assert peer.backend == "tls-a"  # one server, two certificates
        assert peer.version.startswith("TLSv1.")
        assert backend.server_names == [
            "tls-a.protocols",
            "tls-a.protocols.svc.cluster.local",
            "tls-b.protocols.svc",
        ]
        assert backend.requests == 3


async def test_two_backends_on_one_port_have_their_own_certificates(ca: trustme.CA) -> None:
    # Like two pods of different Services: same port, different loopback addresses.
    one = TlsBackend("one", ca, ["one.protocols"], "127.0.40.2")
    two = TlsBackend("two", ca, ["two.protocols"], "127.0.40.3", one.port)
    async with one, two:
        assert (await tls_handshake(one.host, one.port, "one.protocols", ca)).backend == "one"
        peer = await tls_handshake(two.host, two.port, "two.protocols", ca)
        assert (peer.backend, peer.dns_names) == ("two", ("two.protocols",))


async def test_without_sni_the_default_certificate_comes_back(ca: trustme.CA) -> None:
    async with TlsBackend(
        "tls-a", ca, hostnames("tls-a"), sni_certificates=[hostnames("tls-b")]
    ) as backend:
        peer = await tls_handshake(backend.host, backend.port, None, ca)
        assert peer.dns_names == tuple(hostnames("tls-a"))
        assert backend.server_names == [None]


async def test_verification_fails_for_a_wrong_server_name(ca: trustme.CA) -> None:
    async with TlsBackend(
        "tls-a", ca, hostnames("tls-a"), sni_certificates=[hostnames("tls-b")]
    ) as backend:
        # No certificate has this name: the default one comes back and does not match.
        with pytest.raises(ssl.SSLCertVerificationError, match="[Hh]ostname mismatch"):
            await tls_handshake(backend.host, backend.port, "tls-c.protocols", ca)
        assert backend.requests == 0
        # The server is unharmed by a client that gave up.
        assert (await tls_handshake(backend.host, backend.port, "tls-a.protocols", ca)).body


async def test_verification_fails_against_another_ca(ca: trustme.CA) -> None:
    async with TlsBackend("tls-a", ca, hostnames("tls-a")) as backend:
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            await tls_handshake(backend.host, backend.port, "tls-a.protocols", trustme.CA())


async def test_an_http_client_that_skips_verification_gets_the_name(ca: trustme.CA) -> None:
    # What `curl -k https://...` does.
    async with (
        TlsBackend("tls-a", ca, hostnames("tls-a")) as backend,
        aiohttp.ClientSession() as session,
        session.get(
            f"https://{backend.address}/anything",
            ssl=False,
            timeout=aiohttp.ClientTimeout(total=5),
        ) as response,
    ):
        assert response.status == 200
        assert response.headers["x-backend"] == "tls-a"
        assert await response.text() == "tls-a"


async def test_resp_ping_returns_the_name() -> None:
    async with RespBackend("cache-0", "127.0.40.4") as backend:
        assert await resp_ping(backend.host, backend.port) == "cache-0"
        assert backend.commands == [[b"PING"]]


async def test_resp_pipelined_inline_and_unknown_commands() -> None:
    async with RespBackend("cache-0") as backend:
        reader, writer = await asyncio.open_connection(backend.host, backend.port)
        try:
            writer.write(PING + b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n" + b"PING\r\n")
            await writer.drain()
            async with asyncio.timeout(5):
                answers = [await reader.readline() for _ in range(3)]
        finally:
            writer.close()
        assert answers == [b"+PONG cache-0\r\n", b"-ERR unknown\r\n", b"+PONG cache-0\r\n"]
        assert backend.commands == [[b"PING"], [b"GET", b"k"], [b"PING"]]
        assert backend.dropped == []


async def test_the_greeting_arrives_without_the_client_sending_anything() -> None:
    async with GreetingBackend("mysql-0", "127.0.40.5") as backend:
        assert await read_greeting(backend.host, backend.port) == "mysql-0"
        assert backend.received == 0
        assert backend.connections == 1


async def test_the_greeting_has_the_mysql_v10_layout() -> None:
    async with GreetingBackend("mysql-0") as backend:
        reader, writer = await asyncio.open_connection(backend.host, backend.port)
        try:
            async with asyncio.timeout(5):
                header = await reader.readexactly(4)
                payload = await reader.readexactly(int.from_bytes(header[:3], "little"))
            length, sequence = int.from_bytes(header[:3], "little"), header[3]
            assert (length, sequence, payload[0]) == (len(payload), 0, 10)
            version, rest = payload[1:].split(b"\0", 1)
            assert version == f"{MYSQL_VERSION}-mysql-0".encode()
            (connection_id,) = struct.unpack_from("<I", rest)
            assert connection_id == 1
            assert rest.endswith(b"caching_sha2_password\0")
            # A login attempt (any packet, sequence 1) is refused with an ERR packet, sequence 2.
            writer.write(b"\x05\x00\x00\x01hello")
            await writer.drain()
            async with asyncio.timeout(5):
                header = await reader.readexactly(4)
                error = await reader.readexactly(int.from_bytes(header[:3], "little"))
            assert header[3] == 2
            assert error[0] == 0xFF and struct.unpack_from("<H", error, 1) == (1045,)
            assert error[3:9] == b"#28000"
        finally:
            writer.close()
        assert backend.received == 9


async def test_reads_have_deadlines() -> None:
    # A client-first server says nothing to a client that waits for a greeting.
    async with RespBackend("cache-0") as backend:
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await read_greeting(backend.host, backend.port, timeout=0.3)
        assert asyncio.get_running_loop().time() - started < 3


async def test_a_client_reaching_the_wrong_kind_of_server_fails_clearly() -> None:
    # What a misrouted connection looks like to the RESP client: a MySQL greeting, not a PONG.
    async with GreetingBackend("mysql-0") as backend:
        with pytest.raises(ProtocolError, match="expected \\+PONG"):
            await resp_ping(backend.host, backend.port)


async def test_a_dropped_connection_is_not_an_answer() -> None:
    # A proxy that accepts and closes (no route yet): the clients report a closed connection (an
    # end of stream, or a reset when the close crossed our request), which callers polling for
    # readiness treat as "not yet", unlike a wrong answer.
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            await resp_ping("127.0.0.1", port)
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            await read_greeting("127.0.0.1", port)
    finally:
        server.close()
        await server.wait_closed()


async def test_stop_ends_open_connections() -> None:
    backend = await RespBackend("cache-0").start()
    reader, writer = await asyncio.open_connection(backend.host, backend.port)
    try:
        async with asyncio.timeout(5):
            await backend.stop()
            assert await reader.read() == b""  # the server closed our connection
    finally:
        writer.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.1", "::1", "localhost"])
async def test_only_loopback_addresses(host: str, ca: trustme.CA) -> None:
    with pytest.raises(ValueError):
        TlsBackend("tls-a", ca, ["tls-a.protocols"], host)
    with pytest.raises(ValueError):
        await resp_ping(host, 6379)
