"""Per-type views: rewritten lazily, reused while unchanged, versions of their own."""

from __future__ import annotations

from xds.cache import Snapshot
from xds.resources import CLUSTER, ENDPOINT, Resource
from xds.server.views import PerTypeViews


def test_views_rewrite_only_changed_resources_and_pass_other_types():
    calls: list[str] = []

    def rewrite(resource: Resource, api_type: str) -> Resource:
        calls.append(resource.name)
        return Resource.from_bytes(
            resource.type_url, resource.name, resource.body + api_type.encode()
        )

    def snap(a: bytes) -> Snapshot:
        return Snapshot.build(
            {
                CLUSTER: {
                    n: Resource.from_bytes(CLUSTER, n, b) for n, b in (("a", a), ("b", b"1"))
                },
                ENDPOINT: {"a": Resource.from_bytes(ENDPOINT, "a", b"e")},
            }
        )

    views = PerTypeViews(rewrite)
    first = snap(b"1")
    view = views.view(first, "GRPC")
    assert view.of_type(ENDPOINT) is first.of_type(ENDPOINT)
    assert view.of_type(CLUSTER)["a"].body == b"1GRPC"
    assert view.version(CLUSTER) != first.version(CLUSTER)
    assert views.view(first, "GRPC") is view
    assert sorted(calls) == ["a", "b"]
    calls.clear()
    views.view(snap(b"2"), "GRPC").of_type(CLUSTER)
    assert calls == ["a"]
