"""Metrics, /debug/syncz and `xds status` against a real Envoy."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Mesh, endpoint_slice, service, write_manifests
from xds.local import backends, request_backend, wait_for


async def scrape(mesh: Mesh) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with mesh.session.get(f"{mesh.admin_url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_syncz_and_status_follow_a_real_envoy(mesh: Mesh):
    async with backends(["b1"]) as started:
        path = mesh.manifests / "mesh.yaml"

        def publish(annotations: dict[str, str] | None = None) -> None:
            write_manifests(
                path,
                service("web", mesh.service_port, annotations=annotations),
                endpoint_slice("web", ["127.0.0.1"], started[0].port),
            )

        publish()

        async def routed() -> bool:
            return await request_backend(mesh.session, mesh.url, "web.default") == "b1"

        await wait_for(routed, 15, what="traffic through Envoy")

        samples = await scrape(mesh)
        assert value(samples, "xds_connected_clients", type="CDS") == 1
        assert value(samples, "xds_pushes_total", type="CDS") >= 1
        assert value(samples, "xds_pushed_bytes_total", type="EDS") > 0
        assert value(samples, "xds_acks_total", type="RDS") >= 1
        assert value(samples, "xds_push_to_ack_seconds_count", type="CDS") >= 1
        assert value(samples, "xds_translation_seconds_count") >= 1
        assert value(samples, "xds_snapshot_bytes") > 0
        assert value(samples, "xds_snapshot_resources", type="LDS") == 1
        assert value(samples, "xds_source_events_total") >= 1

        # The versions /debug/syncz says Envoy ACKed are the ones Envoy says it runs.
        [client] = await mesh.syncz()
        dump = await mesh.envoy.config_dump()
        [clusters] = [c for c in dump["configs"] if c["@type"].endswith("ClustersConfigDump")]
        envoy_versions = {c["version_info"] for c in clusters["dynamic_active_clusters"]}
        assert envoy_versions == {client["types"]["CDS"]["acked_version"]}

        # /debug/config_dump, filtered by type and name, shows what is served.
        query = "type=CDS&name=default/web:http"
        async with mesh.session.get(f"{mesh.admin_url}/debug/config_dump?{query}") as response:
            dumped = await response.json()
        assert list(dumped) == ["CDS"]
        [cluster] = dumped["CDS"]["resources"]
        assert cluster["resource"]["edsClusterConfig"]["serviceName"] == "default/web:http"
        async with mesh.session.get(f"{mesh.admin_url}/debug/config_dump?type=XYZ") as response:
            assert response.status == 400

        # A NACK moves the NACK counter, and only it.
        nacks = value(samples, "xds_nacks_total", type="CDS")
        publish(
            {"xds.dev/cluster-patch": json.dumps({"outlierDetection": {"maxEjectionPercent": 200}})}
        )

        async def nacked() -> bool:
            return value(await scrape(mesh), "xds_nacks_total", type="CDS") == nacks + 1

        await wait_for(nacked, 15, what="the NACK counted")

        admin = mesh.admin_url.removeprefix("http://")
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "xds", "status", "--admin", admin],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        header = re.split(r"\s{2,}", lines[0].strip())
        assert header == ["NODE", "CLIENT", "REPLICA", "CDS", "EDS", "LDS", "RDS"]
        [row] = [re.split(r"\s{2,}", line.strip()) for line in lines if line.startswith("test-")]
        cells = dict(zip(header, row, strict=True))
        assert cells["CLIENT"].startswith("envoy 1.40.")  # from the node's build version
        assert cells["REPLICA"] == admin
        assert cells["CDS"].startswith("NACKED ") and cells["EDS"] == "SYNCED"
        wide = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "xds", "status", "--admin", admin, "-o", "wide"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        # The full NACK message, and the rejected cluster named in the table.
        assert "LAST NACKS" in wide.stdout and "maxEjectionPercent" not in cells["CDS"]
        nack_lines = wide.stdout.split("LAST NACKS", 1)[1]
        assert "test-proxy CDS" in nack_lines and "200" in nack_lines


def test_status_says_clearly_when_the_control_plane_is_not_there():
    result = subprocess.run(
        [sys.executable, "-m", "xds", "status", "--admin", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "cannot read http://127.0.0.1:1/debug/syncz" in result.stderr
    # And what to do about it, in one line.
    assert result.stderr.splitlines()[-1].startswith("xds: no control plane admin endpoint")
    assert "--admin-port" in result.stderr
