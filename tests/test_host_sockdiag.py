"""The sock_diag codec without a kernel: answers built byte by byte as linux/inet_diag.h lays them out."""

from __future__ import annotations

import errno
import socket
import struct

from pmk.host.sockdiag import NLMSG_DONE, NLMSG_ERROR, SOCK_DIAG_BY_FAMILY, DiagEntry, SockDiag
from pmk.host.sockets import entry_key
from pmk.verdicts import ConnKey

MAPPED = bytes(10) + b"\xff\xff"


def diag_msg(
    seq: int, family: int, state: int, src: bytes, sport: int, dst: bytes, dport: int, uid: int, inode: int
) -> bytes:
    body = struct.pack("=BBBB", family, state, 0, 0) + struct.pack(">HH", sport, dport)
    body += src.ljust(16, b"\0") + dst.ljust(16, b"\0") + struct.pack("=IIIIIIII", 0, 0, 0, 0, 0, 0, uid, inode)
    assert len(body) == 72
    return struct.pack("=IHHII", 16 + len(body), SOCK_DIAG_BY_FAMILY, 2, seq, 0) + body


def control(seq: int, kind: int, code: int = 0) -> bytes:
    return struct.pack("=IHHII", 20, kind, 0, seq, 0) + struct.pack("=i", code)


V4_A, V4_B = socket.inet_aton("198.18.0.1"), socket.inet_aton("198.18.0.2")


def test_a_dump_datagram_yields_every_socket_until_done() -> None:
    data = diag_msg(7, socket.AF_INET, 1, V4_A, 40000, V4_B, 22, 1000, 555) + diag_msg(
        7, socket.AF_INET, 2, V4_A, 40001, V4_B, 80, 0, 556
    )
    found: list[DiagEntry] = []
    assert SockDiag._parse(data, 7, found) == (False, 0)
    assert found == [
        DiagEntry(socket.AF_INET, 1, V4_A, 40000, V4_B, 22, 1000, 555),
        DiagEntry(socket.AF_INET, 2, V4_A, 40001, V4_B, 80, 0, 556),
    ]
    assert SockDiag._parse(control(7, NLMSG_DONE), 7, found) == (True, 0)


def test_an_error_is_its_errno_and_stale_answers_are_skipped() -> None:
    found: list[DiagEntry] = []
    stale = diag_msg(6, socket.AF_INET, 1, V4_A, 1, V4_B, 2, 0, 9)
    assert SockDiag._parse(stale + control(7, NLMSG_ERROR, -errno.ENOENT), 7, found) == (True, errno.ENOENT)
    assert found == []


def test_ipv6_addresses_keep_16_bytes() -> None:
    a, b = socket.inet_pton(socket.AF_INET6, "fd00:18::1"), socket.inet_pton(socket.AF_INET6, "fd00:18::2")
    found: list[DiagEntry] = []
    SockDiag._parse(diag_msg(1, socket.AF_INET6, 1, a, 5, b, 6, 0, 1), 1, found)
    assert (found[0].local_ip, found[0].remote_ip) == (a, b)


def test_a_dual_stack_socket_with_an_ipv4_peer_gives_an_ipv4_key() -> None:
    entry = DiagEntry(socket.AF_INET6, 1, MAPPED + V4_A, 22, MAPPED + V4_B, 40000, 0, 1)
    assert entry_key(socket.IPPROTO_TCP, entry) == ConnKey(6, V4_A, 22, V4_B, 40000)
    native = socket.inet_pton(socket.AF_INET6, "fd00:18::1")
    entry6 = DiagEntry(socket.AF_INET6, 1, native, 22, MAPPED + V4_B, 40000, 0, 1)
    assert entry_key(socket.IPPROTO_TCP, entry6).local_ip == native
