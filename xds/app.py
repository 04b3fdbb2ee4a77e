"""Wiring: source -> debounce -> translate -> cache -> servers, and the ordered shutdown.

This is the one place that knows every stage. Events from the source only mark the mesh dirty; a
single rebuild task coalesces bursts (a quiet period, bounded by a maximum delay) and runs
translation off the event loop so streams keep being served while it works.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, cast

import grpc
from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace import Span

from xds.admin import make_app, make_health_app, start_admin
from xds.cache import Cache
from xds.config import Settings
from xds.localities import Locality
from xds.metrics import Metrics
from xds.model import Mesh, Problem
from xds.resources import short_name
from xds.scopes import scope_rule
from xds.server.callbacks import CallbackList
from xds.server.service import DiscoveryServer, Locate, ServerLimits, start_server
from xds.server.tracing import TracingCallbacks
from xds.server.views import Scoping, for_api_type
from xds.sources.clusters import ClusterSet, Member, Watch
from xds.sources.files import ManifestSource
from xds.sources.health import SourceHealth
from xds.tls import NODE_NAME_KEY, CertificateReloader, IdentityGate, ServerTLS, log_transport
from xds.translate import Translation, Translator, for_scope

if TYPE_CHECKING:
    from xds.sources.kube import KubeSource

log = logging.getLogger(__name__)
tracer = trace.get_tracer("xds")
# A Kubernetes Node name: a DNS subdomain.
_NODE_NAME = re.compile(
    r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)


@dataclass(frozen=True)
class Ports:
    xds: int
    admin: int | None
    health: int | None = None


class ControlPlane:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        if not settings.clusters and settings.kubernetes == bool(settings.manifests):
            raise ValueError("configure exactly one source: manifests, or the Kubernetes API")
        self.metrics = Metrics()
        self.source: ManifestSource | KubeSource | ClusterSet
        if settings.clusters:
            self.source = self._cluster_set(settings)
            clusters = self.source
            self.metrics.watch_clusters(
                lambda: (clusters.names, clusters.stale(), clusters.dropped())
            )
        elif settings.kubernetes:
            self.source = self._kube_source(
                settings,
                settings.kube_context,
                SourceHealth("kubernetes", on_error=self.metrics.source_error),
            )
        else:
            self.source = ManifestSource(
                list(settings.manifests),
                health=SourceHealth("manifests", on_error=self.metrics.source_error),
            )
        health = self.source.health
        self.metrics.watch_source(
            lambda: (health.source, len(health.failing()), len(health.degradations()))
        )
        if not settings.clusters:
            self.metrics.expect_source(health.source)  # a cluster set's members: _cluster_set
        self.translator = Translator(settings)
        self.cache = Cache()
        self.tls: ServerTLS | None = None
        self.certificates: CertificateReloader | None = None
        if settings.tls_cert is not None and settings.tls_key is not None:
            self.tls = ServerTLS(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
            # Read and checked now: a missing file or a key that is not the certificate's stops
            # the start with its name, rather than failing every handshake.
            self.certificates = CertificateReloader(self.tls)
        self.server = DiscoveryServer(
            self.cache,
            per_type_rewrite=functools.partial(for_api_type, xds_cluster=settings.xds_cluster_name),
            callbacks=CallbackList(TracingCallbacks(), self.metrics),
            identity=(
                IdentityGate(settings.trust_domain) if settings.tls_client_ca is not None else None
            ),
            max_streams_per_peer=settings.max_streams_per_peer,
            locate=self._locator(),
            scoping=(
                Scoping(
                    scope_rule(settings.mesh_wide_namespaces),
                    functools.partial(for_scope, settings=settings),
                )
                if settings.scoped
                else None
            ),
        )
        self.metrics.watch_state(self.server.subscriptions, self._snapshot_size)
        cache = self.cache
        self.metrics.watch_cache(lambda: cache.refused)
        if self.certificates is not None:
            certificates, identity = self.certificates, self.server.identity
            self.metrics.watch_transport(
                lambda: (
                    certificates.reloads,
                    certificates.failures,
                    identity.refused if identity is not None else 0,
                )
            )
        self.ready = False
        self.rebuilds = 0
        self.last_translation: Translation | None = None
        self._dirty = asyncio.Event()
        self._change: Span | None = None
        self._change_events = 0
        self._logged_problems: set[Problem] = set()
        self._grpc: grpc.aio.Server | None = None
        self._admin: web.AppRunner | None = None
        self._health: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def _kube_source(
        self, settings: Settings, context: str | None, health: SourceHealth
    ) -> KubeSource:
        """The Kubernetes API of one kubeconfig context (None: the default) as a source."""
        # Imported here: the kubernetes client is slow to import and manifests don't need it.
        from xds.sources.kube import KubeSettings, KubeSource

        return KubeSource(
            KubeSettings(
                kubeconfig=settings.kubeconfig,
                context=context,
                namespaces=settings.namespaces,
                watch_timeout_s=settings.kube_watch_timeout_s,
                read_timeout_s=settings.kube_read_timeout_s,
            ),
            on_relist=self.metrics.relisted,
            health=health,
        )

    def _cluster_set(self, settings: Settings) -> ClusterSet:
        members: list[tuple[str, Member, Watch]] = []
        for cluster in settings.clusters:
            health = SourceHealth(f"cluster {cluster.name}", on_error=self.metrics.source_error)
            self.metrics.expect_source(health.source)
            if cluster.kube_context is not None:
                kube = self._kube_source(settings, cluster.kube_context, health)
                members.append((cluster.name, kube, kube.watch))
            else:
                files = ManifestSource(list(cluster.manifests), health=health)
                members.append((cluster.name, files, files.watch))
        return ClusterSet(members, stale_after_s=settings.cluster_stale_limit_s)

    def _locator(self) -> Locate | None:
        """Where a client whose node names no zone is: the topology labels of the Kubernetes Node
        its metadata NODE_NAME, or else its node id, names (node proxies are named after their
        node). Envoy's bootstrap is one ConfigMap for the whole DaemonSet, and the downward API
        gives a pod its node's name but not its labels, so the proxy cannot say its zone itself;
        the control plane reads the Node (`get` on nodes) and keeps it for a while. With several
        clusters, the client's own cluster (CLUSTER_ID) is asked first, and the cluster whose
        Node it is becomes the client's."""
        from xds.sources.kube import KubeSource

        if isinstance(self.source, KubeSource):
            kube: list[tuple[str, KubeSource]] = [("", self.source)]
        elif isinstance(self.source, ClusterSet):
            kube = [(n, m) for n, m in self.source.members if isinstance(m, KubeSource)]
        else:
            return None
        if not kube:
            return None

        async def locate(
            node_id: str, metadata: Mapping[str, Any], known: Locality | None
        ) -> Locality | None:
            name = metadata.get(NODE_NAME_KEY) or node_id
            if not isinstance(name, str) or not _NODE_NAME.fullmatch(name):
                return known
            said = known.cluster if known is not None else ""
            for cluster, source in sorted(kube, key=lambda member: member[0] != said):
                found = await asyncio.to_thread(source.node_locality, name)
                if found is not None:
                    return Locality(found[0], found[1], said or cluster)
            return known

        return locate

    def source_changed(self) -> None:
        """A source saw a change: a rebuild follows once events quiet down (or the bound hits).
        The first event of a burst opens the trace that follows the change to every client."""
        self.metrics.source_event()
        if self._change is None:
            self._change = tracer.start_span("source change")
            self._change_events = 0
        self._change_events += 1
        self._dirty.set()

    def _snapshot_size(self) -> tuple[int, dict[str, int]]:
        snapshot = self.cache.snapshot
        return snapshot.size, {t: len(items) for t, items in snapshot.resources.items()}

    def readiness(self) -> tuple[bool, list[str]]:
        """Ready once a snapshot with something to serve is published, and while the source can
        still apply changes; with why not, or what is served from last good input."""
        health = self.source.health
        unready = health.unready()
        if not self.ready:
            return False, ["nothing to serve yet (no snapshot with a Service published)", *unready]
        if unready:
            return False, [*unready, *health.degradations()]
        return True, health.degradations()

    def problems(self) -> list[Problem]:
        translation = self.last_translation.problems if self.last_translation else ()
        return [*self.source.problems(), *translation]

    async def start(self) -> Ports:
        """Loads the source and publishes the first snapshot (manifests), then opens the servers.
        The Kubernetes source syncs in the background: streams and /readyz wait for it."""
        if isinstance(self.source, ManifestSource):
            self.source.reload()
            await self.rebuild()
        elif isinstance(self.source, ClusterSet):
            members = [member for _, member in self.source.members]
            for member in members:
                if isinstance(member, ManifestSource):
                    member.reload()
                else:
                    cast("KubeSource", member).connect()
            if all(isinstance(member, ManifestSource) for member in members):
                await self.rebuild()  # Kubernetes members publish once synced, as alone
        else:
            self.source.connect()  # a missing kubeconfig is a clear error now, not a dead task
        try:
            self._grpc, xds_port = await start_server(
                self.server,
                self.settings.xds_host,
                self.settings.xds_port,
                limits=self._server_limits(),
                credentials=self.certificates.credentials() if self.certificates else None,
            )
            log_transport(self.settings.xds_host, xds_port, self.tls)
            admin_port = None
            if self.settings.admin_port is not None:
                app = make_app(
                    self.cache,
                    self.server,
                    self.readiness,
                    self.problems,
                    self.metrics,
                    debug_token=self.settings.admin_token,
                )
                self._admin, admin_port = await start_admin(
                    app, self.settings.admin_host, self.settings.admin_port
                )
            health_port = None
            if self.settings.health_port is not None:
                health = make_health_app(self.readiness, self.metrics)
                self._health, health_port = await start_admin(
                    health, self.settings.health_host, self.settings.health_port, what="health"
                )
        except OSError:
            await self.stop(grace_s=0)
            raise
        self._tasks = [
            asyncio.create_task(self.source.watch(self.source_changed), name="source-watch"),
            asyncio.create_task(self._rebuild_loop(), name="rebuild"),
        ]
        return Ports(xds_port, admin_port, health_port)

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stops intake first, then the servers, so no stream sees a half-stopped pipeline."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._grpc is not None:
            await self._grpc.stop(grace_s)
        if self._admin is not None:
            await self._admin.cleanup()
        if self._health is not None:
            await self._health.cleanup()

    async def rebuild(self) -> None:
        # The trace of this change: its source span, or a root of its own for the first load.
        change, self._change = self._change, None
        if change is None:
            change = tracer.start_span("initial snapshot")
        else:
            change.set_attribute("xds.source_events", self._change_events)
        change.end()
        parent = trace.set_span_in_context(change)
        started = time.perf_counter()
        with tracer.start_as_current_span("translate", context=parent) as span:
            # The source applies what changed since the last rebuild when asked for its mesh: after
            # the debounce and, like translation, off the event loop.
            mesh, translation = await asyncio.to_thread(self._translate)
            if span.is_recording():
                changed = [str(key) for key in translation.changed]
                span.set_attributes(
                    {
                        "xds.service_count": len(mesh),
                        "xds.services_translated": len(changed),
                        "xds.services": changed[:50],
                        "xds.namespaces": sorted({key.namespace for key in translation.changed}),
                        "xds.problem_count": len(translation.problems),
                    }
                )
        elapsed = time.perf_counter() - started
        self.metrics.translated(elapsed)
        offered, self.last_translation = self.last_translation, translation
        self._log_new_problems(translation.problems)
        # The translation's changes are relative to its base: usable when that is what was offered.
        follows = offered is not None and translation.base == offered.serial
        with tracer.start_as_current_span("publish", context=parent) as span:
            published = self.cache.publish(
                translation.resources,
                trace_context=trace.set_span_in_context(span),
                changes=translation.resource_changes if follows else None,
            )
            if span.is_recording():
                snapshot = self.cache.snapshot
                span.set_attributes(
                    {
                        "xds.published": published,
                        "xds.resource_count": sum(len(i) for i in snapshot.resources.values()),
                        "xds.bytes": snapshot.size,
                        **{f"xds.version.{short_name(t)}": v for t, v in snapshot.versions.items()},
                    }
                )
        if published and len(mesh) > 0:
            # Nothing to serve is not ready: an empty first snapshot (a directory not mounted
            # yet, a source not synced) would tell the proxies to drop everything.
            self.ready = True
        self.rebuilds += 1
        log.debug(
            "rebuild %d: %d services, %d translated afresh, %.1f ms",
            self.rebuilds,
            len(mesh),
            translation.translated,
            elapsed * 1000,
        )

    def _server_limits(self) -> ServerLimits:
        limits = ServerLimits()
        if self.settings.max_receive_bytes is not None:
            limits = replace(limits, max_receive_message_bytes=self.settings.max_receive_bytes)
        if self.settings.max_connection_age_s is not None:
            limits = replace(limits, max_connection_age_s=self.settings.max_connection_age_s)
        return limits

    def _translate(self) -> tuple[Mesh, Translation]:
        mesh = self.source.mesh()
        return mesh, self.translator.translate(mesh)

    def _log_new_problems(self, problems: tuple[Problem, ...]) -> None:
        current = set(problems)
        for problem in sorted(current - self._logged_problems, key=str):
            log.log(problem.level, "%s", problem)
        self._logged_problems = current

    async def _coalesce(self, quiet: float, longest: float) -> None:
        """Waits until no event has come for `quiet` seconds, or `longest` seconds have passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + longest
        while True:
            self._dirty.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._dirty.wait(), timeout=min(quiet, remaining))
            except TimeoutError:
                return

    async def _rebuild_loop(self) -> None:
        loop = asyncio.get_running_loop()
        quiet, longest = self.settings.debounce_quiet_s, self.settings.debounce_max_s
        last_rebuild = float("-inf")
        while True:
            await self._dirty.wait()
            # Leading edge: an event on a quiet system (nothing rebuilt for a quiet period) is
            # served at once, adding no latency; events that follow within the window are
            # coalesced into the next rebuild, within the bounded debounce.
            if loop.time() - last_rebuild < quiet:
                await self._coalesce(quiet, longest)
            self._dirty.clear()
            try:
                await self.rebuild()
            except Exception:
                # A bug in translation must not stop the control plane: the last snapshot stays.
                log.exception("rebuild failed; still serving the previous snapshot")
            last_rebuild = loop.time()


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    plane = ControlPlane(settings)
    ports = await plane.start()
    log.info("serving xDS on %s:%d", settings.xds_host, ports.xds)
    try:
        await stop.wait()
    finally:
        await plane.stop()
