"""Build the packet that rejects another one: a TCP reset or an ICMP unreachable.

``block`` must fail the peer fast instead of letting it time out, as a
kernel firewall's REJECT does. The answer is addressed to the packet's
sender, so it travels in the opposite direction of the packet it answers.
"""

from __future__ import annotations

from pmk.packet.checksum import checksum, pseudo_header_sum
from pmk.packet.parse import ICMP, ICMPV6, TCP, Flow

_TCP_FIN, _TCP_SYN, _TCP_RST, _TCP_ACK = 0x01, 0x02, 0x04, 0x10
_ICMP_UNREACHABLE, _ICMP_PORT_UNREACHABLE = 3, 3
_ICMPV6_UNREACHABLE, _ICMPV6_PORT_UNREACHABLE = 1, 4
_ICMP_ERROR_TYPES_V4 = frozenset({3, 4, 5, 11, 12})
# RFC 1812 and RFC 4443: quote as much of the offending packet as fits.
_ICMPV4_QUOTE = 576 - 20 - 8
_ICMPV6_QUOTE = 1280 - 40 - 8
_TTL = 64


def reject_packet(raw: bytes, flow: Flow) -> bytes | None:
    """Return the rejecting reply to ``raw``, or None where none may be sent.

    No reply is sent to a TCP reset, to an ICMP error, or to a fragment
    without its transport header (RFC 1122 and 4443 forbid errors about errors).
    """
    if flow.protocol == TCP:
        return _tcp_reset(raw, flow)
    if flow.protocol in (ICMP, ICMPV6) and flow.transport_offset >= 0 and _is_icmp_error(raw, flow):
        return None
    return _icmp_unreachable(raw, flow)


def _is_icmp_error(raw: bytes, flow: Flow) -> bool:
    """True for ICMP error messages (and truncated ICMP, which cannot be told apart)."""
    if len(raw) <= flow.transport_offset:
        return True
    icmp_type = raw[flow.transport_offset]
    if flow.protocol == ICMP:
        return icmp_type in _ICMP_ERROR_TYPES_V4
    return icmp_type < 128


def _ip_header(flow: Flow, protocol: int, payload_length: int) -> bytes:
    """An IP header from the packet's destination back to its source."""
    if flow.ip_version == 4:
        header = bytearray(20)
        header[0] = 0x45
        header[2:4] = (20 + payload_length).to_bytes(2, "big")
        header[6] = 0x40  # don't fragment
        header[8] = _TTL
        header[9] = protocol
        header[12:16] = flow.dst
        header[16:20] = flow.src
        header[10:12] = checksum(bytes(header)).to_bytes(2, "big")
        return bytes(header)
    header = bytearray(40)
    header[0] = 0x60
    header[4:6] = payload_length.to_bytes(2, "big")
    header[6] = protocol
    header[7] = _TTL
    header[8:24] = flow.dst
    header[24:40] = flow.src
    return bytes(header)


def _tcp_reset(raw: bytes, flow: Flow) -> bytes | None:
    offset = flow.transport_offset
    if offset < 0 or len(raw) < offset + 20:
        return None
    flags = raw[offset + 13]
    if flags & _TCP_RST:
        return None
    seq = int.from_bytes(raw[offset + 4 : offset + 8], "big")
    ack = int.from_bytes(raw[offset + 8 : offset + 12], "big")
    data_offset = (raw[offset + 12] >> 4) * 4
    total = _ip_payload_end(raw, flow)
    payload_length = max(0, total - offset - data_offset)
    segment = bytearray(20)
    segment[0:2] = flow.dst_port.to_bytes(2, "big")
    segment[2:4] = flow.src_port.to_bytes(2, "big")
    if flags & _TCP_ACK:
        # RFC 793: a reset answering an ACK takes its sequence number from it.
        segment[4:8] = ack.to_bytes(4, "big")
        segment[13] = _TCP_RST
    else:
        consumed = payload_length + (1 if flags & _TCP_SYN else 0) + (1 if flags & _TCP_FIN else 0)
        segment[8:12] = ((seq + consumed) & 0xFFFFFFFF).to_bytes(4, "big")
        segment[13] = _TCP_RST | _TCP_ACK
    segment[12] = 5 << 4
    start = pseudo_header_sum(flow.dst, flow.src, TCP, len(segment))
    segment[16:18] = checksum(bytes(segment), start).to_bytes(2, "big")
    return _ip_header(flow, TCP, len(segment)) + bytes(segment)


def _icmp_unreachable(raw: bytes, flow: Flow) -> bytes:
    end = _ip_payload_end(raw, flow)
    if flow.ip_version == 4:
        quote = bytes(raw[: min(end, _ICMPV4_QUOTE)])
        message = bytearray(8) + quote
        message[0] = _ICMP_UNREACHABLE
        message[1] = _ICMP_PORT_UNREACHABLE
        message[2:4] = checksum(bytes(message)).to_bytes(2, "big")
        return _ip_header(flow, ICMP, len(message)) + bytes(message)
    quote = bytes(raw[: min(end, _ICMPV6_QUOTE)])
    message = bytearray(8) + quote
    message[0] = _ICMPV6_UNREACHABLE
    message[1] = _ICMPV6_PORT_UNREACHABLE
    start = pseudo_header_sum(flow.dst, flow.src, ICMPV6, len(message))
    message[2:4] = checksum(bytes(message), start).to_bytes(2, "big")
    return _ip_header(flow, ICMPV6, len(message)) + bytes(message)


def _ip_payload_end(raw: bytes, flow: Flow) -> int:
    """Where the packet really ends: the IP length field, not trailing padding."""
    if flow.ip_version == 4:
        return min(len(raw), int.from_bytes(raw[2:4], "big"))
    return min(len(raw), 40 + int.from_bytes(raw[4:6], "big"))
