"""The connection's life as playbooks on a fake clock: ends, list_connections, bandwidth.

Divert (every packet seen): a connection ends at FINs both ways plus the
linger, at a reset, or when idle; nfqueue: the kernel reports ends
(ConnectionsEnded) and bandwidth comes from kernel dumps (MeasureTraffic).
"""

from __future__ import annotations

from typing import Any

import pytest

from pmk.config import REDIRECT_LINGER
from pmk.core import commands as cmd
from pmk.core import events as ev
from pmk.core.lifecycle import ENDS_PER_SWEEP, record
from pmk.core.policy import default_only
from pmk.core.service import Service
from pmk.core.verdict_cache import VerdictCache
from pmk.packet.captured import CapturedPacket
from pmk.rpc.messages import ErrorCode
from pmk.rpc.names import BANDWIDTH, CONNECTION_END
from pmk.testing.fakes import FakeBackend
from pmk.verdicts import ConnKey, Target, Verdict
from tests.packets import ACK, FIN, RST, SYN, tcp, udp
from tests.test_service import A, B, hello, of

IDLE = 30.0
LOCAL = bytes([198, 18, 0, 2])
REMOTE = bytes([198, 18, 0, 1])


def make(*, kernel: bool = False, idle: float = IDLE) -> Service:
    return Service(
        backend=FakeBackend(kernel),
        policy=default_only(Verdict.DROP),
        packet_cache=4096,
        verdict_cache=65536,
        verdict_timeout=2.0,
        max_in_flight=4096,
        started=0.0,
        idle_timeout=idle,
    )


def tcp_in(port: int, flags: int = ACK, data: bytes = b"") -> CapturedPacket:
    """A TCP packet from the remote A:port to the local B:80."""
    return CapturedPacket(tcp(A, B, port, 80, flags=flags, data=data), outbound=False)


def tcp_out(port: int, flags: int = ACK, data: bytes = b"") -> CapturedPacket:
    return CapturedPacket(tcp(B, A, 80, port, flags=flags, data=data), outbound=True)


def udp_in(port: int, data: bytes = b"hello") -> CapturedPacket:
    return CapturedPacket(udp(A, B, port, 53, data), outbound=False)


def tcp_key(port: int) -> ConnKey:
    return ConnKey(6, LOCAL, 80, REMOTE, port)


def udp_key(port: int) -> ConnKey:
    return ConnKey(17, LOCAL, 53, REMOTE, port)


def with_clients(svc: Service) -> None:
    """Client 1 a decider "d", client 2 an observer, client 3 connected without hello."""
    svc.handle_all(
        [ev.ClientJoined(1), hello(1, name="d"), ev.ClientJoined(2), hello(2, "observer", "o"), ev.ClientJoined(3)],
        now=0.0,
    )


def decide(svc: Service, packet: CapturedPacket, verdict: str = "accept", now: float = 0.0) -> None:
    """The packet's connection, asked about and answered permanently by client 1."""
    out = svc.handle(ev.PacketsCaptured([packet]), now)
    (ask,) = of(cmd.SendDecide, out)
    svc.handle(ev.DecideAnswered(ask.client, ask.msgid, None, {"verdict": verdict, "permanent": True}), now)


def ends(out: list[cmd.Command]) -> dict[int, list[dict[str, Any]]]:
    """connection_end records by client."""
    got: dict[int, list[dict[str, Any]]] = {}
    for note in of(cmd.Notify, out):
        if note.method == CONNECTION_END:
            got.setdefault(note.client, []).append(note.params[0])
    return got


def bandwidth(out: list[cmd.Command], client: int) -> list[list[dict[str, Any]]]:
    return [n.params[0] for n in of(cmd.Notify, out) if n.method == BANDWIDTH and n.client == client]


def life_timer(out: list[cmd.Command]) -> float:
    (armed,) = of(cmd.ArmLifeTimer, out)
    return float(armed.at)


def test_fins_both_ways_end_the_connection_after_the_linger_with_its_record_to_every_greeted_client() -> None:
    svc = make()
    with_clients(svc)
    decide(svc, tcp_in(5000, SYN))
    svc.handle(ev.PacketsCaptured([tcp_in(5000, data=b"x" * 100), tcp_out(5000, data=b"y" * 10)]), now=1.0)
    svc.handle(ev.PacketsCaptured([tcp_out(5000, FIN | ACK)]), now=2.0)
    out = svc.handle(ev.PacketsCaptured([tcp_in(5000, FIN | ACK), tcp_out(5000)]), now=3.0)
    assert ends(out) == {}
    assert of(cmd.Apply, out)[0].verdict is Verdict.ACCEPT  # the closing packets still pass
    assert ends(svc.handle(ev.LifeTick(), now=3.0 + REDIRECT_LINGER - 0.1)) == {}
    out = svc.handle(ev.LifeTick(), now=3.0 + REDIRECT_LINGER)
    got = ends(out)
    assert sorted(got) == [1, 2]  # not client 3: it never said hello
    (record,) = got[1]
    assert got[2] == [record]
    assert record == {
        "protocol": 6,
        "local_ip": B,
        "local_port": 80,
        "remote_ip": A,
        "remote_port": 5000,
        "verdict": "accept",
        "by": "decider",
        "name": "d",
        "pid": None,
        "process": None,
        "uid": None,
        # after the decision: data in, FIN in; data out, FIN out, the last ACK
        "packets_in": 2,
        "packets_out": 3,
        "bytes_in": 2 * 40 + 100,
        "bytes_out": 3 * 40 + 10,
        "age": 3.0 + REDIRECT_LINGER,
        "reason": "closed",
    }
    assert svc.stats(now=20.0)["verdict_cache_entries"] == 0
    # The same ports again: a new connection, asked about anew.
    assert len(of(cmd.SendDecide, svc.handle(ev.PacketsCaptured([tcp_in(5000, SYN)]), now=20.0))) == 1


def test_one_fin_is_no_end() -> None:
    svc = make()
    with_clients(svc)
    decide(svc, tcp_in(5001, SYN))
    svc.handle(ev.PacketsCaptured([tcp_out(5001, FIN | ACK), tcp_out(5001, FIN | ACK)]), now=1.0)
    assert ends(svc.handle(ev.LifeTick(), now=1.0 + REDIRECT_LINGER + 1)) == {}
    assert tcp_key(5001) in svc.engine.verdicts


def test_connections_that_leave_the_cache_otherwise_get_no_end() -> None:
    svc = make()
    with_clients(svc)
    decide(svc, tcp_in(5006, SYN))
    svc.handle(ev.PacketsCaptured([tcp_out(5006, FIN | ACK), tcp_in(5006, FIN | ACK)]), now=1.0)
    out = svc.handle(ev.ClientRequest(2, 4, "clear_cache", []), now=2.0)
    assert [r.result for r in of(cmd.Reply, out)] == [1]
    assert ends(svc.handle(ev.LifeTick(), now=1.0 + REDIRECT_LINGER)) == {}
    # Re-decided under the same key after the close: the new connection is not ended by the old close.
    decide(svc, tcp_in(5006, SYN), now=3.0)
    assert ends(svc.handle(ev.LifeTick(), now=3.0 + REDIRECT_LINGER)) == {}
    assert tcp_key(5006) in svc.engine.verdicts


def test_a_reset_ends_the_connection_at_once_after_it_passed() -> None:
    svc = make()
    with_clients(svc)
    decide(svc, tcp_in(5002, SYN), verdict="accept")
    out = svc.handle(ev.PacketsCaptured([tcp_in(5002, data=b"abc"), tcp_in(5002, RST | ACK), tcp_in(5002, RST)]), 4.0)
    assert [(len(a.packets), a.verdict) for a in of(cmd.Apply, out)] == [(3, Verdict.ACCEPT)]
    (record,) = ends(out)[2]  # once, though two resets came
    assert (record["reason"], record["packets_in"], record["packets_out"], record["age"]) == ("closed", 3, 0, 4.0)
    assert tcp_key(5002) not in svc.engine.verdicts


def test_idle_connections_end_after_the_idle_timeout_counted_from_their_last_packet() -> None:
    svc = make()
    with_clients(svc)
    decide(svc, udp_in(6000))
    decide(svc, udp_in(6001), verdict="block")
    svc.handle(ev.PacketsCaptured([udp_in(6001, b"later")]), now=10.0)
    out = svc.handle(ev.LifeTick(), now=IDLE - 0.5)
    assert ends(out) == {}
    assert svc._life_at is not None and svc._life_at <= IDLE  # sweeps keep coming while entries are cached
    got = ends(svc.handle(ev.LifeTick(), now=IDLE))[1]
    assert [(r["remote_port"], r["reason"], r["verdict"]) for r in got] == [(6000, "idle", "accept")]
    got = ends(svc.handle(ev.LifeTick(), now=10.0 + IDLE))[1]
    assert [(r["remote_port"], r["reason"], r["verdict"], r["packets_in"]) for r in got] == [(6001, "idle", "block", 1)]
    assert svc.stats(now=50.0)["verdict_cache_entries"] == 0
    assert of(cmd.ArmLifeTimer, svc.handle(ev.LifeTick(), now=50.0)) == []  # nothing cached: no sweeps


def test_a_sweep_ends_a_bounded_number_and_the_rest_at_once_after() -> None:
    svc = make()
    count = ENDS_PER_SWEEP + 10
    svc.handle(ev.Preaccept(tuple(udp_key(port) for port in range(1, count + 1))), now=0.0)
    first = svc.handle(ev.LifeTick(), now=IDLE + 1)
    assert len(svc.engine.verdicts) == 10
    assert life_timer(first) == IDLE + 1  # the backlog: again at once
    svc.handle(ev.LifeTick(), now=IDLE + 1)
    assert len(svc.engine.verdicts) == 0


def test_the_kernel_reports_ends_with_its_counters() -> None:
    svc = make(kernel=True)
    with_clients(svc)
    decide(svc, tcp_in(5003, SYN), verdict="block")
    ended = ((tcp_key(5003), (4, 5, 400, 500), (0.1, 2.4)), (tcp_key(9), (1, 1, 1, 1), None))
    out = svc.handle(ev.ConnectionsEnded(ended), 2.5)
    (record,) = ends(out)[1]
    assert record["reason"] == "destroyed" and record["verdict"] == "block" and record["age"] == 2.5
    assert [record[k] for k in ("packets_in", "packets_out", "bytes_in", "bytes_out")] == [4, 5, 400, 500]
    assert svc.stats(now=3.0)["verdict_cache_entries"] == 0
    # No idle sweeps where the kernel keeps the connections.
    assert of(cmd.ArmLifeTimer, out) == [] and ends(svc.handle(ev.LifeTick(), now=1e6)) == {}


def test_a_late_end_of_an_older_connection_is_told_and_leaves_the_newer_ones_verdict() -> None:
    """The kernel dropped a connection at 4.0 and its end is read at 6.0, after a new one with the
    same ports came through the cache at 5.0: that one keeps the entry and gets its own end later."""
    svc = make(kernel=True)
    with_clients(svc)
    decide(svc, tcp_in(5005, SYN), now=1.0)
    out = svc.handle(ev.PacketsCaptured([tcp_in(5005, SYN)]), now=5.0)  # no mark in the kernel: from the cache
    assert of(cmd.Apply, out)[0].verdict is Verdict.ACCEPT and of(cmd.SendDecide, out) == []
    out = svc.handle(ev.ConnectionsEnded(((tcp_key(5005), (3, 4, 300, 400), (1.0, 4.0)),)), now=6.0)
    (old,) = ends(out)[1]
    assert (old["reason"], old["verdict"], old["age"], old["packets_in"], old["bytes_out"]) == (
        "destroyed",
        "accept",
        3.0,
        3,
        400,
    )
    assert svc.stats(now=6.0)["verdict_cache_entries"] == 1
    (read,) = of(cmd.ReadTotals, svc.handle(ev.ClientRequest(2, 7, "list_connections", []), now=7.0))
    (reply,) = of(cmd.Reply, svc.handle(ev.TotalsRead(read.op, {}), now=7.0))
    assert [(r["remote_port"], r["age"]) for r in reply.result["connections"]] == [(5005, 2.0)]
    out = svc.handle(ev.ConnectionsEnded(((tcp_key(5005), (1, 1, 60, 60), (5.0, 8.0)),)), now=8.5)
    (new,) = ends(out)[1]
    assert (new["age"], new["packets_in"]) == (3.5, 1)
    assert svc.stats(now=9.0)["verdict_cache_entries"] == 0


def test_an_end_without_timestamps_ends_whatever_is_cached_under_its_key() -> None:
    """A kernel without conntrack timestamps: no way to tell an older connection's end from the newer one's."""
    svc = make(kernel=True)
    with_clients(svc)
    decide(svc, tcp_in(5006, SYN), now=1.0)
    svc.handle(ev.PacketsCaptured([tcp_in(5006, SYN)]), now=5.0)
    (record,) = ends(svc.handle(ev.ConnectionsEnded(((tcp_key(5006), (3, 4, 300, 400), None),)), now=6.0))[1]
    assert record["age"] == 1.0 and svc.stats(now=6.0)["verdict_cache_entries"] == 0


def list_call(svc: Service, *params: Any, now: float = 5.0) -> cmd.Reply | cmd.ReplyError:
    (reply,) = [c for c in svc.handle(ev.ClientRequest(2, 7, "list_connections", list(params)), now) if c.client == 2]
    assert isinstance(reply, cmd.Reply | cmd.ReplyError)
    return reply


def test_list_connections_pages_through_the_cache_least_recently_active_first() -> None:
    svc = make()
    with_clients(svc)
    for port in (7001, 7002, 7003):
        decide(svc, udp_in(port), now=float(port - 7000))
    svc.handle(ev.Preaccept((udp_key(7004),)), now=4.0)
    svc.handle(ev.PacketsCaptured([udp_in(7001, b"again")]), now=4.5)  # 7001 is now the most recent
    whole = list_call(svc)
    assert isinstance(whole, cmd.Reply) and whole.result["total"] == 4
    records = whole.result["connections"]
    assert [r["remote_port"] for r in records] == [7002, 7003, 7004, 7001]
    assert [(r["by"], r["name"], r["age"]) for r in records[1:3]] == [("decider", "d", 2.0), ("existing", "", 1.0)]
    assert (records[3]["packets_in"], records[3]["bytes_in"]) == (1, 20 + 8 + 5)
    page = list_call(svc, {"offset": 1, "limit": 2})
    assert isinstance(page, cmd.Reply) and [r["remote_port"] for r in page.result["connections"]] == [7003, 7004]
    assert page.result["total"] == 4
    assert list_call(svc, {"offset": 9}).result == {"total": 4, "connections": []}  # type: ignore[union-attr]


def test_on_the_kernel_fast_path_list_connections_answers_with_the_kernels_counters() -> None:
    svc = make(kernel=True)
    with_clients(svc)
    decide(svc, tcp_in(5004, SYN))
    decide(svc, tcp_in(5005, SYN), verdict="drop")
    out = svc.handle(ev.ClientRequest(2, 7, "list_connections", [{"limit": 1}]), now=3.0)
    (read,) = of(cmd.ReadTotals, out)
    assert of(cmd.Reply, out) == []  # the answer waits for the kernel
    out = svc.handle(ev.TotalsRead(read.op, {tcp_key(5004): (3, 4, 300, 400), tcp_key(9): (1, 1, 1, 1)}), now=3.5)
    (reply,) = of(cmd.Reply, out)
    assert (reply.client, reply.msgid, reply.result["total"]) == (2, 7, 2)
    (record,) = reply.result["connections"]
    assert [record[k] for k in ("remote_port", "packets_in", "packets_out", "bytes_in", "bytes_out")] == [
        5004,
        3,
        4,
        300,
        400,
    ]
    # A failed read still answers, with pmk's own counters (0: the kernel carried the packets).
    (read,) = of(cmd.ReadTotals, svc.handle(ev.ClientRequest(2, 8, "list_connections", []), now=4.0))
    (reply,) = of(cmd.Reply, svc.handle(ev.TotalsRead(read.op, None), now=4.1))
    assert [(r["remote_port"], r["bytes_in"]) for r in reply.result["connections"]] == [(5004, 0), (5005, 0)]


@pytest.mark.parametrize(
    "params", [[{"limit": 1001}], [{"offset": -1}], [{"limit": "10"}], [[]], [{}, {}], [{"offset": True}]]
)
def test_list_connections_refuses_bad_params(params: list[Any]) -> None:
    reply = list_call(make(), *params)
    assert isinstance(reply, cmd.ReplyError) and reply.code is ErrorCode.INVALID_PARAMS


def subscribe(svc: Service, client: int, seconds: Any, now: float = 0.0, topic: str = BANDWIDTH) -> list[cmd.Command]:
    return svc.handle(ev.ClientRequest(client, 9, "subscribe", [topic, seconds]), now)


def test_bandwidth_sends_each_subscriber_the_traffic_since_its_previous_notification() -> None:
    svc = make(idle=1000.0)
    with_clients(svc)
    decide(svc, udp_in(8001))
    decide(svc, udp_in(8002))
    svc.handle(ev.PacketsCaptured([udp_in(8001, b"before")]), now=0.5)  # before subscribing: not counted
    out = subscribe(svc, 1, 1.0, now=1.0)
    assert [r.result for r in of(cmd.Reply, out)] == [True]
    subscribe(svc, 2, 2.5, now=1.0)
    svc.handle(ev.PacketsCaptured([udp_in(8001, b"12345"), udp_in(8001, b"1")]), now=1.5)
    svc.handle(ev.PacketsCaptured([CapturedPacket(udp(B, A, 53, 8002, b"xy"), outbound=True)]), now=1.7)
    out = svc.handle(ev.LifeTick(), now=2.0)
    (notes,) = bandwidth(out, 1)
    by_port = {e["remote_port"]: e for e in notes}
    assert sorted(by_port) == [8001, 8002]
    assert [by_port[8001][k] for k in ("packets_in", "packets_out", "bytes_in", "bytes_out")] == [2, 0, 2 * 28 + 6, 0]
    assert [by_port[8002][k] for k in ("packets_in", "packets_out", "bytes_in", "bytes_out")] == [0, 1, 0, 30]
    assert by_port[8001]["local_port"] == 53 and by_port[8001]["remote_ip"] == A
    assert bandwidth(out, 2) == []  # its interval is longer
    svc.handle(ev.PacketsCaptured([udp_in(8002, b"z")]), now=2.5)
    out = svc.handle(ev.LifeTick(), now=3.0)
    assert [[e["remote_port"] for e in note] for note in bandwidth(out, 1)] == [[8002]]
    assert bandwidth(svc.handle(ev.LifeTick(), now=3.5), 2)[0] != []  # client 2: everything since 1.0
    assert bandwidth(svc.handle(ev.LifeTick(), now=4.0), 1) == [[]]  # nothing moved: [[]]
    subscribe(svc, 1, 0, now=4.1)
    svc.handle(ev.ClientLeft(2), now=4.2)
    svc.handle(ev.PacketsCaptured([udp_in(8002, b"z")]), now=4.5)
    assert bandwidth(svc.handle(ev.LifeTick(), now=10.0), 1) == []
    assert svc.bandwidth.subscribers == {}


def test_a_connection_that_ended_and_came_back_counts_from_zero() -> None:
    svc = make(idle=5.0)
    with_clients(svc)
    decide(svc, udp_in(8003))
    subscribe(svc, 1, 1.0, now=0.0)
    svc.handle(ev.PacketsCaptured([udp_in(8003, b"a" * 100)] * 3), now=0.5)
    svc.handle(ev.LifeTick(), now=1.0)
    svc.handle(ev.LifeTick(), now=7.0)  # idle: ended
    decide(svc, udp_in(8003), now=7.5)
    svc.handle(ev.PacketsCaptured([udp_in(8003, b"b")]), now=7.6)
    (note,) = bandwidth(svc.handle(ev.LifeTick(), now=8.0), 1)
    assert [(e["packets_in"], e["bytes_in"]) for e in note] == [(1, 29)]


def test_a_bandwidth_baseline_holds_the_caches_own_key_objects() -> None:
    svc = make(idle=1000.0)
    with_clients(svc)
    decide(svc, udp_in(8004))
    decide(svc, udp_in(8005))
    subscribe(svc, 1, 1.0, now=1.0)
    svc.handle(ev.PacketsCaptured([udp_in(8004, b"x")]), now=1.5)
    svc.handle(ev.LifeTick(), now=2.0)  # 8004 re-reported: its baseline key is replaced
    stored = {key: key for key, _ in svc.engine.verdicts.oldest_stored()}
    baseline = svc.bandwidth.subscribers[1].baseline
    assert len(baseline) == 2 and all(key is stored[key] for key in baseline)  # no key copies


@pytest.mark.parametrize(
    "params", [["bandwidth", 0.05], ["bandwidth", 3601], ["bandwidth", "1"], ["latency", 1], ["bandwidth", True]]
)
def test_subscribe_refuses_bad_params(params: list[Any]) -> None:
    svc = make()
    (reply,) = svc.handle(ev.ClientRequest(1, 3, "subscribe", params), now=0.0)
    assert isinstance(reply, cmd.ReplyError) and reply.code is ErrorCode.INVALID_PARAMS


def test_kernel_bandwidth_comes_from_dumps_the_first_being_the_baseline() -> None:
    svc = make(kernel=True)
    with_clients(svc)
    out = subscribe(svc, 1, 2.0, now=1.0)
    assert life_timer(out) == 1.0  # the baseline dump at once
    (measure,) = of(cmd.MeasureTraffic, svc.handle(ev.LifeTick(), now=1.0))
    assert measure == cmd.MeasureTraffic((1,), (None,))
    totals = {tcp_key(1): (1, 1, 100, 100)}
    out = svc.handle(ev.TrafficMeasured((1,), totals, ({tcp_key(1): (1, 1, 100, 100)},)), now=1.1)
    assert bandwidth(out, 1) == [] and life_timer(out) == 3.0
    (measure,) = of(cmd.MeasureTraffic, svc.handle(ev.LifeTick(), now=3.0))
    assert measure.previous == (totals,)
    # Nothing more is asked while a dump is under way.
    assert of(cmd.MeasureTraffic, svc.handle(ev.LifeTick(), now=5.5)) == []
    out = svc.handle(ev.TrafficMeasured((1,), {}, ({tcp_key(1): (2, 0, 20, 0)},)), now=5.6)
    (note,) = bandwidth(out, 1)
    assert [(e["remote_port"], e["packets_in"], e["bytes_in"]) for e in note] == [(1, 2, 20)]
    assert life_timer(out) == 5.0  # overdue: at once
    # A failed dump sends nothing; the next one is asked for as usual.
    assert len(of(cmd.MeasureTraffic, svc.handle(ev.LifeTick(), now=5.6))) == 1
    assert bandwidth(svc.handle(ev.TrafficMeasured((1,), None, ()), now=5.7), 1) == []
    assert len(of(cmd.MeasureTraffic, svc.handle(ev.LifeTick(), now=7.6))) == 1


def test_a_pass_that_adds_nothing_sooner_leaves_the_life_timer_alone() -> None:
    svc = make(idle=2.0)
    with_clients(svc)
    decide(svc, udp_in(8100))
    armed = svc._life_at
    assert armed is not None and armed <= 0.5  # a sweep within a quarter of the idle timeout
    out = svc.handle(ev.PacketsCaptured([udp_in(8101)]), now=0.1)  # a new connection joins behind
    assert of(cmd.ArmLifeTimer, out) == [] and svc._life_at == armed


def test_the_first_cached_connection_gets_a_sweep_sooner_than_a_long_bandwidth_interval() -> None:
    svc = make(idle=2.0)
    with_clients(svc)
    assert life_timer(subscribe(svc, 1, 3600.0, now=0.0)) == 3600.0  # nothing cached: no sweep yet
    out = svc.handle(ev.PacketsCaptured([udp_in(8102)]), now=1.0)
    (ask,) = of(cmd.SendDecide, out)
    out = svc.handle(ev.DecideAnswered(ask.client, ask.msgid, None, {"verdict": "accept", "permanent": True}), 1.0)
    assert life_timer(out) == 1.5
    assert ends(svc.handle(ev.LifeTick(), now=3.0))[1][0]["reason"] == "idle"


def test_a_subscription_sooner_than_the_armed_sweep_rearms_the_timer() -> None:
    svc = make(idle=1000.0)
    with_clients(svc)
    decide(svc, udp_in(8103))
    assert svc._life_at == 1.0
    assert life_timer(subscribe(svc, 1, 0.2, now=0.5)) == pytest.approx(0.7)


def test_a_measured_dump_rearms_the_timer_for_its_client_when_another_armed_it_later() -> None:
    svc = make(kernel=True)
    with_clients(svc)
    subscribe(svc, 1, 1.0, now=0.0)
    svc.handle(ev.LifeTick(), now=0.0)  # client 1's baseline dump starts
    assert life_timer(subscribe(svc, 2, 60.0, now=0.1)) == 0.1  # client 2's baseline, at once
    svc.handle(ev.LifeTick(), now=0.1)  # both dumps under way: nothing armed
    out = svc.handle(ev.TrafficMeasured((2,), {}, ({},)), now=0.2)
    assert life_timer(out) == 60.1  # client 1 still waits for its dump
    out = svc.handle(ev.TrafficMeasured((1,), {}, ({},)), now=0.3)
    assert life_timer(out) == 1.0


def test_a_rerouted_connections_record_says_where_it_goes() -> None:
    cache = VerdictCache(4)
    entry = cache.put(udp_key(53), Verdict.REROUTE_TO_NAMESERVER, Target.parse("127.0.0.1:5353"))
    got = record(udp_key(53), entry, now=1.0)
    assert (got["verdict"], got["to"]) == ("reroute_to_nameserver", "127.0.0.1:5353")
    assert "to" not in record(udp_key(54), cache.put(udp_key(54), Verdict.ACCEPT), now=1.0)
