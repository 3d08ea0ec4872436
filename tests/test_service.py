"""The decision service as playbooks: these events in, these commands out, on a fake clock.

No sockets, no sleeping: time is whatever ``now`` the test passes.
"""

from __future__ import annotations

from typing import Any

from pmk.core import commands as cmd
from pmk.core import events as ev
from pmk.core.attribution import Owner
from pmk.core.policy import Policy, default_only, parse_policy
from pmk.core.service import Service
from pmk.packet.captured import CapturedPacket
from pmk.rpc.names import CONNECTION_NEW, PROTOCOL_ERROR, WITHDRAWN
from pmk.testing.fakes import FakeBackend
from pmk.verdicts import ConnKey, Verdict
from tests.packets import ip_packet, udp

A, B = "198.18.0.1", "198.18.0.2"
TIMEOUT = 2.0


def service(
    *, max_in_flight: int = 256, packet_cache: int = 1024, kernel: bool = False, policy: Policy | None = None
) -> Service:
    return Service(
        backend=FakeBackend(kernel),
        policy=policy or default_only(Verdict.DROP),
        packet_cache=packet_cache,
        verdict_cache=65536,
        verdict_timeout=TIMEOUT,
        max_in_flight=max_in_flight,
        started=0.0,
    )


def packet(port: int) -> CapturedPacket:
    """An inbound UDP packet of connection ``port``."""
    return CapturedPacket(udp(A, B, port, 53), outbound=False)


def key(port: int) -> ConnKey:
    return ConnKey(17, bytes([198, 18, 0, 2]), 53, bytes([198, 18, 0, 1]), port)


def hello(client: int, role: str = "decider", name: str = "d", msgid: int = 0) -> ev.ClientRequest:
    return ev.ClientRequest(client, msgid, "hello", [{"protocol": 1, "name": name, "role": role}])


def joined_decider(svc: Service, client: int = 1, name: str = "d") -> None:
    svc.handle_all([ev.ClientJoined(client), hello(client, name=name)], now=0.0)


def of(kind: type, out: list[cmd.Command]) -> list[Any]:
    return [c for c in out if isinstance(c, kind)]


def applied(out: list[cmd.Command]) -> list[tuple[list[int], Verdict, bool]]:
    """Apply commands as (remote ports, verdict, permanent)."""
    return [(_ports(c.packets), c.verdict, c.permanent) for c in of(cmd.Apply, out)]


def _ports(packets: list[CapturedPacket]) -> list[int]:
    return [p.raw[20] << 8 | p.raw[21] for p in packets]


def answer(svc: Service, decide: cmd.SendDecide, verdict: str, permanent: bool = False, now: float = 0.5) -> list[Any]:
    result = {"verdict": verdict, "permanent": permanent}
    return svc.handle(ev.DecideAnswered(decide.client, decide.msgid, None, result), now)


def assert_identity(svc: Service) -> None:
    s = svc.stats(now=0.0)
    assert s["captured"] == s["accepted"] + s["blocked"] + s["dropped"] + s["rerouted"] + s["evicted"] + s["pending"]


def test_without_a_decider_the_policy_settles_at_once() -> None:
    svc = service()
    out = svc.handle(ev.PacketsCaptured([packet(1)]), now=0.0)
    assert applied(out) == [([1], Verdict.DROP, False)]
    (decided,) = of(cmd.Decided, out)
    assert (decided.by, decided.name, decided.verdict) == ("policy", "default", Verdict.DROP)
    stats = svc.stats(now=0.0)
    assert stats["default_no_decider"] == 1 and stats["defaulted"] == 1 and stats["requests"] == 1
    assert stats["policy_hits"] == {"default": 1}
    assert_identity(svc)


def test_a_decider_is_asked_once_per_connection_and_its_permanent_answer_settles_all() -> None:
    svc = service()
    joined_decider(svc, name="blocklist")
    out = svc.handle(ev.PacketsCaptured([packet(1), packet(1)]), now=0.0)
    (decide,) = of(cmd.SendDecide, out)
    assert decide.info["remote_port"] == 1 and of(cmd.ArmTimer, out) == [cmd.ArmTimer(TIMEOUT)]
    out = answer(svc, decide, "accept", permanent=True)
    assert applied(out) == [([1, 1], Verdict.ACCEPT, True)]
    assert [(d.by, d.name) for d in of(cmd.Decided, out)] == [("decider", "blocklist")]
    assert applied(svc.handle(ev.PacketsCaptured([packet(1)]), now=1.0)) == [([1], Verdict.ACCEPT, False)]
    assert_identity(svc)


def test_the_hello_reply_comes_before_the_decides_it_made_possible() -> None:
    svc = service()
    svc.handle(ev.ClientJoined(1), now=0.0)
    svc.handle(ev.PacketsCaptured([packet(1)]), now=0.0)  # settled by the policy: nobody to ask
    svc.handle(ev.ClientJoined(2), now=0.0)
    out = svc.handle_all([hello(2), ev.PacketsCaptured([packet(2)])], now=0.0)
    assert [type(c) for c in out if not isinstance(c, cmd.ArmTimer)] == [cmd.Reply, cmd.SendDecide]


def test_a_silent_decider_runs_into_the_timeout() -> None:
    svc = service()
    joined_decider(svc)
    (decide,) = of(cmd.SendDecide, svc.handle(ev.PacketsCaptured([packet(1)]), now=0.0))
    assert svc.handle(ev.Tick(), now=TIMEOUT - 0.01) == [cmd.ArmTimer(TIMEOUT)]  # early: armed again
    out = svc.handle(ev.Tick(), now=TIMEOUT)
    assert applied(out) == [([1], Verdict.DROP, False)]
    assert cmd.Forget(decide.client, decide.msgid) in out
    stats = svc.stats(now=TIMEOUT)
    assert stats["timeouts"] == 1 and stats["default_timeout"] == 1 and stats["in_flight"] == 0
    # Its answer, when it finally comes, the server reports as late.
    svc.handle(ev.LateAnswer(decide.client, decide.msgid), now=3.0)
    assert svc.stats(now=3.0)["late_verdicts"] == 1
    assert_identity(svc)


def test_an_error_or_an_invalid_answer_gets_the_policy() -> None:
    svc = service()
    joined_decider(svc)
    first, second = of(cmd.SendDecide, svc.handle(ev.PacketsCaptured([packet(1), packet(2)]), now=0.0))
    out = svc.handle(ev.DecideAnswered(1, first.msgid, {"code": "internal_error", "message": "x"}, None), now=0.1)
    assert applied(out) == [([1], Verdict.DROP, False)]
    out = svc.handle(ev.DecideAnswered(1, second.msgid, None, {"verdict": "reroute"}), now=0.1)
    assert applied(out) == [([2], Verdict.DROP, False)]
    (notice,) = of(cmd.Notify, out)
    assert notice.method == PROTOCOL_ERROR and notice.params[0]["code"] == "invalid_params"
    stats = svc.stats(now=0.1)
    assert stats["default_error"] == 1 and stats["default_invalid"] == 1 and stats["defaulted"] == 2


def test_a_temporary_answer_settles_one_packet_and_asks_about_the_next() -> None:
    svc = service()
    joined_decider(svc)
    (decide,) = of(cmd.SendDecide, svc.handle(ev.PacketsCaptured([packet(1), packet(1)]), now=0.0))
    out = answer(svc, decide, "block")
    assert applied(out) == [([1], Verdict.BLOCK, False)]
    (again,) = of(cmd.SendDecide, out)
    assert again.info["id"] == decide.info["id"] + 1 and again.msgid != decide.msgid
    assert svc.stats(now=0.5)["requests"] == 2


def test_an_answer_leaves_the_timer_armed_and_an_early_tick_rearms_it() -> None:
    svc = service()
    joined_decider(svc)
    (first,) = of(cmd.SendDecide, svc.handle(ev.PacketsCaptured([packet(1)]), now=0.0))
    out = svc.handle(ev.PacketsCaptured([packet(2)]), now=0.5)
    assert of(cmd.ArmTimer, out) == []  # due later than the armed timer
    # The answer removes the earliest deadline; the timer is not re-armed for it.
    assert of(cmd.ArmTimer, answer(svc, first, "accept", now=0.6)) == []
    assert svc.handle(ev.Tick(), now=TIMEOUT) == [cmd.ArmTimer(0.5 + TIMEOUT)]
    assert applied(svc.handle(ev.Tick(), now=0.5 + TIMEOUT)) == [([2], Verdict.DROP, False)]


def test_the_owner_is_looked_up_when_a_request_is_sent_not_while_it_is_parked() -> None:
    looked_up: list[int] = []

    def owner_of(key: ConnKey, outbound: bool) -> Owner:
        looked_up.append(key.remote_port)
        return Owner(7, "/bin/app", 1000)

    svc = Service(
        backend=FakeBackend(),
        policy=default_only(Verdict.DROP),
        packet_cache=8,
        verdict_cache=64,
        verdict_timeout=TIMEOUT,
        max_in_flight=1,
        started=0.0,
        owner_of=owner_of,
    )
    joined_decider(svc)
    (first,) = of(cmd.SendDecide, svc.handle(ev.PacketsCaptured([packet(1), packet(2), packet(3)]), now=0.0))
    assert looked_up == [1]  # 2 and 3 are parked: no lookup yet
    (second,) = of(cmd.SendDecide, answer(svc, first, "accept"))
    assert looked_up == [1, 2] and second.info["pid"] == 7
    # A parked request that the policy settles is looked up then, for its record.
    out = svc.handle(ev.Tick(), now=TIMEOUT + 1)
    assert looked_up == [1, 2, 3]
    assert {d.owner for d in of(cmd.Decided, out)} == {Owner(7, "/bin/app", 1000)}


def test_a_leaving_decider_hands_its_requests_to_another() -> None:
    svc = service()
    joined_decider(svc, 1)
    (decide,) = of(cmd.SendDecide, svc.handle(ev.PacketsCaptured([packet(1)]), now=0.0))
    joined_decider(svc, 2)
    out = svc.handle(ev.ClientLeft(1), now=1.5)
    (moved,) = of(cmd.SendDecide, out)
    assert moved.client == 2 and moved.info["id"] == decide.info["id"]
    # The re-asked request has a fresh deadline.
    assert svc.handle(ev.Tick(), now=TIMEOUT + 0.1) == [cmd.ArmTimer(1.5 + TIMEOUT)]
    assert applied(svc.handle(ev.Tick(), now=1.5 + TIMEOUT)) == [([1], Verdict.DROP, False)]


def test_the_last_decider_leaving_leaves_its_requests_to_the_policy() -> None:
    svc = service()
    joined_decider(svc)
    svc.handle(ev.PacketsCaptured([packet(1), packet(2)]), now=0.0)
    out = svc.handle(ev.ClientLeft(1), now=0.5)
    assert applied(out) == [([1, 2], Verdict.DROP, False)]
    assert svc.stats(now=0.5)["default_no_decider"] == 2


def test_a_decider_has_at_most_max_in_flight_requests_and_the_rest_wait_oldest_first() -> None:
    svc = service(max_in_flight=1)
    joined_decider(svc)
    out = svc.handle(ev.PacketsCaptured([packet(1), packet(2), packet(3)]), now=0.0)
    (first,) = of(cmd.SendDecide, out)
    assert svc.stats(now=0.0)["waiting_for_decider"] == 2
    (second,) = of(cmd.SendDecide, answer(svc, first, "accept"))
    assert second.info["remote_port"] == 2
    (third,) = of(cmd.SendDecide, answer(svc, second, "drop"))
    assert third.info["remote_port"] == 3
    answer(svc, third, "block")
    stats = svc.stats(now=0.5)
    assert stats["waiting_for_decider"] == 0 and stats["in_flight"] == 0 and stats["defaulted"] == 0


def test_a_waiting_ask_keeps_its_deadline() -> None:
    svc = service(max_in_flight=1)
    joined_decider(svc)
    svc.handle(ev.PacketsCaptured([packet(1)]), now=0.0)
    svc.handle(ev.PacketsCaptured([packet(2)]), now=1.0)
    out = svc.handle(ev.Tick(), now=TIMEOUT)
    assert applied(out) == [([1], Verdict.DROP, False)]
    # The parked ask goes out as the slot frees up, due at 1.0 + TIMEOUT as if it had been sent then.
    (late,) = of(cmd.SendDecide, out)
    assert late.info["remote_port"] == 2
    assert applied(svc.handle(ev.Tick(), now=1.0 + TIMEOUT)) == [([2], Verdict.DROP, False)]


def test_under_pressure_waiting_asks_go_youngest_first() -> None:
    svc = service(max_in_flight=1, packet_cache=4)
    joined_decider(svc)
    (first,) = of(cmd.SendDecide, svc.handle(ev.PacketsCaptured([packet(p) for p in (1, 2, 3, 4)]), now=0.0))
    # Still 3 of 4 held after the answer: the youngest waiting ask (port 4) goes next, not the oldest (2).
    (nxt,) = of(cmd.SendDecide, answer(svc, first, "accept"))
    assert nxt.info["remote_port"] == 4
    # 2 of 4 held: oldest first again.
    (last,) = of(cmd.SendDecide, answer(svc, nxt, "accept"))
    assert last.info["remote_port"] == 2


def test_an_evicted_packet_withdraws_its_request_which_keeps_the_slot_until_answered() -> None:
    svc = service(max_in_flight=2, packet_cache=2)
    joined_decider(svc)
    first, _ = of(cmd.SendDecide, svc.handle(ev.PacketsCaptured([packet(1), packet(2)]), now=0.0))
    # Both held packets are with the decider: the oldest of them goes.
    out = svc.handle(ev.PacketsCaptured([packet(3)]), now=0.1)
    assert applied(out) == [([1], Verdict.DROP, False)]  # the eviction
    assert of(cmd.Notify, out) == [cmd.Notify(1, WITHDRAWN, [first.info["id"]])]
    assert of(cmd.SendDecide, out) == []  # the slot is still the withdrawn request's
    stats = svc.stats(now=0.1)
    assert stats["evicted"] == 1 and stats["withdrawn"] == 1 and stats["withdrawn_in_flight"] == 1
    out = answer(svc, first, "accept", now=0.2)
    assert applied(out) == []
    (nxt,) = of(cmd.SendDecide, out)  # the late answer freed the slot
    assert nxt.info["remote_port"] == 3
    assert svc.stats(now=0.2)["late_verdicts"] == 1
    assert_identity(svc)


def test_an_evicted_packet_whose_ask_waited_is_forgotten_silently() -> None:
    svc = service(max_in_flight=1, packet_cache=2)
    joined_decider(svc)
    svc.handle(ev.PacketsCaptured([packet(1), packet(2)]), now=0.0)
    out = svc.handle(ev.PacketsCaptured([packet(3)]), now=0.0)  # evicts port 2, whose ask waited
    assert applied(out) == [([2], Verdict.DROP, False)] and of(cmd.Notify, out) == []
    out = svc.handle(ev.PacketsCaptured([packet(4)]), now=0.0)  # evicts port 3, likewise
    assert applied(out) == [([3], Verdict.DROP, False)] and of(cmd.Notify, out) == []
    assert svc.stats(now=0.0)["withdrawn"] == 2


def test_a_flood_never_evicts_what_a_decider_is_deciding() -> None:
    svc = service(max_in_flight=2, packet_cache=8)
    joined_decider(svc)
    sent = of(cmd.SendDecide, svc.handle(ev.PacketsCaptured([packet(p) for p in range(1, 9)]), now=0.0))
    assert [d.info["remote_port"] for d in sent] == [1, 2]
    for port in range(9, 500):  # every new packet evicts one
        out = svc.handle(ev.PacketsCaptured([packet(port)]), now=0.1)
        assert of(cmd.Notify, out) == []
        assert 1 not in _ports([p for c in of(cmd.Apply, out) for p in c.packets])
    # Every answer the decider gives still decides its connection.
    for decide in sent:
        assert applied(answer(svc, decide, "accept", permanent=True, now=0.2))[0][1:] == (Verdict.ACCEPT, True)
    stats = svc.stats(now=0.2)
    assert stats["late_verdicts"] == 0 and stats["accepted"] == 2 and stats["evicted"] == 491
    assert_identity(svc)


def test_a_packet_taken_back_from_a_leaving_decider_is_evictable_again() -> None:
    svc = service(max_in_flight=1, packet_cache=3)
    joined_decider(svc, 1)
    joined_decider(svc, 2)
    out = svc.handle(ev.PacketsCaptured([packet(1), packet(2), packet(3)]), now=0.0)
    assert [(d.client, d.info["remote_port"]) for d in of(cmd.SendDecide, out)] == [(1, 1), (2, 2)]
    svc.handle(ev.ClientLeft(1), now=0.1)  # 1 waits again (decider 2 is full), as the youngest
    assert applied(svc.handle(ev.PacketsCaptured([packet(4)]), now=0.2)) == [([3], Verdict.DROP, False)]
    assert applied(svc.handle(ev.PacketsCaptured([packet(5)]), now=0.2)) == [([1], Verdict.DROP, False)]
    assert_identity(svc)


def test_update_verdict_without_a_kernel_cache_applies_at_once() -> None:
    svc = service()
    joined_decider(svc)
    (decide,) = of(cmd.SendDecide, svc.handle(ev.PacketsCaptured([packet(9)]), now=0.0))
    conn = {"protocol": 17, "local_ip": B, "local_port": 53, "remote_ip": A, "remote_port": 9}
    out = svc.handle(ev.ClientRequest(1, 5, "update_verdict", [conn, "block"]), now=0.1)
    assert cmd.Reply(1, 5, True) in out
    assert applied(out) == [([9], Verdict.BLOCK, True)]
    assert of(cmd.Notify, out) == [cmd.Notify(1, WITHDRAWN, [decide.info["id"]])]
    assert [(d.by, d.verdict) for d in of(cmd.Decided, out)] == [("operator", Verdict.BLOCK)]


def test_update_verdict_on_a_kernel_cache_changes_the_engine_only_once_the_kernel_has_it() -> None:
    svc = service(kernel=True)
    svc.handle(ev.ClientJoined(1), now=0.0)
    conn = {"protocol": 17, "local_ip": B, "local_port": 53, "remote_ip": A, "remote_port": 9}
    (update,) = svc.handle(ev.ClientRequest(1, 5, "update_verdict", [conn, "block"]), now=0.0)
    assert update == cmd.UpdateConnection(update.op, key(9), Verdict.BLOCK)
    # Not in force yet: a packet now is asked about as before (and, with no decider, defaulted).
    assert svc.stats(now=0.0)["verdict_cache_entries"] == 0
    out = svc.handle(ev.KernelUpdated(update.op), now=0.1)
    assert cmd.Reply(1, 5, True) in out
    hit = svc.handle(ev.PacketsCaptured([packet(9)]), now=0.2)
    assert applied(hit) == [([9], Verdict.BLOCK, True)]  # a hit is handed to the kernel as permanent


def test_a_failed_kernel_update_is_an_internal_error_and_changes_nothing() -> None:
    svc = service(kernel=True)
    svc.handle(ev.ClientJoined(1), now=0.0)
    conn = {"protocol": 17, "local_ip": B, "local_port": 53, "remote_ip": A, "remote_port": 9}
    (update,) = svc.handle(ev.ClientRequest(1, 5, "update_verdict", [conn, "accept"]), now=0.0)
    out = svc.handle(ev.KernelUpdateFailed(update.op, "conntrack said no"), now=0.1)
    (error,) = out
    assert isinstance(error, cmd.ReplyError) and error.code.value == "internal_error"
    assert "conntrack said no" in error.message
    assert svc.stats(now=0.1)["verdict_cache_entries"] == 0
    (forget,) = svc.handle(ev.ClientRequest(1, 6, "clear_cache", []), now=0.2)
    assert isinstance(forget, cmd.ForgetConnections)
    (error,) = svc.handle(ev.KernelUpdateFailed(forget.op, "busy"), now=0.3)
    assert isinstance(error, cmd.ReplyError) and error.msgid == 6


def test_clear_cache_on_a_kernel_cache_answers_after_the_kernel() -> None:
    svc = service(kernel=True)
    svc.handle_all([ev.ClientJoined(1), ev.Preaccept((key(1), key(2)))], now=0.0)
    (forget,) = svc.handle(ev.ClientRequest(1, 6, "clear_cache", []), now=0.0)
    assert svc.stats(now=0.0)["verdict_cache_entries"] == 2
    assert svc.handle(ev.KernelUpdated(forget.op), now=0.1) == [cmd.Reply(1, 6, 2)]


def test_preaccepted_connections_are_cached_as_accepted_and_logged() -> None:
    svc = service()
    out = svc.handle(ev.Preaccept((key(1), key(2))), now=0.0)
    assert [(d.key, d.by) for d in of(cmd.Decided, out)] == [(key(1), "existing"), (key(2), "existing")]
    assert applied(svc.handle(ev.PacketsCaptured([packet(1)]), now=0.0)) == [([1], Verdict.ACCEPT, False)]
    assert svc.stats(now=0.0)["preaccepted"] == 2


def test_a_permanent_policy_rule_is_cached_and_counted_per_rule() -> None:
    policy = parse_policy(
        '[[rule]]\nname = "dns"\nprotocol = "udp"\nlocal_port = 53\nverdict = "accept"\ncache = true\n'
        '[default]\nverdict = "block"\n',
        "test",
    )
    svc = service(policy=policy)
    out = svc.handle(ev.PacketsCaptured([packet(1), packet(1)]), now=0.0)
    assert applied(out) == [([1, 1], Verdict.ACCEPT, True)]
    assert svc.stats(now=0.0)["policy_hits"] == {"dns": 1, "default": 0}
    svc.replace_policy(default_only(Verdict.BLOCK))
    assert applied(svc.handle(ev.PacketsCaptured([packet(1)]), now=0.0)) == [([1], Verdict.ACCEPT, False)]


def test_an_unparseable_packet_gets_the_policys_default() -> None:
    svc = service()
    out = svc.handle(ev.PacketsCaptured([CapturedPacket(b"\x00garbage", outbound=False)]), now=0.0)
    assert [(c.verdict, c.permanent) for c in of(cmd.Apply, out)] == [(Verdict.DROP, False)]
    stats = svc.stats(now=0.0)
    assert stats["unparsed"] == 1 and stats["defaulted"] == 1 and stats["policy_hits"]["default"] == 1
    assert_identity(svc)


def test_shutdown_gives_everything_held_the_policy() -> None:
    svc = service()
    joined_decider(svc)
    svc.handle(ev.PacketsCaptured([packet(1), packet(1), packet(2)]), now=0.0)
    out = svc.handle(ev.Shutdown(), now=0.5)
    assert sorted(p for ports, _, _ in applied(out) for p in ports) == [1, 1, 2]
    stats = svc.stats(now=0.5)
    assert stats["pending"] == 0 and stats["in_flight"] == 0 and stats["dropped"] == 3
    assert_identity(svc)


def test_client_counters_come_from_their_events() -> None:
    svc = service()
    svc.handle_all([ev.ClientJoined(1), ev.ClientRefused(), ev.ProtocolErrorSeen(1), ev.ClientCutOff(1)], now=0.0)
    stats = svc.stats(now=0.0)
    assert (stats["clients"], stats["refused_clients"], stats["protocol_errors"], stats["slow_clients"]) == (1, 1, 1, 1)
    svc.handle(ev.ClientLeft(1), now=0.0)
    assert svc.stats(now=0.0)["clients"] == 0


def test_on_a_kernel_cache_a_hit_is_handed_to_the_kernel_and_logged_as_decided_by_the_cache() -> None:
    svc = service(kernel=True)
    svc.handle(ev.Preaccept((key(1),)), now=0.0)
    out = svc.handle(ev.PacketsCaptured([packet(1)]), now=0.0)
    assert applied(out) == [([1], Verdict.ACCEPT, True)]
    assert [(d.key, d.by, d.permanent) for d in of(cmd.Decided, out)] == [(key(1), "cache", True)]
    # Without a kernel cache every packet comes here: hits are neither permanent nor logged.
    svc = service()
    svc.handle(ev.Preaccept((key(1),)), now=0.0)
    out = svc.handle(ev.PacketsCaptured([packet(1)]), now=0.0)
    assert applied(out) == [([1], Verdict.ACCEPT, False)] and of(cmd.Decided, out) == []


# -- attribution, info fields, hello, observers, client_list (issue 10) ---------------------------


DIG = Owner(4242, "/usr/bin/dig", 1000)


class FakeOwners:
    """An owner lookup that records its calls; ``fail`` makes it raise."""

    def __init__(self, owner: Owner | None = DIG, fail: bool = False) -> None:
        self.owner = owner
        self.fail = fail
        self.calls: list[tuple[ConnKey, bool]] = []

    def __call__(self, key: ConnKey, outbound: bool) -> Owner | None:
        self.calls.append((key, outbound))
        if self.fail:
            raise OSError("netlink went away")
        return self.owner


def attributed(owners: FakeOwners, **kwargs: Any) -> Service:
    return Service(
        backend=FakeBackend(),
        policy=default_only(Verdict.DROP),
        packet_cache=kwargs.get("packet_cache", 1024),
        verdict_cache=65536,
        verdict_timeout=TIMEOUT,
        max_in_flight=kwargs.get("max_in_flight", 256),
        started=0.0,
        owner_of=owners,
    )


def hello_with(client: int, msgid: int = 0, **fields: Any) -> ev.ClientRequest:
    return ev.ClientRequest(client, msgid, "hello", [{"protocol": 1, **fields}])


def test_the_owner_is_looked_up_once_per_request_and_named_in_the_info_and_the_record() -> None:
    owners = FakeOwners()
    svc = attributed(owners)
    joined_decider(svc, name="blocklist")
    out = svc.handle(ev.PacketsCaptured([packet(1), packet(1), packet(1)]), now=0.0)
    (decide,) = of(cmd.SendDecide, out)
    assert owners.calls == [(key(1), False)]  # one connection, one lookup, however many packets
    assert (decide.info["pid"], decide.info["process"], decide.info["uid"]) == (4242, "/usr/bin/dig", 1000)
    (decided,) = of(cmd.Decided, answer(svc, decide, "accept", permanent=True))
    assert decided.owner == Owner(4242, "/usr/bin/dig", 1000) and decided.info is not None
    assert decided.info["pid"] == 4242
    # A temporary answer asks about the next packet anew: a new request, a new lookup.
    out = svc.handle(ev.PacketsCaptured([packet(2), packet(2)]), now=1.0)
    (decide,) = of(cmd.SendDecide, out)
    answer(svc, decide, "accept", permanent=False, now=1.0)
    assert owners.calls[1:] == [(key(2), False), (key(2), False)]
    assert svc.stats(now=1.0)["attribution_errors"] == 0


def test_no_socket_means_nil_owner_fields() -> None:
    svc = attributed(FakeOwners(owner=None))
    joined_decider(svc)
    (decide,) = of(cmd.SendDecide, svc.handle(ev.PacketsCaptured([packet(1)]), now=0.0))
    assert (decide.info["pid"], decide.info["process"], decide.info["uid"]) == (None, None, None)


def test_a_failing_lookup_leaves_the_fields_nil_counts_and_still_asks() -> None:
    owners = FakeOwners(fail=True)
    svc = attributed(owners)
    joined_decider(svc)
    out = svc.handle(ev.PacketsCaptured([packet(1), packet(2)]), now=0.0)
    decides = of(cmd.SendDecide, out)
    assert len(decides) == 2 and all(d.info["pid"] is None and d.info["process"] is None for d in decides)
    assert svc.stats(now=0.0)["attribution_errors"] == 2
    # Without a decider the policy still settles, lookup failing or not.
    svc.handle(ev.ClientLeft(1), now=0.0)
    assert applied(svc.handle(ev.PacketsCaptured([packet(3)]), now=0.0)) == [([3], Verdict.DROP, False)]
    assert svc.stats(now=0.0)["attribution_errors"] == 3
    assert_identity(svc)


def test_timeout_ms_is_the_time_left_when_the_request_is_sent() -> None:
    svc = service(max_in_flight=1)
    joined_decider(svc)
    first, *rest = of(cmd.SendDecide, svc.handle(ev.PacketsCaptured([packet(1), packet(2)]), now=0.0))
    assert first.info["timeout_ms"] == 2000 and rest == []
    # The second waited 0.5 s for a slot; its deadline did not move, so it has 1.5 s left.
    (second,) = of(cmd.SendDecide, answer(svc, first, "accept", now=0.5))
    assert second.info["timeout_ms"] == 1500


def test_icmp_infos_carry_type_and_code() -> None:
    svc = service()
    joined_decider(svc)
    echo4 = ip_packet(A, B, 1, bytes([8, 0, 0, 0, 0, 1, 0, 1]) + b"ping")
    unreachable6 = ip_packet("fd00::1", "fd00::2", 58, bytes([1, 4, 0, 0, 0, 0, 0, 0]))
    out = svc.handle(
        ev.PacketsCaptured([CapturedPacket(echo4, outbound=True), CapturedPacket(unreachable6, outbound=False)]),
        now=0.0,
    )
    v4, v6 = (d.info for d in of(cmd.SendDecide, out))
    assert (v4["protocol"], v4["icmp_type"], v4["icmp_code"]) == (1, 8, 0)
    assert (v6["protocol"], v6["icmp_type"], v6["icmp_code"]) == (58, 1, 4)
    (udp_decide,) = of(cmd.SendDecide, svc.handle(ev.PacketsCaptured([packet(1)]), now=0.0))
    assert "icmp_type" not in udp_decide.info and "icmp_code" not in udp_decide.info


def test_only_a_decider_that_asked_for_payload_gets_the_bytes_inline() -> None:
    svc = service()
    svc.handle_all([ev.ClientJoined(1), ev.ClientJoined(2), ev.ClientJoined(3)], now=0.0)
    svc.handle_all([hello_with(1, role="decider", payload=True), hello_with(2, role="decider"), hello_with(3)], now=0.0)
    out = svc.handle(ev.PacketsCaptured([packet(1), packet(2)]), now=0.0)
    by_client = {d.client: d for d in of(cmd.SendDecide, out)}
    port = by_client[1].info["remote_port"]
    assert by_client[1].info["payload"] == packet(port).raw and isinstance(by_client[1].info["payload"], bytes)
    assert "payload" not in by_client[2].info
    # The observer's event never carries the payload, even for the payload decider's answer.
    out = answer(svc, by_client[1], "accept", permanent=True)
    (notice,) = of(cmd.Notify, out)
    assert notice.client == 3 and "payload" not in notice.params[0]


def test_hello_results_and_errors() -> None:
    svc = service(max_in_flight=8)
    svc.handle(ev.ClientJoined(1), now=0.0)
    (reply,) = svc.handle(hello_with(1, role="decider", payload=True), now=0.0)
    assert isinstance(reply, cmd.Reply)
    assert {k: reply.result[k] for k in ("verdict_timeout", "verdicts", "max_in_flight", "backend")} == {
        "verdict_timeout": TIMEOUT,
        "verdicts": ["accept", "block", "drop"],
        "max_in_flight": 8,
        "backend": "fake",
    }
    (error,) = svc.handle(hello_with(1, protocol=2), now=0.0)
    assert isinstance(error, cmd.ReplyError) and error.code.value == "unsupported_protocol"
    assert "speaks 1" in error.message
    (error,) = svc.handle(hello_with(1, payload="yes"), now=0.0)
    assert isinstance(error, cmd.ReplyError) and error.code.value == "invalid_params"
    # 256 characters of two bytes each: the limit counts characters.
    (reply,) = svc.handle(hello_with(1, name="é" * 256), now=0.0)
    assert isinstance(reply, cmd.Reply)
    (version,) = svc.handle(ev.ClientRequest(1, 5, "get_version", []), now=0.0)
    assert isinstance(version, cmd.Reply) and version.result["protocols"] == [1]


def test_a_verdict_the_server_did_not_offer_is_invalid() -> None:
    svc = service()
    joined_decider(svc)
    (decide,) = of(cmd.SendDecide, svc.handle(ev.PacketsCaptured([packet(1)]), now=0.0))
    out = answer(svc, decide, "reroute_to_tunnel", permanent=True)
    assert applied(out) == [([1], Verdict.DROP, False)] and of(cmd.Notify, out)[0].method == PROTOCOL_ERROR
    assert svc.stats(now=0.5)["default_invalid"] == 1
    (reply,) = svc.handle(hello(1, msgid=3), now=0.6)
    assert reply.result["verdicts"] == ["accept", "block", "drop"]  # no tunnel configured


def test_parked_asks_a_new_decider_takes_go_out_after_its_hello_reply() -> None:
    svc = service(max_in_flight=1)
    joined_decider(svc)
    svc.handle(ev.PacketsCaptured([packet(1), packet(2), packet(3)]), now=0.0)
    assert svc.stats(now=0.0)["waiting_for_decider"] == 2
    svc.handle(ev.ClientJoined(2), now=0.1)
    out = svc.handle(hello(2, msgid=7), now=0.1)
    kinds = [type(c) for c in out if not isinstance(c, cmd.ArmTimer)]
    assert kinds == [cmd.Reply, cmd.SendDecide]
    assert of(cmd.SendDecide, out)[0].client == 2


def test_packet_ids_count_up_and_are_never_reused() -> None:
    svc = service(packet_cache=2)
    joined_decider(svc)
    ids = []
    for port in range(1, 6):  # the cache holds 2: older packets are evicted on the way
        out = svc.handle(ev.PacketsCaptured([packet(port)]), now=0.0)
        ids += [d.info["id"] for d in of(cmd.SendDecide, out)]
    for decide in of(cmd.SendDecide, svc.handle(ev.ClientLeft(1), now=0.0)):
        ids.append(decide.info["id"])
    joined_decider(svc, client=2)
    out = svc.handle(ev.PacketsCaptured([packet(1)]), now=0.0)
    ids += [d.info["id"] for d in of(cmd.SendDecide, out)]
    assert ids == sorted(set(ids)) and ids[0] == 1 and len(ids) == 6


def test_observers_get_connection_new_for_every_decision_but_cache_hits() -> None:
    svc = attributed(FakeOwners(), packet_cache=1024)
    svc.handle_all([ev.ClientJoined(1), ev.ClientJoined(2), ev.ClientJoined(3)], now=0.0)
    svc.handle_all([hello(1, name="blocklist"), hello_with(2, name="top"), hello_with(3, role="decider")], now=0.0)
    svc.handle(ev.ClientLeft(3), now=0.0)  # a decider does not observe, and leaving changes nothing
    out = svc.handle(ev.PacketsCaptured([packet(1)]), now=0.0)
    (decide,) = of(cmd.SendDecide, out)
    assert of(cmd.Notify, out) == []  # asked, not yet decided
    out = answer(svc, decide, "accept", permanent=True)
    decided, notice = (c for c in out if isinstance(c, cmd.Decided | cmd.Notify))
    assert (
        isinstance(decided, cmd.Decided)
        and isinstance(notice, cmd.Notify)
        and notice.client == 2
        and notice.method == CONNECTION_NEW
    )
    event = notice.params[0]
    assert {k: event[k] for k in ("verdict", "permanent", "by", "name", "pid", "process", "remote_port")} == {
        "verdict": "accept",
        "permanent": True,
        "by": "decider",
        "name": "blocklist",
        "pid": 4242,
        "process": "/usr/bin/dig",
        "remote_port": 1,
    }
    assert event["id"] == decide.info["id"] and event["timeout_ms"] == 2000
    # A cache hit is no event; a policy decision (timeout) and an operator's are.
    assert of(cmd.Notify, svc.handle(ev.PacketsCaptured([packet(1)]), now=1.0)) == []
    svc.handle(ev.PacketsCaptured([packet(2)]), now=1.0)
    out = svc.handle(ev.Tick(), now=1.0 + TIMEOUT)
    events = [n.params[0] for n in of(cmd.Notify, out) if n.method == CONNECTION_NEW]
    assert [(e["by"], e["name"], e["verdict"], e["remote_port"]) for e in events] == [("policy", "default", "drop", 2)]
    out = svc.handle(ev.ClientRequest(1, 9, "update_verdict", [_conn(3), "block"]), now=4.0)
    (event,) = [n.params[0] for n in of(cmd.Notify, out) if n.method == CONNECTION_NEW]
    assert (event["by"], event["verdict"], event["remote_port"], event["local_ip"]) == ("operator", "block", 3, B)
    assert svc.stats(now=4.0)["connections_new"] == 3
    # An observer turning decider no longer observes.
    svc.handle(hello_with(2, role="decider"), now=4.0)
    out = svc.handle(ev.ClientRequest(1, 10, "update_verdict", [_conn(4), "block"]), now=4.0)
    assert of(cmd.Notify, out) == [] and svc.stats(now=4.0)["connections_new"] == 4


def _conn(port: int) -> dict[str, Any]:
    return {"protocol": 17, "local_ip": B, "local_port": 53, "remote_ip": A, "remote_port": port}


def test_client_list_reports_each_clients_answers_timeouts_and_latency() -> None:
    svc = service()
    svc.handle_all([ev.ClientJoined(1, pid=500, uid=0), ev.ClientJoined(2)], now=0.0)
    svc.handle_all([hello(1, name="fast"), hello_with(2, name="top")], now=0.0)
    decides = of(cmd.SendDecide, svc.handle(ev.PacketsCaptured([packet(p) for p in range(1, 12)]), now=0.0))
    for n, decide in enumerate(decides[:10]):
        answer(svc, decide, "accept", now=0.001 * (n + 1))  # 1 ms .. 10 ms
    svc.handle(ev.Tick(), now=TIMEOUT)  # the 11th times out
    entries = {e["id"]: e for e in svc.stats(now=TIMEOUT)["client_list"]}
    fast, top = entries[1], entries[2]
    assert (fast["name"], fast["role"], fast["pid"], fast["uid"]) == ("fast", "decider", 500, 0)
    assert (fast["answered"], fast["timeouts"], fast["in_flight"]) == (10, 1, 0)
    assert fast["latency_p50_ms"] == 6.0 and fast["latency_p99_ms"] == 10.0
    assert (top["role"], top["answered"], top["latency_p50_ms"]) == ("observer", 0, None)
    assert "pid" not in top


def test_a_reroute_event_names_its_target() -> None:
    from pmk.core.observers import connection_new
    from pmk.verdicts import Target

    target = Target(bytes([127, 0, 0, 53]), 53)
    decided = cmd.Decided(key(1), True, Verdict.REROUTE_TO_NAMESERVER, True, "decider", "dns", to=target)
    event = connection_new(decided)
    assert (event["verdict"], event["to"], event["direction"], event["ip_version"]) == (
        "reroute_to_nameserver",
        "127.0.0.53:53",
        "outbound",
        4,
    )
    assert "to" not in connection_new(cmd.Decided(key(1), True, Verdict.ACCEPT, True, "operator", ""))


def test_a_cached_connections_record_names_its_process() -> None:
    svc = attributed(FakeOwners())
    joined_decider(svc)
    (decide,) = of(cmd.SendDecide, svc.handle(ev.PacketsCaptured([packet(1)]), now=0.0))
    answer(svc, decide, "accept", permanent=True)
    (listed,) = svc.handle(ev.ClientRequest(1, 4, "list_connections", [{}]), now=1.0)
    assert isinstance(listed, cmd.Reply), listed
    (record,) = listed.result["connections"]
    assert (record["pid"], record["process"], record["uid"], record["by"]) == (4242, "/usr/bin/dig", 1000, "decider")
