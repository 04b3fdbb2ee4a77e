"""The state-of-the-world stream state machine, driven by hand-made requests and snapshots."""

from __future__ import annotations

import pytest

from xds._pb.envoy.service.discovery.v3 import discovery_pb2
from xds.cache import Snapshot
from xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, Resource
from xds.server.sotw import Response, SotwStream
from xds.server.stream import MAX_NACK_MESSAGE, MAX_NODE_FIELD, InvalidRequest


def snapshot(**by_type: dict[str, bytes]) -> Snapshot:
    urls = {"cds": CLUSTER, "eds": ENDPOINT, "lds": LISTENER, "rds": ROUTE}
    return Snapshot.build(
        {
            urls[short]: {
                name: Resource.from_bytes(urls[short], name, body) for name, body in items.items()
            }
            for short, items in by_type.items()
        }
    )


def request(
    type_url: str,
    names: tuple[str, ...] = (),
    version: str = "",
    nonce: str = "",
    error: str | None = None,
    node_id: str = "",
) -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(
        type_url=type_url, resource_names=names, version_info=version, response_nonce=nonce
    )
    if error is not None:
        req.error_detail.message = error
    if node_id:
        req.node.id = node_id
    return req


def names(response: Response) -> list[str]:
    return [r.name for r in response.resources]


def ack(stream: SotwStream, response: Response, snap: Snapshot, names_: tuple[str, ...] = ()):
    return stream.on_request(
        request(response.type_url, names_, response.version, response.nonce), snap
    )


def test_legacy_wildcard_cds_gets_every_cluster_and_the_type_version():
    snap = snapshot(cds={"a": b"1", "b": b"2"})
    stream = SotwStream()
    [response] = stream.on_request(request(CLUSTER, node_id="n1"), snap)
    assert names(response) == ["a", "b"]
    assert response.version == snap.version(CLUSTER)
    assert stream.node_id == "n1"


def test_encoded_response_parses_as_a_discovery_response():
    snap = snapshot(cds={"a": b""})
    [response] = SotwStream().on_request(request(CLUSTER), snap)
    parsed = discovery_pb2.DiscoveryResponse.FromString(response.encode())
    assert parsed.version_info == response.version
    assert parsed.nonce == response.nonce
    assert parsed.type_url == CLUSTER
    assert [r.type_url for r in parsed.resources] == [CLUSTER]
    assert parsed.control_plane.identifier


def test_ack_then_unchanged_snapshot_sends_nothing_and_a_change_sends_again():
    snap = snapshot(cds={"a": b"1"})
    stream = SotwStream()
    [first] = stream.on_request(request(CLUSTER), snap)
    assert ack(stream, first, snap) == []
    assert stream.types[CLUSTER].acked_version == first.version
    assert stream.on_snapshot(snap) == []
    changed = snapshot(cds={"a": b"2"})
    [second] = stream.on_snapshot(changed)
    assert second.version == changed.version(CLUSTER) != first.version
    assert second.nonce != first.nonce


def test_nack_is_recorded_and_the_rejected_version_is_not_sent_again():
    snap = snapshot(cds={"a": b"bad"})
    stream = SotwStream()
    [response] = stream.on_request(request(CLUSTER), snap)
    replies = stream.on_request(
        request(CLUSTER, version="", nonce=response.nonce, error="invalid cluster a"), snap
    )
    assert replies == []
    nack = stream.types[CLUSTER].rejections.nack
    assert nack is not None and nack.message == "invalid cluster a"
    assert nack.version == response.version
    assert stream.on_snapshot(snap) == []
    [fixed] = stream.on_snapshot(snapshot(cds={"a": b"good"}))
    ack(stream, fixed, snap)
    assert stream.types[CLUSTER].rejections.nack is None
    assert stream.types[CLUSTER].rejections.count == 1


def test_eds_sends_only_subscribed_names_and_answers_names_not_yet_known():
    snap = snapshot(eds={"a": b"1", "b": b"2"})
    stream = SotwStream()
    [response] = stream.on_request(request(ENDPOINT, ("a", "later")), snap)
    # A cluster asks for "later": until its endpoints exist, they are none (not withheld).
    assert names(response) == ["a", "later"]
    assert response.resources[1].body == b"\x0a\x05later"
    ack(stream, response, snap, ("a", "later"))
    [update] = stream.on_snapshot(snapshot(eds={"a": b"1", "b": b"2", "later": b"3"}))
    # Only what changed: the client keeps "a", which the response leaves out.
    assert names(update) == ["later"]
    assert update.resources[0].body == b"3"


def test_one_endpoint_change_sends_one_assignment_to_a_stream_subscribed_to_a_thousand():
    everything = {f"ns/svc-{i}:http": b"v1" for i in range(1000)}
    snap = snapshot(eds=everything)
    stream = SotwStream()
    subscribed = tuple(sorted(everything))
    [first] = stream.on_request(request(ENDPOINT, subscribed), snap)
    assert len(first.resources) == 1000
    assert ack(stream, first, snap, subscribed) == []
    state = stream.types[ENDPOINT]
    assert state.accepted is state.sent  # an ACK copies nothing, whatever the subscription
    changed = snapshot(eds={**everything, "ns/svc-500:http": b"v2"})
    [update] = stream.on_snapshot(changed)
    assert names(update) == ["ns/svc-500:http"]
    assert update.version == changed.version(ENDPOINT) != first.version
    assert ack(stream, update, changed, subscribed) == []
    # A publish that touches no subscribed name sends nothing.
    assert (
        stream.on_snapshot(snapshot(eds={**everything, "ns/svc-500:http": b"v2", "x": b""})) == []
    )
    # A new subscription is answered whole: every subscribed name, the new one included.
    more = (*subscribed, "ns/new:http")
    [whole] = stream.on_request(request(ENDPOINT, more, update.version, update.nonce), changed)
    assert len(whole.resources) == 1001


def test_routes_after_a_change_carry_only_the_changed_route_configuration():
    snap = snapshot(rds={"http:80": b"a", "http:81": b"b"})
    stream = SotwStream()
    [first] = stream.on_request(request(ROUTE, ("http:80", "http:81")), snap)
    ack(stream, first, snap, ("http:80", "http:81"))
    [update] = stream.on_snapshot(snapshot(rds={"http:80": b"a", "http:81": b"c"}))
    assert names(update) == ["http:81"]


def test_unrelated_eds_change_does_not_wake_a_subscriber():
    snap = snapshot(eds={"a": b"1", "b": b"2"})
    stream = SotwStream()
    [response] = stream.on_request(request(ENDPOINT, ("a",)), snap)
    ack(stream, response, snap, ("a",))
    assert stream.on_snapshot(snapshot(eds={"a": b"1", "b": b"changed"})) == []


def test_at_most_one_unacked_response_per_type_and_changes_are_merged():
    stream = SotwStream()
    [first] = stream.on_request(request(CLUSTER), snapshot(cds={"a": b"1"}))
    assert stream.on_snapshot(snapshot(cds={"a": b"2"})) == []
    latest = snapshot(cds={"a": b"3", "b": b"1"})
    assert stream.on_snapshot(latest) == []
    [merged] = ack(stream, first, latest)
    assert merged.version == latest.version(CLUSTER)
    assert names(merged) == ["a", "b"]


def test_stale_nonce_is_ignored_unless_the_subscription_changes():
    snap = snapshot(eds={"a": b"1", "b": b"2"})
    stream = SotwStream()
    [first] = stream.on_request(request(ENDPOINT, ("a",)), snap)
    ack(stream, first, snap, ("a",))
    [second] = stream.on_snapshot(snapshot(eds={"a": b"9", "b": b"2"}))
    newer = snapshot(eds={"a": b"9", "b": b"2"})
    # A request answering the first response, arriving after the second was sent: stale.
    assert stream.on_request(request(ENDPOINT, ("a",), first.version, first.nonce), newer) == []
    # The same stale nonce with a new name: the subscription is honoured once the pending
    # response is acknowledged.
    assert stream.on_request(request(ENDPOINT, ("a", "b"), first.version, first.nonce), newer) == []
    [answer] = ack(stream, second, newer, ("a", "b"))
    assert names(answer) == ["a", "b"]


def test_an_ack_naming_a_version_never_sent_is_stale_not_recorded():
    snap = snapshot(cds={"a": b"1"})
    stream = SotwStream()
    [first] = stream.on_request(request(CLUSTER), snap)
    state = stream.types[CLUSTER]
    # The right nonce with a version the server never sent: not an ACK.
    assert stream.on_request(request(CLUSTER, version="never-sent", nonce=first.nonce), snap) == []
    assert state.awaiting_ack and state.acked_version == "" and state.acks == 0
    # The same as bytes, which an ACK repeating its names takes a path of its own for.
    raw = request(CLUSTER, version="never-sent", nonce=first.nonce).SerializeToString()
    assert stream.on_message(raw, snap) == []
    assert state.awaiting_ack and state.acked_version == "" and state.acks == 0
    # A stale ACK with new names still changes the subscription (the legacy wildcard ends).
    assert stream.on_request(request(CLUSTER, ("a",), "never-sent", first.nonce), snap) == []
    assert not state.sub.wildcard and state.sub.names == {"a"}
    # The real ACK is recorded, and the subscription change answered.
    [again] = ack(stream, first, snap, ("a",))
    assert state.acked_version == first.version and state.acks == 1
    assert names(again) == ["a"]


def test_a_nack_may_name_any_version():
    snap = snapshot(cds={"a": b"1"})
    stream = SotwStream()
    [first] = stream.on_request(request(CLUSTER), snap)
    # A NACK carries the version the client still runs (here: none), not the one rejected.
    stream.on_request(request(CLUSTER, version="", nonce=first.nonce, error="bad"), snap)
    assert stream.types[CLUSTER].rejections.count == 1
    assert not stream.types[CLUSTER].awaiting_ack


def test_an_unknown_type_is_answered_empty_once_per_request_and_logged_once(caplog):
    snap = snapshot(cds={"a": b"1"})
    stream = SotwStream(types=(CLUSTER,))
    secret = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    with caplog.at_level("WARNING", logger="xds.server.stream"):
        for _ in range(100):
            [answer] = stream.on_request(request(secret, ("s",)), snap)
            assert answer.type_url == secret and answer.resources == () and answer.version == ""
            parsed = discovery_pb2.DiscoveryResponse.FromString(answer.encode())
            assert parsed.type_url == secret and not parsed.resources and parsed.nonce
            # The client's ACK of that answer ends the exchange.
            assert stream.on_request(request(secret, ("s",), "", answer.nonce), snap) == []
        # A type served by ADS but not by this (per-type) service is unknown here too.
        [other] = stream.on_request(request(ENDPOINT, ("a",)), snap)
        assert other.type_url == ENDPOINT and other.resources == ()
    assert len([r for r in caplog.records if "does not serve" in r.getMessage()]) == 1
    assert stream.unknown_requests == 201
    assert stream.types == {}  # nothing kept of them
    # Known types are unaffected, and nonces stay unique across both.
    [cds] = stream.on_request(request(CLUSTER), snap)
    assert names(cds) == ["a"] and cds.nonce not in {answer.nonce, other.nonce}


def test_a_huge_unknown_type_url_is_logged_bounded(caplog):
    stream = SotwStream()
    with caplog.at_level("WARNING", logger="xds.server.stream"):
        stream.on_request(request("x" * 1_000_000), snapshot(cds={}))
    [record] = caplog.records
    assert len(record.getMessage()) < 1_000


def test_first_request_with_a_version_from_another_server_is_answered():
    snap = snapshot(cds={"a": b"1"})
    stream = SotwStream()
    [response] = stream.on_request(
        request(CLUSTER, version=snap.version(CLUSTER), nonce="77"), snap
    )
    assert names(response) == ["a"]


def test_snapshot_responses_go_in_ads_order():
    first = snapshot(cds={"c": b"1"}, eds={"c": b"1"}, lds={"l": b"1"}, rds={"r": b"1"})
    stream = SotwStream()
    for type_url, subscribed in (
        (ROUTE, ("r",)),
        (LISTENER, ()),
        (ENDPOINT, ("c",)),
        (CLUSTER, ()),
    ):
        [response] = stream.on_request(request(type_url, subscribed), first)
        ack(stream, response, first, subscribed)
    second = snapshot(cds={"c": b"2"}, eds={"c": b"2"}, lds={"l": b"2"}, rds={"r": b"2"})
    assert [r.type_url for r in stream.on_snapshot(second)] == [CLUSTER, ENDPOINT, LISTENER, ROUTE]


def test_removed_cluster_stays_until_the_routes_moving_away_from_it_are_acked():
    before = snapshot(cds={"old": b"1"}, rds={"r": b"to-old"})
    stream = SotwStream()
    [cds] = stream.on_request(request(CLUSTER), before)
    ack(stream, cds, before)
    [rds] = stream.on_request(request(ROUTE, ("r",)), before)
    ack(stream, rds, before, ("r",))

    after = snapshot(cds={"new": b"1"}, rds={"r": b"to-new"})
    cds_union, rds_new = stream.on_snapshot(after)
    assert names(cds_union) == ["new", "old"]
    assert rds_new.type_url == ROUTE
    assert ack(stream, cds_union, after) == []  # routes not acked yet: "old" must stay
    [cds_final] = ack(stream, rds_new, after, ("r",))
    assert cds_final.type_url == CLUSTER
    assert names(cds_final) == ["new"]
    assert cds_final.version == after.version(CLUSTER)


def test_explicit_wildcard_and_legacy_wildcard_ends_with_first_explicit_name():
    snap = snapshot(lds={"a": b"1", "b": b"2"})
    stream = SotwStream()
    [response] = stream.on_request(request(LISTENER, ("*",)), snap)
    assert names(response) == ["a", "b"]
    other = SotwStream()
    [legacy] = other.on_request(request(LISTENER), snap)
    [explicit] = other.on_request(request(LISTENER, ("a",), legacy.version, legacy.nonce), snap)
    assert names(explicit) == ["a"]


def run_client(stream: SotwStream, snap: Snapshot, first: list[Response], bad: set[bytes]):
    """Plays a client that rejects any response holding a resource body in `bad`; returns the
    responses it saw, in order."""
    seen, queue = [], list(first)
    while queue:
        response = queue.pop(0)
        seen.append(response)
        rejected = any(r.body in bad for r in response.resources)
        reply = request(
            response.type_url,
            version="" if rejected else response.version,
            nonce=response.nonce,
            error="bad resource" if rejected else None,
        )
        queue += stream.on_request(reply, snap)
    return seen


def test_one_bad_resource_among_many_changes_is_isolated_and_the_rest_delivered():
    start = snapshot(cds={"a": b"a1", "b": b"b1", "c": b"c1"})
    stream = SotwStream()
    run_client(stream, start, stream.on_request(request(CLUSTER), start), bad=set())
    changed = snapshot(cds={"a": b"a2", "b": b"BAD", "c": b"c2", "d": b"d1"})
    run_client(stream, changed, stream.on_snapshot(changed), bad={b"BAD"})
    state = stream.types[CLUSTER]
    accepted = {name: r.body for name, r in state.accepted.items()}
    assert accepted == {"a": b"a2", "b": b"b1", "c": b"c2", "d": b"d1"}
    assert state.rejections.quarantine == {"b": changed.of_type(CLUSTER)["b"].version}
    assert state.rejections.nack is not None
    assert stream.describe()["types"]["CDS"]["rejected_resources"]
    # Later changes still flow; the rejected version is never offered again.
    later = snapshot(cds={"a": b"a3", "b": b"BAD", "c": b"c2", "d": b"d1"})
    seen = run_client(stream, later, stream.on_snapshot(later), bad={b"BAD"})
    assert [[r.body for r in s.resources] for s in seen] == [[b"a3", b"b1", b"c2", b"d1"]]
    # Fixing the resource releases it and clears the NACK.
    fixed = snapshot(cds={"a": b"a3", "b": b"b2", "c": b"c2", "d": b"d1"})
    run_client(stream, fixed, stream.on_snapshot(fixed), bad={b"BAD"})
    assert state.accepted["b"].body == b"b2"
    assert not state.rejections.quarantine and state.rejections.nack is None


def test_a_node_id_or_cluster_longer_than_the_limit_is_refused():
    snap = snapshot(cds={"a": b"1"})
    at_limit = "n" * MAX_NODE_FIELD
    stream = SotwStream()
    req = request(CLUSTER)
    req.node.id, req.node.cluster = at_limit, at_limit
    [response] = stream.on_request(req, snap)
    assert stream.node_id == at_limit and stream.node_cluster == at_limit
    assert stream.describe()["node_id"] == at_limit
    for field in ("id", "cluster"):
        req = request(CLUSTER)
        setattr(req.node, field, "n" * (MAX_NODE_FIELD + 1))
        with pytest.raises(InvalidRequest, match=f"node.{field} has {MAX_NODE_FIELD + 1}"):
            SotwStream().on_message(req.SerializeToString(), snap)
    # The limit is the server's to choose.
    big = request(CLUSTER, node_id="n" * 5000)
    assert len(SotwStream(max_node_field=5000).on_request(big, snap)) == 1
    with pytest.raises(InvalidRequest):
        SotwStream(max_node_field=10).on_request(request(CLUSTER, node_id="n" * 11), snap)


def test_a_nack_message_is_kept_and_reported_bounded():
    snap = snapshot(cds={"a": b"bad"})
    replies: list[str | None] = []
    stream = SotwStream(on_reply=lambda _type, message, _seconds: replies.append(message))
    [response] = stream.on_request(request(CLUSTER), snap)
    huge = "e" * 1_000_000
    stream.on_request(request(CLUSTER, nonce=response.nonce, error=huge), snap)
    nack = stream.describe()["types"]["CDS"]["last_nack"]
    assert nack is not None
    assert nack["message"].startswith("e" * MAX_NACK_MESSAGE)
    assert len(nack["message"]) < MAX_NACK_MESSAGE + 100
    assert nack["message"].endswith(f"({1_000_000 - MAX_NACK_MESSAGE} more characters)")
    assert replies == [nack["message"]]
