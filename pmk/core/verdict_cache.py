"""Permanent verdicts per connection, least recently used evicted.

An entry is an object rather than a bare verdict so that the connection's
record (who decided, when, what passed under it: ``list_connections`` and
``connection_end``) and a reroute's target live beside it. The map is in
last-seen order: a lookup moves its entry to the end and stamps it with
``now`` (the time of the service's latest event or tick), so idle
connections are found at the front and recently moved ones at the back
without scanning the rest.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from pmk.verdicts import ConnKey, Target, Verdict


class CachedVerdict:
    """A connection's verdict (with a reroute's target), who gave it, and what passed under it each way."""

    __slots__ = (
        "by",
        "bytes_in",
        "bytes_out",
        "created",
        "fin_in",
        "fin_out",
        "name",
        "owner",
        "packets_in",
        "packets_out",
        "seen",
        "target",
        "verdict",
    )

    def __init__(self, verdict: Verdict, target: Target | None = None, created: float = 0.0) -> None:
        self.verdict = verdict
        self.target = target
        #: who decided (SPEC 5.6) and the decider's or rule's name
        self.by = ""
        self.name = ""
        #: the local socket's owner when known (pmk.host.owner.Owner), else None
        self.owner: Any = None
        self.created = created
        self.seen = created
        self.packets_in = self.packets_out = 0
        self.bytes_in = self.bytes_out = 0
        #: TCP FINs seen (divert): both set means the connection is closing
        self.fin_in = self.fin_out = False

    def counters(self) -> tuple[int, int, int, int]:
        """(packets_in, packets_out, bytes_in, bytes_out)."""
        return (self.packets_in, self.packets_out, self.bytes_in, self.bytes_out)


class VerdictCache:
    """A bounded LRU map from connection key to its cached verdict."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("verdict cache capacity must be at least 1")
        self.capacity = capacity
        self._entries: OrderedDict[ConnKey, CachedVerdict] = OrderedDict()
        self.evictions = 0
        #: the time lookups stamp entries with (set by the service before each event)
        self.now = 0.0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: ConnKey) -> bool:
        return key in self._entries

    def get(self, key: ConnKey) -> CachedVerdict | None:
        """Return the entry, mark it recently used and seen now, or None."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            entry.seen = self.now
        return entry

    def peek(self, key: ConnKey) -> CachedVerdict | None:
        """The entry without touching its place or time."""
        return self._entries.get(key)

    def put(self, key: ConnKey, verdict: Verdict, target: Target | None = None) -> CachedVerdict:
        """Cache ``verdict`` (a reroute with its ``target``) for ``key``; the least recently used entry makes room."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.verdict = verdict
            entry.target = target
            entry.seen = self.now
            self._entries.move_to_end(key)
            return entry
        if len(self._entries) >= self.capacity:
            self._entries.popitem(last=False)
            self.evictions += 1
        entry = CachedVerdict(verdict, target, self.now)
        self._entries[key] = entry
        return entry

    def pop(self, key: ConnKey) -> CachedVerdict | None:
        """Remove and return the entry of an ended connection."""
        return self._entries.pop(key, None)

    def oldest(self) -> Iterator[tuple[ConnKey, CachedVerdict]]:
        """Entries least recently seen first (do not change the cache while iterating)."""
        return iter(self._entries.items())

    def newest(self) -> Iterator[tuple[ConnKey, CachedVerdict]]:
        """Entries most recently seen first (do not change the cache while iterating)."""
        return reversed(self._entries.items())

    def clear(self) -> int:
        """Forget everything; return how many entries there were."""
        count = len(self._entries)
        self._entries.clear()
        return count
