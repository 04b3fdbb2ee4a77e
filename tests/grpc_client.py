"""A proxyless gRPC client in a process of its own, driven over stdin and stdout (one JSON object a
line each way), for the tests and benchmarks that put grpcio's real xDS client before the
control plane.

It must be a process of its own: grpcio reads `GRPC_XDS_BOOTSTRAP` once per process, so each
client node (its id, its locality) needs one. Channels are kept per target for the life of the
process, as an application keeps them: the xDS client behind them keeps its ADS stream and
follows every update.

Commands:
- `{"op": "call", "target": T, "count": N, "timeout": S}`: N unary calls one after the other;
  answers `{"backends": [name, ...], "error": null or "CODE: details", "seconds": S}`, stopping at
  the first error.
- `{"op": "until", "target": T, "backend": NAME, "present": true, "timeout": S}`: calls until a
  call reaches NAME (or, with `"present": false`, until `"calls"` calls in a row miss it);
  answers `{"found": bool, "calls": N, "seconds": S, "error": ...}`.

Every loop is bounded by its count and its deadline.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import grpc

from xds.local import GRPC_METHOD

MAX_CALLS = 100_000
MAX_TIMEOUT_S = 120.0


def _raw(data: bytes) -> bytes:
    return data


class Client:
    def __init__(self) -> None:
        self._channels: dict[str, grpc.Channel] = {}

    def _who(self, target: str) -> Any:
        channel = self._channels.get(target)
        if channel is None:
            channel = self._channels[target] = grpc.insecure_channel(target)
        return channel.unary_unary(GRPC_METHOD, request_serializer=_raw, response_deserializer=_raw)

    def call(self, target: str, count: int, timeout: float) -> dict[str, Any]:
        who = self._who(target)
        deadline = time.monotonic() + min(timeout, MAX_TIMEOUT_S)
        started = time.monotonic()
        backends: list[str] = []
        error = None
        for _ in range(min(count, MAX_CALLS)):
            left = deadline - time.monotonic()
            if left <= 0:
                error = "DEADLINE_EXCEEDED: the command's timeout passed"
                break
            try:
                backends.append(who(b"", timeout=left).decode())
            except grpc.RpcError as exc:
                error = f"{exc.code().name}: {exc.details()}"
                break
        return {"backends": backends, "error": error, "seconds": time.monotonic() - started}

    def until(
        self, target: str, backend: str, present: bool, calls: int, timeout: float
    ) -> dict[str, Any]:
        """Calls until one reaches `backend` (present) or `calls` in a row do not (absent)."""
        who = self._who(target)
        started = time.monotonic()
        deadline = started + min(timeout, MAX_TIMEOUT_S)
        made = misses = 0
        error = None
        while made < MAX_CALLS and time.monotonic() < deadline:
            made += 1
            try:
                name = who(b"", timeout=max(deadline - time.monotonic(), 0.001)).decode()
            except grpc.RpcError as exc:
                error = f"{exc.code().name}: {exc.details()}"
                continue
            if present and name == backend:
                return {"found": True, "calls": made, "seconds": time.monotonic() - started}
            misses = misses + 1 if name != backend else 0
            if not present and misses >= calls:
                return {"found": True, "calls": made, "seconds": time.monotonic() - started}
        return {
            "found": False,
            "calls": made,
            "seconds": time.monotonic() - started,
            "error": error,
        }


def main() -> None:
    client = Client()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        timeout = float(command.get("timeout", 20.0))
        if command["op"] == "call":
            reply = client.call(command["target"], int(command["count"]), timeout)
        elif command["op"] == "until":
            reply = client.until(
                command["target"],
                command["backend"],
                bool(command.get("present", True)),
                int(command.get("calls", 50)),
                timeout,
            )
        else:
            reply = {"error": f"unknown op {command['op']!r}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
