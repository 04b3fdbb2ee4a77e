"""The control plane with a real Envoy, real backends and real requests, all on loopback."""

from __future__ import annotations

import asyncio
import json
import time

from scipy.stats import chisquare

from tests.integration.conftest import Mesh, endpoint_slice, service, write_manifests
from xds.local import backends, request_backend, spread, wait_for


async def routed_to(mesh: Mesh, host: str, expected: set[str], timeout: float = 15.0) -> None:
    async def settled() -> bool:
        answers = await spread(mesh.session, mesh.url, host, 12, concurrency=3)
        return set(answers) == expected

    await wait_for(settled, timeout, interval=0.05, what=f"{host} served by {sorted(expected)}")


async def test_two_services_on_one_port_are_routed_by_host(mesh: Mesh):
    async with backends(["web-1"]) as web, backends(["api-1"]) as api:
        write_manifests(
            mesh.manifests / "mesh.yaml",
            service("web", mesh.service_port, cluster_ip="10.96.0.10"),
            endpoint_slice("web", ["127.0.0.1"], web[0].port),
            service("api", mesh.service_port, namespace="prod", cluster_ip="10.96.0.11"),
            endpoint_slice("api", ["127.0.0.1"], api[0].port, namespace="prod"),
        )
        await routed_to(mesh, "web.default", {"web-1"})
        port = mesh.service_port
        for host in ("web", f"web:{port}", "web.default.svc.cluster.local", f"10.96.0.10:{port}"):
            assert await request_backend(mesh.session, mesh.url, host) == "web-1", host
        for host in ("api.prod", f"api.prod.svc:{port}", "10.96.0.11"):
            assert await request_backend(mesh.session, mesh.url, host) == "api-1", host
        assert await request_backend(mesh.session, mesh.url, "nobody.default") is None


async def test_random_balancing_is_uniform_and_not_round_robin(mesh: Mesh):
    async with backends(["b1", "b2", "b3"]) as started:
        write_manifests(
            mesh.manifests / "mesh.yaml",
            service("web", mesh.service_port),
            endpoint_slice("web", [b.host for b in started], started[0].port),
        )
        await routed_to(mesh, "web.default", {"b1", "b2", "b3"})
        # One request at a time over one keep-alive connection: the order is Envoy's choices.
        order = await spread(mesh.session, mesh.url, "web.default", 3_000, concurrency=1)
    counts = [order.count(name) for name in ("b1", "b2", "b3")]
    repeats = sum(a == b for a, b in zip(order, order[1:], strict=False)) / (len(order) - 1)
    p_value = chisquare(counts).pvalue
    print(f"spread {counts}, chi-square p = {p_value:.3f}, back-to-back repeats {repeats:.3f}")
    assert None not in order
    assert all(counts), counts
    assert p_value > 0.001, counts
    assert 0.27 < repeats < 0.40, repeats  # random: ~1/3; round-robin: 0


async def test_endpoint_removal_and_addition_follow_the_manifest(mesh: Mesh):
    async with backends(["b1", "b2", "b3"]) as started:
        path = mesh.manifests / "mesh.yaml"
        port = started[0].port

        def publish(hosts: list[str]) -> float:
            write_manifests(
                path, service("web", mesh.service_port), endpoint_slice("web", hosts, port)
            )
            return time.perf_counter()

        publish(["127.0.0.1", "127.0.0.2", "127.0.0.3"])
        await routed_to(mesh, "web.default", {"b1", "b2", "b3"})

        written = publish(["127.0.0.1", "127.0.0.2"])
        removed_at = None

        async def b3_gone() -> bool:
            nonlocal removed_at
            before = started[2].requests
            answers = await spread(mesh.session, mesh.url, "web.default", 30, concurrency=1)
            if started[2].requests == before and set(answers) == {"b1", "b2"}:
                removed_at = removed_at or time.perf_counter()
                return True
            removed_at = None
            return False

        await wait_for(b3_gone, 10, interval=0.01, what="no traffic to the removed endpoint")
        assert removed_at is not None
        removal_s = removed_at - written

        written = publish(["127.0.0.1", "127.0.0.2", "127.0.0.3"])

        async def b3_back() -> bool:
            await spread(mesh.session, mesh.url, "web.default", 6, concurrency=1)
            return started[2].requests > 0

        started[2].requests = 0
        await wait_for(b3_back, 10, interval=0.005, what="traffic to the added endpoint")
        addition_s = time.perf_counter() - written
    print(f"endpoint removed in {removal_s * 1000:.0f} ms, added in {addition_s * 1000:.0f} ms")


async def test_rejected_config_is_nacked_recorded_not_resent_and_old_config_serves(mesh: Mesh):
    async with backends(["b1"]) as web, backends(["o1"]) as other:
        path = mesh.manifests / "mesh.yaml"
        bad_patch = json.dumps({"outlierDetection": {"maxEjectionPercent": 200}})

        def publish(patch: str | None, other_hosts: list[str]) -> None:
            annotations = {"xds.dev/cluster-patch": patch} if patch else None
            write_manifests(
                path,
                service("web", mesh.service_port, annotations=annotations),
                endpoint_slice("web", ["127.0.0.1"], web[0].port),
                service("other", mesh.service_port),
                endpoint_slice("other", other_hosts, other[0].port),
            )

        publish(None, ["127.0.0.1"])
        await routed_to(mesh, "web.default", {"b1"})
        await routed_to(mesh, "other.default", {"o1"})

        async def cds() -> dict:
            [client] = await mesh.syncz()
            return client["types"]["CDS"]

        publish(bad_patch, ["127.0.0.1"])
        await wait_for(lambda: _has_nack(cds), 10, what="a CDS NACK in /debug/syncz")
        state = await cds()
        assert "max_ejection_percent" in state["last_nack"]["message"].lower() or (
            "MaxEjectionPercent" in state["last_nack"]["message"]
        )
        rejected = state["last_nack"]["version"]
        assert state["acked_version"] != rejected and state["nacks"] == 1
        assert list(state["rejected_resources"]) == ["default/web:http"]

        # Unrelated changes keep flowing and are ACKed; the rejected version is never sent again.
        for hosts in (["127.0.0.1", "127.0.0.2"], ["127.0.0.2"], ["127.0.0.1"]):
            eds_acks = (await mesh.syncz())[0]["types"]["EDS"]["acks"]
            publish(bad_patch, hosts)

            async def eds_acked(before: int = eds_acks) -> bool:
                return (await mesh.syncz())[0]["types"]["EDS"]["acks"] > before

            await wait_for(eds_acked, 10, what="the unrelated EDS change ACKed")
            state = await cds()
            assert state["nacks"] == 1 and state["sent_version"] != rejected
            assert list(state["rejected_resources"]) == ["default/web:http"]
            assert await request_backend(mesh.session, mesh.url, "web.default") == "b1"

        publish(None, ["127.0.0.1"])

        async def recovered() -> bool:
            state = await cds()
            return state["last_nack"] is None and state["acked_version"] == state["sent_version"]

        await wait_for(recovered, 10, what="the fixed CDS version ACKed")
        assert (await cds())["nacks"] == 1
        assert await request_backend(mesh.session, mesh.url, "web.default") == "b1"


async def _has_nack(cds) -> bool:
    state = await cds()
    return state["last_nack"] is not None


async def test_bad_manifests_are_reported_and_the_rest_is_served(mesh: Mesh):
    async with backends(["good-1"]) as good:
        port = good[0].port
        write_manifests(
            mesh.manifests / "good.yaml",
            service("good", mesh.service_port),
            endpoint_slice("good", ["127.0.0.1"], port),
        )
        (mesh.manifests / "broken.yaml").write_text("kind: Service\nmetadata: [unclosed\n")
        write_manifests(
            mesh.manifests / "bad.yaml",
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "portless"}, "spec": {}},
            {**endpoint_slice("x", ["127.0.0.1"], port), "metadata": {"name": "unlabelled"}},
            {
                "apiVersion": "v1",
                "kind": "Endpoints",
                "metadata": {"name": "ghost"},
                "subsets": [{"addresses": [{"ip": "127.0.0.1"}], "ports": [{"port": port}]}],
            },
        )
        await routed_to(mesh, "good.default", {"good-1"})

        async def all_reported() -> bool:
            text = json.dumps(await mesh.problems())
            return all(
                word in text
                for word in ("broken.yaml", "ConfigMap", "portless", "unlabelled", "ghost")
            )

        await wait_for(all_reported, 10, what="every bad object reported")
        problems = await mesh.problems()
        by_object = {p["object"]: p for p in problems}
        assert by_object["Service default/portless"]["field"] == "spec.ports"
        assert "bad.yaml" in by_object["Service default/portless"]["location"]
        assert (
            "kubernetes.io/service-name" in by_object["EndpointSlice default/unlabelled"]["field"]
        )
        assert any("broken.yaml" in p["location"] for p in problems)

        # A good file that stops parsing keeps its last good content in service.
        (mesh.manifests / "good.yaml").write_text("kind: [broken\n")

        async def good_broken_reported() -> bool:
            return any(
                "good.yaml" in p["location"] and p["severity"] == "error"
                for p in await mesh.problems()
            )

        await wait_for(good_broken_reported, 10, what="the broken good.yaml reported")
        for _ in range(5):
            assert await request_backend(mesh.session, mesh.url, "good.default") == "good-1"
            await asyncio.sleep(0)
