"""Netlink sock_diag (linux/inet_diag.h): the kernel's TCP and UDP socket tables.

Spoken directly over an AF_NETLINK socket with ``struct``: the exact request by
5-tuple, which attribution makes once per new connection, has no form in
pyroute2's DiagSocket (``get_sock_stats`` always dumps), and a raw request costs
microseconds where pyroute2's message machinery costs about a millisecond.
The socket reads the network namespace it was created in.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from typing import NamedTuple

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x01
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
#: inet_diag_sockid's cookie meaning "any socket" (both halves all ones).
NO_COOKIE = 0xFFFFFFFF

# TCP states (include/net/tcp_states.h); the request's state filter is a bit mask of them.
TCP_ESTABLISHED = 1
TCP_SYN_SENT = 2
TCP_SYN_RECV = 3
TCP_FIN_WAIT1 = 4
TCP_FIN_WAIT2 = 5
TCP_TIME_WAIT = 6
TCP_CLOSE = 7
TCP_CLOSE_WAIT = 8
TCP_LAST_ACK = 9
TCP_LISTEN = 10
TCP_CLOSING = 11
ALL_STATES = 0xFFFFFFFF

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, port id
# inet_diag_req_v2: family, protocol, extensions, pad, states, then inet_diag_sockid:
# ports and addresses in network order, interface, cookie.
_REQUEST = struct.Struct("=BBBxI2s2s16s16sIII")
_PORTS = struct.Struct(">HH")
_UID_INODE = struct.Struct("=II")
_MSG_SIZE = 72  # inet_diag_msg
_UID_INODE_OFFSET = 64
_ERRNO = struct.Struct("=i")
_RECV_SIZE = 65536


class DiagEntry(NamedTuple):
    """One socket as the kernel reports it, from the socket's own side."""

    family: int
    state: int
    local_ip: bytes  # 4 or 16 bytes, as the socket's family has it
    local_port: int
    remote_ip: bytes
    remote_port: int
    uid: int
    inode: int  # 0 for sockets no file refers to (request, time-wait, not yet accepted)


def _address_length(family: int) -> int:
    return 4 if family == socket.AF_INET else 16


def _decode(data: bytes | memoryview, offset: int) -> DiagEntry:
    family, state = data[offset], data[offset + 1]
    sport, dport = _PORTS.unpack_from(data, offset + 4)
    size = _address_length(family)
    src = bytes(data[offset + 8 : offset + 8 + size])
    dst = bytes(data[offset + 24 : offset + 24 + size])
    uid, inode = _UID_INODE.unpack_from(data, offset + _UID_INODE_OFFSET)
    return DiagEntry(family, state, src, sport, dst, dport, uid, inode)


class SockDiag:
    """One netlink sock_diag socket; thread-safe (one request at a time)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
        self._sock.bind((0, 0))
        self._seq = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> SockDiag:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def find(
        self, protocol: int, local_ip: bytes, local_port: int, remote_ip: bytes, remote_port: int
    ) -> DiagEntry | None:
        """The socket the kernel would deliver this 5-tuple's packets to, or None.

        The kernel answers an exact request with its receive-path lookup: a
        connected socket first, else (TCP) the listener or (UDP) the socket
        bound to the local address or the wildcard, so an inbound SYN finds
        its listener and a datagram finds an unconnected socket too. UDP's
        request names the remote side as the source (kept that way in the
        kernel for compatibility); TCP's names the local side.
        """
        family = socket.AF_INET if len(local_ip) == 4 else socket.AF_INET6
        if protocol == socket.IPPROTO_UDP:
            src, sport, dst, dport = remote_ip, remote_port, local_ip, local_port
        else:
            src, sport, dst, dport = local_ip, local_port, remote_ip, remote_port
        body = _REQUEST.pack(
            family,
            protocol,
            0,
            ALL_STATES,
            sport.to_bytes(2, "big"),
            dport.to_bytes(2, "big"),
            src,
            dst,
            0,
            NO_COOKIE,
            NO_COOKIE,
        )
        entries = self._request(body, NLM_F_REQUEST)
        return entries[0] if entries else None

    def dump(self, family: int, protocol: int, states: int = ALL_STATES) -> list[DiagEntry]:
        """Every ``family``/``protocol`` socket whose state is in the ``states`` bit mask."""
        zeros = bytes(16)
        body = _REQUEST.pack(family, protocol, 0, states, b"\0\0", b"\0\0", zeros, zeros, 0, NO_COOKIE, NO_COOKIE)
        return self._request(body, NLM_F_REQUEST | NLM_F_DUMP)

    def _request(self, body: bytes, flags: int) -> list[DiagEntry]:
        """Send one request; return the sockets of its answer (none for ENOENT)."""
        with self._lock:
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            seq = self._seq
            self._sock.send(_HEADER.pack(_HEADER.size + len(body), SOCK_DIAG_BY_FAMILY, flags, seq, 0) + body)
            entries: list[DiagEntry] = []
            while True:
                data = self._sock.recv(_RECV_SIZE)
                done, failure = self._parse(data, seq, entries)
                if failure == errno.ENOENT:
                    return []
                if failure:
                    raise OSError(failure, f"sock_diag: {os.strerror(failure)}")
                if done or (entries and not flags & NLM_F_DUMP):
                    return entries

    @staticmethod
    def _parse(data: bytes, seq: int, into: list[DiagEntry]) -> tuple[bool, int]:
        """Append the sockets in one datagram; return (answer complete, errno or 0).

        Messages of another sequence number are left-overs of an earlier
        request that failed half way; they are skipped.
        """
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, kind, _flags, msg_seq, _port = _HEADER.unpack_from(data, offset)
            if length < _HEADER.size:
                break
            body = offset + _HEADER.size
            if msg_seq == seq:
                if kind == NLMSG_DONE:
                    return True, 0
                if kind == NLMSG_ERROR:
                    return True, -_ERRNO.unpack_from(data, body)[0]
                if kind == SOCK_DIAG_BY_FAMILY and length - _HEADER.size >= _MSG_SIZE:
                    into.append(_decode(data, body))
            offset += (length + 3) & ~3
        return False, 0
