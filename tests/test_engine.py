"""The decision path as playbooks: these packets in, these commands out."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmk.core.engine import Engine
from pmk.packet.captured import CapturedPacket
from pmk.verdicts import Verdict
from tests.packets import tcp, udp

A, B = "198.18.0.1", "198.18.0.2"


def inbound(raw: bytes) -> CapturedPacket:
    return CapturedPacket(raw, outbound=False)


def conn(port: int) -> CapturedPacket:
    """An inbound UDP packet of connection ``port``."""
    return inbound(udp(A, B, port, 53))


def make(packet_cache_size: int = 1024, verdict_cache_size: int = 65536) -> Engine:
    return Engine(packet_cache_size=packet_cache_size, verdict_cache_size=verdict_cache_size)


def assert_identity(engine: Engine) -> None:
    c = engine.counters
    assert c.captured == c.accepted + c.blocked + c.dropped + c.rerouted + c.evicted + engine.pending


def test_first_packet_is_held_and_asked_about() -> None:
    engine = make()
    engine.on_packets([conn(1000)])
    work = engine.outbox.take()
    assert [h.id for h in work.asks] == [1]
    assert work.applies == []
    assert engine.pending == 1
    assert_identity(engine)


def test_packets_of_a_pending_connection_wait_behind_one_request() -> None:
    engine = make()
    engine.on_packets([conn(1000), conn(1000), conn(1000)])
    work = engine.outbox.take()
    assert len(work.asks) == 1
    assert engine.pending == 3


def test_permanent_verdict_settles_the_queue_and_later_packets_hit_the_cache() -> None:
    engine = make()
    first, second = conn(1000), conn(1000)
    engine.on_packets([first, second])
    engine.outbox.take()
    assert engine.on_verdict(1, Verdict.ACCEPT, permanent=True)
    work = engine.outbox.take()
    assert work.applies == [([first, second], Verdict.ACCEPT, True, None)]
    later = conn(1000)
    engine.on_packets([later])
    work = engine.outbox.take()
    assert work.asks == [] and work.applies == [([later], Verdict.ACCEPT, False, None)]
    assert engine.counters.cache_hits == 1 and engine.counters.accepted == 3
    assert_identity(engine)


def test_reply_direction_shares_the_cached_verdict() -> None:
    engine = make()
    engine.on_packets([inbound(tcp(A, B, 40000, 80))])
    engine.outbox.take()
    engine.on_verdict(1, Verdict.BLOCK, permanent=True)
    engine.outbox.take()
    reply = CapturedPacket(tcp(B, A, 80, 40000), outbound=True)
    engine.on_packets([reply])
    assert engine.outbox.take().applies == [([reply], Verdict.BLOCK, False, None)]


def test_temporary_verdict_answers_one_packet_and_asks_about_the_next() -> None:
    engine = make()
    first, second = conn(1000), conn(1000)
    engine.on_packets([first, second])
    engine.outbox.take()
    engine.on_verdict(1, Verdict.DROP, permanent=False)
    work = engine.outbox.take()
    assert work.applies == [([first], Verdict.DROP, False, None)]
    assert [h.id for h in work.asks] == [2]
    assert len(engine.verdicts) == 0
    assert_identity(engine)


def test_full_packet_cache_evicts_the_oldest_and_withdraws_its_request() -> None:
    engine = make(packet_cache_size=4)
    packets = [conn(1000 + i) for i in range(4)]
    engine.on_packets(packets)
    engine.outbox.take()
    newcomer = conn(2000)
    engine.on_packets([newcomer])
    work = engine.outbox.take()
    assert work.applies == [([packets[0]], Verdict.DROP, False, None)]
    assert [h.id for h in work.withdrawn] == [1]
    assert [h.id for h in work.asks] == [5]
    assert engine.counters.evicted == 1 and engine.counters.dropped == 0
    assert not engine.on_verdict(1, Verdict.ACCEPT, permanent=True)  # gone
    assert_identity(engine)


def test_evicting_a_connections_head_asks_about_its_next_packet() -> None:
    engine = make(packet_cache_size=2)
    engine.on_packets([conn(1000), conn(1000)])
    engine.outbox.take()
    engine.on_packets([conn(3000)])
    work = engine.outbox.take()
    assert [h.id for h in work.withdrawn] == [1]
    assert sorted(h.id for h in work.asks) == [2, 3]


def test_a_temporary_policy_verdict_is_counted_as_defaulted_and_never_cached() -> None:
    engine = make()
    engine.on_packets([conn(1000)])
    engine.outbox.take()
    assert engine.on_verdict(1, Verdict.BLOCK, False, defaulted=True)
    work = engine.outbox.take()
    assert work.applies[0][1] is Verdict.BLOCK and work.applies[0][2] is False
    assert engine.counters.defaulted == 1 and engine.counters.blocked == 1
    assert len(engine.verdicts) == 0


def test_a_permanent_policy_verdict_is_cached_and_settles_the_connection() -> None:
    engine = make()
    engine.on_packets([conn(1000), conn(1000)])
    engine.outbox.take()
    assert engine.on_verdict(1, Verdict.DROP, True, defaulted=True)
    assert engine.outbox.take().applies[0][1:] == (Verdict.DROP, True, None)
    assert engine.counters.defaulted == 2 and len(engine.verdicts) == 1
    assert_identity(engine)


def test_an_unparseable_packet_is_handed_out_for_the_policy() -> None:
    engine = make()
    garbage = inbound(b"\x00garbage")
    engine.on_packets([garbage])
    assert engine.outbox.take().unparsed == [garbage]
    assert engine.pending == 0 and engine.counters.unparsed == 1
    engine.settle_unparsed([garbage], Verdict.DROP)
    assert engine.counters.dropped == 1 and engine.counters.defaulted == 1
    assert_identity(engine)


def test_update_verdict_settles_waiting_packets_and_withdraws_the_request() -> None:
    engine = make()
    packet = conn(1000)
    engine.on_packets([packet])
    engine.outbox.take()
    key = engine.held.get(1).key  # type: ignore[union-attr]
    engine.update_verdict(key, Verdict.BLOCK)
    work = engine.outbox.take()
    assert work.applies == [([packet], Verdict.BLOCK, True, None)]
    assert [h.id for h in work.withdrawn] == [1]
    assert engine.verdicts.get(key).verdict is Verdict.BLOCK  # type: ignore[union-attr]


def test_clear_cache_returns_the_count_and_next_packet_is_asked_again() -> None:
    engine = make()
    engine.on_packets([conn(1000)])
    engine.on_verdict(1, Verdict.ACCEPT, permanent=True)
    assert engine.clear_cache() == 1
    engine.outbox.take()
    engine.on_packets([conn(1000)])
    assert len(engine.outbox.take().asks) == 1


def test_shutdown_releases_every_held_packet_for_the_policy() -> None:
    engine = make()
    engine.on_packets([conn(1), conn(1), conn(2)])
    engine.outbox.take()
    released = engine.release_all()
    assert [h.id for h in released] == [1, 2, 3]
    engine.settle_released(released, Verdict.DROP)
    assert engine.pending == 0 and engine.counters.dropped == 3 and engine.counters.defaulted == 3
    assert_identity(engine)


# One step of a random life: packets of a few connections arrive, verdicts and
# defaults come for any id (gone or not), caches get cleared.
step = st.one_of(
    st.tuples(st.just("packets"), st.lists(st.integers(0, 5), min_size=1, max_size=6)),
    st.tuples(st.just("verdict"), st.integers(1, 40), st.sampled_from(list(Verdict)), st.booleans()),
    st.tuples(st.just("default"), st.integers(1, 40), st.booleans()),
    st.tuples(st.just("clear")),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(step, max_size=40), st.integers(1, 6))
def test_the_accounting_identity_holds_after_any_sequence(steps: list[tuple], capacity: int) -> None:
    engine = make(packet_cache_size=capacity, verdict_cache_size=3)
    outcomes = 0
    for action in steps:
        if action[0] == "packets":
            engine.on_packets([conn(1000 + c) for c in action[1]])
        elif action[0] == "verdict":
            engine.on_verdict(action[1], action[2], action[3])
        elif action[0] == "default":
            engine.on_verdict(action[1], Verdict.BLOCK, action[2], defaulted=True)
        else:
            engine.clear_cache()
        work = engine.outbox.take()
        outcomes += sum(len(packets) for packets, _, _, _ in work.applies)
        assert_identity(engine)
        # At most one request outstanding per waiting connection.
        asked = [w.asked for w in engine.held.connections.values()]
        assert all(a is not None for a in asked)
    # Every settled packet was handed to the backend exactly once.
    c = engine.counters
    assert outcomes == c.accepted + c.blocked + c.dropped + c.rerouted + c.evicted


@pytest.mark.parametrize("size", [0, -1])
def test_caches_refuse_a_size_below_one(size: int) -> None:
    with pytest.raises(ValueError):
        make(packet_cache_size=size)
    with pytest.raises(ValueError):
        make(verdict_cache_size=size)


def test_whole_batch_fast_path_counts_only_when_every_run_is_accepted() -> None:
    engine = make()
    engine.on_packets([conn(1000), conn(2000)])
    accepted_key, blocked_key = (engine.held.get(i).key.packed() for i in (1, 2))  # type: ignore[union-attr]
    engine.on_verdict(1, Verdict.ACCEPT, permanent=True)
    engine.on_verdict(2, Verdict.BLOCK, permanent=True)
    engine.outbox.take()
    before = engine.counters.as_dict()
    # A run of a blocked connection spoils the batch: nothing is counted.
    assert not engine.accept_cached([(accepted_key, 3, 300, False), (blocked_key, 1, 100, False)])  # type: ignore[list-item]
    assert engine.counters.as_dict() == before
    assert engine.accept_cached([(accepted_key, 3, 300, False), (accepted_key, 2, 120, True)])  # type: ignore[list-item]
    c = engine.counters
    assert (c.captured, c.cache_hits, c.accepted) == (
        before["captured"] + 5,
        before["cache_hits"] + 5,
        before["accepted"] + 5,
    )
    entry = engine.verdicts.get(accepted_key)  # type: ignore[arg-type]
    assert entry is not None and entry.counters() == (3, 2, 300, 120)
    assert_identity(engine)


def test_per_connection_counters_survive_an_interleaved_miss() -> None:
    engine = make()
    engine.on_packets([conn(1000), conn(2000)])
    first, second = (engine.held.get(i).key for i in (1, 2))  # type: ignore[union-attr]
    engine.on_verdict(1, Verdict.ACCEPT, permanent=True)
    engine.on_verdict(2, Verdict.ACCEPT, permanent=True)
    engine.outbox.take()
    hits_before = engine.counters.cache_hits
    # Two hits of one connection, an IPv6 packet of a new one, a hit of another.
    engine.on_packets([conn(1000), conn(1000), inbound(udp("fd00::1", "fd00::2", 5, 53)), conn(2000)])
    assert engine.verdicts.get(first).packets_in == 2  # type: ignore[union-attr]
    assert engine.verdicts.get(second).packets_in == 1  # type: ignore[union-attr]
    assert engine.counters.cache_hits == hits_before + 3 and engine.counters.cache_misses == 3
    assert_identity(engine)
