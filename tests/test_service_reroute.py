"""Reroute verdicts through the decision service, as playbooks (SPEC 5.2).

The fake backend says a packet starts its connection when it is a UDP
datagram or a TCP segment with only SYN set, as the divert backend does.
"""

from __future__ import annotations

from typing import Any

from pmk.core import commands as cmd
from pmk.core import events as ev
from pmk.core.policy import default_only
from pmk.core.service import Service
from pmk.packet.captured import CapturedPacket
from pmk.packet.parse import parse_flow
from pmk.rpc.names import PROTOCOL_ERROR
from pmk.testing.fakes import FakeBackend
from pmk.verdicts import RerouteTargets, Target, Verdict
from tests.packets import ACK, SYN, tcp, udp

LOCAL, PEER = "198.18.0.1", "198.18.0.2"
NAMESERVER = Target.parse("127.0.0.1:5353")
PROXY = "127.0.0.1:8080"


def starts_connection(packet: CapturedPacket) -> bool:
    flow = parse_flow(packet.raw)
    assert flow is not None
    return flow.protocol == 17 or packet.raw[flow.transport_offset + 13] & (SYN | ACK) == SYN


def service(*, can_reroute: bool = True, nameservers: tuple[Target, ...] = (NAMESERVER,)) -> Service:
    svc = Service(
        backend=FakeBackend(),
        policy=default_only(Verdict.BLOCK),
        packet_cache=64,
        verdict_cache=64,
        verdict_timeout=2.0,
        max_in_flight=8,
        started=0.0,
        targets=RerouteTargets(nameservers=nameservers),
        reroutable=starts_connection if can_reroute else None,
    )
    svc.handle_all([ev.ClientJoined(1), ev.ClientRequest(1, 0, "hello", [{"protocol": 1, "role": "decider"}])], 0.0)
    return svc


def outbound_udp(port: int = 40000) -> CapturedPacket:
    return CapturedPacket(udp(LOCAL, PEER, port, 53), outbound=True)


def ask(svc: Service, packet: CapturedPacket) -> cmd.SendDecide:
    (decide,) = [c for c in svc.handle(ev.PacketsCaptured([packet]), 0.0) if isinstance(c, cmd.SendDecide)]
    return decide


def answer(svc: Service, decide: cmd.SendDecide, result: Any) -> list[cmd.Command]:
    return svc.handle(ev.DecideAnswered(decide.client, decide.msgid, None, result), 0.1)


def applies(out: list[cmd.Command]) -> list[tuple[Verdict, bool, Target | None]]:
    return [(c.verdict, c.permanent, c.target) for c in out if isinstance(c, cmd.Apply)]


def protocol_errors(out: list[cmd.Command]) -> list[str]:
    return [c.params[0]["message"] for c in out if isinstance(c, cmd.Notify) and c.method == PROTOCOL_ERROR]


def assert_identity(svc: Service) -> dict[str, Any]:
    s = svc.stats(now=0.0)
    assert s["captured"] == s["accepted"] + s["blocked"] + s["dropped"] + s["rerouted"] + s["evicted"] + s["pending"]
    return s


def test_hello_lists_the_reroutes_this_server_can_carry_out() -> None:
    out = service().handle(ev.ClientRequest(1, 5, "hello", [{"protocol": 1}]), 0.0)
    (reply,) = [c for c in out if isinstance(c, cmd.Reply)]
    assert reply.result["verdicts"] == ["accept", "block", "drop", "reroute_to_nameserver", "redirect"]
    out = service(can_reroute=False).handle(ev.ClientRequest(1, 5, "hello", [{"protocol": 1}]), 0.0)
    (reply,) = [c for c in out if isinstance(c, cmd.Reply)]
    assert reply.result["verdicts"] == ["accept", "block", "drop"]


def test_a_reroute_is_cached_with_its_target_and_counted_rerouted() -> None:
    svc = service()
    out = answer(svc, ask(svc, outbound_udp()), {"verdict": "reroute_to_nameserver"})
    # Permanent whatever the answer said: the rewrite covers the connection.
    assert applies(out) == [(Verdict.REROUTE_TO_NAMESERVER, True, NAMESERVER)]
    (decided,) = [c for c in out if isinstance(c, cmd.Decided)]
    assert (decided.verdict, decided.to) == (Verdict.REROUTE_TO_NAMESERVER, NAMESERVER)
    # Later packets, both ways, come from the cache with the target.
    reply = CapturedPacket(udp(PEER, LOCAL, 53, 40000), outbound=False)
    out = svc.handle(ev.PacketsCaptured([outbound_udp(), reply]), 1.0)
    assert applies(out) == [(Verdict.REROUTE_TO_NAMESERVER, False, NAMESERVER)]
    stats = assert_identity(svc)
    assert (stats["rerouted"], stats["accepted"], stats["requests"]) == (3, 0, 1)


def test_a_redirect_goes_where_the_answer_says() -> None:
    svc = service()
    syn = CapturedPacket(tcp(LOCAL, PEER, 40001, 80), outbound=True)
    out = answer(svc, ask(svc, syn), {"verdict": "redirect", "to": PROXY, "permanent": True})
    assert applies(out) == [(Verdict.REDIRECT, True, Target.parse(PROXY))]
    assert assert_identity(svc)["rerouted"] == 1


def test_a_reroute_after_the_first_packet_is_a_permanent_block() -> None:
    svc = service()
    later = CapturedPacket(tcp(LOCAL, PEER, 40002, 80, flags=ACK), outbound=True)
    out = answer(svc, ask(svc, later), {"verdict": "redirect", "to": PROXY})
    assert applies(out) == [(Verdict.BLOCK, True, None)] and protocol_errors(out) == []
    assert assert_identity(svc)["blocked"] == 1


def test_invalid_reroutes_get_the_policy_and_a_protocol_error() -> None:
    cases = [
        # no nameserver configured
        (service(nameservers=()), outbound_udp(), {"verdict": "reroute_to_nameserver"}, "no nameserver"),
        # no tunnel configured
        (service(), outbound_udp(), {"verdict": "reroute_to_tunnel"}, "no tunnel"),
        # inbound
        (
            service(),
            CapturedPacket(udp(PEER, LOCAL, 53, 40000), outbound=False),
            {"verdict": "redirect", "to": PROXY},
            "outbound",
        ),
        # not TCP or UDP
        (
            service(),
            CapturedPacket(bytes.fromhex("450000140000000040010000c6120001c6120002"), outbound=True),
            {"verdict": "redirect", "to": PROXY},
            "TCP and UDP",
        ),
        # redirect without a target, or of the other IP version
        (service(), outbound_udp(), {"verdict": "redirect"}, "needs"),
        (service(), outbound_udp(), {"verdict": "redirect", "to": "[::1]:53"}, "IP version"),
        # "to" with another verdict
        (service(), outbound_udp(), {"verdict": "accept", "to": PROXY}, "only with redirect"),
        # a backend that cannot rewrite
        (service(can_reroute=False), outbound_udp(), {"verdict": "redirect", "to": PROXY}, "not offer"),
    ]
    for svc, packet, result, why in cases:
        out = answer(svc, ask(svc, packet), result)
        assert applies(out) == [(Verdict.BLOCK, False, None)], result
        (message,) = protocol_errors(out)
        assert why in message, (result, message)
        stats = assert_identity(svc)
        assert (stats["default_invalid"], stats["rerouted"]) == (1, 0)
