"""The Kubernetes API source: Services and EndpointSlices (or Endpoints) listed and watched with the
official `kubernetes` client, with informer semantics.

Each resource (per namespace, or cluster-wide) has an informer thread: list, then watch from the
list's resourceVersion with bookmarks, keeping the newest resourceVersion seen. A watch that ends
is resumed from there; a 410 Gone (expired resourceVersion) means relist, and the relist *replaces*
the informer's objects, so objects deleted meanwhile disappear and none is applied twice. Every
request has a read timeout, so a connection that goes silent without closing is noticed and
resumed. Errors back off exponentially with jitter. What the objects mean is
`xds.sources.manifests`' business: this module owns only talking to the API server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypedDict

import backoff
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from xds.model import Mesh, Problem
from xds.sources.manifests import Converted, assemble, convert_documents

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KubeSettings:
    kubeconfig: str | None = None  # None: in-cluster config
    context: str | None = None
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    # The API server ends a watch after this long; the informer then resumes it.
    watch_timeout_s: int = 300
    # No byte for this long (not even a bookmark) means the connection is dead.
    read_timeout_s: float = 330.0
    connect_timeout_s: float = 5.0
    max_backoff_s: float = 30.0


@dataclass(frozen=True)
class _Kind:
    resource: str  # plural, as in the API path
    kind: str
    api_version: str


class _WatchEvent(TypedDict):
    """An event of the client's watch stream, as read here."""

    type: str  # ADDED, MODIFIED, DELETED, BOOKMARK (or ERROR)
    raw_object: dict[str, Any]  # the object as the API server sent it, JSON-decoded


SERVICES = _Kind("services", "Service", "v1")
ENDPOINT_SLICES = _Kind("endpointslices", "EndpointSlice", "discovery.k8s.io/v1")
ENDPOINTS = _Kind("endpoints", "Endpoints", "v1")


def api_client(settings: KubeSettings) -> client.ApiClient:
    """A client for the configured cluster, found the way kubectl and controller-runtime find it.

    `--kubeconfig` (`settings.kubeconfig`); else `$KUBECONFIG`, several files joined by `:` and
    merged as kubectl merges them; else, in a pod (`$KUBERNETES_SERVICE_HOST` set), its service
    account; else `~/.kube/config`. `settings.context` picks a context of the kubeconfig-based
    ones, so it skips the in-cluster step. ValueError, one line, when nothing is usable.
    """
    # (kubeconfig, how to name it in an error); None for the pod's service account.
    candidates: list[tuple[str | None, str]] = []
    merged = os.environ.get("KUBECONFIG", "")
    home = os.path.expanduser("~/.kube/config")
    if settings.kubeconfig is not None:
        candidates.append((settings.kubeconfig, settings.kubeconfig))
    elif merged:
        # The joined string as is: the client's KubeConfigMerger splits and merges it.
        candidates.append((merged, f"KUBECONFIG={merged}"))
    else:
        if settings.context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            candidates.append((None, "the in-cluster service account"))
        if os.path.exists(home):
            candidates.append((home, home))
    if not candidates:
        missing = f"no kubeconfig (--kubeconfig, $KUBECONFIG or {home})"
        raise ValueError(
            "cannot configure the Kubernetes client: "
            + (
                f"context {settings.context} asks for a kubeconfig, and there is {missing}"
                if settings.context
                else f"{missing} and not in a pod ($KUBERNETES_SERVICE_HOST is not set)"
            )
        )
    failures = []
    for kubeconfig, origin in candidates:
        configuration = client.Configuration()
        try:
            if kubeconfig is None:
                config.load_incluster_config(client_configuration=configuration)
            else:
                config.load_kube_config(
                    config_file=kubeconfig,
                    context=settings.context,
                    client_configuration=configuration,
                )
        except (config.ConfigException, OSError) as exc:
            # As controller-runtime does, a pod whose service account fails tries ~/.kube/config.
            failures.append(f"from {origin}: {exc}")
            continue
        return client.ApiClient(configuration)
    raise ValueError(f"cannot configure the Kubernetes client {'; nor '.join(failures)}")


class Informer:
    """One resource kind in one namespace (or all): a thread keeping `objects` current."""

    def __init__(
        self,
        api: client.ApiClient,
        kind: _Kind,
        namespace: str | None,
        settings: KubeSettings,
        on_change: Callable[[Informer], None],
        on_relist: Callable[[str], None] | None = None,
    ) -> None:
        self.kind = kind
        self._on_relist = on_relist
        self.namespace = namespace
        self.settings = settings
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.resource_version = ""
        self.synced = threading.Event()
        self.lists = 0
        self.watches = 0
        self._on_change = on_change
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._watch: watch.Watch | None = None
        self._list_call = _list_function(api, kind, namespace)

    @property
    def where(self) -> str:
        return f"{self.kind.resource} in {self.namespace or 'all namespaces'}"

    def snapshot(self) -> list[tuple[tuple[str, str], dict[str, Any]]]:
        with self._lock:
            return list(self.objects.items())

    def stop(self) -> None:
        self._stop.set()
        current = self._watch
        if current is not None:
            current.stop()

    def run(self) -> None:
        delays = backoff.expo(base=2, factor=0.25, max_value=self.settings.max_backoff_s)
        next(delays)  # the generator's first value is a placeholder
        need_list = True
        while not self._stop.is_set():
            try:
                if need_list:
                    self._relist()
                    need_list = False
                self._watch_once()
                delays = backoff.expo(base=2, factor=0.25, max_value=self.settings.max_backoff_s)
                next(delays)
            except ApiException as exc:
                if exc.status == 410:
                    log.info("%s: resourceVersion expired (410 Gone), relisting", self.where)
                    need_list = True
                    continue
                self._pause(delays, f"API error {exc.status} {exc.reason}")
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                # Timeouts (a silent connection), resets, a server going away: resume the watch
                # from the last resourceVersion after a pause; a 410 then says if relisting is due.
                self._pause(delays, f"{type(exc).__name__}: {exc}")

    def _pause(self, delays: Iterator[float], why: str) -> None:
        delay = backoff.full_jitter(next(delays))
        log.warning("%s: %s; retrying in %.2fs", self.where, why, delay)
        self._stop.wait(delay)

    def _timeouts(self) -> tuple[float, float]:
        return (self.settings.connect_timeout_s, self.settings.read_timeout_s)

    def _relist(self) -> None:
        response = self._list_call(_preload_content=False, _request_timeout=self._timeouts())
        body = json.loads(response.data)
        self.lists += 1
        if self._on_relist is not None:
            self._on_relist(self.kind.resource)
        objects = {}
        for item in body.get("items") or []:
            item = self._typed(item)
            metadata = item.get("metadata") or {}
            objects[(metadata.get("namespace", ""), metadata.get("name", ""))] = item
        with self._lock:
            # A relist replaces the state: what was deleted while we were away is gone now.
            self.objects = objects
            self.resource_version = (body.get("metadata") or {}).get("resourceVersion", "")
        self.synced.set()
        self._on_change(self)

    def _watch_once(self) -> None:
        self._watch = current = watch.Watch()
        self.watches += 1
        # The helper is untyped; its events carry the type and the decoded object.
        stream: Iterator[_WatchEvent] = current.stream(
            self._list_call,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.settings.watch_timeout_s,
            _request_timeout=self._timeouts(),
        )
        for event in stream:
            if self._stop.is_set():
                return
            kind = event["type"]
            raw = event["raw_object"]
            version = ((raw or {}).get("metadata") or {}).get("resourceVersion")
            if kind == "BOOKMARK":
                if version:
                    self.resource_version = version
                continue
            item = self._typed(raw)
            metadata = item.get("metadata") or {}
            key = (metadata.get("namespace", ""), metadata.get("name", ""))
            with self._lock:
                if kind == "DELETED":
                    self.objects.pop(key, None)
                elif kind in ("ADDED", "MODIFIED"):
                    self.objects[key] = item
                if version:
                    self.resource_version = version
            self._on_change(self)

    def _typed(self, item: dict[str, Any]) -> dict[str, Any]:
        # List items come without kind and apiVersion; the converter needs them.
        return {**item, "kind": self.kind.kind, "apiVersion": self.kind.api_version}


def _list_function(api: client.ApiClient, kind: _Kind, namespace: str | None) -> Callable[..., Any]:
    """The list call of `kind` (in `namespace`, or everywhere). What it returns depends on its
    keyword arguments (a parsed list, or the raw response with `_preload_content=False`), and the
    watch helper adds its own, so its signature is left open."""
    core = client.CoreV1Api(api)
    discovery = client.DiscoveryV1Api(api)
    calls = {
        "services": (core.list_service_for_all_namespaces, core.list_namespaced_service),
        "endpoints": (core.list_endpoints_for_all_namespaces, core.list_namespaced_endpoints),
        "endpointslices": (
            discovery.list_endpoint_slice_for_all_namespaces,
            discovery.list_namespaced_endpoint_slice,
        ),
    }
    everywhere, namespaced = calls[kind.resource]
    if namespace is None:
        return everywhere

    def in_namespace(**kwargs: Any) -> Any:
        return namespaced(namespace, **kwargs)

    # The watch helper reads the wrapped function's docstring to know what it returns.
    in_namespace.__doc__ = namespaced.__doc__
    return in_namespace


def endpoint_slices_served(api: client.ApiClient) -> bool:
    """Whether the API server serves discovery.k8s.io/v1 EndpointSlices (else: Endpoints)."""
    try:
        resources = client.DiscoveryV1Api(api).get_api_resources(_request_timeout=10)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return any(r.name == "endpointslices" for r in resources.resources)


class KubeSource:
    """Services and their endpoints from the Kubernetes API, kept current by informers."""

    def __init__(
        self,
        settings: KubeSettings,
        api: client.ApiClient | None = None,
        on_relist: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self._api = api
        self._on_relist = on_relist
        self.informers: list[Informer] = []
        self._threads: list[threading.Thread] = []
        # (resource, namespace, name) -> (the API object, its conversion)
        self._converted: dict[tuple[str, str, str], tuple[dict[str, Any], Converted]] = {}
        self._mesh = Mesh()
        self._problems: list[Problem] = []
        self._logged: set[Problem] = set()
        self.synced = asyncio.Event()
        self.events = 0

    def connect(self) -> client.ApiClient:
        """Loads the client configuration once: called at start, so a missing one fails early."""
        if self._api is None:
            self._api = api_client(self.settings)
        return self._api

    def mesh(self) -> Mesh:
        return self._mesh

    def problems(self) -> list[Problem]:
        return list(self._problems)

    async def watch(self, notify: Callable[[], None]) -> None:
        """Runs the informers until cancelled; `notify` after every change once synced."""
        loop = asyncio.get_running_loop()
        api = self.connect()
        slices = await self._discover(api)
        if not slices:
            log.warning("EndpointSlices are not served here: watching Endpoints instead")
        kinds = (SERVICES, ENDPOINT_SLICES if slices else ENDPOINTS)
        namespaces: tuple[str | None, ...] = self.settings.namespaces or (None,)

        def changed(_: Informer) -> None:
            loop.call_soon_threadsafe(self._changed, notify)

        self.informers = [
            Informer(api, kind, namespace, self.settings, changed, self._on_relist)
            for kind in kinds
            for namespace in namespaces
        ]
        self._threads = [
            threading.Thread(target=i.run, name=f"informer-{i.kind.resource}", daemon=True)
            for i in self.informers
        ]
        for thread in self._threads:
            thread.start()
        try:
            await asyncio.Event().wait()
        finally:
            for informer in self.informers:
                informer.stop()

    async def _discover(self, api: client.ApiClient) -> bool:
        """Whether EndpointSlices are served, asking until the API server answers."""
        delays = backoff.expo(base=2, factor=0.25, max_value=self.settings.max_backoff_s)
        next(delays)
        while True:
            try:
                return await asyncio.to_thread(endpoint_slices_served, api)
            except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
                delay = backoff.full_jitter(next(delays))
                log.warning("API server discovery failed (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)

    def _changed(self, notify: Callable[[], None]) -> None:
        self.events += 1
        if not all(i.synced.is_set() for i in self.informers):
            return  # the first snapshot waits for every list: a partial one would remove routes
        self._rebuild_mesh()
        if not self.synced.is_set():
            self.synced.set()
        notify()

    def _rebuild_mesh(self) -> None:
        converted: dict[tuple[str, str, str], tuple[dict[str, Any], Converted]] = {}
        for informer in self.informers:
            for (namespace, name), obj in informer.snapshot():
                key = (informer.kind.resource, namespace, name)
                previous = self._converted.get(key)
                if previous is not None and previous[0] is obj:
                    converted[key] = previous  # unchanged since the last rebuild
                    continue
                location = f"{informer.kind.resource}/{namespace}/{name}"
                last = previous[1] if previous is not None else None
                converted[key] = (obj, convert_documents([obj], location, previous=last))
        self._converted = converted
        results = [result for _, result in converted.values()]
        self._mesh, assembly_problems = assemble(results)
        self._problems = [p for c in results for p in c.problems] + assembly_problems
        for problem in set(self._problems) - self._logged:
            log.log(problem.level, "%s", problem)
        self._logged = set(self._problems)
