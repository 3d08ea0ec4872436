"""Reroute verdicts on the wire: targets, their resolution and decide results."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pmk.verdicts import (
    ConnKey,
    Decision,
    RerouteTargets,
    Target,
    Verdict,
    parse_decision,
)

V4 = ConnKey(17, bytes([198, 18, 0, 1]), 40000, bytes([198, 18, 0, 2]), 53)
V6 = ConnKey(6, ipaddress.ip_address("fd00:18::1").packed, 40000, ipaddress.ip_address("fd00:18::2").packed, 80)
TARGETS = RerouteTargets(
    nameservers=(Target.parse("127.0.0.1:5353"), Target.parse("[::1]:5353")),
    tunnels=(Target.parse("127.0.0.1:717"),),
)


def test_target_text_round_trip() -> None:
    assert Target.parse("127.0.0.1:53") == Target(bytes([127, 0, 0, 1]), 53)
    assert Target.parse("[fd00::1]:8080") == Target(ipaddress.ip_address("fd00::1").packed, 8080)
    assert str(Target.parse("[fd00::1]:8080")) == "[fd00::1]:8080"
    assert str(Target.parse("10.0.0.1:1")) == "10.0.0.1:1"


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1",
        "127.0.0.1:",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "fd00::1:53",
        "[127.0.0.1]:53",
        "host:53",
        "[fd00::1]53",
        ":53",
        "127.0.0.1: 53",
        53,
        None,
        "127.0.0.1:-1",
    ],
)
def test_bad_targets_are_refused(text: object) -> None:
    with pytest.raises(ValueError):
        Target.parse(text)


@given(st.ip_addresses(), st.integers(1, 65535))
def test_any_address_and_port_round_trips(address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    target = Target(address.packed, port)
    assert Target.parse(str(target)) == target


def test_filter_verdicts_are_the_default_parse() -> None:
    assert Verdict.parse("accept") is Verdict.ACCEPT
    for text in ("redirect", "reroute_to_nameserver", "reroute_to_tunnel"):
        with pytest.raises(ValueError):
            Verdict.parse(text)


def test_reroutes_resolve_per_ip_version() -> None:
    assert parse_decision({"verdict": "reroute_to_nameserver"}, TARGETS, V4, True) == Decision(
        Verdict.REROUTE_TO_NAMESERVER, True, Target.parse("127.0.0.1:5353")
    )
    assert parse_decision({"verdict": "reroute_to_nameserver"}, TARGETS, V6, True).target == Target.parse("[::1]:5353")
    assert parse_decision({"verdict": "reroute_to_tunnel", "permanent": False}, TARGETS, V4, True) == Decision(
        Verdict.REROUTE_TO_TUNNEL, True, Target.parse("127.0.0.1:717")
    )


def test_redirect_takes_its_target() -> None:
    decision = parse_decision({"verdict": "redirect", "to": "[fd00::9]:3128", "permanent": True}, TARGETS, V6, True)
    assert decision == Decision(Verdict.REDIRECT, True, Target.parse("[fd00::9]:3128"))


@pytest.mark.parametrize(
    ("result", "key", "outbound", "why"),
    [
        ({"verdict": "reroute_to_tunnel"}, V6, True, "no tunnel for IPv6"),
        ({"verdict": "redirect"}, V4, True, "needs"),
        ({"verdict": "redirect", "to": "[::1]:53"}, V4, True, "IP version"),
        ({"verdict": "redirect", "to": "nonsense"}, V4, True, "ADDR:PORT"),
        ({"verdict": "reroute_to_nameserver", "to": "127.0.0.1:53"}, V4, True, "only with redirect"),
        ({"verdict": "accept", "to": "127.0.0.1:53"}, V4, True, "only with redirect"),
        ({"verdict": "reroute_to_nameserver"}, V4, False, "outbound"),
        ({"verdict": "reroute_to_nameserver"}, V4._replace(protocol=1), True, "TCP and UDP"),
        ({"verdict": "accept", "permanent": 1}, V4, True, "boolean"),
        ({"verdict": "allow"}, V4, True, "unknown verdict"),
        (["accept"], V4, True, "map"),
    ],
)
def test_invalid_decisions_say_why(result: object, key: ConnKey, outbound: bool, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_decision(result, TARGETS, key, outbound)


def test_nothing_configured_makes_reroutes_invalid() -> None:
    with pytest.raises(ValueError, match="no nameserver for IPv4"):
        parse_decision({"verdict": "reroute_to_nameserver"}, RerouteTargets(), V4, True)


def test_one_target_per_ip_version() -> None:
    with pytest.raises(ValueError, match="one nameserver"):
        RerouteTargets(nameservers=(Target.parse("127.0.0.1:53"), Target.parse("127.0.0.2:53")))


def test_hello_lists_only_the_reroutes_that_can_be_carried_out() -> None:
    assert RerouteTargets().verdicts() == [Verdict.ACCEPT, Verdict.BLOCK, Verdict.DROP, Verdict.REDIRECT]
    assert Verdict.REROUTE_TO_NAMESERVER in TARGETS.verdicts() and Verdict.REROUTE_TO_TUNNEL in TARGETS.verdicts()
    assert TARGETS.verdicts(redirect=False) == [Verdict.ACCEPT, Verdict.BLOCK, Verdict.DROP]


def test_a_keys_packed_form_is_its_fields_in_cache_order_and_reads_back() -> None:
    # protocol, local ip, remote ip, then the ports: an outbound IPv4 packet's bytes 12..24 in that order
    ports = (40000).to_bytes(2, "big") + (53).to_bytes(2, "big")
    assert V4.packed() == bytes([17, 198, 18, 0, 1, 198, 18, 0, 2]) + ports
    assert len(V6.packed()) == 37 and V6.packed()[1:17] == V6.local_ip and V6.packed()[-2:] == b"\x00\x50"
    for key in (V4, V6):
        assert ConnKey.of(key.packed()) == key and type(ConnKey.of(key.packed())) is ConnKey
