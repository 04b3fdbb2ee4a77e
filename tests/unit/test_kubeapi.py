"""The Kubernetes API stand-in (tests/kubeapi.py) against the official `kubernetes` client.

Real HTTP on 127.0.0.1, the client unmodified: lists, watches (ordering, namespaces, resume,
410 Expired, bookmarks, timeouts) and the injected faults (dropped, stalled, expired watches,
no EndpointSlices). Waits are on conditions with deadlines, never bare sleeps.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import urllib3
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from tests import factories
from tests.kubeapi import ENDPOINTS, ENDPOINTSLICES, NODES, SERVICES, KubeAPIServer

DEADLINE = 5.0


def service(name: str, namespace: str = "default", port: int = 80, **labels: str) -> dict:
    return factories.service(name, port, namespace, labels=labels)


def endpoint_slice(name: str, namespace: str, service_name: str, ip: str) -> dict:
    return factories.endpoint_slice(service_name, [ip], namespace=namespace, name=name)


class Collector:
    """Runs a (blocking) watch stream in a worker thread and queues what it yields.

    Items: ("event", event), ("error", exception) or ("end", None).
    """

    def __init__(self, stream: Callable[[], Iterator[dict[str, Any]]], stop_after: int = 0):
        self.items: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stream = stream
        self._stop_after = stop_after
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        seen = 0
        try:
            for event in self._stream():
                self.items.put(("event", event))
                seen += 1
                if self._stop_after and seen >= self._stop_after:
                    break
        except Exception as exc:
            self.items.put(("error", exc))
        else:
            self.items.put(("end", None))

    def next(self, timeout: float = DEADLINE) -> tuple[str, Any]:
        return self.items.get(timeout=timeout)

    def events(self, n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            kind, value = self.next()
            assert kind == "event", (kind, value)
            out.append(value)
        return out

    def finish(self) -> tuple[str, Any]:
        """The terminal item (end or error), skipping nothing: asserts no further events."""
        kind, value = self.next()
        assert kind != "event", value
        self.thread.join(DEADLINE)
        return kind, value


@pytest.fixture
def api() -> Iterator[KubeAPIServer]:
    with KubeAPIServer() as server:
        yield server


@pytest.fixture
def api_client(api: KubeAPIServer) -> Iterator[client.ApiClient]:
    with client.ApiClient(client.Configuration(host=api.url)) as api_client:
        yield api_client


@pytest.fixture
def core(api_client: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api_client)


@pytest.fixture
def discovery(api_client: client.ApiClient) -> client.DiscoveryV1Api:
    return client.DiscoveryV1Api(api_client)


def kinds(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["type"], e["raw_object"]["metadata"]["name"]) for e in events]


def test_list_returns_created_objects_and_the_current_resource_version(api, core):
    api.create(SERVICES, service("a", "ns1"))
    rv = api.create(SERVICES, service("b", "ns2", port=81))
    result = core.list_service_for_all_namespaces()
    assert isinstance(result, client.V1ServiceList)
    assert result.metadata.resource_version == rv == "2"
    assert [(s.metadata.namespace, s.metadata.name) for s in result.items] == [
        ("ns1", "a"),
        ("ns2", "b"),
    ]
    assert result.items[1].spec.ports[0].port == 81
    assert result.items[0].metadata.uid and result.items[0].metadata.creation_timestamp
    assert result.items[0].metadata.resource_version == "1"
    assert api.list_calls(SERVICES) == 1 and api.watch_calls(SERVICES) == 0
    # Like the real server, list items carry neither kind nor apiVersion.
    with urllib.request.urlopen(f"{api.url}/api/v1/services") as response:
        raw = json.load(response)
    assert raw["kind"] == "ServiceList" and raw["apiVersion"] == "v1"
    assert all("kind" not in item and "apiVersion" not in item for item in raw["items"])


def test_watch_sees_added_modified_deleted_in_order(api, core):
    rv = core.list_service_for_all_namespaces().metadata.resource_version
    w = watch.Watch()
    collector = Collector(
        lambda: w.stream(
            core.list_service_for_all_namespaces, resource_version=rv, timeout_seconds=30
        ),
        stop_after=3,
    )
    assert api.wait_until(lambda: api.open_watches(SERVICES) == 1)
    api.create(SERVICES, service("a", "ns"))
    api.update(SERVICES, service("a", "ns", port=8080))
    api.delete(SERVICES, "ns", "a")
    events = collector.events(3)
    assert kinds(events) == [("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]
    assert isinstance(events[1]["object"], client.V1Service)
    assert events[1]["object"].spec.ports[0].port == 8080
    assert [e["object"].metadata.resource_version for e in events] == ["1", "2", "3"]
    assert w.resource_version == "3"
    assert collector.finish() == ("end", None)
    # Breaking out of the stream closes the connection: the server sees the watch go.
    assert api.wait_until(lambda: api.open_watches() == 0)


def test_watch_from_an_old_resource_version_replays_history(api, core):
    api.create(SERVICES, service("a"))
    rv = api.create(SERVICES, service("b"))
    api.update(SERVICES, service("a", port=90))
    api.delete(SERVICES, "default", "b")
    collector = Collector(
        lambda: watch.Watch().stream(
            core.list_service_for_all_namespaces, resource_version=rv, timeout_seconds=30
        ),
        stop_after=2,
    )
    assert kinds(collector.events(2)) == [("MODIFIED", "a"), ("DELETED", "b")]


def test_watch_from_zero_starts_with_synthetic_added_events(api, core):
    api.create(SERVICES, service("a"))
    api.update(SERVICES, service("a", port=1))
    api.create(SERVICES, service("b"))
    collector = Collector(
        lambda: watch.Watch().stream(
            core.list_service_for_all_namespaces, resource_version="0", timeout_seconds=30
        ),
        stop_after=3,
    )
    first = collector.events(2)
    assert kinds(first) == [("ADDED", "a"), ("ADDED", "b")]
    api.delete(SERVICES, "default", "a")
    assert kinds(collector.events(1)) == [("DELETED", "a")]


def test_namespaced_list_and_watch(api, core):
    api.create(SERVICES, service("a", "ns1"))
    api.create(SERVICES, service("a", "ns2"))
    listed = core.list_namespaced_service("ns1")
    assert [(s.metadata.namespace, s.metadata.name) for s in listed.items] == [("ns1", "a")]
    collector = Collector(
        lambda: watch.Watch().stream(
            core.list_namespaced_service,
            "ns2",
            resource_version=listed.metadata.resource_version,
            timeout_seconds=30,
        ),
        stop_after=2,
    )
    api.create(SERVICES, service("b", "ns1"))
    api.create(SERVICES, service("b", "ns2"))
    api.delete(SERVICES, "ns1", "a")
    api.delete(SERVICES, "ns2", "a")
    events = collector.events(2)
    assert [
        (e["type"], e["object"].metadata.namespace, e["object"].metadata.name) for e in events
    ] == [
        ("ADDED", "ns2", "b"),
        ("DELETED", "ns2", "a"),
    ]
    assert ("GET", "/api/v1/namespaces/ns1/services") in api.requests


def test_label_selector(api, core):
    api.create(SERVICES, service("a", app="x"))
    api.create(SERVICES, service("b", app="y"))
    api.create(SERVICES, service("c"))
    names = lambda selector: [  # noqa: E731
        s.metadata.name for s in core.list_service_for_all_namespaces(label_selector=selector).items
    ]
    assert names("app=x") == ["a"]
    assert names("app!=x") == ["b", "c"]
    assert names("app") == ["a", "b"]
    assert names("!app") == ["c"]


def test_endpointslices_list_and_watch(api, discovery):
    api.create(ENDPOINTSLICES, endpoint_slice("a-1", "ns", "a", "10.0.0.1"))
    listed = discovery.list_endpoint_slice_for_all_namespaces()
    assert isinstance(listed, client.V1EndpointSliceList)
    assert listed.items[0].endpoints[0].addresses == ["10.0.0.1"]
    assert listed.items[0].address_type == "IPv4"
    collector = Collector(
        lambda: watch.Watch().stream(
            discovery.list_namespaced_endpoint_slice,
            "ns",
            resource_version=listed.metadata.resource_version,
            timeout_seconds=30,
        ),
        stop_after=1,
    )
    api.update(ENDPOINTSLICES, endpoint_slice("a-1", "ns", "a", "10.0.0.2"))
    (event,) = collector.events(1)
    assert event["type"] == "MODIFIED"
    assert isinstance(event["object"], client.V1EndpointSlice)
    assert event["object"].endpoints[0].addresses == ["10.0.0.2"]
    assert api.watch_calls(ENDPOINTSLICES) == 1 and api.list_calls(ENDPOINTSLICES) == 1


def test_endpoints_list_and_watch(api, core):
    subsets = [{"addresses": [{"ip": "10.0.0.1"}], "ports": [{"port": 8080}]}]
    api.apply(ENDPOINTS, {"metadata": {"name": "a", "namespace": "ns"}, "subsets": subsets})
    listed = core.list_endpoints_for_all_namespaces()
    assert listed.items[0].subsets[0].addresses[0].ip == "10.0.0.1"
    collector = Collector(
        lambda: watch.Watch().stream(
            core.list_namespaced_endpoints,
            "ns",
            resource_version=listed.metadata.resource_version,
            timeout_seconds=30,
        ),
        stop_after=1,
    )
    subsets[0]["addresses"] = [{"ip": "10.0.0.9"}]
    api.apply(ENDPOINTS, {"metadata": {"name": "a", "namespace": "ns"}, "subsets": subsets})
    (event,) = collector.events(1)
    assert event["type"] == "MODIFIED"
    assert event["object"].subsets[0].addresses[0].ip == "10.0.0.9"


def test_endpointslices_off_gives_404_and_endpoints_still_work(api, core, discovery):
    api.set_endpointslices_enabled(False)
    with pytest.raises(ApiException) as listing:
        discovery.list_endpoint_slice_for_all_namespaces()
    assert listing.value.status == 404
    with pytest.raises(ApiException) as watching:
        for _ in watch.Watch().stream(discovery.list_endpoint_slice_for_all_namespaces):
            pass
    assert watching.value.status == 404
    with pytest.raises(ApiException) as resources:
        discovery.get_api_resources()
    assert resources.value.status == 404
    groups = client.ApisApi(core.api_client).get_api_versions()
    assert groups.groups == []
    assert core.list_endpoints_for_all_namespaces().items == []
    api.set_endpointslices_enabled(True)
    assert discovery.get_api_resources().resources[0].name == ENDPOINTSLICES
    assert client.ApisApi(core.api_client).get_api_versions().groups[0].name == "discovery.k8s.io"


def test_discovery_and_version(api, core):
    assert {r.name for r in core.get_api_resources().resources} == {SERVICES, ENDPOINTS, NODES}
    assert client.CoreApi(core.api_client).get_api_versions().versions == ["v1"]
    assert client.VersionApi(core.api_client).get_code().git_version.startswith("v1.")


def test_read_one_object_and_404(api, core):
    api.create(SERVICES, service("a", "ns"))
    assert core.read_namespaced_service("a", "ns").metadata.name == "a"
    with pytest.raises(ApiException) as missing:
        core.read_namespaced_service("b", "ns")
    assert missing.value.status == 404
    assert json.loads(missing.value.body)["reason"] == "NotFound"


def test_resuming_from_a_compacted_resource_version_raises_410(api, core):
    first = api.create(SERVICES, service("a"))
    api.update(SERVICES, service("a", port=81))
    api.compact()
    # With timeout_seconds the client does not retry: the ERROR event raises at once.
    with pytest.raises(ApiException) as expired:
        for _ in watch.Watch().stream(
            core.list_service_for_all_namespaces, resource_version=first, timeout_seconds=30
        ):
            pass
    assert expired.value.status == 410
    assert expired.value.reason == "Expired: too old resource version: 1 (2)"
    assert api.watch_calls(SERVICES) == 1
    # Without timeout_seconds it retries once from the same resourceVersion, then raises.
    with pytest.raises(ApiException) as again:
        for _ in watch.Watch().stream(core.list_service_for_all_namespaces, resource_version=first):
            pass
    assert again.value.status == 410
    assert api.watch_calls(SERVICES) == 3
    # The current resourceVersion is still good.
    collector = Collector(
        lambda: watch.Watch().stream(
            core.list_service_for_all_namespaces,
            resource_version=api.resource_version,
            timeout_seconds=30,
        ),
        stop_after=1,
    )
    api.delete(SERVICES, "default", "a")
    assert kinds(collector.events(1)) == [("DELETED", "a")]


def test_history_limit_compacts_by_itself():
    with (
        KubeAPIServer(history_limit=2) as api,
        client.ApiClient(client.Configuration(host=api.url)) as api_client,
    ):
        core = client.CoreV1Api(api_client)
        for port in range(4):
            api.apply(SERVICES, service("a", port=port))  # resourceVersions 1 to 4; 3 and 4 kept
        with pytest.raises(ApiException) as expired:
            for _ in watch.Watch().stream(
                core.list_service_for_all_namespaces, resource_version="1", timeout_seconds=30
            ):
                pass
        assert expired.value.reason == "Expired: too old resource version: 1 (2)"
        collector = Collector(
            lambda: watch.Watch().stream(
                core.list_service_for_all_namespaces, resource_version="2", timeout_seconds=30
            ),
            stop_after=2,
        )
        events = collector.events(2)
        assert [e["object"].spec.ports[0].port for e in events] == [2, 3]


def test_expire_watches_sends_410_into_open_streams(api, core):
    rv = api.create(SERVICES, service("a"))
    collector = Collector(
        lambda: watch.Watch().stream(
            core.list_service_for_all_namespaces, resource_version=rv, timeout_seconds=30
        )
    )
    assert api.wait_until(lambda: api.open_watches() == 1)
    api.expire_watches()
    kind, error = collector.finish()
    assert kind == "error" and isinstance(error, ApiException) and error.status == 410
    assert api.wait_until(lambda: api.open_watches() == 0)


def test_without_timeout_seconds_the_client_hides_one_410_and_resumes(api, core):
    rv = api.create(SERVICES, service("a"))
    collector = Collector(
        lambda: watch.Watch().stream(core.list_service_for_all_namespaces, resource_version=rv),
        stop_after=1,
    )
    assert api.wait_until(lambda: api.open_watches() == 1)
    api.expire_watches(compact=False)  # the resume from rv still works
    assert api.wait_until(lambda: api.watch_calls(SERVICES) == 2 and api.open_watches() == 1)
    api.delete(SERVICES, "default", "a")
    assert kinds(collector.events(1)) == [("DELETED", "a")]


def test_periodic_bookmarks():
    with (
        KubeAPIServer(bookmark_interval=0.05) as api,
        client.ApiClient(client.Configuration(host=api.url)) as api_client,
    ):
        core = client.CoreV1Api(api_client)
        rv = api.create(SERVICES, service("a"))
        api.create(ENDPOINTS, {"metadata": {"name": "a"}})  # moves the global resourceVersion
        w = watch.Watch()
        collector = Collector(
            lambda: w.stream(
                core.list_service_for_all_namespaces,
                resource_version=rv,
                allow_watch_bookmarks=True,
                timeout_seconds=30,
            ),
            stop_after=2,
        )
        first, second = collector.events(2)
        for event in (first, second):
            assert event["type"] == "BOOKMARK"
            assert event["object"] == event["raw_object"]  # a dict: the client does not decode it
            assert event["raw_object"] == {
                "kind": "Service",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": "2"},
            }
        assert w.resource_version == "2"


def test_send_bookmark_only_to_watches_that_allow_them(api, core):
    rv = api.create(SERVICES, service("a"))
    with_bookmarks = Collector(
        lambda: watch.Watch().stream(
            core.list_service_for_all_namespaces,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=30,
        ),
        stop_after=2,
    )
    without = Collector(
        lambda: watch.Watch().stream(
            core.list_service_for_all_namespaces, resource_version=rv, timeout_seconds=30
        ),
        stop_after=1,
    )
    assert api.wait_until(lambda: api.open_watches() == 2)
    api.send_bookmark()
    assert with_bookmarks.events(1)[0]["type"] == "BOOKMARK"
    api.delete(SERVICES, "default", "a")
    assert with_bookmarks.events(1)[0]["type"] == "DELETED"
    assert without.events(1)[0]["type"] == "DELETED"


def test_timeout_seconds_ends_the_stream_cleanly(api, core):
    collector = Collector(
        lambda: watch.Watch().stream(
            core.list_service_for_all_namespaces, resource_version="0", timeout_seconds=1
        )
    )
    assert collector.finish() == ("end", None)
    assert api.watch_calls(SERVICES) == 1


def test_drop_watches_cuts_the_stream(api, core):
    rv = api.create(SERVICES, service("a"))
    collector = Collector(
        lambda: watch.Watch().stream(
            core.list_service_for_all_namespaces, resource_version=rv, timeout_seconds=30
        )
    )
    assert api.wait_until(lambda: api.open_watches() == 1)
    api.drop_watches()
    kind, error = collector.finish()
    # An abrupt close mid chunked body surfaces from urllib3, not as an ApiException.
    assert kind == "error" and isinstance(error, urllib3.exceptions.ProtocolError)
    assert api.wait_until(lambda: api.open_watches() == 0)


def test_clean_end_of_watch_is_resumed_by_the_client_without_timeout_seconds(api, core):
    rv = api.create(SERVICES, service("a"))
    collector = Collector(
        lambda: watch.Watch().stream(core.list_service_for_all_namespaces, resource_version=rv),
        stop_after=2,
    )
    assert api.wait_until(lambda: api.open_watches() == 1)
    api.update(SERVICES, service("a", port=1))
    assert kinds(collector.events(1)) == [("MODIFIED", "a")]
    api.drop_watches(clean=True)
    assert api.wait_until(lambda: api.watch_calls(SERVICES) == 2 and api.open_watches() == 1)
    assert api.requests[-1] == ("GET", "/api/v1/services?resourceVersion=2&watch=true")
    api.delete(SERVICES, "default", "a")
    assert kinds(collector.events(1)) == [("DELETED", "a")]


def test_stalled_watch_sends_nothing_until_the_read_timeout(api, core):
    rv = api.create(SERVICES, service("a"))
    api.stall_watches()
    collector = Collector(
        lambda: watch.Watch().stream(
            core.list_service_for_all_namespaces,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=30,
            _request_timeout=(2, 0.3),
        )
    )
    assert api.wait_until(lambda: api.open_watches() == 1)
    api.update(SERVICES, service("a", port=1))
    api.send_bookmark()
    kind, error = collector.finish()
    assert kind == "error" and isinstance(error, urllib3.exceptions.ReadTimeoutError)
    # The client closed its end; the server notices even though it is stalled.
    assert api.wait_until(lambda: api.open_watches() == 0)
    api.unstall()
    collector = Collector(
        lambda: watch.Watch().stream(
            core.list_service_for_all_namespaces, resource_version=rv, timeout_seconds=30
        ),
        stop_after=1,
    )
    assert kinds(collector.events(1)) == [("MODIFIED", "a")]


def test_raw_watch_stream_is_chunked_json_lines(api):
    api.create(SERVICES, service("a", "ns"))
    url = f"{api.url}/api/v1/namespaces/ns/services?watch=1&timeoutSeconds=1"
    with urllib.request.urlopen(url) as response:
        assert response.headers["Content-Type"] == "application/json"
        assert response.headers["Transfer-Encoding"] == "chunked"
        lines = response.read().splitlines()
    (event,) = [json.loads(line) for line in lines]
    assert event["type"] == "ADDED"
    assert event["object"]["kind"] == "Service" and event["object"]["apiVersion"] == "v1"
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{api.url}/apis/example.com/v1/things")
    assert missing.value.code == 404
    missing.value.close()


async def test_runs_in_the_tests_event_loop():
    async with KubeAPIServer() as api:
        api.create(SERVICES, service("a"))

        def list_names() -> list[str]:
            with client.ApiClient(client.Configuration(host=api.url)) as api_client:
                items = client.CoreV1Api(api_client).list_service_for_all_namespaces().items
                return [s.metadata.name for s in items]

        assert await asyncio.to_thread(list_names) == ["a"]
        assert api.list_calls(SERVICES) == 1


def test_nodes_are_cluster_scoped_and_read_by_name():
    with KubeAPIServer() as api:
        api.apply(NODES, {"metadata": {"name": "kind-worker", "labels": {"zone": "a"}}})
        config = client.Configuration(host=api.url)
        core = client.CoreV1Api(client.ApiClient(config))
        node = core.read_node("kind-worker")
        assert node.metadata.labels == {"zone": "a"} and node.metadata.namespace is None
        with pytest.raises(client.exceptions.ApiException) as missing:
            core.read_node("nowhere")
        assert missing.value.status == 404
