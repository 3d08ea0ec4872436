"""Packet accounting (request counters live with the requests, ``requests.py``).

Invariant, true between any two events: every captured packet is in exactly
one of accepted, blocked, dropped, rerouted, evicted, or still held (pending).
``defaulted`` counts the outcomes that came from the fallback policy.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(slots=True)
class Counters:
    """Plain integer counters; the engine bumps them on the packet path."""

    accepted: int = 0
    blocked: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    captured: int = 0
    defaulted: int = 0
    dropped: int = 0
    evicted: int = 0
    preaccepted: int = 0
    #: packets sent to a reroute or redirect target (or replies brought back from one)
    rerouted: int = 0
    unparsed: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
