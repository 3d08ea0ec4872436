"""When a connection with a cached verdict has ended, and how it is described.

On a backend that sees every packet (divert) a connection ends at a TCP
reset, ``linger`` seconds after FINs went both ways (the last ACK and
retransmitted FINs still find the verdict), or after ``idle_timeout``
seconds without a packet. The engine notes FINs and resets as packets pass
(``Outbox.closing``); ``due`` finds what has ended by ``now``. Idle
connections are found at the front of the verdict cache, which is in
last-seen order, so a sweep reads only the entries that ended plus one, and
at most ``ENDS_PER_SWEEP`` of them: a backlog is left for the next sweep,
which then comes at once. A backend with a kernel verdict cache (nfqueue)
reports ends itself (conntrack); nothing here runs for it but ``record``.

No I/O and no clock: the service passes ``now`` and arms the timer at ``next_sweep``.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from pmk.core.params import InvalidParams
from pmk.core.verdict_cache import CachedVerdict, VerdictCache
from pmk.rpc import names
from pmk.verdicts import ConnKey, ip_text

#: At most this many connections are looked at (and ended) per sweep; the rest right after.
ENDS_PER_SWEEP = 1024
#: Sweeps come at least this often while connections are cached: lookups stamp
#: entries with the time of the latest event, so this bounds how stale that is.
MAX_SWEEP_INTERVAL = 1.0

#: list_connections returns at most this many records, so that a result fits in one frame.
MAX_LIST = 1000

#: An ended connection: its key, its entry, and why (SPEC 8: "closed", "idle", "destroyed").
End = tuple[ConnKey, CachedVerdict, str]


class Lifecycle:
    """Ends of the cached connections of one service; see the module docstring."""

    def __init__(self, cache: VerdictCache, idle_timeout: float, linger: float) -> None:
        self.cache = cache
        self.idle_timeout = idle_timeout
        self.linger = min(linger, idle_timeout)
        # (when, key, entry) of connections whose FINs went both ways, in time order.
        self._closing: deque[tuple[float, ConnKey, CachedVerdict]] = deque()
        self._backlog = False

    def closing(self, key: ConnKey, entry: CachedVerdict, reset: bool, now: float) -> End | None:
        """A FIN completed the close (end after the linger) or a reset ended it (now: the end)."""
        if self.cache.peek(key) is not entry:
            return None  # already gone (a reset earlier in the same batch)
        if reset:
            self.cache.pop(key)
            return (key, entry, "closed")
        self._closing.append((now + self.linger, key, entry))
        return None

    def due(self, now: float) -> list[End]:
        """Take the connections that ended by ``now`` out of the cache."""
        cache = self.cache
        ended: list[End] = []
        closing = self._closing
        work = 0  # entries looked at, ended or not
        while closing and closing[0][0] <= now and work < ENDS_PER_SWEEP:
            _, key, entry = closing.popleft()
            work += 1
            if cache.peek(key) is entry:  # not evicted, cleared or re-decided meanwhile
                cache.pop(key)
                ended.append((key, entry, "closed"))
        idle_before = now - self.idle_timeout
        idle: list[tuple[ConnKey, CachedVerdict]] = []
        for key, entry in cache.oldest():
            if entry.seen > idle_before or work >= ENDS_PER_SWEEP:
                break
            idle.append((key, entry))
            work += 1
        for key, entry in idle:
            cache.pop(key)
            ended.append((key, entry, "idle"))
        self._backlog = work >= ENDS_PER_SWEEP
        return ended

    def next_sweep(self, now: float) -> float | None:
        """When the next sweep is worth doing (None: nothing is cached or closing)."""
        if self._backlog:
            return now
        times = []
        if self._closing:
            times.append(self._closing[0][0])
        for _, entry in self.cache.oldest():
            times.append(min(entry.seen + self.idle_timeout, now + min(MAX_SWEEP_INTERVAL, self.idle_timeout / 4)))
            break
        return min(times) if times else None


def record(
    key: ConnKey, entry: CachedVerdict, now: float, traffic: tuple[int, int, int, int] | None = None
) -> dict[str, Any]:
    """A connection record of SPEC 4 (``list_connections``; ``connection_end`` adds ``reason``).

    ``traffic`` (packets in, out, bytes in, out) replaces the entry's own counters: the kernel's.
    """
    owner = entry.owner
    packets_in, packets_out, bytes_in, bytes_out = traffic if traffic is not None else entry.counters()
    described = {
        "protocol": key.protocol,
        "local_ip": ip_text(key.local_ip),
        "local_port": key.local_port,
        "remote_ip": ip_text(key.remote_ip),
        "remote_port": key.remote_port,
        "verdict": entry.verdict.value,
        "by": entry.by,
        "name": entry.name,
        "pid": owner.pid if owner is not None else None,
        "process": owner.process if owner is not None else None,
        "uid": owner.uid if owner is not None else None,
        "packets_in": packets_in,
        "packets_out": packets_out,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "age": round(max(0.0, now - entry.created), 3),
    }
    if entry.target is not None:
        described["to"] = str(entry.target)  # where a reroute sends it
    return described


def check_list(params: list[Any]) -> tuple[int, int]:
    """``list_connections`` params: (offset, limit)."""
    if len(params) > 1 or (params and not isinstance(params[0], dict)):
        raise InvalidParams(f"{names.LIST_CONNECTIONS} takes [] or one map")
    given = params[0] if params else {}
    offset, limit = given.get("offset", 0), given.get("limit", MAX_LIST)
    if type(offset) is not int or offset < 0:
        raise InvalidParams("offset must be a non-negative integer")
    if type(limit) is not int or not 0 <= limit <= MAX_LIST:
        raise InvalidParams(f"limit must be an integer 0..{MAX_LIST}")
    return offset, limit
