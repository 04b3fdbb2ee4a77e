"""Peer benchmark: sovereign (the Python control plane on PyPI, REST polling) and this project on
the same workload and the same Envoy, with the ratios.

The workload: S Services x E endpoints (1,000 x 10 by default), all in one file, a change giving
the first endpoint of one Service an address no earlier change used (one change at a time). For
each control plane, in a process (tree) of its own with one real Envoy:

- idle CPU: the control plane's process tree (sovereign's gunicorn master and workers) and Envoy,
  over `--idle` seconds once Envoy holds every cluster and nothing changes;
- propagation: file write (the rename of the replaced file) -> Envoy creates the host at the new
  address, and -> Envoy accepts the response carrying it, from Envoy's own time-stamped log
  (bench/_propagation.py); p50/p99/max.

sovereign's side, configured from its documented settings (see `sovereign_config`): a `file`
source holding the Services as JSON instances, re-read every `--source-refresh` seconds (its
`source_config.refresh_rate`, whole seconds, default there 30); Python templates (sovereign's
fastest kind, no Jinja or YAML on the request path) render Clusters with their endpoints inline
(STATIC: no per-cluster EDS polling, which would be 1,000 REST polls per refresh) and one Listener
whose routes are inline, as this project serves them; Envoy polls CDS and LDS over REST every
`--refresh-delay` seconds. Node matching and access logs are off; the gunicorn worker count is
sovereign's own default (2 x cores + 1) unless `--sovereign-workers` says otherwise. Changes are
spaced by a random pause of up to `--source-refresh` + `--refresh-delay` seconds, so that they land
at every phase of both polling loops. This project runs `xds serve` on the same Services as
Kubernetes manifests in one file, Envoy on ADS (state of the world).

sovereign comes from the `bench` extra (`pip install -e '.[bench]'`); its dependencies install
beside this project's without conflict, so it runs from the same virtual environment.

    python bench/peer_sovereign.py                       # 1,000 Services x 10 endpoints
    python bench/peer_sovereign.py --services 100 --changes 10 --idle 5
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    MAX_CHANGES,
    TARGET_PORT,
    Clock,
    Deadline,
    Workload,
    bounded,
    http_get,
    interrupt_on_sigterm,
    log_tail,
    ms,
    spawn,
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
    idle_cores,
    machine,
    measure_changes,
)
from propagation import run_variant  # noqa: E402

from xds.local import free_port  # noqa: E402

READY_TIMEOUT_S = 180.0
SOVEREIGN = "sovereign"


# --- sovereign's configuration ---------------------------------------------------------------

# The templates sovereign renders on every discovery request: Python modules with a `call` that
# yields resources from the source's instances (sovereign's "python" template protocol).
CLUSTERS_TEMPLATE = """\
def call(instances, **_):
    for service in instances:
        yield {
            "name": service["cluster"],
            "type": "STATIC",
            "connect_timeout": "1s",
            "lb_policy": "RANDOM",
            "load_assignment": {
                "cluster_name": service["cluster"],
                "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {
                        "address": address, "port_value": service["target_port"]}}}}
                    for address in service["endpoints"]
                ]}],
            },
        }
"""

LISTENERS_TEMPLATE = """\
LISTENER_PORT = {listener_port}


def call(instances, **_):
    hosts = [
        {{
            "name": service["cluster"],
            "domains": service["domains"],
            "routes": [{{"match": {{"prefix": "/"}}, "route": {{"cluster": service["cluster"]}}}}],
        }}
        for service in instances
    ]
    manager = {{
        "@type": "type.googleapis.com/envoy.extensions.filters.network"
        ".http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "port_80",
        "route_config": {{"name": "http:80", "virtual_hosts": hosts}},
        "http_filters": [{{
            "name": "envoy.filters.http.router",
            "typed_config": {{
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
            }},
        }}],
    }}
    yield {{
        "name": "port:80",
        "address": {{"socket_address": {{"address": "127.0.0.1", "port_value": LISTENER_PORT}}}},
        "filter_chains": [{{"filters": [{{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": manager,
        }}]}}],
    }}
"""


def instances(workload: Workload) -> str:
    """The Services as sovereign source instances (JSON), the same data as the manifests."""
    out = []
    for index in range(workload.services):
        namespace, name = workload.name(index)
        out.append(
            {
                "cluster": f"{namespace}/{name}:http",
                "domains": [name, f"{name}.{namespace}", f"{name}.{namespace}.svc"],
                "target_port": TARGET_PORT,
                "endpoints": workload.addresses(index),
            }
        )
    return json.dumps(out)


def sovereign_config(directory: Path, source: Path, refresh: int) -> dict[str, Any]:
    template = {"protocol": "python", "serialization": "raw"}
    return {
        "templates": {
            "default": [
                {"type": "clusters", "spec": {**template, "path": str(directory / "clusters.py")}},
                {
                    "type": "listeners",
                    "spec": {**template, "path": str(directory / "listeners.py")},
                },
            ]
        },
        "sources": [{"type": "file", "config": {"path": f"file+json://{source}"}}],
        "source_config": {"refresh_rate": refresh},
        "matching": {"enabled": False},
        "logging": {"access_logs": {"enabled": False}},
    }


def rest_bootstrap(sovereign_port: int, refresh_delay: float) -> dict[str, Any]:
    """Envoy polling CDS and LDS from sovereign over REST."""
    source = {
        "resource_api_version": "V3",
        "api_config_source": {
            "api_type": "REST",
            "transport_api_version": "V3",
            "cluster_names": [SOVEREIGN],
            "refresh_delay": f"{refresh_delay}s",
            "request_timeout": "10s",
        },
    }
    address = {"socket_address": {"address": "127.0.0.1", "port_value": sovereign_port}}
    return {
        "node": {"id": "bench-sovereign", "cluster": "bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {"cds_config": source, "lds_config": source},
        "static_resources": {
            "clusters": [
                {
                    "name": SOVEREIGN,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": SOVEREIGN,
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
                    },
                }
            ]
        },
    }


def run_sovereign(args: argparse.Namespace, plan: Plan, clock: Clock) -> Result:
    result = Result("sovereign")
    with tempfile.TemporaryDirectory(prefix="xds-sovereign-") as tmp:
        workdir = Path(tmp)
        workload = Workload(args.services, plan.endpoints)
        source = workdir / "services.json"
        write_atomically(source, instances(workload))
        listener_port, port = free_port(), free_port()
        (workdir / "clusters.py").write_text(CLUSTERS_TEMPLATE)
        (workdir / "listeners.py").write_text(
            LISTENERS_TEMPLATE.format(listener_port=listener_port)
        )
        config = workdir / "sovereign.json"
        config.write_text(json.dumps(sovereign_config(workdir, source, args.source_refresh)))
        env = {
            **os.environ,
            "SOVEREIGN_CONFIG": f"file+json://{config}",
            "SOVEREIGN_HOST": "127.0.0.1",
            "SOVEREIGN_PORT": str(port),
        }
        if args.sovereign_workers:
            env["SOVEREIGN_WORKERS"] = str(args.sovereign_workers)
        log = workdir / "sovereign.log"
        envoy: EnvoyProcess | None = None
        server = None
        try:
            started = time.monotonic()
            # In its own directory: sovereign's settings also read a `.env` file there.
            command = [str(Path(sys.executable).with_name(SOVEREIGN))]
            server = spawn(command, log, env=env, cwd=workdir)

            def ready() -> bool:
                if server is not None and server.poll() is not None:
                    raise RuntimeError(f"sovereign exited:\n{log_tail(log)}")
                return http_get(f"http://127.0.0.1:{port}/healthcheck") is not None

            wait_until(ready, clock.left(READY_TIMEOUT_S), "sovereign /healthcheck")
            envoy = EnvoyProcess(rest_bootstrap(port, args.refresh_delay), workdir, "envoy")
            envoy.start(clock.left(READY_TIMEOUT_S))
            wait_until(
                lambda: envoy is not None and envoy.has_clusters(args.services + 1),
                clock.left(READY_TIMEOUT_S),
                f"Envoy holding {args.services} clusters",
            )
            result.setup_s = time.monotonic() - started
            time.sleep(min(IDLE_SETTLE_S, clock.left()))
            result.idle_plane, result.idle_envoy = idle_cores(
                [server.pid, envoy.process.pid if envoy.process else 0], plan.idle
            )

            def apply(index: int) -> float:
                return write_atomically(source, instances(workload))

            measure_changes(result, envoy, workload, apply, plan, clock)
        except (Deadline, RuntimeError) as exc:
            result.note = str(exc).splitlines()[0]
            print(f"sovereign: {exc}", file=sys.stderr)
            print(f"sovereign log (last lines):\n{log_tail(log)}", file=sys.stderr)
        finally:
            if envoy is not None:
                envoy.stop()
            stop(server)
    return result


# --- report ----------------------------------------------------------------------------------


def ratio(theirs: float | None, ours: float | None) -> str:
    if theirs is None or ours is None:
        return "-"
    if ours <= 0:
        return "inf" if theirs > 0 else "-"
    return f"{theirs / ours:,.0f}x" if theirs / ours >= 10 else f"{theirs / ours:,.1f}x"


def report(sovereign: Result, ours: Result) -> None:
    print(
        f"{'':<10} {'changes':>7} {'has p50':>9} {'ACKed p50':>10} {'p99':>9} {'max':>9} "
        f"{'idle CP':>8} {'idle Envoy':>10}"
    )
    print(f"{'':<10} {'':>7} {'ms':>9} {'ms':>10} {'ms':>9} {'ms':>9} {'cores':>8} {'cores':>10}")
    columns: list[list[float | None]] = []
    for label, result in (("sovereign", sovereign), ("xds", ours)):
        p50, p99, top = summary(result.accepted)
        has50 = summary(result.has)[0]
        values = [has50, p50, p99, top, result.idle_plane, result.idle_envoy]
        columns.append(values)
        idle_cp = "-" if result.idle_plane is None else f"{result.idle_plane:.3f}"
        idle_envoy = "-" if result.idle_envoy is None else f"{result.idle_envoy:.3f}"
        print(
            f"{label:<10} {len(result.accepted):>7} {ms(has50):>9} {ms(p50):>10} "
            f"{ms(p99):>9} {ms(top):>9} {idle_cp:>8} {idle_envoy:>10}"
        )
    ratios = [ratio(theirs, ours) for theirs, ours in zip(*columns, strict=True)]
    print(
        f"{'ratio':<10} {'':>7} {ratios[0]:>9} {ratios[1]:>10} {ratios[2]:>9} {ratios[3]:>9} "
        f"{ratios[4]:>8} {ratios[5]:>10}"
    )
    print("ratio: sovereign / xds (how many times slower, or busier while idle)")
    for result in (sovereign, ours):
        if result.note:
            print(f"{result.label}: stopped: {result.note}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])

    parser.add_argument("--services", type=bounded(1, MAX_SERVICES), default=1000)
    parser.add_argument("--endpoints", type=bounded(1, MAX_ENDPOINTS), default=10)
    parser.add_argument("--changes", type=bounded(1, MAX_CHANGES - 1), default=20)
    parser.add_argument("--idle", type=float, default=10.0, help="idle CPU window, s")
    parser.add_argument(
        "--source-refresh", type=bounded(1, 3600), default=1,
        help="sovereign's source refresh_rate, whole seconds (default 1)",
    )  # fmt: skip
    parser.add_argument(
        "--refresh-delay", type=float, default=1.0,
        help="Envoy's REST refresh_delay towards sovereign, s (default 1)",
    )  # fmt: skip
    parser.add_argument(
        "--sovereign-workers", type=bounded(1, 64), default=None,
        help="gunicorn workers (default: sovereign's own, 2 x cores + 1)",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=900.0, help="global deadline, s")
    parser.add_argument("--change-timeout", type=float, default=60.0, help="per change, s")
    args = parser.parse_args()
    if min(args.timeout, args.change_timeout, args.idle, args.refresh_delay) <= 0:
        parser.error("timeouts, --idle and --refresh-delay must be positive")
    return args


def main() -> int:
    args = parse_args()
    try:
        version = importlib.metadata.version(SOVEREIGN)
    except importlib.metadata.PackageNotFoundError:
        print("sovereign is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    interrupt_on_sigterm()
    clock = Clock(args.timeout)
    plan = Plan(
        endpoints=args.endpoints,
        changes=args.changes,
        change_timeout=args.change_timeout,
        gap=0.2,
        gap_jitter=args.source_refresh + args.refresh_delay,
        idle=args.idle,
    )
    workers = args.sovereign_workers or 2 * (os.cpu_count() or 1) + 1
    print(
        f"sovereign {version} vs xds: {args.services:,} Services x {args.endpoints} endpoints "
        f"in one file, one Envoy; {args.changes} changes, idle over {args.idle:g} s"
    )
    print(
        f"sovereign: file source refresh {args.source_refresh} s, Envoy REST refresh_delay "
        f"{args.refresh_delay:g} s, {workers} gunicorn workers; xds: ADS state of the world"
    )
    print(f"machine: {machine()}", flush=True)
    try:
        theirs = run_sovereign(args, plan, clock)
        ours = run_variant("file", args.services, "ads", plan, clock)
    except Deadline as exc:
        print(f"stopped: {exc}")
        return 1
    ours.label = "xds"
    report(theirs, ours)
    return 1 if theirs.note or ours.note else 0


if __name__ == "__main__":
    sys.exit(main())
