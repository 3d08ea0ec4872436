"""Read the connection 5-tuple straight from raw IP bytes.

This runs once per captured packet, so it slices bytes and never builds a
packet object. Anything it cannot read yields None and the packet is treated
as unparseable by the caller (it still ends in an outcome).
"""

from __future__ import annotations

from pmk.verdicts import ConnKey

TCP = 6
UDP = 17
ICMP = 1
ICMPV6 = 58
# Protocols whose first four transport bytes are source and destination port.
PORT_PROTOCOLS = frozenset({TCP, UDP, 132, 136})  # + SCTP, UDP-Lite
# IPv6 extension headers walked to find the transport header.
_IPV6_EXTENSIONS = frozenset({0, 43, 60, 51, 44})
_IPV6_FRAGMENT = 44
_IPV6_AH = 51


class Flow:
    """The fields pmk needs from one packet: 5-tuple, versions, sizes."""

    __slots__ = ("dst", "dst_port", "ip_version", "protocol", "src", "src_port", "transport_offset")

    def __init__(
        self,
        ip_version: int,
        protocol: int,
        src: bytes,
        dst: bytes,
        src_port: int,
        dst_port: int,
        transport_offset: int,
    ) -> None:
        self.ip_version = ip_version
        self.protocol = protocol
        self.src = src
        self.dst = dst
        self.src_port = src_port
        self.dst_port = dst_port
        self.transport_offset = transport_offset

    def key(self, outbound: bool) -> ConnKey:
        """The direction-free connection key: local side first."""
        if outbound:
            return ConnKey(self.protocol, self.src, self.src_port, self.dst, self.dst_port)
        return ConnKey(self.protocol, self.dst, self.dst_port, self.src, self.src_port)


def parse_flow(raw: bytes | bytearray | memoryview) -> Flow | None:
    """Return the packet's flow, or None if the bytes are not a readable IP packet."""
    n = len(raw)
    if n < 1:
        return None
    version = raw[0] >> 4
    if version == 4:
        if n < 20:
            return None
        ihl = (raw[0] & 0x0F) * 4
        if ihl < 20 or n < ihl:
            return None
        protocol = raw[9]
        src = bytes(raw[12:16])
        dst = bytes(raw[16:20])
        # Later fragments carry no transport header.
        later_fragment = ((raw[6] & 0x1F) << 8 | raw[7]) != 0
        offset = -1 if later_fragment else ihl
    elif version == 6:
        if n < 40:
            return None
        protocol = raw[6]
        src = bytes(raw[8:24])
        dst = bytes(raw[24:40])
        offset = 40
        while protocol in _IPV6_EXTENSIONS:
            if n < offset + 8:
                return None
            next_header = raw[offset]
            if protocol == _IPV6_FRAGMENT:
                fragment_offset = (raw[offset + 2] << 8 | raw[offset + 3]) >> 3
                length = 8
                if fragment_offset:
                    protocol = next_header
                    offset = -1
                    break
            elif protocol == _IPV6_AH:
                length = (raw[offset + 1] + 2) * 4
            else:
                length = (raw[offset + 1] + 1) * 8
            protocol = next_header
            offset += length
    else:
        return None
    src_port = dst_port = 0
    if offset >= 0 and protocol in PORT_PROTOCOLS:
        if n < offset + 4:
            return None
        src_port = raw[offset] << 8 | raw[offset + 1]
        dst_port = raw[offset + 2] << 8 | raw[offset + 3]
    return Flow(version, protocol, src, dst, src_port, dst_port, offset)
