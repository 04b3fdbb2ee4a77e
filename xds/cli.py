"""The `xds` command: serve, bootstrap, translate, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from xds.config import LB_POLICIES, Settings


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(
        manifests=tuple(Path(p) for p in args.manifests or ()),
        kubernetes=getattr(args, "kubernetes", False),
        kubeconfig=getattr(args, "kubeconfig", None),
        kube_context=getattr(args, "context", None),
        namespaces=tuple(getattr(args, "namespace", None) or ()),
        xds_host=getattr(args, "xds_host", "127.0.0.1"),
        xds_port=getattr(args, "xds_port", 18000),
        admin_host=getattr(args, "admin_host", "127.0.0.1"),
        admin_port=getattr(args, "admin_port", None),
        listener_port_offset=args.listener_port_offset,
        listener_address=args.listener_address,
        lb_policy=args.lb_policy,
        cluster_domain=args.cluster_domain,
        tracing_cluster=args.tracing_cluster,
    )


def _add_translation_options(parser: argparse.ArgumentParser, kubernetes: bool = False) -> None:
    sources = parser.add_mutually_exclusive_group(required=True)
    sources.add_argument(
        "--manifests",
        action="append",
        metavar="PATH",
        help="a manifest file or directory (Service, EndpointSlice, Endpoints); repeatable",
    )
    if kubernetes:
        sources.add_argument(
            "--kubernetes",
            action="store_true",
            help="watch the Kubernetes API (in-cluster config unless --kubeconfig/--context)",
        )
        parser.add_argument("--kubeconfig", metavar="PATH", help="kubeconfig file")
        parser.add_argument("--context", metavar="NAME", help="kubeconfig context")
        parser.add_argument(
            "--namespace",
            action="append",
            metavar="NS",
            help="watch only this namespace; repeatable (default: all)",
        )
    parser.add_argument(
        "--listener-port-offset",
        type=int,
        default=0,
        metavar="N",
        help="Envoy listens on service port + N (default 0)",
    )
    parser.add_argument(
        "--listener-address",
        default="0.0.0.0",
        help="address Envoy's listeners bind (default 0.0.0.0)",
    )
    parser.add_argument(
        "--lb-policy",
        default="RANDOM",
        choices=LB_POLICIES,
        help="default load balancing policy (default RANDOM)",
    )
    parser.add_argument(
        "--cluster-domain",
        default="cluster.local",
        help="cluster DNS domain used in virtual host names",
    )
    parser.add_argument(
        "--tracing-cluster",
        metavar="NAME",
        help="trace requests in Envoy, sending spans to this bootstrap cluster "
        "(otel_collector with xds bootstrap --otel-collector)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xds", description="An Envoy xDS control plane.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve xDS from manifests or the Kubernetes API")
    _add_translation_options(serve, kubernetes=True)
    serve.add_argument("--xds-host", default="127.0.0.1", help="xDS listen address")
    serve.add_argument("--xds-port", type=int, default=18000, help="xDS gRPC port (default 18000)")
    serve.add_argument(
        "--admin-port",
        type=int,
        default=None,
        help="admin HTTP port for /healthz, /readyz, /debug/* (off by default)",
    )
    serve.add_argument(
        "--admin-host", default="127.0.0.1", help="admin listen address (default 127.0.0.1)"
    )

    boot = commands.add_parser("bootstrap", help="print an Envoy bootstrap for this control plane")
    boot.add_argument("--node-id", required=True)
    boot.add_argument("--node-cluster", default="xds-proxies")
    boot.add_argument("--xds-address", required=True, metavar="HOST:PORT")
    boot.add_argument("--admin-port", type=int, default=9901, help="Envoy admin port (loopback)")
    boot.add_argument(
        "--otel-collector",
        metavar="HOST:PORT",
        help="an OTLP/gRPC collector for request traces: defines the cluster otel_collector",
    )
    boot.add_argument(
        "--mode",
        default="ads",
        choices=("ads", "xds", "delta-ads", "delta"),
        help="ads: one state-of-the-world stream (default); xds: one stream per type; "
        "delta-ads and delta: the same with incremental xDS",
    )

    translate = commands.add_parser(
        "translate", help="print the Envoy resources for manifests as JSON, without serving"
    )
    _add_translation_options(translate)

    status = commands.add_parser(
        "status", help="show what each connected proxy was sent and has acknowledged"
    )
    status.add_argument(
        "--admin",
        default="127.0.0.1:9902",
        metavar="HOST:PORT",
        help="the control plane's admin address (xds serve --admin-port; default 127.0.0.1:9902)",
    )

    demo = commands.add_parser(
        "demo", help="run the control plane, Envoy and three backends, and show the traffic"
    )
    demo.add_argument(
        "--requests",
        type=int,
        default=0,
        help="stop after this many requests (default: run until Ctrl-C)",
    )
    demo.add_argument("--rate", type=float, default=200.0, help="requests per second")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every change at INFO
    try:
        if args.command == "serve":
            return _serve(_settings(args))
        if args.command == "bootstrap":
            return _bootstrap(args)
        if args.command == "translate":
            return _translate(_settings(args))
        if args.command == "status":
            return _status(args.admin)
        if args.command == "demo":
            from xds.demo import run_demo

            return run_demo(requests=args.requests, rate=args.rate)
    except ValueError as exc:
        print(f"xds: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a port in use, an unreadable path: say it, without a traceback
        print(f"xds: {exc}", file=sys.stderr)
        return 1
    return 2


def _serve(settings: Settings) -> int:
    from xds import telemetry
    from xds.app import serve

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    provider = telemetry.setup_tracing()
    try:
        asyncio.run(run())
    finally:
        telemetry.shutdown(provider)  # flushes the spans still queued
    return 0


def _bootstrap(args: argparse.Namespace) -> int:
    from xds.bootstrap import bootstrap_text

    print(
        bootstrap_text(
            node_id=args.node_id,
            node_cluster=args.node_cluster,
            xds_address=args.xds_address,
            admin_port=args.admin_port,
            mode=args.mode,
            otel_collector=args.otel_collector,
        ),
        end="",
    )
    return 0


def _status(admin: str) -> int:
    import urllib.request

    from xds.status import render_syncz

    url = f"http://{admin}/debug/syncz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            clients = json.load(response)
    except OSError as exc:
        print(f"xds: cannot read {url}: {exc}", file=sys.stderr)
        return 1
    print(render_syncz(clients))
    return 0


def _translate(settings: Settings) -> int:
    from xds.sources.files import ManifestSource
    from xds.translate import to_json, translate

    source = ManifestSource(list(settings.manifests))
    source.reload()
    translation = translate(source.mesh(), settings)
    problems = [*source.problems(), *translation.problems]
    for problem in problems:
        print(problem, file=sys.stderr)
    print(json.dumps(to_json(translation.resources), indent=2))
    return 1 if any(p.severity == "error" for p in problems) else 0


if __name__ == "__main__":
    sys.exit(main())
