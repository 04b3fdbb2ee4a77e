"""Which streams subscribe to which resource names: a publish wakes only the streams it concerns.

Streams with the same subscription of a type (every Envoy of a fleet asks for the same endpoints)
share one entry and one frozenset of names, so the index costs the distinct subscriptions, not the
streams: 5,000 Envoys subscribed to the same 1,000 endpoints are one set of 1,000 names.
"""

from __future__ import annotations

from collections import defaultdict

from xds.cache import Changes
from xds.resources import API_LISTENER, LISTENER

_Group = tuple[str, frozenset[str]]  # (type URL, names)


class SubscriptionIndex:
    def __init__(self) -> None:
        # (type, names) -> the index's copy of the names, and the streams with exactly those.
        self._groups: dict[_Group, tuple[frozenset[str], set[int]]] = {}
        # type -> name -> the subscriptions that name it.
        self._by_name: dict[str, dict[str, set[frozenset[str]]]] = defaultdict(dict)
        # type -> the streams subscribed to everything of it.
        self._wildcard: dict[str, set[int]] = defaultdict(set)
        # (stream, type) -> its indexed (names, wildcard).
        self._current: dict[tuple[int, str], tuple[frozenset[str], bool]] = {}

    def subscribe(
        self, stream_id: int, type_url: str, names: frozenset[str], wildcard: bool
    ) -> frozenset[str]:
        """Records a stream's subscription of a type; returns the index's own copy of the names,
        which the stream keeps instead of its own (one set shared by every such stream)."""
        current = self._current.get((stream_id, type_url))
        if current is not None and current[0] is names and current[1] == wildcard:
            return names
        self._forget(stream_id, type_url)
        group = (type_url, names)
        found = self._groups.get(group)
        if found is None:
            found = self._groups[group] = (names, set())
            by_name = self._by_name[type_url]
            for name in names:
                by_name.setdefault(name, set()).add(names)
        names, members = found
        members.add(stream_id)
        if wildcard:
            self._wildcard[type_url].add(stream_id)
        self._current[(stream_id, type_url)] = (names, wildcard)
        return names

    def _forget(self, stream_id: int, type_url: str) -> None:
        current = self._current.pop((stream_id, type_url), None)
        if current is None:
            return
        names, wildcard = current
        if wildcard:
            self._wildcard[type_url].discard(stream_id)
        group = (type_url, names)
        members = self._groups[group][1]
        members.discard(stream_id)
        if not members:
            del self._groups[group]
            by_name = self._by_name[type_url]
            for name in names:
                holders = by_name[name]
                holders.discard(names)
                if not holders:
                    del by_name[name]

    def remove(self, stream_id: int, types: list[str]) -> None:
        for type_url in types:
            self._forget(stream_id, type_url)

    def concerned(self, changes: Changes) -> set[int]:
        """The streams subscribed to a name these changes touch."""
        streams: set[int] = set()
        for kept_as, changed in changes.items():
            # API listeners concern only the streams that name them (as Listeners).
            type_url = LISTENER if kept_as == API_LISTENER else kept_as
            if kept_as != API_LISTENER:
                streams |= self._wildcard.get(type_url, set())
            by_name = self._by_name.get(type_url)
            if not by_name:
                continue
            seen: set[frozenset[str]] = set()
            for name in changed:
                for names in by_name.get(name, ()):
                    if names not in seen:
                        seen.add(names)
                        streams |= self._groups[(type_url, names)][1]
        return streams
