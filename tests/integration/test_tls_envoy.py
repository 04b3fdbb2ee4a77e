"""A real Envoy over mTLS to the control plane, its certificates through file-based SDS from the
directory `xds bootstrap --tls-dir --write-sds` prepares, and the bootstraps Envoy validates."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509

from tests.integration.conftest import LOOPBACK, endpoint_slice, service, write_manifests
from tests.unit.test_tls import Authority, replace
from xds.app import ControlPlane
from xds.bootstrap import BootstrapTLS, transport_socket, write_sds_files
from xds.cli import main
from xds.config import Settings
from xds.local import Envoy, backends, envoy_validate, free_port, request_backend, wait_for
from xds.tls import ServerTLS

SPIFFE_A = "spiffe://cluster.local/ns/team-a/sa/envoy"


def bootstrap_cli(*args: str) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["bootstrap", "--node-id", "envoy-1.team-a", *args]) == 0
    parsed: dict[str, Any] = json.loads(out.getvalue())
    return parsed


def test_a_tls_bootstrap_from_the_cli_is_accepted_by_envoy(tmp_path: Path):
    tls_dir = tmp_path / "xds-tls"
    tls_dir.mkdir()
    for address, san in (("127.0.0.1:18000", "IP_ADDRESS"), ("xds.xds-system.svc:18000", "DNS")):
        config = bootstrap_cli("--xds-address", address, "--tls-dir", str(tls_dir), "--write-sds")
        [cluster] = config["static_resources"]["clusters"]
        socket = cluster["transport_socket"]
        context = socket["typed_config"]["common_tls_context"]
        assert context["alpn_protocols"] == ["h2"]
        sds = context["tls_certificate_sds_secret_configs"][0]["sds_config"]
        assert sds["path_config_source"] == {
            "path": str(tls_dir / "xds_client_certificate.yaml"),
            "watched_directory": {"path": str(tls_dir)},
        }
        validation = context["combined_validation_context"]
        [matcher] = validation["default_validation_context"]["match_typed_subject_alt_names"]
        assert matcher == {"san_type": san, "matcher": {"exact": address.rpartition(":")[0]}}
        # HTTP/2 for gRPC stays as without TLS.
        assert "http2_protocol_options" in json.dumps(cluster["typed_extension_protocol_options"])
        path = tmp_path / "bootstrap.json"
        path.write_text(json.dumps(config))
        validated = envoy_validate(path)
        assert validated.returncode == 0, validated.stdout + validated.stderr
    written = json.loads((tls_dir / "xds_client_certificate.yaml").read_text())
    assert written["resources"][0]["tls_certificate"]["private_key"] == {
        "filename": str(tls_dir / "tls.key")
    }
    # Paths of their own for the PEM files.
    bootstrap_cli(
        "--xds-address", "127.0.0.1:1", "--tls-dir", str(tls_dir), "--write-sds",
        "--tls-ca", "/etc/ca/root.pem",
    )  # fmt: skip
    written = json.loads((tls_dir / "xds_validation_context.yaml").read_text())
    assert written["resources"][0]["validation_context"]["trusted_ca"] == {
        "filename": "/etc/ca/root.pem"
    }


def test_tls_options_without_a_tls_dir_are_a_usage_error(capsys):
    assert main(["bootstrap", "--node-id", "n", "--xds-address", "127.0.0.1:1", "--tls-ca", "x"])
    assert "need --tls-dir" in capsys.readouterr().err


def pki(tmp_path: Path, *server_names: str) -> tuple[Authority, ServerTLS, BootstrapTLS]:
    """A test CA; the control plane's certificate for `server_names` (with the CA beside it);
    Envoy's side as a Kubernetes TLS Secret's names, with the SDS files naming them."""
    authority = Authority()
    server_dir = tmp_path / "server"
    server = authority.issue(*server_names, name="xds").write(server_dir)
    replace(server_dir / "ca.crt", authority.pem)
    envoy_tls = BootstrapTLS(tmp_path / "envoy-tls")
    authority.issue(SPIFFE_A, name="envoy").write(envoy_tls.directory)
    replace(envoy_tls.ca_path, authority.pem)
    write_sds_files(envoy_tls)
    return authority, server, envoy_tls


async def test_envoy_over_mtls_gets_its_configuration_and_traffic_flows(tmp_path: Path):
    authority, server, envoy_tls = pki(tmp_path, "localhost", "127.0.0.1")

    manifests = tmp_path / "manifests"
    manifests.mkdir()
    service_port, listener_port = 8080, free_port()
    settings = Settings(
        manifests=(manifests,),
        xds_port=0,
        listener_address="127.0.0.1",
        listener_port_offset=listener_port - service_port,
        allowed_endpoint_ranges=LOOPBACK,
        tls_cert=server.cert,
        tls_key=server.key,
        tls_client_ca=tmp_path / "server" / "ca.crt",
    )
    plane = ControlPlane(settings)
    ports = await plane.start()

    def over_mtls(config: dict[str, Any]) -> None:
        [cluster] = config["static_resources"]["clusters"]
        cluster["transport_socket"] = transport_socket(envoy_tls, "127.0.0.1")

    envoy = Envoy(
        f"127.0.0.1:{ports.xds}", node_id="envoy-1.team-a", workdir=tmp_path, customize=over_mtls
    )
    try:
        async with backends(["web-1"]) as started, aiohttp.ClientSession() as session:
            write_manifests(
                manifests / "mesh.yaml",
                service("web", service_port),
                endpoint_slice("web", ["127.0.0.1"], started[0].port),
            )
            await envoy.start()
            url = f"http://127.0.0.1:{listener_port}/"

            async def served() -> bool:
                return await request_backend(session, url, "web.default") == "web-1"

            await wait_for(served, 15, interval=0.05, what="web.default served through Envoy")
            stats = await envoy.stats("cluster.xds_cluster.ssl")
            assert stats.get("cluster.xds_cluster.ssl.handshake", 0) >= 1, stats
            [stream] = plane.server.syncz()
            assert stream["node_id"] == "envoy-1.team-a"
            assert plane.server.identity is not None and plane.server.identity.refused == 0
    finally:
        await envoy.stop()
        await plane.stop(grace_s=0)


async def test_envoy_follows_its_renewed_certificate_and_a_foreign_node_is_refused(
    tmp_path: Path,
):
    """Envoy's certificate renewed in its watched directory is loaded without a restart (admin
    /certs); an Envoy whose node id names another namespace than its certificate is refused."""
    authority, server, envoy_tls = pki(tmp_path, "127.0.0.1")
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    write_manifests(
        manifests / "mesh.yaml", service("web", 8080), endpoint_slice("web", ["127.0.0.1"], 9)
    )
    plane = ControlPlane(
        Settings(
            manifests=(manifests,),
            xds_port=0,
            allowed_endpoint_ranges=LOOPBACK,
            tls_cert=server.cert,
            tls_key=server.key,
            tls_client_ca=tmp_path / "server" / "ca.crt",
        )
    )
    ports = await plane.start()

    def over_mtls(config: dict[str, Any]) -> None:
        [cluster] = config["static_resources"]["clusters"]
        cluster["transport_socket"] = transport_socket(envoy_tls, "127.0.0.1")
        # A refused Envoy is ready after this, not after the default 15 s.
        for source in ("cds_config", "lds_config"):
            config["dynamic_resources"][source]["initial_fetch_timeout"] = "1s"

    async def serials(envoy: Envoy) -> set[int]:
        certs = await envoy.get_json("/certs")
        # Hex of the serial's DER bytes: a leading zero when its first digit is alone.
        return {
            int(entry["serial_number"], 16)
            for cert in certs.get("certificates", [])
            for entry in cert.get("cert_chain", [])
        }

    def serial(pem: bytes) -> int:
        return x509.load_pem_x509_certificate(pem).serial_number

    envoy = Envoy(
        f"127.0.0.1:{ports.xds}", node_id="envoy-1.team-a", workdir=tmp_path, customize=over_mtls
    )
    foreign = Envoy(
        f"127.0.0.1:{ports.xds}", node_id="envoy-1.team-b", workdir=tmp_path, customize=over_mtls
    )
    try:
        await envoy.start()
        await wait_for(lambda: plane.server.syncz(), 10, what="a stream of envoy-1.team-a")
        assert serial(envoy_tls.cert_path.read_bytes()) in await serials(envoy)

        renewed = authority.issue(SPIFFE_A, name="envoy renewed")
        # As a Secret volume is updated: new files moved into the watched directory.
        replace(envoy_tls.key_path, renewed.key)
        replace(envoy_tls.cert_path, renewed.cert)

        async def renewed_loaded() -> bool:
            return serial(renewed.cert) in await serials(envoy)

        await wait_for(renewed_loaded, 10, what="Envoy's renewed client certificate loaded")

        await foreign.start()
        identity = plane.server.identity
        assert identity is not None
        await wait_for(lambda: identity.refused >= 1, 10, what="envoy-1.team-b refused")
        assert [s["node_id"] for s in plane.server.syncz()] == ["envoy-1.team-a"]
        assert not any("default/web" in name for name in (await foreign.endpoints())), (
            "the refused Envoy got clusters"
        )
    finally:
        await foreign.stop()
        await envoy.stop()
        await plane.stop(grace_s=0)
