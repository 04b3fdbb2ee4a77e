"""The `xds` command: serve, bootstrap (Envoy's, or with --grpc a proxyless gRPC client's),
translate, status, demo.

Conventions every subcommand shares: the global options (`--log-level`, `--log-format`) go before
or after the subcommand; a usage error is one line on stderr and exit 2; every log record is one
line on stderr, text or JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from xds.config import LB_POLICIES, SCOPES, ClusterSource, Settings, parse_cidr
from xds.errors import USAGE, ConfigError

if TYPE_CHECKING:  # imported where used: bootstrap is not loaded by the other commands
    from xds.bootstrap import BootstrapTLS
    from xds.sources.clusters import ClusterSet

log = logging.getLogger(__name__)

DISTRIBUTION = "xds-control-plane"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
# As a --manifests path: standard input (xds.sources.files.STDIN, not imported from there: the
# file source is slow to import for the commands that do not read files).
STDIN = "-"

# Every character `str.splitlines()` breaks at, mapped to its escape: a record with a newline in
# its message (Envoy's NACK details, a file name) or a traceback stays on one line.
_LINE_BREAKS = str.maketrans(
    {c: c.encode("unicode_escape").decode("ascii") for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}
)


def one_line(text: str) -> str:
    """`text` with its line breaks escaped (`\\n`, `\\u2028`, ...)."""
    return text.translate(_LINE_BREAKS)


class _OneLineFormatter(logging.Formatter):
    """The standard text format, one line per record, the traceback (if any) included."""

    def format(self, record: logging.LogRecord) -> str:
        return one_line(super().format(record))


def configure_logging(level: str, log_format: str) -> None:
    """Every record to stderr as one line: `text` (time, level, logger: message) or `json` (one
    object with timestamp, level, logger, message, and exception when there is one)."""
    formatter: logging.Formatter
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        formatter = JsonFormatter(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger", "exc_info": "exception"},
            timestamp=True,
        )
    else:
        formatter = _OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    # force: main() may run more than once in a process; one handler, never two.
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every change at INFO


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (`xds serve: error: ...`) and exit 2: the usage block argparse
    prints first would push the one line that matters out of sight. Subcommand parsers are of
    this class too (argparse makes them of the parent's class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def _one_of(*choices: str) -> Callable[[str], str]:
    """An argparse type: one of `choices`, in any case, spelled as in `choices`."""
    by_folded = {choice.casefold(): choice for choice in choices}

    def parse(value: str) -> str:
        try:
            return by_folded[value.casefold()]
        except KeyError:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {value!r} (choose from {', '.join(choices)})"
            ) from None

    return parse


def _manifest_path(stdin: bool) -> Callable[[str], str]:
    """An argparse type: a path that exists, or `-` (standard input) where `stdin` allows it."""

    def parse(value: str) -> str:
        if value == STDIN:
            if not stdin:
                raise argparse.ArgumentTypeError(
                    "'-' (standard input) cannot be served: serve watches its manifests for "
                    "changes, and standard input can be read only once (use xds translate)"
                )
            return value
        if not os.path.exists(value):
            raise argparse.ArgumentTypeError(f"no such file or directory: {value}")
        return value

    return parse


def _version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
        return "unknown"


def _add_global_options(parser: argparse.ArgumentParser, with_defaults: bool) -> None:
    """The options every subcommand takes, before or after it. Only the top-level parser has
    defaults: a subcommand's parser writes what it parsed over the top-level values, so a default
    there would undo `xds --log-level debug serve`."""

    def default(value: str) -> str:
        return value if with_defaults else argparse.SUPPRESS

    parser.add_argument(
        "--log-level",
        type=_one_of(*LOG_LEVELS),
        default=default("INFO"),
        metavar="{" + ",".join(LOG_LEVELS) + "}",
        help="the least severe records logged (default INFO; any case)",
    )
    parser.add_argument(
        "--log-format",
        type=_one_of(*LOG_FORMATS),
        default=default("text"),
        metavar="{" + ",".join(LOG_FORMATS) + "}",
        help="text: one line per record (default); json: one JSON object per line",
    )


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(
        manifests=tuple(Path(p) for p in args.manifests or ()),
        clusters=_clusters(args),
        cluster_stale_limit_s=getattr(args, "cluster_stale_limit", None) or None,
        kubernetes=getattr(args, "kubernetes", False),
        kubeconfig=getattr(args, "kubeconfig", None),
        kube_context=_single_context(args),
        namespaces=tuple(getattr(args, "namespace", None) or ()),
        xds_host=getattr(args, "xds_host", Settings.xds_host),
        xds_port=getattr(args, "xds_port", Settings.xds_port),
        admin_host=getattr(args, "admin_host", Settings.admin_host),
        admin_port=getattr(args, "admin_port", None),
        admin_token=_read_token(getattr(args, "admin_token_file", None)),
        health_host=getattr(args, "health_host", Settings.health_host),
        debounce_quiet_s=getattr(args, "debounce_quiet", Settings.debounce_quiet_s),
        debounce_max_s=getattr(args, "debounce_max", Settings.debounce_max_s),
        kube_watch_timeout_s=getattr(args, "kube_watch_timeout", Settings.kube_watch_timeout_s),
        kube_read_timeout_s=getattr(args, "kube_read_timeout", Settings.kube_read_timeout_s),
        health_port=getattr(args, "health_port", None),
        tls_cert=_optional_path(getattr(args, "tls_cert", None)),
        tls_key=_optional_path(getattr(args, "tls_key", None)),
        tls_client_ca=_optional_path(getattr(args, "tls_client_ca", None)),
        trust_domain=getattr(args, "trust_domain", None),
        max_receive_bytes=getattr(args, "max_receive_bytes", None),
        max_connection_age_s=getattr(args, "max_connection_age", None),
        max_streams_per_peer=getattr(args, "max_streams_per_peer", None),
        listener_port_offset=args.listener_port_offset,
        listener_address=args.listener_address,
        lb_policy=args.lb_policy,
        cluster_domain=args.cluster_domain,
        tracing_cluster=args.tracing_cluster,
        protocol_detection_timeout_s=args.protocol_detection_timeout,
        cluster_patch_namespaces=tuple(args.allow_cluster_patch or ()),
        scope=args.scope,
        mesh_wide_namespaces=tuple(args.mesh_wide_namespace or ()),
        locality_aware=args.locality_aware,
        allowed_endpoint_ranges=tuple(args.allow_endpoints or ()),
    )


def _cluster_manifests(text: str) -> tuple[str, Path]:
    name, equals, path = text.partition("=")
    if not equals or not _CLUSTER_NAME.fullmatch(name) or not path:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not NAME=PATH (a cluster name: lowercase letters, digits and '-')"
        )
    if not Path(path).exists():
        raise argparse.ArgumentTypeError(f"{path!r} does not exist")
    return name, Path(path)


_CLUSTER_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _clusters(args: argparse.Namespace) -> tuple[ClusterSource, ...]:
    """--cluster NAME=PATH (paths of one name together), or one cluster per --context given
    more than once."""
    given: list[tuple[str, Path]] = getattr(args, "cluster", None) or []
    if given:
        by_name: dict[str, list[Path]] = {}
        for name, path in given:
            by_name.setdefault(name, []).append(path)
        return tuple(ClusterSource(name, tuple(paths)) for name, paths in by_name.items())
    contexts: list[str] = getattr(args, "context", None) or []
    if len(contexts) > 1:
        return tuple(ClusterSource(context, kube_context=context) for context in contexts)
    return ()


def _single_context(args: argparse.Namespace) -> str | None:
    contexts: list[str] = getattr(args, "context", None) or []
    return contexts[0] if len(contexts) == 1 else None


def _optional_path(text: str | None) -> Path | None:
    return None if text is None else Path(text)


def _add_translation_options(parser: argparse.ArgumentParser, kubernetes: bool = False) -> None:
    sources = parser.add_mutually_exclusive_group(required=True)
    # serve (the command with a Kubernetes source) watches its manifests: not standard input.
    stdin = not kubernetes
    sources.add_argument(
        "--manifests",
        action="append",
        type=_manifest_path(stdin),
        metavar="PATH",
        help="a manifest file or directory (Service, EndpointSlice, Endpoints); "
        + ("'-' reads standard input; " if stdin else "")
        + "repeatable",
    )
    sources.add_argument(
        "--cluster",
        action="append",
        type=_cluster_manifests,
        metavar="NAME=PATH",
        help="the manifest file or directory of one of several clusters, joined by namespace "
        "sameness (each endpoint in its cluster's locality); repeatable, also per cluster",
    )
    if kubernetes:
        sources.add_argument(
            "--kubernetes",
            action="store_true",
            help="watch the Kubernetes API (config: --kubeconfig, else $KUBECONFIG, else "
            "in-cluster in a pod, else ~/.kube/config)",
        )
        parser.add_argument("--kubeconfig", metavar="PATH", help="kubeconfig file")
        parser.add_argument(
            "--context",
            action="append",
            metavar="NAME",
            help="kubeconfig context; repeated, one cluster per context, joined as --cluster",
        )
        parser.add_argument(
            "--cluster-stale-limit",
            type=float,
            default=Settings.cluster_stale_limit_s,
            metavar="SECONDS",
            help="with several clusters, how long a failing cluster's last endpoints stay "
            "served (default 3600; 0: for ever)",
        )
        parser.add_argument(
            "--namespace",
            action="append",
            metavar="NS",
            help="watch only this namespace; repeatable (default: all)",
        )
    parser.add_argument(
        "--listener-port-offset",
        type=int,
        default=Settings.listener_port_offset,
        metavar="N",
        help=f"Envoy listens on service port + N (default {Settings.listener_port_offset})",
    )
    parser.add_argument(
        "--listener-address",
        default=Settings.listener_address,
        help=f"address Envoy's listeners bind (default {Settings.listener_address})",
    )
    parser.add_argument(
        "--lb-policy",
        default=Settings.lb_policy,
        choices=LB_POLICIES,
        help=f"default load balancing policy (default {Settings.lb_policy})",
    )
    parser.add_argument(
        "--cluster-domain",
        default=Settings.cluster_domain,
        help="cluster DNS domain used in virtual host names",
    )
    parser.add_argument(
        "--tracing-cluster",
        metavar="NAME",
        help="trace requests in Envoy, sending spans to this bootstrap cluster "
        "(otel_collector with xds bootstrap --otel-collector)",
    )
    parser.add_argument(
        "--protocol-detection-timeout",
        type=_positive_seconds,
        default=Settings.protocol_detection_timeout_s,
        metavar="SECONDS",
        help="on ports with no declared protocol, how long Envoy waits for a client's first bytes "
        "before proxying the connection as TCP (default 5)",
    )
    parser.add_argument(
        "--allow-cluster-patch",
        action="append",
        metavar="NAMESPACE",
        help="let Services of this namespace use the xds.dev/cluster-patch annotation ('*': every "
        "namespace); repeatable (default: none)",
    )
    parser.add_argument(
        "--scope",
        choices=SCOPES,
        default=Settings.scope,
        help="what a client sees: 'mesh', every Service (default); 'namespace', the Services of "
        "its node's namespace and those exported to it (annotation xds.dev/export-to)",
    )
    parser.add_argument(
        "--mesh-wide-namespace",
        action="append",
        metavar="NAMESPACE",
        help="with --scope namespace, clients of this namespace (node proxies) still see every "
        "Service; repeatable",
    )
    parser.add_argument(
        "--locality-aware",
        action="store_true",
        help="keep every Service's traffic close: each client gets the endpoints of its zone "
        "first, then of its region, then the rest (without it, only Services that ask: "
        "spec.trafficDistribution, EndpointSlice hints, annotation xds.dev/locality-aware)",
    )
    parser.add_argument(
        "--allow-endpoints",
        action="append",
        type=_cidr,
        metavar="CIDR",
        help="serve endpoints in this range although it is loopback, link-local or unspecified "
        "(refused by default: from the proxy they reach its own node); repeatable",
    )


def _cidr(text: str) -> str:
    """An argparse type: a CIDR range (Settings checks it again; here it is a usage error)."""
    try:
        return str(parse_cidr(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:  # also NaN
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="xds", description="An Envoy xDS control plane.")
    parser.add_argument("--version", action="version", version=f"xds {_version()}")
    _add_global_options(parser, with_defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve xDS from manifests or the Kubernetes API")
    _add_translation_options(serve, kubernetes=True)
    serve.add_argument(
        "--xds-host",
        default=Settings.xds_host,
        help=f"xDS listen address (default {Settings.xds_host})",
    )
    serve.add_argument(
        "--xds-port",
        type=int,
        default=Settings.xds_port,
        help=f"xDS gRPC port (default {Settings.xds_port})",
    )
    serve.add_argument(
        "--admin-port",
        type=int,
        default=None,
        help="admin HTTP port for /healthz, /readyz, /debug/* (off by default)",
    )
    serve.add_argument(
        "--admin-host",
        default=Settings.admin_host,
        help="admin listen address (default 127.0.0.1: /debug/* shows every resource and client)",
    )
    serve.add_argument(
        "--debounce-quiet",
        type=float,
        default=Settings.debounce_quiet_s,
        metavar="SECONDS",
        help="a change after this long without one is rebuilt at once; changes that follow are "
        f"rebuilt together once this long passes without another (default "
        f"{Settings.debounce_quiet_s})",
    )
    serve.add_argument(
        "--debounce-max",
        type=float,
        default=Settings.debounce_max_s,
        metavar="SECONDS",
        help=f"but never later than this after the first (default {Settings.debounce_max_s})",
    )
    serve.add_argument(
        "--kube-watch-timeout",
        type=int,
        default=Settings.kube_watch_timeout_s,
        metavar="SECONDS",
        help="the API server ends each watch after this long and it is resumed (default "
        f"{Settings.kube_watch_timeout_s})",
    )
    serve.add_argument(
        "--kube-read-timeout",
        type=float,
        default=Settings.kube_read_timeout_s,
        metavar="SECONDS",
        help="a watch silent for longer (no event, no bookmark) is taken for dead and replaced "
        f"(default {Settings.kube_read_timeout_s:g})",
    )
    serve.add_argument(
        "--admin-token-file",
        metavar="PATH",
        help="a file holding a token that /debug/* then requires as 'Authorization: Bearer TOKEN'",
    )
    serve.add_argument(
        "--health-port",
        type=int,
        default=None,
        help="HTTP port for /healthz, /readyz and /metrics only, for probes and scraping (off by "
        "default)",
    )
    serve.add_argument(
        "--health-host",
        default=Settings.health_host,
        help=f"health listen address (default {Settings.health_host})",
    )
    serve.add_argument(
        "--tls-cert",
        metavar="PATH",
        help="serve xDS over TLS with this PEM certificate chain (re-read when it changes; "
        "default: plaintext)",
    )
    serve.add_argument("--tls-key", metavar="PATH", help="the PEM private key of --tls-cert")
    serve.add_argument(
        "--tls-client-ca",
        metavar="PATH",
        help="require client certificates from this PEM CA (mTLS) whose identity matches the "
        "client's node id",
    )
    serve.add_argument(
        "--trust-domain",
        metavar="DOMAIN",
        help="with mTLS: SPIFFE identities must be in this trust domain (default: any)",
    )
    serve.add_argument(
        "--max-receive-bytes",
        type=_positive_int,
        metavar="N",
        help="largest xDS request accepted (default 4 MiB; a SotW ACK repeats every name)",
    )
    serve.add_argument(
        "--max-connection-age",
        type=_positive_seconds,
        metavar="SECONDS",
        help="close xDS connections after this long, +-10%% jitter, so proxies spread over "
        "replicas after a rollout (default 1800)",
    )
    serve.add_argument(
        "--max-streams-per-peer",
        type=_positive_int,
        metavar="N",
        help="xDS streams open at once from one client address (default: no limit; proxies "
        "behind one NAT share an address)",
    )

    boot = commands.add_parser(
        "bootstrap",
        help="print an Envoy bootstrap for this control plane (with --grpc: a proxyless gRPC "
        "client's GRPC_XDS_BOOTSTRAP file)",
    )
    boot.add_argument(
        "--grpc",
        action="store_true",
        help="the bootstrap of a proxyless gRPC client (grpcio, grpc-java, grpc-go, grpc-js-xds) "
        "instead of Envoy's",
    )
    boot.add_argument("--node-id", required=True)
    # Envoy-only options default to None: given with --grpc, they are refused, not ignored.
    boot.add_argument(
        "--node-cluster",
        "--cluster",
        help="the node's cluster (default xds-proxies for Envoy, none for --grpc)",
    )
    boot.add_argument("--xds-address", required=True, metavar="HOST:PORT")
    boot.add_argument(
        "--admin-port", type=int, help="Envoy admin port (loopback; default 9901; not --grpc)"
    )
    boot.add_argument(
        "--otel-collector",
        metavar="HOST:PORT",
        help="an OTLP/gRPC collector for request traces: defines the cluster otel_collector "
        "(not --grpc)",
    )
    boot.add_argument(
        "--tls-dir",
        metavar="DIR",
        help="mTLS to the control plane, with certificates through file-based SDS: the directory "
        "Envoy watches, holding the SDS files (see --write-sds) and by default ca.crt, tls.crt "
        "and tls.key (default: plaintext; with --grpc: the PEM files only, no SDS files)",
    )
    boot.add_argument(
        "--tls-ca",
        metavar="PATH",
        help="the control plane's CA (default DIR/ca.crt; with --grpc and no --tls-dir: TLS "
        "with this CA, mTLS with --tls-cert and --tls-key too)",
    )
    boot.add_argument(
        "--tls-cert",
        metavar="PATH",
        help="Envoy's (or the gRPC client's) certificate (default DIR/tls.crt)",
    )
    boot.add_argument("--tls-key", metavar="PATH", help="its private key (default DIR/tls.key)")
    boot.add_argument(
        "--write-sds",
        action="store_true",
        help="also write the SDS files naming those paths into --tls-dir (not --grpc)",
    )
    boot.add_argument(
        "--mode",
        choices=("ads", "xds", "delta-ads", "delta"),
        help="ads: one state-of-the-world stream (default); xds: one stream per type; "
        "delta-ads and delta: the same with incremental xDS (not --grpc: gRPC uses ADS)",
    )
    boot.add_argument(
        "--region", help="the node's locality region (locality-aware endpoints prefer it)"
    )
    boot.add_argument(
        "--zone", help="the node's locality zone (locality-aware endpoints prefer it)"
    )
    boot.add_argument("--sub-zone", help="the node's locality sub-zone")
    boot.add_argument(
        "--cluster-id",
        help="the Kubernetes cluster the client runs in, as node metadata CLUSTER_ID: with "
        "several clusters, its own cluster's endpoints come first",
    )
    boot.add_argument(
        "--namespace",
        help="the client's namespace, as node metadata NAMESPACE, which xds serve --scope "
        "namespace reads",
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
        action="append",
        metavar="HOST:PORT",
        help="a control plane replica's admin address (xds serve --admin-port); repeat it for "
        "every replica, shown together (default 127.0.0.1:9902)",
    )
    status.add_argument(
        "-o",
        "--output",
        choices=("table", "wide", "json"),
        default="table",
        help="table (default); wide: with each proxy's peer and the full NACK messages; json: "
        "every replica's /debug/syncz records",
    )
    status.add_argument(
        "--token-file",
        metavar="PATH",
        help="the token of xds serve --admin-token-file, when the admin server requires one",
    )
    status.add_argument(
        "--kubernetes-service",
        metavar="NAMESPACE/NAME",
        help="ask every ready replica behind this Service (its EndpointSlices, by the port named "
        "--admin-port-name), from a pod or with a kubeconfig (--kubeconfig, --context)",
    )
    status.add_argument(
        "--admin-port-name",
        default="http-admin",
        help="the Service port of the replicas' admin servers (default http-admin)",
    )
    status.add_argument("--kubeconfig", metavar="PATH", help="kubeconfig file")
    status.add_argument("--context", metavar="NAME", help="kubeconfig context")

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
    demo.add_argument(
        "--zones",
        action="store_true",
        help="locality-aware routing instead: four backends in zone-a and zone-b, an Envoy in"
        " zone-a, and phases in which zone-a fails and recovers (exit 1 when a request fails"
        " outside the failing phase)",
    )
    demo.add_argument(
        "--phase-seconds",
        type=float,
        metavar="S",
        help="with --zones: how long the healthy and the failing phase last (default 5)",
    )
    for command in commands.choices.values():
        _add_global_options(command, with_defaults=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # 2 after a usage error, 0 after --help or --version
        return int(exc.code or 0)
    configure_logging(args.log_level, args.log_format)
    try:
        if args.command == "serve":
            return _serve(_settings(args))
        if args.command == "bootstrap":
            return _bootstrap(args)
        if args.command == "translate":
            return _translate(_settings(args))
        if args.command == "status":
            return _status(_admins(args), args.output, _read_token(args.token_file))
        if args.command == "demo":
            from xds.demo import run_demo

            return run_demo(
                requests=args.requests,
                rate=args.rate,
                zones=args.zones,
                phase_seconds=args.phase_seconds,
            )
    except ConfigError as exc:  # what the command line points at cannot be used
        print(f"xds: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_status
    except ValueError as exc:  # a setting that cannot work: a usage error
        print(f"xds: {one_line(str(exc))}", file=sys.stderr)
        return USAGE
    except OSError as exc:  # a port in use, an unreadable path: say it, without a traceback
        print(f"xds: {one_line(str(exc))}", file=sys.stderr)
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


# The bootstrap options of one kind of client only, each with its argparse destination.
_ENVOY_ONLY = {
    "--admin-port": "admin_port",
    "--mode": "mode",
    "--otel-collector": "otel_collector",
    "--write-sds": "write_sds",
}


def _given(args: argparse.Namespace, options: dict[str, str]) -> list[str]:
    # None (or False, for a flag) is what argparse leaves for an option not given.
    return [option for option, dest in options.items() if getattr(args, dest) not in (None, False)]


def _bootstrap(args: argparse.Namespace) -> int:
    if args.grpc:
        return _grpc_bootstrap(args)

    from xds.bootstrap import bootstrap_text, write_sds_files

    tls = _tls_dir(args)
    if tls is None and (args.tls_ca or args.tls_cert or args.tls_key or args.write_sds):
        raise ValueError("--tls-ca, --tls-cert, --tls-key and --write-sds need --tls-dir")
    text = bootstrap_text(
        node_id=args.node_id,
        node_cluster="xds-proxies" if args.node_cluster is None else args.node_cluster,
        xds_address=args.xds_address,
        admin_port=9901 if args.admin_port is None else args.admin_port,
        mode=args.mode or "ads",
        otel_collector=args.otel_collector,
        tls=tls,
        region=args.region,
        zone=args.zone,
        sub_zone=args.sub_zone,
        namespace=args.namespace,
        cluster_id=args.cluster_id,
    )
    if tls is not None and args.write_sds:
        for path in write_sds_files(tls):
            log.info("wrote %s", path)
    print(text, end="")
    return 0


def _tls_dir(args: argparse.Namespace) -> BootstrapTLS | None:
    """The TLS files of --tls-dir (each replaced by --tls-ca, --tls-cert, --tls-key if given)."""
    from xds.bootstrap import BootstrapTLS

    if args.tls_dir is None:
        return None
    return BootstrapTLS(
        Path(args.tls_dir),
        ca=_optional_path(args.tls_ca),
        cert=_optional_path(args.tls_cert),
        key=_optional_path(args.tls_key),
    )


def _grpc_bootstrap(args: argparse.Namespace) -> int:
    """The GRPC_XDS_BOOTSTRAP JSON of a proxyless gRPC client. TLS: with --tls-dir, mTLS with the
    files Envoy's bootstrap would name; without, --tls-ca alone is TLS, with --tls-cert and
    --tls-key mTLS (a client needs no SDS directory)."""
    if given := _given(args, _ENVOY_ONLY):
        raise ValueError(f"{', '.join(given)}: for Envoy's bootstrap only, not with --grpc")

    from xds.bootstrap import GrpcTLS, grpc_bootstrap

    tls: GrpcTLS | BootstrapTLS | None = _tls_dir(args)
    if tls is None and args.tls_ca is not None:
        tls = GrpcTLS(
            Path(args.tls_ca), cert=_optional_path(args.tls_cert), key=_optional_path(args.tls_key)
        )
    elif tls is None and (args.tls_cert or args.tls_key):
        raise ValueError("--tls-cert and --tls-key need --tls-ca or --tls-dir")
    config = grpc_bootstrap(
        args.node_id,
        args.xds_address,
        node_cluster=args.node_cluster,
        region=args.region,
        zone=args.zone,
        sub_zone=args.sub_zone,
        namespace=args.namespace,
        cluster_id=args.cluster_id,
        tls=tls,
    )
    print(json.dumps(config, indent=2))
    return 0


def _read_token(path: str | None) -> str | None:
    """The token in a file (surrounding whitespace dropped): a file, so it stays out of `ps`."""
    if path is None:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise SystemExit(f"xds: cannot read the token file {path}: {exc.strerror or exc}") from exc
    if not token:
        raise SystemExit(f"xds: the token file {path} is empty")
    return token


def _admins(args: argparse.Namespace) -> list[str]:
    """The replicas `xds status` asks: --admin, and those behind --kubernetes-service."""
    admins: list[str] = list(args.admin or [])
    if args.kubernetes_service:
        from xds.sources.kube import KubeSettings, service_addresses

        namespace, slash, name = args.kubernetes_service.partition("/")
        if not slash or not namespace or not name:
            raise ValueError(
                f"--kubernetes-service {args.kubernetes_service!r} is not NAMESPACE/NAME"
            )
        found = service_addresses(
            KubeSettings(kubeconfig=args.kubeconfig, context=args.context),
            namespace,
            name,
            args.admin_port_name,
        )
        if not found:
            raise OSError(
                f"no ready endpoint of Service {namespace}/{name} has a port named "
                f"{args.admin_port_name!r} (its replicas' admin servers must listen on the pod "
                "address: xds serve --admin-host 0.0.0.0 --admin-token-file ...)"
            )
        admins.extend(found)
    return admins or ["127.0.0.1:9902"]


def _status(admins: list[str], output: str, token: str | None = None) -> int:
    """Reads /debug/syncz of every replica given; exit 1 when one cannot be read (the others are
    still shown), with a one-line hint when none can."""
    import urllib.request

    from xds.status import render, render_json, unreachable_hint

    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    replicas: dict[str, Any] = {}
    failed = False
    for admin in dict.fromkeys(admins):
        url = f"http://{admin}/debug/syncz"
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, headers=headers), timeout=5
            ) as response:
                replicas[admin] = json.load(response)
        except OSError as exc:
            print(f"xds: cannot read {url}: {exc}", file=sys.stderr)
            failed = True
    if not replicas:
        print(unreachable_hint(dict.fromkeys(admins)), file=sys.stderr)
        return 1
    print(render_json(replicas) if output == "json" else render(replicas, wide=output == "wide"))
    return 1 if failed else 0


def _translate(settings: Settings) -> int:
    from xds.resources import to_json
    from xds.sources.files import ManifestSource
    from xds.translate import translate

    source: ManifestSource | ClusterSet
    if settings.clusters:
        from xds.sources.clusters import ClusterSet

        members = []
        for cluster in settings.clusters:
            files = ManifestSource(list(cluster.manifests))
            files.reload()
            members.append((cluster.name, files, files.watch))
        source = ClusterSet(members)
    else:
        source = ManifestSource(list(settings.manifests))
        source.reload()  # logs each of the source's problems, once, at its level
    translation = translate(source.mesh(), settings)
    for problem in translation.problems:
        log.log(problem.level, "%s", problem)
    print(json.dumps(to_json(translation.resources), indent=2))
    problems = [*source.problems(), *translation.problems]
    return 1 if any(p.severity == "error" for p in problems) else 0


if __name__ == "__main__":
    sys.exit(main())
