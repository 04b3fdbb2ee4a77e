"""Propagation benchmark: manifest write -> one real Envoy has the change and has ACKed it.

For each variant, `xds serve` runs in a process of its own on S Services x E endpoints, with one
real Envoy bootstrapped by `xds bootstrap` (ADS state of the world unless `--mode` says otherwise).
The Services come from

- `file`:  one manifest file holding every Service (a change rewrites the whole file);
- `files`: one file per Service (a change rewrites one small file);
- `kube`:  the Kubernetes source (`xds serve --kubernetes`) fed by the Kubernetes API stand-in of
  the tests (tests/kubeapi.py, real list/watch HTTP, the official client unmodified), in a thread
  of this process; a change is one EndpointSlice update.

A change gives the first endpoint of one Service an address no earlier change used, one change at
a time (each an isolated source event, `--gap` apart). The clock starts at the write (the rename
of the replaced file, or the API server's commit) and stops at Envoy's own time stamps: when it
creates the host at the new address ("has") and when it accepts the response that carried it,
right before its ACK ("ACKed"). How these are read, at no cost to the control plane, is in
bench/_propagation.py. Nothing polls the control plane or Envoy's admin while a change is timed,
and no traffic is sent. Prints p50/p99/max per variant with the machine noted; it never fails on a
timing (a variant that times out is reported with what it has, and the exit status is 1).

    python bench/propagation.py                            # 3 and 1,000 Services x file/files/kube
    python bench/propagation.py --services 1000 --source files --changes 100 --mode delta-ads
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # tests.kubeapi
from _common import (  # noqa: E402
    MAX_CHANGES,
    SERVICE_PORT,
    Clock,
    Deadline,
    Workload,
    bounded,
    interrupt_on_sigterm,
    listed,
    log_tail,
    ms,
    service_file,
    start_serve,
    stop,
    summary,
    wait_until,
    write_atomically,
)
from _propagation import (  # noqa: E402
    IDLE_SETTLE_S,
    MAX_ENDPOINTS,
    MAX_SERVICES,
    EnvoyProcess,
    Plan,
    Result,
    bootstrap,
    idle_cores,
    machine,
    measure_changes,
)

from xds.local import free_port  # noqa: E402

SOURCES = ("file", "files", "kube")
MODES = ("ads", "xds", "delta-ads", "delta")
READY_TIMEOUT_S = 180.0  # control plane ready, Envoy holding every cluster


# --- where the Services live -----------------------------------------------------------------


class OneFile:
    """Every Service in one manifest file."""

    def __init__(self, workload: Workload, directory: Path) -> None:
        self.workload = workload
        self.path = directory / "services.yaml"
        self.chunks = [workload.manifest(i) for i in range(workload.services)]

    def write_all(self) -> None:
        write_atomically(self.path, "---\n".join(self.chunks))

    def apply(self, index: int) -> float:
        self.chunks[index] = self.workload.manifest(index)
        return write_atomically(self.path, "---\n".join(self.chunks))


class PerFile:
    """One manifest file per Service."""

    def __init__(self, workload: Workload, directory: Path) -> None:
        self.workload = workload
        self.directory = directory

    def write_all(self) -> None:
        for index in range(self.workload.services):
            service_file(self.directory, index).write_text(self.workload.manifest(index))

    def apply(self, index: int) -> float:
        return write_atomically(service_file(self.directory, index), self.workload.manifest(index))


class KubeAPI:
    """The Services in the Kubernetes API stand-in, served from a thread of this process."""

    def __init__(self, workload: Workload, directory: Path) -> None:
        from tests.kubeapi import ENDPOINTSLICES, SERVICES, KubeAPIServer

        self.workload = workload
        self.kinds = (SERVICES, ENDPOINTSLICES)
        self.api = KubeAPIServer(bookmark_interval=30.0)
        self.kubeconfig = directory / "kubeconfig"

    def write_all(self) -> None:
        self.api.start_in_thread()
        server = {"name": "bench", "cluster": {"server": self.api.url}}
        self.kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [server],
                    "users": [{"name": "bench", "user": {"token": "not-checked"}}],
                    "contexts": [
                        {"name": "bench", "context": {"cluster": "bench", "user": "bench"}}
                    ],
                    "current-context": "bench",
                }
            )
        )
        services, slices = self.kinds
        for index in range(self.workload.services):
            self.api.apply(services, self.workload.service(index))
            self.api.apply(slices, self.workload.endpoint_slice(index))

    def apply(self, index: int) -> float:
        obj = self.workload.endpoint_slice(index)
        written = time.time()
        self.api.apply(self.kinds[1], obj)
        return written

    def close(self) -> None:
        self.api.stop_in_thread()


# --- one variant -----------------------------------------------------------------------------


def run_variant(source: str, services: int, mode: str, plan: Plan, clock: Clock) -> Result:
    """`xds serve` on S Services from `source`, one Envoy in `mode`: idle CPU if asked, then the
    changes. A variant that fails or runs out of time is returned with what it has and a note."""
    result = Result(f"{source:<5} {services:>6,} {mode:<9}")
    with tempfile.TemporaryDirectory(prefix="xds-propagation-") as tmp:
        workdir = Path(tmp)
        manifests = workdir / "manifests"
        manifests.mkdir()
        workload = Workload(services, plan.endpoints)
        where: OneFile | PerFile | KubeAPI
        if source == "file":
            where = OneFile(workload, manifests)
        elif source == "files":
            where = PerFile(workload, manifests)
        else:
            where = KubeAPI(workload, workdir)
        plane_log = workdir / "xds-serve.log"
        envoy: EnvoyProcess | None = None
        plane = None
        try:
            where.write_all()
            listener_port = free_port()
            input_args = (
                ["--kubernetes", "--kubeconfig", str(where.kubeconfig)]
                if isinstance(where, KubeAPI)
                else ["--manifests", str(manifests)]
            )
            started = time.monotonic()
            plane, xds_port, _ = start_serve(
                plane_log, clock.left(READY_TIMEOUT_S), *input_args,
                "--listener-address", "127.0.0.1",
                "--listener-port-offset", str(listener_port - SERVICE_PORT),
            )  # fmt: skip
            envoy = EnvoyProcess(bootstrap(f"bench-{mode}", xds_port, mode), workdir, "envoy")
            envoy.start(clock.left(READY_TIMEOUT_S))
            wait_until(
                lambda: envoy is not None and envoy.has_clusters(services + 1),
                clock.left(READY_TIMEOUT_S),
                f"Envoy holding {services} clusters",
            )
            result.setup_s = time.monotonic() - started
            if plan.idle:
                time.sleep(min(IDLE_SETTLE_S, clock.left()))
                result.idle_plane, result.idle_envoy = idle_cores(
                    [plane.pid, envoy.process.pid if envoy.process else 0], plan.idle
                )
            measure_changes(result, envoy, workload, where.apply, plan, clock)
        except (Deadline, RuntimeError) as exc:
            result.note = str(exc).splitlines()[0]
            print(f"{result.label}: {exc}", file=sys.stderr)
            print(f"control plane log (last lines):\n{log_tail(plane_log)}", file=sys.stderr)
        finally:
            if envoy is not None:
                envoy.stop()
            stop(plane)
            if isinstance(where, KubeAPI):
                where.close()
    return result


# --- report ----------------------------------------------------------------------------------


HEADER = (
    f"{'source':<5} {'Services':>8} {'mode':<9} {'changes':>7} "
    f"{'has p50':>8} {'ACKed p50':>9} {'p99':>8} {'max':>8} {'set-up':>7}"
)
UNITS = f"{'':<5} {'':>8} {'':<9} {'':>7} {'ms':>8} {'ms':>9} {'ms':>8} {'ms':>8} {'s':>7}"


def row(result: Result) -> str:
    has50, _, _ = summary(result.has)
    p50, p99, top = summary(result.accepted)
    setup = "-" if result.setup_s is None else f"{result.setup_s:.1f}"
    line = (
        f"{result.label} {len(result.accepted):>7} {ms(has50):>8} {ms(p50):>9} "
        f"{ms(p99):>8} {ms(top):>8} {setup:>7}"
    )
    if result.idle_plane is not None and result.idle_envoy is not None:
        line += f"  idle: xds {result.idle_plane:.3f} cores, Envoy {result.idle_envoy:.3f}"
    if result.note:
        line += f"  (stopped: {result.note})"
    return line


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])

    def source(text: str) -> str:
        if text not in SOURCES:
            raise argparse.ArgumentTypeError(f"one of {', '.join(SOURCES)}")
        return text

    parser.add_argument(
        "--services", type=listed(bounded(1, MAX_SERVICES)), default=[3, 1000],
        help="S, comma-separated (default 3,1000)",
    )  # fmt: skip
    parser.add_argument(
        "--source", type=listed(source), default=list(SOURCES),
        help="file, files, kube, comma-separated (default all three)",
    )  # fmt: skip
    parser.add_argument("--mode", action="append", choices=MODES, help="default: ads")
    parser.add_argument("--endpoints", type=bounded(1, MAX_ENDPOINTS), default=10)
    parser.add_argument("--changes", type=bounded(1, MAX_CHANGES - 1), default=50)
    parser.add_argument("--gap", type=float, default=0.2, help="pause between changes, s")
    parser.add_argument("--gap-jitter", type=float, default=0.1, help="plus uniform(0, this)")
    parser.add_argument(
        "--idle", type=float, default=0.0, help="also measure idle CPU over this many seconds"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="global deadline, s")
    parser.add_argument("--change-timeout", type=float, default=30.0, help="per change, s")
    args = parser.parse_args()
    args.mode = args.mode or ["ads"]
    if min(args.timeout, args.change_timeout) <= 0 or min(args.gap, args.gap_jitter) < 0:
        parser.error("timeouts must be positive, gaps not negative")
    return args


def main() -> int:
    args = parse_args()
    interrupt_on_sigterm()
    clock = Clock(args.timeout)
    plan = Plan(
        args.endpoints, args.changes, args.change_timeout, args.gap, args.gap_jitter, args.idle
    )
    print(f"Propagation, manifest write -> one Envoy; {args.endpoints} endpoints per Service")
    print(f"machine: {machine()}")
    print(HEADER)
    print(UNITS, flush=True)
    failed = False
    for mode in args.mode:
        for services in args.services:
            for source in args.source:
                try:
                    result = run_variant(source, services, mode, plan, clock)
                except Deadline as exc:
                    print(f"stopped: {exc}")
                    return 1
                failed |= bool(result.note)
                print(row(result), flush=True)
    print(
        "has: Envoy created the host at the new address; ACKed: Envoy accepted the response "
        "that carried it (its ACK follows). p99/max are of ACKed; set-up: start -> Envoy holds "
        "every cluster."
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
