"""Fixtures for the real-process tests: manifests in a temp dir, the control plane, an Envoy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.factories import endpoint_slice, service, write_manifests
from xds.app import ControlPlane
from xds.config import Settings
from xds.local import Envoy, free_port

# Every test backend runs on loopback, which the control plane refuses as an endpoint unless
# allowed (from a real proxy it would reach the proxy's own node).
LOOPBACK = ("127.0.0.0/8",)
# Built and written in tests/factories.py; imported from here by the integration tests.
__all__ = ["LOOPBACK", "Mesh", "endpoint_slice", "service", "write_manifests"]


@dataclass
class Mesh:
    """A running control plane, its manifests directory and an Envoy connected to it."""

    plane: ControlPlane
    manifests: Path
    envoy: Envoy
    listener_port: int  # where Envoy listens for the service port `service_port`
    service_port: int
    admin_url: str
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener_port}/"

    async def syncz(self) -> list[dict[str, Any]]:
        async with self.session.get(f"{self.admin_url}/debug/syncz") as response:
            return await response.json()

    async def problems(self) -> list[dict[str, str]]:
        async with self.session.get(f"{self.admin_url}/debug/problems") as response:
            return await response.json()


@pytest.fixture
def service_port() -> int:
    return 8080


@pytest.fixture
async def mesh(tmp_path: Path, service_port: int) -> AsyncIterator[Mesh]:
    """The control plane on a manifests dir (empty at first) and an Envoy in ADS mode."""
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    listener_port = free_port()
    settings = Settings(
        manifests=(manifests,),
        xds_port=0,
        admin_port=0,
        listener_address="127.0.0.1",
        listener_port_offset=listener_port - service_port,
        # Tests provoke NACKs with patches Envoy rejects, in namespace default.
        cluster_patch_namespaces=("default",),
        allowed_endpoint_ranges=LOOPBACK,
    )
    plane = ControlPlane(settings)
    ports = await plane.start()
    envoy = Envoy(f"127.0.0.1:{ports.xds}", workdir=tmp_path)
    session = aiohttp.ClientSession()
    try:
        await envoy.start()
        yield Mesh(
            plane,
            manifests,
            envoy,
            listener_port,
            service_port,
            f"http://127.0.0.1:{ports.admin}",
            session,
        )
    finally:
        await session.close()
        await envoy.stop()
        await plane.stop()
