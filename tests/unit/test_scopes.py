"""Namespace scoping (issue 10, point 3): a scoped client sees its own namespace's Services and
those exported to it, derived from the shared snapshot; clients of one scope share the bytes."""

from __future__ import annotations

import random
from typing import Any

import pytest

from tests.unit.test_translate import mesh, service
from xds._pb.envoy.config.listener.v3 import listener_pb2
from xds.cache import Cache, Snapshot
from xds.config import Settings
from xds.model import Endpoint, EndpointGroup, EndpointPort, Mesh, ServiceEntry, ServicePort
from xds.resources import ADS_ORDER, CLUSTER, ENDPOINT, LISTENER, ROUTE, Resource, decode
from xds.scopes import EXPORT_TO_ANNOTATION, ScopeIndex, parse_export_to, scope_rule
from xds.server.views import Variant, Views
from xds.translate import Translator, for_scope, translate

SCOPED = Settings(scope="namespace", allowed_endpoint_ranges=("127.0.0.0/8",))
TCP = (ServicePort(5432, "tcp-db", 5432),)


def entry(name: str, namespace: str, export_to: str | None = None, **kw: object) -> ServiceEntry:
    annotations = {EXPORT_TO_ANNOTATION: export_to} if export_to is not None else None
    port = kw.pop("ports", (ServicePort(80, "http", 8080),))
    ip = kw.pop("cluster_ip", f"10.0.{len(namespace)}.{len(name)}")
    svc = service(name, namespace, port, ip, annotations, **kw)  # type: ignore[arg-type]
    slice_ = EndpointGroup(
        f"EndpointSlice {namespace}/{name}",
        tuple(EndpointPort(p.target_port, p.name) for p in svc.ports),  # type: ignore[arg-type]
        (Endpoint(f"127.0.{len(namespace)}.{len(name)}"),),
    )
    return ServiceEntry(svc, (slice_,))


def the_mesh() -> Mesh:
    return mesh(
        entry("web", "team-a"),
        entry("db", "team-a", ports=TCP),
        entry("victim", "team-b"),
        entry("cache", "team-b", ports=TCP),
        entry("shared", "team-c", export_to="*"),
        entry("api", "team-c", export_to="team-a, ."),
    )


def scoped(snapshot: Snapshot, namespace: str) -> dict[str, dict[str, Resource]]:
    views = Views(lambda resource, variant: for_scope(resource, variant.scope or "", SCOPED))
    view = views.view(snapshot, Variant(None, namespace))
    return {url: dict(view.of_type(url)) for url in ADS_ORDER}


def hosts(resources: dict[str, dict[str, Resource]], port: int = 80) -> list[str]:
    route = resources[ROUTE].get(f"http:{port}")
    return [] if route is None else [vhost.name for vhost in decode(route).virtual_hosts]


def test_a_scope_sees_its_namespace_and_what_is_exported_to_it_and_nothing_dangles():
    snapshot = Snapshot.build(translate(the_mesh(), SCOPED).resources)
    a = scoped(snapshot, "team-a")
    assert sorted(a[CLUSTER]) == [
        "team-a/db:tcp-db",
        "team-a/web:http",
        "team-c/api:http",
        "team-c/shared:http",
    ]
    assert sorted(a[ENDPOINT]) == sorted(a[CLUSTER])
    assert hosts(a) == ["team-a/web", "team-c/api", "team-c/shared"]
    assert sorted(a[LISTENER]) == ["port:5432", "port:80"]
    b = scoped(snapshot, "team-b")
    assert sorted(b[CLUSTER]) == ["team-b/cache:tcp-db", "team-b/victim:http", "team-c/shared:http"]
    assert hosts(b) == ["team-b/victim", "team-c/shared"]
    # A namespace with no Service of its own, and a client naming none: what is exported to all.
    for namespace in ("team-z", ""):
        z = scoped(snapshot, namespace)
        assert sorted(z[CLUSTER]) == ["team-c/shared:http"] and sorted(z[LISTENER]) == ["port:80"]
    for namespace in ("team-a", "team-b", "team-c", "team-z", ""):
        assert Snapshot.build(scoped(snapshot, namespace)).inconsistencies() == []


def test_a_scoped_tcp_listener_forwards_only_to_visible_clusters():
    snapshot = Snapshot.build(translate(the_mesh(), SCOPED).resources)
    for namespace, mine, theirs in (
        ("team-a", "team-a/db:tcp-db", "team-b/cache:tcp-db"),
        ("team-b", "team-b/cache:tcp-db", "team-a/db:tcp-db"),
    ):
        listener = scoped(snapshot, namespace)[LISTENER]["port:5432"]
        assert isinstance(decode(listener), listener_pb2.Listener)
        referred = {name for _, name in listener.refs}
        assert mine in referred and theirs not in referred
        assert theirs.encode() not in listener.body
    # The mesh-wide listener of the port has both.
    everything = snapshot.of_type(LISTENER)["port:5432"]
    assert {"team-a/db:tcp-db", "team-b/cache:tcp-db"} <= {name for _, name in everything.refs}


def test_what_a_scope_sees_whole_is_the_shared_resource_and_a_scopes_view_is_shared():
    snapshot = Snapshot.build(translate(the_mesh(), SCOPED).resources)
    views = Views(lambda resource, variant: for_scope(resource, variant.scope or "", SCOPED))
    view = views.view(snapshot, Variant(None, "team-a"))
    assert views.view(snapshot, Variant(None, "team-a")) is view  # every client of the scope
    clusters = view.of_type(CLUSTER)
    assert clusters["team-a/web:http"] is snapshot.of_type(CLUSTER)["team-a/web:http"]
    # Port 5432 has a Service of another namespace: rebuilt. A port whose every Service is visible
    # is the shared listener itself.
    only_a = Snapshot.build(translate(mesh(entry("web", "team-a")), SCOPED).resources)
    shared = views.view(only_a, Variant(None, "team-a")).of_type(LISTENER)["port:80"]
    assert shared is only_a.of_type(LISTENER)["port:80"]


def test_export_to_is_validated_and_an_invalid_value_keeps_the_service_private():
    bad = entry("api", "team-c", export_to="team-a,Not_A_Namespace")
    translation = translate(mesh(bad, entry("web", "team-a")), SCOPED)
    (problem,) = [p for p in translation.problems if EXPORT_TO_ANNOTATION in p.field]
    assert problem.severity == "error" and problem.object == "Service team-c/api"
    assert "'Not_A_Namespace' is not a namespace name" in problem.message
    assert "visible to its own namespace only" in problem.message
    a = scoped(Snapshot.build(translation.resources), "team-a")
    assert "team-c/api:http" not in a[CLUSTER] and "team-a/web:http" in a[CLUSTER]
    too_long = entry("api", "team-c", export_to="a," * 600)
    (problem,) = translate(mesh(too_long), SCOPED).problems
    assert "more than the 1024 allowed" in problem.message
    assert parse_export_to(" . , team-a,*", "team-c") == frozenset({"team-a", "*"})


def test_an_export_change_reaches_the_scope_through_change_sets_alone():
    """The annotation changes nothing Envoy receives mesh-wide, but it moves the versions of the
    Service's cluster, endpoints, listener and routes: a scope's view follows with change sets."""
    translator = Translator(SCOPED)
    cache = Cache()
    first = translator.translate(the_mesh())
    cache.publish(first.resources, changes=first.resource_changes)
    rewrites: list[str] = []

    def rewrite(resource: Resource, variant: Variant) -> Resource | None:
        rewrites.append(resource.name)
        return for_scope(resource, variant.scope or "", SCOPED)

    views = Views(rewrite, cache.changes_since)
    b = Variant(None, "team-b")
    view = views.view(cache.snapshot, b, cache.published)
    assert "team-a/web:http" not in view.of_type(CLUSTER)
    before = {url: view.version(url) for url in ADS_ORDER}

    exported = the_mesh().derive({entry("web", "team-a").service.key: entry("web", "team-a", "*")})
    second = translator.translate(exported)
    assert second.translated == 1
    assert cache.publish(second.resources, changes=second.resource_changes)
    rewrites.clear()
    view = views.view(cache.snapshot, b, cache.published)
    assert "team-a/web:http" in view.of_type(CLUSTER)
    assert "team-a/web:http" in view.of_type(ENDPOINT)
    assert "team-a/web" in hosts({ROUTE: dict(view.of_type(ROUTE))})
    assert all(view.version(url) != before[url] for url in (CLUSTER, ENDPOINT, ROUTE))
    assert view.version(LISTENER) == before[LISTENER]  # team-b already had an HTTP port 80
    assert sorted(set(rewrites)) == ["http:80", "port:80", "team-a/web:http"]
    assert Snapshot.build({url: view.of_type(url) for url in ADS_ORDER}).inconsistencies() == []


def test_without_scoping_nothing_carries_a_detail_and_versions_are_unchanged():
    mesh_wide = translate(the_mesh(), Settings(allowed_endpoint_ranges=("127.0.0.0/8",)))
    for items in mesh_wide.resources.values():
        for resource in items.values():
            assert resource.detail is None
            assert (
                resource.version
                == Resource.from_bytes(resource.type_url, resource.name, resource.body).version
            )
            assert for_scope(resource, "team-a", SCOPED) is resource


@pytest.mark.parametrize(
    ("node_id", "metadata", "scope"),
    [
        ("envoy-1.team-a", {}, "team-a"),
        ("node-1", {"NAMESPACE": "team-b"}, "team-b"),
        ("sidecar~10.0.0.1~web-1.team-a~team-a.svc.cluster.local", {}, "team-a"),
        ("node-1", {}, ""),  # names none: sees only what is exported to every namespace
        ("envoy.team-a", {"NAMESPACE": "team-b"}, ""),  # claims that disagree: none
        ("node-1.xds-system", {}, None),  # a mesh-wide namespace: everything
    ],
)
def test_the_scope_of_a_node(node_id, metadata, scope):
    assert scope_rule(["xds-system"])(node_id, metadata) == scope


def test_settings_refuse_a_mesh_wide_namespace_without_namespace_scoping():
    with pytest.raises(ValueError, match="need --scope namespace"):
        Settings(mesh_wide_namespaces=("xds-system",))
    with pytest.raises(ValueError, match="scope 'tenant' is not one of mesh, namespace"):
        Settings(scope="tenant")


def test_scoped_views_followed_through_random_changes_equal_views_derived_afresh():
    """The incremental path (translator, cache change sets, the scope index, each scope's view
    carried from snapshot to snapshot) gives what a view derived from nothing (every resource
    looked at) gives, and nothing dangles."""
    rng = random.Random(10)
    namespaces = ("team-a", "team-b", "team-c")
    ports = (
        ServicePort(80, "http", 8080),
        ServicePort(5432, "tcp-db", 5432),
        ServicePort(9000, "", 9000),
    )
    exports = (None, None, "*", "team-a", "team-b,team-c", "Bad!")

    def random_entry(name: str, namespace: str) -> ServiceEntry:
        chosen = tuple(p for p in ports if rng.random() < 0.5) or ports[:1]
        ip = rng.choice((None, "10.0.0.1", f"10.0.1.{rng.randrange(8)}"))
        return entry(name, namespace, rng.choice(exports), ports=chosen, cluster_ip=ip)

    keys = [(f"s{i}", ns) for i in range(6) for ns in namespaces]
    current = mesh(*(random_entry(name, ns) for name, ns in keys[:8]))
    translator, cache = Translator(SCOPED), Cache()

    def rewrite(resource: Resource, variant: Variant) -> Resource | None:
        return for_scope(resource, variant.scope or "", SCOPED)

    index = ScopeIndex(cache.changes_since)
    followed = Views(
        rewrite,
        cache.changes_since,
        lambda snapshot, serial, variant, url: index.candidates(
            snapshot, serial, url, variant.scope or ""
        ),
    )
    for step in range(40):
        translation = translator.translate(current)
        cache.publish(translation.resources, changes=translation.resource_changes)
        for namespace in (*namespaces, ""):
            variant = Variant(None, namespace)
            if rng.random() < 0.3:
                continue  # a scope not looked at for a while catches up over several publishes
            if rng.random() < 0.1:
                followed.release(variant)  # its clients left: the next one starts from the index
            view = followed.view(cache.snapshot, variant, cache.published)
            fresh = Views(rewrite).view(cache.snapshot, variant)
            for url in ADS_ORDER:
                assert view.version(url) == fresh.version(url), (step, namespace, url)
                assert {n: r.body for n, r in view.of_type(url).items()} == {
                    n: r.body for n, r in fresh.of_type(url).items()
                }
            built = Snapshot.build({url: view.of_type(url) for url in ADS_ORDER})
            assert built.inconsistencies() == [], (step, namespace)
        changes: dict[Any, ServiceEntry | None] = {}
        for name, ns in rng.sample(keys, 3):
            key = entry(name, ns).service.key
            changes[key] = None if rng.random() < 0.25 else random_entry(name, ns)
        current = current.derive(changes)
