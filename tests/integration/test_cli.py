"""The `xds` command as a user runs it: real subprocesses, the real Envoy validating bootstraps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from xds.local import envoy_validate

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "envoy" / "demo"


def xds(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xds", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("mode", ["ads", "xds", "delta-ads", "delta"])
@pytest.mark.parametrize("node_id", ["proxy-1", "n", "on"])  # bare YAML words Envoy reads as bools
def test_bootstrap_passes_envoy_validation(tmp_path: Path, mode: str, node_id: str):
    result = xds(
        "bootstrap", "--node-id", node_id, "--xds-address", "127.0.0.1:18000",
        "--admin-port", "19000", "--mode", mode,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = tmp_path / "bootstrap.yaml"
    config.write_text(result.stdout)
    check = envoy_validate(config)
    assert check.returncode == 0, check.stdout + check.stderr
    parsed = json.loads(result.stdout)
    assert parsed["node"]["id"] == node_id
    assert parsed["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 19000,
    }


def test_bootstrap_with_default_arguments_passes_envoy_validation(tmp_path: Path):
    result = xds("bootstrap", "--node-id", "proxy-1", "--xds-address", "127.0.0.1:18000")
    assert result.returncode == 0, result.stderr
    config = tmp_path / "bootstrap.yaml"
    config.write_text(result.stdout)
    check = envoy_validate(config)
    assert check.returncode == 0, check.stdout + check.stderr
    parsed = json.loads(result.stdout)
    # The defaults: admin on loopback 9901, ADS, the control plane as a static cluster.
    assert parsed["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 9901,
    }
    assert parsed["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"
    [xds_cluster] = parsed["static_resources"]["clusters"]
    endpoint = xds_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 18000}


def test_bootstrap_rejects_a_bad_address():
    result = xds("bootstrap", "--node-id", "x", "--xds-address", "no-port")
    assert result.returncode == 2
    assert "HOST:PORT" in result.stderr


def test_translate_prints_every_type_for_the_demo():
    result = xds("translate", "--manifests", str(DEMO))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert sorted(out) == ["CDS", "EDS", "LDS", "RDS"]
    assert {c["name"] for c in out["CDS"]} == {"demo/web:http", "demo/hello:http"}
    policies = out["CDS"][0]["loadBalancingPolicy"]["policies"]
    assert policies[-1]["typedExtensionConfig"]["name"].endswith("round_robin")


def test_translate_exits_1_with_bad_objects_and_still_prints_the_good(tmp_path: Path):
    (tmp_path / "good.yaml").write_text((DEMO / "services.yaml").read_text())
    (tmp_path / "bad.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken}\nspec: {ports: [{port: 0}]}\n"
    )
    result = xds("translate", "--manifests", str(tmp_path))
    assert result.returncode == 1
    assert "Service default/broken" in result.stderr and "spec.ports[0].port" in result.stderr
    assert {c["name"] for c in json.loads(result.stdout)["CDS"]} == {
        "demo/web:http",
        "demo/hello:http",
    }


def test_translate_usage_error_exits_2():
    result = xds("translate")
    assert result.returncode == 2
    assert "--manifests" in result.stderr


def test_serve_says_clearly_when_its_port_is_taken():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = xds("serve", "--manifests", str(DEMO), "--xds-port", str(port))
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_runs_and_spreads_traffic_over_the_three_backends():
    result = subprocess.run(
        [sys.executable, "-m", "xds", "demo", "--requests", "300", "--rate", "1000"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    final = result.stdout.rsplit("requests through Envoy", 1)[1]
    for backend in ("backend-1", "backend-2", "backend-3"):
        count = int(final.split(backend, 1)[1].split()[0].replace(",", ""))
        assert count > 30, (backend, final)
    assert "stopped: traffic, Envoy, backends, control plane" in result.stdout


def test_serve_kubernetes_without_a_cluster_says_what_is_missing(tmp_path: Path):
    missing = tmp_path / "no-such-kubeconfig"
    result = xds("serve", "--kubernetes", "--kubeconfig", str(missing), "--xds-port", "0")
    assert result.returncode == 2
    assert f"cannot configure the Kubernetes client from {missing}" in result.stderr
    assert "Traceback" not in result.stderr
