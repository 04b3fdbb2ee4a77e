"""The cache: content versions, the consistency check, and the change signal (no gRPC here)."""

from __future__ import annotations

import asyncio

from xds.cache import Cache, Snapshot
from xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, Resource


def resources(with_assignment: bool = True, cluster_body: bytes = b"c") -> dict:
    cluster = Resource.from_bytes(
        CLUSTER, "ns/a:http", cluster_body, refs=((ENDPOINT, "ns/a:http"),)
    )
    listener = Resource.from_bytes(LISTENER, "http:80", b"l", refs=((ROUTE, "http:80"),))
    out = {
        CLUSTER: {cluster.name: cluster},
        LISTENER: {listener.name: listener},
        ROUTE: {"http:80": Resource.from_bytes(ROUTE, "http:80", b"r")},
        ENDPOINT: {},
    }
    if with_assignment:
        out[ENDPOINT]["ns/a:http"] = Resource.from_bytes(ENDPOINT, "ns/a:http", b"e")
    return out


def test_versions_are_content_hashes_equal_across_instances():
    one, two = Snapshot.build(resources()), Snapshot.build(resources())
    assert one.versions == two.versions
    changed = Snapshot.build(resources(cluster_body=b"other"))
    assert changed.version(CLUSTER) != one.version(CLUSTER)
    assert changed.version(ROUTE) == one.version(ROUTE)


def test_inconsistent_snapshot_is_refused_and_the_last_good_one_stays():
    cache = Cache()
    assert cache.publish(resources())
    good = cache.snapshot
    assert not cache.publish(resources(with_assignment=False))
    assert cache.snapshot is good
    assert cache.refused == 1
    assert "ns/a:http" in Snapshot.build(resources(with_assignment=False)).inconsistencies()[0]


async def test_publish_fires_the_event_handed_out_with_the_previous_snapshot():
    cache = Cache()
    before, changed = cache.watch()
    cache.publish(resources())
    await asyncio.wait_for(changed.wait(), 1)
    after, next_change = cache.watch()
    assert after is not before and not next_change.is_set()
    cache.publish(resources())  # same content: no new snapshot, no wake-up
    assert not next_change.is_set()


def test_resource_bytes_are_an_any():
    from google.protobuf import any_pb2

    resource = Resource.from_bytes(CLUSTER, "x", b"\x0a\x01x")
    parsed = any_pb2.Any.FromString(resource.any_bytes)
    assert parsed.type_url == CLUSTER and parsed.value == b"\x0a\x01x"
