"""`xds bootstrap --grpc`: the GRPC_XDS_BOOTSTRAP of proxyless gRPC clients, as a dict
(`xds.bootstrap.grpc_bootstrap`), as the CLI prints it, and as grpcio's own xDS client reads it:
its first ADS request, to a stand-in server on loopback, carries what the bootstrap said."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme

from xds._pb.envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest
from xds.bootstrap import BootstrapTLS, GrpcTLS, grpc_bootstrap
from xds.scopes import NAMESPACE_KEY, claimed_namespace
from xds.server.stream import MAX_NODE_FIELD
from xds.tls import peer_identity

ADDRESS = "127.0.0.1:18000"
INSECURE = [{"type": "insecure"}]


def xds(*args: str) -> subprocess.CompletedProcess[str]:
    """`xds ARGS...` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "xds", *args], capture_output=True, text=True, timeout=60
    )


def server(config: dict[str, Any]) -> dict[str, Any]:
    (only,) = config["xds_servers"]
    assert isinstance(only, dict)
    return only


# --- the dict ---------------------------------------------------------------------------------


def test_insecure_bootstrap_is_the_node_id_and_one_plaintext_v3_server() -> None:
    assert grpc_bootstrap("client-1", ADDRESS) == {
        "xds_servers": [
            {"server_uri": ADDRESS, "channel_creds": INSECURE, "server_features": ["xds_v3"]}
        ],
        "node": {"id": "client-1"},
    }


def test_tls_with_a_ca_alone_presents_no_client_certificate(tmp_path: Path) -> None:
    config = grpc_bootstrap("client-1", ADDRESS, tls=GrpcTLS(tmp_path / "ca.pem"))
    assert server(config)["channel_creds"] == [
        {"type": "tls", "config": {"ca_certificate_file": str(tmp_path / "ca.pem")}}
    ]
    assert server(config)["server_features"] == ["xds_v3"]


def test_mtls_names_the_client_certificate_and_key(tmp_path: Path) -> None:
    tls = GrpcTLS(tmp_path / "ca.pem", cert=tmp_path / "c.pem", key=tmp_path / "k.pem")
    assert server(grpc_bootstrap("client-1", ADDRESS, tls=tls))["channel_creds"] == [
        {
            "type": "tls",
            "config": {
                "ca_certificate_file": str(tmp_path / "ca.pem"),
                "certificate_file": str(tmp_path / "c.pem"),
                "private_key_file": str(tmp_path / "k.pem"),
            },
        }
    ]


def test_envoy_tls_directory_gives_the_same_files_as_mtls(tmp_path: Path) -> None:
    plain = BootstrapTLS(tmp_path)
    assert server(grpc_bootstrap("c", ADDRESS, tls=plain))["channel_creds"][0]["config"] == {
        "ca_certificate_file": str(tmp_path / "ca.crt"),
        "certificate_file": str(tmp_path / "tls.crt"),
        "private_key_file": str(tmp_path / "tls.key"),
    }
    moved = BootstrapTLS(tmp_path, ca=tmp_path / "other" / "ca.pem")
    config = server(grpc_bootstrap("c", ADDRESS, tls=moved))["channel_creds"][0]["config"]
    assert config["ca_certificate_file"] == str(tmp_path / "other" / "ca.pem")


def test_tls_paths_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tls = GrpcTLS(Path("ca.pem"), cert=Path("tls/c.pem"), key=Path("tls/k.pem"))
    config = server(grpc_bootstrap("c", ADDRESS, tls=tls))["channel_creds"][0]["config"]
    assert config == {
        "ca_certificate_file": str(tmp_path / "ca.pem"),
        "certificate_file": str(tmp_path / "tls" / "c.pem"),
        "private_key_file": str(tmp_path / "tls" / "k.pem"),
    }


@pytest.mark.parametrize("cert, key", [(Path("c.pem"), None), (None, Path("k.pem"))])
def test_a_client_certificate_needs_its_key(cert: Path | None, key: Path | None) -> None:
    with pytest.raises(ValueError, match="certificate needs its private key"):
        GrpcTLS(Path("ca.pem"), cert=cert, key=key)


@pytest.mark.parametrize(
    "given, locality",
    [
        ({}, None),
        ({"zone": "z1"}, {"zone": "z1"}),
        ({"region": "r1", "sub_zone": "s1"}, {"region": "r1", "sub_zone": "s1"}),
        (
            {"region": "r", "zone": "z", "sub_zone": "s"},
            {"region": "r", "zone": "z", "sub_zone": "s"},
        ),
        ({"zone": ""}, None),  # proto3: an empty string is no zone
    ],
)
def test_locality_holds_only_the_keys_given(
    given: dict[str, str], locality: dict[str, str] | None
) -> None:
    node = grpc_bootstrap("c", ADDRESS, **given)["node"]
    assert node.get("locality") == locality
    assert ("locality" in node) == (locality is not None)


def test_cluster_and_namespace_only_when_given() -> None:
    bare = grpc_bootstrap("c", ADDRESS)["node"]
    assert set(bare) == {"id"}
    node = grpc_bootstrap("client-1", ADDRESS, node_cluster="echo-clients", namespace="demo")[
        "node"
    ]
    assert node == {"id": "client-1", "cluster": "echo-clients", "metadata": {"NAMESPACE": "demo"}}


def test_namespace_is_the_one_the_control_plane_scopes_by() -> None:
    for node_id in ("client-1", "client-1.demo"):
        node = grpc_bootstrap(node_id, ADDRESS, namespace="demo")["node"]
        assert claimed_namespace(node["id"], node["metadata"]) == "demo"
        assert node["metadata"] == {NAMESPACE_KEY: "demo"}


def test_ipv6_address_is_bracketed() -> None:
    assert server(grpc_bootstrap("c", "[::1]:18000"))["server_uri"] == "[::1]:18000"
    assert server(grpc_bootstrap("c", "::1:18000"))["server_uri"] == "[::1]:18000"
    assert server(grpc_bootstrap("c", "xds.example:443"))["server_uri"] == "xds.example:443"


@pytest.mark.parametrize(
    "node_id, address, options, message",
    [
        ("", ADDRESS, {}, "the node id is empty"),
        ("n" * (MAX_NODE_FIELD + 1), ADDRESS, {}, f"at most {MAX_NODE_FIELD}"),
        ("c", ADDRESS, {"node_cluster": "c" * (MAX_NODE_FIELD + 1)}, "the node cluster is"),
        ("c", "no-port", {}, "'no-port' is not HOST:PORT"),
        ("c", "127.0.0.1:0", {}, "is not HOST:PORT"),
        ("c", "127.0.0.1:65536", {}, "is not HOST:PORT"),
        ("c", ADDRESS, {"namespace": ""}, "is not a Kubernetes namespace name"),
        ("c", ADDRESS, {"namespace": "Demo"}, "is not a Kubernetes namespace name"),
        ("client.other", ADDRESS, {"namespace": "demo"}, "names namespace 'other', not 'demo'"),
    ],
)
def test_invalid_values_are_refused_in_one_line(
    node_id: str, address: str, options: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        grpc_bootstrap(node_id, address, **options)
    assert "\n" not in str(caught.value)


def test_longest_node_id_is_accepted() -> None:
    node_id = "n" * MAX_NODE_FIELD
    assert grpc_bootstrap(node_id, ADDRESS)["node"]["id"] == node_id


# --- the CLI ----------------------------------------------------------------------------------


def test_cli_prints_the_bootstrap_as_json() -> None:
    result = xds(
        "bootstrap", "--grpc", "--node-id", "client-1.demo", "--xds-address", ADDRESS,
        "--region", "r1", "--zone", "z1", "--sub-zone", "s1", "--cluster", "echo-clients",
        "--namespace", "demo",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith('{\n  "xds_servers"')  # indent 2
    assert json.loads(result.stdout) == grpc_bootstrap(
        "client-1.demo",
        ADDRESS,
        node_cluster="echo-clients",
        region="r1",
        zone="z1",
        sub_zone="s1",
        namespace="demo",
    )


def test_cli_tls_dir_is_mtls_with_envoys_files(tmp_path: Path) -> None:
    result = xds(
        "bootstrap", "--grpc", "--node-id", "c", "--xds-address", ADDRESS,
        "--tls-dir", str(tmp_path), "--tls-key", str(tmp_path / "keys" / "client.key"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert server(json.loads(result.stdout))["channel_creds"] == [
        {
            "type": "tls",
            "config": {
                "ca_certificate_file": str(tmp_path / "ca.crt"),
                "certificate_file": str(tmp_path / "tls.crt"),
                "private_key_file": str(tmp_path / "keys" / "client.key"),
            },
        }
    ]


def test_cli_tls_ca_alone_is_tls_and_with_cert_and_key_mtls(tmp_path: Path) -> None:
    base = ["bootstrap", "--grpc", "--node-id", "c", "--xds-address", ADDRESS]
    ca = ["--tls-ca", str(tmp_path / "ca.pem")]
    tls = xds(*base, *ca)
    assert tls.returncode == 0, tls.stderr
    assert server(json.loads(tls.stdout))["channel_creds"] == [
        {"type": "tls", "config": {"ca_certificate_file": str(tmp_path / "ca.pem")}}
    ]
    pair = ["--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem")]
    mtls = xds(*base, *ca, *pair)
    assert mtls.returncode == 0, mtls.stderr
    assert server(json.loads(mtls.stdout))["channel_creds"][0]["config"] == {
        "ca_certificate_file": str(tmp_path / "ca.pem"),
        "certificate_file": str(tmp_path / "c.pem"),
        "private_key_file": str(tmp_path / "k.pem"),
    }


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mode", "ads"], "xds: --mode: for Envoy's bootstrap only, not with --grpc"),
        (["--admin-port", "9901"], "xds: --admin-port: for Envoy's bootstrap only"),
        (["--otel-collector", "127.0.0.1:4317"], "xds: --otel-collector: for Envoy's"),
        (["--tls-dir", "tls", "--write-sds"], "xds: --write-sds: for Envoy's"),
        (["--mode", "delta", "--admin-port", "1"], "xds: --admin-port, --mode: for Envoy's"),
        (["--tls-cert", "c.pem", "--tls-key", "k.pem"], "xds: --tls-cert and --tls-key need"),
        (["--tls-ca", "ca.pem", "--tls-cert", "c.pem"], "xds: a client certificate needs"),
        (["--namespace", "other"], "xds: node id 'client-1.demo' names namespace 'demo', not"),
        (["--namespace", "Not_A_Label"], "xds: namespace 'Not_A_Label' is not a Kubernetes"),
    ],
)
def test_cli_refuses_what_a_grpc_bootstrap_cannot_hold(args: list[str], message: str) -> None:
    result = xds(
        "bootstrap", "--grpc", "--node-id", "client-1.demo", "--xds-address", ADDRESS, *args
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "node_id, address, message",
    [
        ("", ADDRESS, "xds: the node id is empty"),
        ("n" * (MAX_NODE_FIELD + 1), ADDRESS, "xds: the node id is 1025 characters"),
        ("c", "no-port", "xds: 'no-port' is not HOST:PORT"),
    ],
)
def test_cli_refuses_bad_node_ids_and_addresses(node_id: str, address: str, message: str) -> None:
    result = xds("bootstrap", "--grpc", "--node-id", node_id, "--xds-address", address)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1


def test_envoy_bootstrap_takes_the_locality_and_namespace_too() -> None:
    """Envoy's node names its locality (locality-aware endpoints prefer it) and namespace too."""
    result = xds(
        "bootstrap",
        "--node-id",
        "envoy-1",
        "--xds-address",
        ADDRESS,
        "--region",
        "eu",
        "--zone",
        "eu-a",
        "--namespace",
        "team-a",
        "--cluster-id",
        "east",
    )
    assert result.returncode == 0, result.stderr
    node = json.loads(result.stdout)["node"]
    assert node == {
        "id": "envoy-1",
        "cluster": "xds-proxies",
        "locality": {"region": "eu", "zone": "eu-a"},
        "metadata": {"NAMESPACE": "team-a", "CLUSTER_ID": "east"},
    }
    refused = xds("bootstrap", "--node-id", "n", "--xds-address", ADDRESS, "--namespace", "A B")
    assert (refused.returncode, refused.stdout) == (2, "")
    assert "not a Kubernetes namespace name" in refused.stderr


def test_envoy_bootstrap_defaults_are_unchanged() -> None:
    result = xds("bootstrap", "--node-id", "n", "--xds-address", ADDRESS)
    assert result.returncode == 0, result.stderr
    envoy = json.loads(result.stdout)
    assert envoy["node"] == {"id": "n", "cluster": "xds-proxies"}
    assert envoy["admin"]["address"]["socket_address"]["port_value"] == 9901
    assert "ads_config" in envoy["dynamic_resources"]
    assert envoy["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"


# --- grpcio's xDS client reading the bootstrap ---------------------------------------------------

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
TARGET = "echo.demo:50051"
# grpcio reads GRPC_XDS_BOOTSTRAP once per process: the client runs in a process of its own.
# Its channel never gets ready (the stand-in answers nothing); the test kills it first.
CLIENT = f"""
import grpc
channel = grpc.insecure_channel("xds:///{TARGET}")
try:
    grpc.channel_ready_future(channel).result(timeout=60)
except grpc.FutureTimeoutError:
    pass
"""


class AdsStandIn:
    """An ADS server on 127.0.0.1 that answers nothing and keeps each request's bytes, with the
    client certificate's names (None over plaintext or without one)."""

    def __init__(self, credentials: grpc.ServerCredentials | None = None) -> None:
        self.requests: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()
        self._credentials = credentials
        self._server = grpc.aio.server()
        self.port = 0

    async def _ads(self, requests: Any, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        async for request in requests:
            self.requests.put_nowait((request, peer_identity(context.auth_context())))

    async def __aenter__(self) -> AdsStandIn:
        # No serializers: the handler gets each request's bytes as they came.
        handler = grpc.stream_stream_rpc_method_handler(self._ads)
        methods = {"StreamAggregatedResources": handler}
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(ADS_SERVICE, methods)]
        )
        if self._credentials is None:
            self.port = self._server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self._server.add_secure_port("127.0.0.1:0", self._credentials)
        await self._server.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._server.stop(grace=None)


async def first_request(bootstrap: str, ads: AdsStandIn, tmp_path: Path) -> tuple[bytes, Any]:
    """The first request grpcio's xDS client sends `ads` when bootstrapped with `bootstrap`."""
    path = tmp_path / "grpc-bootstrap.json"
    path.write_text(bootstrap)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_XDS_BOOTSTRAP")}
    # No proxy between the client and loopback, whatever the environment says.
    for name in ("grpc_proxy", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env.pop(name, None)
    env["GRPC_XDS_BOOTSTRAP"] = str(path)
    stderr = tmp_path / "client.stderr"
    with stderr.open("wb") as err:
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, env=env, stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        got = asyncio.ensure_future(ads.requests.get())
        exited = asyncio.ensure_future(client.wait())
        done, _ = await asyncio.wait({got, exited}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        for task in (got, exited):
            if task not in done:
                task.cancel()
        if got not in done:
            said = stderr.read_text()[-2000:]
            pytest.fail(f"no ADS request within 30 s (client exit {client.returncode}): {said}")
        return got.result()
    finally:
        with contextlib.suppress(ProcessLookupError):
            client.kill()
        await client.wait()


def assert_request_carries_the_bootstrap(data: bytes) -> None:
    request = DiscoveryRequest.FromString(data)
    assert request.node.id == "echo-client.demo"
    assert request.node.cluster == "echo-clients"
    assert request.node.locality.zone == "z1"
    assert request.node.locality.region == "r1"
    assert request.node.metadata.fields["NAMESPACE"].string_value == "demo"
    assert list(request.resource_names) == [TARGET]
    assert request.type_url == "type.googleapis.com/envoy.config.listener.v3.Listener"


BOOTSTRAP_ARGS = [
    "--node-id", "echo-client.demo", "--cluster", "echo-clients", "--region", "r1",
    "--zone", "z1", "--namespace", "demo",
]  # fmt: skip


async def test_grpcio_xds_client_sends_the_node_it_was_bootstrapped_with(tmp_path: Path) -> None:
    async with AdsStandIn() as ads:
        address = f"127.0.0.1:{ads.port}"
        result = xds("bootstrap", "--grpc", *BOOTSTRAP_ARGS, "--xds-address", address)
        assert result.returncode == 0, result.stderr
        data, peer = await first_request(result.stdout, ads, tmp_path)
    assert_request_carries_the_bootstrap(data)
    assert peer is None  # plaintext


async def test_grpcio_xds_client_connects_over_mtls(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    client_cert = ca.issue_cert("echo-client.demo")
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    # The layout of a Kubernetes TLS Secret, as --tls-dir expects it.
    ca.cert_pem.write_to_path(tls_dir / "ca.crt")
    client_cert.cert_chain_pems[0].write_to_path(tls_dir / "tls.crt")
    client_cert.private_key_pem.write_to_path(tls_dir / "tls.key")
    credentials = grpc.ssl_server_credentials(
        [(server_cert.private_key_pem.bytes(), server_cert.cert_chain_pems[0].bytes())],
        root_certificates=ca.cert_pem.bytes(),
        require_client_auth=True,
    )
    async with AdsStandIn(credentials) as ads:
        result = xds(
            "bootstrap", "--grpc", *BOOTSTRAP_ARGS, "--xds-address", f"127.0.0.1:{ads.port}",
            "--tls-dir", str(tls_dir),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        data, peer = await first_request(result.stdout, ads, tmp_path)
    assert_request_carries_the_bootstrap(data)
    assert peer is not None and peer.dns == ("echo-client.demo",)  # its certificate, presented
