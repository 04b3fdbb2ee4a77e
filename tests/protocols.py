"""Non-HTTP test servers and their clients, on loopback: what protocol-aware proxy tests talk to.

This module owns three small servers and the client for each, for tests that need to prove which
backend a connection reached and what the client saw on the way:

- `TlsBackend` / `tls_handshake`: TLS with certificates from a `trustme` test CA, chosen by SNI.
  After the handshake the backend answers ONE minimal HTTP/1.1 request with its name (body and
  `x-backend` header) and closes, so `curl -k`-style clients and `tls_handshake` both work. The
  client returns the certificate's DNS names: through a TLS-passthrough proxy they are the
  backend's, not the proxy's.
- `RespBackend` / `resp_ping`: a client-first binary protocol, a sliver of Redis's RESP
  (`PING` -> `+PONG <name>`, anything else -> `-ERR unknown`).
- `GreetingBackend` / `read_greeting`: a server-first protocol shaped like MySQL's: the server
  sends a protocol-v10 handshake packet naming itself as soon as a client connects, and the client
  sends nothing. A proxy that waits for the client's first bytes (protocol detection) never
  delivers it.

Every server is an async context manager and also has `start()`/`stop()`, like
`xds.local.Backend`; a port not given comes from `xds.local.free_port()`. Every read, on either
side, has a deadline, and every address must be in 127.0.0.0/8: nothing here reaches off the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
import ssl
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import trustme

from xds.local import free_port

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
DEFAULT_TIMEOUT = 5.0
# How long a server waits for a client's next bytes before closing the connection: a stuck test
# then fails on its own deadline instead of holding a server task open.
IDLE_TIMEOUT = 10.0
MAX_LINE = 64 * 1024


class ProtocolError(Exception):
    """The peer said something the protocol does not allow (or this subset does not know)."""


def loopback(host: str) -> str:
    """`host` if it is an IPv4 address in 127.0.0.0/8, else ValueError (names are refused too:
    a name could resolve anywhere)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address in {LOOPBACK}") from None
    if address not in LOOPBACK:
        raise ValueError(f"{host} is not in {LOOPBACK}")
    return host


class _Server:
    """An asyncio TCP server on a loopback address, serving each connection with `_serve`.

    Connections are tracked so that `stop()` ends them: on Python 3.11 `Server.wait_closed()` does
    not wait for open connections, on 3.12+ it waits for them without ending them."""

    def __init__(
        self, name: str, host: str = "127.0.0.1", port: int | None = None, *, idle: float
    ) -> None:
        self.name = name
        self.host = loopback(host)
        self.port = port or free_port(self.host)
        self.idle = idle
        self.connections = 0  # accepted so far
        # Why connections ended early (a stalled or misbehaving client): what a test through a
        # proxy looks at when the proxy sent something this server did not expect.
        self.dropped: list[str] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def _ssl(self) -> ssl.SSLContext | None:
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            await self._serve(reader, writer)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ProtocolError) as exc:
            # The client went away, stalled or spoke nonsense: drop the connection.
            self.dropped.append(f"{type(exc).__name__}: {exc}")
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
            # Only now: stop() waits for the tasks in this set, the closing included.
            self._tasks.discard(task)
            self._writers.discard(writer)

    async def start(self) -> Self:
        context = self._ssl()
        self._server = await asyncio.start_server(
            self._handle,
            self.host,
            self.port,
            ssl=context,
            ssl_handshake_timeout=self.idle if context is not None else None,
        )
        return self

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Closing a connection wakes its handler's pending read (end of stream), so handlers end
        # on their own. Cancelling them instead makes Python 3.11's StreamReaderProtocol log an
        # "Exception in callback" for each; it is only the fallback for a handler that hangs.
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=DEFAULT_TIMEOUT)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        async with asyncio.timeout(DEFAULT_TIMEOUT):
            await server.wait_closed()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


# --- TLS ---------------------------------------------------------------------------------------


def certificate_dns_names(cert: dict[str, object]) -> tuple[str, ...]:
    """The DNS entries of a certificate's subjectAltName, as `SSLSocket.getpeercert()` gives it."""
    alt_names = cert.get("subjectAltName", ())
    assert isinstance(alt_names, tuple)
    return tuple(value for kind, value in alt_names if kind == "DNS")


class TlsBackend(_Server):
    """A TLS server with certificates issued by `ca`.

    `dns_names` are the names of the default certificate; each entry of `sni_certificates` is the
    names of one more certificate, presented when the client's SNI is one of those names (as a
    server with several virtual hosts does). So a test can see whether SNI reached the backend:
    without it, the default certificate comes back.

    After the handshake the backend reads one HTTP/1.1 request head (its body, if any, is not
    read), answers `200` with its name as the body and in an `x-backend` header, and closes.
    `server_names` records each handshake's SNI (None: the client sent none); `requests` counts
    the requests answered.
    """

    def __init__(
        self,
        name: str,
        ca: trustme.CA,
        dns_names: Sequence[str],
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        sni_certificates: Sequence[Sequence[str]] = (),
        idle: float = IDLE_TIMEOUT,
    ) -> None:
        super().__init__(name, host, port, idle=idle)
        if not dns_names:
            raise ValueError("a certificate needs at least one DNS name")
        self.dns_names = tuple(dns_names)
        self.ca = ca
        self.server_names: list[str | None] = []
        self.requests = 0
        self._default = self._context(self.dns_names)
        self._by_name: dict[str, ssl.SSLContext] = {}
        for names in sni_certificates:
            context = self._context(tuple(names))
            for dns_name in names:
                self._by_name[dns_name.lower()] = context

    def _context(self, names: tuple[str, ...]) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(*names, common_name=names[0]).configure_cert(context)
        return context

    def _ssl(self) -> ssl.SSLContext:
        self._default.sni_callback = self._pick_certificate
        return self._default

    def _pick_certificate(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        self.server_names.append(server_name)
        chosen = self._by_name.get((server_name or "").lower())
        if chosen is not None:
            connection.context = chosen

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.idle):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError as exc:
            raise ProtocolError("request head too long") from exc
        if not head.split(b" ", 1)[0].isalpha():
            raise ProtocolError(f"not an HTTP request: {head[:40]!r}")
        self.requests += 1
        body = self.name.encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\n"
            b"content-type: text/plain\r\n"
            b"x-backend: " + body + b"\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        async with asyncio.timeout(self.idle):
            await writer.drain()


@dataclass(frozen=True, slots=True)
class TlsPeer:
    """What a TLS client saw: the peer certificate's DNS names and the backend's answer."""

    dns_names: tuple[str, ...]  # subjectAltName DNS entries of the presented certificate
    backend: str  # the `x-backend` header of the answer (the backend's name)
    body: str
    version: str  # the negotiated TLS version, e.g. "TLSv1.3"


async def tls_handshake(
    host: str,
    port: int,
    server_name: str | None,
    ca: trustme.CA,
    timeout: float = DEFAULT_TIMEOUT,
) -> TlsPeer:
    """Connect with TLS, verify the chain against `ca`, send `GET /` and read the answer.

    `server_name` is sent as SNI and the certificate must match it; None sends no SNI and checks
    only the chain (there is no name to check). A failed verification raises
    `ssl.SSLCertVerificationError`; a refused or dropped connection, OSError or
    `asyncio.IncompleteReadError`; no answer within `timeout` (for the whole exchange),
    TimeoutError.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(context)
    if server_name is None:
        context.check_hostname = False  # chain still verified: verify_mode stays CERT_REQUIRED
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            loopback(host),
            port,
            ssl=context,
            # "" sends no SNI (asyncio would otherwise send `host`).
            server_hostname=server_name or "",
            ssl_handshake_timeout=timeout,
        )
        try:
            peer = writer.get_extra_info("peercert")
            version = writer.get_extra_info("ssl_object").version()
            host_header = server_name or host
            writer.write(
                f"GET / HTTP/1.1\r\nhost: {host_header}\r\nconnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status, headers = _response_head(head)
            if status != 200:
                raise ProtocolError(f"status {status} from {host}:{port}")
            length = int(headers.get("content-length", "0"))
            body = (await reader.readexactly(length)).decode()
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
    return TlsPeer(certificate_dns_names(peer), headers.get("x-backend", ""), body, version or "")


def _response_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ProtocolError(f"not an HTTP response: {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    return int(parts[1]), headers


# --- RESP (client first) -----------------------------------------------------------------------

PING = b"*1\r\n$4\r\nPING\r\n"


class RespBackend(_Server):
    """A sliver of Redis's RESP: `PING` (as a RESP array, or inline as `PING\\r\\n`) answers
    `+PONG <name>\\r\\n`, any other command `-ERR unknown\\r\\n`. Commands may be pipelined on one
    connection; a connection idle for `idle` seconds is closed. `commands` records what came."""

    def __init__(
        self,
        name: str,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        idle: float = IDLE_TIMEOUT,
    ) -> None:
        super().__init__(name, host, port, idle=idle)
        self.commands: list[list[bytes]] = []

    async def _line(self, reader: asyncio.StreamReader) -> bytes | None:
        """One CRLF-terminated line without its CRLF; None at a clean end of stream."""
        try:
            async with asyncio.timeout(self.idle):
                line = await reader.readline()
        except ValueError as exc:  # what readline() makes of a line over the reader's limit
            raise ProtocolError("line too long") from exc
        if not line:
            return None
        if not line.endswith(b"\r\n"):
            raise ProtocolError(f"unterminated line {line[:40]!r}")
        return line[:-2]

    async def _command(self, reader: asyncio.StreamReader) -> list[bytes] | None:
        line = await self._line(reader)
        if line is None:
            return None
        if not line.startswith(b"*"):
            return line.split()  # an inline command, as typed into telnet
        count = _length(line, b"*")
        command = []
        for _ in range(count):
            header = await self._line(reader)
            if header is None:
                raise ProtocolError("stream ended inside a command")
            size = _length(header, b"$")
            async with asyncio.timeout(self.idle):
                data = await reader.readexactly(size + 2)
            if data[-2:] != b"\r\n":
                raise ProtocolError("bulk string not followed by CRLF")
            command.append(data[:-2])
        return command

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (command := await self._command(reader)) is not None:
            self.commands.append(command)
            if [part.upper() for part in command] == [b"PING"]:
                writer.write(b"+PONG " + self.name.encode() + b"\r\n")
            else:
                writer.write(b"-ERR unknown\r\n")
            async with asyncio.timeout(self.idle):
                await writer.drain()


def _length(line: bytes, marker: bytes) -> int:
    """The count in a RESP `*<n>` or `$<n>` header, bounded so a bad client cannot make us wait
    for (or allocate) gigabytes."""
    digits = line[1:]
    if not line.startswith(marker) or not digits.isdigit() or int(digits) > MAX_LINE:
        raise ProtocolError(f"expected {marker.decode()}<length>, got {line[:40]!r}")
    return int(digits)


async def resp_ping(host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Send one RESP `PING`; the name in the `+PONG <name>` answer.

    Raises asyncio.IncompleteReadError when the connection closes before a whole line came (as
    with a proxy that accepts and drops it; a reset shows as ConnectionResetError), ProtocolError
    on any other answer, TimeoutError when none comes within `timeout` (for the whole exchange),
    OSError when the connection fails."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(loopback(host), port)
        try:
            writer.write(PING)
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    if not line.endswith(b"\n"):
        raise asyncio.IncompleteReadError(line, None)
    if not line.startswith(b"+PONG ") or not line.endswith(b"\r\n"):
        raise ProtocolError(f"expected +PONG <name>, got {line[:80]!r}")
    return line[len(b"+PONG ") : -2].decode()


# --- MySQL-shaped greeting (server first) ------------------------------------------------------

MYSQL_VERSION = "8.4.4"  # the server version string is f"{MYSQL_VERSION}-{name}"
AUTH_PLUGIN = b"caching_sha2_password"
# Capability flags a MySQL 8 server announces (a subset; values from the protocol docs).
CLIENT_LONG_PASSWORD = 0x1
CLIENT_FOUND_ROWS = 0x2
CLIENT_LONG_FLAG = 0x4
CLIENT_CONNECT_WITH_DB = 0x8
CLIENT_PROTOCOL_41 = 0x200
CLIENT_TRANSACTIONS = 0x2000
CLIENT_SECURE_CONNECTION = 0x8000
CLIENT_PLUGIN_AUTH = 0x80000
CAPABILITIES = (
    CLIENT_LONG_PASSWORD
    | CLIENT_FOUND_ROWS
    | CLIENT_LONG_FLAG
    | CLIENT_CONNECT_WITH_DB
    | CLIENT_PROTOCOL_41
    | CLIENT_TRANSACTIONS
    | CLIENT_SECURE_CONNECTION
    | CLIENT_PLUGIN_AUTH
)
UTF8MB4_0900_AI_CI = 255
SERVER_STATUS_AUTOCOMMIT = 0x2


def greeting_packet(name: str, connection_id: int) -> bytes:
    """A MySQL protocol-v10 initial handshake packet whose server version names `name`.

    Layout (all integers little-endian): 3-byte payload length, sequence id 0; then protocol
    version 10, server version NUL-terminated, connection id (4), auth data part 1 (8), filler 0,
    capability flags low (2), character set (1), status flags (2), capability flags high (2),
    auth data length (1), 10 reserved zeros, auth data part 2 (12 + NUL), auth plugin name
    NUL-terminated. Shape only: the auth data is random and nothing checks it.
    """
    version = f"{MYSQL_VERSION}-{name}".encode()
    if b"\0" in version:
        raise ValueError("the name must not contain NUL")
    scramble = secrets.token_bytes(20)
    payload = b"".join(
        (
            bytes([10]),
            version + b"\0",
            struct.pack("<I", connection_id),
            scramble[:8],
            b"\0",
            struct.pack("<H", CAPABILITIES & 0xFFFF),
            bytes([UTF8MB4_0900_AI_CI]),
            struct.pack("<H", SERVER_STATUS_AUTOCOMMIT),
            struct.pack("<H", CAPABILITIES >> 16),
            bytes([len(scramble) + 1]),
            bytes(10),
            scramble[8:] + b"\0",
            AUTH_PLUGIN + b"\0",
        )
    )
    return _packet(payload, sequence=0)


def _packet(payload: bytes, sequence: int) -> bytes:
    return struct.pack("<I", len(payload))[:3] + bytes([sequence]) + payload


def _error_packet(code: int, state: str, message: str, sequence: int) -> bytes:
    payload = b"\xff" + struct.pack("<H", code) + b"#" + state.encode() + message.encode()
    return _packet(payload, sequence)


class GreetingBackend(_Server):
    """A server-first protocol shaped like MySQL's: on accepting a connection it sends
    `greeting_packet(name, n)` at once, before reading anything. If the client then sends a
    packet (a real MySQL client's login), it answers an ERR packet (1045, access denied: there is
    no authentication here) and closes; a silent client is closed after `idle` seconds.
    `received` counts the bytes clients sent."""

    def __init__(
        self,
        name: str,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        idle: float = IDLE_TIMEOUT,
    ) -> None:
        super().__init__(name, host, port, idle=idle)
        self.received = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting_packet(self.name, self.connections))
        async with asyncio.timeout(self.idle):
            await writer.drain()
        try:
            async with asyncio.timeout(self.idle):
                header = await reader.readexactly(4)
                self.received += 4
                payload = await reader.readexactly(int.from_bytes(header[:3], "little"))
                self.received += len(payload)
        except asyncio.IncompleteReadError as exc:
            self.received += len(exc.partial)
            return  # the client closed without logging in: what read_greeting does
        message = f"Access denied: {self.name} is a test server with no authentication"
        writer.write(_error_packet(1045, "28000", message, sequence=header[3] + 1))
        async with asyncio.timeout(self.idle):
            await writer.drain()


async def read_greeting(host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Connect, send nothing, and return the name from the server's greeting (the server version
    after `MYSQL_VERSION-`).

    Raises TimeoutError when the greeting is not all there within `timeout`,
    asyncio.IncompleteReadError when the connection closes first, ProtocolError when the packet is
    not a v10 greeting, OSError when the connection fails."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(loopback(host), port)
        try:
            header = await reader.readexactly(4)
            payload = await reader.readexactly(int.from_bytes(header[:3], "little"))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    if header[3] != 0 or not payload or payload[0] != 10:
        raise ProtocolError(f"not a protocol-v10 greeting: {(header + payload)[:40]!r}")
    version, nul, _ = payload[1:].partition(b"\0")
    prefix = f"{MYSQL_VERSION}-".encode()
    if not nul or not version.startswith(prefix):
        raise ProtocolError(f"unexpected server version {version[:80]!r}")
    return version[len(prefix) :].decode()


__all__ = [
    "GreetingBackend",
    "ProtocolError",
    "RespBackend",
    "TlsBackend",
    "TlsPeer",
    "certificate_dns_names",
    "greeting_packet",
    "loopback",
    "read_greeting",
    "resp_ping",
    "tls_handshake",
]
