"""`xds status` over two replicas of the control plane, each with a real Envoy: one row per proxy,
its replica, its Envoy version; JSON with every record; a replica that is gone is said, the other
still shown."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

from tests.integration.conftest import LOOPBACK
from xds.app import ControlPlane
from xds.config import Settings
from xds.local import Envoy, free_port_offset, wait_for
from xds.status import render

DEMO = Path(__file__).resolve().parents[2] / "envoy" / "demo"


async def status(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "xds", "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def replica() -> ControlPlane:
    """A replica of the control plane on the demo's manifests, its ports its own."""
    return ControlPlane(
        Settings(
            manifests=(DEMO,),
            xds_port=0,
            admin_port=0,
            listener_address="127.0.0.1",
            listener_port_offset=free_port_offset([80]),
            allowed_endpoint_ranges=LOOPBACK,
        )
    )


async def test_status_shows_every_proxy_of_every_replica(tmp_path: Path):
    planes = []
    envoys = []
    try:
        for index in range(2):
            plane = replica()
            ports = await plane.start()
            planes.append((plane, f"127.0.0.1:{ports.admin}"))
            envoy = Envoy(f"127.0.0.1:{ports.xds}", node_id=f"proxy-{index}", workdir=tmp_path)
            await envoy.start()
            envoys.append(envoy)
        admins = [admin for _, admin in planes]

        async def both_synced() -> bool:
            result = await status("--admin", admins[0], "--admin", admins[1])
            return result.returncode == 0 and result.stdout.count("SYNCED") == 8

        await wait_for(both_synced, timeout=30, what="both proxies synced")
        result = await status("--admin", admins[0], "--admin", admins[1])
        lines = result.stdout.splitlines()
        header = re.split(r"\s{2,}", lines[0].strip())
        rows = {
            row[0]: dict(zip(header, row, strict=True))
            for row in (re.split(r"\s{2,}", line.strip()) for line in lines[1:])
        }
        assert {node: cells["REPLICA"] for node, cells in rows.items()} == {
            "proxy-0": admins[0],
            "proxy-1": admins[1],
        }
        assert all(cells["CLIENT"].startswith("envoy 1.40.") for cells in rows.values())

        as_json = json.loads(
            (await status("--admin", admins[0], "--admin", admins[1], "-o", "json")).stdout
        )
        assert sorted((r["node_id"], r["replica"]) for r in as_json) == [
            ("proxy-0", admins[0]),
            ("proxy-1", admins[1]),
        ]
        assert all(set(r["types"]) == {"CDS", "EDS", "LDS", "RDS"} for r in as_json)

        # One replica gone: said on stderr, exit 1, the other replica's proxy still shown.
        await envoys[1].stop()
        await planes[1][0].stop()
        partial = await status("--admin", admins[0], "--admin", admins[1])
        assert partial.returncode == 1
        assert f"cannot read http://{admins[1]}/debug/syncz" in partial.stderr
        assert "proxy-0" in partial.stdout and "proxy-1" not in partial.stdout
    finally:
        for envoy in envoys:
            await envoy.stop()
        for plane, _ in planes:
            await plane.stop()


def test_a_rejected_resource_is_named_and_the_nack_is_whole_in_wide():
    nack = {"version": "v2", "message": "cluster 'a/web:http': bad\nvalue " + "x" * 200, "at": 0.0}
    stream = {
        "node_id": "n1",
        "client": "envoy 1.40.0",
        "peer": "ipv4:127.0.0.1:5000",
        "types": {
            "CDS": {
                "awaiting_ack": False,
                "acked_version": "v1",
                "sent_version": "v1",
                "last_nack": nack,
                "rejected_resources": {"a/web:http": "v2"},
            },
            "EDS": {"awaiting_ack": True, "acked_version": "v1", "sent_version": "v2"},
            "LDS": {"awaiting_ack": False, "acked_version": "v3", "sent_version": "v3"},
        },
    }
    table = render({"r1": [stream]})  # type: ignore[dict-item]
    header, row = (re.split(r"\s{2,}", line.strip()) for line in table.splitlines())
    assert header == ["NODE", "CLIENT", "REPLICA", "CDS", "EDS", "LDS"]
    assert row == ["n1", "envoy 1.40.0", "r1", "NACKED a/web:http", "STALE", "SYNCED"]
    wide = render({"r1": [stream]}, wide=True)  # type: ignore[dict-item]
    assert "ipv4:127.0.0.1:5000" in wide
    assert ("n1 CDS version v2: cluster 'a/web:http': bad value " + "x" * 200) in wide
    assert render({}) == "no proxies connected"


async def test_status_finds_the_replicas_behind_the_control_planes_service(tmp_path: Path):
    from tests.integration.test_kube import kubeconfig
    from tests.kubeapi import ENDPOINTSLICES, KubeAPIServer

    planes = []
    admins = []
    try:
        with KubeAPIServer() as api:
            for index in range(2):
                plane = replica()
                ports = await plane.start()
                planes.append(plane)
                admins.append(f"127.0.0.1:{ports.admin}")
                # One slice per replica: both on 127.0.0.1, each with its own admin port.
                api.apply(
                    ENDPOINTSLICES,
                    {
                        "metadata": {
                            "name": f"xds-control-plane-{index}",
                            "namespace": "xds-system",
                            "labels": {"kubernetes.io/service-name": "xds-control-plane"},
                        },
                        "addressType": "IPv4",
                        "ports": [
                            {"name": "http-admin", "port": ports.admin},
                            {"name": "grpc-xds", "port": ports.xds},
                        ],
                        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}],
                    },
                )
            config = str(kubeconfig(tmp_path / "kubeconfig", api.url))
            found = await status(
                "--kubernetes-service", "xds-system/xds-control-plane", "--kubeconfig", config,
                "-o", "json",
            )  # fmt: skip
            assert found.returncode == 0, found.stderr
            # Both replicas were asked (no proxy is connected: an empty list each).
            assert json.loads(found.stdout) == []
            table = await status(
                "--kubernetes-service", "xds-system/xds-control-plane", "--kubeconfig", config
            )
            assert table.returncode == 0 and table.stdout.strip() == "no proxies connected"
            # Both replicas are asked: the one that stops is said, the other still read.
            await planes[1].stop()
            partial = await status(
                "--kubernetes-service", "xds-system/xds-control-plane", "--kubeconfig", config
            )
            assert partial.returncode == 1
            assert f"cannot read http://{admins[1]}/debug/syncz" in partial.stderr
            assert f"http://{admins[0]}/" not in partial.stderr
            wrong = await status(
                "--kubernetes-service", "xds-system/nothing-here", "--kubeconfig", config
            )
            assert wrong.returncode == 1
            assert "no ready endpoint of Service xds-system/nothing-here" in wrong.stderr
            assert "--admin-host 0.0.0.0" in wrong.stderr
    finally:
        for plane in planes:
            await plane.stop()
