"""Rewrite the address and port of one end of a TCP or UDP packet, in place.

This is how a redirect is carried out on the divert backend: every packet of
a rerouted connection passes through here, one outbound rewrite of the
destination and one inbound rewrite of the source per packet. So it is
written by hand on a bytearray, touching only the bytes that change: a
packet library would build an object per packet and re-serialise it, and a
full checksum pass costs time in proportion to the payload.

The checksums are updated incrementally (RFC 1624, eqn. 3): a checksum
field ``c`` is, modulo 0xFFFF, minus the sum of the 16-bit words it covers,
and a byte string read as one big-endian integer is congruent modulo 0xFFFF
to the sum of its 16-bit words (2**16 is 1 modulo 0xFFFF). So replacing
words worth ``m`` by words worth ``m2`` turns ``c`` into ``(c + m - m2) %
0xFFFF``, which is already in the canonical range 0..0xFFFE. The TCP and UDP
checksums cover the addresses (pseudo-header) and the ports; the IPv4 header
checksum covers the addresses. A UDP checksum of 0 over IPv4 means "none" and
stays 0; a UDP checksum that comes out 0 is sent as 0xFFFF (RFC 768).

A packet captured on its way out may carry a *partial* checksum (the kernel
left the sum over the segment to the network card): then the field holds
the plain sum of the pseudo-header only, and ``partial=True`` keeps it the
partial sum for the new addresses (the ports are not in it). eBPFDivert
says which it is in the address record's checksum flags.

Fragments are not rewritten (None): later fragments carry no ports, so their
connection cannot be told, and the kernel extension pmk follows blocks them.
"""

from __future__ import annotations

from pmk.packet.parse import TCP, UDP, Flow

_ONES = 0xFFFF
# Where the checksum field is in each transport header, and how long the header must be to hold it.
_CHECKSUM_AT = {TCP: 16, UDP: 6}
_MORE_FRAGMENTS = 0x20


def rewrite_destination(packet: bytearray, flow: Flow, ip: bytes, port: int, partial: bool = False) -> bool:
    """Send ``packet`` to ``ip``:``port`` instead of its destination; False (unchanged) if it cannot be."""
    if flow.ip_version == 4:
        return _rewrite(packet, flow, 16, 2, ip, port, partial)
    return _rewrite(packet, flow, 24, 2, ip, port, partial)


def rewrite_source(packet: bytearray, flow: Flow, ip: bytes, port: int, partial: bool = False) -> bool:
    """Make ``packet`` come from ``ip``:``port``; False (unchanged) if it cannot be."""
    if flow.ip_version == 4:
        return _rewrite(packet, flow, 12, 0, ip, port, partial)
    return _rewrite(packet, flow, 8, 0, ip, port, partial)


def _rewrite(packet: bytearray, flow: Flow, ip_at: int, port_at: int, ip: bytes, port: int, partial: bool) -> bool:
    offset = flow.transport_offset
    checksum_at = _CHECKSUM_AT.get(flow.protocol)
    ip_end = ip_at + len(ip)
    if (
        checksum_at is None
        or offset < 0
        or len(packet) < offset + checksum_at + 2
        or len(ip) != (4 if flow.ip_version == 4 else 16)
        or not 0 <= port <= 0xFFFF
    ):
        return False
    if flow.ip_version == 4 and packet[6] & _MORE_FRAGMENTS:
        return False
    port_at += offset
    old_ip = int.from_bytes(packet[ip_at:ip_end], "big")
    new_ip = int.from_bytes(ip, "big")
    old_port = packet[port_at] << 8 | packet[port_at + 1]
    field = offset + checksum_at
    old_sum = packet[field] << 8 | packet[field + 1]
    if partial:
        # A sum, not its complement, and of the pseudo-header alone.
        new_sum = (old_sum - old_ip + new_ip) % _ONES
        packet[field] = new_sum >> 8
        packet[field + 1] = new_sum & 0xFF
    elif not (flow.protocol == UDP and flow.ip_version == 4 and old_sum == 0):
        new_sum = (old_sum + old_ip + old_port - new_ip - port) % _ONES
        if new_sum == 0 and flow.protocol == UDP:
            new_sum = _ONES
        packet[field] = new_sum >> 8
        packet[field + 1] = new_sum & 0xFF
    if flow.ip_version == 4:
        header_sum = ((packet[10] << 8 | packet[11]) + old_ip - new_ip) % _ONES
        packet[10] = header_sum >> 8
        packet[11] = header_sum & 0xFF
    packet[ip_at:ip_end] = ip
    packet[port_at] = port >> 8
    packet[port_at + 1] = port & 0xFF
    return True
