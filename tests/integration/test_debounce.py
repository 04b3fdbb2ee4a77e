"""Source events are coalesced: a burst gives one rebuild, an endless stream still gets rebuilds."""

from __future__ import annotations

import asyncio
from pathlib import Path

from xds.app import ControlPlane
from xds.config import Settings
from xds.local import wait_for


async def started(tmp_path: Path, quiet: float, longest: float) -> ControlPlane:
    settings = Settings(
        manifests=(tmp_path,), xds_port=0, debounce_quiet_s=quiet, debounce_max_s=longest
    )
    plane = ControlPlane(settings)
    await plane.start()
    return plane


async def test_a_burst_of_events_gives_one_rebuild(tmp_path: Path):
    plane = await started(tmp_path, quiet=0.2, longest=5.0)
    try:
        before = plane.rebuilds
        for _ in range(100):  # 100 events, each well inside the quiet period of the last
            plane.source_changed()
            await asyncio.sleep(0.001)
        await wait_for(lambda: plane.rebuilds > before, 5, what="the rebuild after the burst")
        # One quiet period more without events: still exactly one rebuild for the whole burst.
        await asyncio.sleep(0.3)
        assert plane.rebuilds == before + 1
    finally:
        await plane.stop()


async def test_events_that_never_stop_still_rebuild_within_the_maximum_delay(tmp_path: Path):
    plane = await started(tmp_path, quiet=0.05, longest=0.2)
    try:
        before = plane.rebuilds
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.0
        while loop.time() < end:  # an event every 10 ms: the quiet period never comes
            plane.source_changed()
            await asyncio.sleep(0.01)
        rebuilt = plane.rebuilds - before
        assert 2 <= rebuilt <= 8, rebuilt  # bounded by the maximum delay, and still coalesced
    finally:
        await plane.stop()
