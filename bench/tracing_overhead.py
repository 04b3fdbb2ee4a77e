"""Tracing overhead on the hot path: what a push span costs per response, with tracing off (no SDK
installed: the OpenTelemetry API's no-op) and on (SDK recording, spans dropped by a no-op exporter),
next to the cost of building the response itself.

    python bench/tracing_overhead.py [--pushes 200000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from xds.cache import Snapshot
from xds.resources import CLUSTER, Resource
from xds.server.sotw import Response
from xds.server.tracing import PushTraces

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bounded, machine  # noqa: E402


def per_push_ns(pushes: int, traced: bool) -> float:
    resources = tuple(Resource.from_bytes(CLUSTER, f"c{i}", b"x" * 200) for i in range(20))
    snapshot = Snapshot.build({CLUSTER: {r.name: r for r in resources}})
    response = Response(CLUSTER, snapshot.version(CLUSTER), "1", resources)
    traces = PushTraces()
    started = time.perf_counter_ns()
    for _ in range(pushes):
        data = response.encode()
        if traced:
            traces.pushed(response, len(data), snapshot.trace_context, "node", "peer")
            traces.replied(CLUSTER, None)
    return (time.perf_counter_ns() - started) / pushes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pushes", type=bounded(10, 10_000_000), default=200_000)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    baseline = min(per_push_ns(args.pushes, traced=False) for _ in range(3))
    off = min(per_push_ns(args.pushes, traced=True) for _ in range(3))
    print(f"encode a 20-cluster response:          {baseline:8.0f} ns")
    print(f"  + push span, tracing off (no SDK):   {off - baseline:8.0f} ns per push")

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Drop()))
    trace.set_tracer_provider(provider)
    on = min(per_push_ns(args.pushes // 10, traced=True) for _ in range(3))
    # (PushTraces checks for an SDK when a stream opens: these are created after the install.)
    print(f"  + push span, tracing on (recording): {on - baseline:8.0f} ns per push")


if __name__ == "__main__":
    main()
