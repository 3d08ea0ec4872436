"""Bandwidth subscriptions: per client, traffic per connection since its previous notification.

Each subscriber has its own interval and its own baseline, so two clients
at different intervals both get exact deltas. Where pmk sees every packet
(divert) the deltas come from the verdict cache's counters: only entries
seen since the client's previous notification are read (the cache is in
last-seen order, newest at the back), and the baseline keeps each reported
entry's counters. Where the kernel carries the packets (nfqueue) the
service asks the shell for a kernel dump (``MeasureTraffic``) and keeps
each client's previous dump, opaque to it, for the next delta.

No I/O and no clock: the service passes ``now`` and arms the timer at ``next_due``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pmk.core.params import InvalidParams
from pmk.core.verdict_cache import CachedVerdict, VerdictCache
from pmk.rpc import names
from pmk.verdicts import ConnKey, ip_text

MIN_INTERVAL, MAX_INTERVAL = 0.1, 3600.0

#: (packets_in, packets_out, bytes_in, bytes_out)
Traffic = tuple[int, int, int, int]
#: What a kernel dump gives: every live marked connection's counters so far.
KernelTotals = Mapping[ConnKey, Traffic]


class Subscription:
    """One client's ``subscribe ["bandwidth", interval]``."""

    __slots__ = ("baseline", "due", "interval", "measuring", "previous", "since")

    def __init__(self, interval: float, now: float) -> None:
        self.interval = interval
        self.due = now + interval
        #: divert: when the previous notification was made (entries seen since have moved)
        self.since = now
        #: divert: each reported entry and its counters then (an entry, not a key: a key may be reused),
        #: under the cache's own key objects (``VerdictCache.newest_stored``): a baseline of every
        #: cached connection then costs no key of its own
        self.baseline: dict[bytes, tuple[CachedVerdict, Traffic]] = {}
        #: nfqueue: the kernel's totals at the previous notification (None until the first dump)
        self.previous: KernelTotals | None = None
        #: nfqueue: a dump for this client is under way
        self.measuring = False


class Bandwidth:
    """Every client's bandwidth subscription."""

    def __init__(self) -> None:
        self.subscribers: dict[int, Subscription] = {}

    def subscribe(self, client: int, interval: float, now: float, cache: VerdictCache, kernel: bool) -> None:
        """Start (or with 0 stop) notifications every ``interval`` seconds, counting from now.

        With ``kernel`` the baseline is a dump, made at once (``due`` now)
        and not sent; otherwise it is the cache's counters now.
        """
        if interval == 0:
            self.subscribers.pop(client, None)
            return
        old = self.subscribers.get(client)
        sub = Subscription(interval, now)
        if old is not None:  # a new interval keeps the baseline: no traffic is counted twice or lost
            sub.since, sub.baseline, sub.previous, sub.measuring = old.since, old.baseline, old.previous, old.measuring
        elif kernel:
            sub.due = now
        else:
            sub.baseline = {key: (entry, entry.counters()) for key, entry in cache.oldest_stored()}
        self.subscribers[client] = sub

    def stop(self, client: int) -> None:
        self.subscribers.pop(client, None)

    def next_due(self) -> float | None:
        waiting = [s.due for s in self.subscribers.values() if not s.measuring]
        return min(waiting) if waiting else None

    def due(self, now: float) -> list[int]:
        """The clients whose notification is due; their next one is scheduled."""
        clients = []
        for client, sub in self.subscribers.items():
            if sub.due <= now and not sub.measuring:
                sub.due = max(sub.due + sub.interval, now)
                clients.append(client)
        return clients

    def moved_in_cache(self, client: int, cache: VerdictCache, now: float) -> dict[ConnKey, Traffic]:
        """Divert: the traffic of each cached connection since this client's previous notification."""
        sub = self.subscribers[client]
        baseline, since = sub.baseline, sub.since
        moved: dict[ConnKey, Traffic] = {}
        for key, entry in cache.newest_stored():
            if entry.seen < since:
                break
            counters = entry.counters()
            # popped and set again: the baseline then holds the key object the cache holds now
            # (a move re-keys an entry with the key it was looked up by)
            before = baseline.pop(key, None)
            delta = counters if before is None or before[0] is not entry else _minus(counters, before[1])
            baseline[key] = (entry, counters)
            if any(delta):
                moved[ConnKey.of(key)] = delta
        sub.since = now
        if len(baseline) > 2 * len(cache) + 1024:  # ended connections: drop their baselines
            sub.baseline = {key: kept for key, kept in baseline.items() if cache.peek(key) is kept[0]}
        return moved

    def measuring(self, clients: list[int]) -> list[KernelTotals | None]:
        """nfqueue: a dump is under way for ``clients``; their previous totals (None: first)."""
        previous = []
        for client in clients:
            sub = self.subscribers[client]
            sub.measuring = True
            previous.append(sub.previous)
        return previous

    def measured(self, client: int, totals: KernelTotals | None) -> bool:
        """nfqueue: a dump for ``client`` finished (``totals`` None: it failed); True to send its deltas.

        Not after the first dump, which is the baseline, nor once the client has unsubscribed.
        """
        sub = self.subscribers.get(client)
        if sub is None:
            return False
        sub.measuring = False
        if totals is None:
            return False
        first = sub.previous is None
        sub.previous = totals
        return not first


def check_subscribe(params: list[Any]) -> float:
    """``subscribe`` params: the interval in seconds (0 stops)."""
    if len(params) != 2 or params[0] != names.BANDWIDTH:
        raise InvalidParams(f"{names.SUBSCRIBE} takes [{names.BANDWIDTH!r}, seconds]")
    interval = params[1]
    if type(interval) not in (int, float) or not (interval == 0 or MIN_INTERVAL <= interval <= MAX_INTERVAL):
        raise InvalidParams(f"the interval must be 0 or {MIN_INTERVAL}..{MAX_INTERVAL:g} seconds")
    return float(interval)


def entries(moved: Mapping[ConnKey, Traffic]) -> list[dict[str, Any]]:
    """The ``bandwidth`` notification's entries (SPEC 8)."""
    return [
        {
            "protocol": key.protocol,
            "local_ip": ip_text(key.local_ip),
            "local_port": key.local_port,
            "remote_ip": ip_text(key.remote_ip),
            "remote_port": key.remote_port,
            "packets_in": traffic[0],
            "packets_out": traffic[1],
            "bytes_in": traffic[2],
            "bytes_out": traffic[3],
        }
        for key, traffic in moved.items()
    ]


def _minus(now: Traffic, before: Traffic) -> Traffic:
    return (now[0] - before[0], now[1] - before[1], now[2] - before[2], now[3] - before[3])
