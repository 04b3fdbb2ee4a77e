"""Prometheus metrics: what the control plane counts, in a registry of its own per instance.

The stages report through small calls (`pushed`, `replied`, `translated`, ...) so none of them
depends on prometheus_client; gauges that describe current state (connected clients, snapshot
size) are read at scrape time instead of being kept up to date.

Conventions: the standard `process_*` and `python_*` series (prometheus_client's process, platform
and GC collectors, in this registry only); `xds_build_info{version,python} 1`; every series
labelled by xDS type exists from the start for CDS, EDS, LDS and RDS, at 0, so a dashboard shows 0
rather than nothing; no `_created` series (dropped when exposed: the library's own switch,
`disable_created_metrics()` or PROMETHEUS_DISABLE_CREATED_SERIES, is process-wide).
"""

from __future__ import annotations

import importlib.metadata
import platform
from collections import Counter
from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

import xds
from xds.resources import ADS_ORDER, SNAPSHOT_TYPES, short_name
from xds.server.callbacks import AnyResponse, Callbacks, Stream

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The types a client subscribes to and is pushed, as labelled: every per-type series starts at 0
# for each of them. (API listeners are Listeners on the wire, counted as LDS.)
TYPES: tuple[str, ...] = tuple(short_name(type_url) for type_url in ADS_ORDER)
# Series the OpenMetrics model adds to counters, histograms and summaries; never read here.
_CREATED_TYPES = frozenset({"counter", "histogram", "summary", "gaugehistogram"})


def version() -> str:
    """The installed distribution's version; the package's own when it is not installed (run from
    a source tree)."""
    try:
        return importlib.metadata.version("xds-control-plane")
    except importlib.metadata.PackageNotFoundError:
        return xds.__version__


class _BuildInfo(Collector):
    """`xds_build_info{version,python} 1`: which build runs, to join on or to count replicas by."""

    def __init__(self) -> None:
        family = GaugeMetricFamily(
            "xds_build_info",
            "The running control plane's version and Python version (always 1)",
            labels=["version", "python"],
        )
        family.add_metric([version(), platform.python_version()], 1)
        self._families = [family]

    def collect(self) -> Iterable[Metric]:
        return self._families


class _WithoutCreated(Collector):
    """The registry's families without their `_created` samples, for this registry alone."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():
            if family.type not in _CREATED_TYPES:
                yield family
                continue
            created = family.name + "_created"
            # A copy: some collectors hand out the same family objects on every scrape.
            kept = Metric(family.name, family.documentation, family.type, family.unit)
            kept.samples = [sample for sample in family.samples if sample.name != created]
            yield kept


class _State(Collector):
    """Gauges read when scraped: connected clients by type, snapshot size and resource counts."""

    def __init__(
        self,
        subscriptions: Callable[[], Iterable[str]],
        snapshot_size: Callable[[], tuple[int, dict[str, int]]],
    ) -> None:
        self._subscriptions = subscriptions
        self._snapshot_size = snapshot_size

    def collect(self) -> Iterable[GaugeMetricFamily]:
        clients = GaugeMetricFamily(
            "xds_connected_clients", "Streams subscribed to each resource type", labels=["type"]
        )
        subscribed = Counter(dict.fromkeys(TYPES, 0))
        subscribed.update(map(short_name, self._subscriptions()))
        for type_name, count in sorted(subscribed.items()):
            clients.add_metric([type_name], count)
        yield clients
        size, counts = self._snapshot_size()
        yield GaugeMetricFamily(
            "xds_snapshot_bytes", "Serialized size of the current snapshot", value=size
        )
        resources = GaugeMetricFamily(
            "xds_snapshot_resources", "Resources in the current snapshot", labels=["type"]
        )
        held = {short_name(type_url): 0 for type_url in SNAPSHOT_TYPES}
        held.update((short_name(type_url), count) for type_url, count in counts.items())
        for type_name, count in sorted(held.items()):
            resources.add_metric([type_name], count)
        yield resources


class _CacheState(Collector):
    """The cache's refusals, read when scraped."""

    def __init__(self, refused: Callable[[], int]) -> None:
        self._refused = refused

    def collect(self) -> Iterable[CounterMetricFamily]:
        yield CounterMetricFamily(
            "xds_snapshot_refused",
            "Snapshots the cache refused (a reference to a missing resource); the last good one"
            " stays served",
            value=self._refused(),
        )


class _SourceState(Collector):
    """Gauges read when scraped: the source's failing and degraded parts."""

    def __init__(self, health: Callable[[], tuple[str, int, int]]) -> None:
        self._health = health

    def collect(self) -> Iterable[GaugeMetricFamily]:
        source, failing, degraded = self._health()
        failing_family = GaugeMetricFamily(
            "xds_source_failing",
            "Parts of the source failing now (retried with backoff)",
            labels=["source"],
        )
        failing_family.add_metric([source], failing)
        yield failing_family
        degraded_family = GaugeMetricFamily(
            "xds_source_degraded",
            "Inputs unavailable, whose last good content is served (a configured path gone)",
            labels=["source"],
        )
        degraded_family.add_metric([source], degraded)
        yield degraded_family


class _ClusterState(Collector):
    """Gauges read when scraped: per cluster, how long its source has been failing (0 when it
    works) and whether its endpoints are dropped for it."""

    def __init__(self, clusters: Callable[[], tuple[list[str], dict[str, float], list[str]]]):
        self._clusters = clusters

    def collect(self) -> Iterable[GaugeMetricFamily]:
        names, stale, dropped = self._clusters()
        stale_family = GaugeMetricFamily(
            "xds_cluster_stale_seconds",
            "How long a cluster's source has failed, its last endpoints served meanwhile (0: ok)",
            labels=["cluster"],
        )
        dropped_family = GaugeMetricFamily(
            "xds_cluster_dropped",
            "1 when a cluster's endpoints are no longer served (failing past the stale limit)",
            labels=["cluster"],
        )
        for name in names:
            stale_family.add_metric([name], stale.get(name, 0.0))
            dropped_family.add_metric([name], 1.0 if name in dropped else 0.0)
        yield stale_family
        yield dropped_family


class _TransportState(Collector):
    """Counters kept by the TLS objects, read when scraped."""

    def __init__(self, counts: Callable[[], tuple[int, int, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[CounterMetricFamily]:
        reloads, failures, refusals = self._counts()
        yield CounterMetricFamily(
            "xds_tls_certificate_reloads",
            "Server certificates read again from disk after a change and used",
            value=reloads,
        )
        yield CounterMetricFamily(
            "xds_tls_certificate_reload_failures",
            "Certificate changes not used (unreadable, or a key that is not the certificate's)",
            value=failures,
        )
        yield CounterMetricFamily(
            "xds_identity_refusals",
            "Streams refused because their node is not their client certificate's",
            value=refusals,
        )


class Metrics(Callbacks):
    """The control plane's Prometheus metrics; the discovery server reports to it as callbacks."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(_BuildInfo())
        self._exposed = _WithoutCreated(self.registry)
        by_type = ["type"]
        self._pushes = PromCounter("xds_pushes", "Responses sent", by_type, registry=self.registry)
        self._bytes = PromCounter(
            "xds_pushed_bytes", "Bytes of responses sent", by_type, registry=self.registry
        )
        self._acks = PromCounter("xds_acks", "ACKs received", by_type, registry=self.registry)
        self._nacks = PromCounter("xds_nacks", "NACKs received", by_type, registry=self.registry)
        self._convergence = Histogram(
            "xds_push_to_ack_seconds",
            "From a response sent to its ACK or NACK",
            by_type,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self._translation = Histogram(
            "xds_translation_seconds",
            "Time to translate the mesh and build a snapshot",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self._source_events = PromCounter(
            "xds_source_events", "Changes seen by the source", registry=self.registry
        )
        self._source_errors = PromCounter(
            "xds_source_errors",
            "Failures a source survived and retried (a watch loop, a list, a read)",
            ["source"],
            registry=self.registry,
        )
        self._relists = PromCounter(
            "xds_source_relists",
            "Full lists of the Kubernetes API (the first, and after each 410 Gone)",
            ["resource"],
            registry=self.registry,
        )
        for type_name in TYPES:
            for counter in (self._pushes, self._bytes, self._acks, self._nacks):
                counter.labels(type_name)
            self._convergence.labels(type_name)

    def expect_source(self, source: str) -> None:
        """`source` may report errors (`source_error`): its error count shows 0 until then."""
        self._source_errors.labels(source)

    def watch_cache(self, refused: Callable[[], int]) -> None:
        """`refused()` gives how many snapshots the cache refused so far, read at scrape time."""
        self.registry.register(_CacheState(refused))

    def watch_state(
        self,
        subscriptions: Callable[[], Iterable[str]],
        snapshot_size: Callable[[], tuple[int, dict[str, int]]],
    ) -> None:
        self.registry.register(_State(subscriptions, snapshot_size))

    # -- what the stages report -----------------------------------------------------------

    def pushed(
        self,
        stream_id: int,
        stream: Stream,
        response: AnyResponse,
        size: int,
        trace_context: object,
    ) -> None:
        self._pushes.labels(short_name(response.type_url)).inc()
        self._bytes.labels(short_name(response.type_url)).inc(size)

    def replied(
        self, stream_id: int, type_url: str, error_message: str | None, seconds: float
    ) -> None:
        (self._acks if error_message is None else self._nacks).labels(short_name(type_url)).inc()
        self._convergence.labels(short_name(type_url)).observe(seconds)

    def translated(self, seconds: float) -> None:
        self._translation.observe(seconds)

    def source_event(self) -> None:
        self._source_events.inc()

    def source_error(self, source: str) -> None:
        self._source_errors.labels(source).inc()

    def watch_source(self, health: Callable[[], tuple[str, int, int]]) -> None:
        """`health()` gives the source's name, how many of its parts are failing and how many
        serve their last good input (a configured path gone), read at scrape time."""
        self.registry.register(_SourceState(health))

    def watch_clusters(
        self, clusters: Callable[[], tuple[list[str], dict[str, float], list[str]]]
    ) -> None:
        """`clusters()` gives the clusters' names, how long each failing one has failed and which
        are dropped, read at scrape time (with several clusters only)."""
        self.registry.register(_ClusterState(clusters))

    def watch_transport(self, counts: Callable[[], tuple[int, int, int]]) -> None:
        """`counts()` gives certificate reloads, reload failures and identity refusals so far,
        read at scrape time (with TLS only)."""
        self.registry.register(_TransportState(counts))

    def relisted(self, resource: str) -> None:
        self._relists.labels(resource).inc()

    def exposition(self) -> bytes:
        return generate_latest(self._exposed)
