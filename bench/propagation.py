"""Propagation benchmark: an endpoint change in a manifest -> Envoy's ACK, and -> the first request
served by the new endpoint. Real processes on loopback: `xds serve`, Envoy, two HTTP backends.

Each change moves Service `web` from one backend to the other (an atomic file replace, as editors
and config-map volumes do). The ACK is seen in the control plane's /debug/syncz; the first request
is the first one through Envoy answered by the new backend. Prints p50/p90/p99 per client mode.

    python bench/propagation.py                       # 200 changes, ADS state-of-the-world
    python bench/propagation.py --changes 300 --mode ads --mode delta-ads --mode xds --mode delta
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

from xds.local import Envoy, backends, free_port, request_backend, wait_for

SERVICE_PORT = 8080


def manifest(backend_host: str, backend_port: int) -> str:
    return yaml.safe_dump_all(
        [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "web", "namespace": "bench"},
                "spec": {"ports": [{"name": "http", "port": SERVICE_PORT}]},
            },
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": "web-1",
                    "namespace": "bench",
                    "labels": {"kubernetes.io/service-name": "web"},
                },
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": backend_port}],
                "endpoints": [{"addresses": [backend_host], "conditions": {"ready": True}}],
            },
        ]
    )


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    cuts = statistics.quantiles(ordered, n=100, method="inclusive")
    return (
        f"p50 {cuts[49] * 1000:6.1f} ms  p90 {cuts[89] * 1000:6.1f} ms  "
        f"p99 {cuts[98] * 1000:6.1f} ms  max {ordered[-1] * 1000:6.1f} ms"
    )


async def run_mode(mode: str, changes: int, workdir: Path) -> tuple[list[float], list[float]]:
    manifests = workdir / f"manifests-{mode}"
    manifests.mkdir()
    path = manifests / "web.yaml"
    xds_port, admin_port, listener_port = free_port(), free_port(), free_port()
    async with backends(["one", "two"]) as started:
        hosts = [(b.host, b.port, b.name) for b in started]
        write_atomically(path, manifest(hosts[0][0], hosts[0][1]))
        plane = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "xds", "--log-level", "WARNING", "serve",
            "--manifests", str(manifests), "--xds-port", str(xds_port),
            "--admin-port", str(admin_port), "--listener-address", "127.0.0.1",
            "--listener-port-offset", str(listener_port - SERVICE_PORT),
        )  # fmt: skip
        envoy = Envoy(f"127.0.0.1:{xds_port}", node_id=f"bench-{mode}", mode=mode, workdir=workdir)
        url = f"http://127.0.0.1:{listener_port}/"
        admin = f"http://127.0.0.1:{admin_port}/debug/syncz"
        to_ack: list[float] = []
        to_traffic: list[float] = []
        try:
            async with aiohttp.ClientSession() as session:

                async def eds_acked() -> str:
                    async with session.get(admin) as response:
                        clients = await response.json()
                    for client in clients:
                        eds = client["types"].get("EDS")
                        if eds and not eds["awaiting_ack"] and eds["acked_version"]:
                            return eds["acked_version"]
                    return ""

                await wait_for(lambda: _up(session, admin), 20, what="control plane admin")
                await envoy.start()
                await wait_for(
                    lambda: _served_by(session, url, hosts[0][2]), 20, what="first route"
                )
                acked = await eds_acked()
                for change in range(1, changes + 1):
                    host, port, name = hosts[change % 2]
                    written = time.perf_counter()
                    write_atomically(path, manifest(host, port))

                    async def ack_seen(previous: str = acked, written: float = written) -> float:
                        nonlocal acked
                        while (version := await eds_acked()) in ("", previous):
                            await asyncio.sleep(0.001)
                        acked = version
                        return time.perf_counter() - written

                    async def traffic_seen(expected: str = name, written: float = written) -> float:
                        while not await _served_by(session, url, expected):
                            pass
                        return time.perf_counter() - written

                    ack_s, traffic_s = await asyncio.wait_for(
                        asyncio.gather(ack_seen(), traffic_seen()), 30
                    )
                    to_ack.append(ack_s)
                    to_traffic.append(traffic_s)
        finally:
            await envoy.stop()
            plane.terminate()
            await plane.wait()
    return to_ack, to_traffic


async def _up(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url) as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


async def _served_by(session: aiohttp.ClientSession, url: str, name: str) -> bool:
    return await request_backend(session, url, "web.bench", timeout=2.0) == name


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument(
        "--mode", action="append", choices=("ads", "xds", "delta-ads", "delta"), default=None
    )
    args = parser.parse_args()
    modes = args.mode or ["ads"]
    with tempfile.TemporaryDirectory(prefix="xds-bench-") as tmp:
        for mode in modes:
            to_ack, to_traffic = await run_mode(mode, args.changes, Path(tmp))
            print(f"{mode:>9}, {len(to_ack)} endpoint changes")
            print(f"  manifest write -> Envoy ACK of the new endpoints: {percentiles(to_ack)}")
            print(f"  manifest write -> first request to the new one:  {percentiles(to_traffic)}")


if __name__ == "__main__":
    asyncio.run(main())
