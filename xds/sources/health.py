"""How a source's own machinery is doing, apart from what it serves: failures and degraded input.

A source has loops that must not die (an informer per resource, the manifest watcher). Each of
them reports here: `failed(part, why)` after an exception it survived (it is counted, and retried
by the loop), `recovered(part)` once it works again. A part that keeps failing without recovering
(`unready_after` failures in a row) is one the source cannot get back on its own: the control plane
reports itself not ready, while the last good snapshot keeps being served.

`degraded(part, why)` is the other kind of trouble: the source works but some input is unusable
(a configured directory gone), so it keeps serving what it last read from there. That does not
make the control plane unready (what is served is the last good configuration, on purpose), but it
is shown in `/debug/problems`, `/readyz`'s detail and a metric.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from xds.model import Problem, error

# Failures in a row after which a part counts as unable to recover. The loops back off
# exponentially (up to 30 s), so five failures take a few seconds: long enough not to flap on one
# dropped connection, short enough for a probe to notice.
UNREADY_AFTER_FAILURES = 5


@dataclass(frozen=True, slots=True)
class PartState:
    part: str
    why: str
    failures: int  # in a row; 0 for a degraded part that is not failing


class SourceHealth:
    """Thread-safe: informer threads, the rebuild's worker thread and the event loop report here."""

    def __init__(
        self,
        source: str,
        on_error: Callable[[str], None] | None = None,
        unready_after: int = UNREADY_AFTER_FAILURES,
    ) -> None:
        self.source = source
        self._on_error = on_error
        self._unready_after = max(1, unready_after)
        self._lock = threading.Lock()
        self._failing: dict[str, PartState] = {}
        self._degraded: dict[str, str] = {}
        self.errors = 0  # every failure reported, for tests and logs

    def failed(self, part: str, why: str) -> None:
        with self._lock:
            self.errors += 1
            previous = self._failing.get(part)
            failures = previous.failures + 1 if previous is not None else 1
            self._failing[part] = PartState(part, why, failures)
        if self._on_error is not None:
            self._on_error(self.source)

    def recovered(self, part: str) -> None:
        if part not in self._failing:  # the common case, without the lock
            return
        with self._lock:
            self._failing.pop(part, None)

    def is_failing(self, part: str) -> bool:
        return part in self._failing

    def failures(self, part: str) -> int:
        """How many times in a row `part` failed (0: it works)."""
        state = self._failing.get(part)
        return state.failures if state is not None else 0

    def degraded(self, part: str, why: str | None) -> None:
        """Set (or, with None, clear) what is wrong with `part`'s input."""
        with self._lock:
            if why is None:
                self._degraded.pop(part, None)
            else:
                self._degraded[part] = why

    def failing(self) -> list[PartState]:
        with self._lock:
            return sorted(self._failing.values(), key=lambda state: state.part)

    def unready(self) -> list[str]:
        """Why the source cannot serve changes any more (empty: it can)."""
        return [
            f"{self.source} {state.part}: {state.failures} failures in a row, last: {state.why}"
            for state in self.failing()
            if state.failures >= self._unready_after
        ]

    def degradations(self) -> list[str]:
        with self._lock:
            return [f"{part}: {why}" for part, why in sorted(self._degraded.items())]

    def problems(self) -> list[Problem]:
        """The parts failing now, as problems (degraded input is the source's own problem)."""
        return [
            error(
                f"source {self.source}",
                "",
                f"{state.part} failed {state.failures} time(s) in a row, retrying: {state.why}",
                state.part,
            )
            for state in self.failing()
        ]
