"""The divert backend's byte parsers, without root and without a driver.

A receive buffer is packets back to back plus one 80-byte WINDIVERT_ADDRESS
record each; these tests build both by hand.
"""

from __future__ import annotations

import struct
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmk.capture.divert import ADDRESS_BYTES, flipped_address, split_batch
from pmk.packet.parse import parse_flow, simple_ipv4_key, simple_ipv4_runs
from tests.packets import ACK, FIN, RST, hop_by_hop, ip_packet, tcp, udp

A, B = "198.18.0.1", "198.18.0.2"


def record(outbound: bool, if_index: int = 3, sub_if_index: int = 0) -> bytes:
    """An address record: the Outbound flag (bit 1 of byte 10), interfaces at 16, MACs at 36..47."""
    rec = bytearray(ADDRESS_BYTES)
    rec[10] = 0x02 if outbound else 0
    struct.pack_into("<II", rec, 16, if_index, sub_if_index)
    rec[36:42] = bytes.fromhex("020000000001")  # destination MAC
    rec[42:48] = bytes.fromhex("020000000002")  # source MAC
    return bytes(rec)


def batch(*packets: tuple[bytes, bool]) -> tuple[bytearray, int, bytes]:
    """(buffer with spare room after the packets, received bytes, records)."""
    data = b"".join(raw for raw, _ in packets)
    return bytearray(data) + bytearray(1000), len(data), b"".join(record(out) for _, out in packets)


def runs_of(*packets: tuple[bytes, bool]) -> list[tuple[tuple[int, bytes, int, bytes, int], int, int, bool]] | None:
    buf, total, _ = batch(*packets)
    return simple_ipv4_runs(buf, total, [out for _, out in packets])


def test_consecutive_packets_of_one_connection_form_one_run_whatever_their_direction_bit() -> None:
    request, reply = udp(A, B, 4000, 53), udp(B, A, 53, 4000)
    other = tcp(A, B, 4001, 80)
    runs = runs_of((request, True), (request, True), (other, True), (reply, False))
    assert runs is not None
    key = simple_ipv4_key(request, True)
    assert runs == [
        (key, 2, 2 * len(request), True),
        (simple_ipv4_key(other, True), 1, len(other), True),
        (key, 1, len(reply), False),
    ]
    # The reply seen inbound has the same key as the request seen outbound: both local side first.
    assert simple_ipv4_key(reply, False) == key


@pytest.mark.parametrize(
    "odd",
    [
        udp("fd00::1", "fd00::2", 1, 2),  # IPv6
        ip_packet(A, B, 1, b"\x08\x00\x00\x00\x00\x00\x00\x00"),  # ICMP
        bytes([0x46]) + udp(A, B, 1, 2)[1:],  # IPv4 with options announced
        udp(A, B, 1, 2)[:6] + b"\x00\x01" + udp(A, B, 1, 2)[8:],  # a later fragment: no ports in it
        udp(A, B, 1, 2)[:20],  # no ports
        ip_packet("fd00::1", "fd00::2", 17, udp(A, B, 1, 2)[20:], extension=hop_by_hop(17)),
    ],
)
def test_one_packet_that_is_not_simple_spoils_the_batch(odd: bytes) -> None:
    assert simple_ipv4_key(odd, True) is None
    assert runs_of((udp(A, B, 4000, 53), True), (odd, True)) is None


@pytest.mark.parametrize("flags", [FIN | ACK, RST, RST | ACK])
def test_a_tcp_fin_or_reset_spoils_the_batch_so_the_per_packet_path_sees_the_end(flags: int) -> None:
    data = tcp(A, B, 4000, 80, flags=ACK)
    assert runs_of((data, True), (data, True)) is not None
    assert runs_of((data, True), (tcp(A, B, 4000, 80, flags=flags), True)) is None


def test_a_short_tcp_packet_at_the_very_end_of_the_buffer_spoils_the_batch_without_an_error() -> None:
    data = tcp(A, B, 4000, 80, flags=ACK)
    short = bytearray(data[:24])
    short[2:4] = (24).to_bytes(2, "big")
    buf = bytearray(data + bytes(short))  # no spare room after the packets
    assert simple_ipv4_runs(buf, len(buf), [True, True]) is None


def test_lengths_that_do_not_add_up_spoil_the_batch() -> None:
    packet = udp(A, B, 4000, 53)
    buf, total, _ = batch((packet, True), (packet, True))
    assert simple_ipv4_runs(buf, total - 1, [True, True]) is None  # the last packet is cut
    assert simple_ipv4_runs(buf, total + 5, [True, True]) is None  # bytes nobody claims
    assert simple_ipv4_runs(buf, total, []) is None


def test_a_zero_length_field_fills_the_rest_of_the_buffer() -> None:
    packet = bytearray(udp(A, B, 4000, 53, b"x" * 100))
    packet[2:4] = b"\x00\x00"  # GSO aggregates may say 0
    runs = runs_of((bytes(packet), False))
    assert runs == [(simple_ipv4_key(bytes(packet), False), 1, len(packet), False)]


ports = st.integers(1, 3)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["udp", "tcp"]), ports, st.booleans()), min_size=1, max_size=12))
def test_runs_agree_with_the_single_packet_key(spec: list[tuple[str, int, bool]]) -> None:
    packets = [((udp if kind == "udp" else tcp)(A, B, port, 53), out) for kind, port, out in spec]
    runs = runs_of(*packets)
    assert runs is not None
    expanded = [(key, out) for key, n, _, out in runs for _ in range(n)]
    assert expanded == [(simple_ipv4_key(raw, out), out) for raw, out in packets]
    assert sum(size for _, _, size, _ in runs) == sum(len(raw) for raw, _ in packets)
    for key, _, _, _ in runs:  # the cache form of the ConnKey the slow path builds
        raw, out = next(p for p in packets if simple_ipv4_key(*p) == key)
        flow = parse_flow(raw)
        assert flow is not None and flow.key(out).packed() == flow.packed(out) == key


def test_a_batch_splits_into_packets_with_their_records() -> None:
    first, second = udp(A, B, 4000, 53), udp("fd00::1", "fd00::2", 5, 6)
    buf, total, records = batch((first, True), (second, False))
    packets, whole = split_batch(buf, total, records)
    assert whole
    assert [(p.raw, p.outbound, p.if_index, p.token) for p in packets] == [
        (first, True, 3, records[:ADDRESS_BYTES]),
        (second, False, 3, records[ADDRESS_BYTES:]),
    ]


def test_a_batch_that_does_not_cover_the_buffer_is_not_whole() -> None:
    packet = udp(A, B, 4000, 53)
    buf, total, records = batch((packet, True), (packet, True))
    packets, whole = split_batch(buf, total - 3, records)
    assert not whole and len(packets) == 2 and len(packets[1].raw) == len(packet) - 3
    packets, whole = split_batch(buf, len(packet), records)  # a record without its packet
    assert not whole and len(packets) == 1


def test_the_flipped_address_turns_the_direction_and_on_linux_swaps_the_macs() -> None:
    original = record(outbound=False)
    flipped = flipped_address(original)
    assert flipped[10] & 0x02 and len(flipped) == ADDRESS_BYTES
    assert flipped[:10] == original[:10] and flipped[11:36] == original[11:36]
    if sys.platform.startswith("linux"):
        assert flipped[36:42] == original[42:48] and flipped[42:48] == original[36:42]
    assert flipped_address(flipped) == original
