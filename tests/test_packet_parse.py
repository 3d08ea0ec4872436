"""The 5-tuple read straight from raw bytes."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from pmk.packet.parse import parse_flow
from tests.packets import ICMP, TCP, UDP, hop_by_hop, ip_packet, tcp, udp


def test_ipv4_tcp_flow_and_key_in_both_directions() -> None:
    raw = tcp("198.18.0.1", "198.18.0.2", 40000, 80)
    flow = parse_flow(raw)
    assert flow is not None
    assert (flow.ip_version, flow.protocol, flow.src_port, flow.dst_port) == (4, TCP, 40000, 80)
    outbound = flow.key(outbound=True)
    assert outbound.local_ip == ipaddress.ip_address("198.18.0.1").packed
    assert outbound.local_port == 40000
    reply = parse_flow(tcp("198.18.0.2", "198.18.0.1", 80, 40000))
    assert reply is not None
    # The reply, seen inbound, has the same key as the request seen outbound.
    assert reply.key(outbound=False) == outbound


def test_ipv6_udp_behind_an_extension_header() -> None:
    plain = udp("fd00::1", "fd00::2", 5353, 53)
    flow = parse_flow(plain)
    assert flow is not None and (flow.ip_version, flow.src_port, flow.dst_port) == (6, 5353, 53)
    datagram = plain[40:]
    with_hop = ip_packet("fd00::1", "fd00::2", UDP, datagram, extension=hop_by_hop(UDP))
    flow = parse_flow(with_hop)
    assert flow is not None
    assert (flow.protocol, flow.src_port, flow.dst_port, flow.transport_offset) == (UDP, 5353, 53, 48)


def test_icmp_has_no_ports() -> None:
    flow = parse_flow(ip_packet("198.18.0.1", "198.18.0.2", ICMP, bytes([8, 0, 0, 0, 0, 1, 0, 1])))
    assert flow is not None and flow.src_port == flow.dst_port == 0


def test_later_ipv4_fragment_has_no_transport_header() -> None:
    raw = bytearray(udp("198.18.0.1", "198.18.0.2", 1, 2))
    raw[6:8] = (185).to_bytes(2, "big")  # fragment offset 185 * 8
    flow = parse_flow(bytes(raw))
    assert flow is not None and flow.transport_offset == -1 and flow.src_port == 0


def test_truncated_and_foreign_bytes_are_unreadable() -> None:
    raw = tcp("198.18.0.1", "198.18.0.2", 1, 2)
    assert parse_flow(raw[:19]) is None
    assert parse_flow(raw[:22]) is None  # IP header whole, ports cut
    assert parse_flow(b"") is None
    assert parse_flow(b"\x10" * 60) is None  # IP version 1


@given(st.binary(max_size=128))
def test_any_bytes_give_a_flow_or_none(data: bytes) -> None:
    flow = parse_flow(data)
    if flow is not None:
        assert flow.ip_version in (4, 6)
        assert 0 <= flow.src_port <= 65535 and 0 <= flow.dst_port <= 65535
