"""NAT rewrites checked against dpkt's own checksum computation."""

from __future__ import annotations

import dpkt  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st

from pmk.packet.nat import rewrite_destination, rewrite_source
from pmk.packet.parse import parse_flow

ports = st.integers(0, 65535)
payloads = st.binary(max_size=300)


def build(version: int, protocol: int, src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    """A packet with dpkt's checksums (it fills in any checksum left 0)."""
    if protocol == dpkt.ip.IP_PROTO_TCP:
        segment: dpkt.Packet = dpkt.tcp.TCP(sport=sport, dport=dport, seq=7, flags=dpkt.tcp.TH_ACK, data=payload)
    else:
        segment = dpkt.udp.UDP(sport=sport, dport=dport, data=payload)
        segment.ulen = 8 + len(payload)
    if version == 4:
        packet: dpkt.Packet = dpkt.ip.IP(src=src, dst=dst, p=protocol, ttl=64, id=1234, data=segment)
        packet.len = 20 + len(bytes(segment))
    else:
        packet = dpkt.ip6.IP6(src=src, dst=dst, nxt=protocol, hlim=64, data=segment)
        packet.plen = len(bytes(segment))
    return bytes(packet)


def dpkt_checksums(raw: bytes) -> tuple[int, int, int, int]:
    """(IP header sum, transport sum) as found, then as dpkt computes them afresh."""
    packet = dpkt.ip.IP(raw) if raw[0] >> 4 == 4 else dpkt.ip6.IP6(raw)
    found_ip = getattr(packet, "sum", 0)
    found = packet.data.sum
    if raw[0] >> 4 == 4:
        packet.sum = 0
    packet.data.sum = 0
    again = dpkt.ip.IP(bytes(packet)) if raw[0] >> 4 == 4 else dpkt.ip6.IP6(bytes(packet))
    computed = again.data.sum
    if isinstance(packet.data, dpkt.udp.UDP) and computed == 0:
        computed = 0xFFFF  # RFC 768 (dpkt's IPv6 path leaves a computed 0 as it is)
    return found_ip, found, getattr(again, "sum", 0), computed


def endpoints(version: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=4 if version == 4 else 16, max_size=4 if version == 4 else 16)


@st.composite
def cases(draw: st.DrawFn) -> tuple[bytes, bytes, int, bool]:
    version = draw(st.sampled_from([4, 6]))
    protocol = draw(st.sampled_from([dpkt.ip.IP_PROTO_TCP, dpkt.ip.IP_PROTO_UDP]))
    raw = build(
        version,
        protocol,
        draw(endpoints(version)),
        draw(endpoints(version)),
        draw(ports),
        draw(ports),
        draw(payloads),
    )
    return raw, draw(endpoints(version)), draw(ports), draw(st.booleans())


@settings(max_examples=400)
@given(cases())
def test_rewrite_keeps_checksums_valid(case: tuple[bytes, bytes, int, bool]) -> None:
    raw, ip, port, destination = case
    flow = parse_flow(raw)
    assert flow is not None
    packet = bytearray(raw)
    rewrite = rewrite_destination if destination else rewrite_source
    assert rewrite(packet, flow, ip, port)
    after = parse_flow(bytes(packet))
    assert after is not None
    if destination:
        assert (after.dst, after.dst_port, after.src, after.src_port) == (ip, port, flow.src, flow.src_port)
    else:
        assert (after.src, after.src_port, after.dst, after.dst_port) == (ip, port, flow.dst, flow.dst_port)
    found_ip, found, computed_ip, computed = dpkt_checksums(bytes(packet))
    assert (found_ip, found) == (computed_ip, computed)
    # The payload is untouched.
    payload_at = flow.transport_offset + (20 if flow.protocol == dpkt.ip.IP_PROTO_TCP else 8)
    assert packet[payload_at:] == raw[payload_at:]


@given(cases())
def test_rewriting_back_restores_the_packet(case: tuple[bytes, bytes, int, bool]) -> None:
    raw, ip, port, _ = case
    flow = parse_flow(raw)
    assert flow is not None
    packet = bytearray(raw)
    assert rewrite_destination(packet, flow, ip, port)
    assert rewrite_destination(packet, flow, flow.dst, flow.dst_port)
    udp_zero = (
        flow.protocol == dpkt.ip.IP_PROTO_UDP and raw[flow.transport_offset + 6 : flow.transport_offset + 8] == b"\0\0"
    )
    assert bytes(packet) == raw or udp_zero  # a computed 0 comes back as 0xFFFF


def test_udp_over_ipv4_without_checksum_keeps_none() -> None:
    raw = bytearray(build(4, dpkt.ip.IP_PROTO_UDP, b"\xc6\x12\0\1", b"\xc6\x12\0\2", 40000, 53, b"query"))
    flow = parse_flow(bytes(raw))
    assert flow is not None
    raw[flow.transport_offset + 6 : flow.transport_offset + 8] = b"\0\0"
    assert rewrite_destination(raw, flow, b"\x7f\0\0\1", 5353)
    assert raw[flow.transport_offset + 6 : flow.transport_offset + 8] == b"\0\0"
    found_ip, _, computed_ip, _ = dpkt_checksums(bytes(raw))
    assert found_ip == computed_ip


def test_what_cannot_be_rewritten_is_left_alone() -> None:
    src, dst = b"\xc6\x12\0\1", b"\xc6\x12\0\2"
    icmp = bytes(dpkt.ip.IP(src=src, dst=dst, p=1, data=dpkt.icmp.ICMP(type=8, data=dpkt.icmp.ICMP.Echo(id=1))))
    fragment = bytearray(build(4, dpkt.ip.IP_PROTO_UDP, src, dst, 1, 2, b"x" * 40))
    fragment[6] |= 0x20  # more fragments
    later = bytearray(fragment)
    later[6:8] = b"\0\x10"  # a later fragment: no transport header
    short = build(4, dpkt.ip.IP_PROTO_TCP, src, dst, 1, 2, b"")[:30]
    v4 = build(4, dpkt.ip.IP_PROTO_TCP, src, dst, 1, 2, b"")
    for raw, ip in ((icmp, dst), (bytes(fragment), dst), (bytes(later), dst), (short, dst), (v4, bytes(16))):
        flow = parse_flow(raw)
        assert flow is not None
        packet = bytearray(raw)
        assert not rewrite_destination(packet, flow, ip, 53)
        assert packet == raw


@given(cases())
def test_a_partial_checksum_stays_the_partial_sum_of_the_new_pseudo_header(
    case: tuple[bytes, bytes, int, bool],
) -> None:
    raw, ip, port, destination = case
    flow = parse_flow(raw)
    assert flow is not None
    packet = bytearray(raw)
    field = flow.transport_offset + (16 if flow.protocol == dpkt.ip.IP_PROTO_TCP else 6)
    length = len(raw) - flow.transport_offset
    # As the kernel leaves it for the card: the folded pseudo-header sum, not complemented.
    packet[field : field + 2] = partial_sum(flow.src, flow.dst, flow.protocol, length).to_bytes(2, "big")
    rewrite = rewrite_destination if destination else rewrite_source
    assert rewrite(packet, flow, ip, port, partial=True)
    src, dst = (flow.src, ip) if destination else (ip, flow.dst)
    assert (
        int.from_bytes(packet[field : field + 2], "big") % 0xFFFF
        == partial_sum(src, dst, flow.protocol, length) % 0xFFFF
    )


def partial_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """dpkt's one's complement sum of the pseudo-header, folded but not complemented."""
    if len(src) == 4:
        header = src + dst + bytes((0, protocol)) + length.to_bytes(2, "big")
    else:
        header = src + dst + length.to_bytes(4, "big") + bytes((0, 0, 0, protocol))
    return int(~dpkt.in_cksum(header) & 0xFFFF)
