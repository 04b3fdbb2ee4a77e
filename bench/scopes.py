"""Namespace scoping benchmark: what per-namespace views cost next to the mesh-wide snapshot.

N Services (`--services`, default 10,000) x 10 endpoints spread over K namespaces (`--namespaces`,
default 100), every one on HTTP port 80 (one listener and one route configuration shared by every
namespace: the case where a scope's view must rebuild them) and one in ten also on TCP port 5432;
one in twenty is exported to every namespace. In one process, no network, it prints:

- the full translation with and without scoping (what the details and salts add);
- the first view of one scope, and of all K scopes (every type derived), with the memory they hold
  (tracemalloc);
- per change, median and p90 over `--changes` changes, the translation and publish, then the work
  of bringing all K scopes' views up to date (every type derived, as the streams of each scope do
  when they look): an endpoint of one Service moved (one cluster's endpoints change), and a Service
  added then removed on port 80 (the shared listener and routes change, so every scope that sees
  it rebuilds its own).

Bounded: the changes stop at `--changes` or after `--budget` seconds each.

    python bench/scopes.py
    python bench/scopes.py --services 1000 --namespaces 10
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from xds.cache import Cache
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
from xds.resources import ADS_ORDER
from xds.scopes import EXPORT_TO_ANNOTATION, ScopeIndex
from xds.server.views import Variant, Views
from xds.translate import Translator, for_scope

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bounded, machine, quantile  # noqa: E402

ENDPOINTS = 10
HTTP = ServicePort(80, "http", 8080)
TCP = ServicePort(5432, "tcp-db", 5432)


def entry(index: int, namespaces: int, moved: int = 0) -> ServiceEntry:
    namespace = f"ns-{index % namespaces}"
    ports = (HTTP, TCP) if index % 10 == 0 else (HTTP,)
    annotations = ((EXPORT_TO_ANNOTATION, "*"),) if index % 20 == 1 else ()
    service = Service(
        namespace,
        f"svc-{index}",
        ports,
        cluster_ip=f"10.{index // 65536}.{index // 256 % 256}.{index % 256}",
        annotations=annotations,
    )
    addresses = [f"10.200.{(index * ENDPOINTS + e) // 256 % 256}.{e}" for e in range(ENDPOINTS)]
    if moved:  # the first endpoint moves to an address never used before
        addresses[0] = f"10.201.{moved // 256 % 256}.{moved % 256}"
    endpoints = tuple(Endpoint(address) for address in addresses)
    group = EndpointGroup(
        f"EndpointSlice {namespace}/svc-{index}",
        (EndpointPort(8080, "http"), EndpointPort(5432, "tcp-db")),
        endpoints,
    )
    return ServiceEntry(service, (group,))


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.2f} ms"


def spread(samples: list[float]) -> str:
    ordered = sorted(samples)
    return f"p50 {ms(statistics.median(ordered))}, p90 {ms(quantile(ordered, 0.9))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=bounded(10, 50_000), default=10_000)
    parser.add_argument("--namespaces", type=bounded(1, 1_000), default=100)
    parser.add_argument("--changes", type=bounded(1, 1_000), default=30)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per kind of change")
    args = parser.parse_args()
    services, namespaces = args.services, args.namespaces
    print(machine())
    print(f"{services:,} Services x {ENDPOINTS} endpoints over {namespaces} namespaces")
    mesh = Mesh({(e := entry(i, namespaces)).service.key: e for i in range(services)})

    settings = Settings(scope="namespace")
    mesh_wide_time = timed(lambda: Translator(Settings()).translate(mesh))
    translator = Translator(settings)
    translation = translator.translate(mesh)
    scoped_time = timed(lambda: Translator(settings).translate(mesh))
    print(f"full translation: {ms(mesh_wide_time)} mesh-wide, {ms(scoped_time)} with scoping")

    cache = Cache()
    cache.publish(translation.resources, changes=translation.resource_changes)
    index = ScopeIndex(cache.changes_since)  # as the server's views have it
    views = Views(
        lambda resource, variant: for_scope(resource, variant.scope or "", settings),
        cache.changes_since,
        lambda snapshot, serial, variant, url: index.candidates(
            snapshot, serial, url, variant.scope or ""
        ),
    )
    scopes = [Variant(None, f"ns-{n}") for n in range(namespaces)]

    def look_all() -> None:
        for variant in scopes:
            view = views.view(cache.snapshot, variant, cache.published)
            for type_url in ADS_ORDER:
                view.of_type(type_url)

    gc.collect()
    tracemalloc.start()
    first = views.view(cache.snapshot, scopes[0], cache.published)
    one = timed(lambda: [first.of_type(type_url) for type_url in ADS_ORDER])
    every = timed(look_all)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    sizes = [len(first.of_type(t)) for t in ADS_ORDER]
    print(
        f"first view: one scope {ms(one)} ({sizes[0]} clusters, {sizes[1]} assignments, "
        f"{sizes[2]} listeners, {sizes[3]} route configurations); all {namespaces} scopes "
        f"{ms(one + every)}, holding {held / 2**20:.1f} MiB"
    )

    # The same changes without scoping, for comparison.
    plain_translator, plain_cache = Translator(Settings()), Cache()
    plain = plain_translator.translate(mesh)
    plain_cache.publish(plain.resources, changes=plain.resource_changes)

    def change(apply: Callable[[int], Mesh]) -> tuple[list[float], list[float], list[float]]:
        nonlocal mesh
        publish: list[float] = []
        plain_publish: list[float] = []
        update: list[float] = []
        deadline = time.monotonic() + args.budget
        for step in range(args.changes):
            if time.monotonic() > deadline:
                break
            mesh = apply(step)
            started = time.perf_counter()
            result = plain_translator.translate(mesh)
            plain_cache.publish(result.resources, changes=result.resource_changes)
            plain_publish.append(time.perf_counter() - started)
            started = time.perf_counter()
            result = translator.translate(mesh)
            cache.publish(result.resources, changes=result.resource_changes)
            publish.append(time.perf_counter() - started)
            update.append(timed(look_all))
        return plain_publish, publish, update

    def move_endpoint(step: int) -> Mesh:
        index = (step * 7919) % services
        moved = entry(index, namespaces, moved=step + 1)
        return mesh.derive({moved.service.key: moved})

    def add_or_remove(step: int) -> Mesh:
        extra = entry(services + step // 2, namespaces)
        key: ServiceKey = extra.service.key
        return mesh.derive({key: extra if step % 2 == 0 else None})

    for what, apply in (
        ("an endpoint moved", move_endpoint),
        ("a Service added or removed on the shared port", add_or_remove),
    ):
        plain_publish, publish, update = change(apply)
        print(
            f"{what} ({len(publish)} changes): translate + publish {spread(plain_publish)} "
            f"mesh-wide, {spread(publish)} with scoping; all {namespaces} scopes' views brought "
            f"up to date {spread(update)}"
        )


if __name__ == "__main__":
    main()
