"""The packets that carry out ``block``: TCP resets and ICMP unreachables."""

from __future__ import annotations

from pmk.packet.checksum import checksum, pseudo_header_sum
from pmk.packet.parse import parse_flow
from pmk.packet.reject import reject_packet
from tests.packets import ACK, ICMP, ICMPV6, RST, SYN, TCP, ip_packet, tcp, udp


def _reject(raw: bytes) -> bytes | None:
    flow = parse_flow(raw)
    assert flow is not None
    return reject_packet(raw, flow)


def _transport_checksum_ok(reply: bytes) -> bool:
    flow = parse_flow(reply)
    assert flow is not None
    body = reply[flow.transport_offset :]
    start = pseudo_header_sum(flow.src, flow.dst, flow.protocol, len(body)) if flow.protocol != ICMP else 0
    return checksum(body, start) == 0


def test_syn_is_answered_with_rst_ack_to_its_sender() -> None:
    reply = _reject(tcp("198.18.0.1", "198.18.0.2", 40000, 80, flags=SYN, seq=1000))
    assert reply is not None
    flow = parse_flow(reply)
    assert flow is not None
    assert (flow.protocol, flow.src_port, flow.dst_port) == (TCP, 80, 40000)
    assert checksum(reply[:20]) == 0  # IPv4 header checksum
    assert _transport_checksum_ok(reply)
    assert reply[20 + 13] == RST | ACK
    assert int.from_bytes(reply[28:32], "big") == 1001  # acknowledges the SYN


def test_segment_with_ack_gets_a_bare_rst_at_its_ack_number() -> None:
    reply = _reject(tcp("198.18.0.1", "198.18.0.2", 40000, 80, flags=ACK, seq=5, ack=777))
    assert reply is not None
    assert reply[20 + 13] == RST
    assert int.from_bytes(reply[24:28], "big") == 777


def test_no_reset_answers_a_reset() -> None:
    assert _reject(tcp("198.18.0.1", "198.18.0.2", 1, 2, flags=RST)) is None


def test_udp_gets_port_unreachable_quoting_the_datagram() -> None:
    original = udp("198.18.0.1", "198.18.0.2", 5000, 53, b"query")
    reply = _reject(original)
    assert reply is not None
    assert reply[9] == ICMP and reply[20:22] == bytes((3, 3))
    assert reply[12:16] == original[16:20] and reply[16:20] == original[12:16]
    assert reply[28:] == original
    assert _transport_checksum_ok(reply)


def test_ipv6_udp_gets_icmpv6_port_unreachable() -> None:
    original = udp("fd00::1", "fd00::2", 5000, 53)
    reply = _reject(original)
    assert reply is not None
    assert reply[6] == ICMPV6 and reply[40:42] == bytes((1, 4))
    assert _transport_checksum_ok(reply)


def test_no_icmp_error_about_an_icmp_error() -> None:
    unreachable = ip_packet("198.18.0.1", "198.18.0.2", ICMP, bytes([3, 3, 0, 0, 0, 0, 0, 0]))
    assert _reject(unreachable) is None
    echo = ip_packet("198.18.0.1", "198.18.0.2", ICMP, bytes([8, 0, 0, 0, 0, 1, 0, 1]))
    assert _reject(echo) is not None
