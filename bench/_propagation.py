"""Shared by bench/propagation.py and bench/peer_sovereign.py: one real Envoy, how a change is seen
arriving in it, and the changes timed one at a time (the workload and the processes are
bench/_common.py's).

How "Envoy has the change" is observed, at no cost to the control plane: Envoy runs with the debug
log of its `config` and `upstream` components, each line stamped by Envoy itself to the
microsecond (`--log-format`, UTC). Every change gives one endpoint of one Service an address used
by no earlier change (127.254.x.y), so the change is in Envoy when Envoy logs the creation of a host
with that address, and is accepted (ACKed, for gRPC xDS) at the first line after it that ends an
update of the endpoint or cluster type ("gRPC config for <type> accepted", "Delta config for
<type> accepted", or over REST "cds: added/updated N cluster(s)"): Envoy sends its ACK right after
that line. The benchmark reads the log file (a few stat() calls a second on its own
side); how often it reads does not change the figure, which is Envoy's own time stamp minus the
moment of the write. Nothing polls the control plane or Envoy's admin while a change is measured.

The "write" is the moment the change becomes visible to the control plane: the rename that
replaces a manifest (an atomic replace, as editors and config-map volumes do; the temporary file is
written before the clock starts), or the Kubernetes API stand-in committing the object.

These log lines are Envoy 1.40's (the `envoy` extra's pin); a wait that times out says which line
it waited for. Everything is on loopback; every wait has a deadline; every process started is
stopped on exit (and told to stop if the benchmark dies: Linux's PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    Clock,
    Deadline,
    Workload,
    changed_service,
    http_get,
    log_tail,
    marker_address,
    spawn,
    stop,
    tree_cpu_seconds,
    wait_until,
    xds_command,
)
from _common import machine as _machine

from xds.local import envoy_binary

# Bounds on the counts, so that a typo cannot ask for a million of anything.
MAX_SERVICES = 20_000
MAX_ENDPOINTS = 100
LOG_READ_INTERVAL_S = 0.01
IDLE_SETTLE_S = 2.0  # after set-up, before the idle CPU window
ENVOY_LOG_FORMAT = "%Y-%m-%dT%H:%M:%S.%f|%n|%v"
# The end of an accepted response of the endpoint or cluster type: gRPC and delta xDS log it as
# such; over REST, the cluster manager's summary of a CDS update is the last line it logs.
_ACCEPTED = re.compile(
    r"(?:gRPC config for|Delta config for|Config update for) "
    r"type\.googleapis\.com/envoy\.config\.(?:endpoint\.v3\.ClusterLoadAssignment|"
    r"cluster\.v3\.Cluster)\b.*accepted"
    r"|cds: added/updated \d+ cluster\(s\)"
)


def idle_cores(pids: list[int], seconds: float) -> list[float]:
    """CPU of each process tree over `seconds` of wall time, in cores."""
    before = [tree_cpu_seconds(pid) for pid in pids]
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    return [(tree_cpu_seconds(pid) - b) / elapsed for pid, b in zip(pids, before, strict=True)]


# --- Envoy -----------------------------------------------------------------------------------


def envoy_version() -> str:
    try:
        out = subprocess.run(
            [envoy_binary(), "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    found = re.search(r"/(\d+\.\d+\.\d+)/", out)
    return found.group(1) if found else out.strip() or "unknown"


def machine() -> str:
    return f"{_machine()}, Envoy {envoy_version()}"


_base_ids = iter(range(os.getpid() % 10_000 * 10 + 5, 2**31))


class LogTail:
    """New complete lines of a growing log file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        chunks = (self.partial + data).split(b"\n")
        self.partial = chunks.pop()
        return [chunk.decode(errors="replace") for chunk in chunks]

    def skip(self) -> None:
        """Forget what is logged so far."""
        self.lines()


def envoy_time(line: str) -> float:
    """The time stamp Envoy wrote at the head of a line (ENVOY_LOG_FORMAT, in UTC)."""
    stamp = datetime.datetime.strptime(line.split("|", 1)[0], "%Y-%m-%dT%H:%M:%S.%f")
    return stamp.replace(tzinfo=datetime.UTC).timestamp()


class EnvoyProcess:
    """One Envoy on a bootstrap, logging what the measurement reads (see the module docstring)."""

    def __init__(self, bootstrap: dict[str, Any], workdir: Path, name: str) -> None:
        self.workdir = workdir
        self.config_path = workdir / f"{name}.json"
        self.config_path.write_text(json.dumps(bootstrap, indent=1))
        self.log_path = workdir / f"{name}.log"
        self.admin_path = workdir / f"{name}.admin"
        self.process: subprocess.Popen[bytes] | None = None
        self.admin = ""
        self.tail = LogTail(self.log_path)

    def start(self, seconds: float) -> None:
        command = [
            envoy_binary(), "-c", str(self.config_path), "--base-id", str(next(_base_ids)),
            "--concurrency", "1", "--disable-hot-restart",
            "--log-level", "warn", "--component-log-level", "config:debug,upstream:debug",
            "--log-format", ENVOY_LOG_FORMAT, "--admin-address-path", str(self.admin_path),
        ]  # fmt: skip
        self.process = spawn(command, self.log_path, env={**os.environ, "TZ": "UTC"})

        def admin_up() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"Envoy exited:\n{log_tail(self.log_path)}")
            if not self.admin:
                with contextlib.suppress(OSError):
                    address = self.admin_path.read_text().strip()
                    if address.count(":") == 1:
                        self.admin = f"http://{address}"
            return bool(self.admin) and http_get(f"{self.admin}/ready") is not None

        wait_until(admin_up, seconds, "Envoy admin /ready")

    def stats(self, pattern: str) -> dict[str, int]:
        body = http_get(f"{self.admin}/stats?format=json&filter={pattern}")
        if body is None:
            return {}
        return {
            s["name"]: s["value"]
            for s in json.loads(body).get("stats", [])
            if isinstance(s.get("value"), int)
        }

    def has_clusters(self, count: int) -> bool:
        """Set-up only: `count` clusters active and none warming."""
        stats = self.stats(r"^cluster_manager\.(active|warming)_clusters$")
        return (
            stats.get("cluster_manager.active_clusters") == count
            and stats.get("cluster_manager.warming_clusters") == 0
        )

    def wait_change(self, marker: str, seconds: float) -> tuple[float, float]:
        """Envoy's times of the creation of a host at `marker` and of the acceptance of the
        response that carried it; Deadline after `seconds`."""
        needle = f"host with address {marker}:"
        until = time.monotonic() + seconds
        has: float | None = None
        while True:
            for line in self.tail.lines():
                if has is None and needle in line:
                    has = envoy_time(line)
                elif has is not None and _ACCEPTED.search(line):
                    return has, envoy_time(line)
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"Envoy exited:\n{log_tail(self.log_path)}")
            if time.monotonic() > until:
                step = "a host at " + marker if has is None else "an 'accepted' line after it"
                raise Deadline(f"Envoy did not log {step} within {seconds:.0f} s")
            time.sleep(LOG_READ_INTERVAL_S)

    def stop(self) -> None:
        stop(self.process)
        self.process = None


@dataclass(frozen=True)
class Plan:
    """How one variant is measured."""

    endpoints: int = 10  # per Service
    changes: int = 50  # timed, after one warm-up change
    change_timeout: float = 30.0  # s
    gap: float = 0.2  # pause after each change, s...
    gap_jitter: float = 0.1  # ...plus uniform(0, this)
    idle: float = 0.0  # s of idle CPU measured before the changes (0: none)


# --- results ---------------------------------------------------------------------------------


@dataclass
class Result:
    """One variant: write -> Envoy has the change / has accepted it, per change, in seconds."""

    label: str
    has: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)
    setup_s: float | None = None  # start of the control plane -> Envoy holds every cluster
    idle_plane: float | None = None  # cores
    idle_envoy: float | None = None
    note: str = ""


def measure_changes(
    result: Result,
    envoy: EnvoyProcess,
    workload: Workload,
    apply: Callable[[int], float],
    plan: Plan,
    clock: Clock,
    seed: int = 9,
) -> None:
    """Change 0 is a warm-up (not counted); then `plan.changes` changes one at a time, each
    followed by a pause of plan.gap + uniform(0, plan.gap_jitter) seconds. `apply(index)` makes
    the change to Service `index` (already in `workload.first`) visible and returns the time it
    did."""
    pauses = random.Random(seed)
    for change in range(plan.changes + 1):
        index = changed_service(change, workload.services)
        marker = marker_address(change + 1)  # 127.254.0.0 is not an address to hand out
        workload.first[index] = marker
        envoy.tail.skip()
        written = apply(index)
        has, accepted = envoy.wait_change(marker, clock.left(plan.change_timeout))
        if change:
            result.has.append(has - written)
            result.accepted.append(accepted - written)
        time.sleep(min(plan.gap + pauses.uniform(0, plan.gap_jitter), clock.left()))


def bootstrap(node_id: str, xds_port: int, mode: str) -> dict[str, Any]:
    """The control plane's own bootstrap for Envoy (`xds bootstrap`), admin on a free port."""
    out = subprocess.run(
        xds_command(
            "bootstrap", "--node-id", node_id, "--xds-address", f"127.0.0.1:{xds_port}",
            "--admin-port", "0", "--mode", mode,
        ),
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    config: dict[str, Any] = json.loads(out)
    return config
