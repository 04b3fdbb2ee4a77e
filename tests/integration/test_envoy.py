"""The control plane with a real Envoy, real backends and real requests, all on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

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
        web_hosts = (
            "web",
            f"web:{port}",
            "web.default.svc.cluster.local",
            f"web.default.svc.cluster.local:{port}",
            "10.96.0.10",
            f"10.96.0.10:{port}",
        )
        for host in web_hosts:
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
        expected = {f"{b.host}:{b.port}" for b in started}

        async def eds_complete() -> bool:
            return (await mesh.envoy.endpoints()).get("default/web:http") == expected

        # Envoy's own view first (admin /clusters): all three endpoints, healthy, before counting.
        await wait_for(eds_complete, 15, what="Envoy's cluster default/web:http with 3 endpoints")
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


Answer = tuple[float, float, str | None]  # (sent, answered, backend) of one request


async def timeline(
    mesh: Mesh, done: Callable[[list[Answer]], bool], timeout: float = 10.0, limit: int = 20_000
) -> list[Answer]:
    """Requests one at a time through Envoy, each with its times, until `done` holds; bounded in
    time and count. One at a time, so the order of answers is the order of Envoy's choices."""
    answers: list[Answer] = []
    deadline = time.perf_counter() + timeout
    while not done(answers):
        if time.perf_counter() > deadline or len(answers) >= limit:
            tail = [name for _, _, name in answers[-20:]]
            raise TimeoutError(f"not done after {len(answers)} requests; last answers: {tail}")
        sent = time.perf_counter()
        name = await request_backend(mesh.session, mesh.url, "web.default")
        answers.append((sent, time.perf_counter(), name))
    return answers


async def test_endpoint_removal_and_addition_follow_the_manifest(mesh: Mesh):
    clean_run = 50  # consecutive requests without the removed backend that count as "gone"
    async with backends(["b1", "b2", "b3"]) as started:
        path = mesh.manifests / "mesh.yaml"
        port = started[0].port
        b3 = started[2]

        def publish(hosts: list[str]) -> float:
            write_manifests(
                path, service("web", mesh.service_port), endpoint_slice("web", hosts, port)
            )
            return time.perf_counter()

        publish(["127.0.0.1", "127.0.0.2", "127.0.0.3"])
        await routed_to(mesh, "web.default", {"b1", "b2", "b3"})

        written = publish(["127.0.0.1", "127.0.0.2"])

        def b3_gone(answers: list[Answer]) -> bool:
            recent = [name for _, _, name in answers[-clean_run:]]
            return len(recent) == clean_run and "b3" not in recent

        removal = await timeline(mesh, b3_gone)
        names = [name for _, _, name in removal]
        # Envoy drops a removed host between requests: no request may fail for it.
        assert None not in names, names
        to_b3 = [answered for _, answered, name in removal if name == "b3"]
        last_to_removed = (
            f"{(to_b3[-1] - written) * 1000:.0f} ms after the write" if to_b3 else "none after"
        )
        gone_from = removal[-clean_run][0] - written  # the clean run's first request was sent
        # The backend's own count agrees: nothing reaches it any more, by any connection.
        seen_by_b3 = b3.requests
        tail = await timeline(mesh, lambda got: len(got) >= clean_run)
        assert b3.requests == seen_by_b3
        assert {name for _, _, name in tail} == {"b1", "b2"}

        written = publish(["127.0.0.1", "127.0.0.2", "127.0.0.3"])
        addition = await timeline(mesh, lambda got: bool(got) and got[-1][2] == "b3")
        assert None not in [name for _, _, name in addition]
        added = addition[-1][1] - written
        assert b3.requests > seen_by_b3
    print(
        f"endpoint removal: last request to it {last_to_removed}, "
        f"{clean_run} in a row without it from {gone_from * 1000:.0f} ms "
        f"({len(to_b3)} of {len(removal)} requests after the write reached it); "
        f"endpoint addition: first request served by it {added * 1000:.0f} ms after the write"
    )


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
            return all(word in text for word in ("broken.yaml", "portless", "unlabelled", "ghost"))

        await wait_for(all_reported, 10, what="every bad object reported")
        problems = await mesh.problems()
        by_object = {p["object"]: p for p in problems}
        assert by_object["Service default/portless"]["field"] == "spec.ports"
        assert "bad.yaml" in by_object["Service default/portless"]["location"]
        assert (
            "kubernetes.io/service-name" in by_object["EndpointSlice default/unlabelled"]["field"]
        )
        assert any("broken.yaml" in p["location"] for p in problems)
        # Other kinds are skipped, as kubectl users expect of a mixed file: not a problem.
        assert not any("ConfigMap" in p["object"] for p in problems)

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
