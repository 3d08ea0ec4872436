"""Verdict cache (LRU) bookkeeping."""

from __future__ import annotations

from pmk.core.attribution import Owner
from pmk.core.verdict_cache import EVICT_FRACTION, VerdictCache
from pmk.verdicts import ConnKey, Verdict


def key(port: int) -> ConnKey:
    return ConnKey(6, b"\x01\x02\x03\x04", port, b"\x05\x06\x07\x08", 80)


def test_verdict_cache_evicts_the_least_recently_used() -> None:
    cache = VerdictCache(2)
    cache.put(key(1), Verdict.ACCEPT)
    cache.put(key(2), Verdict.BLOCK)
    cache.now = 1.0
    assert cache.get(key(1)) is not None  # 1 is now the most recent
    cache.put(key(3), Verdict.DROP)
    assert key(2) not in cache and key(1) in cache and key(3) in cache
    assert cache.evictions == 1


def test_a_large_full_cache_evicts_its_least_recently_used_in_batches() -> None:
    cache = VerdictCache(2 * EVICT_FRACTION)  # batches of 2
    for port in range(2 * EVICT_FRACTION):
        cache.put(key(port), Verdict.ACCEPT)
    cache.put(key(60000), Verdict.ACCEPT)
    assert key(0) not in cache and key(1) not in cache and key(2) in cache and key(60000) in cache
    assert cache.evictions == 2 and len(cache) == 2 * EVICT_FRACTION - 1
    cache.put(key(60001), Verdict.ACCEPT)  # room was made: no eviction
    assert cache.evictions == 2 and len(cache) == cache.capacity


def test_a_lookup_at_the_time_an_entry_was_last_seen_leaves_it_in_place() -> None:
    cache = VerdictCache(2)
    cache.put(key(1), Verdict.ACCEPT)
    cache.put(key(2), Verdict.BLOCK)
    assert cache.get(key(1)) is not None  # seen at 0.0 already: 1 and 2 are of one time
    cache.put(key(3), Verdict.DROP)
    assert key(1) not in cache and key(2) in cache and key(3) in cache


def test_entries_are_kept_in_the_packed_form_and_handed_out_as_keys() -> None:
    cache = VerdictCache(4)
    cache.put(key(1), Verdict.ACCEPT)
    cache.now = 1.0
    assert cache.get(key(1).packed()) is cache.peek(key(1)) is not None  # the per-packet path's form
    assert all(type(k) is bytes for k in cache._entries)
    ((listed, _),) = cache.oldest()
    assert type(listed) is ConnKey and listed == key(1) and listed.local_port == 1


def test_verdict_cache_update_keeps_counters() -> None:
    cache = VerdictCache(4)
    entry = cache.put(key(1), Verdict.ACCEPT)
    entry.packets_in = 7
    again = cache.put(key(1), Verdict.BLOCK)
    assert again is entry and again.packets_in == 7 and again.verdict is Verdict.BLOCK
    assert cache.clear() == 1 and len(cache) == 0


def test_entries_with_the_same_decider_and_owner_share_one_facts_object() -> None:
    cache = VerdictCache(4)
    first, second = cache.put(key(1), Verdict.ACCEPT), cache.put(key(2), Verdict.ACCEPT)
    # equal owners from two lookups (each lookup makes its own object): one is kept
    first.decided("decider", "d", Owner(4000, "/usr/bin/app", 1000))
    second.decided("decider", "d", Owner(4000, "/usr/bin/app", 1000))
    assert first.facts is second.facts and first.owner is second.owner
    second.fin_in = True
    assert first.facts is not second.facts and not first.fin_in and second.fin_in
    assert (second.by, second.name, second.owner) == ("decider", "d", first.owner)
