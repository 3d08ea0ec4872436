"""Packet accounting.

Invariant, true between any two events: every captured packet is in exactly
one of accepted, blocked, dropped, evicted, or still held (pending).
``defaulted`` counts the outcomes that came from the default verdict.
"""

from __future__ import annotations


class Counters:
    """Plain integer counters; the engine bumps them on the packet path."""

    __slots__ = (
        "accepted",
        "blocked",
        "cache_hits",
        "cache_misses",
        "captured",
        "defaulted",
        "dropped",
        "evicted",
        "late_verdicts",
        "requests",
        "timeouts",
        "unparsed",
        "withdrawn",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def settled(self) -> int:
        """Packets that reached an outcome."""
        return self.accepted + self.blocked + self.dropped + self.evicted
