"""Proxyless gRPC and Envoy on one control plane: grpcio's real xDS client, in a process of its own
(`tests/grpc_client.py`), and a real Envoy, both reaching the same three gRPC backends of one
Service through the same cluster."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from tests.integration.conftest import LOOPBACK, endpoint_slice, service, write_manifests
from xds.app import ControlPlane
from xds.bootstrap import grpc_bootstrap
from xds.config import Settings
from xds.local import GRPC_METHOD, Envoy, GrpcBackend, free_port, free_port_offset, wait_for

# Envoy listens on service port + an offset taken among free ports below the ephemeral range.
SERVICE_PORT = 5051
TARGET = f"xds:///echo.demo:{SERVICE_PORT}"
NODE_ID = "grpc-echo-client"
CLIENT = Path(__file__).resolve().parents[1] / "grpc_client.py"
NAMES = ["b1", "b2", "b3", "b4"]


def manifests(backend_port: int, ready: list[str], draining: tuple[str, ...] = ()) -> list[dict]:
    """Service echo.demo (a `grpc` port, ClusterIP 10.96.0.10) and its EndpointSlice."""
    return [
        service("echo", SERVICE_PORT, "demo", cluster_ip="10.96.0.10", port_name="grpc"),
        endpoint_slice(
            "echo",
            [*ready, *draining],
            backend_port,
            "demo",
            name="echo-1",
            port_name="grpc",
            draining=draining,
        ),
    ]


class ClientProcess:
    """tests/grpc_client.py: one JSON command a line in, one JSON reply a line out."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, bootstrap: Path, **env: str) -> ClientProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(CLIENT),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "GRPC_XDS_BOOTSTRAP": str(bootstrap), **env},
        )
        client = cls(process)
        assert await client._reply(30.0) == {"ready": True}
        return client

    async def _reply(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        assert line, "the gRPC client process ended"
        return json.loads(line)

    async def ask(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()
        return await self._reply(float(command.get("timeout", 20.0)) + 10.0)

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()


@dataclass
class Proxyless:
    plane: ControlPlane
    manifests: Path
    backend_port: int
    backends: dict[str, GrpcBackend]
    envoy: Envoy
    envoy_port: int
    client: ClientProcess
    admin: str
    session: aiohttp.ClientSession

    def write(self, ready: list[str], draining: tuple[str, ...] = ()) -> float:
        """Writes the EndpointSlice; returns when (time.monotonic())."""
        write_manifests(
            self.manifests / "echo.yaml", *manifests(self.backend_port, ready, draining)
        )
        return time.monotonic()

    async def syncz(self) -> list[dict[str, Any]]:
        async with self.session.get(f"{self.admin}/debug/syncz") as response:
            return await response.json()


def address(name: str) -> str:
    return f"127.0.0.{NAMES.index(name) + 1}"


@pytest.fixture
async def proxyless(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Proxyless]:
    """The control plane, four gRPC backends (three in the EndpointSlice), an Envoy (ADS, or the
    mode the test's parameter names) and a proxyless client process."""
    directory = tmp_path / "manifests"
    directory.mkdir()
    backend_port = free_port()
    write_manifests(
        directory / "echo.yaml", *manifests(backend_port, [address(n) for n in NAMES[:3]])
    )
    offset = free_port_offset([SERVICE_PORT])
    envoy_port = SERVICE_PORT + offset
    plane = ControlPlane(
        Settings(
            manifests=(directory,),
            xds_port=0,
            admin_port=0,
            listener_address="127.0.0.1",
            listener_port_offset=offset,
            allowed_endpoint_ranges=LOOPBACK,
        )
    )
    backends = {name: GrpcBackend(name, address(name), backend_port) for name in NAMES}
    for backend in backends.values():
        await backend.start()
    ports = await plane.start()
    bootstrap = tmp_path / "grpc-bootstrap.json"
    bootstrap.write_text(
        json.dumps(grpc_bootstrap(NODE_ID, f"127.0.0.1:{ports.xds}", zone="zone-a"))
    )
    envoy = Envoy(f"127.0.0.1:{ports.xds}", workdir=tmp_path, mode=getattr(request, "param", "ads"))
    session = aiohttp.ClientSession()
    client: ClientProcess | None = None
    try:
        await envoy.start()
        # Fail-fast on unknown names (gRFC A88) is behind this variable in grpcio 1.85.
        client = await ClientProcess.start(
            bootstrap, GRPC_EXPERIMENTAL_XDS_DATA_ERROR_HANDLING="true"
        )
        yield Proxyless(
            plane,
            directory,
            backend_port,
            backends,
            envoy,
            envoy_port,
            client,
            f"http://127.0.0.1:{ports.admin}",
            session,
        )
    finally:
        if client is not None:
            await client.stop()
        await session.close()
        await envoy.stop()
        await plane.stop()
        for backend in backends.values():
            await backend.stop()


def repeats(names: list[str]) -> float:
    """The share of calls that went to the same backend as the call before."""
    return sum(a == b for a, b in zip(names, names[1:], strict=False)) / (len(names) - 1)


async def through_envoy(envoy_port: int, count: int) -> list[str]:
    """Unary calls through Envoy's listener for the Service port, by the Service's name."""
    options = [("grpc.default_authority", f"echo.demo:{SERVICE_PORT}")]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{envoy_port}", options=options) as channel:
        who = channel.unary_unary(GRPC_METHOD)
        return [(await who(b"", timeout=10)).decode() for _ in range(count)]


@pytest.mark.parametrize("proxyless", ["ads", "delta-ads"], indirect=True)
async def test_grpc_round_robins_and_envoy_randomizes_over_one_cluster(proxyless: Proxyless):
    reply = await proxyless.client.ask(op="call", target=TARGET, count=300, timeout=30)
    assert reply["error"] is None
    grpc_names = reply["backends"]
    assert Counter(grpc_names).keys() == {"b1", "b2", "b3"}
    # round_robin: a call never goes where the one before went (but while connecting).
    assert repeats(grpc_names) < 0.05, Counter(grpc_names)

    await wait_for(
        lambda: _envoy_has_endpoints(proxyless.envoy, 3), timeout=20, what="Envoy's endpoints"
    )
    envoy_names = await through_envoy(proxyless.envoy_port, 300)
    assert Counter(envoy_names).keys() == {"b1", "b2", "b3"}
    # random: a third of the calls go where the one before went (5 standard deviations).
    assert 0.19 < repeats(envoy_names) < 0.48, Counter(envoy_names)

    # The other forms of the target reach the same backends.
    for host in ("10.96.0.10", "echo.demo.svc.cluster.local"):
        target = f"xds:///{host}:{SERVICE_PORT}"
        reply = await proxyless.client.ask(op="call", target=target, count=30, timeout=20)
        assert reply["error"] is None and set(reply["backends"]) == {"b1", "b2", "b3"}

    # An unknown target fails, told so by the control plane (NOT_FOUND) instead of a timer.
    reply = await proxyless.client.ask(
        op="call", target=f"xds:///nope.demo:{SERVICE_PORT}", count=1, timeout=20
    )
    assert reply["backends"] == []
    assert "does not exist" in reply["error"]
    assert "no Service port of this control plane is named by it" in reply["error"]

    # Envoy holds no API listener, and nobody rejected anything.
    dump = await proxyless.envoy.config_dump()
    listeners = [
        entry["active_state"]["listener"]
        for config in dump["configs"]
        if config["@type"].endswith("ListenersConfigDump")
        for entry in config.get("dynamic_listeners", [])
    ]
    assert [listener["name"] for listener in listeners] == [f"port:{SERVICE_PORT}"]
    assert all("api_listener" not in listener for listener in listeners)
    assert "ApiListener" not in proxyless.envoy.log_tail(400)
    streams = await proxyless.syncz()
    assert {s["node_id"] for s in streams} >= {NODE_ID, proxyless.envoy.node_id}
    for stream in streams:
        for type_name, state in stream["types"].items():
            assert state["nacks"] == 0, (stream["node_id"], type_name, state["last_nack"])
    grpc_stream = next(s for s in streams if s["node_id"] == NODE_ID)
    assert not grpc_stream["types"]["LDS"]["wildcard"]

    # `xds status` lists the gRPC client by its node id.
    status = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "xds",
        "status",
        "--admin",
        proxyless.admin.removeprefix("http://"),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(status.communicate(), 30)
    lines = out.decode().splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())
    # grpcio opens an ADS stream per target: the three that resolve hold every type, the unknown
    # one a Listener subscription only.
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines if line.startswith(NODE_ID)]
    states = sorted(
        tuple(cells[t] for t in ("CDS", "EDS", "LDS", "RDS"))
        for cells in (dict(zip(header, row, strict=True)) for row in rows)
        if cells["CLIENT"].startswith("gRPC")
    )
    assert states == [("-", "-", "SYNCED", "-")] + [("SYNCED",) * 4] * 3, out.decode()


async def _envoy_has_endpoints(envoy: Envoy, count: int) -> bool:
    endpoints = await envoy.endpoints()
    return len(endpoints.get("demo/echo:grpc", set())) == count


async def test_endpoint_changes_reach_the_grpc_client(proxyless: Proxyless):
    client = proxyless.client
    b1, b2, b3, b4 = (proxyless.backends[n] for n in NAMES)
    reply = await client.ask(op="call", target=TARGET, count=30, timeout=30)
    assert reply["error"] is None and set(reply["backends"]) == {"b1", "b2", "b3"}

    # Removed: no call reaches it from 1 s after the write on.
    written = proxyless.write([address("b1"), address("b2")])
    await asyncio.sleep(max(0.0, written + 1.0 - time.monotonic()))  # the bound under test
    before = b3.calls
    reply = await client.ask(op="call", target=TARGET, count=200, timeout=20)
    assert reply["error"] is None and set(reply["backends"]) == {"b1", "b2"}
    assert b3.calls == before

    # Added: it gets calls.
    proxyless.write([address("b1"), address("b2"), address("b4")])
    reply = await client.ask(op="until", target=TARGET, backend="b4", timeout=10)
    assert reply["found"], reply
    reply = await client.ask(op="call", target=TARGET, count=90, timeout=20)
    assert Counter(reply["backends"]) == {"b1": 30, "b2": 30, "b4": 30}

    # Draining (terminating, still serving): gRPC stops picking it, as Envoy does.
    proxyless.write([address("b1"), address("b4")], draining=(address("b2"),))
    reply = await client.ask(
        op="until", target=TARGET, backend="b2", present=False, calls=50, timeout=10
    )
    assert reply["found"], reply
    before = b2.calls
    reply = await client.ask(op="call", target=TARGET, count=100, timeout=20)
    assert set(reply["backends"]) == {"b1", "b4"} and b2.calls == before
    assert b1.calls and b4.calls
