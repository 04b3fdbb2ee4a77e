"""Reconnects mid-push, and replicas that agree on versions, with a real Envoy."""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from tests.integration.conftest import LOOPBACK, endpoint_slice, service, write_manifests
from xds.app import ControlPlane
from xds.config import Settings
from xds.local import Envoy, free_port, free_port_offset, wait_for
from xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, decode

# Where each type sits in Envoy's /config_dump, and the key of its resource there.
DUMP_PATHS = {
    CLUSTER: ("ClustersConfigDump", "dynamic_active_clusters", ("cluster",)),
    LISTENER: ("ListenersConfigDump", "dynamic_listeners", ("active_state", "listener")),
    ROUTE: ("RoutesConfigDump", "dynamic_route_configs", ("route_config",)),
    ENDPOINT: ("EndpointsConfigDump", "dynamic_endpoint_configs", ("endpoint_config",)),
}


class Relay:
    """A TCP relay between Envoy and the control plane that can cut every connection at once."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.connections: set[asyncio.StreamWriter] = set()
        self.accepted = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.connections |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.connections -= {writer, up_writer}

    def cut(self) -> int:
        """Aborts every relayed connection; returns how many there were."""
        live = list(self.connections)
        for writer in live:
            writer.transport.abort()
        return len(live)

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def fast_reconnect(config: dict[str, Any]) -> None:
    """Envoy retries its xDS stream after 50-200 ms instead of its default of up to 30 s."""
    backoff = {"retry_back_off": {"base_interval": "0.05s", "max_interval": "0.2s"}}
    source = config["dynamic_resources"]["ads_config"]
    source["grpc_services"][0]["envoy_grpc"]["retry_policy"] = backoff


async def envoy_resources(envoy: Envoy) -> dict[str, dict[str, Any]]:
    dump = await envoy.config_dump(include_eds=True)
    out: dict[str, dict[str, Any]] = {t: {} for t in DUMP_PATHS}
    for config in dump["configs"]:
        kind = config["@type"].rsplit(".", 1)[-1]
        for type_url, (dump_kind, field, path) in DUMP_PATHS.items():
            if kind != dump_kind:
                continue
            for entry in config.get(field, []):
                resource = entry
                for key in path:
                    resource = resource.get(key, {})
                if resource:
                    resource = {k: v for k, v in resource.items() if k != "@type"}
                    name = resource.get("name") or resource.get("cluster_name")
                    out[type_url][name] = resource
    return out


DIFFERENCES: list[str] = []


async def converged(envoy: Envoy, plane: ControlPlane) -> bool:
    stats = await envoy.stats("cluster_manager.warming_clusters")
    if stats.get("cluster_manager.warming_clusters", 1) != 0:
        DIFFERENCES.append(f"warming clusters: {stats}")
        return False
    held = await envoy_resources(envoy)
    snapshot = plane.cache.snapshot
    for type_url in DUMP_PATHS:
        served = snapshot.of_type(type_url)
        if held[type_url].keys() != served.keys():
            DIFFERENCES.append(f"{type_url}: Envoy {sorted(held[type_url])} != {sorted(served)}")
            return False
        for name, resource in served.items():
            expected = decode(resource)
            got = json_format.ParseDict(held[type_url][name], type(expected)())
            if type_url == ENDPOINT:
                # Envoy dumps endpoints with its defaults filled in: compare what they mean.
                got, expected = endpoints_of(got), endpoints_of(expected)
            if got != expected:
                DIFFERENCES.append(f"{type_url} {name}: Envoy {got} != {expected}")
                return False
    return True


def endpoints_of(assignment: Any) -> set[tuple[str, str, str, int, int]]:
    return {
        (
            locality.locality.region,
            locality.locality.zone,
            lb.endpoint.address.socket_address.address,
            lb.endpoint.address.socket_address.port_value,
            lb.health_status,
        )
        for locality in assignment.endpoints
        for lb in locality.lb_endpoints
    }


def mesh_state(generation: int, port: int) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for index in range(4):
        if index == 3 and generation % 3 == 0:
            continue  # a Service that comes and goes: clusters and routes change too
        name = f"svc{index}"
        hosts = [f"127.0.0.{1 + (generation + n) % 5}" for n in range(1 + generation % 3)]
        objects += [service(name, 8080 + index % 2), endpoint_slice(name, hosts, port)]
    return objects


@pytest.mark.parametrize("mode", ["ads", "delta-ads"])
async def test_a_hundred_reconnects_mid_push_converge_every_time(tmp_path: Path, mode: str):
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    path = manifests / "mesh.yaml"
    backend_port = free_port()
    write_manifests(path, *mesh_state(0, backend_port))
    settings = Settings(
        manifests=(manifests,),
        xds_port=0,
        listener_address="127.0.0.1",
        listener_port_offset=free_port_offset((8080, 8081)),
        allowed_endpoint_ranges=LOOPBACK,
    )
    plane = ControlPlane(settings)
    ports = await plane.start()
    relay = await Relay(ports.xds).start()
    envoy = Envoy(
        f"127.0.0.1:{relay.port}",
        node_id=f"reconnect-{mode}",
        mode=mode,
        workdir=tmp_path,
        customize=fast_reconnect,
    )
    rng = random.Random(7)
    generation = 0
    try:
        await envoy.start()
        await wait_for(lambda: converged(envoy, plane), 20, what="first convergence")
        for attempt in range(100):
            # A burst of changes, with the connection cut somewhere in the middle of it.
            cut_after = rng.randrange(3)
            await wait_for(lambda: relay.connections, 10, what="Envoy connected")
            for step in range(3):
                generation += 1
                write_manifests(path, *mesh_state(generation, backend_port))
                await asyncio.sleep(rng.uniform(0.0, 0.02))  # let part of a push go out
                if step == cut_after:
                    assert relay.cut() > 0
            try:
                await wait_for(lambda: converged(envoy, plane), 15, what="convergence")
            except TimeoutError:
                pytest.fail(
                    f"no convergence after cut {attempt + 1}: {DIFFERENCES[-1]}; "
                    f"server streams: {plane.server.syncz()}"
                )
        # The first connection, then one after every cut (Envoy may have converged before its
        # last reconnect: wait for that one too).
        await wait_for(lambda: relay.accepted >= 101, 10, what="a reconnect after every cut")
    finally:
        await envoy.stop()
        await relay.stop()
        await plane.stop()


def settled(plane: ControlPlane) -> bool:
    """One client, and every type it asked for acknowledged."""
    clients = plane.server.syncz()
    return len(clients) == 1 and all(
        state["acked_version"] and not state["awaiting_ack"]
        for state in clients[0]["types"].values()
    )


@pytest.mark.parametrize("mode", ["ads", "delta-ads"])
async def test_an_envoy_moving_to_another_replica_receives_nothing_new(tmp_path: Path, mode: str):
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    write_manifests(manifests / "mesh.yaml", *mesh_state(1, free_port()))
    settings = Settings(
        manifests=(manifests,),
        xds_port=0,
        listener_address="127.0.0.1",
        listener_port_offset=free_port_offset((8080, 8081)),
        allowed_endpoint_ranges=LOOPBACK,
    )
    first, second = ControlPlane(settings), ControlPlane(settings)
    first_ports, second_ports = await first.start(), await second.start()
    assert first.cache.snapshot.versions == second.cache.snapshot.versions
    relay = await Relay(first_ports.xds).start()
    envoy = Envoy(
        f"127.0.0.1:{relay.port}",
        node_id=f"replicas-{mode}",
        mode=mode,
        workdir=tmp_path,
        customize=fast_reconnect,
    )
    try:
        await envoy.start()
        await wait_for(lambda: converged(envoy, first), 20, what="convergence on replica one")
        await wait_for(lambda: settled(first), 20, what="Envoy settled on replica one")
        before = await envoy.stats("cluster_manager")
        listeners_before = await envoy.stats("listener_manager")
        [on_first] = first.server.syncz()
        acked_on_first = {t: s["acked_version"] for t, s in on_first["types"].items()}

        relay.target_port = second_ports.xds
        assert relay.cut() > 0

        await wait_for(lambda: settled(second), 20, what="Envoy settled on replica two")
        assert await converged(envoy, second)
        [client] = second.server.syncz()
        for short, state in client["types"].items():
            # Both replicas version the same state alike.
            assert state["acked_version"] == acked_on_first[short], short
            if mode == "delta-ads":
                # Envoy told the new replica what it holds; nothing differed, so nothing was sent.
                assert state["resources_sent"] == 0, (short, state)
        after = await envoy.stats("cluster_manager")
        listeners_after = await envoy.stats("listener_manager")
        for counter in ("cluster_manager.cluster_added", "cluster_manager.cluster_modified"):
            assert after[counter] == before[counter], counter
        for counter in ("listener_manager.listener_added", "listener_manager.listener_modified"):
            assert listeners_after[counter] == listeners_before[counter], counter
    finally:
        await envoy.stop()
        await relay.stop()
        await first.stop()
        await second.stop()
