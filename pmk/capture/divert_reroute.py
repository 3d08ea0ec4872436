"""Carrying out reroutes on the divert backend: rewrite, and re-inject where the target lives.

What works with eBPFDivert (found in namespaces, ``tests/test_divert_reroute.py``):
an outbound packet is captured at the egress of the interface its original
destination routes through, after the IP stack is done with it. Rewritten to
a *local* target (a resolver or proxy on 127.0.0.1, ::1 or one of the host's
addresses) it must not leave by that interface: it is re-injected *inbound
on the loopback interface*, where the kernel delivers it to the local
socket (a local source address is fine on loopback, whereas on any other
interface it would be dropped as a martian). The target's replies then
travel over loopback, are captured there as outbound packets (the capture
filter must include them: ``reply_filter``), get the original peer as their
source and are re-injected as they were captured, and the application
receives them from the peer it addressed.

Outbound packets are captured with the kernel's partial checksum (the
record's TCP/UDP checksum flag is clear), so the rewrite keeps it partial;
the loopback path never verifies it.

A target that is not local is re-injected out of the interface the packet
was captured on, with the next hop of the original destination: that is
only right when both are reached the same way (the usual case for a tunnel
entry or proxy behind the default route); replies are captured by the
backend's filter like any inbound packet.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable

from pmk.capture.divert_address import (
    FLAGS_BYTE,
    IFINDEX,
    LOOPBACK_BIT,
    OUTBOUND_BIT,
    TCP_CHECKSUM_BIT,
    UDP_CHECKSUM_BIT,
)
from pmk.core.redirects import RedirectTable
from pmk.packet.parse import TCP, parse_flow
from pmk.verdicts import ConnKey, Target, ip_text


def is_local_address(ip: bytes) -> bool:
    """True if ``ip`` is this host's (in this namespace): binding to it succeeds."""
    family = socket.AF_INET if len(ip) == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((ip_text(ip), 0))
        except OSError as error:
            if error.errno == errno.EADDRNOTAVAIL:
                return False
            raise
    return True


def loopback_inbound(record: bytes, loopback_index: int) -> bytes:
    """The address record that re-injects a packet into the loopback interface's receive path."""
    out = bytearray(record)
    out[FLAGS_BYTE] = (out[FLAGS_BYTE] & ~OUTBOUND_BIT) | LOOPBACK_BIT
    out[IFINDEX] = loopback_index.to_bytes(4, "little")
    return bytes(out)


def checksum_partial(record: bytes, protocol: int) -> bool:
    """True when the packet's TCP/UDP checksum is the kernel's partial sum (flag clear on an outbound packet)."""
    flags = record[FLAGS_BYTE]
    if not flags & OUTBOUND_BIT:
        return False
    return not flags & (TCP_CHECKSUM_BIT if protocol == TCP else UDP_CHECKSUM_BIT)


def reply_filter(targets: Iterable[Target]) -> str:
    """A WinDivert filter clause for the replies of local ``targets`` over loopback ("false" for none)."""
    clauses = []
    for target in dict.fromkeys(targets):
        ip = f"ip.SrcAddr == {ip_text(target.ip)}" if len(target.ip) == 4 else f"ipv6.SrcAddr == {ip_text(target.ip)}"
        clauses.append(f"({ip} and (tcp.SrcPort == {target.port} or udp.SrcPort == {target.port}))")
    if not clauses:
        return "false"
    return f"(loopback and ({' or '.join(clauses)}))"


class Rerouter:
    """The redirect table plus the re-injection rules above; no I/O but one address probe per new target."""

    def __init__(self, table: RedirectTable | None = None, loopback_index: int | None = None) -> None:
        self.table = table if table is not None else RedirectTable()
        self.loopback_index = socket.if_nametoindex("lo") if loopback_index is None else loopback_index
        self._local: dict[bytes, bool] = {}

    def is_local(self, ip: bytes) -> bool:
        local = self._local.get(ip)
        if local is None:
            local = self._local[ip] = is_local_address(ip)
        return local

    def outbound(self, raw: bytes, record: bytes, key: ConnKey, target: Target, now: float) -> tuple[bytes, bytes]:
        """The application's packet of ``key`` rewritten to ``target``, and the record to inject it with.

        Enters the connection in the table if it is new. A packet that cannot
        be rewritten (a fragment) comes back unchanged.
        """
        if self.table.get(key) != target:
            self.table.add(key, target, now)
        flow = parse_flow(raw)
        packet = bytearray(raw)
        if flow is None or self.table.outbound(packet, flow, now, checksum_partial(record, flow.protocol)) is None:
            return raw, record
        if self.is_local(target.ip):
            record = loopback_inbound(record, self.loopback_index)
        return bytes(packet), record

    def inbound(self, raw: bytes, record: bytes, now: float) -> tuple[bytes, ConnKey] | None:
        """A target's reply rewritten to come from the original peer, with that connection's key; None if not one."""
        flow = parse_flow(raw)
        if flow is None:
            return None
        packet = bytearray(raw)
        key = self.table.inbound(packet, flow, now, checksum_partial(record, flow.protocol))
        return None if key is None else (bytes(packet), key)
