"""Hand-built IP packets for tests that need no network."""

from __future__ import annotations

import ipaddress

from pmk.packet.checksum import checksum, pseudo_header_sum

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
SYN, ACK, RST, FIN = 0x02, 0x10, 0x04, 0x01


def ip_packet(src: str, dst: str, protocol: int, payload: bytes, *, extension: bytes = b"") -> bytes:
    """An IPv4 or IPv6 packet around ``payload``; IPv6 may carry one extension header block."""
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    if len(s) == 4:
        header = bytearray(20)
        header[0] = 0x45
        header[2:4] = (20 + len(payload)).to_bytes(2, "big")
        header[8] = 64
        header[9] = protocol
        header[12:16], header[16:20] = s, d
        header[10:12] = checksum(bytes(header)).to_bytes(2, "big")
        return bytes(header) + payload
    header = bytearray(40)
    header[0] = 0x60
    header[4:6] = (len(extension) + len(payload)).to_bytes(2, "big")
    header[6] = 0 if extension else protocol  # an extension block starts with hop-by-hop
    header[7] = 64
    header[8:24], header[24:40] = s, d
    return bytes(header) + extension + payload


def hop_by_hop(next_header: int) -> bytes:
    """An 8-byte IPv6 hop-by-hop options header (PadN only)."""
    return bytes((next_header, 0, 1, 4, 0, 0, 0, 0))


def tcp_segment(
    src: str, dst: str, sport: int, dport: int, *, flags: int = SYN, seq: int = 1000, ack: int = 0, data: bytes = b""
) -> bytes:
    segment = bytearray(20) + data
    segment[0:2], segment[2:4] = sport.to_bytes(2, "big"), dport.to_bytes(2, "big")
    segment[4:8], segment[8:12] = seq.to_bytes(4, "big"), ack.to_bytes(4, "big")
    segment[12] = 5 << 4
    segment[13] = flags
    segment[14:16] = (65535).to_bytes(2, "big")
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    segment[16:18] = checksum(bytes(segment), pseudo_header_sum(s, d, TCP, len(segment))).to_bytes(2, "big")
    return bytes(segment)


def tcp(src: str, dst: str, sport: int, dport: int, **kwargs: object) -> bytes:
    return ip_packet(src, dst, TCP, tcp_segment(src, dst, sport, dport, **kwargs))  # type: ignore[arg-type]


def udp(src: str, dst: str, sport: int, dport: int, data: bytes = b"hello") -> bytes:
    datagram = bytearray(8) + data
    datagram[0:2], datagram[2:4] = sport.to_bytes(2, "big"), dport.to_bytes(2, "big")
    datagram[4:6] = len(datagram).to_bytes(2, "big")
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    datagram[6:8] = checksum(bytes(datagram), pseudo_header_sum(s, d, UDP, len(datagram))).to_bytes(2, "big")
    return ip_packet(src, dst, UDP, bytes(datagram))
