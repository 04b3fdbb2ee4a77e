"""Traces with a real OTLP/gRPC receiver: the control plane's trace of a change, from the manifest
edit to a real Envoy's ACK, and Envoy's own request spans with W3C context passed to backends."""

from __future__ import annotations

import asyncio
import os
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from tests.integration.conftest import endpoint_slice, service, write_manifests
from xds.local import Envoy, backends, free_port, request_backend, wait_for

SERVICE_PORT = 8080
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class Receiver:
    """An OTLP trace receiver: the collector's TraceService/Export, keeping every span."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.port = 0
        self._server: grpc.aio.Server | None = None

    async def _export(self, request: Any, _: grpc.aio.ServicerContext) -> Any:
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        {
                            "service": resource.get("service.name"),
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "attributes": {a.key: _value(a.value) for a in span.attributes},
                        }
                    )
        return trace_service_pb2.ExportTraceServiceResponse()

    async def start(self) -> Receiver:
        handler = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {
                "Export": grpc.unary_unary_rpc_method_handler(
                    self._export,
                    request_deserializer=trace_service_pb2.ExportTraceServiceRequest.FromString,
                    response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString,
                )
            },
        )
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers([handler])
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)

    def traces(self, service_name: str) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for span in self.spans:
            if span["service"] == service_name:
                out[span["trace_id"]].append(span)
        return out


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    started = await Receiver().start()
    try:
        yield started
    finally:
        await started.stop()


def fast_flush(config: dict[str, Any]) -> None:
    """Envoy sends request spans every 100 ms instead of every 5 s."""
    config["layered_runtime"]["layers"][0]["static_layer"] = {
        "tracing.opentelemetry.flush_interval_ms": 100,
        "tracing.opentelemetry.min_flush_spans": 1,
    }


async def test_a_manifest_change_is_one_trace_ending_in_envoys_ack_and_requests_are_traced(
    tmp_path: Path, receiver: Receiver
):
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    path = manifests / "mesh.yaml"
    xds_port, admin_port, listener_port = free_port(), free_port(), free_port()
    async with backends(["b1", "b2"]) as pods:

        def publish(*hosts: str) -> None:
            write_manifests(
                path,
                service("web", SERVICE_PORT),
                endpoint_slice("web", list(hosts), pods[0].port),
            )

        publish(pods[0].host)
        plane = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "xds", "serve", "--manifests", str(manifests),
            "--xds-port", str(xds_port), "--admin-port", str(admin_port),
            "--listener-address", "127.0.0.1",
            "--listener-port-offset", str(listener_port - SERVICE_PORT),
            "--tracing-cluster", "otel_collector", "--allow-endpoints", "127.0.0.0/8",
            env={
                **os.environ,
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "OTEL_BSP_SCHEDULE_DELAY": "50",
            },
        )  # fmt: skip
        envoy = Envoy(
            f"127.0.0.1:{xds_port}",
            node_id="trace-proxy",
            workdir=tmp_path,
            customize=fast_flush,
            otel_collector=f"127.0.0.1:{receiver.port}",
        )
        url = f"http://127.0.0.1:{listener_port}/"
        try:
            async with aiohttp.ClientSession() as session:

                async def admin_up() -> bool:
                    try:
                        async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as r:
                            return r.status == 200
                    except aiohttp.ClientError:
                        return False

                await wait_for(admin_up, 30, what="control plane ready")
                await envoy.start()

                async def served_by(name: str) -> bool:
                    return await request_backend(session, url, "web.default") == name

                await wait_for(lambda: served_by("b1"), 15, what="first route")

                # The change: one trace from the source event to Envoy's ACK.
                publish(pods[1].host)
                await wait_for(lambda: served_by("b2"), 15, what="the new endpoint")

                def change_trace() -> list[dict[str, Any]] | None:
                    for spans in receiver.traces("xds-control-plane").values():
                        names = {s["name"] for s in spans}
                        acked = [
                            s
                            for s in spans
                            if s["name"] == "push EDS"
                            and s["attributes"].get("xds.outcome") == "ACK"
                        ]
                        if "source change" in names and acked:
                            return spans
                    return None

                await wait_for(lambda: change_trace() is not None, 15, what="the change's trace")
                spans = change_trace()
                assert spans is not None
                by_name = {s["name"]: s for s in spans}
                root = by_name["source change"]
                assert root["parent"] == ""
                for name in ("translate", "publish"):
                    assert by_name[name]["parent"] == root["span_id"], name
                assert by_name["translate"]["attributes"]["xds.services"] == ["default/web"]
                assert by_name["translate"]["attributes"]["xds.namespaces"] == ["default"]
                push = by_name["push EDS"]
                assert push["parent"] == by_name["publish"]["span_id"]
                attributes = push["attributes"]
                assert attributes["xds.node_id"] == "trace-proxy"
                assert attributes["xds.type"] == "EDS"
                assert attributes["xds.resource_count"] == 1 and attributes["xds.bytes"] > 0
                assert attributes["xds.version"] and attributes["xds.nonce"]
                assert by_name["publish"]["attributes"]["xds.bytes"] > 0

                # Envoy's request spans: W3C context from the client goes through to the backend.
                parent = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
                async with session.get(
                    url, headers={"Host": "web.default", "traceparent": parent}
                ) as response:
                    assert response.status == 200
                seen = pods[1].headers[-1]
                assert seen.get("traceparent", "").split("-")[1] == TRACE_ID

                def envoy_span() -> bool:
                    return TRACE_ID in receiver.traces("envoy")

                await wait_for(envoy_span, 15, what="Envoy's request span")
        finally:
            await envoy.stop()
            plane.terminate()
            await plane.wait()
