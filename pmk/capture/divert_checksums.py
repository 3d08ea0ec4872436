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
and than the interface's MTU. A packet marked but sent whole would go out
with its partial checksum, so the MTU is read when the batch goes back (one
cached across an increase would mark too much), and for a while after it
changes nothing on that interface is marked: the library keeps an MTU for a
second and may still be sending by the old one. The same holds for an
interface pmk first sees after it started (the library may have read its MTU
before a change pmk never saw); the interfaces present at start are read
then, before the library has sent anything. Anything else keeps the
library's recomputation.
``tests/test_e2e_verdicts.py`` carries a bulk transfer through this path and
checks every byte; pydivert is pinned to the minor version this was read from.
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable

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
_SIOCGIFNAME, _SIOCGIFMTU = 0x8910, 0x8921
# struct ifreq: the name, then a 24-byte union whose first int is the index (SIOCGIFNAME) or the MTU.
_IFREQ_BY_INDEX = struct.Struct("16si20x")
_IFREQ_BY_NAME = struct.Struct("16s24x")
_IPPROTO_TCP = 6
#: After an interface's MTU changes, how long nothing on it is marked (libebpfdivert keeps an MTU for 1 s).
MTU_SETTLE_S = 2.0
#: Interfaces whose last reading is kept.
_SEEN_INTERFACES = 256

if sys.platform != "win32":  # the divert backend imports this module on Windows too
    import fcntl


def _present_interfaces() -> list[int]:
    try:
        return [index for index, _name in socket.if_nameindex()]
    except OSError:
        return []


class InterfaceMtu:
    """The MTU to compare an aggregate with, by interface index; 0 means mark nothing there. Linux only.

    That is the interface's MTU read now, unless the interface is lo (the
    library re-injects there without segmenting), or its MTU differs from the
    last reading or did less than ``MTU_SETTLE_S`` ago, or it was first seen
    less than ``MTU_SETTLE_S`` ago. Make it before the divert library sends
    anything: the interfaces present then are read and trusted at once.
    """

    def __init__(
        self,
        read: Callable[[int], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        present: Callable[[], Iterable[int]] = _present_interfaces,
    ) -> None:
        """``read``, ``clock``, ``present``: for tests (defaults: the kernel's MTU, time.monotonic, if_nameindex)."""
        # Python's sockets are created close-on-exec.
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._read = read or self._read_kernel
        self._clock = clock
        #: ifindex -> (MTU last read, when it may be trusted).
        self._seen: dict[int, tuple[int, float]] = {}
        try:
            self._loopback = socket.if_nametoindex("lo")
        except OSError:
            self._loopback = 0
        now = clock()
        for ifindex in present():
            if ifindex != self._loopback and len(self._seen) < _SEEN_INTERFACES:
                self._seen[ifindex] = (self._read(ifindex), now)

    def __call__(self, ifindex: int) -> int:
        if ifindex == self._loopback:
            return 0
        mtu = self._read(ifindex)
        now = self._clock()
        seen = self._seen.get(ifindex)
        if seen is None or seen[0] != mtu:
            if len(self._seen) >= _SEEN_INTERFACES:
                self._seen.clear()  # interfaces come and go; forgetting one only delays its marking
            self._seen[ifindex] = (mtu, now + MTU_SETTLE_S)
            return 0
        return mtu if now >= seen[1] else 0

    def _read_kernel(self, ifindex: int) -> int:
        if sys.platform == "win32":  # an if/else: mypy --platform win32 then skips the Linux branch
            return 0
        else:
            # Two ioctls on one socket (socket.if_indextoname opens a socket of its own each time).
            try:
                named = fcntl.ioctl(self._sock, _SIOCGIFNAME, _IFREQ_BY_INDEX.pack(b"", ifindex))
                answer = fcntl.ioctl(self._sock, _SIOCGIFMTU, _IFREQ_BY_NAME.pack(named[:16]))
            except OSError:
                return 0
            return int.from_bytes(answer[16:20], "little", signed=True)

    def close(self) -> None:
        self._sock.close()


def mark_offloaded(buffer: bytearray, total: int, records: memoryview, count: int, mtu_of: Callable[[int], int]) -> int:
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
                if 0 < ifindex <= _MAX_IFINDEX:
                    mtu = mtus.get(ifindex)
                    if mtu is None:
                        mtu = mtus[ifindex] = mtu_of(ifindex)
                    if 0 < mtu < length:
                        records[base + FLAGS_BYTE] = flags | TCP_CHECKSUM_BIT
                        marked += 1
        offset += length
    return marked
