"""Locality benchmark: EDS bytes and build time for 1,000 Services x 3 zones x 2 clusters.

N Services (`--services`, default 1,000), each on HTTP port 80 with E endpoints (`--endpoints`,
default 12) spread evenly over 3 zones (zone-a/b/c of region-1) x 2 Kubernetes clusters (east,
west; `Endpoint.cluster`, which translation puts in the locality's sub_zone), every Service
locality-aware (`Settings(locality_aware=True)`). In one process, no network, it prints (times
are medians: of `--repeat` repetitions for the full builds and first views, of `--changes` changes
for part 3):

1. the full translation and the EDS (and CDS) bytes of the shared snapshot, next to the same mesh
   without locality awareness: what the marking costs;
2. the first view of each of the 3 x 2 client localities (`Variant(locality=...)`, the views the
   server's streams share): the time to derive its endpoints (`of_type(ENDPOINT)`), the
   assignments it rewrote and the EDS bytes it holds; then `--clients` clients of one locality
   asking for their view, which is one view: the cost grows with localities, not clients;
3. one endpoint of one Service moved: the translation and publish (incremental, as the server
   does), then bringing all 6 views up to date (`Views.view` on the new snapshot, then
   `of_type(ENDPOINT)`), with how many assignments each view rewrote (1 expected).

Every loop is bounded by its count (`--repeat`, `--clients`, `--changes`).

The rewrite is the server's for a locality-only variant (`DiscoveryServer._rewrite`: no scope, no
per-type API, so `xds.localities.for_locality` alone), wrapped to count its calls per locality.

    python bench/localities.py
    python bench/localities.py --services 10000 --repeat 5 --changes 20
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from xds.cache import Cache
from xds.config import Settings
from xds.localities import Locality, LocalityAware, for_locality
from xds.model import (
    Endpoint,
    EndpointGroup,
    EndpointPort,
    Mesh,
    Service,
    ServiceEntry,
    ServicePort,
)
from xds.resources import CLUSTER, ENDPOINT, Resource, decode
from xds.server.views import Variant, Views
from xds.translate import Translation, Translator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bounded, machine  # noqa: E402

REGION = "region-1"
ZONES = ("zone-a", "zone-b", "zone-c")
CLUSTERS = ("east", "west")
HTTP = ServicePort(80, "http", 8080)
NAMESPACES = 20
LOCALITIES = tuple(Locality(REGION, zone, cluster) for cluster in CLUSTERS for zone in ZONES)

T = TypeVar("T")


def entry(index: int, endpoints: int, moved: int = 0) -> ServiceEntry:
    """Service `index`: endpoint e in cluster e % 2 and zone (e // 2) % 3, so 12 endpoints are 2
    per zone per cluster; `moved` gives the first endpoint an address never used before."""
    namespace, name = f"ns-{index % NAMESPACES}", f"svc-{index}"
    service = Service(
        namespace, name, (HTTP,), cluster_ip=f"10.96.{index // 256 % 256}.{index % 256}"
    )
    addresses = [f"10.{1 + index // 256 % 200}.{index % 256}.{e + 1}" for e in range(endpoints)]
    if moved:
        addresses[0] = f"10.250.{moved // 256 % 256}.{moved % 256}"
    group = EndpointGroup(
        f"EndpointSlice {namespace}/{name}",
        (EndpointPort(8080, "http"),),
        tuple(
            Endpoint(
                address,
                region=REGION,
                zone=ZONES[e // len(CLUSTERS) % len(ZONES)],
                cluster=CLUSTERS[e % len(CLUSTERS)],
            )
            for e, address in enumerate(addresses)
        ),
    )
    return ServiceEntry(service, (group,))


def timed(action: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.2f}"


def type_bytes(resources: Mapping[str, Resource]) -> int:
    return sum(len(resource.any_bytes) for resource in resources.values())


def translation_name(entry: ServiceEntry) -> str:
    """The cluster (and assignment) name of a Service's HTTP port."""
    return f"{entry.service.key}:{HTTP.label}"


def label(locality: Locality) -> str:
    return f"{locality.zone}/{locality.cluster}"


class CountingRewrite:
    """The server's rewrite for a locality-only variant, counting its calls per locality (every
    call is an assignment the view looked at again) and those that gave a resource of its own."""

    def __init__(self) -> None:
        self.calls: Counter[Locality | None] = Counter()
        self.rewritten: Counter[Locality | None] = Counter()

    def __call__(self, resource: Resource, variant: Variant) -> Resource | None:
        self.calls[variant.locality] += 1
        if variant.locality is None:
            return resource
        shown = for_locality(resource, variant.locality)
        if shown is not resource:
            self.rewritten[variant.locality] += 1
        return shown

    def reset(self) -> None:
        self.calls.clear()
        self.rewritten.clear()


def look(views: Views, cache: Cache, variant: Variant) -> Mapping[str, Resource]:
    """What a client of `variant` does when it sends its endpoints: its view of the current
    snapshot, derived for ENDPOINT."""
    return views.view(cache.snapshot, variant, cache.published).of_type(ENDPOINT)


def publish_with(translator: Translator, cache: Cache, mesh: Mesh) -> Translation:
    """The server's rebuild: an incremental translation published with its changes."""
    translation = translator.translate(mesh)
    assert cache.publish(translation.resources, changes=translation.resource_changes)
    return translation


def row(what: str, seconds: list[float]) -> str:
    return f"  {what:<42}{ms(statistics.median(seconds)):>10}"


def translate_and_publish(settings: Settings, mesh: Mesh) -> tuple[Translator, Cache]:
    translator, cache = Translator(settings), Cache()
    translation = translator.translate(mesh)
    assert cache.publish(translation.resources, changes=translation.resource_changes)
    return translator, cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=bounded(10, 50_000), default=1_000)
    parser.add_argument(
        "--endpoints", type=bounded(6, 240), default=12, help="per Service, over 3 zones x 2"
    )
    parser.add_argument("--repeat", type=bounded(1, 50), default=3)
    parser.add_argument("--clients", type=bounded(1, 100_000), default=1_000)
    parser.add_argument(
        "--changes", type=bounded(1, 1_000), default=10, help="endpoint moves timed (part 3)"
    )
    args = parser.parse_args()
    services, endpoints, repeat = args.services, args.endpoints, args.repeat

    print(machine())
    print(
        f"{services:,} Services x {endpoints} endpoints over {len(ZONES)} zones ({REGION}) x "
        f"{len(CLUSTERS)} clusters ({', '.join(CLUSTERS)}); {len(LOCALITIES)} client localities, "
        f"{args.clients:,} clients of one; median of {repeat} (full builds, first views), "
        f"{args.changes} changes"
    )
    mesh = Mesh({(e := entry(i, endpoints)).service.key: e for i in range(services)})
    aware, plain = Settings(locality_aware=True), Settings()

    # 1. Full translation, with and without locality awareness: a first, untimed translation of
    # each warms up, then the two alternate, so that neither pays for the other's garbage.
    configurations = {"locality_aware=False": plain, "locality_aware=True": aware}
    for settings in configurations.values():
        Translator(settings).translate(mesh)
    full: dict[str, list[float]] = {name: [] for name in configurations}
    for _ in range(repeat):
        for name, settings in configurations.items():
            gc.collect()
            full[name].append(timed(lambda s=settings: Translator(s).translate(mesh))[0])
    # Built after the timing, which holds nothing else (a bigger heap slows the collector).
    caches = {
        name: translate_and_publish(settings, mesh)[1] for name, settings in configurations.items()
    }
    print()
    print(f"{'full translation':<28}{'ms':>10}{'EDS bytes':>14}{'CDS bytes':>14}")
    for name, settings in configurations.items():
        snapshot = caches[name].snapshot
        assignments = snapshot.of_type(ENDPOINT)
        marked = sum(isinstance(r.detail, LocalityAware) for r in assignments.values())
        assert marked == (len(assignments) if settings.locality_aware else 0), marked
        print(
            f"  {name:<26}{ms(statistics.median(full[name])):>10}{type_bytes(assignments):>14,}"
            f"{type_bytes(snapshot.of_type(CLUSTER)):>14,}"
        )
    del caches

    # 2. The first view of each client locality, and many clients of one.
    translator, cache = translate_and_publish(aware, mesh)
    shared = cache.snapshot.of_type(ENDPOINT)
    rewrite = CountingRewrite()
    variants = [Variant(locality=locality) for locality in LOCALITIES]
    first: dict[Locality, list[float]] = {locality: [] for locality in LOCALITIES}
    totals: list[float] = []
    views = Views(rewrite, cache.changes_since)
    for _ in range(repeat):
        views = Views(rewrite, cache.changes_since)  # a fresh start: every view is a first
        rewrite.reset()
        gc.collect()
        total = 0.0
        for variant in variants:
            seconds, _ = timed(lambda v=variant, w=views: look(w, cache, v))
            assert variant.locality is not None
            first[variant.locality].append(seconds)
            total += seconds
        totals.append(total)

    # What the 6 first views hold (tracemalloc: a fresh set of views of its own, not timed).
    gc.collect()
    tracemalloc.start()
    held_views = Views(CountingRewrite(), cache.changes_since)
    for variant in variants:
        look(held_views, cache, variant)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del held_views

    print()
    print(
        f"{'first view (ENDPOINT)':<28}{'ms':>10}{'rewrite calls':>15}{'own':>7}"
        f"{'EDS bytes':>14}{'priorities':>12}"
    )
    for variant in variants:
        locality = variant.locality
        assert locality is not None
        mapping = look(views, cache, variant)
        own = sum(mapping[name] is not shared[name] for name in mapping)
        sample = decode(mapping[next(iter(mapping))])
        levels = sorted({e.priority for e in sample.endpoints})  # type: ignore[attr-defined]
        print(
            f"  {label(locality):<26}{ms(statistics.median(first[locality])):>10}"
            f"{rewrite.calls[locality]:>15,}{own:>7,}{type_bytes(mapping):>14,}"
            f"{'0-' + str(levels[-1]):>12}"
        )
    print(
        f"  {'all ' + str(len(variants)):<26}{ms(statistics.median(totals)):>10}"
        f"{sum(rewrite.calls.values()):>15,}{'':>7}"
        f"{sum(type_bytes(look(views, cache, v)) for v in variants):>14,}"
    )
    print(
        f"  (shared snapshot: {len(shared):,} assignments, {type_bytes(shared):,} EDS bytes; the "
        f"{len(variants)} views hold {held / 2**20:.1f} MiB, tracemalloc)"
    )

    # Many clients of one locality: one view, derived once.
    one = variants[0]
    assert one.locality is not None
    the_view = views.view(cache.snapshot, one, cache.published)
    rewrite.reset()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        for _client in range(args.clients):
            variant = Variant(locality=Locality(*one.locality))  # equal, not the same object
            view = views.view(cache.snapshot, variant, cache.published)
            view.of_type(ENDPOINT)
            assert view is the_view
        samples.append(time.perf_counter() - started)
    seconds = statistics.median(samples)
    print(
        f"  {args.clients:,} clients of {label(one.locality)}: 1 view, {ms(seconds)} ms in all "
        f"({seconds / args.clients * 1e6:.2f} us each), {sum(rewrite.calls.values())} rewrite calls"
    )

    # 3. One endpoint of one Service moved: translate + publish, then the 6 views up to date.
    plain_translator, plain_cache = translate_and_publish(plain, mesh)
    pairs = ((plain_translator, plain_cache), (translator, cache))
    publish: tuple[list[float], list[float]] = ([], [])
    update: list[float] = []
    calls_per_view: Counter[tuple[int, ...]] = Counter()
    changed: Counter[tuple[int, int]] = Counter()
    for variant in variants:  # every view up to date before the first change
        look(views, cache, variant)
    for step in range(args.changes):
        index = step * 7919 % services  # a different Service each time (7919 is prime)
        moved = entry(index, endpoints, moved=step + 1)
        mesh = mesh.derive({moved.service.key: moved})
        translation = None
        for which in (0, 1) if step % 2 == 0 else (1, 0):  # alternating: neither always first
            gc.collect()
            pair = pairs[which]
            seconds, result = timed(lambda m=mesh, p=pair: publish_with(*p, m))
            publish[which].append(seconds)
            if which == 1:
                translation = result
        assert translation is not None
        changes = translation.resource_changes
        changed[(len(changes.get(ENDPOINT, ())), len(changes.get(CLUSTER, ())))] += 1
        rewrite.reset()
        gc.collect()
        update.append(timed(lambda w=views: [look(w, cache, v) for v in variants])[0])
        calls_per_view[tuple(rewrite.calls[v.locality] for v in variants)] += 1
        for variant in variants:  # the view now shows the moved endpoint, at its priority
            shown = decode(look(views, cache, variant)[translation_name(moved)])
            addresses = {
                lb.endpoint.address.socket_address.address
                for e in shown.endpoints  # type: ignore[attr-defined]
                for lb in e.lb_endpoints
            }
            assert moved.groups[0].endpoints[0].address in addresses

    print()
    print(f"{f'one endpoint moved (median of {len(update)})':<44}{'ms':>10}")
    print(row("translate + publish, locality_aware=False", publish[0]))
    print(row("translate + publish, locality_aware=True", publish[1]))
    print(row(f"all {len(variants)} views up to date", update))
    print(
        "  changed per change (assignments, clusters): "
        + ", ".join(f"{key} x{count}" for key, count in sorted(changed.items()))
    )
    print(
        f"  rewrite calls per view ({', '.join(label(locality) for locality in LOCALITIES)}): "
        + ", ".join(f"{list(key)} x{count}" for key, count in sorted(calls_per_view.items()))
    )


if __name__ == "__main__":
    main()
