"""Which re-injected packets pmk lets the kernel checksum (pmk.capture.divert_checksums), without a driver.

A batch is packets back to back plus one 80-byte address record each, as
``recv_ex`` leaves them; the records here carry what eBPFDivert puts in them
(flags, interface, layer-2 stash), and the MTU lookup is a table.
"""

from __future__ import annotations

import socket
import struct

import pytest

from pmk.capture.divert_address import ADDRESS_BYTES, TCP_CHECKSUM_BIT
from pmk.capture.divert_checksums import MTU_SETTLE_S, InterfaceMtu, mark_offloaded
from tests.packets import ACK, ip_packet, tcp, udp

A, B = "198.18.0.1", "198.18.0.2"
A6, B6 = "fd00::1", "fd00::2"
ETH, JUMBO = 3, 4
MTUS = {ETH: 1500, JUMBO: 9000}
AGGREGATE = 30_000  # payload bytes: a GSO aggregate of about 20 segments


def record(*, if_index: int = ETH, flags: int = 0, stash: bool = True) -> bytes:
    rec = bytearray(ADDRESS_BYTES)
    rec[10] = flags
    struct.pack_into("<II", rec, 16, if_index, 0)
    if stash:
        rec[32], rec[33] = 0xEB, 14  # magic, an Ethernet header's length
    return bytes(rec)


def aggregate(v6: bool = False, size: int = AGGREGATE) -> bytes:
    src, dst = (A6, B6) if v6 else (A, B)
    return tcp(src, dst, 40000, 5201, flags=ACK, data=bytes(size))


class Lookups:
    def __init__(self) -> None:
        self.asked: list[int] = []

    def __call__(self, if_index: int) -> int:
        self.asked.append(if_index)
        return MTUS.get(if_index, 0)


def marked_after(*packets: tuple[bytes, bytes], lookups: Lookups | None = None) -> list[bool]:
    """Which packets leave with the TCP checksum flag set (the count returned must agree)."""
    buffer = bytearray(b"".join(raw for raw, _ in packets)) + bytearray(100)
    records = bytearray(b"".join(rec for _, rec in packets))
    before = [bool(records[i * ADDRESS_BYTES + 10] & TCP_CHECKSUM_BIT) for i in range(len(packets))]
    count = mark_offloaded(buffer, len(buffer) - 100, memoryview(records), len(packets), lookups or Lookups())
    after = [bool(records[i * ADDRESS_BYTES + 10] & TCP_CHECKSUM_BIT) for i in range(len(packets))]
    assert count == sum(a and not b for a, b in zip(after, before, strict=True))
    return after


def test_tcp_aggregates_longer_than_their_interface_mtu_are_marked_on_both_ip_versions() -> None:
    assert marked_after((aggregate(), record()), (aggregate(v6=True), record())) == [True, True]


def test_only_the_aggregates_of_a_batch_are_marked_and_the_rest_left_to_the_library() -> None:
    small = tcp(B, A, 5201, 40000, flags=ACK)
    assert marked_after((aggregate(), record()), (small, record()), (aggregate(), record())) == [True, False, True]


@pytest.mark.parametrize(
    "packet, rec",
    [
        pytest.param(aggregate(size=1400), record(), id="within the mtu"),
        pytest.param(aggregate(size=8000), record(if_index=JUMBO), id="within a jumbo mtu"),
        pytest.param(aggregate(), record(flags=0x04), id="loopback flag"),
        pytest.param(aggregate(), record(stash=False), id="no layer-2 stash"),
        pytest.param(aggregate(), record(if_index=7), id="mtu unreadable"),
        pytest.param(aggregate(), record(if_index=0x10000), id="index beyond the redirect mark"),
        pytest.param(udp(A, B, 40000, 5201, data=bytes(AGGREGATE)), record(), id="udp"),
        pytest.param(ip_packet(A, B, 47, bytes(AGGREGATE)), record(), id="not tcp"),
    ],
)
def test_packets_the_library_would_not_hand_to_the_kernel_keep_their_recomputation(packet: bytes, rec: bytes) -> None:
    # A second aggregate keeps the batch's average above the walking threshold.
    assert marked_after((packet, rec), (aggregate(), record())) == [False, True]


def test_an_ipv4_fragment_is_not_marked() -> None:
    fragment = bytearray(aggregate())
    fragment[6] |= 0x20  # More Fragments
    assert marked_after((bytes(fragment), record()), (aggregate(), record())) == [False, True]


def test_a_checksum_already_valid_is_not_counted() -> None:
    assert marked_after((aggregate(), record(flags=TCP_CHECKSUM_BIT)), (aggregate(), record())) == [True, True]


def test_a_batch_of_small_packets_is_not_walked() -> None:
    lookups = Lookups()
    smalls = [(tcp(B, A, 5201, 40000 + n, flags=ACK), record()) for n in range(40)]
    assert marked_after(*smalls, (aggregate(size=20_000), record()), lookups=lookups) == [False] * 41
    assert lookups.asked == []


def test_each_interface_mtu_is_read_once_per_batch() -> None:
    lookups = Lookups()
    batch = [(aggregate(), record(if_index=ETH)), (aggregate(), record(if_index=JUMBO))] * 3
    assert marked_after(*batch, lookups=lookups) == [True] * 6
    assert sorted(lookups.asked) == [ETH, JUMBO]


def test_a_length_past_the_received_bytes_stops_the_walk() -> None:
    broken = bytearray(aggregate())
    broken[2:4] = (0xFFFF).to_bytes(2, "big")
    assert marked_after((aggregate(), record()), (bytes(broken), record())) == [True, False]


def test_an_ipv6_length_of_zero_stops_the_walk() -> None:
    # A jumbogram's length is not in its header; walking on by 40 bytes would read its
    # payload (here an IPv4 aggregate's bytes) as the next packet and mark that one's record.
    header = bytearray(aggregate(v6=True)[:40])
    header[4:6] = b"\0\0"
    jumbo = bytes(header) + aggregate()
    assert marked_after((aggregate(), record()), (jumbo, record()), (aggregate(), record())) == [True, False, False]


def test_an_interface_whose_mtu_changed_is_not_trusted_until_it_settles() -> None:
    readings = iter([1500, 1500, 9000, 9000, 9000, 1500, 1500, 0])
    clock = iter([0.0, 10.0, 11.0, 11.0 + MTU_SETTLE_S - 0.1, 11.0 + MTU_SETTLE_S, 14.0, 14.0 + MTU_SETTLE_S, 20.0])
    mtu = InterfaceMtu(read=lambda ifindex: next(readings), clock=lambda: next(clock), present=lambda: [ETH])
    try:
        # Read at start and trusted; a change marks nothing there until it has held MTU_SETTLE_S
        # (the library may still send by the old MTU); unreadable is 0 whatever came before.
        assert [mtu(ETH) for _ in range(7)] == [1500, 0, 0, 9000, 0, 1500, 0]
    finally:
        mtu.close()


def test_an_interface_first_seen_after_the_start_is_trusted_once_it_settles() -> None:
    """The library may have read its MTU before a change pmk never saw."""
    clock = iter([0.0, 5.0, 5.0 + MTU_SETTLE_S - 0.1, 5.0 + MTU_SETTLE_S])
    mtu = InterfaceMtu(read=lambda ifindex: 1500, clock=lambda: next(clock), present=lambda: [])
    try:
        assert [mtu(ETH) for _ in range(3)] == [0, 0, 1500]
    finally:
        mtu.close()


def test_the_mtu_lookup_reads_the_kernel_and_never_offers_lo() -> None:
    loopback = socket.if_nametoindex("lo")
    mtu = InterfaceMtu()
    try:
        assert mtu._read_kernel(loopback) >= 1280  # the kernel's answer, ioctls and all
        assert mtu(loopback) == 0  # lo: the library re-injects there without segmenting
        assert mtu(0x7FFF_FFFF) == 0  # no such interface
    finally:
        mtu.close()
