"""The incremental (delta) stream state machine, driven by hand-made requests and snapshots."""

from __future__ import annotations

import pytest

from xds._pb.envoy.service.discovery.v3 import discovery_pb2
from xds.cache import Snapshot
from xds.resources import CLUSTER, ENDPOINT, ROUTE, Resource
from xds.server.delta import DeltaResponse, DeltaStream
from xds.server.stream import MAX_NODE_FIELD, InvalidRequest


def snapshot(**by_type: dict[str, bytes]) -> Snapshot:
    urls = {"cds": CLUSTER, "eds": ENDPOINT, "rds": ROUTE}
    return Snapshot.build(
        {
            urls[short]: {n: Resource.from_bytes(urls[short], n, b) for n, b in items.items()}
            for short, items in by_type.items()
        }
    )


def request(
    type_url: str,
    subscribe: tuple[str, ...] = (),
    unsubscribe: tuple[str, ...] = (),
    nonce: str = "",
    error: str | None = None,
    initial: dict[str, str] | None = None,
) -> discovery_pb2.DeltaDiscoveryRequest:
    req = discovery_pb2.DeltaDiscoveryRequest(
        type_url=type_url,
        resource_names_subscribe=subscribe,
        resource_names_unsubscribe=unsubscribe,
        response_nonce=nonce,
        initial_resource_versions=initial or {},
    )
    if error is not None:
        req.error_detail.message = error
    return req


def names(response: DeltaResponse) -> list[str]:
    return [r.name for r in response.resources]


def ack(stream: DeltaStream, response: DeltaResponse, snap: Snapshot) -> list[DeltaResponse]:
    return stream.on_request(request(response.type_url, nonce=response.nonce), snap)


def test_wildcard_sends_everything_then_only_changes_and_removals():
    first = snapshot(cds={"a": b"1", "b": b"1"})
    stream = DeltaStream()
    [response] = stream.on_request(request(CLUSTER), first)
    assert names(response) == ["a", "b"] and response.removed == ()
    assert ack(stream, response, first) == []
    second = snapshot(cds={"a": b"2", "c": b"1"})
    [update] = stream.on_snapshot(second)
    assert names(update) == ["a", "c"]
    assert update.removed == ("b",)


def test_encoded_response_parses_with_per_resource_versions():
    snap = snapshot(cds={"a": b"1"})
    [response] = DeltaStream().on_request(request(CLUSTER, ("*",)), snap)
    parsed = discovery_pb2.DeltaDiscoveryResponse.FromString(response.encode())
    assert parsed.nonce == response.nonce and parsed.type_url == CLUSTER
    [resource] = parsed.resources
    assert resource.name == "a"
    assert resource.version == snap.of_type(CLUSTER)["a"].version
    assert resource.resource.value == b"1"
    assert parsed.control_plane.identifier


def test_reconnect_with_initial_versions_sends_only_what_differs():
    snap = snapshot(cds={"same": b"1", "changed": b"2", "new": b"1"})
    held = {
        "same": snap.of_type(CLUSTER)["same"].version,
        "changed": "an-old-version",
        "gone": "v",
    }
    [response] = DeltaStream().on_request(request(CLUSTER, ("*",), initial=held), snap)
    assert names(response) == ["changed", "new"]
    assert response.removed == ("gone",)


def test_reconnect_with_everything_current_gets_an_empty_answer():
    snap = snapshot(cds={"a": b"1"})
    held = {"a": snap.of_type(CLUSTER)["a"].version}
    [response] = DeltaStream().on_request(request(CLUSTER, initial=held), snap)
    assert response.resources == () and response.removed == ()


def test_name_subscribed_before_it_exists_is_sent_when_it_appears_and_never_removed():
    empty = snapshot(rds={"other": b"1"})
    stream = DeltaStream()
    [response] = stream.on_request(request(ROUTE, ("later",)), empty)
    assert response.resources == () and response.removed == ()
    ack(stream, response, empty)
    assert stream.on_snapshot(snapshot(rds={"other": b"2"})) == []
    [update] = stream.on_snapshot(snapshot(rds={"other": b"2", "later": b"1"}))
    assert names(update) == ["later"]


def test_endpoints_of_a_cluster_the_snapshot_lacks_are_empty_not_withheld():
    stream = DeltaStream()
    snap = snapshot(eds={"a": b"\x0a\x01a"})
    [response] = stream.on_request(request(ENDPOINT, ("a", "gone")), snap)
    assert names(response) == ["a", "gone"]
    empty = response.resources[1]
    assert empty.body == b"\x0a\x04gone"  # ClusterLoadAssignment{cluster_name: "gone"}
    ack(stream, response, snap)
    [update] = stream.on_snapshot(snapshot(eds={"a": b"\x0a\x01a", "gone": b"\x0a\x01b"}))
    assert names(update) == ["gone"]


def test_unsubscribe_then_subscribe_again_sends_the_resource_again():
    snap = snapshot(eds={"a": b"1", "b": b"1"})
    stream = DeltaStream()
    [first] = stream.on_request(request(ENDPOINT, ("a", "b")), snap)
    assert names(first) == ["a", "b"]
    ack(stream, first, snap)
    assert stream.on_request(request(ENDPOINT, unsubscribe=("a",), nonce=first.nonce), snap) == []
    [again] = stream.on_request(request(ENDPOINT, ("a",), nonce=first.nonce), snap)
    assert names(again) == ["a"]


def test_nack_is_recorded_and_the_rejected_resource_is_not_sent_again():
    bad = snapshot(cds={"a": b"bad"})
    stream = DeltaStream()
    [response] = stream.on_request(request(CLUSTER), bad)
    assert stream.on_request(request(CLUSTER, nonce=response.nonce, error="no good"), bad) == []
    state = stream.types[CLUSTER]
    nack = state.rejections.nack
    assert nack is not None and nack.message == "no good" and state.rejections.count == 1
    assert stream.on_snapshot(bad) == []
    [fixed] = stream.on_snapshot(snapshot(cds={"a": b"good"}))
    assert names(fixed) == ["a"]


def test_subscription_on_a_stale_nonce_is_still_applied():
    snap = snapshot(eds={"a": b"1", "b": b"1"})
    stream = DeltaStream()
    [first] = stream.on_request(request(ENDPOINT, ("a",)), snap)
    ack(stream, first, snap)
    [second] = stream.on_snapshot(snapshot(eds={"a": b"2", "b": b"1"}))
    newer = snapshot(eds={"a": b"2", "b": b"1"})
    assert stream.on_request(request(ENDPOINT, ("b",), nonce=first.nonce), newer) == []
    [answer] = ack(stream, second, newer)
    assert names(answer) == ["b"]


def test_legacy_wildcard_ends_with_the_first_explicit_name():
    snap = snapshot(cds={"a": b"1", "b": b"1"})
    stream = DeltaStream()
    [response] = stream.on_request(request(CLUSTER), snap)
    ack(stream, response, snap)
    stream.on_request(request(CLUSTER, ("a",), nonce=response.nonce), snap)
    assert not stream.types[CLUSTER].sub.wildcard
    assert stream.on_snapshot(snapshot(cds={"a": b"1", "b": b"2"})) == []  # b: not asked for
    [update] = stream.on_snapshot(snapshot(cds={"a": b"2", "b": b"2"}))
    assert names(update) == ["a"]


def test_explicit_wildcard_stays_with_explicit_names_and_ends_with_unsubscribe():
    snap = snapshot(cds={"a": b"1", "b": b"1"})
    stream = DeltaStream()
    [response] = stream.on_request(request(CLUSTER, ("*", "a")), snap)
    assert names(response) == ["a", "b"]
    ack(stream, response, snap)
    stream.on_request(request(CLUSTER, unsubscribe=("*",), nonce=response.nonce), snap)
    assert not stream.types[CLUSTER].sub.wildcard


def test_cluster_removal_waits_for_routes_moving_away():
    before = snapshot(cds={"old": b"1"}, rds={"r": b"to-old"})
    stream = DeltaStream()
    [cds] = stream.on_request(request(CLUSTER), before)
    ack(stream, cds, before)
    [rds] = stream.on_request(request(ROUTE, ("r",)), before)
    ack(stream, rds, before)
    after = snapshot(cds={"new": b"1"}, rds={"r": b"to-new"})
    cds_add, rds_new = stream.on_snapshot(after)
    assert names(cds_add) == ["new"] and cds_add.removed == ()
    assert ack(stream, cds_add, after) == []
    [cds_remove] = ack(stream, rds_new, after)
    assert cds_remove.removed == ("old",) and cds_remove.resources == ()


def test_one_bad_resource_among_many_is_isolated_and_the_rest_delivered():
    stream = DeltaStream()
    start = snapshot(cds={"a": b"a1", "b": b"b1"})
    [first] = stream.on_request(request(CLUSTER), start)
    ack(stream, first, start)
    changed = snapshot(cds={"a": b"a2", "b": b"BAD", "c": b"c1"})
    queue, seen = stream.on_snapshot(changed), []
    while queue:
        response = queue.pop(0)
        seen.append(response)
        rejected = any(r.body == b"BAD" for r in response.resources)
        queue += stream.on_request(
            request(CLUSTER, nonce=response.nonce, error="bad" if rejected else None), changed
        )
    state = stream.types[CLUSTER]
    # What the client holds: the new a and c, and the b it had (the server knows its versions).
    held = {"a": changed.of_type(CLUSTER)["a"], "b": start.of_type(CLUSTER)["b"]}
    held["c"] = changed.of_type(CLUSTER)["c"]
    assert state.held_versions() == {n: r.version for n, r in held.items()}
    assert list(state.rejections.quarantine) == ["b"]
    assert all(len(s.resources) <= 1 for s in seen[1:])  # retried one at a time
    assert stream.on_snapshot(changed) == []  # nothing re-sent while nothing changes


def test_an_unknown_type_is_answered_empty_and_its_ack_is_not(caplog):
    snap = snapshot(cds={"a": b"1"})
    stream = DeltaStream()
    runtime = "type.googleapis.com/envoy.service.runtime.v3.Runtime"
    with caplog.at_level("WARNING", logger="xds.server.stream"):
        for _ in range(50):
            [answer] = stream.on_request(request(runtime, ("r",)), snap)
            assert answer.type_url == runtime and answer.resources == () and answer.removed == ()
            parsed = discovery_pb2.DeltaDiscoveryResponse.FromString(answer.encode())
            assert parsed.type_url == runtime and not parsed.resources and parsed.nonce
            assert stream.on_request(request(runtime, nonce=answer.nonce), snap) == []
    assert len([r for r in caplog.records if "does not serve" in r.getMessage()]) == 1
    assert stream.types == {}


def test_a_node_longer_than_the_limit_is_refused():
    snap = snapshot(cds={"a": b"1"})
    req = request(CLUSTER)
    req.node.cluster = "c" * (MAX_NODE_FIELD + 1)
    with pytest.raises(InvalidRequest, match="node.cluster"):
        DeltaStream().on_message(req.SerializeToString(), snap)
    req.node.cluster = "c" * MAX_NODE_FIELD
    stream = DeltaStream()
    assert len(stream.on_request(req, snap)) == 1
    assert stream.node_cluster == req.node.cluster


def test_names_left_when_the_wildcard_ends_are_sent_again_by_a_later_wildcard():
    # Found by tests/unit/test_fuzz_streams.py: the listeners held from the legacy wildcard
    # stayed counted as held after it ended, went stale unseen, and the stream took itself for
    # in step with the snapshot; back on wildcard, the client was never sent them.
    first = snapshot(cds={"a": b"1", "b": b"1", "c": b"1"})
    stream = DeltaStream()
    [everything] = stream.on_request(request(CLUSTER), first)
    assert stream.on_request(request(CLUSTER, ("a",)), first) == []  # the legacy wildcard ends
    changed = snapshot(cds={"a": b"2", "b": b"2", "c": b"2"})
    [only_a] = stream.on_request(request(CLUSTER, nonce=everything.nonce), changed)
    assert names(only_a) == ["a"]
    ack(stream, only_a, changed)
    [rest] = stream.on_request(request(CLUSTER, ("*",)), changed)
    assert names(rest) == ["b", "c"]
    assert [r.version for r in rest.resources] == [
        changed.of_type(CLUSTER)[n].version for n in ("b", "c")
    ]
