"""Views: rewritten lazily, reused while unchanged, versions of their own."""

from __future__ import annotations

from xds.cache import Cache, Snapshot
from xds.resources import CLUSTER, ENDPOINT, Resource, type_version
from xds.server.views import Variant, Views


def test_views_rewrite_only_changed_resources_and_pass_other_types():
    calls: list[str] = []

    def rewrite(resource: Resource, variant: Variant) -> Resource:
        calls.append(resource.name)
        return Resource.from_bytes(
            resource.type_url, resource.name, resource.body + str(variant.api_type).encode()
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

    views = Views(rewrite)
    first = snap(b"1")
    view = views.view(first, Variant("GRPC"))
    assert view.of_type(ENDPOINT) is first.of_type(ENDPOINT)
    assert view.of_type(CLUSTER)["a"].body == b"1GRPC"
    assert view.version(CLUSTER) != first.version(CLUSTER)
    assert views.view(first, Variant("GRPC")) is view
    assert sorted(calls) == ["a", "b"]
    calls.clear()
    views.view(snap(b"2"), Variant("GRPC")).of_type(CLUSTER)
    assert calls == ["a"]


def test_a_new_view_rewrites_only_what_the_publishes_changed_and_versions_its_content():
    calls: list[str] = []

    def rewrite(resource: Resource, variant: Variant) -> Resource:
        calls.append(resource.name)
        return Resource.from_bytes(resource.type_url, resource.name, resource.body + b"!")

    def clusters(bodies: dict[str, bytes]) -> dict[str, dict[str, Resource]]:
        return {CLUSTER: {n: Resource.from_bytes(CLUSTER, n, b) for n, b in bodies.items()}}

    cache = Cache()
    bodies = {f"c{i}": b"1" for i in range(500)}
    cache.publish(clusters(bodies))
    views = Views(rewrite, cache.changes_since)
    views.view(cache.snapshot, Variant("GRPC"), cache.published).of_type(CLUSTER)
    assert len(calls) == 500
    for step in range(3):  # several publishes between two looks
        bodies[f"c{step}"] = b"2"
        cache.publish(clusters(bodies))
    del bodies["c499"]
    cache.publish(clusters(bodies))
    calls.clear()
    view = views.view(cache.snapshot, Variant("GRPC"), cache.published)
    items = view.of_type(CLUSTER)
    assert sorted(calls) == ["c0", "c1", "c2"]  # not the other 496
    assert "c499" not in items and items["c0"].body == b"2!" and len(items) == 499
    assert view.version(CLUSTER) == type_version(items.values())
