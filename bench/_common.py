"""What the benchmarks share: the workload (S Services x E endpoints as Kubernetes manifests, and
the marker addresses that make each change recognisable), the global deadline, starting and stopping
the processes they run (`xds serve` among them), what /proc says of a process, the machine line
printed with every table, quantiles, and argparse's bounded counts.

Every address here is in 127.0.0.0/8 (endpoints and markers are configuration text, never
contacted) or a Kubernetes service-range ClusterIP (never dialled).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from xds.local import free_port

SERVICE_PORT = 80
TARGET_PORT = 8080
NAMESPACES = 20
MAX_CHANGES = 10_000  # markers are 127.254.<k / 256>.<k % 256>
STOP_TIMEOUT_S = 10.0
SETUP_POLL_S = 0.1  # polling during set-up only, never while a change is measured
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Deadline(Exception):
    """A wait, or the whole run, ran out of time: the run reports what it has."""


class Clock:
    """The global deadline of a run."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, cap: float | None = None) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise Deadline("global deadline (--timeout) reached")
        return left if cap is None else min(left, cap)


def wait_until(condition: Callable[[], object], seconds: float, what: str) -> None:
    """Polls `condition` every SETUP_POLL_S until it is truthy; Deadline after `seconds`."""
    until = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > until:
            raise Deadline(f"{what}: not within {seconds:.0f} s")
        time.sleep(SETUP_POLL_S)


# --- the workload ----------------------------------------------------------------------------


def endpoint_address(service: int, endpoint: int) -> str:
    # 127.1.0.0 upwards: 127.0.0.1 is the control plane's and 127.254/16 the change markers'.
    return f"127.{1 + service // 256 % 200}.{service % 256}.{endpoint + 1}"


def marker_address(change: int) -> str:
    return f"127.254.{change // 256}.{change % 256}"


def changed_service(change: int, services: int) -> int:
    # Spread over the Services (7919 is prime), so successive changes touch different ones.
    return change * 7919 % services


@dataclass
class Workload:
    """S Services x E endpoints in NAMESPACES namespaces; `first[i]` is Service i's first
    endpoint address, which a change replaces by a marker."""

    services: int
    endpoints: int
    first: dict[int, str] = field(default_factory=dict)

    def name(self, index: int) -> tuple[str, str]:
        return f"bench-{index % NAMESPACES}", f"svc-{index}"

    def addresses(self, index: int) -> list[str]:
        addresses = [endpoint_address(index, e) for e in range(self.endpoints)]
        addresses[0] = self.first.get(index, addresses[0])
        return addresses

    def service(self, index: int) -> dict[str, Any]:
        namespace, name = self.name(index)
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "clusterIP": f"10.96.{index // 256 % 256}.{index % 256}",
                "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": TARGET_PORT}],
            },
        }

    def endpoint_slice(self, index: int) -> dict[str, Any]:
        namespace, name = self.name(index)
        return {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{name}-1",
                "namespace": namespace,
                "labels": {"kubernetes.io/service-name": name},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": TARGET_PORT}],
            "endpoints": [
                {"addresses": [address], "conditions": {"ready": True}}
                for address in self.addresses(index)
            ],
        }

    def manifest(self, index: int) -> str:
        """Service `index` and its EndpointSlice as a YAML stream (JSON is YAML, and fast)."""
        docs = (self.service(index), self.endpoint_slice(index))
        return "---\n".join(json.dumps(doc) + "\n" for doc in docs)


def service_file(directory: Path, index: int) -> Path:
    """Where Service `index` lives when each Service has a file of its own."""
    return directory / f"svc-{index}.yaml"


def write_atomically(path: Path, text: str) -> float:
    """Writes `text` aside, then renames it over `path`; returns the time of the rename.

    An atomic replace, as editors and config-map volumes do: the change's moment is the rename,
    and the temporary name is hidden, so the manifest source never reads it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    written = time.time()
    os.replace(tmp, path)
    return written


# --- processes -------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In a child, before exec: SIGTERM when the benchmark dies, even by SIGKILL, so that nothing
    is left running (Linux's PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def spawn(
    command: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            # A session of its own: Ctrl-C reaches the benchmark alone, which stops it in order
            # (a control plane stopped first would quit under its clients).
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its own session: its workers too
        process.wait(STOP_TIMEOUT_S)


def log_tail(path: Path | None, lines: int = 15) -> str:
    if path is None:
        return "(no log)"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def http_get(url: str, timeout: float = 2.0) -> bytes | None:
    """The body of a 200 answer, or None (connection refused, other status)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body: bytes = response.read()
            return body if response.status == 200 else None
    except (urllib.error.URLError, OSError):
        return None


def xds_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "xds", *args]


def start_serve(
    log_path: Path, seconds: float, *options: str
) -> tuple[subprocess.Popen[bytes], int, int]:
    """`xds serve` with `options`, in a process of its own on free loopback ports; returns it and
    its xDS and admin ports once /readyz answers. Not ready within `seconds`: stopped, Deadline."""
    xds_port, admin_port = free_port(), free_port()
    plane = spawn(
        xds_command(
            "--log-level", "WARNING", "serve", *options,
            "--xds-port", str(xds_port), "--admin-port", str(admin_port),
            # Every endpoint here is on loopback, refused unless allowed.
            "--allow-endpoints", "127.0.0.0/8",
        ),
        log_path,
    )  # fmt: skip

    def ready() -> bool:
        if plane.poll() is not None:
            raise RuntimeError(f"xds serve exited ({plane.returncode}):\n{log_tail(log_path)}")
        return http_get(f"http://127.0.0.1:{admin_port}/readyz") is not None

    try:
        wait_until(ready, seconds, "control plane /readyz")
    except BaseException:
        stop(plane)
        raise
    return plane, xds_port, admin_port


def _terminate(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, through the `finally`s that stop what the benchmark started."""
    signal.signal(signal.SIGTERM, _terminate)


# --- /proc -----------------------------------------------------------------------------------


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name; None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name may hold spaces and parentheses: fields are counted after its ")".
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _cpu(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (every thread); None once it is gone."""
    fields = _stat(pid)
    return None if fields is None else _cpu(fields)


def cpu_total(pids: list[int]) -> float | None:
    """The CPU seconds of several processes; None once any of them is gone."""
    seconds = [cpu_seconds(pid) for pid in pids]
    return None if None in seconds else sum(s for s in seconds if s is not None)


def tree_cpu_seconds(root: int) -> float:
    """utime + stime of a process and all its live descendants (gunicorn workers, say)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat(entry.name)) is not None:
            parents[int(entry.name)] = int(fields[1])
            times[int(entry.name)] = _cpu(fields)
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    return sum(times.get(pid, 0.0) for pid in tree)


def rss_mib(pid: int) -> float | None:
    """VmRSS of a process; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# --- report ----------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine() -> str:
    return (
        f"{os.cpu_count()} cores ({_cpu_model()}), Python {platform.python_version()}, "
        f"{platform.platform()}"
    )


def quantile(ordered: list[float], q: float) -> float:
    """Nearest-rank quantile of sorted samples."""
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 1))))
    return ordered[rank - 1]


def summary(samples: list[float]) -> tuple[float | None, float | None, float | None]:
    """p50, p99, max."""
    if not samples:
        return None, None, None
    ordered = sorted(samples)
    return quantile(ordered, 0.5), quantile(ordered, 0.99), ordered[-1]


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.1f}"


# --- arguments -------------------------------------------------------------------------------


def bounded(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high], so that a typo cannot ask for a million."""

    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}]")
        return value

    return parse


def listed(parse_one: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """An argparse type: comma-separated values, each parsed by `parse_one`."""
    return lambda text: [parse_one(part.strip()) for part in text.split(",") if part.strip()]
