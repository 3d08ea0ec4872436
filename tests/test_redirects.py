"""The divert redirect table, as playbooks on a fake clock."""

from __future__ import annotations

import ipaddress

from pmk.config import REDIRECT_IDLE_TCP, REDIRECT_IDLE_UDP, REDIRECT_LINGER
from pmk.core.redirects import RedirectTable
from pmk.packet.parse import Flow, parse_flow
from pmk.verdicts import ConnKey, Target, conn_key_from_strings
from tests.packets import ACK, FIN, RST, SYN, TCP, UDP, tcp, udp

APP, PEER = "198.18.0.1", "198.18.0.2"
RESOLVER = Target.parse("127.0.0.1:5353")
DNS = conn_key_from_strings(UDP, APP, 40000, PEER, 53)
WEB = conn_key_from_strings(TCP, APP, 40001, PEER, 80)
PROXY = Target.parse("127.0.0.1:8080")


def flow_of(packet: bytearray) -> Flow:
    flow = parse_flow(bytes(packet))
    assert flow is not None
    return flow


def ends(packet: bytearray) -> tuple[str, int, str, int]:
    flow = flow_of(packet)
    return (str(ipaddress.ip_address(flow.src)), flow.src_port, str(ipaddress.ip_address(flow.dst)), flow.dst_port)


def test_a_dns_exchange_goes_to_the_resolver_and_comes_back_from_the_peer() -> None:
    table = RedirectTable()
    table.add(DNS, RESOLVER, now=0.0)
    query = bytearray(udp(APP, PEER, 40000, 53, b"query"))
    assert table.outbound(query, flow_of(query), now=0.1) == RESOLVER
    assert ends(query) == (APP, 40000, "127.0.0.1", 5353)
    answer = bytearray(udp("127.0.0.1", APP, 5353, 40000, b"answer"))
    assert table.inbound(answer, flow_of(answer), now=0.2) == DNS
    assert ends(answer) == (PEER, 53, APP, 40000)


def test_other_traffic_is_left_alone() -> None:
    table = RedirectTable()
    table.add(DNS, RESOLVER, now=0.0)
    for raw in (
        udp(APP, PEER, 40001, 53),  # another local port
        udp(APP, "198.18.0.3", 40000, 53),  # another peer from the same socket
        tcp(APP, PEER, 40000, 53),  # another protocol
    ):
        packet = bytearray(raw)
        assert table.outbound(packet, flow_of(packet), now=0.1) is None and packet == raw
    for raw in (udp("127.0.0.1", APP, 5354, 40000), udp("127.0.0.2", APP, 5353, 40000), udp(PEER, APP, 53, 40000)):
        packet = bytearray(raw)
        assert table.inbound(packet, flow_of(packet), now=0.1) is None and packet == raw


def test_udp_idles_out_and_traffic_keeps_it_alive() -> None:
    table = RedirectTable()
    table.add(DNS, RESOLVER, now=0.0)
    query = bytearray(udp(APP, PEER, 40000, 53))
    table.outbound(query, flow_of(query), now=REDIRECT_IDLE_UDP - 1)
    assert table.expire(now=REDIRECT_IDLE_UDP + 1) == []
    assert table.expire(now=2 * REDIRECT_IDLE_UDP) == [DNS]
    assert len(table) == 0 and table.get(DNS) is None
    late = bytearray(udp("127.0.0.1", APP, 5353, 40000))
    assert table.inbound(late, flow_of(late), now=2 * REDIRECT_IDLE_UDP) is None


def test_tcp_ends_a_little_after_fins_both_ways() -> None:
    table = RedirectTable()
    table.add(WEB, PROXY, now=0.0)
    steps = [
        (True, SYN), (False, SYN | ACK), (True, ACK), (True, FIN | ACK), (False, ACK), (False, FIN | ACK),
    ]  # fmt: skip
    now = 0.0
    for outbound, flags in steps:
        now += 1.0
        if outbound:
            packet = bytearray(tcp(APP, PEER, 40001, 80, flags=flags))
            assert table.outbound(packet, flow_of(packet), now) == PROXY
        else:
            packet = bytearray(tcp("127.0.0.1", APP, 8080, 40001, flags=flags))
            assert table.inbound(packet, flow_of(packet), now) == WEB
    # The last ACK still goes to the proxy, and does not keep the entry alive.
    last = bytearray(tcp(APP, PEER, 40001, 80, flags=ACK))
    assert table.outbound(last, flow_of(last), now + 1) == PROXY
    assert table.expire(now + REDIRECT_LINGER - 0.5) == []
    assert table.expire(now + REDIRECT_LINGER) == [WEB]


def test_a_reset_either_way_ends_tcp_at_once_after_being_rewritten() -> None:
    for outbound in (True, False):
        table = RedirectTable()
        table.add(WEB, PROXY, now=0.0)
        if outbound:
            packet = bytearray(tcp(APP, PEER, 40001, 80, flags=RST))
            assert table.outbound(packet, flow_of(packet), now=5.0) == PROXY
        else:
            packet = bytearray(tcp("127.0.0.1", APP, 8080, 40001, flags=RST | ACK))
            assert table.inbound(packet, flow_of(packet), now=5.0) == WEB
            assert ends(packet) == (PEER, 80, APP, 40001)
        assert table.expire(now=5.0) == [WEB]


def test_tcp_without_end_idles_out() -> None:
    table = RedirectTable()
    table.add(WEB, PROXY, now=0.0)
    assert table.expire(REDIRECT_IDLE_TCP - 1) == []
    assert table.expire(REDIRECT_IDLE_TCP) == [WEB]


def test_one_socket_two_peers_one_target_replies_name_the_latest_peer() -> None:
    table = RedirectTable()
    other = DNS._replace(remote_ip=bytes([198, 18, 0, 3]))
    table.add(DNS, RESOLVER, now=0.0)
    table.add(other, RESOLVER, now=1.0)
    answer = bytearray(udp("127.0.0.1", APP, 5353, 40000))
    assert table.inbound(answer, flow_of(answer), now=2.0) == other
    # Forgetting the older one leaves the newer one's replies working.
    assert table.remove(DNS) and not table.remove(DNS)
    answer = bytearray(udp("127.0.0.1", APP, 5353, 40000))
    assert table.inbound(answer, flow_of(answer), now=3.0) == other


def test_a_new_target_replaces_the_old_one() -> None:
    table = RedirectTable()
    table.add(DNS, RESOLVER, now=0.0)
    table.add(DNS, Target.parse("127.0.0.1:53"), now=1.0)
    assert table.get(DNS) == Target.parse("127.0.0.1:53") and len(table) == 1
    old_reply = bytearray(udp("127.0.0.1", APP, 5353, 40000))
    assert table.inbound(old_reply, flow_of(old_reply), now=2.0) is None
    table.clear()
    assert len(table) == 0


def test_ipv6_both_ways() -> None:
    key: ConnKey = conn_key_from_strings(UDP, "fd00:18::1", 40000, "fd00:18::2", 53)
    table = RedirectTable()
    table.add(key, Target.parse("[::1]:5353"), now=0.0)
    query = bytearray(udp("fd00:18::1", "fd00:18::2", 40000, 53))
    assert table.outbound(query, flow_of(query), now=0.0) is not None
    assert ends(query) == ("fd00:18::1", 40000, "::1", 5353)
    answer = bytearray(udp("::1", "fd00:18::1", 5353, 40000))
    assert table.inbound(answer, flow_of(answer), now=0.0) == key
    assert ends(answer) == ("fd00:18::2", 53, "fd00:18::1", 40000)
