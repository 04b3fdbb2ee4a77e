"""Every client mode with a real Envoy: ADS and per-type streams, state-of-the-world and delta.

Each run serves four clusters, two HTTP listeners routed by RDS and one TCP proxy listener, applies
three updates that change clusters and routes, and then an update with one cluster Envoy rejects
(in the same response as a good new cluster): the bad one is isolated, the rest is applied, and the
next good update repairs it. After each step, requests through every listener must succeed within a
deadline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import LOOPBACK, endpoint_slice, service, write_manifests
from xds.app import ControlPlane
from xds.config import Settings
from xds.local import Backend, Envoy, backends, free_port_offset, request_backend, wait_for

HTTP_A, HTTP_B, TCP = 8080, 9090, 5000


def state(step: int, pods: list[Backend], bad: bool = False) -> list[dict[str, Any]]:
    """The mesh at each step; (service, listener port, Host header) -> expected backend below."""
    p1, p2, p3, p4 = pods
    port = p1.port  # every backend listens on the same port on its own loopback address
    objects = [
        service("alpha", HTTP_A),
        endpoint_slice("alpha", [p1.host if step < 1 else p2.host], port),
        service("gamma", HTTP_B, port_name="http" if step < 3 else "web"),
        endpoint_slice("gamma", [p3.host], port, port_name="http" if step < 3 else "web"),
        service("tunnel", TCP, port_name="tcp"),
        endpoint_slice("tunnel", [p4.host if step < 2 else p1.host], port, port_name="tcp"),
    ]
    if step < 2:
        beta = service("beta", HTTP_A)
        if bad:
            patch = json.dumps({"outlierDetection": {"maxEjectionPercent": 200}})
            beta["metadata"]["annotations"] = {"xds.dev/cluster-patch": patch}
        objects += [beta, endpoint_slice("beta", [p2.host], port)]
    if step >= 1:
        objects += [service("epsilon", HTTP_B), endpoint_slice("epsilon", [p4.host], port)]
    return objects


def expectations(step: int) -> dict[tuple[int, str], str]:
    out = {
        (HTTP_A, "alpha.default"): "p1" if step < 1 else "p2",
        (HTTP_B, "gamma.default"): "p3",
        (TCP, "anything"): "p4" if step < 2 else "p1",
    }
    if step < 2:
        out[(HTTP_A, "beta.default")] = "p2"
    if step >= 1:
        out[(HTTP_B, "epsilon.default")] = "p4"
    return out


def type_states(clients: list[dict[str, Any]], short: str) -> list[dict[str, Any]]:
    return [c["types"][short] for c in clients if short in c["types"]]


@pytest.mark.parametrize("mode", ["ads", "xds", "delta-ads", "delta"])
async def test_updates_and_a_nack_in_every_mode(tmp_path: Path, mode: str):
    offset = free_port_offset((HTTP_A, HTTP_B, TCP))
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    path = manifests / "mesh.yaml"
    settings = Settings(
        manifests=(manifests,),
        xds_port=0,
        admin_port=0,
        listener_address="127.0.0.1",
        listener_port_offset=offset,
        cluster_patch_namespaces=("default",),  # the NACK is provoked by a cluster patch
        allowed_endpoint_ranges=LOOPBACK,
    )
    async with backends(["p1", "p2", "p3", "p4"]) as pods:
        write_manifests(path, *state(0, pods))
        plane = ControlPlane(settings)
        ports = await plane.start()
        envoy = Envoy(
            f"127.0.0.1:{ports.xds}", node_id=f"modes-{mode}", mode=mode, workdir=tmp_path
        )
        try:
            await envoy.start()
            # A TCP proxy keeps a connection on the endpoint it chose: new connections there.
            fresh = aiohttp.TCPConnector(force_close=True)
            async with (
                aiohttp.ClientSession() as session,
                aiohttp.ClientSession(connector=fresh) as tcp_session,
            ):

                async def all_listeners_serve(step: int) -> bool:
                    for (port, host), expected in expectations(step).items():
                        url = f"http://127.0.0.1:{port + offset}/"
                        client = tcp_session if port == TCP else session
                        for _ in range(3):
                            if await request_backend(client, url, host, timeout=2) != expected:
                                return False
                    return True

                async def syncz() -> list[dict[str, Any]]:
                    url = f"http://127.0.0.1:{ports.admin}/debug/syncz"
                    async with session.get(url) as response:
                        return await response.json()

                for step in range(4):
                    if step:
                        write_manifests(path, *state(step, pods))
                    await wait_for(
                        lambda step=step: all_listeners_serve(step), 15, what=f"step {step}"
                    )

                # No cluster stays warming for want of its endpoints. Step 3 renames a cluster
                # whose backend is unchanged, so requests pass on the old one while the new warms:
                # wait for it, well within the 15 s initial fetch timeout that ends a stuck one.
                async def nothing_warming() -> bool:
                    clusters = await envoy.stats("cluster_manager")
                    return clusters["cluster_manager.warming_clusters"] == 0

                await wait_for(nothing_warming, 5, what="no cluster warming")

                # A rejected update, then a good one: the NACK is recorded and then repaired.
                write_manifests(path, *state(1, pods, bad=True))

                async def nacked() -> bool:
                    return any(s["last_nack"] for s in type_states(await syncz(), "CDS"))

                await wait_for(nacked, 15, what=f"CDS NACK in {mode}")
                [cds] = type_states(await syncz(), "CDS")
                assert "MaxEjectionPercent" in cds["last_nack"]["message"] or (
                    "max_ejection_percent" in cds["last_nack"]["message"]
                )

                # The rejected cluster is isolated: everything else in the same update is applied.
                async def all_but_beta_serve() -> bool:
                    for (port, host), expected in expectations(1).items():
                        if host == "beta.default":
                            continue
                        url = f"http://127.0.0.1:{port + offset}/"
                        client = tcp_session if port == TCP else session
                        if await request_backend(client, url, host, timeout=2) != expected:
                            return False
                    return True

                await wait_for(all_but_beta_serve, 15, what="all but the rejected Service")
                [cds] = type_states(await syncz(), "CDS")
                assert list(cds["rejected_resources"]) == ["default/beta:http"]

                write_manifests(path, *state(1, pods))

                async def repaired() -> bool:
                    [cds] = type_states(await syncz(), "CDS")
                    return cds["last_nack"] is None and not cds["awaiting_ack"]

                await wait_for(repaired, 15, what=f"CDS repaired in {mode}")
                await wait_for(lambda: all_listeners_serve(1), 15, what="step 1 again")
        finally:
            await envoy.stop()
            await plane.stop()
