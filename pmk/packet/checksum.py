"""Internet checksums (RFC 1071) for the packets pmk writes itself."""

from __future__ import annotations


def ones_complement_sum(data: bytes, start: int = 0) -> int:
    """Fold ``data`` into a 16-bit one's complement sum, seeded with ``start``."""
    if len(data) % 2:
        data = data + b"\x00"
    total = start
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def checksum(data: bytes, start: int = 0) -> int:
    """The checksum field value for ``data``."""
    return ~ones_complement_sum(data, start) & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """Sum of the IPv4 or IPv6 pseudo-header that TCP, UDP and ICMPv6 cover."""
    if len(src) == 4:
        header = src + dst + bytes((0, protocol)) + length.to_bytes(2, "big")
    else:
        header = src + dst + length.to_bytes(4, "big") + b"\x00\x00\x00" + bytes((protocol,))
    return ones_complement_sum(header)
