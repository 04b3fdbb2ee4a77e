"""A Kubernetes API server stand-in for tests, speaking the real list/watch HTTP protocol.

This module owns `KubeAPIServer`: an aiohttp server on 127.0.0.1 that serves Services, Endpoints
and EndpointSlices the way kube-apiserver does, so that the official `kubernetes` client (and
anything built on `kubernetes.watch.Watch().stream(...)`) runs against it unmodified.

What it serves:

* collections: ``/api/v1/{services,endpoints}``, ``/api/v1/namespaces/{ns}/{services,endpoints}``,
  ``/apis/discovery.k8s.io/v1/endpointslices`` and ``.../namespaces/{ns}/endpointslices``;
  a single object under ``.../namespaces/{ns}/{resource}/{name}`` (404 Status when missing);
* discovery: ``/api``, ``/api/v1``, ``/apis``, ``/apis/discovery.k8s.io``,
  ``/apis/discovery.k8s.io/v1``, ``/version``;
* list: ``{"kind": "ServiceList", "apiVersion": "v1", "metadata": {"resourceVersion": ...},
  "items": [...]}``, items without kind/apiVersion like the real server; ``labelSelector`` with
  ``k=v``, ``k==v``, ``k!=v``, ``k`` and ``!k`` terms (other selectors are ignored);
* watch (``watch=1|true``): a chunked ``application/json`` stream, one event per line.
  ``resourceVersion`` absent or ``"0"`` (or ``sendInitialEvents=true``) gives synthetic ADDED events
  for the current objects first; ``resourceVersion=N`` replays the retained history after N, and a
  compacted N gives HTTP 200 with one ERROR event carrying a 410 Expired Status, then the end of
  the stream. ``allowWatchBookmarks=true`` enables BOOKMARK events (periodic and on demand);
  ``timeoutSeconds`` ends the stream cleanly.

Fault injection: `compact`, `expire_watches` (410 ERROR into open streams), `drop_watches`
(abrupt close, or clean end of stream), `stall_watches`/`unstall` (connections stay open, nothing
is sent), `set_endpointslices_enabled` (404 for the discovery.k8s.io group), `send_raw` (bytes
written as they are into open watch streams: malformed lines) and `serve_list_bodies` (the next
lists of a resource answer 200 with the given bodies instead). Counters: list and
watch calls per resource, open watches, and a log of every request path.

Every public method is thread-safe. Run it in the test's event loop (``async with
KubeAPIServer() as api``) or in its own thread with its own loop (``with KubeAPIServer() as api``,
or `start_in_thread` / `stop_in_thread`); the synchronous `kubernetes` client belongs in a thread
other than the one running the server's loop.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import datetime
import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

SERVICES = "services"
ENDPOINTS = "endpoints"
ENDPOINTSLICES = "endpointslices"
NODES = "nodes"

DISCOVERY_GROUP = "discovery.k8s.io"


@dataclass(frozen=True)
class ResourceType:
    """One served resource: its plural name, kind, apiVersion and API group ("" for core)."""

    name: str
    kind: str
    api_version: str
    group: str
    singular: str
    short_names: tuple[str, ...] = ()
    namespaced: bool = True

    @property
    def list_kind(self) -> str:
        return self.kind + "List"


RESOURCES: dict[str, ResourceType] = {
    SERVICES: ResourceType(SERVICES, "Service", "v1", "", "service", ("svc",)),
    ENDPOINTS: ResourceType(ENDPOINTS, "Endpoints", "v1", "", "endpoints", ("ep",)),
    ENDPOINTSLICES: ResourceType(
        ENDPOINTSLICES, "EndpointSlice", "discovery.k8s.io/v1", DISCOVERY_GROUP, "endpointslice"
    ),
    NODES: ResourceType(NODES, "Node", "v1", "", "node", ("no",), namespaced=False),
}

_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]

Key = tuple[str, str, str]  # (resource, namespace, name)


@dataclass(frozen=True)
class Event:
    """One change to the store, as kept in the history and handed to every open watch."""

    rv: int
    resource: str
    type: str  # ADDED, MODIFIED or DELETED
    namespace: str
    obj: dict[str, Any]


# Items handed to a watch besides events.
_BOOKMARK = "bookmark"
_EXPIRE = "expire"
_END = "end"  # a clean end of the stream
_ABORT = "abort"  # an abrupt close of the connection


@dataclass(frozen=True)
class _Raw:
    """Bytes to write into a watch stream as they are."""

    data: bytes


@dataclass(eq=False)
class _Watch:
    """One open watch stream; lives on the server's loop."""

    resource: str
    namespace: str | None
    selector: Callable[[dict[str, Any]], bool]
    bookmarks: bool
    queue: asyncio.Queue[Event | str | _Raw] = field(default_factory=asyncio.Queue)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    rv: int = 0  # every event up to this resourceVersion has been sent (or filtered out)
    aborted: bool = False

    def matches(self, event: Event) -> bool:
        return (
            event.resource == self.resource
            and (self.namespace is None or event.namespace == self.namespace)
            and self.selector(event.obj)
        )


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    """A `Status` object as the API server returns it for errors."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def parse_label_selector(selector: str | None) -> Callable[[dict[str, Any]], bool]:
    """A predicate on objects for the equality- and existence-based terms of a label selector.

    Set-based terms (``in``, ``notin``) are not understood and match everything.
    """
    terms: list[Callable[[dict[str, str]], bool]] = []
    for raw in (selector or "").split(","):
        term = raw.strip()
        if not term or " in " in term or " notin " in term:
            continue
        if "!=" in term:
            key, value = (part.strip() for part in term.split("!=", 1))
            terms.append(lambda labels, k=key, v=value: labels.get(k) != v)
        elif "=" in term:
            key, value = (part.strip() for part in term.replace("==", "=").split("=", 1))
            terms.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif term.startswith("!"):
            absent = term[1:].strip()
            terms.append(lambda labels, k=absent: k not in labels)
        else:
            terms.append(lambda labels, k=term: k in labels)

    def matches(obj: dict[str, Any]) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return all(term(labels) for term in terms)

    return matches


def _true(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true")


class KubeAPIServer:
    """A list/watch Kubernetes API server for Services, Endpoints and EndpointSlices.

    `history_limit` bounds the event history that watches resume from (older resourceVersions
    get 410 Expired); `bookmark_interval` is the period of BOOKMARK events on watches that allow
    them (None: only on `send_bookmark`); `default_watch_timeout` ends watches that do not ask for
    `timeoutSeconds` after that many seconds (None: never); `endpointslices` serves the
    discovery.k8s.io group (False: 404, as on a server without EndpointSlices).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        history_limit: int = 1000,
        bookmark_interval: float | None = None,
        default_watch_timeout: float | None = None,
        endpointslices: bool = True,
    ) -> None:
        self.host = host
        self._requested_port = port
        self.port = 0
        self.bookmark_interval = bookmark_interval
        self.default_watch_timeout = default_watch_timeout
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._objects: dict[Key, dict[str, Any]] = {}
        self._rv = 0
        self._history: collections.deque[Event] = collections.deque(maxlen=max(history_limit, 0))
        self._history_limit = max(history_limit, 0)
        # The oldest resourceVersion a watch can resume from: everything after it is retained.
        self._resumable_from = 0
        self._endpointslices = endpointslices
        self._stalled = False
        self._watches: set[_Watch] = set()
        self._list_calls: collections.Counter[str] = collections.Counter()
        self._watch_calls: collections.Counter[str] = collections.Counter()
        self._get_calls: collections.Counter[str] = collections.Counter()
        self._list_bodies: dict[str, collections.deque[bytes]] = collections.defaultdict(
            collections.deque
        )
        self._requests: list[tuple[str, str]] = []
        self._uids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        """The base URL, for `kubernetes.client.Configuration(host=...)`."""
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        """Serve from the running event loop."""
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        # Cancel the handler of a watch whose client went away, so `open_watches` stays true.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=0.1
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._requested_port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        """Stop serving; open watches are cut."""
        if self._loop is not None:
            with self._lock:
                for watch in list(self._watches):
                    self._post(watch, _ABORT)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> KubeAPIServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start_in_thread(self) -> None:
        """Serve from a new daemon thread with its own event loop; returns once listening."""
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
                loop.run_until_complete(self.close())
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="kubeapi", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]

    def stop_in_thread(self, timeout: float = 5.0) -> None:
        """Stop the thread started by `start_in_thread`."""
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> KubeAPIServer:
        self.start_in_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_in_thread()

    # ----------------------------------------------------------------------------- the store

    @property
    def resource_version(self) -> str:
        """The current (latest) resourceVersion."""
        with self._lock:
            return str(self._rv)

    def create(self, resource: str, obj: dict[str, Any]) -> str:
        """Add an object (ADDED); KeyError if it exists. Returns the new resourceVersion."""
        with self._lock:
            key, stored = self._prepare(resource, obj)
            if key in self._objects:
                raise KeyError(f"{resource} {key[1]}/{key[2]} already exists")
            meta = stored["metadata"]
            meta["uid"] = meta.get("uid") or str(uuid.UUID(int=next(self._uids)))
            meta["creationTimestamp"] = datetime.datetime.now(datetime.UTC).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            )
            return self._commit(key, "ADDED", stored)

    def update(self, resource: str, obj: dict[str, Any]) -> str:
        """Replace an object (MODIFIED); KeyError if missing. Returns the new resourceVersion."""
        with self._lock:
            key, stored = self._prepare(resource, obj)
            old = self._objects.get(key)
            if old is None:
                raise KeyError(f"{resource} {key[1]}/{key[2]} not found")
            for kept in ("uid", "creationTimestamp"):
                stored["metadata"][kept] = old["metadata"][kept]
            return self._commit(key, "MODIFIED", stored)

    def apply(self, resource: str, obj: dict[str, Any]) -> str:
        """Create or update. Returns the new resourceVersion."""
        with self._lock:
            key, _ = self._prepare(resource, obj)
            if key in self._objects:
                return self.update(resource, obj)
            return self.create(resource, obj)

    def delete(self, resource: str, namespace: str, name: str) -> str:
        """Remove an object (DELETED); KeyError if missing. Returns the new resourceVersion."""
        with self._lock:
            key = (resource, namespace, name)
            old = self._objects.get(key)
            if old is None:
                raise KeyError(f"{resource} {namespace}/{name} not found")
            return self._commit(key, "DELETED", copy.deepcopy(old))

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A copy of a stored object, or None."""
        with self._lock:
            obj = self._objects.get((resource, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def objects(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Copies of the stored objects of a resource, in (namespace, name) order."""
        with self._lock:
            return [
                copy.deepcopy(obj)
                for (res, ns, _), obj in sorted(self._objects.items())
                if res == resource and (namespace is None or ns == namespace)
            ]

    def _prepare(self, resource: str, obj: dict[str, Any]) -> tuple[Key, dict[str, Any]]:
        rtype = RESOURCES[resource]
        stored = copy.deepcopy(obj)
        stored["kind"], stored["apiVersion"] = rtype.kind, rtype.api_version
        meta = stored.setdefault("metadata", {})
        if rtype.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            raise ValueError("metadata.name is required")
        return (resource, meta.get("namespace", ""), meta["name"]), stored

    def _commit(self, key: Key, kind: str, stored: dict[str, Any]) -> str:
        self._rv += 1
        stored["metadata"]["resourceVersion"] = str(self._rv)
        if kind == "DELETED":
            del self._objects[key]
        else:
            self._objects[key] = stored
        event = Event(self._rv, key[0], kind, key[1], copy.deepcopy(stored))
        if self._history_limit:
            if len(self._history) == self._history_limit:
                self._resumable_from = self._history[0].rv
            self._history.append(event)
        else:
            self._resumable_from = self._rv
        for watch in self._watches:
            self._post(watch, event)
        return str(self._rv)

    # ----------------------------------------------------------------------------- faults

    def compact(self, keep_last: int = 0) -> None:
        """Drop all but the last `keep_last` events: watches resuming from before them get 410."""
        with self._lock:
            while len(self._history) > max(keep_last, 0):
                self._resumable_from = self._history.popleft().rv
            if not self._history:
                self._resumable_from = self._rv

    def expire_watches(self, *, compact: bool = True) -> None:
        """Send a 410 Expired ERROR event into every open watch, then end it.

        This is what the real server does when a watch falls behind a compaction; with
        `compact` (the default) the history is dropped as well, so resuming from the last
        resourceVersion seen gets 410 too and the client has to list again.
        """
        with self._lock:
            if compact:
                self.compact()
            for watch in self._watches:
                self._post(watch, _EXPIRE)

    def drop_watches(self, *, clean: bool = False) -> None:
        """Close every open watch: abruptly (connection cut mid-stream), or with a clean end."""
        with self._lock:
            for watch in self._watches:
                self._post(watch, _END if clean else _ABORT)

    def stall_watches(self) -> None:
        """Keep watch connections open but send nothing on them, not even bookmarks or the end.

        Events keep queueing for each stalled watch and flow again after `unstall`; watches
        opened while stalled get their response headers and then nothing either.
        """
        with self._lock:
            self._stalled = True

    def unstall(self) -> None:
        """Let stalled watches send again."""
        with self._lock:
            self._stalled = False
            for watch in self._watches:
                self._wake(watch)

    def send_bookmark(self) -> None:
        """Send a BOOKMARK now on every open watch that allows bookmarks."""
        with self._lock:
            for watch in self._watches:
                self._post(watch, _BOOKMARK)

    def send_raw(self, *lines: bytes) -> None:
        """Write each of `lines` (a newline added) into every open watch stream, as it is."""
        with self._lock:
            for watch in self._watches:
                for line in lines:
                    self._post(watch, _Raw(line + b"\n"))

    def serve_list_bodies(self, resource: str, *bodies: bytes) -> None:
        """Answer the next lists of `resource`, one each, with status 200 and these bodies."""
        with self._lock:
            self._list_bodies[resource].extend(bodies)

    def clear_list_bodies(self, resource: str) -> None:
        """Forget the bodies `serve_list_bodies` gave that are not served yet."""
        with self._lock:
            self._list_bodies[resource].clear()

    def list_bodies_left(self, resource: str) -> int:
        with self._lock:
            return len(self._list_bodies[resource])

    def set_endpointslices_enabled(self, enabled: bool) -> None:
        """Serve the discovery.k8s.io group, or answer 404 for it (open watches are kept)."""
        with self._lock:
            self._endpointslices = enabled

    # ----------------------------------------------------------------------------- counters

    def list_calls(self, resource: str) -> int:
        """How many list requests (not watches) were served for `resource`."""
        with self._lock:
            return self._list_calls[resource]

    def watch_calls(self, resource: str) -> int:
        """How many watch requests were received for `resource`."""
        with self._lock:
            return self._watch_calls[resource]

    def get_calls(self, resource: str) -> int:
        """How many single-object GETs were received for `resource`."""
        with self._lock:
            return self._get_calls[resource]

    def open_watches(self, resource: str | None = None) -> int:
        """How many watch streams are open now (for one resource, or in all)."""
        with self._lock:
            return sum(1 for w in self._watches if resource is None or w.resource == resource)

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path with query) of every request received, oldest first."""
        with self._lock:
            return list(self._requests)

    def wait_until(self, condition: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Block until `condition()` holds (checked whenever the server's state changes).

        Not for the thread running the server's loop: use `wait_until_async` there.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while not condition():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True

    async def wait_until_async(self, condition: Callable[[], bool], timeout: float = 5.0) -> bool:
        """`wait_until` for coroutines, polling every few milliseconds."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    def _touched(self) -> None:
        with self._changed:
            self._changed.notify_all()

    # ----------------------------------------------------------------------------- HTTP

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self._requests.append((request.method, request.path_qs))
        parts = [p for p in request.path.split("/") if p]
        try:
            return await self._route(request, parts)
        finally:
            self._touched()

    async def _route(self, request: web.Request, parts: list[str]) -> web.StreamResponse:
        if parts == ["version"]:
            return web.json_response(
                {
                    "major": "1",
                    "minor": "31",
                    "gitVersion": "v1.31.0",
                    "gitCommit": "0000000000000000000000000000000000000000",
                    "gitTreeState": "clean",
                    "buildDate": "2024-08-13T00:00:00Z",
                    "goVersion": "go1.22.5",
                    "compiler": "gc",
                    "platform": "linux/amd64",
                }
            )
        if parts == ["api"]:
            return web.json_response(
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self.port}"}
                    ],
                }
            )
        if parts == ["apis"]:
            groups = [self._api_group()] if self._endpointslices else []
            return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        if parts[:1] == ["api"] and parts[1:2] == ["v1"]:
            rest, group = parts[2:], ""
        elif parts[:2] == ["apis", DISCOVERY_GROUP] and self._endpointslices:
            if len(parts) == 2:
                return web.json_response(self._api_group())
            if parts[2] != "v1":
                return self._not_found(request)
            rest, group = parts[3:], DISCOVERY_GROUP
        else:
            return self._not_found(request)
        if not rest:
            return web.json_response(self._resource_list(group))
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        rtype = RESOURCES.get(rest[0])
        if rtype is None or rtype.group != group or len(rest) > 2:
            return self._not_found(request)
        if len(rest) == 2:
            if rtype.namespaced == (namespace is None):
                return self._not_found(request)
            return self._get_one(rtype, namespace or "", rest[1])
        if _true(request.query.get("watch")):
            return await self._watch(request, rtype, namespace)
        return self._list(request, rtype, namespace)

    def _api_group(self) -> dict[str, Any]:
        version = {"groupVersion": f"{DISCOVERY_GROUP}/v1", "version": "v1"}
        return {
            "kind": "APIGroup",
            "apiVersion": "v1",
            "name": DISCOVERY_GROUP,
            "versions": [version],
            "preferredVersion": version,
        }

    def _resource_list(self, group: str) -> dict[str, Any]:
        resources = [
            {
                "name": r.name,
                "singularName": r.singular,
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": _VERBS,
                **({"shortNames": list(r.short_names)} if r.short_names else {}),
            }
            for r in RESOURCES.values()
            if r.group == group
        ]
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/v1" if group else "v1",
            "resources": resources,
        }

    def _not_found(self, request: web.Request, message: str | None = None) -> web.Response:
        return web.json_response(
            status(404, "NotFound", message or "the server could not find the requested resource"),
            status=404,
        )

    def _get_one(self, rtype: ResourceType, namespace: str, name: str) -> web.Response:
        with self._lock:
            self._get_calls[rtype.name] += 1
            obj = self.get(rtype.name, namespace, name)
        if obj is None:
            body = status(404, "NotFound", f'{rtype.name} "{name}" not found')
            body["details"] = {"name": name, "kind": rtype.name}
            if rtype.group:
                body["details"]["group"] = rtype.group
            return web.json_response(body, status=404)
        return web.json_response(obj)

    def _list(
        self, request: web.Request, rtype: ResourceType, namespace: str | None
    ) -> web.Response:
        selector = parse_label_selector(request.query.get("labelSelector"))
        with self._lock:
            self._list_calls[rtype.name] += 1
            bodies = self._list_bodies[rtype.name]
            if bodies:
                return web.Response(body=bodies.popleft(), content_type="application/json")
            items = [_as_item(o) for o in self.objects(rtype.name, namespace) if selector(o)]
            rv = str(self._rv)
        return web.json_response(
            {
                "kind": rtype.list_kind,
                "apiVersion": rtype.api_version,
                "metadata": {"resourceVersion": rv},
                "items": items,
            }
        )

    async def _watch(
        self, request: web.Request, rtype: ResourceType, namespace: str | None
    ) -> web.StreamResponse:
        query = request.query
        rv_param = query.get("resourceVersion", "")
        try:
            since = int(rv_param) if rv_param else 0
            timeout = float(query["timeoutSeconds"]) if "timeoutSeconds" in query else None
        except ValueError:
            return web.json_response(
                status(400, "BadRequest", f"invalid resource version or timeout: {rv_param}"),
                status=400,
            )
        if timeout is None:
            timeout = self.default_watch_timeout
        initial = since == 0 or _true(query.get("sendInitialEvents"))
        watch = _Watch(
            rtype.name,
            namespace,
            parse_label_selector(query.get("labelSelector")),
            _true(query.get("allowWatchBookmarks")),
        )
        backlog: list[Event | str] = []
        expired: dict[str, Any] | None = None
        with self._lock:
            self._watch_calls[rtype.name] += 1
            if initial:
                for obj in self.objects(rtype.name, namespace):
                    meta = obj["metadata"]
                    backlog.append(
                        Event(self._rv, rtype.name, "ADDED", meta.get("namespace", ""), obj)
                    )
            if since and not initial and since < self._resumable_from:
                expired = status(
                    410,
                    "Expired",
                    f"too old resource version: {since} ({self._resumable_from})",
                )
            elif since and not initial:
                backlog.extend(e for e in self._history if e.rv > since)
            watch.rv = self._rv
            if expired is None:
                self._watches.add(watch)
        response = web.StreamResponse(
            status=200, headers={"Content-Type": "application/json", "Cache-Control": "no-cache"}
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        if expired is not None:
            await _send(response, {"type": "ERROR", "object": expired})
            await response.write_eof()
            return response
        try:
            return await self._stream(request, response, watch, backlog, timeout, initial)
        finally:
            with self._lock:
                self._watches.discard(watch)
            self._touched()

    async def _stream(
        self,
        request: web.Request,
        response: web.StreamResponse,
        watch: _Watch,
        backlog: Iterable[Event | str | _Raw],
        timeout: float | None,
        initial: bool,
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout is not None else None
        self._touched()
        # The synthetic initial events, then the replayed history, then live events.
        pending: collections.deque[Event | str | _Raw] = collections.deque(backlog)
        if initial and watch.bookmarks and _true(request.query.get("sendInitialEvents")):
            pending.append(_BOOKMARK + ":initial")
        next_bookmark = (
            loop.time() + self.bookmark_interval
            if watch.bookmarks and self.bookmark_interval
            else None
        )
        while True:
            if pending:
                item: Event | str | _Raw = pending.popleft()
            else:
                wakeups = [t for t in (deadline, next_bookmark) if t is not None]
                try:
                    if wakeups:
                        async with asyncio.timeout_at(min(wakeups)):
                            item = await watch.queue.get()
                    else:
                        item = await watch.queue.get()
                except TimeoutError:
                    now = loop.time()
                    if deadline is not None and now >= deadline:
                        item = _END
                    else:
                        item = _BOOKMARK
                        next_bookmark = now + (self.bookmark_interval or 0)
            if item == _ABORT or watch.aborted:
                _abort(request)
                return response
            await self._gate(watch)
            if watch.aborted:
                _abort(request)
                return response
            if item == _END:
                await response.write_eof()
                return response
            if item == _EXPIRE:
                with self._lock:
                    message = f"too old resource version: {watch.rv} ({self._resumable_from})"
                await _send(response, {"type": "ERROR", "object": status(410, "Expired", message)})
                await response.write_eof()
                return response
            if isinstance(item, _Raw):
                await response.write(item.data)
                continue
            if isinstance(item, str) and item.startswith(_BOOKMARK):
                if watch.bookmarks:
                    await _send(response, self._bookmark(watch, item.endswith(":initial")))
                continue
            assert isinstance(item, Event)
            watch.rv = max(watch.rv, item.rv)
            if watch.matches(item):
                await _send(response, {"type": item.type, "object": item.obj})

    def _bookmark(self, watch: _Watch, initial_end: bool) -> dict[str, Any]:
        rtype = RESOURCES[watch.resource]
        metadata: dict[str, Any] = {"resourceVersion": str(watch.rv)}
        if initial_end:
            metadata["annotations"] = {"k8s.io/initial-events-end": "true"}
        return {
            "type": "BOOKMARK",
            "object": {"kind": rtype.kind, "apiVersion": rtype.api_version, "metadata": metadata},
        }

    async def _gate(self, watch: _Watch) -> None:
        """Wait while watches are stalled (unless this one is cut meanwhile)."""
        while True:
            with self._lock:
                if not self._stalled or watch.aborted:
                    return
                watch.wake.clear()
            await watch.wake.wait()

    # ----------------------------------------------------------------------------- plumbing

    def _post(self, watch: _Watch, item: Event | str | _Raw) -> None:
        """Hand an item to a watch from any thread (called with the lock held: keeps order)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def deliver() -> None:
            if item == _ABORT:
                watch.aborted = True
                watch.wake.set()
            watch.queue.put_nowait(item)

        loop.call_soon_threadsafe(deliver)

    def _wake(self, watch: _Watch) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(watch.wake.set)


def _as_item(obj: dict[str, Any]) -> dict[str, Any]:
    """An object as a list item: the real server leaves out kind and apiVersion there."""
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


async def _send(response: web.StreamResponse, event: dict[str, Any]) -> None:
    await response.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
