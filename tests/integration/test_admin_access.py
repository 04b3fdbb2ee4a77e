"""Who can read what the control plane serves: the admin server on loopback, a bearer token for
/debug/*, and a health server that shows health, readiness and metrics and nothing else."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.integration.conftest import endpoint_slice, service, write_manifests
from xds.app import ControlPlane, Ports
from xds.cli import build_parser
from xds.config import Settings

TOKEN = "s3cret-token"
DEBUG_PATHS = ("/debug/syncz", "/debug/config_dump", "/debug/problems")


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[Ports]:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    write_manifests(
        manifests / "mesh.yaml", service("web", 80), endpoint_slice("web", ["127.0.0.2"], 8080)
    )
    settings = Settings(
        manifests=(manifests,),
        xds_port=0,
        admin_port=0,
        admin_token=TOKEN,
        health_port=0,
        allowed_endpoint_ranges=("127.0.0.0/8",),
    )
    control_plane = ControlPlane(settings)
    ports = await control_plane.start()
    try:
        yield ports
    finally:
        await control_plane.stop()


async def get(url: str, token: str | None = None) -> tuple[int, str, str | None]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, await response.text(), response.headers.get("WWW-Authenticate")


def test_admin_and_health_servers_bind_loopback_unless_told_otherwise() -> None:
    settings = Settings()
    assert settings.admin_host == "127.0.0.1" and settings.health_host == "127.0.0.1"
    args = build_parser().parse_args(["serve", "--manifests", ".", "--admin-port", "9902"])
    assert args.admin_host == "127.0.0.1" and args.health_host == "127.0.0.1"
    assert TOKEN not in repr(Settings(admin_token=TOKEN))  # never in a log of the settings


async def test_debug_views_require_the_token_and_probes_do_not(plane: Ports) -> None:
    admin = f"http://127.0.0.1:{plane.admin}"
    for path in DEBUG_PATHS:
        status, _, challenge = await get(admin + path)
        assert (status, challenge) == (401, "Bearer"), path
        status, _, _ = await get(admin + path, token="wrong")
        assert status == 401, path
        status, body, _ = await get(admin + path, token=TOKEN)
        assert status == 200, (path, body)
    status, body, _ = await get(admin + "/debug/config_dump?type=cds", token=TOKEN)
    assert status == 200 and "default/web:http" in body
    # Probes and scraping need no token.
    assert (await get(admin + "/healthz"))[0] == 200
    assert (await get(admin + "/readyz"))[0] == 200


async def test_the_health_server_shows_health_readiness_and_metrics_only(plane: Ports) -> None:
    assert plane.health is not None and plane.health != plane.admin
    health = f"http://127.0.0.1:{plane.health}"
    assert (await get(health + "/healthz"))[:2] == (200, "ok\n")
    status, body, _ = await get(health + "/readyz")
    assert status == 200 and body.startswith("ready")
    status, body, _ = await get(health + "/metrics")
    assert status == 200 and "xds_" in body
    for path in DEBUG_PATHS:
        # Not there at all, token or not: nothing of what is served is on this port.
        assert (await get(health + path, token=TOKEN))[0] == 404, path


async def test_status_passes_the_token_from_a_file(plane: Ports, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    admin = f"127.0.0.1:{plane.admin}"
    command = [sys.executable, "-m", "xds", "status", "--admin", admin]
    # The control plane runs on this test's event loop: the CLI must run beside it, not block it.
    with_token = await asyncio.to_thread(
        subprocess.run,
        [*command, "--token-file", str(token_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert with_token.returncode == 0, with_token.stderr
    without = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60
    )
    assert without.returncode == 1 and "401" in without.stderr
