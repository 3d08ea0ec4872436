"""Permanent verdicts per connection, least recently used evicted.

An entry is an object rather than a bare verdict so that per-connection
counters and a reroute's target live beside it.
"""

from __future__ import annotations

from collections import OrderedDict

from pmk.verdicts import ConnKey, Target, Verdict


class CachedVerdict:
    """A connection's verdict (with a reroute's target) and what passed under it."""

    __slots__ = ("bytes", "packets", "target", "verdict")

    def __init__(self, verdict: Verdict, target: Target | None = None) -> None:
        self.verdict = verdict
        self.target = target
        self.packets = 0
        self.bytes = 0


class VerdictCache:
    """A bounded LRU map from connection key to its cached verdict."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("verdict cache capacity must be at least 1")
        self.capacity = capacity
        self._entries: OrderedDict[ConnKey, CachedVerdict] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: ConnKey) -> bool:
        return key in self._entries

    def get(self, key: ConnKey) -> CachedVerdict | None:
        """Return the entry and mark it recently used, or None."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: ConnKey, verdict: Verdict, target: Target | None = None) -> CachedVerdict:
        """Cache ``verdict`` (a reroute with its ``target``) for ``key``; the least recently used entry makes room."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.verdict = verdict
            entry.target = target
            self._entries.move_to_end(key)
            return entry
        if len(self._entries) >= self.capacity:
            self._entries.popitem(last=False)
            self.evictions += 1
        entry = CachedVerdict(verdict, target)
        self._entries[key] = entry
        return entry

    def clear(self) -> int:
        """Forget everything; return how many entries there were."""
        count = len(self._entries)
        self._entries.clear()
        return count
