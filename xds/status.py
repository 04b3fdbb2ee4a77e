"""`xds status`: every connected proxy at a glance, like `istioctl proxy-status`.

One row per proxy (node id, what it runs, the replica it is connected to) and one column per
resource type, each saying whether the proxy holds what it was sent: SYNCED, STALE (it has not
acknowledged the latest version yet, a response on its way), NACKED (it rejected something: the
rejected resources are named) or `-` (it does not ask for the type). `-o wide` adds the peer and
the full NACK messages; `-o json` gives every replica's /debug/syncz records as they are, each
with its replica. Several `--admin` addresses (one per replica) are read and shown together.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only the shape: `xds status` need not load the server and its protobufs
    from xds.server.stream import StreamStatus, TypeStatus

# The types in the order a proxy takes them (ADS), by their short names; others after, sorted.
TYPE_ORDER = ("CDS", "EDS", "LDS", "RDS")
# How much of the rejected names a narrow table shows.
MAX_REJECTED_CHARS = 40


def state_of(entry: TypeStatus) -> str:
    """SYNCED, STALE or NACKED (with the names it rejects) for one type of one proxy."""
    rejected = entry.get("rejected_resources") or {}
    if rejected:
        return "NACKED " + ",".join(sorted(rejected))
    if entry.get("last_nack"):
        return "NACKED"
    if entry.get("awaiting_ack") or entry.get("acked_version") != entry.get("sent_version"):
        return "STALE"
    return "SYNCED"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def render(replicas: Mapping[str, list[StreamStatus]], wide: bool = False) -> str:
    """The table of every proxy of every replica (replica address -> its /debug/syncz)."""
    streams = [(replica, s) for replica, found in replicas.items() for s in found]
    if not streams:
        return "no proxies connected"
    seen = {t for _, s in streams for t in s.get("types", {})}
    types = [t for t in TYPE_ORDER if t in seen] + sorted(seen - set(TYPE_ORDER))
    header = ["NODE", "CLIENT", "REPLICA", *(["PEER"] if wide else []), *types]
    rows = [header]
    nacks: list[str] = []
    for replica, stream in sorted(streams, key=lambda rs: (rs[1].get("node_id", ""), rs[0])):
        node = stream.get("node_id") or "-"
        row = [node, stream.get("client") or "-", replica]
        if wide:
            row.append(stream.get("peer") or "-")
        for type_name in types:
            entry = stream.get("types", {}).get(type_name)
            if entry is None:
                row.append("-")
                continue
            state = state_of(entry)
            row.append(state if wide else _cut(state, MAX_REJECTED_CHARS))
            nack = entry.get("last_nack")
            if wide and nack:
                message = " ".join(str(nack.get("message", "")).split())
                nacks.append(f"{node} {type_name} version {nack.get('version', '')}: {message}")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    table = "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
    if nacks:
        table += "\n\nLAST NACKS\n" + "\n".join(nacks)
    return table


def render_json(replicas: Mapping[str, list[StreamStatus]]) -> str:
    out: list[dict[str, Any]] = []
    for replica, streams in replicas.items():
        out.extend({"replica": replica, **stream} for stream in streams)
    return json.dumps(out, indent=2)


def unreachable_hint(addresses: Iterable[str]) -> str:
    """The one line said when no admin endpoint answered."""
    tried = ", ".join(addresses)
    return (
        f"xds: no control plane admin endpoint answered at {tried}: start `xds serve` with "
        "--admin-port PORT (and --admin-host to reach it from elsewhere), then pass "
        "--admin HOST:PORT (once per replica)"
    )
