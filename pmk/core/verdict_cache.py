"""Permanent verdicts per connection, least recently used evicted.

An entry is an object rather than a bare verdict so that per-connection
counters (and later a rewrite for reroute verdicts) live beside it.
"""

from __future__ import annotations

from collections import OrderedDict

from pmk.verdicts import ConnKey, Verdict


class CachedVerdict:
    """A connection's verdict and what passed under it."""

    __slots__ = ("bytes", "packets", "verdict")

    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
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

    def put(self, key: ConnKey, verdict: Verdict) -> CachedVerdict:
        """Cache ``verdict`` for ``key``, evicting the least recently used entry if full."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.verdict = verdict
            self._entries.move_to_end(key)
            return entry
        if len(self._entries) >= self.capacity:
            self._entries.popitem(last=False)
            self.evictions += 1
        entry = CachedVerdict(verdict)
        self._entries[key] = entry
        return entry

    def clear(self) -> int:
        """Forget everything; return how many entries there were."""
        count = len(self._entries)
        self._entries.clear()
        return count
