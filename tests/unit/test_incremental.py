"""A change costs what it changes, and gives exactly what a whole rebuild would.

Random sequences of changes to Services (ports of every protocol, ClusterIPs that collide, names
shared across namespaces, headless Services, bad annotations, removals) are applied to a mesh by
derivation; after each, the incremental translator must give the resources and problems of a fresh
translator on the same Services, name the resources that differ and no other, and the cache fed
those names must hold the snapshot a whole build gives, versions included.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import pytest

from xds.cache import Cache, Snapshot
from xds.config import Settings
from xds.model import (
    Endpoint,
    EndpointGroup,
    EndpointPort,
    Mesh,
    Service,
    ServiceEntry,
    ServiceKey,
    ServicePort,
)
from xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, Resource
from xds.translate import CLUSTER_PATCH_ANNOTATION, Translator

NAMESPACES = ("default", "a", "b")
NAMES = tuple(f"s{i}" for i in range(12))
PORTS = (
    ServicePort(80, "http", 8080),
    ServicePort(80, "web", 8080, app_protocol="http"),
    ServicePort(9000, "grpc", 9000, app_protocol="grpc"),
    ServicePort(5432, "tcp-db", 5432),
    ServicePort(81, "", 8081),
    ServicePort(53, "dns", 53, protocol="UDP"),
)


def random_entry(rng: random.Random, key: ServiceKey) -> ServiceEntry:
    ports = tuple(rng.sample(PORTS, rng.randint(0, 2)))
    if len({p.port for p in ports}) < len(ports):
        ports = ports[:1]
    headless = rng.random() < 0.1
    annotations: tuple[tuple[str, str], ...] = ()
    if rng.random() < 0.05:
        annotations = ((CLUSTER_PATCH_ANNOTATION, "{not json"),)
    service = Service(
        key.namespace,
        key.name,
        ports,
        # Few addresses, so that Services collide on them and claims move between them.
        cluster_ip=None if headless else f"10.0.0.{rng.randint(1, 4)}",
        headless=headless,
        annotations=annotations,
    )
    groups = tuple(
        EndpointGroup(
            f"EndpointSlice {key}-{g}",
            tuple(
                EndpointPort(p.target_port, p.name) for p in ports if isinstance(p.target_port, int)
            ),
            tuple(
                Endpoint(
                    f"127.0.{rng.randint(0, 3)}.{rng.randint(1, 250)}", ready=rng.random() < 0.9
                )
                for _ in range(rng.randint(0, 3))
            ),
        )
        for g in range(rng.randint(0, 2))
    )
    return ServiceEntry(service, groups)


def versions(resources: Mapping[str, Mapping[str, Resource]]) -> dict[str, dict[str, str]]:
    return {url: {name: r.version for name, r in items.items()} for url, items in resources.items()}


def differing(
    before: dict[str, dict[str, str]], after: dict[str, dict[str, str]]
) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for url in before.keys() | after.keys():
        old, new = before.get(url, {}), after.get(url, {})
        names = {n for n in old.keys() | new.keys() if old.get(n) != new.get(n)}
        if names:
            out[url] = names
    return out


@pytest.mark.parametrize("seed", range(6))
def test_incremental_translation_and_publish_equal_a_whole_rebuild(seed: int) -> None:
    rng = random.Random(seed)
    settings = Settings(allowed_endpoint_ranges=("127.0.0.0/8",))  # endpoints on loopback
    translator = Translator(settings)
    cache = Cache()
    keys = [ServiceKey(ns, name) for ns in NAMESPACES for name in NAMES]
    mesh = Mesh({key: random_entry(rng, key) for key in rng.sample(keys, 20)})
    first = translator.translate(mesh)
    assert first.base is None
    assert cache.publish(first.resources)
    held = versions(first.resources)
    incremental_publishes = 0
    for step in range(150):
        changes: dict[ServiceKey, ServiceEntry | None] = {}
        for key in rng.sample(keys, rng.randint(1, 4)):
            changes[key] = None if rng.random() < 0.3 else random_entry(rng, key)
        mesh = mesh.derive(changes)
        translation = translator.translate(mesh)
        whole = Translator(settings).translate(Mesh(dict(mesh.entries)))
        now = versions(translation.resources)
        assert now == versions(whole.resources), f"step {step}"
        for url, items in whole.resources.items():
            for name, resource in items.items():
                assert translation.resources[url][name].body == resource.body
        assert translation.problems == whole.problems, f"step {step}"
        # The names reported as changed are exactly those that differ from the last translation.
        reported = {url: set(names) for url, names in translation.resource_changes.items() if names}
        assert reported == differing(held, now), f"step {step}"
        held = now

        before, previous = cache.published, cache.snapshot
        published = cache.publish(translation.resources, changes=translation.resource_changes)
        rebuilt = Snapshot.build(translation.resources)
        consistent = not rebuilt.inconsistencies()
        assert published == consistent, f"step {step}"
        if published:
            incremental_publishes += 1
            assert dict(cache.snapshot.versions) == dict(rebuilt.versions), f"step {step}"
            assert versions(cache.snapshot.resources) == versions(rebuilt.resources)
            if cache.published > before:
                assert cache.changes_since(before) == {
                    url: frozenset(n)
                    for url, n in differing(
                        versions(previous.resources), versions(rebuilt.resources)
                    ).items()
                }
    assert incremental_publishes > 100


def resources(
    bodies: dict[str, dict[str, tuple[bytes, tuple[tuple[str, str], ...]]]],
) -> dict[str, dict[str, Resource]]:
    return {
        url: {
            name: Resource.from_bytes(url, name, body, refs) for name, (body, refs) in items.items()
        }
        for url, items in bodies.items()
    }


def test_a_change_that_removes_what_an_unchanged_resource_needs_is_refused() -> None:
    cache = Cache()
    good = resources(
        {
            CLUSTER: {"a": (b"1", ((ENDPOINT, "a"),)), "b": (b"1", ((ENDPOINT, "b"),))},
            ENDPOINT: {"a": (b"1", ()), "b": (b"1", ())},
        }
    )
    assert cache.publish(good)
    version = cache.snapshot.version(ENDPOINT)
    # Cluster "b" is unchanged and still needs assignment "b".
    without_b = {CLUSTER: good[CLUSTER], ENDPOINT: {"a": good[ENDPOINT]["a"]}}
    assert not cache.publish(without_b, changes={ENDPOINT: frozenset({"b"})})
    assert cache.refused == 1
    assert cache.snapshot.version(ENDPOINT) == version
    # A change that adds a reference to a missing resource is refused too.
    dangling = resources({CLUSTER: {"c": (b"1", ((ENDPOINT, "c"),))}})
    with_c = {CLUSTER: {**good[CLUSTER], **dangling[CLUSTER]}, ENDPOINT: good[ENDPOINT]}
    assert not cache.publish(with_c, changes={CLUSTER: frozenset({"c"})})
    # Removing the cluster with its assignment is consistent: changes are taken relative to the
    # last offer, and the refused offers' changes still count against the published snapshot.
    fixed = {CLUSTER: {"a": good[CLUSTER]["a"]}, ENDPOINT: {"a": good[ENDPOINT]["a"]}}
    assert cache.publish(fixed, changes={CLUSTER: frozenset({"b"})})
    assert set(cache.snapshot.of_type(ENDPOINT)) == {"a"}
    assert set(cache.snapshot.of_type(CLUSTER)) == {"a"}
    assert cache.snapshot.versions == Snapshot.build(fixed).versions


def test_a_publish_with_changes_that_change_nothing_publishes_nothing() -> None:
    cache = Cache()
    first = resources({LISTENER: {"l": (b"1", ((ROUTE, "r"),))}, ROUTE: {"r": (b"1", ())}})
    assert cache.publish(first)
    serial = cache.published
    again = resources({LISTENER: {"l": (b"1", ((ROUTE, "r"),))}, ROUTE: {"r": (b"1", ())}})
    assert cache.publish(again, changes={LISTENER: frozenset({"l"}), ROUTE: frozenset({"r"})})
    assert cache.published == serial


def test_a_translation_that_fails_half_way_is_followed_by_a_whole_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = random.Random(7)
    settings = Settings(allowed_endpoint_ranges=("127.0.0.0/8",))  # endpoints on loopback
    translator = Translator(settings)
    keys = [ServiceKey("default", name) for name in NAMES]
    mesh = Mesh({key: random_entry(rng, key) for key in keys})
    first = translator.translate(mesh)
    mesh = mesh.derive({key: random_entry(rng, key) for key in keys[:6]})
    calls = 0
    translate_service = Translator._translate_service

    def fail_on_third(self: Translator, *args: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("a bug in translation")
        return translate_service(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Translator, "_translate_service", fail_on_third)
    with pytest.raises(RuntimeError):
        translator.translate(mesh)
    again = translator.translate(mesh)
    assert again.base is None  # its changes are not relative to `first`: a publish copies all
    assert again.serial > first.serial
    whole = Translator(settings).translate(Mesh(dict(mesh.entries)))
    assert versions(again.resources) == versions(whole.resources)
