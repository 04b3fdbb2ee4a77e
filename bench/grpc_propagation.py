"""gRPC propagation benchmark: manifest write -> a proxyless gRPC client's first RPC on the new
endpoint.

The control plane runs in this process (`ControlPlane` on a manifests directory of one file: the
Service `echo` in namespace `demo`, port `grpc` 50051, and its EndpointSlice). A pool of gRPC
backends (`xds.local.grpc_backends`: 127.0.0.1 .. 127.0.0.B, one port, each answering with its
name) runs in a child process, so that their calls do not share the control plane's event loop.
The client is grpcio's real xDS client (tests/grpc_client.py) in a process of its own, bootstrapped
against the control plane (`xds.bootstrap.grpc_bootstrap`), calling `xds:///echo.demo:50051`.

The EndpointSlice first lists 127.0.0.1 alone; a warm-up change (not counted) adds 127.0.0.2.
From then on it always lists two addresses, and each change replaces the older of them by the
next address of the pool not in it (cyclically), one change at a time, `--gap` apart. A change is
a manifest write (an atomic replace: the temporary file is written, then renamed over the
manifest; the clock starts at the rename). Right after it, the client is told to call until a
call reaches the new backend (`until`); the calls go back to back, one at a time, so the client
keeps traffic on the old endpoints meanwhile. The clock stops when the client's reply arrives
here: the figure is write -> first RPC answered by the new endpoint, plus the pipe back from the
client (the round trip of an empty command over the pipes is measured and printed: it bounds that
overhead from above). Its resolution is one RPC (the mean call time is printed). After each
change, `--check-calls` more calls (outside the timed window) count RPCs that still reach the
endpoint the change removed: there should be none.

On a small machine the client's back-to-back calls and the backends answering them compete with
the control plane for the CPU; `--nice N` runs both at niceness N, which leaves the control plane
(and the benchmark) ahead of them.

Everything is on loopback; every loop is bounded by its count and a deadline (`--change-timeout`
per change, `--timeout` for the run); a change that times out counts as a failure and the exit
status is 1. Every process started is stopped on exit (the children also quit when their stdin
closes, so they do not outlive the benchmark).

    python bench/grpc_propagation.py                  # 100 changes
    python bench/grpc_propagation.py --changes 500 --backends 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # xds, tests/grpc_client.py
from _common import (  # noqa: E402
    MAX_CHANGES,
    Clock,
    Deadline,
    bounded,
    interrupt_on_sigterm,
    log_tail,
    machine,
    ms,
    quantile,
    write_atomically,
)

from xds.app import ControlPlane  # noqa: E402
from xds.bootstrap import grpc_bootstrap  # noqa: E402
from xds.config import Settings  # noqa: E402
from xds.local import free_port, grpc_backends  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CLIENT_SCRIPT = ROOT / "tests" / "grpc_client.py"
NAMESPACE, SERVICE, PORT_NAME, SERVICE_PORT = "demo", "echo", "grpc", 50051
TARGET = f"xds:///{SERVICE}.{NAMESPACE}:{SERVICE_PORT}"
NODE_ID = "grpc-propagation"
SLICE_SIZE = 2  # addresses in the EndpointSlice after the warm-up change
MAX_BACKENDS = 50  # 127.0.0.1 .. 127.0.0.50
START_TIMEOUT_S = 30.0  # a child process ready; the client's first call answered
REPLY_MARGIN_S = 5.0  # the client answers within its command's timeout plus this
STOP_TIMEOUT_S = 5.0
PIPE_SAMPLES = 50  # empty commands timed to measure the pipes' round trip


def backend_name(index: int) -> str:
    return f"b{index}"


def backend_address(index: int) -> str:
    return f"127.0.0.{index}"


def manifest(addresses: list[str], port: int) -> str:
    """The Service and its EndpointSlice as a YAML stream (JSON is YAML)."""
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": SERVICE, "namespace": NAMESPACE},
        "spec": {
            "clusterIP": "10.96.0.10",
            "ports": [{"name": PORT_NAME, "port": SERVICE_PORT, "targetPort": PORT_NAME}],
        },
    }
    endpoint_slice = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{SERVICE}-1",
            "namespace": NAMESPACE,
            "labels": {"kubernetes.io/service-name": SERVICE},
        },
        "addressType": "IPv4",
        "ports": [{"name": PORT_NAME, "port": port}],
        "endpoints": [
            {"addresses": [address], "conditions": {"ready": True}} for address in addresses
        ],
    }
    return "---\n".join(json.dumps(doc) + "\n" for doc in (service, endpoint_slice))


# --- the child processes ---------------------------------------------------------------------


class Child:
    """A child process driven by JSON lines on its stdin and stdout; its stderr goes to a log.
    It quits when its stdin closes, so it does not outlive this process even when killed."""

    def __init__(self, process: asyncio.subprocess.Process, log_path: Path) -> None:
        self.process, self.log_path = process, log_path

    @classmethod
    async def start(cls, command: list[str], log_path: Path, env: dict[str, str]) -> Child:
        with open(log_path, "wb") as log:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=env,
                cwd=ROOT,
                start_new_session=True,  # Ctrl-C reaches the benchmark, which stops it in order
            )
        child = cls(process, log_path)
        try:
            await child.read(START_TIMEOUT_S)  # its first line says it is ready
        except BaseException:
            await child.stop()
            raise
        return child

    async def read(self, seconds: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), seconds)
        except TimeoutError:
            raise Deadline(f"no answer from {self.log_path.stem} within {seconds:.0f} s") from None
        if not line:
            raise RuntimeError(
                f"{self.log_path.stem} exited ({await self.process.wait()}):\n"
                f"{log_tail(self.log_path)}"
            )
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def send(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()

    async def ask(self, command: dict[str, Any], seconds: float) -> dict[str, Any]:
        await self.send(command)
        return await self.read(seconds)

    async def stop(self) -> None:
        """Closes its stdin (it quits), then SIGTERM, then SIGKILL, each bounded in time."""
        if self.process.returncode is not None:
            return
        if self.process.stdin is not None:
            self.process.stdin.close()
        for step in (None, self.process.terminate, self.process.kill):
            if step is not None:
                with contextlib.suppress(ProcessLookupError):
                    step()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_S)
                return


def serve_backends(port: int, count: int) -> None:
    """The backends' child process: `count` gRPC backends on 127.0.0.1 .. 127.0.0.count, `port`;
    prints one line once they listen, stops them when its stdin closes."""

    async def serve() -> None:
        names = [backend_name(index) for index in range(1, count + 1)]
        async with grpc_backends(names, port):
            print(json.dumps({"ready": True}), flush=True)
            await asyncio.to_thread(sys.stdin.read)  # until EOF

    asyncio.run(serve())


# --- the measurement -------------------------------------------------------------------------


@dataclass
class Run:
    latencies: list[float] = field(default_factory=list)  # write -> reply of `until`, s
    calls: list[int] = field(default_factory=list)  # calls until the new endpoint answered
    client_seconds: list[float] = field(default_factory=list)  # the client's own time for them
    failures: list[str] = field(default_factory=list)
    stale: int = 0  # check calls that reached the endpoint just removed
    checked: int = 0  # check calls made
    check_errors: list[str] = field(default_factory=list)
    pipe: list[float] = field(default_factory=list)  # round trips of an empty command, s
    note: str = ""


class Rotation:
    """The EndpointSlice's backends: at first 1 alone; then `SLICE_SIZE`, each change replacing
    the oldest by the next backend of the pool (cyclically) that is not in the slice."""

    def __init__(self, pool: int) -> None:
        self.pool = pool
        self.current: deque[int] = deque([1])
        self.last = 1

    def step(self) -> tuple[int, int | None]:
        """Makes the next change; returns the backend added and the one removed (if any)."""
        removed = self.current.popleft() if len(self.current) >= SLICE_SIZE else None
        added = self.last
        for _ in range(self.pool):
            added = added % self.pool + 1
            if added not in self.current and added != removed:
                break
        self.current.append(added)
        self.last = added
        return added, removed

    def addresses(self) -> list[str]:
        return [backend_address(index) for index in self.current]


async def first_call(client: Child, clock: Clock) -> None:
    """The client's first call answered (the xDS client fetches listener, route, cluster and
    endpoints first); retried, bounded by START_TIMEOUT_S."""
    until = time.monotonic() + START_TIMEOUT_S
    reply: dict[str, Any] = {}
    while time.monotonic() < until:
        left = clock.left(until - time.monotonic())
        reply = await client.ask(
            {"op": "call", "target": TARGET, "count": 1, "timeout": left},
            left + REPLY_MARGIN_S,
        )
        if reply["backends"] == [backend_name(1)]:
            return
        await asyncio.sleep(0.1)  # set-up only
    raise Deadline(f"first call through {TARGET} not answered by b1: {reply}")


async def pipe_round_trip(client: Child, run: Run) -> None:
    """The round trip of a command that makes no call: what the pipes and JSON add at most."""
    for _ in range(PIPE_SAMPLES):
        started = time.perf_counter()
        await client.ask({"op": "call", "target": TARGET, "count": 0}, START_TIMEOUT_S)
        run.pipe.append(time.perf_counter() - started)


async def measure(
    client: Child, manifest_path: Path, port: int, args: argparse.Namespace, clock: Clock
) -> Run:
    run = Run()
    await pipe_round_trip(client, run)
    rotation = Rotation(args.backends)
    pauses = random.Random(9)
    try:
        for change in range(args.changes + 1):  # change 0: the warm-up, from 1 to 2 addresses
            added, removed = rotation.step()
            timeout = clock.left(args.change_timeout)
            written = write_atomically(manifest_path, manifest(rotation.addresses(), port))
            reply = await client.ask(
                {
                    "op": "until",
                    "target": TARGET,
                    "backend": backend_name(added),
                    "present": True,
                    "timeout": timeout,
                },
                timeout + REPLY_MARGIN_S,
            )
            arrived = time.time()
            if not reply.get("found"):
                run.failures.append(
                    f"change {change}: {backend_name(added)} not reached within {timeout:g} s "
                    f"({reply.get('calls')} calls, last error: {reply.get('error')})"
                )
            elif change:
                run.latencies.append(arrived - written)
                run.calls.append(int(reply["calls"]))
                run.client_seconds.append(float(reply["seconds"]))
            if reply.get("found") and removed is not None and args.check_calls:
                check = await client.ask(
                    {"op": "call", "target": TARGET, "count": args.check_calls, "timeout": 10.0},
                    10.0 + REPLY_MARGIN_S,
                )
                run.checked += len(check["backends"])
                run.stale += check["backends"].count(backend_name(removed))
                if check["error"]:
                    run.check_errors.append(f"change {change}: {check['error']}")
            await asyncio.sleep(clock.left(args.gap + pauses.uniform(0, args.gap_jitter)))
    except Deadline as exc:
        run.note = str(exc)
    return run


async def benchmark(args: argparse.Namespace, clock: Clock, workdir: Path) -> Run:
    port = free_port()
    manifests = workdir / "manifests"
    manifests.mkdir()
    manifest_path = manifests / f"{SERVICE}.yaml"
    manifest_path.write_text(manifest([backend_address(1)], port))
    xds_port = free_port()
    bootstrap_path = workdir / "grpc-bootstrap.json"
    bootstrap_path.write_text(json.dumps(grpc_bootstrap(NODE_ID, f"127.0.0.1:{xds_port}")))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("GRPC_XDS_BOOTSTRAP", None)
    backends = client = None
    plane = ControlPlane(
        Settings(
            manifests=(manifests,),
            xds_port=xds_port,
            admin_port=None,
            allowed_endpoint_ranges=("127.0.0.0/8",),  # every endpoint here is on loopback
            debounce_quiet_s=args.debounce_quiet,
            debounce_max_s=max(args.debounce_quiet, Settings.debounce_max_s),
        )
    )
    try:
        # The children first: the client connects to the control plane only at its first call.
        niced = ["nice", "-n", str(args.nice)] if args.nice else []
        backends = await Child.start(
            [*niced, sys.executable, __file__, "--serve-backends", f"{port},{args.backends}"],
            workdir / "backends.log",
            env,
        )
        client = await Child.start(
            [*niced, sys.executable, str(CLIENT_SCRIPT)],
            workdir / "grpc-client.log",
            {**env, "GRPC_XDS_BOOTSTRAP": str(bootstrap_path)},
        )
        await plane.start()
        await first_call(client, clock)
        return await measure(client, manifest_path, port, args, clock)
    except (Deadline, RuntimeError) as exc:
        for child in (client, backends):
            if child is not None:
                print(f"{child.log_path.stem} log (last lines):\n{log_tail(child.log_path)}")
        return Run(note=str(exc))
    finally:
        if client is not None:
            await client.stop()
        await plane.stop(grace_s=0)
        if backends is not None:
            await backends.stop()


# --- report ----------------------------------------------------------------------------------


def report(run: Run, args: argparse.Namespace, seconds: float) -> None:
    pipe = sorted(run.pipe)
    if run.latencies:
        ordered = sorted(run.latencies)
        print(
            f"write -> first RPC on the new endpoint over {len(ordered)} changes: "
            f"p50 {ms(quantile(ordered, 0.5))} ms, p99 {ms(quantile(ordered, 0.99))} ms "
            f"(min {ms(ordered[0])}, mean {ms(statistics.fmean(ordered))}, "
            f"max {ms(ordered[-1])} ms)"
        )
        calls: list[float] = sorted(run.calls)
        per_call = sum(run.client_seconds) / max(sum(run.calls), 1)
        print(
            f"calls until the new endpoint answered: p50 {quantile(calls, 0.5):.0f}, "
            f"max {calls[-1]:.0f}; one call takes {per_call * 1000:.2f} ms on average (the "
            "resolution)"
        )
    else:
        print("write -> first RPC on the new endpoint: no change measured")
    if pipe:
        print(
            f"pipe round trip of an empty command (an upper bound of what the figure adds): "
            f"p50 {ms(quantile(pipe, 0.5))} ms, max {ms(pipe[-1])} ms"
        )
    print(f"failures: {len(run.failures)} of {args.changes + 1} changes (warm-up included)")
    for failure in run.failures[:10]:
        print(f"  {failure}")
    if args.check_calls:
        print(
            f"RPCs on the removed endpoint after the new one answered: {run.stale} of "
            f"{run.checked} check calls ({args.check_calls} after each change)"
        )
        for error in run.check_errors[:10]:
            print(f"  check call error: {error}")
    if run.note:
        print(f"stopped: {run.note}")
    print(f"run: {seconds:.1f} s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=bounded(1, MAX_CHANGES), default=100)
    parser.add_argument(
        "--backends", type=bounded(SLICE_SIZE + 1, MAX_BACKENDS), default=8,
        help="backends in the pool, on 127.0.0.1 .. 127.0.0.B (default 8)",
    )  # fmt: skip
    parser.add_argument("--gap", type=float, default=0.1, help="pause between changes, s")
    parser.add_argument("--gap-jitter", type=float, default=0.05, help="plus uniform(0, this)")
    parser.add_argument(
        "--check-calls", type=bounded(0, 1000), default=20,
        help="calls after each change that must not reach the removed endpoint (default 20)",
    )  # fmt: skip
    parser.add_argument(
        "--debounce-quiet", type=float, default=Settings.debounce_quiet_s,
        help=f"the control plane's debounce_quiet_s (default {Settings.debounce_quiet_s})",
    )  # fmt: skip
    parser.add_argument(
        "--nice", type=bounded(0, 19), default=0,
        help="run the client and the backends at this niceness (default 0: the control plane "
        "competes with them for the CPU on equal terms)",
    )  # fmt: skip
    parser.add_argument("--change-timeout", type=float, default=10.0, help="per change, s")
    parser.add_argument("--timeout", type=float, default=600.0, help="global deadline, s")
    parser.add_argument("--serve-backends", metavar="PORT,COUNT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.timeout, args.change_timeout) <= 0 or min(args.gap, args.gap_jitter) < 0:
        parser.error("timeouts must be positive, gaps not negative")
    if args.debounce_quiet < 0:
        parser.error("--debounce-quiet must not be negative")
    return args


def main() -> int:
    args = parse_args()
    if args.serve_backends:
        port, count = (int(part) for part in args.serve_backends.split(","))
        serve_backends(port, min(count, MAX_BACKENDS))
        return 0
    interrupt_on_sigterm()
    started = time.monotonic()
    clock = Clock(args.timeout)
    print(
        "gRPC propagation, manifest write -> first RPC on the new endpoint "
        f"(proxyless grpcio {grpc.__version__} xDS client, {TARGET})"
    )
    print(f"machine: {machine()}")
    debounce_max = max(args.debounce_quiet, Settings.debounce_max_s)
    print(
        f"settings: debounce quiet {args.debounce_quiet * 1000:g} ms, max {debounce_max * 1000:g} "
        "ms (leading edge: a change after a quiet period is rebuilt at once); "
        f"{args.backends} backends, {SLICE_SIZE} in the EndpointSlice, each change replaces one; "
        f"gap {args.gap * 1000:g} ms + uniform(0, {args.gap_jitter * 1000:g}) ms; client and "
        f"backends at niceness {args.nice}"
    )
    print(
        "measured: the rename of the manifest -> the client's reply read here (its first call "
        "answered by the new backend); calls back to back, one at a time",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="grpc-propagation-") as workdir:
        try:
            run = asyncio.run(benchmark(args, clock, Path(workdir)))
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: everything started is stopped by now
            print("interrupted", file=sys.stderr)
            return 130
    report(run, args, time.monotonic() - started)
    return 1 if run.failures or run.note else 0


if __name__ == "__main__":
    sys.exit(main())
