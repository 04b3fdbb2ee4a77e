"""Snapshot build benchmark: N Services x 10 endpoints -> a translated, versioned snapshot.

Prints, for each N, the time of a full build, of an incremental build after one Service's endpoints
change, and the memory the snapshot holds. Each N runs in a fresh process so that peak RSS belongs
to that N alone.

    python bench/snapshot_build.py                 # N = 1,000 and 10,000
    python bench/snapshot_build.py --services 500  # one size
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc

from xds.cache import Snapshot
from xds.config import Settings
from xds.model import (
    Endpoint,
    EndpointGroup,
    EndpointPort,
    Mesh,
    Service,
    ServiceEntry,
    ServicePort,
)
from xds.translate import Translator

ENDPOINTS_PER_SERVICE = 10


def make_entry(index: int, generation: int = 0) -> ServiceEntry:
    namespace = f"ns{index % 50}"
    service = Service(
        namespace,
        f"svc{index}",
        (ServicePort(80, "http", "http"),),
        cluster_ip=f"10.{96 + index // 65536}.{index // 256 % 256}.{index % 256}",
    )
    endpoints = tuple(
        Endpoint(f"10.{index // 65536 + 1}.{index // 256 % 256}.{e + generation}", zone=f"z{e % 3}")
        for e in range(ENDPOINTS_PER_SERVICE)
    )
    group = EndpointGroup(
        f"EndpointSlice {namespace}/svc{index}-x", (EndpointPort(8080, "http"),), endpoints
    )
    return ServiceEntry(service, (group,))


def run_one(services: int, repeats: int) -> dict[str, float]:
    entries = {i: make_entry(i) for i in range(services)}
    mesh = Mesh({e.service.key: e for e in entries.values()})
    settings = Settings()

    full = []
    for _ in range(repeats):
        gc.collect()
        started = time.perf_counter()
        translation = Translator(settings).translate(mesh)
        snapshot = Snapshot.build(translation.resources)
        full.append(time.perf_counter() - started)

    translator = Translator(settings)
    translator.translate(mesh)
    incremental = []
    for generation in range(1, repeats + 1):
        entries[7] = make_entry(7, generation)
        changed = Mesh({e.service.key: e for e in entries.values()})
        started = time.perf_counter()
        translation = translator.translate(changed)
        Snapshot.build(translation.resources)
        incremental.append(time.perf_counter() - started)
        assert translation.translated == 1

    gc.collect()
    tracemalloc.start()
    held = Snapshot.build(Translator(settings).translate(mesh).resources)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "services": services,
        "resources": sum(len(items) for items in snapshot.resources.values()),
        "snapshot_bytes": held.size,
        "full_build_s_median": statistics.median(full),
        "incremental_build_s_median": statistics.median(incremental),
        "snapshot_python_mib": current / 2**20,
        "build_peak_python_mib": peak / 2**20,
        "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, action="append")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = args.services or [1_000, 10_000]
    if args.child:
        print(json.dumps(run_one(sizes[0], args.repeats)))
        return
    print(
        f"{'services':>9} {'resources':>9} {'full build':>11} {'1 changed':>10} "
        f"{'snapshot':>10} {'held MiB':>9} {'peak MiB':>9} {'RSS MiB':>8}"
    )
    for size in sizes:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                "--services",
                str(size),
                "--repeats",
                str(args.repeats),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        row = json.loads(out.stdout)
        print(
            f"{row['services']:>9,} {row['resources']:>9,} "
            f"{row['full_build_s_median'] * 1000:>9.0f}ms "
            f"{row['incremental_build_s_median'] * 1000:>8.1f}ms "
            f"{row['snapshot_bytes'] / 2**20:>7.1f}MiB "
            f"{row['snapshot_python_mib']:>9.1f} {row['build_peak_python_mib']:>9.1f} "
            f"{row['process_peak_rss_mib']:>8.0f}"
        )


if __name__ == "__main__":
    main()
