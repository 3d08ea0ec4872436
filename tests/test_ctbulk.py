"""The bulk mark clearer's codec without a kernel: dump answers in, update requests and failure reports out."""

from __future__ import annotations

import errno
import socket
import struct

from pmk.capture.ctbulk import CTA_ZONE, failures_of, updates_of
from pmk.capture.ctevents import (
    CTA_MARK,
    CTA_MARK_MASK,
    CTA_TUPLE_ORIG,
    CTA_TUPLE_REPLY,
    NLMSG_DONE,
    NLMSG_ERROR,
    _tuple,
)
from tests.test_ctevents import HERE, HERE6, PEER, PEER6, attr, control, ct_tuple

NEW = 0x0100  # (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
MASK = 0x00700000
TAIL = attr(CTA_MARK, struct.pack(">I", 0)) + attr(CTA_MARK_MASK, struct.pack(">I", MASK))
STATUS = attr(3, struct.pack(">I", 8))  # CTA_STATUS, as the kernel sends it after the tuples


def family_of(src: bytes) -> bytes:
    return struct.pack("=BBH", socket.AF_INET6 if len(src) == 16 else socket.AF_INET, 0, 0)


def dumped(orig: tuple[int, bytes, int, bytes, int], seq: int = 1, zone: int = 0, kernel_order: bool = True) -> bytes:
    """A dump answer: the tuples, the zone (when not 0) and the rest, in the kernel's order or reversed."""
    protocol, src, sport, dst, dport = orig
    parts = [
        attr(CTA_TUPLE_ORIG, ct_tuple(*orig), nested=True),
        attr(CTA_TUPLE_REPLY, ct_tuple(protocol, dst, dport, src, sport), nested=True),
        attr(CTA_ZONE, struct.pack(">H", zone)) if zone else b"",
        STATUS,
        attr(CTA_MARK, struct.pack(">I", 0x00100001)),
    ]
    body = family_of(src) + b"".join(parts if kernel_order else parts[::-1])
    return struct.pack("=IHHII", 16 + len(body), NEW, 0x2, seq, 0) + body


def request(orig: tuple[int, bytes, int, bytes, int], zone: int = 0) -> bytes:
    """The update a clear must send for that entry: family, original tuple, zone if any, mark 0 under the mask."""
    body = family_of(orig[1]) + attr(CTA_TUPLE_ORIG, ct_tuple(*orig), nested=True)
    body += attr(CTA_ZONE, struct.pack(">H", zone)) if zone else b""
    return struct.pack("=IHHII", 16 + len(body + TAIL), NEW, 0x1, 0, 0) + body + TAIL


def updates(data: bytes, seq: int = 1) -> tuple[bytes, tuple[bool, int, int]]:
    pieces: list[bytes | bytearray] = []
    status = updates_of(bytearray(data), len(data), seq, TAIL, pieces)
    return b"".join(pieces), status


UDP4 = (17, PEER, 40000, HERE, 53)
TCP6 = (6, HERE6, 50000, PEER6, 443)
ICMP4 = (1, HERE, 0, PEER, 0)


def test_each_entry_becomes_one_update_naming_it_by_original_tuple_and_zone() -> None:
    data = dumped(UDP4) + dumped(TCP6, zone=7) + dumped(ICMP4) + control(1, NLMSG_DONE)
    sent, status = updates(data)
    assert status == (True, 0, 3)
    assert sent == request(UDP4) + request(TCP6, zone=7) + request(ICMP4)


def test_another_attribute_order_is_walked_in_full() -> None:
    sent, status = updates(dumped(TCP6, zone=3, kernel_order=False) + dumped(UDP4, kernel_order=False))
    assert status == (False, 0, 2)  # more to come: no NLMSG_DONE yet
    assert sent == request(TCP6, zone=3) + request(UDP4)


def test_answers_to_another_request_are_skipped() -> None:
    sent, status = updates(dumped(UDP4, seq=4) + dumped(TCP6, seq=5) + control(4, NLMSG_DONE), seq=5)
    assert status == (False, 0, 1)
    assert sent == request(TCP6)


def test_a_refused_dump_reports_its_errno() -> None:
    _, status = updates(dumped(UDP4) + control(1, NLMSG_ERROR, -errno.EPERM))
    assert status == (True, errno.EPERM, 1)


def test_failure_reports_count_ended_entries_and_name_the_first_real_failure() -> None:
    reports = b"".join(
        control(0, NLMSG_ERROR, code) for code in (-errno.ENOENT, 0, -errno.EBUSY, -errno.ENOENT, -errno.EPERM)
    )
    assert failures_of(reports, len(reports)) == (2, errno.EBUSY)
    assert failures_of(b"", 0) == (0, 0)


def test_keep_leaves_out_entries_it_refuses_in_either_layout() -> None:
    """What a kernel ignoring a tuple filter sends (every entry) changes only the ones asked for."""

    def only_icmp(data: bytes | bytearray, pos: int, end: int) -> bool:
        return _tuple(data, pos, end)[0] == 1

    data = dumped(UDP4) + dumped(ICMP4) + dumped(TCP6, kernel_order=False) + dumped(ICMP4, kernel_order=False)
    pieces: list[bytes | bytearray] = []
    status = updates_of(bytearray(data), len(data), 1, TAIL, pieces, keep=only_icmp)
    assert status == (False, 0, 2)
    assert b"".join(pieces) == request(ICMP4) * 2
