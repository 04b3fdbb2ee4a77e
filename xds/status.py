"""`xds status`: the /debug/syncz view as a table, one row per proxy and resource type."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only the shape: `xds status` need not load the server and its protobufs
    from xds.server.stream import StreamStatus, TypeStatus

COLUMNS = ("NODE", "PEER", "TYPE", "NAMES", "SENT", "NONCE", "ACKED", "STATE", "LAST NACK")


def _short(version: str | None) -> str:
    return (version or "-")[:12]


def _state(entry: TypeStatus) -> str:
    if entry.get("rejected_resources"):
        return f"REJECTED {len(entry['rejected_resources'])}"
    if entry.get("awaiting_ack"):
        return "PENDING"
    if entry.get("last_nack"):
        return "NACKED"
    return "SYNCED" if entry.get("acked_version") == entry.get("sent_version") else "STALE"


def render_syncz(clients: list[StreamStatus]) -> str:
    rows = [COLUMNS]
    for client in clients:
        for type_name, entry in client.get("types", {}).items():
            nack = entry.get("last_nack")
            message = " ".join(str(nack.get("message", "") if nack else "").split())
            rows.append(
                (
                    client.get("node_id") or "-",
                    client.get("peer") or "-",
                    type_name,
                    "*" if entry.get("wildcard") else str(entry.get("subscribed", 0)),
                    _short(entry.get("sent_version")),
                    str(entry.get("nonce") or "-"),
                    _short(entry.get("acked_version")),
                    _state(entry),
                    (message[-60:] if len(message) > 60 else message) or "-",
                )
            )
    if len(rows) == 1:
        return "no proxies connected"
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
