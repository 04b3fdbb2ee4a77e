"""Fleet benchmark: the control plane serving N simulated Envoy clients over ADS, on loopback.

What it measures, for each fleet size N (`--streams`), against a control plane of its own:

- connect-all: from the start of the fleet (its worker processes started and imported, told to
  go at once) until every client has ACKed its full initial configuration (CDS, EDS, LDS, RDS);
- change -> all ACKed: for `--changes` single-endpoint changes made one at a time, the time from
  the manifest write until each client ACKs an EDS response carrying the change; p50, p99 and max
  over every (change, client) pair;
- what each client receives per change: bytes (serialized responses), responses and resources;
- the control plane's CPU seconds per change (utime + stime of its process in /proc, from after the
  connect phase to the last change's last ACK, divided by the changes), and its RSS after connect
  and at the end; the fleet's own CPU per change, since it shares the machine;
- failed stream attempts: RPC errors while connecting (each is retried with a backoff);
- with `--storm S`, a connection storm once the changes are done: S more clients (workers of
  their own) connect at once while the N stay connected, and one change is made `STORM_LEAD_S`
  into it; printed: the time until every one of the N ACKed it (against the same figure without
  a storm), how many of the S were configured when it was made and when the last of the N ACKed
  it (a storm starving pushes would show the N waiting for the S), and the storm's connect-all
  time and failed attempts.

How: `xds serve` runs in a process of its own on a directory of S Services x E endpoints, one file
per Service, so that a change is an atomic replace of one small file (one endpoint's address). W
worker processes (`bench/_fleet_client.py`) each open N/W clients, one grpc.aio channel (one TCP
connection) and one ADS stream each, and behave as Envoy does at start-up: clusters (wildcard), then
endpoints for the clusters received, listeners (wildcard), then routes for the names in the
listeners; every response is ACKed. `--delta` does the same with DeltaAggregatedResources. Each
change gives one endpoint an address used by no earlier change, and the workers report back the
wall-clock time at which each client ACKed the first EDS response that holds it; everything runs on
one machine, so the parent compares those times with its own clock at the write.

Endpoint addresses are in 127.0.0.0/8 and never contacted; the only connections are to the control
plane on 127.0.0.1. Every wait has a deadline, the whole run is bounded by `--timeout` (it then
reports what it has and exits 1), and every process it started is stopped on exit or Ctrl-C. It
prints figures and never fails on a timing.

    python bench/fleet.py                                   # N = 100, 1,000; 1,000 x 10 endpoints
    python bench/fleet.py --delta --streams 100,1000,5000 --changes 10
    python bench/fleet.py --streams 1000 --storm 4000 --changes 5   # pushes during a storm
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    MAX_CHANGES,
    STOP_TIMEOUT_S,
    Clock,
    Deadline,
    Workload,
    bounded,
    changed_service,
    cpu_seconds,
    cpu_total,
    interrupt_on_sigterm,
    listed,
    log_tail,
    machine,
    marker_address,
    ms,
    quantile,
    rss_mib,
    service_file,
    start_serve,
    stop,
    write_atomically,
)
from _fleet_client import WorkerSpec, raise_fd_limit, worker_main  # noqa: E402

# Bounds on the counts, so that a typo cannot ask for a million processes or streams.
MAX_STREAMS = 50_000
MAX_WORKERS = 64
MAX_SERVICES = 50_000
MAX_ENDPOINTS = 250
# Waits that are not the measurement itself.
READY_TIMEOUT_S = 120.0  # the control plane's first snapshot, workers' imports
FLUSH_TIMEOUT_S = 5.0
# Between changes, so that each is an isolated source event (rebuilt at once by the leading-edge
# debounce, whose quiet period is 10 ms) rather than coalesced with the one before.
CHANGE_GAP_S = 0.05
# After the connect phase and after the last change: late responses land in the right phase.
SETTLE_S = 1.0
# The storm's change is made this long after its clients are told to go: they are then connecting
# (a storm of thousands takes seconds to configure); the report tells whether it was still going.
STORM_LEAD_S = 1.0


def per_change(before: float | None, after: float | None, changes: int) -> float | None:
    return None if before is None or after is None else (after - before) / changes


# --- processes -------------------------------------------------------------------------------


@dataclass
class Fleet:
    """The processes of one run: the control plane and the workers, stopped by `stop()`."""

    plane: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    workers: list[BaseProcess] = field(default_factory=list)
    pipes: list[Connection] = field(default_factory=list)

    def stop(self) -> None:
        for conn in self.pipes:
            with contextlib.suppress(OSError, ValueError):
                conn.send(("stop",))
        until = time.monotonic() + STOP_TIMEOUT_S
        for process in self.workers:
            process.join(max(0.0, until - time.monotonic()))
        for process in self.workers:
            if process.is_alive():
                process.terminate()
                process.join(2.0)
            if process.is_alive():
                process.kill()
                process.join(2.0)
        for conn in self.pipes:
            conn.close()
        self.workers, self.pipes = [], []
        stop(self.plane)  # after its clients: it would otherwise quit under them
        self.plane = None


def start_plane(fleet: Fleet, manifests: Path, log_path: Path, clock: Clock) -> int:
    """`xds serve` on the manifests, ready; returns its xDS port."""
    fleet.log_path = log_path
    fleet.plane, xds_port, _ = start_serve(
        log_path, clock.left(READY_TIMEOUT_S), "--manifests", str(manifests)
    )
    return xds_port


def receive(
    fleet: Fleet, kind: str, seconds: float, accept: Any = None
) -> dict[int, tuple[Any, ...]]:
    """Waits up to `seconds` for one message of `kind` (matching `accept`, if given) from every
    worker; returns those that came, by worker. A worker's error or death is raised."""
    got: dict[int, tuple[Any, ...]] = {}
    index = {id(conn): i for i, conn in enumerate(fleet.pipes)}
    until = time.monotonic() + seconds
    while len(got) < len(fleet.pipes):
        left = until - time.monotonic()
        if left <= 0:
            break
        waiting = [c for i, c in enumerate(fleet.pipes) if i not in got]
        for conn in wait(waiting, timeout=left):
            assert isinstance(conn, Connection)
            worker = index[id(conn)]
            try:
                message = conn.recv()
            except EOFError:
                raise RuntimeError(f"worker {worker} died") from None
            if message[0] == "error":
                raise RuntimeError(f"worker {worker} failed:\n{message[1]}")
            if message[0] == kind and (accept is None or accept(message)):
                got[worker] = message
    return got


def start_workers(
    fleet: Fleet, target: str, streams: int, workers: int, delta: bool, markers: Any, clock: Clock
) -> None:
    # spawn, not fork: a forked child would inherit the parent's state, and gRPC is not fork-safe.
    context = multiprocessing.get_context("spawn")
    for index in range(workers):
        clients = streams // workers + (1 if index < streams % workers else 0)
        parent_end, child_end = context.Pipe()
        spec = WorkerSpec(index, target, clients, delta, markers)
        process = context.Process(
            target=worker_main, args=(child_end, spec), name=f"fleet-worker-{index}", daemon=True
        )
        process.start()
        child_end.close()
        fleet.workers.append(process)
        fleet.pipes.append(parent_end)
    ready = receive(fleet, "ready", clock.left(READY_TIMEOUT_S))
    if len(ready) < workers:
        raise Deadline("workers not ready in time")


# --- one run ---------------------------------------------------------------------------------


@dataclass
class Result:
    streams: int
    connect_s: float | None = None  # None: not every client configured
    configured: int = 0
    connect_p50_s: float | None = None
    initial_bytes: dict[str, float] = field(default_factory=dict)  # by type, per client
    failures: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, one per (change, client)
    missing: int = 0  # (change, client) pairs never ACKed
    changes_done: int = 0
    plane_cpu: float | None = None  # seconds per change
    fleet_cpu: float | None = None
    rss_connect: float | None = None
    rss_end: float | None = None
    bytes_per: float | None = None  # per client per change
    responses_per: dict[str, float] = field(default_factory=dict)
    resources_per: dict[str, float] = field(default_factory=dict)
    broken: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # "connect CODE" / "later CODE"
    error_examples: dict[str, str] = field(default_factory=dict)
    storm: Storm | None = None
    note: str = ""


@dataclass
class Storm:
    """A connection storm made on a configured fleet, and one change pushed during it."""

    streams: int
    connect_s: float | None = None  # None: not every storm client configured in time
    configured: int = 0
    failures: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)  # the change, ACKed by the fleet's N
    missing: int = 0
    change_at_s: float | None = None  # the change's write, from the storm's start
    last_ack_s: float | None = None  # the last of the N's ACKs, from the storm's start
    configured_before_change: int = 0  # storm clients configured when the change was made
    configured_before_last_ack: int = 0


def run_one(args: argparse.Namespace, streams: int, clock: Clock, result: Result) -> None:
    with tempfile.TemporaryDirectory(prefix="xds-fleet-") as tmp:
        workdir = Path(tmp)
        manifests = workdir / "manifests"
        manifests.mkdir()
        workload = Workload(args.services, args.endpoints)
        for index in range(args.services):
            service_file(manifests, index).write_text(workload.manifest(index))
        fleet = Fleet()
        try:
            _run(args, streams, clock, result, fleet, workload, manifests)
        except Deadline as exc:
            result.note = str(exc)
            raise
        except BaseException:
            tail = log_tail(fleet.log_path, 20)
            print(f"control plane log (last lines):\n{tail}", file=sys.stderr)
            raise
        finally:
            fleet.stop()


def _run(
    args: argparse.Namespace,
    streams: int,
    clock: Clock,
    result: Result,
    fleet: Fleet,
    workload: Workload,
    manifests: Path,
) -> None:
    log_dir = args.log_dir or manifests.parent
    log_dir.mkdir(parents=True, exist_ok=True)
    mode = "delta" if args.delta else "sotw"
    log_path = log_dir / f"xds-serve-{mode}-{streams}.log"
    xds_port = start_plane(fleet, manifests, log_path, clock)
    assert fleet.plane is not None
    pid = fleet.plane.pid
    # The storm's change, if any, is number changes + 1.
    last_marker = args.changes + (1 if args.storm else 0)
    markers = tuple((k, marker_address(k)) for k in range(1, last_marker + 1))
    start_workers(fleet, f"127.0.0.1:{xds_port}", streams, args.workers, args.delta, markers, clock)

    # Connect phase: workers stop waiting at the deadline and report what they have.
    started = time.time()
    connect_deadline = started + clock.left(args.connect_timeout)
    for conn in fleet.pipes:
        conn.send(("go", connect_deadline))
    connected = receive(fleet, "connected", clock.left(connect_deadline - time.time() + 10))
    configured_at = [t for m in connected.values() for t in m[1]]
    result.failures = sum(m[2] for m in connected.values())
    result.configured = len(configured_at)
    initial: Counter[str] = Counter()
    for m in connected.values():
        initial.update(m[4]["bytes"])
        result.errors.update(m[5])
        for key, example in m[6].items():
            result.error_examples.setdefault(key, example)
    result.initial_bytes = {t: n / max(1, len(configured_at)) for t, n in sorted(initial.items())}
    if configured_at:
        result.connect_p50_s = statistics.median(configured_at) - started
    if len(connected) < len(fleet.pipes) or result.configured < streams:
        result.note = f"only {result.configured} of {streams} clients configured in time"
        raise Deadline(result.note)
    result.connect_s = max(configured_at) - started
    time.sleep(SETTLE_S)
    result.rss_connect = rss_mib(pid)

    for conn in fleet.pipes:
        conn.send(("begin",))
    workers_pids = [p.pid for p in fleet.workers if p.pid is not None]
    cpu_before = cpu_seconds(pid)
    fleet_before = cpu_total(workers_pids)
    try:
        for change in range(1, args.changes + 1):
            written = make_change(workload, manifests, change)
            acked = await_acks(args, fleet, change, clock)
            result.latencies += [t - written for m in acked.values() for t in m[2]]
            missing = sum(m[3] for m in acked.values())
            result.missing += missing
            result.changes_done = change
            if missing or len(acked) < len(fleet.pipes):
                result.note = f"change {change}: not ACKed by every client within its timeout"
                break
            time.sleep(CHANGE_GAP_S)
    finally:
        if result.changes_done:
            done = result.changes_done
            result.plane_cpu = per_change(cpu_before, cpu_seconds(pid), done)
            result.fleet_cpu = per_change(fleet_before, cpu_total(workers_pids), done)
        result.rss_end = rss_mib(pid)
    time.sleep(min(SETTLE_S, clock.left()))
    for conn in fleet.pipes:
        conn.send(("stats",))
    stats = receive(fleet, "stats", clock.left(FLUSH_TIMEOUT_S))
    clients = sum(m[1]["clients"] for m in stats.values())
    pairs = max(1, clients * result.changes_done)
    result.broken = sum(m[1]["broken"] for m in stats.values())
    result.errors = Counter()  # the totals, connect phase included
    for m in stats.values():
        result.errors.update(m[1]["errors"])
        for key, example in m[1]["examples"].items():
            result.error_examples.setdefault(key, example)
    if result.changes_done and clients:
        result.bytes_per = sum(sum(m[1]["bytes"].values()) for m in stats.values()) / pairs
        responses: Counter[str] = Counter()
        resources: Counter[str] = Counter()
        for m in stats.values():
            responses.update(m[1]["responses"])
            resources.update(m[1]["resources"])
        result.responses_per = {t: n / pairs for t, n in sorted(responses.items())}
        result.resources_per = {t: n / pairs for t, n in sorted(resources.items())}
    if result.note:
        raise Deadline(result.note)
    if args.storm:
        result.storm = Storm(args.storm)
        target = f"127.0.0.1:{xds_port}"
        run_storm(args, target, workload, manifests, fleet, clock, result.storm)
        if result.storm.connect_s is None or result.storm.missing:
            result.note = "storm: not every client configured, or the change not ACKed by all"
            raise Deadline(result.note)


def make_change(workload: Workload, manifests: Path, change: int) -> float:
    """Gives one endpoint the change's marker address, by an atomic replace of its Service's
    file; returns the wall-clock time it was made (the rename)."""
    service = changed_service(change, workload.services)
    workload.first[service] = marker_address(change)
    return write_atomically(service_file(manifests, service), workload.manifest(service))


def await_acks(
    args: argparse.Namespace, fleet: Fleet, change: int, clock: Clock
) -> dict[int, tuple[Any, ...]]:
    """Every worker's ("acked", change, times, missing), or what the late ones have."""

    def this_change(message: tuple[Any, ...]) -> bool:
        return bool(message[1] == change)

    acked = receive(fleet, "acked", clock.left(args.change_timeout), accept=this_change)
    if len(acked) < len(fleet.pipes):
        # Late: ask the others for what they have (the caller then stops).
        for i, conn in enumerate(fleet.pipes):
            if i not in acked:
                conn.send(("flush", change))
        acked.update(receive(fleet, "acked", FLUSH_TIMEOUT_S, accept=this_change))
    return acked


def run_storm(
    args: argparse.Namespace,
    target: str,
    workload: Workload,
    manifests: Path,
    fleet: Fleet,
    clock: Clock,
    storm: Storm,
) -> None:
    """S more clients connect at once while the fleet's N stay connected; a change is made
    during it and timed to the N's ACKs. The storm's workers are stopped before returning."""
    crowd = Fleet()  # the storm's workers alone (the control plane stays the fleet's)
    try:
        # No markers: the storm's clients are not timed on changes, only on connecting.
        start_workers(crowd, target, storm.streams, args.workers, args.delta, (), clock)
        started = time.time()
        connect_deadline = started + clock.left(args.connect_timeout)
        for conn in crowd.pipes:
            conn.send(("go", connect_deadline))
        time.sleep(min(STORM_LEAD_S, clock.left()))
        change = args.changes + 1
        written = make_change(workload, manifests, change)
        acked = await_acks(args, fleet, change, clock)
        storm.latencies = [t - written for m in acked.values() for t in m[2]]
        storm.missing = sum(m[3] for m in acked.values())
        storm.change_at_s = written - started
        if storm.latencies:
            storm.last_ack_s = written + max(storm.latencies) - started
        connected = receive(crowd, "connected", clock.left(connect_deadline - time.time() + 10))
        configured_at = sorted(t for m in connected.values() for t in m[1])
        storm.configured = len(configured_at)
        storm.failures = sum(m[2] for m in connected.values())
        for m in connected.values():
            storm.errors.update(m[5])
            for key, example in m[6].items():
                storm.error_examples.setdefault(key, example)
        storm.configured_before_change = sum(1 for t in configured_at if t <= written)
        if storm.last_ack_s is not None:
            last_ack = started + storm.last_ack_s
            storm.configured_before_last_ack = sum(1 for t in configured_at if t <= last_ack)
        if len(connected) == len(crowd.pipes) and storm.configured == storm.streams:
            storm.connect_s = configured_at[-1] - started
    finally:
        crowd.stop()


# --- report ----------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


HEADER = (
    f"{'streams':>7} {'connect-all':>11} {'change->all ACKed p50':>21} {'p99':>9} {'max':>9} "
    f"{'bytes/client':>12} {'CP CPU':>9} {'CP RSS MiB':>15} {'failed':>6}"
)
UNITS = (
    f"{'':>7} {'s':>11} {'ms':>21} {'ms':>9} {'ms':>9} "
    f"{'/change':>12} {'s/change':>9} {'connect / end':>15} {'tries':>6}"
)


def row(r: Result) -> str:
    ordered = sorted(r.latencies)
    p50 = quantile(ordered, 0.50) if ordered else None
    p99 = quantile(ordered, 0.99) if ordered else None
    top = ordered[-1] if ordered else None
    connect = _fmt(r.connect_s, ".2f")
    if r.connect_s is None and r.configured:
        connect = f"({r.configured} ok)"
    rss = f"{_fmt(r.rss_connect, '.0f')} / {_fmt(r.rss_end, '.0f')}"
    return (
        f"{r.streams:>7,} {connect:>11} {ms(p50):>21} {ms(p99):>9} {ms(top):>9} "
        f"{_fmt(r.bytes_per, ',.0f'):>12} {_fmt(r.plane_cpu, '.3f'):>9} {rss:>15} "
        f"{r.failures:>6}"
    )


def details(r: Result) -> str:
    def per(counts: dict[str, float]) -> str:
        return ", ".join(f"{t} {n:.2f}" for t, n in counts.items()) or "none"

    lines = [
        f"  N={r.streams:,}: {r.changes_done} changes x {r.configured:,} clients "
        f"= {len(r.latencies):,} ACKs timed, {r.missing} missing; "
        f"per-client config time p50 {_fmt(r.connect_p50_s, '.2f')} s; "
        f"initial config per client {sum(r.initial_bytes.values()) / 1024:,.0f} KiB "
        f"({', '.join(f'{t} {n / 1024:,.0f}' for t, n in r.initial_bytes.items())})",
        f"    per client per change: responses {per(r.responses_per)}; "
        f"resources {per(r.resources_per)}; fleet CPU {_fmt(r.fleet_cpu, '.3f')} s/change; "
        f"streams broken after connect {r.broken}",
    ]
    for key, count in sorted(r.errors.items()):
        lines.append(f"    RPC errors, {key}: {count:,} (e.g. {r.error_examples.get(key, '')!r})")
    if r.storm is not None:
        lines += storm_details(r, r.storm)
    if r.note:
        lines.append(f"    stopped: {r.note}")
    return "\n".join(lines)


def storm_details(r: Result, s: Storm) -> list[str]:
    def spread(samples: list[float]) -> str:
        if not samples:
            return "none"
        ordered = sorted(samples)
        return (
            f"p50 {ms(quantile(ordered, 0.5))} / p99 {ms(quantile(ordered, 0.99))} / "
            f"max {ms(ordered[-1])} ms"
        )

    connect = (
        f"all configured in {s.connect_s:.2f} s"
        if s.connect_s is not None
        else f"{s.configured:,} configured in time"
    )
    lines = [
        f"  storm: {s.streams:,} more streams at once on the {r.configured:,} configured: "
        f"{connect}; failed tries {s.failures}",
        f"    a change made {_fmt(s.change_at_s, '.2f')} s into it, ACKed by the "
        f"{r.configured:,}: {spread(s.latencies)}, {s.missing} missing "
        f"(without a storm: {spread(r.latencies)})",
        f"    storm clients configured when it was made: {s.configured_before_change:,}; "
        f"when the last of the {r.configured:,} ACKed it "
        f"({_fmt(s.last_ack_s, '.2f')} s into the storm): {s.configured_before_last_ack:,}",
    ]
    for key, count in sorted(s.errors.items()):
        lines.append(
            f"    storm RPC errors, {key}: {count:,} (e.g. {s.error_examples.get(key, '')!r})"
        )
    return lines


# --- main ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])

    sizes = listed(bounded(1, MAX_STREAMS))
    parser.add_argument("--streams", type=sizes, default=[100, 1000], help="N, comma-separated")
    parser.add_argument("--services", type=bounded(1, MAX_SERVICES), default=1000)
    parser.add_argument("--endpoints", type=bounded(1, MAX_ENDPOINTS), default=10)
    parser.add_argument("--workers", type=bounded(1, MAX_WORKERS), default=4)
    parser.add_argument("--changes", type=bounded(1, MAX_CHANGES), default=20)
    parser.add_argument("--delta", action="store_true", help="incremental xDS (delta ADS)")
    parser.add_argument(
        "--storm",
        type=bounded(0, MAX_STREAMS),
        default=0,
        help="after the changes, this many more streams connect at once and one change is timed "
        "during it (0: no storm)",
    )
    parser.add_argument(
        "--log-dir", type=Path, help="keep the control plane's log (WARNING and up) there"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="global deadline, seconds")
    parser.add_argument(
        "--connect-timeout", type=float, default=120.0, help="connect phase deadline, seconds"
    )
    parser.add_argument(
        "--change-timeout", type=float, default=60.0, help="deadline of one change, seconds"
    )
    args = parser.parse_args()
    if min(args.timeout, args.connect_timeout, args.change_timeout) <= 0:
        parser.error("timeouts must be positive")
    return args


def main() -> int:
    args = parse_args()
    interrupt_on_sigterm()
    clock = Clock(args.timeout)
    # Inherited by the control plane and the workers: each stream is a descriptor on both ends.
    limit = raise_fd_limit()
    mode = "delta ADS" if args.delta else "SotW ADS"
    print(
        f"fleet: {mode}, {args.services:,} Services x {args.endpoints} endpoints, "
        f"{args.workers} workers, {args.changes} changes"
        f"{f', then a storm of {args.storm:,} streams' if args.storm else ''}; {machine()}; "
        f"open files {limit:,}"
    )
    if max(args.streams) + args.storm + 100 > limit:
        print(f"warning: open-file limit {limit} is below the largest N", file=sys.stderr)
    print(HEADER)
    print(UNITS)
    results: list[Result] = []
    status = 0
    try:
        for streams in args.streams:
            result = Result(streams)
            results.append(result)
            try:
                run_one(args, streams, clock, result)
            finally:
                print(row(result), flush=True)
    except Deadline as exc:
        print(f"incomplete: {exc}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        status = 130
    for result in results:
        print(details(result))
    return status


if __name__ == "__main__":
    sys.exit(main())
