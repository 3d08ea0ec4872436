"""Python's cyclic garbage collector, set for a process that holds many objects for long.

pmk keeps up to ``--verdict-cache`` connection records for hours, and makes
a few short-lived objects per new connection. With the interpreter's
defaults (a young collection every 700 allocations) many objects that live
only milliseconds (a held packet, its request) survive young collections
and reach the oldest generation, whose collections walk every cached
record. Measured during one ``pmk bench --rows D`` run each (both
backends, on a 2-core machine that other jobs kept busy, so the durations
are wall-clock and inflated): with the defaults, 15 full collections took
5.2 s, the longest 770 ms (long enough for eBPFDivert's ring to fill at a
high rate), and 1,984 young and middle ones 0.9 s more; with the settings
below, 28 young and 1 middle collection took 0.84 s in all, and there was
no full one. ``benchmarks/service_core.py`` over 100k new connections:
200-215 ms of collection, the longest 89-100 ms, becomes 64-72 ms, the
longest 7-13 ms.

``gc.freeze()`` first moves everything made at start (modules, config,
the policy) out of the collector's sight for good. A full collection still
happens, after about 20 million more allocations than frees, so reference cycles do not
pile up for ever.
"""

from __future__ import annotations

import gc

#: Allocations between young collections (the interpreter's default is 700).
YOUNG_THRESHOLD = 10_000
#: Young collections per middle one, and middle collections per full one (defaults 10 and 10).
MIDDLE_THRESHOLD = 20
FULL_THRESHOLD = 100


def tune_for_serving() -> None:
    """Freeze what exists now and space collections out (see the module docstring)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, FULL_THRESHOLD)
