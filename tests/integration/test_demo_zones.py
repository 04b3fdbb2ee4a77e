"""`xds demo --zones` as a user runs it: the control plane on envoy/demo-zones, four backends
(zone-a: 127.0.0.1-2, zone-b: 127.0.0.3-4), an Envoy in zone-a, and three phases (all healthy,
zone-a answering 503, zone-a healthy again), read back from what the demo prints."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest

from xds.local import wait_for

PHASE_SECONDS = "1"
RATE = "400"
# Phases 1 and 2 take at most PHASE_SECONDS x RATE requests each (the demo paces to the rate), so
# this many leaves phase 3 at least as many.
REQUESTS = "1200"
# Outlier detection of locality-aware clusters: a host is ejected after this many 5xx in a row.
CONSECUTIVE_5XX = 3
# Each zone-a host fails CONSECUTIVE_5XX requests before it is ejected. The ejection is decided on
# Envoy's main thread and reaches its worker as a host-set update: one request per host sent right
# after the ejecting answer could still be routed to it (none was in these runs).
MAX_FAILED = 2 * CONSECUTIVE_5XX + 2
STOPPED = "stopped: traffic, Envoy, backends, control plane"

HEADER = re.compile(r"^\[phase (\d)/3: [^\]]+\] ([\d,]+) requests in ")
ROW = re.compile(r"^ {2,4}(zone-a|zone-b|a1|a2|b1|b2|failed) +([\d,]+) +[\d.]+%")
LAST = re.compile(r"^  last (\d+): zone-a (\d+)%, zone-b (\d+)%, failed (\d+)%$")


@dataclass
class Block:
    """One block the demo prints: a phase's requests, answers by zone and backend, the latest."""

    requests: int
    rows: dict[str, int]
    last: tuple[int, dict[str, int]]  # how many latest answers, and their shares in %


def final_blocks(stdout: str) -> dict[int, Block]:
    """The last block printed for each phase: its totals when the next phase began."""
    blocks: dict[int, Block] = {}
    phase = 0
    for line in stdout.splitlines():
        if header := HEADER.match(line):
            phase = int(header[1])
            blocks[phase] = Block(int(header[2].replace(",", "")), {}, (0, {}))
        elif row := ROW.match(line):
            blocks[phase].rows[row[1]] = int(row[2].replace(",", ""))
        elif last := LAST.match(line):
            shares = {"zone-a": int(last[2]), "zone-b": int(last[3]), "failed": int(last[4])}
            blocks[phase].last = (int(last[1]), shares)
    return blocks


def test_demo_zones_keeps_traffic_in_zone_a_and_fails_over_to_zone_b():
    result = subprocess.run(
        [sys.executable, "-m", "xds", "demo", "--zones", "--requests", REQUESTS, "--rate", RATE,
         "--phase-seconds", PHASE_SECONDS],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    output = result.stdout + result.stderr
    # Exit 0: no request failed outside the failing phase.
    assert result.returncode == 0, output
    assert STOPPED in result.stdout
    blocks = final_blocks(result.stdout)
    assert sorted(blocks) == [1, 2, 3], output
    assert sum(block.requests for block in blocks.values()) == int(REQUESTS), output

    healthy, failing, recovered = blocks[1], blocks[2], blocks[3]
    # All healthy: zone-a is priority 0 and takes it all (>= 99 %), over both of its backends.
    assert healthy.requests >= 100, output
    assert healthy.rows["zone-a"] >= 0.99 * healthy.requests, output
    assert healthy.rows["a1"] > 0 and healthy.rows["a2"] > 0, output
    assert healthy.rows["failed"] == 0, output

    # zone-a answering 503: a few requests fail until both hosts are ejected, then the latest
    # 100 answers all come from zone-b.
    assert 1 <= failing.rows["failed"] <= MAX_FAILED, output
    assert failing.rows["zone-a"] == 0, output  # zone-a answered nothing but 503
    assert failing.last == (100, {"zone-a": 0, "zone-b": 100, "failed": 0}), output
    assert "3 consecutive 5xx" in result.stdout

    # zone-a healthy again: its hosts stay ejected for the 30 s ejection time, longer than this
    # run, so the traffic stays in zone-b and nothing fails.
    assert recovered.rows["failed"] == 0, output
    assert recovered.rows["zone-b"] == recovered.requests, output
    assert "back at about" in result.stdout


async def test_demo_zones_stops_everything_on_ctrl_c_after_the_failover():
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xds", "demo", "--zones", "--rate", RATE,
        "--phase-seconds", PHASE_SECONDS,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    lines: list[str] = []

    async def collect() -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            lines.append(line.decode())

    collector = asyncio.create_task(collect())
    try:
        # The phase lines are flushed as they begin; Ctrl-C (SIGINT) once zone-a is back to 200.
        await wait_for(
            lambda: process.returncode is not None or any(x.startswith("phase 3/3") for x in lines),
            timeout=30,
            what="phase 3",
        )
        assert process.returncode is None, "".join(lines)
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.wait(), 20)
        await asyncio.wait_for(collector, 5)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    output = "".join(lines)
    assert process.returncode == 0, output
    assert output.rstrip().endswith(STOPPED), output
    assert final_blocks(output)[2].rows["failed"] <= MAX_FAILED, output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--phase-seconds", "1"], "--phase-seconds goes with --zones"),
        (["--zones", "--phase-seconds", "0"], "--phase-seconds must be above 0"),
        (["--zones", "--rate", "0"], "--rate must be above 0"),
    ],
)
def test_demo_zones_options_that_cannot_work_are_usage_errors(args: list[str], message: str):
    result = subprocess.run(
        [sys.executable, "-m", "xds", "demo", *args], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "control plane" not in result.stdout  # refused before anything started
