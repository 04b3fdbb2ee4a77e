"""`xds demo`: the control plane, an Envoy and three backends on loopback, and live traffic.

It serves the bundled manifests (`envoy/demo/`): Service `web` in namespace `demo` with three
endpoints, 127.0.0.1-3 on port 18080, where three local HTTP servers stand in for pods. Envoy
listens on service port + 10000 (10080) and the demo sends requests with `Host: web.demo` through
it, showing how RANDOM balancing spreads them. Ctrl-C stops everything it started, in order.

`xds demo --zones` shows locality-aware endpoints instead (`xds.localities`), on the manifests of
`envoy/demo-zones/`: Service `web` in namespace `demo-zones` (`trafficDistribution: PreferClose`)
with four endpoints, 127.0.0.1-2 in zone-a and 127.0.0.3-4 in zone-b, on port 18081. Its Envoy's
node is in region-1/zone-a and listens on 10081 (beside `xds demo`'s 10080). The traffic runs in
three phases of `--phase-seconds` each (the last until the end): all healthy, zone-a answering
503 (outlier detection ejects its hosts, traffic fails over to zone-b), zone-a healthy again
(traffic comes back once the ejection time is over). It exits 0 when no request failed outside
the failing phase, else 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from xds.app import ControlPlane
from xds.config import Settings
from xds.local import (
    Backend,
    Envoy,
    backends,
    bindable,
    envoy_binary,
    free_port,
    request_backend,
    wait_for,
)

BACKEND_PORT = 18080  # the port the demo's EndpointSlice names
LISTENER_OFFSET = 10000
SERVICE_PORT = 80
HOST = "web.demo"
BAR_WIDTH = 40


def demo_manifests() -> Path:
    """Bundled in the wheel as xds/_demo; in a source checkout, envoy/demo."""
    return _bundled("_demo", "demo")


def demo_zones_manifests() -> Path:
    """Bundled in the wheel as xds/_demo_zones; in a source checkout, envoy/demo-zones."""
    return _bundled("_demo_zones", "demo-zones")


def _bundled(packaged: str, source: str) -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / packaged, here.parent / "envoy" / source):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"demo manifests not found (expected xds/{packaged} or envoy/{source})")


# The sliding window of the spread: the latest answers, which say where the traffic goes now (an
# edit of the manifests shows there at once).
RECENT = 100


def render(
    counts: Counter[str],
    names: list[str],
    failures: int,
    elapsed: float,
    recent: Sequence[str | None] = (),
) -> str:
    """The spread so far and, over the last RECENT answers, now (a backend added or removed by
    an edit of the manifests shows there at once; the totals take their time)."""
    total = sum(counts[n] for n in names)
    lines = [f"{total:,} requests through Envoy to {HOST} in {elapsed:.1f}s (RANDOM balancing)"]
    window = Counter(recent)
    seen = [n for n in window if n is not None and n not in names]
    for name in [*names, *sorted(seen)]:
        share = counts[name] / total if total else 0.0
        bar = "#" * round(share * BAR_WIDTH)
        now = f"last {len(recent)}: {window[name] / len(recent):6.1%}" if recent else ""
        lines.append(f"  {name:<10} {counts[name]:>7,}  {share:6.1%}  {bar:<{BAR_WIDTH}}  {now}")
    if failures:
        lines.append(f"  failed     {failures:>7,}")
    return "\n".join(line.rstrip() for line in lines)


def check_ports(ports: Sequence[tuple[str, int, str]]) -> None:
    """Raises OSError naming the first (host, port) that cannot be bound, what the demo needs it
    for and, when this machine tells, which process holds it: said before anything starts,
    instead of an Envoy that fails after its timeout."""
    for host, port, what in ports:
        if bindable(host, port):
            continue
        holder = _holder(port)
        raise OSError(
            f"demo: {host}:{port} ({what}) is in use"
            + (f" by {holder}" if holder else "")
            + "; stop it (another `xds demo`?) and try again"
        )


def _holder(port: int) -> str | None:
    """The process listening on a TCP port, as `pid N (name)`, from /proc (Linux); None when
    it cannot be told (another OS, another user's process)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # LISTEN
                    inodes.add(f"socket:[{inode}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    name = (proc / "comm").read_text().strip()
                    return f"pid {proc.name} ({name})"
    return None


def run_demo(
    requests: int = 0,
    rate: float = 200.0,
    zones: bool = False,
    phase_seconds: float | None = None,
) -> int:
    """`xds demo`; with `zones`, `xds demo --zones` (phases of `phase_seconds`, default
    `PHASE_SECONDS`). A ValueError for options that cannot work (the CLI's usage error)."""
    if phase_seconds is not None and not zones:
        raise ValueError("--phase-seconds goes with --zones")
    if zones and rate <= 0:
        raise ValueError(f"--rate must be above 0, not {rate:g}")
    if phase_seconds is not None and phase_seconds <= 0:
        raise ValueError(f"--phase-seconds must be above 0, not {phase_seconds:g}")
    # Before anything starts: without Envoy (an optional extra) the demo cannot run, and the
    # error is one line rather than a control plane and backends started and stopped again.
    envoy_binary()
    if zones:
        backend_port, listener = ZONES_BACKEND_PORT, SERVICE_PORT + ZONES_LISTENER_OFFSET
        hosts = len(ZONE_OF)
    else:
        backend_port, listener, hosts = BACKEND_PORT, SERVICE_PORT + LISTENER_OFFSET, 3
    check_ports(
        [("127.0.0.1", listener, "Envoy's listener")]
        + [(f"127.0.0.{i}", backend_port, f"backend {i}") for i in range(1, hosts + 1)]
    )
    try:
        if zones:
            return asyncio.run(_zones_demo(requests, rate, phase_seconds or PHASE_SECONDS))
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
                print(f"try:   curl -H 'Host: {HOST}' {url}")
                print(
                    f"       edit {settings.manifests[0] / 'endpoints.yaml'} (remove an address:"
                    " the last-100 column shows it at once)"
                )
                print(f"       xds status --admin 127.0.0.1:{ports.admin}\n")
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
    recent: deque[str | None] = deque(maxlen=RECENT)
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
            recent.append(answer)
            if answer is None:
                failures += 1
            else:
                counts[answer] += 1
            now = time.monotonic()
            if now - shown_at >= (0.25 if interactive else 2.0):
                shown_at = now
                _show(render(counts, names, failures, now - started, recent), interactive)
            # Pace to the requested rate; wake early on Ctrl-C.
            delay = started + sent / rate - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        _show(render(counts, names, failures, time.monotonic() - started, recent), interactive)
        print()
    return 0 if failures == 0 else 1


# The lines of the block `_show` drew last on the terminal (0: none): the next one is drawn over it.
_drawn = 0


def _show(text: str, interactive: bool) -> None:
    global _drawn
    if interactive:
        # Redraw in place: move up over the previous block (however many lines it had), then
        # clear to the end of the screen.
        sys.stdout.write(f"\x1b[{_drawn}F\x1b[J" if _drawn else "")
        _drawn = text.count("\n") + 1
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _keep_shown() -> None:
    """Leave the block `_show` drew last on the terminal: the next one goes below it."""
    global _drawn
    _drawn = 0


# `xds demo --zones`: locality-aware routing and failover.

ZONES_BACKEND_PORT = 18081  # the port envoy/demo-zones' EndpointSlice names
ZONES_LISTENER_OFFSET = 10001  # Envoy on 10081, beside `xds demo`'s 10080
ZONES_HOST = "web.demo-zones"
ZONES_CLUSTER = "demo-zones/web:http"
NODE_REGION, NODE_ZONE = "region-1", "zone-a"
# The backends, at 127.0.0.1, .2, ... in this order, and their zones as the EndpointSlice says.
ZONE_OF = {"a1": "zone-a", "a2": "zone-a", "b1": "zone-b", "b2": "zone-b"}
ZONES = ("zone-a", "zone-b")
PHASE_SECONDS = 5.0
# Narrower than `xds demo`'s bars: with the notes beside them, a block stays within 80 columns,
# which its redrawing in place needs (it moves up by lines, not by wrapped screen rows).
ZONES_BAR_WIDTH = 30
# The phases: their title and what zone-a's backends answer. The last runs until the end.
PHASES = (("all healthy", 200), ("zone-a failing", 503), ("zone-a healthy again", 200))


@dataclass(frozen=True)
class Failover:
    """What Envoy holds for the demo's cluster (its config dump), which the phases explain."""

    consecutive_5xx: int
    ejection_seconds: float
    overprovisioning: float  # Envoy's factor: 1.4 unless the assignment sets another

    @property
    def threshold(self) -> float:
        """The healthy share below which a priority gives traffic to the next one."""
        return 1 / self.overprovisioning


@dataclass
class Phase:
    """One phase's requests: answers (200) and failures by backend, where the latest went."""

    number: int
    started: float  # seconds since the traffic began
    answers: Counter[str] = field(default_factory=Counter)
    # By the backend that answered (x-backend), "" when Envoy answered itself (no backend).
    failures: Counter[str] = field(default_factory=Counter)
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=RECENT))  # zone or "failed"
    back_at: float | None = None  # when zone-a answered again after the failing phase

    @property
    def title(self) -> str:
        return PHASES[self.number - 1][0]

    @property
    def requests(self) -> int:
        return self.answers.total() + self.failures.total()


def render_zones(phase: Phase, elapsed: float, ejected: set[str], note: str = "") -> str:
    total = phase.requests

    def row(label: str, count: int, extra: str = "") -> str:
        share = count / total if total else 0.0
        bar = "#" * round(share * ZONES_BAR_WIDTH)
        return f"  {label:<8} {count:>7,}  {share:6.1%}  {bar:<{ZONES_BAR_WIDTH}}  {extra}".rstrip()

    lines = [
        f"[phase {phase.number}/{len(PHASES)}: {phase.title}] {total:,} requests in {elapsed:.1f}s"
    ]
    for zone in ZONES:
        members = [name for name, of in ZONE_OF.items() if of == zone]
        lines.append(row(zone, sum(phase.answers[name] for name in members)))
        for name in members:
            extra = [f"{phase.failures[name]:,} failed"] if phase.failures[name] else []
            extra += ["ejected"] if name in ejected else []
            lines.append(row(f"  {name}", phase.answers[name], ", ".join(extra)))
    lines.append(row("failed", phase.failures.total()))
    recent = Counter(phase.recent)
    shares = ", ".join(
        f"{what} {recent[what] / len(phase.recent) if phase.recent else 0.0:.0%}"
        for what in (*ZONES, "failed")
    )
    lines.append(f"  last {len(phase.recent)}: {shares}")
    if note:
        lines.append(f"  {note}")
    return "\n".join(lines)


async def _zones_demo(requests: int, rate: float, phase_seconds: float) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    settings = Settings(
        manifests=(demo_zones_manifests(),),
        xds_port=free_port(),
        admin_port=free_port(),
        listener_address="127.0.0.1",
        listener_port_offset=ZONES_LISTENER_OFFSET,
        allowed_endpoint_ranges=("127.0.0.0/8",),  # the stand-in pods, as in `xds demo`
    )
    plane = ControlPlane(settings)
    ports = await plane.start()
    print(f"control plane: xDS on 127.0.0.1:{ports.xds}, admin http://127.0.0.1:{ports.admin}")
    try:
        async with backends(list(ZONE_OF), port=ZONES_BACKEND_PORT) as started:
            listed = ", ".join(f"{b.name} {b.host}:{b.port} ({ZONE_OF[b.name]})" for b in started)
            print(f"backends: {listed}")
            envoy = Envoy(f"127.0.0.1:{ports.xds}", node_id="demo-zones-proxy", customize=_in_zone)
            try:
                await envoy.start()
                url = f"http://127.0.0.1:{SERVICE_PORT + ZONES_LISTENER_OFFSET}/"
                print(
                    f"envoy: node in {NODE_REGION}/{NODE_ZONE}, listening on {url},"
                    f" admin {envoy.admin}"
                )
                traffic = _ZonesTraffic(url, envoy, started, requests, rate, phase_seconds, stop)
                return await traffic.run()
            finally:
                await envoy.stop()
    finally:
        await plane.stop()
        print("stopped: traffic, Envoy, backends, control plane")


def _in_zone(config: dict[str, Any]) -> None:
    config["node"]["locality"] = {"region": NODE_REGION, "zone": NODE_ZONE}


class _ZonesTraffic:
    """Requests through Envoy, phase after phase, shown live."""

    session: aiohttp.ClientSession  # while `run` runs
    failover: Failover  # read from Envoy before the traffic starts

    def __init__(
        self,
        url: str,
        envoy: Envoy,
        started: list[Backend],
        requests: int,
        rate: float,
        phase_seconds: float,
        stop: asyncio.Event,
    ) -> None:
        self.url, self.envoy, self.stop = url, envoy, stop
        self.backends = {backend.name: backend for backend in started}
        self.name_of = {backend.host: backend.name for backend in started}
        self.requests, self.rate, self.phase_seconds = requests, rate, phase_seconds
        self.interactive = sys.stdout.isatty()
        self.phases: list[Phase] = []
        self.ejected: set[str] = set()
        self.failed_at: dict[str, float] = {}  # a backend's last failure: what ejected it
        self.return_at: float | None = None  # when zone-a's ejection ends, about
        self.clock = time.monotonic()

    async def run(self) -> int:
        async with aiohttp.ClientSession() as session:
            self.session = session
            if not await self._ready():
                return 0
            await self._traffic()
        print()
        # The failing phase fails requests by design (until Envoy ejects zone-a's hosts); any
        # other failure is the demo's own.
        failed = sum(p.failures.total() for p in self.phases if PHASES[p.number - 1][1] == 200)
        return 0 if failed == 0 else 1

    async def _ready(self) -> bool:
        """Envoy routes, with zone-a at priority 0; what it holds for failover is printed."""
        expected = {
            b.host: 0 if ZONE_OF[b.name] == NODE_ZONE else 1 for b in self.backends.values()
        }
        for condition, what in (
            (self._routed, "Envoy routing to the zones demo's backends"),
            (lambda: self._equal(self._priorities(), expected), f"{NODE_ZONE} at priority 0"),
        ):
            if self.stop.is_set():
                return False
            await wait_for(condition, timeout=20, what=what)
        self.failover = await self._failover()
        levels = ", ".join(
            f"{zone} ({', '.join(n for n, of in ZONE_OF.items() if of == zone)}) at priority"
            f" {0 if zone == NODE_ZONE else 1}"
            for zone in ZONES
        )
        print(f"envoy's {ZONES_CLUSTER}: {levels}")
        print(f"try:   curl -H 'Host: {ZONES_HOST}' {self.url}\n")
        return not self.stop.is_set()

    async def _traffic(self) -> None:
        self.clock = time.monotonic()
        shown_at = 0.0
        sent = 0
        phase = await self._begin(1)
        while not self.stop.is_set() and (self.requests <= 0 or sent < self.requests):
            now = self._now()
            if now - phase.started >= self.phase_seconds and phase.number < len(PHASES):
                await self._show(phase, final=True)
                phase = await self._begin(phase.number + 1)
                shown_at = time.monotonic()
            name, ok = await self._ask()
            sent += 1
            zone = ZONE_OF.get(name, "?")
            if ok:
                phase.answers[name] += 1
                phase.recent.append(zone)
                if phase.number > 2 and zone == NODE_ZONE and phase.back_at is None:
                    phase.back_at = self._now()
            else:
                phase.failures[name] += 1
                phase.recent.append("failed")
                self.failed_at[name] = self._now()
            if time.monotonic() - shown_at >= (0.25 if self.interactive else 2.0):
                shown_at = time.monotonic()
                await self._show(phase)
            # Pace to the requested rate; wake early on Ctrl-C.
            delay = self.clock + sent / self.rate - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), delay)
        await self._show(phase, final=True)

    async def _begin(self, number: int) -> Phase:
        phase = Phase(number, self._now())
        self.phases.append(phase)
        status = PHASES[number - 1][1]
        for name, backend in self.backends.items():
            if ZONE_OF[name] == NODE_ZONE:
                backend.status = status
        f = self.failover
        if number == 1:
            text = (
                f"all healthy, for {self.phase_seconds:g}s. Envoy's node is in {NODE_ZONE}, so"
                f" {NODE_ZONE}'s endpoints are its priority 0 and zone-b's its priority 1;"
                f" priority 0 keeps all the traffic while at least {f.threshold:.0%} of it is"
                f" healthy (overprovisioning factor {f.overprovisioning:g})."
            )
        elif number == 2:
            text = (
                f"{NODE_ZONE}'s backends answer 503, for {self.phase_seconds:g}s. Outlier"
                f" detection ejects a host after {f.consecutive_5xx} consecutive 5xx, so about"
                f" 2 x {f.consecutive_5xx} requests fail; below {f.threshold:.0%} healthy,"
                f" {NODE_ZONE} spills traffic over to priority 1 (zone-b), all of it once both"
                " hosts are ejected."
            )
        else:
            await self._refresh_ejected()
            ejected = sorted(n for n in self.ejected if ZONE_OF.get(n) == NODE_ZONE)
            until = (
                f"until {self.requests:,} requests in all" if self.requests > 0 else "until Ctrl-C"
            )
            if ejected:
                self.return_at = max(self.failed_at.get(n, phase.started) for n in ejected) + (
                    f.ejection_seconds
                )
                text = (
                    f"{NODE_ZONE}'s backends answer 200 again, {until}. Envoy sends nothing to"
                    f" the ejected {', '.join(ejected)} until the ejection time is over"
                    f" ({f.ejection_seconds:g}s after each was ejected, longer on a repeat:"
                    f" about t={self.return_at:.0f}s); then the traffic returns to {NODE_ZONE}."
                )
            else:
                text = (
                    f"{NODE_ZONE}'s backends answer 200 again, {until}. None of them is ejected,"
                    f" so {NODE_ZONE} takes its traffic back at once."
                )
        _keep_shown()
        # Flushed: a pipe (`| tee`, a test) sees the phase begin, not only its first block.
        print(f"phase {number}/{len(PHASES)} (t={phase.started:.1f}s): {text}", flush=True)
        return phase

    async def _show(self, phase: Phase, final: bool = False) -> None:
        await self._refresh_ejected()
        note = ""
        if phase.number > 2 and phase.back_at is not None:
            note = f"{NODE_ZONE} answering again since t={phase.back_at:.1f}s"
        elif phase.number > 2 and self.return_at is not None:
            note = f"{NODE_ZONE} ejected: back at about t={self.return_at:.0f}s"
        elapsed = self._now() - phase.started
        _show(render_zones(phase, elapsed, self.ejected, note), self.interactive)
        if final:
            _keep_shown()

    def _now(self) -> float:
        return time.monotonic() - self.clock

    async def _ask(self) -> tuple[str, bool]:
        """One request through Envoy: the backend that answered ("" when none did), and whether
        it answered 200."""
        try:
            async with self.session.get(
                self.url, headers={"Host": ZONES_HOST}, timeout=aiohttp.ClientTimeout(total=5.0)
            ) as response:
                await response.read()
                return response.headers.get("x-backend", ""), response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return "", False

    async def _routed(self) -> bool:
        _, ok = await self._ask()
        return ok

    async def _hosts(self) -> list[dict[str, Any]]:
        """Envoy's hosts of the demo's cluster (admin /clusters)."""
        data = await self.envoy.get_json("/clusters?format=json")
        for cluster in data.get("cluster_statuses", []):
            if cluster["name"] == ZONES_CLUSTER:
                return list(cluster.get("host_statuses", []))
        return []

    async def _priorities(self) -> dict[str, int]:
        hosts = await self._hosts()
        return {h["address"]["socket_address"]["address"]: h.get("priority", 0) for h in hosts}

    async def _refresh_ejected(self) -> None:
        """The backends Envoy has ejected now (outlier detection); as before when its admin does
        not answer."""
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
            self.ejected = {
                self.name_of.get(host["address"]["socket_address"]["address"], "?")
                for host in await self._hosts()
                if host.get("health_status", {}).get("failed_outlier_check")
            }

    @staticmethod
    async def _equal(found: Awaitable[object], expected: object) -> bool:
        return bool(await found == expected)

    async def _failover(self) -> Failover:
        """Outlier detection and overprovisioning factor as Envoy holds them (Envoy's defaults
        where the control plane sets none)."""
        dump = await self.envoy.config_dump(include_eds=True)
        outlier: dict[str, Any] = {}
        factor = 140
        for config in dump.get("configs", []):
            for entry in config.get("dynamic_active_clusters", []):
                if entry.get("cluster", {}).get("name") == ZONES_CLUSTER:
                    outlier = entry["cluster"].get("outlier_detection", {})
            for entry in config.get("dynamic_endpoint_configs", []):
                assignment = entry.get("endpoint_config", {})
                if assignment.get("cluster_name") == ZONES_CLUSTER:
                    factor = assignment.get("policy", {}).get("overprovisioning_factor", factor)
        if not outlier:
            print(f"warning: {ZONES_CLUSTER} has no outlier detection: zone-a will not be ejected")
        return Failover(
            consecutive_5xx=int(outlier.get("consecutive_5xx", 5)),
            ejection_seconds=float(str(outlier.get("base_ejection_time", "30s")).rstrip("s")),
            overprovisioning=int(factor) / 100,
        )
