"""Read the connection 5-tuple straight from raw IP bytes.

This runs once per captured packet, so it slices bytes and never builds a
packet object. Anything it cannot read yields None and the packet is treated
as unparseable by the caller (it still ends in an outcome).

Most packets are *simple*: IPv4 without options, not a fragment, TCP or UDP.
Their key is read from fixed offsets (``simple_ipv4_key`` for one packet,
``simple_ipv4_runs`` for a receive buffer of many) in the verdict cache's
form (``ConnKey.packed``); anything else goes through ``parse_flow``.
"""

from __future__ import annotations

from collections.abc import Iterable

from pmk.packet.captured import CacheRun, PackedKey
from pmk.verdicts import KEY_PACKERS, ConnKey

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

    def packed(self, outbound: bool) -> PackedKey:
        """``key(outbound).packed()`` without building the key: what a cache lookup needs."""
        pack = KEY_PACKERS[len(self.src)]
        if outbound:
            return pack(self.protocol, self.src, self.dst, self.src_port, self.dst_port)
        return pack(self.protocol, self.dst, self.src, self.dst_port, self.src_port)


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


def conn_key(raw: bytes, outbound: bool) -> ConnKey | None:
    """The packet's connection key, local side first; None when it cannot be read."""
    flow = parse_flow(raw)
    return flow.key(outbound) if flow is not None else None


def simple_ipv4_key(raw: bytes, outbound: bool) -> PackedKey | None:
    """The key of a simple packet (see the module docstring), local side first; None for any other packet.

    The key is ``ConnKey.packed``'s form. Bytes 12-24 of the packet are
    source, destination, source and destination port: that form's order for
    an outbound packet, so that one costs a single concatenation; an inbound
    one is put together from four slices.
    """
    if len(raw) < 24 or raw[0] != 0x45:
        return None
    protocol = raw[9]
    if (protocol != TCP and protocol != UDP) or raw[6] & 0x1F or raw[7]:
        return None
    if outbound:
        return raw[9:10] + raw[12:24]
    return raw[9:10] + raw[16:20] + raw[12:16] + raw[22:24] + raw[20:22]


def simple_ipv4_runs(buf: bytearray, total: int, outbound: Iterable[int]) -> list[CacheRun] | None:
    """Packets packed back to back in ``buf[:total]`` as runs of one connection each.

    ``outbound`` gives one truth value per packet; a run is (key, packets,
    bytes, outbound). None unless every packet is simple and the IP lengths
    add up to ``total`` exactly, and None for a batch with a TCP FIN or RST
    (rare: the per-packet path notes connection ends). The test is
    ``simple_ipv4_key``'s, written out over the buffer: only a 12-byte slice
    is taken per packet, and a key is built once per run, so a batch that
    turns out to be cached costs no per-packet object.
    """
    runs: list[CacheRun] = []
    append = runs.append
    last = None
    last_proto = -1
    last_out = False
    key: PackedKey = b""
    n = size = offset = 0
    try:
        for flag in outbound:
            out = bool(flag)
            if offset + 24 > total or buf[offset] != 0x45:
                return None
            proto = buf[offset + 9]
            # Literals, as this runs per packet: TCP (6) without FIN or RST (0x05 in byte 13 of its
            # header; a packet too short for one reads the next packet's byte: a harmless None), or UDP (17).
            if proto == 6:
                if buf[offset + 33] & 0x05:
                    return None
            elif proto != 17:
                return None
            if buf[offset + 6] & 0x1F or buf[offset + 7]:
                return None
            length = buf[offset + 2] << 8 | buf[offset + 3]
            end = offset + length if length else total  # a GSO aggregate may carry 0: it fills the rest
            ends = buf[offset + 12 : offset + 24]  # source, destination, source port, destination port
            if ends != last or proto != last_proto or out != last_out:
                if n:
                    append((key, n, size, last_out))
                    n = size = 0
                last, last_proto, last_out = ends, proto, out
                if out:
                    key = bytes((proto,)) + ends
                else:
                    key = bytes((proto,)) + ends[4:8] + ends[0:4] + ends[10:12] + ends[8:10]
            n += 1
            size += end - offset
            offset = end
    except IndexError:  # a cut packet at the very end of the buffer
        return None
    if offset != total or not n:
        return None
    append((key, n, size, last_out))
    return runs
