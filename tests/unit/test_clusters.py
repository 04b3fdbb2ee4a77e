"""Several clusters as one mesh: namespace sameness, endpoints in their cluster's locality,
disagreements reported and resolved by order, a failing cluster's endpoints kept, then dropped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests import factories
from xds.config import Settings
from xds.localities import Locality, for_locality
from xds.model import Mesh, Problem, ServiceKey
from xds.resources import ENDPOINT, decode
from xds.sources.clusters import ClusterSet
from xds.sources.files import ManifestSource
from xds.sources.health import PartState, SourceHealth
from xds.translate import Translator

WEB = ServiceKey("shop", "web")


def documents(addresses: list[str], zone: str, port: int = 80, **spec: Any) -> list[dict[str, Any]]:
    return [
        factories.service("web", port, "shop", **spec),
        factories.endpoint_slice(
            "web", addresses, namespace="shop", name="web-1", zones=dict.fromkeys(addresses, zone)
        ),
    ]


def write(directory: Path, docs: list[dict[str, Any]]) -> None:
    directory.mkdir(exist_ok=True)
    factories.write_manifests(directory / "web.yaml", *docs)


def two_clusters(tmp_path: Path) -> tuple[ClusterSet, dict[str, ManifestSource]]:
    write(tmp_path / "east", documents(["10.1.0.1", "10.1.0.2"], "east-a"))
    write(tmp_path / "west", documents(["10.2.0.1"], "west-a"))
    sources = {name: ManifestSource([tmp_path / name]) for name in ("east", "west")}
    for source in sources.values():
        source.reload()
    members = [(name, source, source.watch) for name, source in sources.items()]
    return ClusterSet(members), sources


def test_a_service_of_both_clusters_is_one_with_every_endpoint_in_its_cluster(tmp_path: Path):
    clusters, _ = two_clusters(tmp_path)
    mesh = clusters.mesh()
    entry = mesh.get(WEB)
    assert entry is not None and len(mesh) == 1
    endpoints = {(e.address, e.cluster) for g in entry.groups for e in g.endpoints}
    assert endpoints == {("10.1.0.1", "east"), ("10.1.0.2", "east"), ("10.2.0.1", "west")}
    assert {g.source for g in entry.groups} == {
        "EndpointSlice shop/web-1 (cluster east)",
        "EndpointSlice shop/web-1 (cluster west)",
    }
    assert clusters.problems() == []
    # Translated: one locality per cluster and zone, the cluster in its sub-zone; an east client
    # gets east first.
    out = Translator(Settings(locality_aware=True)).translate(mesh)
    assignment = out.resources[ENDPOINT]["shop/web:http"]
    localities = {(e.locality.sub_zone, e.locality.zone) for e in decode(assignment).endpoints}  # type: ignore[attr-defined]
    assert localities == {("east", "east-a"), ("west", "west-a")}
    shown = decode(for_locality(assignment, Locality(cluster="east")))
    assert {e.locality.sub_zone: e.priority for e in shown.endpoints} == {  # type: ignore[attr-defined]
        "east": 0,
        "west": 1,
    }


def test_a_change_in_one_cluster_joins_only_what_changed(tmp_path: Path):
    clusters, sources = two_clusters(tmp_path)
    first = clusters.mesh()
    assert clusters.mesh() is first  # nothing changed: the same mesh
    write(tmp_path / "west", documents(["10.2.0.1", "10.2.0.9"], "west-a"))
    sources["west"].reload()
    second = clusters.mesh()
    assert second.parent == first.generation and second.changed == frozenset({WEB})
    entry = second.get(WEB)
    assert entry is not None
    assert sum(len(g.endpoints) for g in entry.groups) == 4


def test_differing_definitions_are_reported_and_the_first_cluster_defines(tmp_path: Path):
    write(tmp_path / "east", documents(["10.1.0.1"], "east-a", port=80))
    write(tmp_path / "west", documents(["10.2.0.1"], "west-a", port=8080, clusterIP="10.96.0.9"))
    sources = {name: ManifestSource([tmp_path / name]) for name in ("east", "west")}
    for source in sources.values():
        source.reload()
    clusters = ClusterSet([(name, s, s.watch) for name, s in sources.items()])
    entry = clusters.mesh().get(WEB)
    assert entry is not None and entry.service.ports[0].port == 80
    [problem] = clusters.problems()
    assert (problem.severity, problem.object, problem.field) == (
        "warning",
        "Service shop/web",
        "spec",
    )
    assert "east and west: ports" in problem.message  # not the ClusterIP: each cluster's own
    assert "served as cluster east defines it" in problem.message


class FakeMember:
    """A cluster source whose failure the test decides."""

    def __init__(self, mesh: Mesh) -> None:
        self.current = mesh
        self.health = SourceHealth("cluster west", unready_after=1)

    def mesh(self) -> Mesh:
        return self.current

    def problems(self) -> list[Problem]:
        return self.health.problems()

    async def watch(self, notify: object) -> None:  # pragma: no cover - not run here
        return None


def test_a_failing_cluster_keeps_its_endpoints_until_the_limit_then_they_come_back(
    tmp_path: Path,
):
    write(tmp_path / "east", documents(["10.1.0.1"], "east-a"))
    east = ManifestSource([tmp_path / "east"])
    east.reload()
    write(tmp_path / "west", documents(["10.2.0.1"], "west-a"))
    loaded = ManifestSource([tmp_path / "west"])
    loaded.reload()
    west = FakeMember(loaded.mesh())
    now = [1000.0]
    clusters = ClusterSet(
        [("east", east, east.watch), ("west", west, west.watch)],
        stale_after_s=60,
        clock=lambda: now[0],
    )

    def addresses() -> set[str]:
        entry = clusters.mesh().get(WEB)
        assert entry is not None
        return {e.address for g in entry.groups for e in g.endpoints}

    assert addresses() == {"10.1.0.1", "10.2.0.1"}
    west.health.failed("informer endpointslices", "connection refused")
    assert addresses() == {"10.1.0.1", "10.2.0.1"}  # still served
    now[0] += 30
    [stale] = [p for p in clusters.problems() if p.object == "cluster west"]
    assert stale.severity == "warning" and "failed for 30 s" in stale.message
    assert clusters.stale() == {"west": 30.0}
    assert clusters.health.unready() == []  # east still works: ready, degraded
    assert any("cluster west" in d for d in clusters.health.degradations())
    now[0] += 31
    assert addresses() == {"10.1.0.1"}
    assert clusters.dropped() == ["west"]
    [dropped] = [p for p in clusters.problems() if p.object == "cluster west"]
    assert dropped.severity == "error" and "no longer served" in dropped.message
    west.health.recovered("informer endpointslices")
    assert addresses() == {"10.1.0.1", "10.2.0.1"}
    assert clusters.dropped() == [] and clusters.stale() == {}


def test_every_cluster_failing_is_unready():
    members = []
    for name in ("east", "west"):
        member = FakeMember(Mesh())
        member.health.failed("informer services", "refused")
        members.append((name, member, member.watch))
    clusters = ClusterSet(members)
    assert len(clusters.health.unready()) == 2
    assert [s.part for s in clusters.health.failing()] == [
        "east/informer services",
        "west/informer services",
    ]
    assert isinstance(clusters.health.failing()[0], PartState)


def test_stale_and_dropped_clusters_are_metrics():
    from xds.metrics import Metrics

    metrics = Metrics()
    metrics.watch_clusters(lambda: (["east", "west"], {"west": 42.0}, ["west"]))
    text = metrics.exposition().decode()
    assert 'xds_cluster_stale_seconds{cluster="east"} 0.0' in text
    assert 'xds_cluster_stale_seconds{cluster="west"} 42.0' in text
    assert 'xds_cluster_dropped{cluster="east"} 0.0' in text
    assert 'xds_cluster_dropped{cluster="west"} 1.0' in text
