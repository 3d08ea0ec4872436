"""Changing pmk's bits of many conntrack entries at once: filtered dumps, in-place updates in bulk.

Used to clear pmk's marks from every marked entry (``forget_all``, i.e.
clear_cache, and at start and close), with up to a million of them, and to
re-mark the flows of a key without ports (ICMP). One request per entry with
an awaited answer (what pyroute2 offers) took about 1 ms per entry: 153 s
for 145k. Here the work is in bulk and hand-written (``ctevents``' message
layout), because per-entry Python cost is what remains:

- the kernel finds the entries: a dump request with a filter (``CTA_MARK``
  and ``CTA_MARK_MASK``, one dump per mark bit, both IP versions at once;
  or a tuple filter, ``CTA_FILTER``), so entries it skips cost no Python;
- for each dump datagram (at most 32 KiB, some 150 entries) one datagram of
  update requests (``IPCTNL_MSG_CT_NEW`` without ``NLM_F_CREATE`` changes an
  existing entry; each is smaller than the dumped entry it names, so the
  datagram fits wherever the dump's did): each names its entry by the
  original tuple and zone, copied from the dump as they are, and sets pmk's
  bits (``CTA_MARK`` under ``CTA_MARK_MASK``: the kernel keeps the other
  bits). The kernel handles every message of a datagram within the
  ``sendto`` and reports failures only (no ``NLM_F_ACK``), shortened to
  their header (``NETLINK_CAP_ACK``); they are read right after. ENOENT
  (the connection ended meanwhile) is no failure.

Entries are updated while their dump goes on, in chunks of one datagram, so
memory stays small and the GIL is let go at every system call (pmk's event
loop runs meanwhile). That cannot make a dump run forever or miss entries:
neither a mark nor anything else an update changes is part of the table's
hashing (an update moves nothing), and an entry cleared before a mark
filter's dump reaches it again no longer passes the filter.

Costs (``benchmarks/ctmarks.py``): about 4 us per cleared entry, more than
half of it the kernel filling the dump; walking a table of a million
entries costs about 0.3 s per dump even when it finds nothing.

Entries are deleted never: deleting would send DESTROY events (pmk would
report the connections as ended) and break NATed (rerouted) connections.
"""

from __future__ import annotations

import errno
import functools
import operator
import os
import socket
import struct
from collections.abc import Callable, Iterable

from pmk.capture.ctevents import (
    _NFGEN,
    _NLA,
    _NLA_TYPE_MASK,
    _NLMSG,
    _RECV_SIZE,
    CTA_IP_V4_DST,
    CTA_IP_V4_SRC,
    CTA_IP_V6_DST,
    CTA_IP_V6_SRC,
    CTA_MARK,
    CTA_MARK_MASK,
    CTA_PROTO_NUM,
    CTA_TUPLE_IP,
    CTA_TUPLE_ORIG,
    CTA_TUPLE_PROTO,
    CTA_TUPLE_REPLY,
    IPCTNL_MSG_CT_GET,
    IPCTNL_MSG_CT_NEW,
    NETLINK_NETFILTER,
    NFNL_SUBSYS_CTNETLINK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    SO_RCVBUFFORCE,
    SOL_NETLINK,
    _tuple,
)

CTA_ZONE = 18
CTA_FILTER = 25
CTA_FILTER_ORIG_FLAGS = 1
FILTER_IP_SRC, FILTER_IP_DST, FILTER_PROTO_NUM = 1 << 0, 1 << 1, 1 << 3  # CTA_FILTER_FLAG_CTA_*
NLA_F_NESTED = 0x8000
NETLINK_CAP_ACK = 10
#: Receive buffer of the update socket: room for every failure report of
#: one update datagram (about 1 KiB of kernel memory each), many times over.
UPDATE_RCVBUF = 4 << 20

_NEW_TYPE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
_GET_TYPE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
_ERRNO = struct.Struct("=i")
_BE32 = struct.Struct(">I")
_U32 = struct.Struct("=I")
_HEAD = _NLMSG.size + _NFGEN.size


#: Whether to change an entry, given ``data`` and where its original tuple's attributes start and end.
Keep = Callable[[bytes | bytearray, int, int], bool]


def _attr(kind: int, value: int) -> bytes:
    return _NLA.pack(8, kind) + _BE32.pack(value)


def _nest(kind: int, payload: bytes) -> bytes:
    return _NLA.pack(4 + len(payload), kind | NLA_F_NESTED) + payload


def _tuple_filter(protocol: int, src: bytes, dst: bytes) -> bytes:
    """Dump filter attributes: entries whose original tuple has this protocol, source and destination."""
    v4 = len(src) == 4
    addresses = _NLA.pack(4 + len(src), CTA_IP_V4_SRC if v4 else CTA_IP_V6_SRC) + src
    addresses += _NLA.pack(4 + len(dst), CTA_IP_V4_DST if v4 else CTA_IP_V6_DST) + dst
    proto = _NLA.pack(5, CTA_PROTO_NUM) + bytes((protocol, 0, 0, 0))
    orig = _nest(CTA_TUPLE_ORIG, _nest(CTA_TUPLE_IP, addresses) + _nest(CTA_TUPLE_PROTO, proto))
    flags = _NLA.pack(8, CTA_FILTER_ORIG_FLAGS) + _U32.pack(FILTER_IP_SRC | FILTER_IP_DST | FILTER_PROTO_NUM)
    return orig + _nest(CTA_FILTER, flags)


def _identity(data: bytes | bytearray, pos: int, end: int) -> bytes:
    """The original-tuple and zone attributes among the entry attributes at ``data[pos:end]`` (b"": none).

    Walks them all: only for a layout other than the kernel's usual one (see ``updates_of``).
    """
    orig = zone = b""
    while pos + 4 <= end:
        length, kind = _NLA.unpack_from(data, pos)
        if length < 4 or pos + length > end:
            break
        kind &= _NLA_TYPE_MASK
        if kind == CTA_TUPLE_ORIG:
            orig = bytes(data[pos : pos + ((length + 3) & ~3)])
        elif kind == CTA_ZONE and length >= 6:
            zone = bytes(data[pos : pos + 8])
        pos += (length + 3) & ~3
    return orig + zone if orig else b""


def updates_of(
    data: bytes | bytearray,
    size: int,
    seq: int,
    tail: bytes,
    into: list[bytes | bytearray],
    keep: Keep | None = None,
) -> tuple[bool, int, int]:
    """Append the pieces of an update request per entry of one dump datagram.

    Returns (dump complete, errno or 0, requests added). With ``keep``, only
    entries it passes (given their original tuple) get one.

    A request is the entry's own family header, original tuple and zone
    (when not the default), then ``tail``; ``b"".join(into)`` is the
    datagram to send. This loop is the per-entry Python cost of a clear,
    hence its shape: the kernel writes the original tuple first, the reply
    tuple second and the zone third, so three attribute headers are read
    and one or two slices taken; any other layout is walked in full
    (``_identity``). Messages of another sequence number are skipped; the
    requests carry sequence 0.
    """
    message, attr = _NLMSG.unpack_from, _NLA.unpack_from
    headers: dict[int, bytes] = {}
    add = into.extend
    pos = count = 0
    while pos + _NLMSG.size <= size:
        length, kind, _flags, msg_seq, _port = message(data, pos)
        if length < _NLMSG.size:
            break
        end = min(pos + length, size)
        if msg_seq != seq:
            pass
        elif kind == _NEW_TYPE and end - pos >= _HEAD + 8:
            first = pos + _HEAD
            orig_length, orig_kind = attr(data, first)
            reply = first + ((orig_length + 3) & ~3)
            reply_length, reply_kind = attr(data, reply) if reply + 4 <= end else (0, 0)
            third = reply + ((reply_length + 3) & ~3)
            if orig_kind & _NLA_TYPE_MASK == CTA_TUPLE_ORIG and reply_kind & _NLA_TYPE_MASK == CTA_TUPLE_REPLY:
                if keep is None or keep(data, first + 4, first + orig_length):
                    zone = third + 8 <= end and attr(data, third)[1] & _NLA_TYPE_MASK == CTA_ZONE
                    total = reply - pos + len(tail) + (8 if zone else 0)
                    header = headers.get(total)
                    if header is None:
                        header = headers[total] = _NLMSG.pack(total, _NEW_TYPE, NLM_F_REQUEST, 0, 0)
                    if zone:
                        add((header, data[pos + _NLMSG.size : reply], data[third : third + 8], tail))
                    else:
                        add((header, data[pos + _NLMSG.size : reply], tail))
                    count += 1
            else:
                identity = _identity(data, first, end)
                if identity and (keep is None or keep(identity, 4, _NLA.unpack_from(identity)[0])):
                    body = bytes(data[pos + _NLMSG.size : first]) + identity + tail
                    add((_NLMSG.pack(_NLMSG.size + len(body), _NEW_TYPE, NLM_F_REQUEST, 0, 0), body))
                    count += 1
        elif kind == NLMSG_DONE:
            return True, 0, count
        elif kind == NLMSG_ERROR:
            failure = -_ERRNO.unpack_from(data, pos + _NLMSG.size)[0] if end - pos >= 20 else errno.EPROTO
            return True, failure, count
        pos += (length + 3) & ~3
    return False, 0, count


def failures_of(data: bytes | bytearray, size: int) -> tuple[int, int]:
    """(entries gone, first other errno or 0) among the error reports of one datagram."""
    gone = failure = 0
    pos = 0
    while pos + _NLMSG.size <= size:
        length, kind, _flags, _seq, _port = _NLMSG.unpack_from(data, pos)
        if length < _NLMSG.size:
            break
        if kind == NLMSG_ERROR and pos + 20 <= size:
            code = -_ERRNO.unpack_from(data, pos + _NLMSG.size)[0]
            if code == errno.ENOENT:
                gone += 1
            elif code and not failure:
                failure = code
        pos += (length + 3) & ~3
    return gone, failure


class BulkMarks:
    """Sets pmk's bits of every entry a kernel-filtered dump finds; blocking, one thread at a time.

    Holds two ctnetlink sockets (a dump's answers and update failures stay
    apart), opened at first use in the calling thread's network namespace.
    Raises OSError when the kernel refuses; ``close`` and a failure close the
    sockets (the next call opens fresh ones).
    """

    def __init__(self, mark_mask: int) -> None:
        self.mark_mask = mark_mask
        self._dump: socket.socket | None = None
        self._update: socket.socket | None = None
        self._buffer = bytearray(_RECV_SIZE)
        self._reports = bytearray(_RECV_SIZE)
        self._seq = 0

    def clear(self, values: Iterable[int]) -> int:
        """Clear pmk's bits from every entry that has a bit of ``values``; returns how many entries.

        One dump per bit (two for pmk's values 1, 2 and 3, not three): every
        dump walks the whole table, and an entry holding two of the bits is
        cleared by the first dump, so the second skips it.
        """
        bits = functools.reduce(operator.or_, values, 0) & self.mark_mask
        found = (1 << shift for shift in range(bits.bit_length()) if bits >> shift & 1)
        return sum(
            self._rewrite(socket.AF_UNSPEC, _attr(CTA_MARK, bit) + _attr(CTA_MARK_MASK, bit), 0) for bit in found
        )

    def set_between(self, protocol: int, one: bytes, other: bytes, value: int) -> int:
        """Set pmk's bits to ``value`` on every flow of ``protocol`` between two addresses; returns how many.

        For keys without ports (ICMP): their entries differ in fields the key
        lacks (the ICMP id), so the kernel finds them with a tuple filter, one
        dump per direction (which address began the flow). Each entry found
        is checked again: a kernel older than the filter (5.9) ignores it
        and dumps every entry.
        """
        family = socket.AF_INET if len(one) == 4 else socket.AF_INET6
        changed = 0
        for src, dst in ((one, other), (other, one)) if one != other else ((one, other),):

            def between(data: bytes | bytearray, pos: int, end: int, src: bytes = src, dst: bytes = dst) -> bool:
                found_protocol, found_src, _, found_dst, _ = _tuple(data, pos, end)
                return (found_protocol, found_src, found_dst) == (protocol, src, dst)

            changed += self._rewrite(family, _tuple_filter(protocol, src, dst), value, between)
        return changed

    def close(self) -> None:
        for sock in (self._dump, self._update):
            if sock is not None:
                sock.close()
        self._dump = self._update = None

    def _sockets(self) -> tuple[socket.socket, socket.socket]:
        if self._dump is None or self._update is None:
            self.close()
            self._dump = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
            self._dump.bind((0, 0))
            update = self._update = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
            )
            try:
                update.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, UPDATE_RCVBUF)
            except PermissionError:  # CAP_NET_ADMIN of a container only: capped by net.core.rmem_max
                update.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UPDATE_RCVBUF)
            update.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            update.bind((0, 0))
        return self._dump, self._update

    def _rewrite(self, family: int, filters: bytes, value: int, keep: Keep | None = None) -> int:
        """Dump the entries ``filters`` select and set pmk's bits of each (``keep`` passes) to ``value``.

        Returns how many changed.
        """
        try:
            return self._rewrite_on(*self._sockets(), family, filters, value, keep)
        except BaseException:
            self.close()
            raise

    def _rewrite_on(
        self, dump: socket.socket, update: socket.socket, family: int, filters: bytes, value: int, keep: Keep | None
    ) -> int:
        self._seq = seq = self._seq % 0xFFFFFFFF + 1
        body = _NFGEN.pack(family, 0, 0) + filters
        dump.send(_NLMSG.pack(_HEAD - _NFGEN.size + len(body), _GET_TYPE, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body)
        buffer, tail = self._buffer, _attr(CTA_MARK, value) + _attr(CTA_MARK_MASK, self.mark_mask)
        changed = 0
        done = False
        while not done:
            size = dump.recv_into(buffer)
            requests: list[bytes | bytearray] = []
            done, failure, count = updates_of(buffer, size, seq, tail, requests, keep)
            if failure:
                raise OSError(failure, f"conntrack dump: {os.strerror(failure)}")
            if count:
                update.send(b"".join(requests))
                changed += count - self._gone(update)
        return changed

    def _gone(self, update: socket.socket) -> int:
        """How many of the last updates found no entry; raises OSError for any other failure.

        The kernel handled the whole datagram within ``send``: every report is queued by now.
        """
        gone = 0
        while True:
            try:
                size = update.recv_into(self._reports, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return gone
            # ENOBUFS (reports lost) propagates: which updates failed is then unknown.
            ended, failure = failures_of(self._reports, size)
            if failure:
                raise OSError(failure, os.strerror(failure))
            gone += ended
