"""`xds demo`: the control plane, an Envoy and three backends on loopback, and live traffic.

It serves the bundled manifests (`envoy/demo/`): Service `web` in namespace `demo` with three
endpoints, 127.0.0.1-3 on port 18080, where three local HTTP servers stand in for pods. Envoy
listens on service port + 10000 (10080) and the demo sends requests with `Host: web.demo` through
it, showing how RANDOM balancing spreads them. Ctrl-C stops everything it started, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp

from xds.app import ControlPlane
from xds.config import Settings
from xds.local import Envoy, backends, envoy_binary, free_port, request_backend, wait_for

BACKEND_PORT = 18080  # the port the demo's EndpointSlice names
LISTENER_OFFSET = 10000
SERVICE_PORT = 80
HOST = "web.demo"
BAR_WIDTH = 40


def demo_manifests() -> Path:
    """Bundled in the wheel as xds/_demo; in a source checkout, envoy/demo."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_demo", here.parent / "envoy" / "demo"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("demo manifests not found (expected xds/_demo or envoy/demo)")


def render(counts: Counter[str], names: list[str], failures: int, elapsed: float) -> str:
    total = sum(counts[n] for n in names)
    lines = [f"{total:,} requests through Envoy to {HOST} in {elapsed:.1f}s (RANDOM balancing)"]
    for name in names:
        share = counts[name] / total if total else 0.0
        bar = "#" * round(share * BAR_WIDTH)
        lines.append(f"  {name:<10} {counts[name]:>7,}  {share:6.1%}  {bar}")
    if failures:
        lines.append(f"  failed     {failures:>7,}")
    return "\n".join(lines)


def run_demo(requests: int = 0, rate: float = 200.0) -> int:
    # Before anything starts: without Envoy (an optional extra) the demo cannot run, and the
    # error is one line rather than a control plane and backends started and stopped again.
    envoy_binary()
    try:
        return asyncio.run(_demo(requests, rate))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130


async def _demo(requests: int, rate: float) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    settings = Settings(
        manifests=(demo_manifests(),),
        xds_port=free_port(),
        admin_port=free_port(),
        listener_address="127.0.0.1",
        listener_port_offset=LISTENER_OFFSET,
        # The stand-in pods are on loopback, which a real mesh refuses (it reaches the proxy's own
        # node); here the proxy's node is the point.
        allowed_endpoint_ranges=("127.0.0.0/8",),
    )
    plane = ControlPlane(settings)
    ports = await plane.start()
    print(f"control plane: xDS on 127.0.0.1:{ports.xds}, admin http://127.0.0.1:{ports.admin}")
    names = ["backend-1", "backend-2", "backend-3"]
    try:
        async with backends(names, port=BACKEND_PORT):
            print(f"backends: {', '.join(f'127.0.0.{i}:{BACKEND_PORT}' for i in (1, 2, 3))}")
            envoy = Envoy(f"127.0.0.1:{ports.xds}", node_id="demo-proxy")
            try:
                await envoy.start()
                url = f"http://127.0.0.1:{SERVICE_PORT + LISTENER_OFFSET}/"
                print(f"envoy: listening on {url}, admin {envoy.admin}")
                print(f"try:   curl -H 'Host: {HOST}' {url}\n")
                return await _traffic(url, names, requests, rate, stop)
            finally:
                await envoy.stop()
    finally:
        await plane.stop()
        print("stopped: traffic, Envoy, backends, control plane")


async def _traffic(
    url: str, names: list[str], requests: int, rate: float, stop: asyncio.Event
) -> int:
    counts: Counter[str] = Counter()
    failures = 0
    interactive = sys.stdout.isatty()
    async with aiohttp.ClientSession() as session:
        await wait_for(
            lambda: request_backend(session, url, HOST, timeout=1.0),
            timeout=20,
            what="Envoy routing to the demo backends",
        )
        started = time.monotonic()
        shown_at = 0.0
        sent = 0
        while not stop.is_set() and (requests <= 0 or sent < requests):
            answer = await request_backend(session, url, HOST)
            sent += 1
            if answer is None:
                failures += 1
            else:
                counts[answer] += 1
            now = time.monotonic()
            if now - shown_at >= (0.25 if interactive else 2.0):
                shown_at = now
                _show(render(counts, names, failures, now - started), interactive)
            # Pace to the requested rate; wake early on Ctrl-C.
            delay = started + sent / rate - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        _show(render(counts, names, failures, time.monotonic() - started), interactive)
        print()
    return 0 if failures == 0 else 1


# Whether `_show` has drawn a block on the terminal yet: the next one is drawn over it.
_drawn = False


def _show(text: str, interactive: bool) -> None:
    global _drawn
    if interactive:
        # Redraw in place: move up over the previous block, then clear to the end of the screen.
        lines = text.count("\n") + 1
        sys.stdout.write(f"\x1b[{lines}F\x1b[J" if _drawn else "")
        _drawn = True
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
