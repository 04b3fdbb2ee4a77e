"""Source events are coalesced: a burst gives one rebuild, an endless stream still gets rebuilds."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.integration.conftest import LOOPBACK
from xds.app import ControlPlane
from xds.config import Settings
from xds.local import wait_for


async def started(tmp_path: Path, quiet: float, longest: float) -> ControlPlane:
    settings = Settings(
        manifests=(tmp_path,),
        xds_port=0,
        debounce_quiet_s=quiet,
        debounce_max_s=longest,
        allowed_endpoint_ranges=LOOPBACK,
    )
    plane = ControlPlane(settings)
    await plane.start()
    return plane


async def test_an_isolated_event_is_rebuilt_at_once(tmp_path: Path):
    # A quiet period far longer than the deadline below: only the leading edge can meet it.
    plane = await started(tmp_path, quiet=30.0, longest=60.0)
    try:
        before = plane.rebuilds
        plane.source_changed()
        await wait_for(lambda: plane.rebuilds > before, 5, what="the isolated event's rebuild")
    finally:
        await plane.stop()


async def test_a_burst_of_events_gives_the_leading_rebuild_and_one_more(tmp_path: Path):
    plane = await started(tmp_path, quiet=0.2, longest=5.0)
    try:
        before = plane.rebuilds
        for _ in range(100):  # 100 events, each well inside the quiet period of the last
            plane.source_changed()
            await asyncio.sleep(0.001)
        await wait_for(lambda: plane.rebuilds >= before + 2, 5, what="the rebuilds of the burst")
        # One quiet period more without events: the first event at once, the other 99 as one.
        await asyncio.sleep(0.3)
        assert plane.rebuilds == before + 2
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
