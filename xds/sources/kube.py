"""The Kubernetes API source: Services and EndpointSlices (or Endpoints) listed and watched with the
official `kubernetes` client, with informer semantics.

Each resource (per namespace, or cluster-wide) has an informer thread: list, then watch from the
list's resourceVersion with bookmarks, keeping the newest resourceVersion seen. A watch that ends
is resumed from there; a 410 Gone (expired resourceVersion) means relist, and the relist *replaces*
the informer's objects, so objects deleted meanwhile disappear and none is applied twice. Every
request has a read timeout, so a connection that goes silent without closing is noticed and
resumed. Errors back off exponentially with jitter. What the objects mean is
`xds.sources.manifests`' business: this module owns only talking to the API server.

An informer never dies: any exception in its loop (a malformed watch line or list body, a bug) is
logged, counted in the source's health (`xds.sources.health`) and followed by a relist after the
backoff, since a stream that carried something unreadable may have lost an event. What an informer
served before stays served meanwhile; one that keeps failing makes the control plane unready.

Informers report which objects changed (a relist: those whose resourceVersion differs, and those
gone); the source only records them and wakes the event loop. The objects are converted and joined
into the mesh when `mesh()` is asked for, after the control plane's debounce and in its worker
thread, and only the recorded ones: a change costs what it touched, on no thread the loop waits for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

import backoff
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from xds.errors import ConfigError
from xds.model import EndpointGroup, Mesh, Problem, ServiceEntry, ServiceKey
from xds.sources.health import SourceHealth
from xds.sources.manifests import Assembly, Converted, convert_documents

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


# The part of the source's health that converting reports as.
_CONVERTING = "converting"

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
        raise ConfigError(
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
    raise ConfigError(f"cannot configure the Kubernetes client {'; nor '.join(failures)}")


# An object's (namespace, name).
_Key = tuple[str, str]


class Informer:
    """One resource kind in one namespace (or all): a thread keeping `objects` current.

    `on_change(informer, keys, listed)` is called from the informer's thread after each change
    with the keys of the objects that changed; `listed` is True after a list, which replaces the
    objects (the keys are then every one that differs from before).
    """

    def __init__(
        self,
        api: client.ApiClient,
        kind: _Kind,
        namespace: str | None,
        settings: KubeSettings,
        on_change: Callable[[Informer, Collection[_Key], bool], None],
        on_relist: Callable[[str], None] | None = None,
        health: SourceHealth | None = None,
    ) -> None:
        self.kind = kind
        self.health = health if health is not None else SourceHealth("kubernetes")
        self._on_relist = on_relist
        self.namespace = namespace
        self.settings = settings
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.resource_version = ""
        self.synced = threading.Event()
        self.lists = 0
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

    def get(self, key: _Key) -> dict[str, Any] | None:
        """The object at `key` (namespace, name) now, or None."""
        with self._lock:
            return self.objects.get(key)

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
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                # Timeouts (a silent connection), resets, a server going away: resume the watch
                # from the last resourceVersion after a pause; a 410 then says if relisting is due.
                self._pause(delays, f"{type(exc).__name__}: {exc}")
            except Exception as exc:
                # Something unreadable (a malformed watch line or list body) or a bug: the watch
                # may have lost an event, so list again after a pause. Never the end of the thread.
                need_list = True
                if isinstance(exc, Malformed):
                    why = str(exc)
                elif self._stop.is_set():
                    return
                else:
                    log.exception("%s: unexpected failure", self.where)
                    why = f"{type(exc).__name__}: {exc}"
                self._pause(delays, f"{why}; relisting")

    def _pause(self, delays: Iterator[float], why: str) -> None:
        if self._stop.is_set():
            return  # stopping: the failure is the connection being torn down, not news
        self.health.failed(self.where, why)
        delay = backoff.full_jitter(next(delays))
        log.warning("%s: %s; retrying in %.2fs", self.where, why, delay)
        self._stop.wait(delay)

    def _timeouts(self) -> tuple[float, float]:
        return (self.settings.connect_timeout_s, self.settings.read_timeout_s)

    def _relist(self) -> None:
        response = self._list_call(_preload_content=False, _request_timeout=self._timeouts())
        try:
            body = json.loads(response.data)
        except (ValueError, RecursionError) as exc:
            raise Malformed(f"the list is not JSON ({type(exc).__name__}: {exc})") from None
        items = _list_items(body, self.kind)
        self.lists += 1
        if self._on_relist is not None:
            self._on_relist(self.kind.resource)
        with self._lock:
            before = self.objects
        objects: dict[_Key, dict[str, Any]] = {}
        changed: list[_Key] = []
        for item in items:
            metadata = item.get("metadata") or {}
            key = (metadata.get("namespace", ""), metadata.get("name", ""))
            old = before.get(key)
            version = metadata.get("resourceVersion")
            if old is not None and version and _version(old) == version:
                # Unchanged while we were away: the same object, so nothing downstream redoes it.
                objects[key] = old
                continue
            objects[key] = self._typed(item)
            changed.append(key)
        changed.extend(key for key in before if key not in objects)
        with self._lock:
            # A relist replaces the state: what was deleted while we were away is gone now.
            self.objects = objects
            self.resource_version = (body.get("metadata") or {}).get("resourceVersion", "")
        self.synced.set()
        self.health.recovered(self.where)
        self._on_change(self, changed, True)

    def _watch_once(self) -> None:
        self._watch = current = watch.Watch()
        # The helper is untyped; its events should carry the type and the decoded object, and are
        # checked to (a line that is not JSON comes as None, any JSON as it is).
        stream: Iterator[object] = current.stream(
            self._list_call,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.settings.watch_timeout_s,
            _request_timeout=self._timeouts(),
        )
        for event in stream:
            if self._stop.is_set():
                return
            kind, raw = _watch_event(event, self.kind)
            version = (raw.get("metadata") or {}).get("resourceVersion")
            self.health.recovered(self.where)
            if kind == "BOOKMARK":
                if isinstance(version, str) and version:
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
                if isinstance(version, str) and version:
                    self.resource_version = version
            self._on_change(self, (key,), False)

    def _typed(self, item: dict[str, Any]) -> dict[str, Any]:
        # List items come without kind and apiVersion; the converter needs them.
        return {**item, "kind": self.kind.kind, "apiVersion": self.kind.api_version}


class Malformed(Exception):
    """The API server (or what stands between) sent something that is not what it promises."""


_EVENT_TYPES = frozenset({"ADDED", "MODIFIED", "DELETED", "BOOKMARK"})


def _list_items(body: object, kind: _Kind) -> list[dict[str, Any]]:
    """The items of a list body, each checked to be an object with a name: a body that is not a
    list of such is refused whole, since a relist replaces every object the informer has."""
    if not isinstance(body, dict):
        raise Malformed(f"the list is a JSON {type(body).__name__}, not a {kind.kind}List")
    items = body.get("items")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise Malformed(f"the list's items are a JSON {type(items).__name__}, not a list")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise Malformed("the list's metadata is not an object")
    for index, item in enumerate(items):
        _check_object(item, f"item {index} of the list")
    return items


def _check_object(obj: object, what: str) -> None:
    if not isinstance(obj, dict):
        raise Malformed(f"{what} is a JSON {type(obj).__name__}, not an object")
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        raise Malformed(f"{what} has no metadata object")
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        raise Malformed(f"{what} has no metadata.name")
    namespace = metadata.get("namespace", "")
    if not isinstance(namespace, str):
        raise Malformed(f"{what} has a metadata.namespace that is not a string")


def _watch_event(event: object, kind: _Kind) -> tuple[str, dict[str, Any]]:
    """An event of the watch stream as (type, object), or Malformed. (The client's helper yields
    None for a line that is not JSON, and passes on whatever JSON it was.)"""
    if not isinstance(event, dict):
        raise Malformed(f"a watch line is not a JSON event ({type(event).__name__})")
    kind_name = event.get("type")
    raw = event.get("raw_object")
    if kind_name == "ERROR":
        message = raw.get("message") if isinstance(raw, dict) else raw
        raise Malformed(f"the watch sent an error: {str(message)[:200]}")
    if kind_name not in _EVENT_TYPES:
        raise Malformed(f"a watch event has type {str(kind_name)[:40]!r}")
    if kind_name == "BOOKMARK":
        if not isinstance(raw, dict):
            raise Malformed("a BOOKMARK event carries no object")
        return kind_name, raw
    _check_object(raw, f"a {kind_name} {kind.kind} event's object")
    assert isinstance(raw, dict)
    return kind_name, raw


def _version(obj: dict[str, Any]) -> object:
    return (obj.get("metadata") or {}).get("resourceVersion")


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


def service_addresses(
    settings: KubeSettings, namespace: str, service: str, port_name: str
) -> list[str]:
    """HOST:PORT of every ready endpoint of a Service's named port, from its EndpointSlices: how
    `xds status --kubernetes-service` finds every replica of the control plane. ConfigError when
    the client cannot be configured, OSError when the API refuses or cannot be reached."""
    api = client.DiscoveryV1Api(api_client(settings))
    try:
        slices = api.list_namespaced_endpoint_slice(
            namespace,
            label_selector=f"kubernetes.io/service-name={service}",
            _request_timeout=(settings.connect_timeout_s, 10.0),
        )
    except ApiException as exc:
        raise OSError(
            f"cannot list the EndpointSlices of Service {namespace}/{service}: "
            f"{exc.status} {exc.reason}"
        ) from None
    except urllib3.exceptions.HTTPError as exc:
        raise OSError(f"cannot reach the Kubernetes API: {exc}") from None
    found: list[str] = []
    for endpoint_slice in slices.items:
        ports = [p.port for p in endpoint_slice.ports or () if p.name == port_name and p.port]
        for endpoint in endpoint_slice.endpoints or ():
            ready = endpoint.conditions is None or endpoint.conditions.ready is not False
            if not ready:
                continue
            for address in endpoint.addresses or ():
                host = f"[{address}]" if ":" in address else address
                found.extend(f"{host}:{port}" for port in ports)
    return sorted(set(found))


# The well-known topology labels of a Node.
REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
# How long a Node's zone is kept, how many are, and how long reading one may take.
NODE_LOCALITY_TTL_S = 300.0
NODES_KEPT = 10_000
NODE_READ_TIMEOUT_S = 5.0
# Past this many Nodes not known, they are all read with one list.
NODES_READ_ONE_BY_ONE = 16


def _topology(node: Any) -> tuple[str, str] | None:
    """A Node's (region, zone) from its topology labels; None when it has neither."""
    labels = (node.metadata.labels if node.metadata else None) or {}
    region = labels.get(REGION_LABEL, "")
    zone = labels.get(ZONE_LABEL, "")
    return (region, zone) if region or zone else None


class KubeSource:
    """Services and their endpoints from the Kubernetes API, kept current by informers."""

    def __init__(
        self,
        settings: KubeSettings,
        api: client.ApiClient | None = None,
        on_relist: Callable[[str], None] | None = None,
        health: SourceHealth | None = None,
    ) -> None:
        self.settings = settings
        # What goes wrong in the informers and in converting, survived and retried.
        self.health = health if health is not None else SourceHealth("kubernetes")
        # Set while watch() runs: asks for a rebuild after a pause, when converting failed.
        self._retry: Callable[[], None] | None = None
        self._api = api
        self._on_relist = on_relist
        self.informers: list[Informer] = []
        self._threads: list[threading.Thread] = []
        # Held while objects are converted and joined (mesh(), from any thread).
        self._lock = threading.Lock()
        # (resource, namespace, name) -> (the API object, its conversion)
        self._converted: dict[tuple[str, str, str], tuple[dict[str, Any], Converted]] = {}
        self._assembly = Assembly()
        # The problems of the objects that have some, by location.
        self._object_problems: dict[str, tuple[Problem, ...]] = {}
        # What problems() answers: replaced whole, so a reader without the lock sees one state.
        self._problems: tuple[Problem, ...] = ()
        self._logged: set[Problem] = set()
        # The objects informers reported changed and mesh() has not converted yet, and the
        # informers that have listed: their own lock, held only to add or take, because informer
        # threads and the event loop must not wait while mesh() converts.
        self._pending: dict[tuple[str, str, str], Informer] = {}
        self._listed: set[Informer] = set()
        self._pending_lock = threading.Lock()
        self.synced = asyncio.Event()
        self.events = 0
        # Objects converted: what changes cost (tests, metrics).
        self.converted_objects = 0
        # The assembly's mesh last given regions, and the mesh with them (see _with_regions).
        self._regions: tuple[Mesh | None, Mesh] = (None, Mesh())
        # Node name -> (when read, its (region, zone) or None): see node_locality.
        self._nodes: dict[str, tuple[float, tuple[str, str] | None]] = {}
        self._nodes_lock = threading.Lock()
        self._node_failures_logged: set[object] = set()

    def node_locality(self, name: str) -> tuple[str, str] | None:
        """The (region, zone) of the Node named so, from its topology labels; None when it has
        neither, does not exist or cannot be read (`get` on nodes is missing, the API is down).
        Blocking: call it off the event loop. Kept for NODE_LOCALITY_TTL_S, since zones do not
        move, and bounded in number."""
        now = time.monotonic()
        with self._nodes_lock:
            cached = self._nodes.get(name)
            if cached is not None and now - cached[0] < NODE_LOCALITY_TTL_S:
                return cached[1]
        found: tuple[str, str] | None = None
        try:
            node = client.CoreV1Api(self.connect()).read_node(
                name, _request_timeout=NODE_READ_TIMEOUT_S
            )
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            self._node_read_failed(exc)
        else:
            found = _topology(node)
        with self._nodes_lock:
            if len(self._nodes) >= NODES_KEPT:
                self._nodes.clear()  # a bound on memory: read again on demand
            self._nodes[name] = (now, found)
        return found

    def prefetch_nodes(self, names: Collection[str]) -> None:
        """Reads every Node at once (`list`) when more than a few of these are not known: a
        first mesh of a big cluster names hundreds of nodes, one request each otherwise."""
        now = time.monotonic()
        with self._nodes_lock:
            unknown = [
                n
                for n in names
                if n not in self._nodes or now - self._nodes[n][0] >= NODE_LOCALITY_TTL_S
            ]
        if len(unknown) <= NODES_READ_ONE_BY_ONE:
            return
        try:
            nodes = client.CoreV1Api(self.connect()).list_node(_request_timeout=NODE_READ_TIMEOUT_S)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            self._node_read_failed(exc)
            return
        with self._nodes_lock:
            if len(self._nodes) + len(nodes.items) >= NODES_KEPT:
                self._nodes.clear()
            for node in nodes.items[:NODES_KEPT]:
                if node.metadata is not None and node.metadata.name:
                    self._nodes[node.metadata.name] = (now, _topology(node))
            for name in unknown:  # not listed: no such node now
                self._nodes.setdefault(name, (now, None))

    def _node_read_failed(self, exc: Exception) -> None:
        status = getattr(exc, "status", None)
        if status == 404:
            return
        if status not in self._node_failures_logged:
            self._node_failures_logged.add(status)
            log.warning(
                "reading Nodes for their zones failed (%s; logged once per status): %s "
                "(the control plane needs get and list on nodes)",
                status,
                str(exc)[:300],
            )

    def connect(self) -> client.ApiClient:
        """Loads the client configuration once: called at start, so a missing one fails early."""
        if self._api is None:
            self._api = api_client(self.settings)
        return self._api

    def mesh(self) -> Mesh:
        """Every Service, with the objects informers reported changed converted and joined: call it
        off the event loop. Empty until every informer has listed once, since a partial first
        mesh would remove the routes of what is not listed yet."""
        with self._lock:
            with self._pending_lock:
                if not self._all_listed():
                    return self._with_regions(self._assembly.mesh)
                pending, self._pending = self._pending, {}
            if pending:
                try:
                    self._apply(pending)
                except Exception as exc:
                    # The last mesh stays; the objects are converted again at the retry.
                    log.exception("converting Kubernetes objects failed; retrying")
                    self.health.failed(_CONVERTING, f"{type(exc).__name__}: {exc}")
                    with self._pending_lock:
                        self._pending = {**pending, **self._pending}
                    if self._retry is not None:
                        self._retry()
                else:
                    self.health.recovered(_CONVERTING)
            return self._with_regions(self._assembly.mesh)

    def _with_regions(self, base: Mesh) -> Mesh:
        """The mesh with each endpoint's region (and zone, where its slice names none) taken from
        its Node's topology labels: an EndpointSlice names an endpoint's zone but never its region,
        which locality-aware endpoints need for the client's-region level. Only the entries that
        changed since the last call are looked at (Nodes are read once and kept, see
        node_locality); a Node's labels changing later is seen when its endpoints next change."""
        previous_base, regioned = self._regions
        if base is previous_base:
            return regioned
        if previous_base is not None and base.parent == previous_base.generation:
            keys: Collection[ServiceKey] = base.changed
        else:
            keys = set(base.keys) | set(regioned.keys)
        found = [base.get(key) for key in keys]
        self.prefetch_nodes(
            {
                e.node_name
                for entry in found
                if entry is not None
                for g in entry.groups
                for e in g.endpoints
                if e.node_name and e.region is None
            }
        )
        entries = {}
        for key, entry in zip(keys, found, strict=True):
            entries[key] = None if entry is None else self._regioned_entry(entry)
        regioned = regioned.derive(entries) if entries else regioned
        self._regions = (base, regioned)
        return regioned

    def _regioned_entry(self, entry: ServiceEntry) -> ServiceEntry:
        groups = []
        changed = False
        for group in entry.groups:
            endpoints = []
            for endpoint in group.endpoints:
                if endpoint.region is None and endpoint.node_name:
                    found = self.node_locality(endpoint.node_name)
                    if found is not None:
                        region, zone = found
                        endpoint = dataclasses.replace(
                            endpoint, region=region or None, zone=endpoint.zone or zone or None
                        )
                        changed = True
                endpoints.append(endpoint)
            groups.append(EndpointGroup(group.source, group.ports, tuple(endpoints)))
        return ServiceEntry(entry.service, tuple(groups)) if changed else entry

    def problems(self) -> list[Problem]:
        """The problems of the mesh last built (cheap: nothing is converted here), and those of
        the informers failing now."""
        return [*self._problems, *self.health.problems()]

    def _all_listed(self) -> bool:
        return bool(self.informers) and len(self._listed) == len(self.informers)

    async def watch(self, notify: Callable[[], None]) -> None:
        """Runs the informers until cancelled; `notify` after every change once synced."""
        loop = asyncio.get_running_loop()
        api = self.connect()
        slices = await self._discover(api)
        if not slices:
            log.warning("EndpointSlices are not served here: watching Endpoints instead")
        kinds = (SERVICES, ENDPOINT_SLICES if slices else ENDPOINTS)
        namespaces: tuple[str | None, ...] = self.settings.namespaces or (None,)

        def changed(informer: Informer, keys: Collection[tuple[str, str]], listed: bool) -> None:
            resource = informer.kind.resource
            with self._pending_lock:
                for namespace, name in keys:
                    self._pending[(resource, namespace, name)] = informer
                if listed:
                    self._listed.add(informer)
            loop.call_soon_threadsafe(self._changed, notify)

        def retry() -> None:
            delay = min(self.settings.max_backoff_s, 0.25 * 2 ** self.health.failures(_CONVERTING))
            loop.call_soon_threadsafe(loop.call_later, delay, self._changed, notify)

        self._retry = retry
        self.informers = [
            Informer(api, kind, namespace, self.settings, changed, self._on_relist, self.health)
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
            self._retry = None
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
        with self._pending_lock:
            if not self._all_listed():
                return  # the first mesh waits for every list: a partial one would remove routes
        if not self.synced.is_set():
            self.synced.set()
        notify()

    def _apply(self, pending: dict[tuple[str, str, str], Informer]) -> None:
        """Convert the objects at the `pending` keys as they are now and join them (under
        `_lock`)."""
        changes: dict[str, Converted | None] = {}
        for key, informer in pending.items():
            resource, namespace, name = key
            location = f"{resource}/{namespace}/{name}"
            obj = informer.get((namespace, name))
            previous = self._converted.get(key)
            if obj is None:
                if previous is not None:
                    del self._converted[key]
                    changes[location] = None
                    self._object_problems.pop(location, None)
                continue
            if previous is not None and previous[0] is obj:
                continue  # reported, but the same object (a relist that found it unchanged)
            last = previous[1] if previous is not None else None
            conversion = convert_documents([obj], location, previous=last)
            self.converted_objects += 1
            self._converted[key] = (obj, conversion)
            changes[location] = conversion
            if conversion.problems:
                self._object_problems[location] = conversion.problems
            else:
                self._object_problems.pop(location, None)
        self._assembly.update(changes)
        problems = (
            *(
                p
                for location in sorted(self._object_problems)
                for p in self._object_problems[location]
            ),
            *self._assembly.problems,
        )
        if problems != self._problems:
            self._problems = problems
            current = set(problems)
            for problem in current - self._logged:
                log.log(problem.level, "%s", problem)
            self._logged = current
