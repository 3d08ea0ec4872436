"""The request records' transition table, on its own."""

from __future__ import annotations

import pytest

from pmk.core.packet_cache import HeldPacket
from pmk.core.requests import COUNTERS, HOLDS_SLOT, TRANSITIONS, RequestTable, State, Step
from pmk.packet.captured import CapturedPacket
from pmk.verdicts import ConnKey


def held(packet_id: int) -> HeldPacket:
    return HeldPacket(packet_id, CapturedPacket(b"", outbound=True), ConnKey(17, b"\1" * 4, packet_id, b"\2" * 4, 53))


def test_every_counter_the_table_names_is_reported_and_terminal_states_have_no_way_out() -> None:
    named = {name for _, counted in TRANSITIONS.values() for name in counted}
    assert named <= set(COUNTERS)
    assert set(COUNTERS) - named == set()  # late answers to forgotten requests also count as late_verdicts
    for state in (State.ANSWERED, State.EXPIRED, State.FORGOTTEN):
        assert not [step for (start, step) in TRANSITIONS if start is state]


def test_a_step_the_table_does_not_allow_is_refused() -> None:
    table = RequestTable(timeout=1.0, max_in_flight=2, msgid_limit=2**32)
    request = table.new(held(1), now=0.0)
    with pytest.raises(KeyError):
        table.step(request, Step.ANSWER)  # never sent


def test_slots_follow_the_state_and_a_withdrawn_request_keeps_its_slot() -> None:
    table = RequestTable(timeout=1.0, max_in_flight=1, msgid_limit=2**32)
    table.add_decider(7)
    request = table.new(held(1), now=0.0)
    msgid = table.assign(request, 7)
    assert request.state is State.SENT and table.by_msgid(msgid) is request and not table.has_room(7)
    table.step(request, Step.WITHDRAW)
    assert request.state in HOLDS_SLOT and not table.has_room(7) and table.wanted(1) is None
    assert table.in_flight() == 0 and table.withdrawn_in_flight() == 1
    table.step(request, Step.ANSWER)
    assert table.has_room(7) and table.counters["late_verdicts"] == 1 and table.by_msgid(msgid) is None


def test_deadlines_come_in_order_and_moved_requests_are_skipped() -> None:
    table = RequestTable(timeout=1.0, max_in_flight=4, msgid_limit=2**32)
    table.add_decider(7)
    first, second = table.new(held(1), now=0.0), table.new(held(2), now=0.5)
    table.assign(first, 7)
    table.step(second, Step.PARK)
    assert table.next_deadline() == 1.0
    table.step(first, Step.ANSWER)
    assert table.next_deadline() == 1.5 and table.expired(now=1.2) == []
    assert table.expired(now=1.5) == [second]


def test_msgids_are_unique_among_outstanding_requests_across_a_wrap() -> None:
    table = RequestTable(timeout=1.0, max_in_flight=8, msgid_limit=4)
    table.add_decider(7)
    requests = [table.new(held(i), now=0.0) for i in range(4)]
    ids = [table.assign(r, 7) for r in requests[:3]]
    table.step(requests[1], Step.ANSWER)
    assert ids == [0, 1, 2] and table.assign(requests[3], 7) == 3
    again = table.new(held(9), now=0.0)
    assert table.assign(again, 7) == 1  # 0 is still outstanding, 1 was answered
