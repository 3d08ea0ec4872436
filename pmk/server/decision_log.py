"""One log line per decided connection, rate-limited so that a flood cannot flood the log.

The core yields a record for every connection it decides; ``DecisionLog``
turns it into one INFO line saying the direction, protocol, both ends, the
verdict, whether it is cached, and who decided. A token bucket bounds the
lines; what it holds back is counted and reported once a second. No
clock of its own: the caller hands in ``now``, so tests drive it with a fake.
"""

from __future__ import annotations

import logging
from typing import Protocol

from pmk.verdicts import ConnKey, Verdict, ip_text

# Sustained decision lines per second. A desktop opens a few connections a
# second and a busy server tens; 20 lines/s is at most 1.7 million lines a
# day, and stays far below journald's default rate limit (10000 lines per
# 30 s per service), so pmk's own warnings are never the ones it drops.
DEFAULT_LINES_PER_SECOND = 20.0
# Lines allowed at once: a browser opening a page starts a few dozen
# connections together, and all of them should show.
DEFAULT_LINES_BURST = 50
# Seconds between "N lines suppressed" reports during a flood: one extra
# line per second, and the count is never older than that.
SUPPRESSED_REPORT_INTERVAL = 1.0

_PROTOCOL_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6", 132: "sctp", 136: "udplite"}
_PORT_PROTOCOLS = frozenset({6, 17, 132, 136})
# Who decided, as the line says it; ``{name}`` is the decider or rule name.
_DECIDERS = {
    "decider": "decider {name}",
    "policy": "policy rule {name}",
    "cache": "cache",
    "existing": "existing at start",
    "operator": "operator (update_verdict)",
}


class DecidedRecord(Protocol):
    """What the core reports for a decided connection (its ``Decided`` record)."""

    @property
    def key(self) -> ConnKey: ...
    @property
    def outbound(self) -> bool: ...
    @property
    def verdict(self) -> Verdict: ...
    @property
    def permanent(self) -> bool: ...
    @property
    def by(self) -> str: ...
    @property
    def name(self) -> str: ...


class DecisionLog:
    """Writes decision lines to ``logger`` through a token bucket."""

    def __init__(
        self,
        logger: logging.Logger,
        per_second: float = DEFAULT_LINES_PER_SECOND,
        burst: int = DEFAULT_LINES_BURST,
    ) -> None:
        if per_second <= 0 or burst < 1:
            raise ValueError("per_second must be positive and burst at least 1")
        self.logger = logger
        self.per_second = per_second
        self.burst = burst
        self._tokens = float(burst)
        self._refilled_at: float | None = None
        #: lines held back since the last report of them
        self.suppressed = 0
        self._suppressed_since = 0.0

    def record(self, decided: DecidedRecord, now: float) -> None:
        """Log one decided connection, unless the bucket is empty (then count it)."""
        if not self.logger.isEnabledFor(logging.INFO):
            return
        self.flush(now)
        if self._take(now):
            self.logger.info("%s", describe(decided))
            return
        if not self.suppressed:
            self._suppressed_since = now
        self.suppressed += 1

    def flush(self, now: float, final: bool = False) -> None:
        """Say how many lines were held back, at most once per report interval (``final``: now).

        ``record`` calls it; the shell also calls it now and then (and at
        exit, ``final``), so a flood that has ended is still reported.
        """
        if self.suppressed and (final or now - self._suppressed_since >= SUPPRESSED_REPORT_INTERVAL):
            self.logger.info(
                "%d decision lines suppressed in the last %.1f s (limit %g lines/s)",
                self.suppressed,
                now - self._suppressed_since,
                self.per_second,
            )
            self.suppressed = 0

    def _take(self, now: float) -> bool:
        if self._refilled_at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._refilled_at) * self.per_second)
        self._refilled_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def describe(decided: DecidedRecord) -> str:
    """The line for one decided connection, initiator first, e.g.

    ``inbound tcp 198.18.0.2:50000 -> 198.18.0.1:22 accept permanent by policy rule ssh-in``

    A connection open at start has no known initiator (the socket table does
    not say who connected): ``open tcp LOCAL <-> REMOTE ...``, this host first.
    """
    key = decided.key
    protocol = _PROTOCOL_NAMES.get(key.protocol, f"proto-{key.protocol}")
    ports = key.protocol in _PORT_PROTOCOLS
    local = _end(key.local_ip, key.local_port, ports)
    remote = _end(key.remote_ip, key.remote_port, ports)
    if decided.by == "existing":
        ends = f"open {protocol} {local} <-> {remote}"
    elif decided.outbound:
        ends = f"outbound {protocol} {local} -> {remote}"
    else:
        ends = f"inbound {protocol} {remote} -> {local}"
    permanence = "permanent" if decided.permanent else "temporary"
    who = _DECIDERS.get(decided.by, decided.by + " {name}").format(name=decided.name or "?")
    return f"{ends} {decided.verdict.value} {permanence} by {who}"


def _end(address: bytes, port: int, with_port: bool) -> str:
    text = ip_text(address)
    if not with_port:
        return text
    return f"[{text}]:{port}" if len(address) == 16 else f"{text}:{port}"
