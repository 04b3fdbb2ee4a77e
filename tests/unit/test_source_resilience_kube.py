"""The Kubernetes source never dies silently (issue 10, point 8): a malformed watch line or list
body is logged, counted and followed by a relist with backoff; changes made after it are applied;
a source that keeps failing is unready and says why, while what it served stays.

Against the API stand-in (tests/kubeapi.py), which writes the bad bytes into the real protocol, and
the unmodified client; every wait is on a condition with a deadline.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import pytest
from kubernetes import client

from tests.kubeapi import SERVICES, KubeAPIServer
from tests.unit.test_incremental_sources_kube import Watched, port_of, service
from tests.unit.test_incremental_sources_kube import api as api  # noqa: F401 (a fixture)
from tests.unit.test_incremental_sources_kube import api_client as api_client  # noqa: F401
from tests.unit.test_incremental_sources_kube import watching as running
from xds.sources.health import SourceHealth
from xds.sources.kube import KubeSettings, KubeSource

DEEP = b"[" * 100_000 + b"]" * 100_000

BAD_WATCH_LINES = [
    b"{not json",
    b"[]",
    b'{"type":"ADDED"}',
    b'"a string"',
    b"42",
    b"null",
    b'{"type":"ADDED","object":[]}',
    b'{"type":"ADDED","object":{}}',
    b'{"type":"MODIFIED","object":{"metadata":{"name":7}}}',
    b'{"type":"SOMETHING","object":{"metadata":{"name":"x"}}}',
    b'{"type":"DELETED","object":null}',
    b'{"type":"BOOKMARK","object":"x"}',
    b'{"object":{"metadata":{"name":"x"}}}',
    b'{"type":"ERROR","object":{"kind":"Status","code":500,"message":"boom"}}',
    b'{"type":"ADDED","object":' + DEEP + b"}",
]

BAD_LIST_BODIES = [
    b"{not json",
    b"[]",
    b'"a string"',
    b'{"items": {}}',
    b'{"items": [1]}',
    b'{"items": [{"metadata": null}]}',
    b'{"items": [{"metadata": {"name": ""}}]}',
    b'{"metadata": [], "items": []}',
    DEEP,
]

FAST = KubeSettings(max_backoff_s=0.05)


@contextlib.asynccontextmanager
async def watching(
    api_client: client.ApiClient,  # noqa: F811
    health: SourceHealth,
) -> AsyncIterator[Watched]:
    async with running(KubeSource(FAST, api=api_client, health=health)) as watched:
        yield watched


async def expire_until(api: KubeAPIServer, relisted: Callable[[], bool]) -> None:
    """Expire the watches (410) until the informer has listed again. One that is between two
    watches at that moment resumes from the newest version and is not expired: expire again."""
    for _ in range(20):
        api.expire_watches()
        if await api.wait_until_async(relisted, 1.0):
            return
    raise AssertionError("the informer did not list again after 20 expiries")


@pytest.mark.asyncio
@pytest.mark.parametrize("line", BAD_WATCH_LINES, ids=lambda line: line[:40].decode())
async def test_a_malformed_watch_line_is_counted_and_followed_by_a_relist(
    api: KubeAPIServer,  # noqa: F811
    api_client: client.ApiClient,  # noqa: F811
    line: bytes,
):
    errors: list[str] = []
    async with watching(api_client, SourceHealth("kubernetes", errors.append)) as watched:
        await watched.mesh_when(lambda mesh: len(mesh) == 20)
        assert await api.wait_until_async(lambda: api.open_watches(SERVICES) == 1)
        lists = api.list_calls(SERVICES)
        api.send_raw(line)
        api.apply(SERVICES, service("s7", port=81))
        mesh = await watched.mesh_when(lambda mesh: port_of(mesh, "s7") == 81)
        assert len(mesh) == 20
        assert errors and set(errors) == {"kubernetes"}
        assert api.list_calls(SERVICES) > lists  # relisted: the stream may have lost an event
        # Working again: later changes still arrive, and the failure is no longer a problem.
        api.apply(SERVICES, service("s8", port=82))
        await watched.mesh_when(lambda mesh: port_of(mesh, "s8") == 82)
        # Every informer the line reached has listed again since.
        assert await api.wait_until_async(lambda: watched.source.health.failing() == [])


@pytest.mark.asyncio
@pytest.mark.parametrize("body", BAD_LIST_BODIES, ids=lambda body: body[:40].decode())
async def test_a_malformed_list_body_is_retried_and_replaces_nothing(
    api: KubeAPIServer,  # noqa: F811
    api_client: client.ApiClient,  # noqa: F811
    body: bytes,
):
    errors: list[str] = []
    async with watching(api_client, SourceHealth("kubernetes", errors.append)) as watched:
        await watched.mesh_when(lambda mesh: len(mesh) == 20)
        api.serve_list_bodies(SERVICES, body)
        # The bad body read (and reported) before the change, else the change may come through
        # an open watch before any relist.
        await expire_until(api, lambda: api.list_bodies_left(SERVICES) == 0)
        assert await api.wait_until_async(lambda: bool(errors), timeout=10)
        assert api.list_bodies_left(SERVICES) == 0
        api.apply(SERVICES, service("s7", port=81))
        mesh = await watched.mesh_when(lambda mesh: port_of(mesh, "s7") == 81)
        assert len(mesh) == 20  # nothing was replaced by the bad body


@pytest.mark.asyncio
async def test_a_source_that_keeps_failing_is_unready_and_keeps_serving(
    api: KubeAPIServer,  # noqa: F811
    api_client: client.ApiClient,  # noqa: F811
):
    health = SourceHealth("kubernetes", unready_after=3)
    async with watching(api_client, health) as watched:
        await watched.mesh_when(lambda mesh: len(mesh) == 20)
        api.serve_list_bodies(SERVICES, *([b"[]"] * 10_000))
        await expire_until(api, lambda: api.list_bodies_left(SERVICES) < 10_000)
        assert await api.wait_until_async(lambda: bool(health.unready()), timeout=10)
        (why,) = health.unready()
        assert "services in all namespaces" in why and "not a ServiceList" in why
        assert any("services in all namespaces" in p.message for p in watched.source.problems())
        assert len(watched.source.mesh()) == 20  # the last good objects stay served
        api.clear_list_bodies(SERVICES)  # the next list is good
        assert await api.wait_until_async(lambda: not health.unready(), timeout=10)
