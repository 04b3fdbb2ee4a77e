"""The Kubernetes source carries the change, not the world: informers report which objects changed,
and the mesh built from them says which Services those were.

Against the API stand-in (tests/kubeapi.py) and the unmodified client; every wait is on a condition
with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from typing import Any

import pytest
from kubernetes import client

from tests import factories
from tests.kubeapi import ENDPOINTSLICES, SERVICES, KubeAPIServer
from xds.model import Mesh, ServiceKey
from xds.sources import kube
from xds.sources.kube import Informer, KubeSettings, KubeSource

TIMEOUT_S = 10.0


def service(name: str, port: int = 80) -> dict[str, Any]:
    return factories.service(name, port)


def endpoint_slice(service_name: str, ip: str) -> dict[str, Any]:
    return factories.endpoint_slice(service_name, [ip], name=f"{service_name}-a")


@pytest.fixture
def api() -> Iterator[KubeAPIServer]:
    with KubeAPIServer() as server:
        for i in range(20):
            server.create(SERVICES, service(f"s{i}"))
            server.create(ENDPOINTSLICES, endpoint_slice(f"s{i}", f"10.0.0.{i + 1}"))
        yield server


@pytest.fixture
def api_client(api: KubeAPIServer) -> Iterator[client.ApiClient]:
    with client.ApiClient(client.Configuration(host=api.url)) as api_client:
        yield api_client


class Watched:
    """A running `KubeSource.watch()` and the notifications it gave."""

    def __init__(self, source: KubeSource) -> None:
        self.source = source
        self.notified = asyncio.Event()

    async def mesh_when(self, condition: Callable[[Mesh], bool]) -> Mesh:
        """The mesh, asked for off the event loop after each notification, once it satisfies
        `condition`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT_S
        while True:
            self.notified.clear()
            mesh = await asyncio.to_thread(self.source.mesh)
            if condition(mesh):
                return mesh
            remaining = deadline - loop.time()
            assert remaining > 0, "condition not met before the deadline"
            await asyncio.wait_for(self.notified.wait(), remaining)


@contextlib.asynccontextmanager
async def watching(source: KubeSource) -> AsyncIterator[Watched]:
    """`source.watch()` running for the duration, cancelled after."""
    watched = Watched(source)
    task = asyncio.create_task(source.watch(watched.notified.set))
    try:
        yield watched
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def watched(api_client: client.ApiClient) -> AsyncIterator[Watched]:
    async with watching(KubeSource(KubeSettings(), api=api_client)) as running:
        yield running


def port_of(mesh: Mesh, name: str) -> int | None:
    entry = mesh.get(ServiceKey("default", name))
    return entry.service.ports[0].port if entry else None


@pytest.mark.asyncio
async def test_one_watch_event_changes_one_service_and_converts_one_object(
    api: KubeAPIServer, watched: Watched
):
    source = watched.source
    first = await watched.mesh_when(lambda mesh: len(mesh) == 20)
    assert all(entry.groups for entry in first)  # the first mesh waited for every list
    converted = source.converted_objects
    assert converted == 40

    watched.notified.clear()
    api.apply(SERVICES, service("s7", port=81))
    await asyncio.wait_for(watched.notified.wait(), TIMEOUT_S)
    # The informer recorded the key and the loop was notified; nothing was converted yet.
    assert source.converted_objects == converted
    mesh = await watched.mesh_when(lambda mesh: port_of(mesh, "s7") == 81)
    assert mesh.parent == first.generation
    assert mesh.changed == {ServiceKey("default", "s7")}
    assert source.converted_objects == converted + 1

    api.delete(ENDPOINTSLICES, "default", "s3-a")
    gone = await watched.mesh_when(lambda m: not m.entries[ServiceKey("default", "s3")].groups)
    assert gone.parent == mesh.generation
    assert gone.changed == {ServiceKey("default", "s3")}
    assert source.converted_objects == converted + 1  # a deletion converts nothing


def test_a_relist_reports_exactly_the_objects_that_differ(
    api: KubeAPIServer, api_client: client.ApiClient
):
    reported: list[tuple[set[tuple[str, str]], bool]] = []

    def changed(_: Informer, keys: Collection[tuple[str, str]], listed: bool) -> None:
        reported.append((set(keys), listed))

    informer = Informer(api_client, kube.SERVICES, None, KubeSettings(), changed)
    informer._relist()
    assert reported == [({("default", f"s{i}") for i in range(20)}, True)]
    kept = informer.get(("default", "s1"))

    api.apply(SERVICES, service("s2", port=81))
    api.delete(SERVICES, "default", "s5")
    api.create(SERVICES, service("new"))
    informer._relist()
    assert reported[-1] == ({("default", "s2"), ("default", "s5"), ("default", "new")}, True)
    # Unchanged objects are kept as they were, so the source knows them without comparing.
    assert informer.get(("default", "s1")) is kept
    assert informer.get(("default", "s5")) is None


def test_nodes_are_read_one_by_one_when_few_and_listed_once_when_many(
    api: KubeAPIServer, api_client: client.ApiClient
):
    from tests.kubeapi import NODES

    for i in range(40):
        labels = {"topology.kubernetes.io/region": "r1", "topology.kubernetes.io/zone": f"z{i}"}
        api.create(NODES, {"metadata": {"name": f"n{i}", "labels": labels}})
    source = KubeSource(KubeSettings(), api=api_client)
    assert source.node_locality("n0") == ("r1", "z0")
    assert source.node_locality("missing") is None
    source.prefetch_nodes({"n1", "n2"})  # few: nothing listed, read when asked
    assert api.list_calls(NODES) == 0
    source.prefetch_nodes({f"n{i}" for i in range(3, 40)} | {"gone"})
    assert api.list_calls(NODES) == 1
    gets = api.get_calls(NODES)
    assert gets == 2  # n0 and missing
    assert source.node_locality("n39") == ("r1", "z39")
    assert source.node_locality("gone") is None
    assert api.get_calls(NODES) == gets  # served from what the list read
