"""Prometheus metrics: what the control plane counts, in a registry of its own per instance.

The stages report through small calls (`pushed`, `replied`, `translated`, ...) so none of them
depends on prometheus_client; gauges that describe current state (connected clients, snapshot
size) are read at scrape time instead of being kept up to date.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from xds.resources import short_name
from xds.server.callbacks import AnyResponse, Callbacks, Stream

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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
        for type_name, count in sorted(Counter(map(short_name, self._subscriptions())).items()):
            clients.add_metric([type_name], count)
        yield clients
        size, counts = self._snapshot_size()
        yield GaugeMetricFamily(
            "xds_snapshot_bytes", "Serialized size of the current snapshot", value=size
        )
        resources = GaugeMetricFamily(
            "xds_snapshot_resources", "Resources in the current snapshot", labels=["type"]
        )
        for type_url, count in sorted(counts.items()):
            resources.add_metric([short_name(type_url)], count)
        yield resources


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
        return generate_latest(self.registry)
