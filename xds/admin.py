"""The admin HTTP server: health, readiness and the debug views of what is being served."""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web
from google.protobuf import json_format

from xds.cache import Cache
from xds.metrics import CONTENT_TYPE, Metrics
from xds.model import Problem
from xds.resources import SHORT_NAMES, TYPES_BY_SHORT_NAME
from xds.server.service import DiscoveryServer
from xds.translate import decode

log = logging.getLogger(__name__)


def make_app(
    cache: Cache,
    server: DiscoveryServer,
    is_ready: Callable[[], bool],
    problems: Callable[[], list[Problem]],
    metrics: Metrics | None = None,
    readiness: Callable[[], tuple[bool, list[str]]] | None = None,
) -> web.Application:
    """`readiness`, when given, says whether the control plane is ready and why (or what it
    serves degraded: still ready, with one line each); otherwise `is_ready` decides alone."""

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        if readiness is None:
            ready, details = is_ready(), ["no snapshot published yet"]
        else:
            ready, details = readiness()
        if ready:
            return web.Response(text="".join(["ready\n", *(f"degraded: {d}\n" for d in details)]))
        return web.Response(status=503, text="".join(f"not ready: {d}\n" for d in details))

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

    async def metrics_text(_: web.Request) -> web.Response:
        if metrics is None:
            return web.Response(status=404, text="metrics are off\n")
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", metrics_text)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/debug/syncz", syncz)
    app.router.add_get("/debug/config_dump", config_dump)
    app.router.add_get("/debug/problems", problem_list)
    return app


def _problem(problem: Problem) -> dict[str, str]:
    return {
        "severity": problem.severity,
        "object": problem.object,
        "field": problem.field,
        "message": problem.message,
        "location": problem.location,
    }


async def start_admin(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(exc.errno, f"admin server: {exc.strerror or exc}") from exc
    bound = runner.addresses[0][1]
    log.info("admin listening on http://%s:%d", host, bound)
    return runner, bound
