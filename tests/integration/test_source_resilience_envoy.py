"""A manifests directory that goes away (a ConfigMap remount, a symlink swap, a rename) takes no
configuration with it: a real Envoy keeps serving every request while it is gone, and changes
apply again once it is back."""

from __future__ import annotations

import asyncio

from tests.integration.conftest import Mesh, endpoint_slice, service, write_manifests
from xds.local import backends, request_backend, wait_for

REQUESTS_PER_PHASE = 100
MAX_REQUESTS = 5_000


async def test_a_manifests_directory_removed_and_restored_loses_no_request(mesh: Mesh) -> None:
    async with backends(["web-1", "web-2"]) as pods:
        first, second = pods
        path = mesh.manifests / "mesh.yaml"
        write_manifests(
            path, service("web", mesh.service_port), endpoint_slice("web", [first.host], first.port)
        )

        async def served_by(name: str) -> bool:
            return await request_backend(mesh.session, mesh.url, "web.default") == name

        await wait_for(lambda: served_by("web-1"), 15, what="web served by web-1")

        answers: list[str | None] = []
        done = asyncio.Event()

        async def traffic() -> None:
            # Bounded in count; the phases below end it well before.
            while not done.is_set() and len(answers) < MAX_REQUESTS:
                answers.append(await request_backend(mesh.session, mesh.url, "web.default"))

        async def problem_mentions(text: str) -> bool:
            return any(text in problem["message"] for problem in await mesh.problems())

        async def loss_no_longer_reported() -> bool:
            return not await problem_mentions("does not exist")

        async def more_requests(than: int) -> bool:
            return len(answers) >= than + REQUESTS_PER_PHASE

        sender = asyncio.create_task(traffic())
        try:
            away = mesh.manifests.with_name("manifests-away")
            mesh.manifests.rename(away)
            await wait_for(lambda: problem_mentions("does not exist"), 15, what="the loss seen")
            seen = len(answers)
            await wait_for(lambda: more_requests(seen), 30, what="requests while it is gone")
            away.rename(mesh.manifests)
            await wait_for(loss_no_longer_reported, 15, what="the return seen")
            seen = len(answers)
            await wait_for(lambda: more_requests(seen), 30, what="requests after it is back")
        finally:
            done.set()
            await sender
        assert len(answers) >= 2 * REQUESTS_PER_PHASE
        assert set(answers) == {"web-1"}, f"{answers.count(None)} of {len(answers)} failed"

        # Back in service: a change applies again.
        write_manifests(
            path,
            service("web", mesh.service_port),
            endpoint_slice("web", [second.host], second.port),
        )
        await wait_for(lambda: served_by("web-2"), 15, what="web served by web-2 after the return")
