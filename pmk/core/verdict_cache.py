"""Permanent verdicts per connection, least recently used evicted.

An entry is an object rather than a bare verdict so that the connection's
record (who decided, when, what passed under it: ``list_connections`` and
``connection_end``) and a reroute's target live beside it. The map is in
last-seen order: a lookup moves its entry to the end and stamps it with
``now`` (the time of the service's latest event or tick), so idle
connections are found at the front and recently moved ones at the back
without scanning the rest.

Memory per entry is what bounds how many connections pmk can hold (issue
12: at most 200 B; ``benchmarks/cache_memory.py`` measures it), so the map
is a plain dict (insertion-ordered; a move is a pop and a re-insert, where
an OrderedDict would add a linked node and an index array per entry), its
keys are ``ConnKey.packed`` bytes (one object, where the tuple with its
addresses and ports is up to five), and an entry keeps what is per
connection in eight slots while the rarely changing rest is shared
(``Facts``).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any, NamedTuple

from pmk.packet.captured import PackedKey
from pmk.verdicts import KEY_PACKERS, ConnKey, Target, Verdict


class Facts(NamedTuple):
    """The rarely changing part of an entry (a tuple: fields read as fast as slots)."""

    #: where a reroute sends the connection (None for any other verdict)
    target: Target | None = None
    #: who decided (SPEC 5.6) and the decider's or rule's name
    by: str = ""
    name: str = ""
    #: the local socket's owner when known (pmk.host.owner.Owner), else None
    owner: Any = None
    #: TCP FINs seen (divert): both set means the connection is closing
    fin_in: bool = False
    fin_out: bool = False


_NO_FACTS = Facts()
#: builds a Facts from a tuple in C (Facts(...) and _replace go through Python code)
_new_facts = tuple.__new__
#: Equal facts are one object, shared by all the entries that have them (a
#: process's connections, decided by one decider, have the same).
_shared: dict[tuple[Any, ...], Facts] = {_NO_FACTS: _NO_FACTS}
#: When the table holds this many, it starts anew (owners come and go with
#: processes): entries keep theirs, only sharing with older entries stops.
_SHARED_MAX = 4096


def _share(facts: Facts) -> Facts:
    """The one object equal to ``facts``."""
    kept = _shared.get(facts)
    if kept is None:
        if len(_shared) >= _SHARED_MAX:
            _shared.clear()
        kept = _shared[facts] = facts
    return kept


class CachedVerdict:
    """A connection's verdict (with a reroute's target), who gave it, and what passed under it each way.

    ``target``, ``by``, ``name``, ``owner`` and the FIN flags read and write
    the shared ``facts`` (set once per decision, or per FIN); the verdict,
    times and counters, which change per packet, are the entry's own slots.
    The per-packet path reads ``facts.target`` (a property costs a call).
    """

    __slots__ = ("bytes_in", "bytes_out", "created", "facts", "packets_in", "packets_out", "seen", "verdict")

    def __init__(self, verdict: Verdict, target: Target | None = None, created: float = 0.0) -> None:
        self.verdict = verdict
        self.facts = _NO_FACTS if target is None else _share(Facts(target))
        self.created = created
        self.seen = created
        self.packets_in = self.packets_out = 0
        self.bytes_in = self.bytes_out = 0

    def counters(self) -> tuple[int, int, int, int]:
        """(packets_in, packets_out, bytes_in, bytes_out)."""
        return (self.packets_in, self.packets_out, self.bytes_in, self.bytes_out)

    def decided(self, by: str, name: str, owner: Any) -> None:
        """Who decided and the owner, at once: one shared ``Facts`` looked up instead of three."""
        f = self.facts
        wanted = (f[0], by, name, owner, f[4], f[5])
        kept = _shared.get(wanted)  # a plain tuple finds the equal Facts: none is built unless new
        self.facts = kept if kept is not None else _share(_new_facts(Facts, wanted))

    @property
    def target(self) -> Target | None:
        return self.facts.target

    @target.setter
    def target(self, value: Target | None) -> None:
        f = self.facts
        self.facts = _share(_new_facts(Facts, (value, f[1], f[2], f[3], f[4], f[5])))

    @property
    def by(self) -> str:
        return self.facts.by

    @by.setter
    def by(self, value: str) -> None:
        f = self.facts
        self.facts = _share(_new_facts(Facts, (f[0], value, f[2], f[3], f[4], f[5])))

    @property
    def name(self) -> str:
        return self.facts.name

    @name.setter
    def name(self, value: str) -> None:
        f = self.facts
        self.facts = _share(_new_facts(Facts, (f[0], f[1], value, f[3], f[4], f[5])))

    @property
    def owner(self) -> Any:
        return self.facts.owner

    @owner.setter
    def owner(self, value: Any) -> None:
        f = self.facts
        self.facts = _share(_new_facts(Facts, (f[0], f[1], f[2], value, f[4], f[5])))

    @property
    def fin_in(self) -> bool:
        return self.facts.fin_in

    @fin_in.setter
    def fin_in(self, value: bool) -> None:
        f = self.facts
        self.facts = _share(_new_facts(Facts, (f[0], f[1], f[2], f[3], value, f[5])))

    @property
    def fin_out(self) -> bool:
        return self.facts.fin_out

    @fin_out.setter
    def fin_out(self, value: bool) -> None:
        f = self.facts
        self.facts = _share(_new_facts(Facts, (f[0], f[1], f[2], f[3], f[4], value)))


#: A full cache evicts this fraction of its capacity at a time (at least one entry).
EVICT_FRACTION = 1024


class VerdictCache:
    """A bounded LRU map from connection key to its cached verdict.

    Keys are given as a ConnKey or in its ``packed`` form (the per-packet
    path's), kept in the packed form and handed out as ConnKeys.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("verdict cache capacity must be at least 1")
        self.capacity = capacity
        self._evict_batch = max(1, capacity // EVICT_FRACTION)
        self._entries: dict[PackedKey, CachedVerdict] = {}
        self.evictions = 0
        #: the time lookups stamp entries with (set by the service before each event)
        self.now = 0.0
        # the last ConnKey packed and its packed form: a decision puts, then peeks, one key
        self._last: tuple[ConnKey | None, PackedKey] = (None, b"")

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: ConnKey | PackedKey) -> bool:
        return self._packed(key) in self._entries

    def _packed(self, key: ConnKey | PackedKey) -> PackedKey:
        if isinstance(key, bytes):
            return key
        last, packed = self._last
        if key is not last:
            # ConnKey.packed() written out (a call less: this runs twice per decision)
            pack = KEY_PACKERS[len(key.local_ip)]
            packed = pack(key.protocol, key.local_ip, key.remote_ip, key.local_port, key.remote_port)
            self._last = (key, packed)
        return packed

    def get(self, key: ConnKey | PackedKey) -> CachedVerdict | None:
        """Return the entry, mark it recently used and seen now, or None.

        An entry already seen at this ``now`` keeps its place: entries of one
        time need no order among them, and a move (a pop and a re-insert)
        costs more than the lookup and uses up a slot of the dict until its
        next resize. A batch whose runs interleave connections looks each
        one up several times.
        """
        if type(key) is not bytes:
            key = self._packed(key)
        entries = self._entries
        entry = entries.get(key)
        if entry is not None and entry.seen != self.now:
            del entries[key]
            entries[key] = entry
            entry.seen = self.now
        return entry

    def peek(self, key: ConnKey | PackedKey) -> CachedVerdict | None:
        """The entry without touching its place or time."""
        return self._entries.get(self._packed(key))

    def put(self, key: ConnKey | PackedKey, verdict: Verdict, target: Target | None = None) -> CachedVerdict:
        """Cache ``verdict`` (a reroute with its ``target``) for ``key``; the least recently used entry makes room."""
        entries = self._entries
        key = self._packed(key)
        entry = entries.pop(key, None)
        if entry is not None:
            entry.verdict = verdict
            entry.target = target
            entry.seen = self.now
            entries[key] = entry
            return entry
        if len(entries) >= self.capacity:
            self._evict()
        entry = entries[key] = CachedVerdict(verdict, target, self.now)
        return entry

    def _evict(self) -> None:
        """Drop the least recently used entries, ``capacity // EVICT_FRACTION`` of them at once.

        A plain dict finds its first live entry by walking past every slot its
        deletions emptied since its last resize: evicting one entry per new
        one cost ~25 us at 65,536 entries (0.5 us with an OrderedDict). One
        walk per batch makes that rare; a full cache then holds up to a batch
        fewer entries than its capacity.
        """
        entries = self._entries
        victims = list(islice(entries, self._evict_batch))
        for victim in victims:
            del entries[victim]
        self.evictions += len(victims)

    def pop(self, key: ConnKey | PackedKey) -> CachedVerdict | None:
        """Remove and return the entry of an ended connection."""
        return self._entries.pop(self._packed(key), None)

    def oldest(self) -> Iterator[tuple[ConnKey, CachedVerdict]]:
        """Entries least recently seen first (do not change the cache while iterating)."""
        as_key = ConnKey.of
        return ((as_key(key), entry) for key, entry in self._entries.items())

    def newest(self) -> Iterator[tuple[ConnKey, CachedVerdict]]:
        """Entries most recently seen first (do not change the cache while iterating)."""
        as_key = ConnKey.of
        return ((as_key(key), entry) for key, entry in reversed(self._entries.items()))

    def oldest_stored(self) -> Iterator[tuple[PackedKey, CachedVerdict]]:
        """``oldest`` under the keys as stored: a map of its own keyed by them adds no key objects."""
        return iter(self._entries.items())

    def newest_stored(self) -> Iterator[tuple[PackedKey, CachedVerdict]]:
        """``newest`` under the keys as stored (see ``oldest_stored``)."""
        return reversed(self._entries.items())

    def clear(self) -> int:
        """Forget everything; return how many entries there were."""
        count = len(self._entries)
        self._entries.clear()
        return count
