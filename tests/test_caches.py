"""Verdict cache (LRU) bookkeeping."""

from __future__ import annotations

from pmk.core.verdict_cache import VerdictCache
from pmk.verdicts import ConnKey, Verdict


def key(port: int) -> ConnKey:
    return ConnKey(6, b"\x01\x02\x03\x04", port, b"\x05\x06\x07\x08", 80)


def test_verdict_cache_evicts_the_least_recently_used() -> None:
    cache = VerdictCache(2)
    cache.put(key(1), Verdict.ACCEPT)
    cache.put(key(2), Verdict.BLOCK)
    assert cache.get(key(1)) is not None  # 1 is now the most recent
    cache.put(key(3), Verdict.DROP)
    assert key(2) not in cache and key(1) in cache and key(3) in cache
    assert cache.evictions == 1


def test_verdict_cache_update_keeps_counters() -> None:
    cache = VerdictCache(4)
    entry = cache.put(key(1), Verdict.ACCEPT)
    entry.packets_in = 7
    again = cache.put(key(1), Verdict.BLOCK)
    assert again is entry and again.packets_in == 7 and again.verdict is Verdict.BLOCK
    assert cache.clear() == 1 and len(cache) == 0
