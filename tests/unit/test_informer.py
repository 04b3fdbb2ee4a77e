"""The Kubernetes informer itself (`xds.sources.kube.Informer`), against the API stand-in over
real HTTP: list then watch, every event kind, bookmarks, 410 Gone, a malformed line, stopping."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any

import pytest
from kubernetes import client

from tests.kubeapi import SERVICES, KubeAPIServer
from xds.sources import kube
from xds.sources.health import SourceHealth
from xds.sources.kube import Informer, KubeSettings

DEADLINE_S = 10.0


def service(name: str, port: int = 80) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"ports": [{"name": "http", "port": port}]},
    }


class Recorder:
    """What the informer reported: (keys, listed) per call, and a way to wait for one."""

    def __init__(self) -> None:
        self.calls: list[tuple[frozenset[tuple[str, str]], bool]] = []
        self._changed = threading.Condition()

    def __call__(self, informer: Informer, keys: Collection[tuple[str, str]], listed: bool) -> None:
        with self._changed:
            self.calls.append((frozenset(keys), listed))
            self._changed.notify_all()

    def wait(self, condition: Callable[[], bool]) -> None:
        with self._changed:
            assert self._changed.wait_for(condition, DEADLINE_S), self.calls


@pytest.fixture
def api() -> Iterator[KubeAPIServer]:
    with KubeAPIServer(bookmark_interval=None) as server:
        server.create(SERVICES, service("a"))
        server.create(SERVICES, service("b"))
        yield server


@pytest.fixture
def running(api: KubeAPIServer) -> Iterator[tuple[Informer, Recorder, SourceHealth]]:
    recorder = Recorder()
    health = SourceHealth("kubernetes")
    with client.ApiClient(client.Configuration(host=api.url)) as api_client:
        informer = Informer(
            api_client,
            kube.SERVICES,
            None,
            KubeSettings(read_timeout_s=5.0, max_backoff_s=0.2),
            recorder,
            health=health,
        )
        thread = threading.Thread(target=informer.run, daemon=True)
        thread.start()
        try:
            assert informer.synced.wait(DEADLINE_S)
            yield informer, recorder, health
        finally:
            informer.stop()
            api.drop_watches()  # the watch ends now rather than at its timeout
            thread.join(DEADLINE_S)
            assert not thread.is_alive(), "stop() ends the informer's thread"


def test_a_list_then_every_kind_of_watch_event(running, api: KubeAPIServer):
    informer, recorder, _ = running
    assert recorder.calls[0] == (frozenset({("default", "a"), ("default", "b")}), True)
    assert {key for key, _ in informer.snapshot()} == {("default", "a"), ("default", "b")}
    listed_version = informer.resource_version

    api.create(SERVICES, service("c"))
    recorder.wait(lambda: informer.get(("default", "c")) is not None)
    api.update(SERVICES, service("a", port=81))
    recorder.wait(lambda: informer.get(("default", "a"))["spec"]["ports"][0]["port"] == 81)
    api.delete(SERVICES, "default", "b")
    recorder.wait(lambda: informer.get(("default", "b")) is None)
    assert recorder.calls[1:] == [
        (frozenset({("default", "c")}), False),
        (frozenset({("default", "a")}), False),
        (frozenset({("default", "b")}), False),
    ]
    assert int(informer.resource_version) > int(listed_version)
    # Watch events come without kind and apiVersion too: the converter needs them.
    assert informer.get(("default", "c"))["kind"] == "Service"


def test_a_bookmark_moves_the_version_and_reports_nothing(running, api: KubeAPIServer):
    informer, recorder, _ = running
    api.create(SERVICES, service("c"))
    recorder.wait(lambda: len(recorder.calls) == 2)
    # Another object moves the resourceVersion on; the bookmark then carries the latest one.
    api.create(SERVICES, {**service("x"), "metadata": {"name": "x", "namespace": "other"}})
    recorder.wait(lambda: len(recorder.calls) == 3)
    watching(api)
    api.send_bookmark()
    deadline = time.monotonic() + DEADLINE_S
    while informer.resource_version != api.resource_version and time.monotonic() < deadline:
        time.sleep(0.01)
    assert informer.resource_version == api.resource_version
    assert len(recorder.calls) == 3  # the bookmark reported nothing


def test_410_gone_relists_keeping_unchanged_objects_and_dropping_the_deleted(
    running, api: KubeAPIServer
):
    informer, recorder, _ = running
    kept = informer.get(("default", "a"))
    lists = informer.lists
    api.delete(SERVICES, "default", "b")
    recorder.wait(lambda: informer.get(("default", "b")) is None)
    watching(api)
    api.expire_watches()  # 410 into the open watch, history compacted: a relist is due
    recorder.wait(lambda: informer.lists == lists + 1)
    assert informer.get(("default", "a")) is kept  # unchanged: the same object, nothing redone
    last_keys, listed = recorder.calls[-1]
    assert listed and last_keys == frozenset()  # nothing differs from before the relist


def watching(api: KubeAPIServer) -> None:
    """Until the informer's watch is open on the server (what is sent into watches reaches it)."""
    deadline = time.monotonic() + DEADLINE_S
    while api.open_watches(SERVICES) == 0:
        assert time.monotonic() < deadline, "no watch opened"
        time.sleep(0.01)


def test_a_malformed_watch_line_is_a_failure_then_a_relist(running, api: KubeAPIServer):
    informer, recorder, health = running
    lists = informer.lists
    watching(api)
    api.send_raw(b"this is not JSON")
    recorder.wait(lambda: informer.lists == lists + 1)
    assert health.errors >= 1  # reported, retried, and recovered by the relist
    assert health.failing() == []
    api.create(SERVICES, service("after"))
    recorder.wait(lambda: informer.get(("default", "after")) is not None)
