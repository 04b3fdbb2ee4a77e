"""Snapshot build benchmark: a Service's change from the manifest on disk to the streams, by stage.

For N Services x 10 endpoints (`--services`, default 1,000, 10,000 and 50,000) in two layouts
(`--layout`: `files`, one manifest file per Service; `file`, every Service in one file), each
(N, layout) in a fresh process so that its peak RSS is its own, it prints:

- full build: the manifest source's first load (`ManifestSource.reload()` + `mesh()`), the
  translation (`Translator.translate`) and the publish (`Cache.publish`), and their total;
- one Service changed: a change gives one endpoint of one Service a new address; its file (the
  whole file, in the `file` layout) is written before the clock starts, as the watcher would see
  it. Then each stage is timed and so is their sum, median and p90 over up to `--changes` changes:
  source (`reload([the changed file])` + `mesh()`: the source may apply what it recorded lazily,
  when asked for the mesh), translate (incremental: the same translator throughout), publish (with
  the translation's change set when `Cache.publish` takes `changes=`, as the server does), and the
  stream work: one SotW and one delta stream state machine (bench/stream_state.py's, no gRPC),
  subscribed to everything, reacting to the publish: responses encoded, ACKs taken;
- the process's peak RSS.

Every (N, layout) is bounded: its changes stop at `--changes` or once `--budget` seconds of them
have passed, and the whole run at `--timeout`; a process cut short reports what it finished.
Nothing touches the network.

    python bench/snapshot_build.py                                  # both layouts, 1k/10k/50k
    python bench/snapshot_build.py --services 10000 --layout files --changes 50
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, cast

from xds.cache import Cache
from xds.config import Settings
from xds.server.delta import DeltaStream
from xds.server.sotw import SotwStream
from xds.sources.files import ManifestSource
from xds.translate import Translation, Translator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    MAX_CHANGES,
    Clock,
    Deadline,
    Workload,
    bounded,
    changed_service,
    listed,
    machine,
    marker_address,
    quantile,
    service_file,
    write_atomically,
)
from stream_state import Client, connect, subscribed  # noqa: E402

ENDPOINTS_PER_SERVICE = 10
DEFAULT_SERVICES = [1_000, 10_000, 50_000]
LAYOUTS = ("files", "file")
MAX_SERVICES = 50_000  # endpoint addresses are unique up to 51,200 Services
# Full builds are repeated (for a steadier median) only while they take less than this share of
# the budget: one at 50,000 Services.
FULL_SHARE = 0.25
FULL_REPEATS = 3
STAGES = ("source", "translate", "publish", "sotw", "delta")
# Whether this tree's Cache.publish takes the translation's change set (it derives the snapshot
# from the previous one, at the cost of what changed); read once, so the figures say which ran.
PUBLISH_TAKES_CHANGES = "changes" in inspect.signature(Cache.publish).parameters


# --- one (N, layout), in a child process ----------------------------------------------------


class Layout:
    """Where the Services live on disk, and the write of one Service's change."""

    def __init__(self, kind: str, workload: Workload, directory: Path) -> None:
        self.kind, self.workload, self.directory = kind, workload, directory
        self.chunks = [workload.manifest(i) for i in range(workload.services)]

    def write_all(self) -> None:
        if self.kind == "file":
            (self.directory / "services.yaml").write_text("---\n".join(self.chunks))
        else:
            for index, text in enumerate(self.chunks):
                service_file(self.directory, index).write_text(text)

    def change(self, index: int) -> Path:
        """Writes Service `index` as the workload has it now; returns the path written."""
        self.chunks[index] = self.workload.manifest(index)
        if self.kind == "file":
            path = self.directory / "services.yaml"
            write_atomically(path, "---\n".join(self.chunks))
        else:
            path = service_file(self.directory, index)
            write_atomically(path, self.chunks[index])
        return path


def publish(cache: Cache, translation: Translation, follows: bool) -> bool:
    """As the server publishes: with the change set when it is relative to what was offered."""
    if PUBLISH_TAKES_CHANGES and follows:
        # Called through Any so that this file also runs on a tree whose publish lacks it.
        call = cast(Callable[..., bool], cache.publish)
        return call(translation.resources, changes=translation.resource_changes)
    return cache.publish(translation.resources)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


@dataclass
class Built:
    source: ManifestSource
    translator: Translator
    translation: Translation
    cache: Cache


def full_build(directory: Path) -> Built:
    """Everything from the files on disk, as the server starts; prints the stages' times."""
    t0 = time.perf_counter()
    source = ManifestSource([directory])
    source.reload()
    mesh = source.mesh()
    t1 = time.perf_counter()
    # The workload's endpoints are on loopback, refused unless allowed.
    translator = Translator(Settings(allowed_endpoint_ranges=("127.0.0.0/8",)))
    translation = translator.translate(mesh)
    t2 = time.perf_counter()
    cache = Cache()
    publish(cache, translation, follows=False)
    t3 = time.perf_counter()
    emit(
        kind="full", source=t1 - t0, translate=t2 - t1, publish=t3 - t2, rss=peak_rss_mib(),
        resources=sum(len(items) for items in cache.snapshot.resources.values()),
        snapshot_bytes=cache.snapshot.size,
    )  # fmt: skip
    return Built(source, translator, translation, cache)


def child(services: int, kind: str, changes: int, budget: float) -> None:
    """Prints one JSON line per full build and per change, as each ends."""
    workload = Workload(services, ENDPOINTS_PER_SERVICE)
    with tempfile.TemporaryDirectory(prefix="xds-snapshot-build-") as tmp:
        directory = Path(tmp)
        layout = Layout(kind, workload, directory)
        layout.write_all()
        started = time.monotonic()
        built: Built | None = None
        for _ in range(FULL_REPEATS):
            # What an earlier build held is gone before the next one: the peak is one build's.
            built = None
            gc.collect()
            built = full_build(directory)
            if time.monotonic() - started > budget * FULL_SHARE:
                break
        assert built is not None
        source, translator, translation, cache = (
            built.source, built.translator, built.translation, built.cache
        )  # fmt: skip

        wanted = subscribed(cache.snapshot)
        clients = [Client(SotwStream(), 0), Client(DeltaStream(), 1)]
        for client in clients:
            connect(client, cache, wanted)
        serial, offered = cache.published, translation.serial
        started = time.monotonic()
        for change in range(1, changes + 1):
            if time.monotonic() - started > budget:
                break
            index = changed_service(change, services)
            workload.first[index] = marker_address(change)
            path = layout.change(index)
            for client in clients:
                client.sent_bytes = 0
            gc.collect()  # the write's garbage is not the change's
            times = [time.perf_counter()]
            source.reload([path])
            mesh = source.mesh()
            times.append(time.perf_counter())
            translation = translator.translate(mesh)
            times.append(time.perf_counter())
            published = publish(cache, translation, follows=translation.base == offered)
            offered = translation.serial
            times.append(time.perf_counter())
            delta = cache.changes_since(serial)
            serial = cache.published
            for client in clients:
                client.react(cache, delta, wanted)
                times.append(time.perf_counter())
            emit(
                kind="change", published=published, translated=translation.translated,
                resources=sum(map(len, translation.resource_changes.values())),
                sent=[c.sent_bytes for c in clients], rss=peak_rss_mib(),
                **{stage: b - a for stage, (a, b) in zip(STAGES, pairwise(times), strict=True)},
            )  # fmt: skip


# --- the parent: one child per (N, layout), the tables -------------------------------------


@dataclass
class Run:
    services: int
    layout: str
    full: list[dict[str, Any]] = field(default_factory=list)
    changes: list[dict[str, Any]] = field(default_factory=list)
    rss: float | None = None
    note: str = ""


def run_child(args: argparse.Namespace, services: int, layout: str, clock: Clock) -> Run:
    run = Run(services, layout)
    command = [
        sys.executable, __file__, "--child", "--services", str(services), "--layout", layout,
        "--changes", str(args.changes), "--budget", str(args.budget),
    ]  # fmt: skip
    stdout: str | bytes | None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=clock.left())
        stdout = done.stdout
        if done.returncode:
            tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
            run.note = f"failed: {tail[0]}"
            print(done.stderr, file=sys.stderr)
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout  # what it printed before it was stopped
        run.note = "cut short by --timeout"
    if isinstance(stdout, bytes):
        stdout = stdout.decode(errors="replace")
    for line in (stdout or "").splitlines():
        record = json.loads(line)
        (run.full if record.pop("kind") == "full" else run.changes).append(record)
        run.rss = record["rss"]
    return run


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    value = seconds * 1000
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:,.0f}"


def spread(samples: list[float]) -> str:
    """median / p90, in ms."""
    if not samples:
        return "-"
    ordered = sorted(samples)
    return f"{fmt_ms(statistics.median(ordered))} / {fmt_ms(quantile(ordered, 0.9))}"


def table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for row in (header, *rows):
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))


def report(runs: list[Run]) -> None:
    print("\nFull build (source load + translate + publish), ms, median of the builds made:")
    rows = []
    for run in runs:

        def median(stage: str, r: Run = run) -> float | None:
            values = [b[stage] for b in r.full]
            return statistics.median(values) if values else None

        totals = [sum(b[s] for s in STAGES[:3]) for b in run.full]
        last = run.full[-1] if run.full else {}
        rows.append([
            f"{run.services:,}", run.layout, f"{last.get('resources', 0):,}",
            f"{last.get('snapshot_bytes', 0) / 2**20:.1f}", str(len(run.full)),
            fmt_ms(median("source")), fmt_ms(median("translate")), fmt_ms(median("publish")),
            fmt_ms(statistics.median(totals) if totals else None),
            "-" if run.rss is None else f"{run.rss:,.0f}",
        ])  # fmt: skip
    table(
        ["Services", "layout", "resources", "snapshot MiB", "builds", "source", "translate",
         "publish", "total", "peak RSS MiB"],
        rows,
    )  # fmt: skip

    print("\nOne Service's endpoint changed, ms, median / p90 (sum of the stages per change):")
    rows = []
    for run in runs:
        per_stage = [spread([c[s] for c in run.changes]) for s in STAGES]
        totals = [sum(c[s] for s in STAGES) for c in run.changes]
        changed = sorted({c["resources"] for c in run.changes})
        sent = [
            statistics.median(c["sent"][i] for c in run.changes) if run.changes else None
            for i in range(2)
        ]
        rows.append([
            f"{run.services:,}", run.layout, str(len(run.changes)), *per_stage, spread(totals),
            ",".join(map(str, changed)) or "-",
            " / ".join("-" if s is None else f"{s:,.0f}" for s in sent),
        ])  # fmt: skip
    table(
        ["Services", "layout", "changes", "source", "translate", "publish", "SotW stream",
         "delta stream", "total", "resources changed", "bytes sent SotW / delta"],
        rows,
    )  # fmt: skip
    print(
        "total: source + translate + publish + both streams, per change; resources changed: the "
        "translation's change set; bytes: what each stream sent for the change"
    )
    for run in runs:
        if run.note:
            print(f"{run.services:,} {run.layout}: {run.note}")


def tree() -> str:
    """The commit measured, and whether xds/ differed from it (others may be editing it)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "xds"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "tree: unknown (no git)"
    return f"tree: {commit}{' + uncommitted changes in xds/' if dirty else ''}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--services", type=listed(bounded(1, MAX_SERVICES)), action="extend",
        help="N, comma-separated or repeated (default 1000,10000,50000)",
    )  # fmt: skip
    parser.add_argument(
        "--layout", choices=LAYOUTS, action="append",
        help="files: one file per Service; file: all in one (default both)",
    )  # fmt: skip
    parser.add_argument("--changes", type=bounded(1, MAX_CHANGES), default=20)
    parser.add_argument(
        "--budget", type=float, default=60.0,
        help="seconds of changes per (N, layout) before it stops early (default 60)",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=570.0, help="the whole run, s")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.budget, args.timeout) <= 0:
        parser.error("--budget and --timeout must be positive")
    sizes: list[int] = args.services or DEFAULT_SERVICES
    layouts: list[str] = args.layout or list(LAYOUTS)
    if args.child:
        child(sizes[0], layouts[0], args.changes, args.budget)
        return 0

    publish_kind = "with the change set" if PUBLISH_TAKES_CHANGES else "whole (no changes=)"
    print(
        f"snapshot build: {', '.join(f'{n:,}' for n in sizes)} Services x "
        f"{ENDPOINTS_PER_SERVICE} endpoints; up to {args.changes} changes or {args.budget:g} s "
        f"each; publish {publish_kind}"
    )
    print(f"machine: {machine()}; {tree()}", flush=True)
    clock = Clock(args.timeout)
    runs: list[Run] = []
    try:
        for services in sizes:
            for layout in layouts:
                started = time.monotonic()
                runs.append(run_child(args, services, layout, clock))
                print(
                    f"  {services:,} {layout}: {time.monotonic() - started:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
    except Deadline as exc:
        print(f"stopped: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    report(runs)
    return 0 if runs and not any(run.note for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
