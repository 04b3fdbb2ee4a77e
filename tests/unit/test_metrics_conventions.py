"""/metrics conventions (process and platform series, build info, no `_created`, series at 0 from
the start, refused snapshots counted) and the Grafana dashboard and ServiceMonitor in dashboards/,
checked against the exposition of a running control plane."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import xds
from xds.app import ControlPlane
from xds.cache import Cache
from xds.config import ClusterSource, Settings
from xds.metrics import TYPES, Metrics, version
from xds.resources import LISTENER, ROUTE, Resource

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "envoy" / "demo"
DASHBOARD = ROOT / "dashboards" / "xds-control-plane.json"
SERVICE_MONITOR = ROOT / "dashboards" / "servicemonitor.yaml"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


@asynccontextmanager
async def running(**settings: Any) -> AsyncIterator[tuple[ControlPlane, str]]:
    """A control plane on the demo manifests (or as told), and the URL of its health port's
    /metrics, which the ServiceMonitor scrapes."""
    plane = ControlPlane(
        Settings(
            **{"manifests": (DEMO,), **settings},
            xds_port=0,
            admin_port=0,
            health_port=0,
            allowed_endpoint_ranges=("127.0.0.0/8",),
        )
    )
    ports = await plane.start()
    try:
        yield plane, f"http://127.0.0.1:{ports.health}/metrics"
    finally:
        await plane.stop(grace_s=0)


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return await response.text()


def test_a_metrics_instance_has_the_standard_series_and_no_created_ones() -> None:
    metrics = Metrics()
    metrics.translated(0.01)
    metrics.source_error("manifests")
    metrics.relisted("services")
    text = metrics.exposition().decode()
    names = {name for name, _ in samples(text)}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= names
    assert {"process_open_fds", "process_start_time_seconds", "python_info"} <= names
    assert "python_gc_collections_total" in names
    lines = [line for line in text.splitlines() if line]
    assert not [line for line in lines if line.split("{")[0].split()[-1].endswith("_created")]
    assert not [line for line in lines if "_created" in line]
    # ... and the library's process-wide switch is left alone: another registry keeps them.
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    other = CollectorRegistry()
    Counter("other", "other", registry=other).inc()
    assert b"other_created" in generate_latest(other)


def test_build_info_names_the_version_and_python(monkeypatch: pytest.MonkeyPatch) -> None:
    found = samples(Metrics().exposition().decode())
    installed = importlib.metadata.version("xds-control-plane")
    python = platform.python_version()
    assert version() == installed
    assert value(found, "xds_build_info", version=installed, python=python) == 1.0
    [info] = [key for key in found if key[0] == "xds_build_info"]  # one series, always 1

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    # Run from a source tree without being installed: the package's own version.
    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert version() == xds.__version__


def test_refused_snapshots_are_counted() -> None:
    metrics, cache = Metrics(), Cache()
    metrics.watch_cache(lambda: cache.refused)
    assert value(samples(metrics.exposition().decode()), "xds_snapshot_refused_total") == 0.0
    listener = Resource.from_bytes(LISTENER, "http:80", b"l", refs=((ROUTE, "http:80"),))
    assert not cache.publish({LISTENER: {listener.name: listener}, ROUTE: {}})
    assert value(samples(metrics.exposition().decode()), "xds_snapshot_refused_total") == 1.0


async def test_a_control_plane_shows_every_type_at_0_and_counts_what_its_cache_refuses() -> None:
    async with running() as (plane, url):
        found = samples(await scrape(url))
        for type_name in TYPES:
            for name in ("xds_pushes_total", "xds_pushed_bytes_total", "xds_acks_total"):
                assert value(found, name, type=type_name) == 0.0, (name, type_name)
            assert value(found, "xds_nacks_total", type=type_name) == 0.0, type_name
            assert value(found, "xds_push_to_ack_seconds_count", type=type_name) == 0.0
            assert value(found, "xds_connected_clients", type=type_name) == 0.0
        assert TYPES == ("CDS", "EDS", "LDS", "RDS")
        assert value(found, "xds_source_errors_total", source="manifests") == 0.0
        assert value(found, "xds_snapshot_resources", type="RDS") is not None
        assert value(found, "xds_snapshot_refused_total") == 0.0
        python = platform.python_version()
        assert value(found, "xds_build_info", version=version(), python=python) == 1.0
        assert "_created" not in "".join(name for name, _ in found)

        # A listener naming a route that does not exist: refused, the last good snapshot kept.
        good = plane.cache.snapshot
        listener = Resource.from_bytes(LISTENER, "http:80", b"l", refs=((ROUTE, "nowhere"),))
        assert not plane.cache.publish({**good.resources, LISTENER: {listener.name: listener}})
        assert plane.cache.snapshot is good
        found = samples(await scrape(url))
        assert value(found, "xds_snapshot_refused_total") == 1.0


async def test_cluster_members_errors_start_at_0() -> None:
    clusters = (ClusterSource("east", manifests=(DEMO,)), ClusterSource("west", manifests=(DEMO,)))
    async with running(manifests=(), clusters=clusters) as (_, url):
        found = samples(await scrape(url))
    for member in ("cluster east", "cluster west"):
        assert value(found, "xds_source_errors_total", source=member) == 0.0
    assert value(found, "xds_cluster_stale_seconds", cluster="east") == 0.0


# -- the dashboard -------------------------------------------------------------------------------

_PROMQL_WORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
    | {"and", "or", "unless", "inf", "nan"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana `label_values(...)` query) reads:
    identifiers outside label matchers, ranges and strings, that are neither a function called
    nor a keyword nor a grouping's labels."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\blabel_values\s*\(\s*([A-Za-z_:][\w:]*)\s*,[^)]*\)", r"\1", expr)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        name, called = match.groups()
        if called is None and name.lower() not in _PROMQL_WORDS:
            names.add(name)
    return names


def test_metric_names_are_found_in_promql() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (type, le) "
        '(rate(a_bucket{job=~"$job"}[$__rate_interval])))'
        " / on (instance) group_left (version) b_info > bool 0 or vector(0)"
    )
    assert metric_names(expr) == {"a_bucket", "b_info"}
    assert metric_names('label_values(xds_build_info{job=~"$job"}, instance)') == {"xds_build_info"}


def _expressions(dashboard: dict[str, Any]) -> Iterator[str]:
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield query["query"] if isinstance(query, dict) else query


async def test_the_dashboard_reads_only_metrics_a_control_plane_exposes() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = list(_expressions(dashboard))
    referenced = set().union(*map(metric_names, expressions))
    # What the dashboard is for (issue 13) is on it.
    assert {
        "xds_pushes_total",
        "xds_push_to_ack_seconds_bucket",
        "xds_nacks_total",
        "xds_connected_clients",
        "xds_translation_seconds_bucket",
        "xds_snapshot_bytes",
        "xds_source_failing",
        "xds_cluster_stale_seconds",
        "xds_snapshot_refused_total",
        "xds_build_info",
    } <= referenced
    # One source, and several clusters (the stale-cluster series exist only then).
    exposed: set[str] = set()
    async with running() as (_, url):
        exposed |= {name for name, _ in samples(await scrape(url))}
    clusters = (ClusterSource("east", manifests=(DEMO,)), ClusterSource("west", manifests=(DEMO,)))
    async with running(manifests=(), clusters=clusters) as (_, url):
        exposed |= {name for name, _ in samples(await scrape(url))}
    assert sorted(referenced - exposed) == []
    # Every panel reads its data source from the variable; ids are unique.
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]


def test_the_service_monitor_scrapes_the_health_port() -> None:
    [monitor] = list(yaml.safe_load_all(SERVICE_MONITOR.read_text()))
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] == "http-metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == {"app": "xds-control-plane"}
