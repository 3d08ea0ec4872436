"""Which re-injected TCP aggregates can skip eBPFDivert's software checksum (Linux).

eBPFDivert checks every captured packet's checksums and records the result in
the address record's checksum flags; on re-injection it recomputes, in user
space, every checksum whose flag is clear. A TCP aggregate (GSO/GRO, up to
64 KiB) from a local sender or a veth carries a partial checksum by design,
so every aggregate of a bulk transfer was summed again on its way back: a
third of pmk's CPU on row C's TCP bulk (perf: ``WinDivertCalcChecksum``).

That sum is wasted for an aggregate longer than its interface's MTU: the
library then injects it through an AF_PACKET socket with a virtio header that
asks the kernel to segment it and fill the checksum, and it first overwrites
the field with the pseudo-header sum itself (``prepare_gso`` in
libebpfdivert 0.1.0's handle.c). pmk sets the TCP flag on exactly the packets
that take that path, mirroring the library's own choice: not loopback, a
captured interface with the record's layer-2 stash, longer than 576 bytes
and than the interface's MTU, read when the batch goes back (an MTU cached
across an increase could mark a packet the library would send whole, with
its partial checksum). Anything else keeps the library's recomputation.
``tests/test_e2e_verdicts.py`` carries a bulk transfer through this path and
checks every byte; pydivert is pinned to the minor version this was read from.
"""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Callable

from pmk.capture.divert_address import (
    ADDRESS_BYTES,
    FLAGS_BYTE,
    INTERFACES,
    INTERFACES_OFFSET,
    LOOPBACK_BIT,
    STASH_LENGTH_BYTE,
    STASH_MAGIC,
    STASH_MAGIC_BYTE,
    STASH_MAX,
    TCP_CHECKSUM_BIT,
)

#: The library hands nothing this short to the kernel's segmentation.
_GSO_FLOOR = 576
#: A batch averaging no more than a full Ethernet frame per packet is not walked:
#: it holds no aggregate worth the walk (skipping a packet only costs its sum).
_WALK_ABOVE_AVERAGE = 1500
#: Inbound packets are re-injected through lo with the interface in 16 bits of a mark.
_MAX_IFINDEX = 0xFFFF
_SIOCGIFMTU = 0x8921
_IFREQ = struct.Struct("16s24x")  # struct ifreq: the name, then a 24-byte union (the MTU at its start)
_IPPROTO_TCP = 6

if sys.platform != "win32":  # the divert backend imports this module on Windows too
    import fcntl


class InterfaceMtu:
    """An interface's MTU by index, read from the kernel at each call (0 if it cannot be read). Linux only."""

    def __init__(self) -> None:
        # Python's sockets are created close-on-exec.
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            #: lo's index (0 if the namespace has none): re-injection never takes the aggregate path there.
            self.loopback = socket.if_nametoindex("lo")
        except OSError:
            self.loopback = 0

    def __call__(self, ifindex: int) -> int:
        if sys.platform == "win32":  # an if/else: mypy --platform win32 then skips the Linux branch
            return 0
        else:
            try:
                name = socket.if_indextoname(ifindex).encode()
                answer = fcntl.ioctl(self._sock, _SIOCGIFMTU, _IFREQ.pack(name))
            except OSError:
                return 0
            return int.from_bytes(answer[16:20], "little", signed=True)

    def close(self) -> None:
        self._sock.close()


def mark_offloaded(
    buffer: bytearray, total: int, records: memoryview, count: int, mtu_of: Callable[[int], int], loopback: int
) -> int:
    """Set the TCP checksum flag on the aggregates the library will let the kernel checksum; return how many.

    ``buffer`` holds ``count`` IP packets back to back (``total`` bytes), and
    ``records`` their address records, as ``recv_ex`` left them.
    """
    if total <= count * _WALK_ABOVE_AVERAGE:
        return 0
    mtus: dict[int, int] = {}
    offset = marked = 0
    for index in range(count):
        version = buffer[offset] >> 4
        if version == 4:
            length = buffer[offset + 2] << 8 | buffer[offset + 3]
            # Not a fragment: neither More Fragments nor an offset.
            tcp = buffer[offset + 9] == _IPPROTO_TCP and not (buffer[offset + 6] & 0x3F or buffer[offset + 7])
        elif version == 6:
            payload = buffer[offset + 4] << 8 | buffer[offset + 5]
            if not payload:  # a jumbogram (its length is in an option): stop rather than guess
                return marked
            length = 40 + payload
            tcp = buffer[offset + 6] == _IPPROTO_TCP
        else:
            return marked
        if length < 20 or offset + length > total:
            return marked
        if tcp and length > _GSO_FLOOR:
            base = index * ADDRESS_BYTES
            flags = records[base + FLAGS_BYTE]
            if (
                not flags & (LOOPBACK_BIT | TCP_CHECKSUM_BIT)
                and records[base + STASH_MAGIC_BYTE] == STASH_MAGIC
                and records[base + STASH_LENGTH_BYTE] <= STASH_MAX
            ):
                ifindex = INTERFACES.unpack_from(records, base + INTERFACES_OFFSET)[0]
                if 0 < ifindex <= _MAX_IFINDEX and ifindex != loopback:
                    mtu = mtus.get(ifindex)
                    if mtu is None:
                        mtu = mtus[ifindex] = mtu_of(ifindex)
                    if 0 < mtu < length:
                        records[base + FLAGS_BYTE] = flags | TCP_CHECKSUM_BIT
                        marked += 1
        offset += length
    return marked
