"""Verdict cache (LRU) and dispatcher bookkeeping."""

from __future__ import annotations

from pmk.core.dispatch import Dispatcher
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
    entry.packets = 7
    again = cache.put(key(1), Verdict.BLOCK)
    assert again is entry and again.packets == 7 and again.verdict is Verdict.BLOCK
    assert cache.clear() == 1 and len(cache) == 0


def test_dispatcher_picks_the_least_loaded_decider() -> None:
    dispatcher = Dispatcher(timeout=1.0)
    assert dispatcher.pick() is None
    dispatcher.add_decider(1)
    dispatcher.add_decider(2)
    dispatcher.assign(100, 1, msgid=0, now=0.0)
    assert dispatcher.pick() == 2
    dispatcher.assign(101, 2, msgid=0, now=0.0)
    dispatcher.assign(102, 2, msgid=1, now=0.0)
    assert dispatcher.pick() == 1


def test_dispatcher_expires_in_deadline_order_and_skips_answered() -> None:
    dispatcher = Dispatcher(timeout=1.0)
    dispatcher.add_decider(1)
    dispatcher.assign(100, 1, msgid=0, now=0.0)
    dispatcher.assign(101, 1, msgid=1, now=0.5)
    assert dispatcher.complete(100) is not None
    assert dispatcher.expired(now=1.2) == []
    due = dispatcher.expired(now=1.6)
    assert [pid for pid, _ in due] == [101]
    assert dispatcher.next_deadline() is None and dispatcher.in_flight() == 0


def test_a_reassigned_request_keeps_only_its_new_deadline() -> None:
    dispatcher = Dispatcher(timeout=1.0)
    dispatcher.add_decider(1)
    dispatcher.add_decider(2)
    dispatcher.assign(100, 1, msgid=5, now=0.0)
    assert dispatcher.remove_decider(1) == [100]
    dispatcher.assign(100, 2, msgid=5, now=0.8)
    assert dispatcher.expired(now=1.1) == []  # the old deadline is stale
    assert [pid for pid, _ in dispatcher.expired(now=1.9)] == [100]


def test_asks_beyond_a_deciders_room_are_parked_oldest_first() -> None:
    dispatcher = Dispatcher(timeout=1.0, max_in_flight=1)
    dispatcher.add_decider(1)
    assert dispatcher.has_room(1)
    dispatcher.assign(100, 1, msgid=0, now=0.0)
    assert not dispatcher.has_room(1)
    dispatcher.wait(101, now=0.1)
    dispatcher.wait(102, now=0.2)
    assert dispatcher.unpark(102) and not dispatcher.unpark(102)
    dispatcher.wait(103, now=0.3)
    assert dispatcher.next_deadline() == 1.0
    dispatcher.complete(100)
    assert dispatcher.has_room(1)
    assert dispatcher.next_waiting() == (101, 1.1)
    # A parked ask that outlives its deadline expires like a sent request.
    assert dispatcher.expired_waiting(now=1.2) == []
    assert dispatcher.expired_waiting(now=1.3) == [103]
    assert dispatcher.waiting() == 0


def test_a_withdrawn_request_keeps_its_slot_until_answered_or_expired() -> None:
    dispatcher = Dispatcher(timeout=1.0, max_in_flight=1)
    dispatcher.add_decider(1)
    dispatcher.assign(100, 1, msgid=7, now=0.0)
    assert dispatcher.withdraw(100) is not None
    assert dispatcher.owner(100) is None and dispatcher.in_flight() == 0
    assert not dispatcher.has_room(1)  # the decider is still busy with it
    assert dispatcher.settle_withdrawn(1, 7) and dispatcher.has_room(1)
    assert not dispatcher.settle_withdrawn(1, 7)
    dispatcher.assign(101, 1, msgid=8, now=0.5)
    dispatcher.withdraw(101)
    due = dispatcher.expired(now=1.6)
    assert [(pid, a.msgid) for pid, a in due] == [(None, 8)]
    assert dispatcher.has_room(1) and dispatcher.withdrawn_in_flight() == 0


def test_youngest_parked_ask_can_go_first_and_deadlines_still_expire_in_order() -> None:
    dispatcher = Dispatcher(timeout=1.0, max_in_flight=3)
    dispatcher.add_decider(1)
    for packet_id, now in ((101, 0.1), (102, 0.2), (103, 0.3)):
        dispatcher.wait(packet_id, now)
    young = dispatcher.next_waiting(newest=True)
    old = dispatcher.next_waiting()
    assert young == (103, 1.3) and old == (101, 1.1)
    # Sent youngest first, they must still expire by their own deadlines.
    dispatcher.assign(103, 1, msgid=0, now=0.4, deadline=young[1])
    dispatcher.assign(101, 1, msgid=1, now=0.5, deadline=old[1])
    assert [pid for pid, _ in dispatcher.expired(now=1.2)] == [101]
    assert [pid for pid, _ in dispatcher.expired(now=1.3)] == [103]
    assert dispatcher.expired_waiting(now=1.2) == [102]
