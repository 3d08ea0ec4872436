"""The layout of the 80-byte divert address record (WINDIVERT_ADDRESS), as pmk reads and edits it.

Byte 10 holds the flags Sniffed(0) Outbound(1) Loopback(2) Impostor(3) IPv6(4)
IPChecksum(5) TCPChecksum(6) UDPChecksum(7); IfIdx and SubIfIdx follow at 16.
A checksum flag set means the checksum is valid; a clear one asks eBPFDivert
to recompute it on re-injection.

eBPFDivert also keeps what it needs to re-inject a packet where it was
captured in the union's spare bytes (WinDivert leaves them zero): from 32, a
magic byte, the length of the stashed layer-2 header, the GSO segment size,
then the header itself (for Ethernet: destination MAC at 36, source MAC at 42,
ethertype).
"""

from __future__ import annotations

import struct

ADDRESS_BYTES = 80
FLAGS_BYTE = 10
OUTBOUND_BIT = 0x02
LOOPBACK_BIT = 0x04
TCP_CHECKSUM_BIT = 0x40
UDP_CHECKSUM_BIT = 0x80
#: IfIdx and SubIfIdx, at INTERFACES_OFFSET.
INTERFACES = struct.Struct("<II")
INTERFACES_OFFSET = 16
IFINDEX = slice(INTERFACES_OFFSET, INTERFACES_OFFSET + 4)
STASH_MAGIC_BYTE = 32
STASH_LENGTH_BYTE = 33
STASH_MAGIC = 0xEB
#: The longest layer-2 header the stash holds.
STASH_MAX = 22
ETH_DST = slice(36, 42)
ETH_SRC = slice(42, 48)
