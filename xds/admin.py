"""The admin HTTP server: health, readiness and the debug views of what is being served.

Two applications: the admin one (`make_app`: health, readiness, metrics and `/debug/*`), bound to
loopback unless configured otherwise because `/debug/*` shows every resource and every client,
and the health one (`make_health_app`: health, readiness and metrics only), which a deployment
exposes on the pod's address for probes and scraping. `/debug/*` can require a bearer token.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware
from google.protobuf import json_format

from xds.cache import Cache
from xds.metrics import CONTENT_TYPE, Metrics
from xds.model import Problem
from xds.resources import SHORT_NAMES, TYPES_BY_SHORT_NAME, decode
from xds.server.service import DiscoveryServer

log = logging.getLogger(__name__)


Readiness = Callable[[], tuple[bool, list[str]]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_app(
    cache: Cache,
    server: DiscoveryServer,
    readiness: Readiness,
    problems: Callable[[], list[Problem]],
    metrics: Metrics | None = None,
    debug_token: str | None = None,
) -> web.Application:
    """`readiness` says whether the control plane is ready and why not (or what it serves
    degraded: still ready, with one line each). With `debug_token`, `/debug/*` answers only
    requests bearing it (401 otherwise)."""

    async def syncz(_: web.Request) -> web.Response:
        return web.json_response(server.syncz())

    async def config_dump(request: web.Request) -> web.Response:
        wanted_type = request.query.get("type")
        wanted_name = request.query.get("name")
        if wanted_type is not None and wanted_type.upper() not in TYPES_BY_SHORT_NAME:
            return web.json_response(
                {"error": f"type must be one of {', '.join(TYPES_BY_SHORT_NAME)}"}, status=400
            )
        snapshot = cache.snapshot
        out = {}
        for type_url, items in snapshot.resources.items():
            short = SHORT_NAMES[type_url]
            if wanted_type is not None and short != wanted_type.upper():
                continue
            out[short] = {
                "version": snapshot.version(type_url),
                "resources": [
                    {
                        "name": name,
                        "version": items[name].version,
                        "resource": json_format.MessageToDict(decode(items[name])),
                    }
                    for name in sorted(items)
                    if wanted_name is None or name == wanted_name
                ],
            }
        return web.json_response(out)

    async def problem_list(_: web.Request) -> web.Response:
        return web.json_response([_problem(p) for p in problems()])

    middlewares: list[Middleware] = [] if debug_token is None else [_bearer_for_debug(debug_token)]
    app = web.Application(middlewares=middlewares)
    _add_health_routes(app, readiness, metrics)
    app.router.add_get("/debug/syncz", syncz)
    app.router.add_get("/debug/config_dump", config_dump)
    app.router.add_get("/debug/problems", problem_list)
    return app


def make_health_app(readiness: Readiness, metrics: Metrics | None = None) -> web.Application:
    """Health, readiness and metrics, and nothing of what is served or who is connected."""
    app = web.Application()
    _add_health_routes(app, readiness, metrics)
    return app


def _add_health_routes(app: web.Application, readiness: Readiness, metrics: Metrics | None) -> None:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        ready, details = readiness()
        if ready:
            return web.Response(text="".join(["ready\n", *(f"degraded: {d}\n" for d in details)]))
        return web.Response(status=503, text="".join(f"not ready: {d}\n" for d in details))

    async def metrics_text(_: web.Request) -> web.Response:
        if metrics is None:
            return web.Response(status=404, text="metrics are off\n")
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get("/metrics", metrics_text)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


def _bearer_for_debug(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/debug/"):
            given = request.headers.get("Authorization", "").encode()
            # Constant time: the comparison must not tell how much of a guess was right.
            if not hmac.compare_digest(given, expected):
                return web.Response(
                    status=401,
                    text="a bearer token is required for /debug/*\n",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    return check


def _problem(problem: Problem) -> dict[str, str]:
    return {
        "severity": problem.severity,
        "object": problem.object,
        "field": problem.field,
        "message": problem.message,
        "location": problem.location,
    }


async def start_admin(
    app: web.Application, host: str, port: int, what: str = "admin"
) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(exc.errno, f"{what} server: {exc.strerror or exc}") from exc
    bound = runner.addresses[0][1]
    log.info("%s listening on http://%s:%d", what, host, bound)
    return runner, bound
