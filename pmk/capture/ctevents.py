"""Connection ends and byte counts from the kernel's connection tracking (ctnetlink).

On the nfqueue backend a decided connection never reaches Python again: its
verdict lives in the conntrack mark. So pmk learns that it ended from the
kernel's conntrack DESTROY events, and what it carried from the kernel's
accounting counters (``net.netfilter.nf_conntrack_acct``, switched on by
``ConntrackEvents.open``).

Subscribe before connections are marked: a connection made earlier has no
counters (accounting was off) and, with ``nf_conntrack_events`` at its
default 2 ("auto"), no events either, since the kernel equips a connection
for events only if someone listens when it is made. Connections pmk accepts
as already existing at start may therefore end unnoticed.

Spoken directly over AF_NETLINK with ``struct``, like ``pmk.host.sockdiag``:
pyroute2 has no event subscription call (a socket bound to the group works)
and costs about 5 times the CPU per received event and 30 times per dumped
entry (``benchmarks/ctevents_burst.py``). Only pmk's connections are
delivered: a classic BPF filter on the socket drops the events of connections
without pmk's mark bits in the kernel, before they count against the receive
buffer (the ``SKF_AD_NLATTR`` extension finds the mark attribute).

Which side is local: a conntrack entry does not say which host began the
connection, so ``LocalAddresses`` keeps this host's addresses (from
rtnetlink, updated whenever one is added) and a connection whose original
source is one of them is outbound; every other one is inbound. Loopback
connections are outbound, as the nfqueue backend decides them at their first
(OUTPUT) packet. Addresses are never forgotten while pmk runs, so a
connection from an address removed before it ended is still placed right.

Keys follow what pmk decided on: an outbound connection is keyed by its
original tuple (the application's view, before the DNAT of a reroute); an
inbound one by its original source and its reply source (the address the
connection reached after any PREROUTING DNAT, as INPUT saw it).

Lost events: when the receive buffer overflows the kernel drops events and
the next read fails with ENOBUFS. Overflows are counted
(``conntrack_events_lost``: each lost one or more events) and logged at most
once a second; the connections those events ended keep their verdicts in the
verdict cache until LRU evicts them, and get no ``connection_end``.
``dump_marked`` tells which marked connections still exist, for a caller that
wants to reconcile. (The kernel can instead hold and redeliver undelivered
DESTROY events, NETLINK_BROADCAST_ERROR; not used: a stalled pmk would then
keep every ended connection in the conntrack table, which fills and drops
the whole host's new connections.)
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import operator
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from pmk.errors import PmkError
from pmk.packet.parse import PORT_PROTOCOLS
from pmk.verdicts import ConnKey

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
#: nfnetlink multicast group of conntrack DESTROY events.
NFNLGRP_CONNTRACK_DESTROY = 3
NLM_F_REQUEST = 0x01
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33

# ctnetlink attributes (linux/netfilter/nfnetlink_conntrack.h).
CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_MARK = 8
CTA_COUNTERS_ORIG = 9
CTA_COUNTERS_REPLY = 10
CTA_ID = 12
CTA_TIMESTAMP = 20
CTA_MARK_MASK = 21
CTA_TIMESTAMP_START, CTA_TIMESTAMP_STOP = 1, 2
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
NLA_F_NESTED = 0x8000
CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES, CTA_COUNTERS32_PACKETS, CTA_COUNTERS32_BYTES = 1, 2, 3, 4
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER

# rtnetlink, for this host's addresses.
RTM_NEWADDR = 20
RTM_GETADDR = 22
IFA_ADDRESS = 1
IFA_LOCAL = 2
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100

#: Receive buffer of the event socket. The kernel doubles it for its overhead
#: and charges about 1.25 KiB per queued event, so this holds about 26k ends
#: between two reads; memory is taken only while events wait.
DEFAULT_EVENT_RCVBUF = 16 << 20
#: At most this many events are read per wake-up, so a flood of ends cannot
#: keep the event loop from packets and clients; the rest wait for the next.
EVENTS_PER_WAKEUP = 1024
#: Lost-event warnings: at most one per this many seconds.
LOST_LOG_INTERVAL = 1.0
ACCT_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_acct"
TIMESTAMP_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_timestamp"
EVENTS_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_events"

_NLMSG = struct.Struct("=IHHII")  # length, type, flags, seq, port id
_NFGEN = struct.Struct("=BBH")  # family, version, res_id (network order)
_NLA = struct.Struct("=HH")  # length, type
_IFADDR = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface index
_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_ERRNO = struct.Struct("=i")
_BPF_INSN = struct.Struct("=HBBI")
_RECV_SIZE = 65536
_DELETE_TYPE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
_NEW_TYPE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW


class CtEntry(NamedTuple):
    """One conntrack entry as the kernel reports it: both tuples, the mark, both counters.

    Addresses are packed (4 or 16 bytes); ports are 0 for protocols without.
    ``orig`` is the direction of the connection's first packet; ``ct_id`` is
    the kernel's id of the entry, a 32-bit hash: two live entries share one
    now and then (two pairs among 100k entries, measured). ``start_ns`` and
    ``stop_ns`` are when the kernel began and stopped tracking it, in
    CLOCK_REALTIME nanoseconds (``nf_conntrack_timestamp``); 0 when not known
    (stop: the entry is live).
    """

    ct_id: int
    protocol: int
    orig_src: bytes
    orig_sport: int
    orig_dst: bytes
    orig_dport: int
    reply_src: bytes
    reply_sport: int
    reply_dst: bytes
    reply_dport: int
    mark: int
    orig_packets: int
    orig_bytes: int
    reply_packets: int
    reply_bytes: int
    start_ns: int = 0
    stop_ns: int = 0


class Counters(NamedTuple):
    """A connection's traffic from this host's point of view."""

    packets_in: int
    packets_out: int
    bytes_in: int
    bytes_out: int


class Ended(NamedTuple):
    """A pmk-marked connection the kernel stopped tracking, placed on this host.

    ``span`` is (began, stopped) on pmk's clock (time.monotonic), from the
    kernel's timestamps; None for an entry made before timestamps were on.
    """

    key: ConnKey
    outbound: bool
    mark: int
    counters: Counters
    span: tuple[float, float] | None = None


#: Called once per wake-up with every connection end read in it.
EndedSink = Callable[[list[Ended]], None]


# --- ctnetlink messages -------------------------------------------------------


def _port_tuple_layout(address_size: int) -> tuple[struct.Struct, Callable[[tuple[Any, ...]], Any], set[Any]]:
    """How the kernel lays out a tuple with ports: the struct, its attribute headers' places and values.

    Both with and without NLA_F_NESTED on the nested ones (kernels before 5.2 left it off).
    """
    layout = struct.Struct(f">HHHH{address_size}sHH{address_size}sHHHHB3xHHH2xHHH2x")
    headers = operator.itemgetter(0, 1, 2, 3, 5, 6, 8, 9, 10, 11, 13, 14, 16, 17)
    v4 = address_size == 4
    expected = set()
    for nested in (0, NLA_F_NESTED):
        template = _NLA.pack(4 + 2 * (4 + address_size), CTA_TUPLE_IP | nested)
        template += _NLA.pack(4 + address_size, CTA_IP_V4_SRC if v4 else CTA_IP_V6_SRC) + bytes(address_size)
        template += _NLA.pack(4 + address_size, CTA_IP_V4_DST if v4 else CTA_IP_V6_DST) + bytes(address_size)
        template += _NLA.pack(28, CTA_TUPLE_PROTO | nested) + _NLA.pack(5, CTA_PROTO_NUM) + bytes(4)
        template += _NLA.pack(6, CTA_PROTO_SRC_PORT) + bytes(4) + _NLA.pack(6, CTA_PROTO_DST_PORT) + bytes(4)
        expected.add(headers(layout.unpack(template)))
    return layout, headers, expected


#: Where the addresses sit in a CTA_TUPLE_IP of each size (IPv4, IPv6) and
#: what follows: read with one unpack, the headers checked against these.
_PORT_TUPLES = {4 + 2 * (4 + size): _port_tuple_layout(size) for size in (4, 16)}


def _tuple(data: bytes | bytearray, pos: int, end: int) -> tuple[int, bytes, int, bytes, int]:
    """(protocol, src, sport, dst, dport) of a CTA_TUPLE_* payload.

    The kernel's layout of a TCP or UDP tuple is read in one unpack (the
    profile of ``dump_marked`` put this function first, at 6 us a call);
    anything else is walked attribute by attribute.
    """
    fast = _PORT_TUPLES.get(_NLA.unpack_from(data, pos)[0]) if pos + 4 <= end else None
    if fast is not None and pos + fast[0].size <= end:
        values = fast[0].unpack_from(data, pos)
        if fast[1](values) in fast[2] and values[12] in PORT_PROTOCOLS:
            return values[12], values[4], values[15], values[7], values[18]
    protocol = sport = dport = 0
    src = dst = b""
    while pos + 4 <= end:
        length, kind = _NLA.unpack_from(data, pos)
        if length < 4 or pos + length > end:
            break
        kind &= _NLA_TYPE_MASK
        inner, inner_end = pos + 4, pos + length
        if kind == CTA_TUPLE_IP:
            while inner + 4 <= inner_end:
                alen, akind = _NLA.unpack_from(data, inner)
                if alen < 4 or inner + alen > inner_end:
                    break
                akind &= _NLA_TYPE_MASK
                if akind in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                    src = bytes(data[inner + 4 : inner + alen])
                elif akind in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                    dst = bytes(data[inner + 4 : inner + alen])
                inner += (alen + 3) & ~3
        elif kind == CTA_TUPLE_PROTO:
            while inner + 4 <= inner_end:
                alen, akind = _NLA.unpack_from(data, inner)
                if alen < 4 or inner + alen > inner_end:
                    break
                akind &= _NLA_TYPE_MASK
                if akind == CTA_PROTO_NUM and alen >= 5:
                    protocol = data[inner + 4]
                elif akind == CTA_PROTO_SRC_PORT and alen >= 6:
                    sport = _BE16.unpack_from(data, inner + 4)[0]
                elif akind == CTA_PROTO_DST_PORT and alen >= 6:
                    dport = _BE16.unpack_from(data, inner + 4)[0]
                inner += (alen + 3) & ~3
        pos += (length + 3) & ~3
    if protocol not in PORT_PROTOCOLS:
        sport = dport = 0
    return protocol, src, sport, dst, dport


#: What a nested attribute read as a pair holds: attribute type -> (which of the two, its encoding).
_COUNTER_FIELDS = {
    CTA_COUNTERS_PACKETS: (0, _BE64),
    CTA_COUNTERS_BYTES: (1, _BE64),
    CTA_COUNTERS32_PACKETS: (0, _BE32),
    CTA_COUNTERS32_BYTES: (1, _BE32),
}
_TIMESTAMP_FIELDS = {CTA_TIMESTAMP_START: (0, _BE64), CTA_TIMESTAMP_STOP: (1, _BE64)}


def _pair(data: bytes | bytearray, pos: int, end: int, fields: dict[int, tuple[int, struct.Struct]]) -> tuple[int, int]:
    """The two numbers of a nested attribute, 0 where missing: (packets, bytes) of a
    CTA_COUNTERS_* payload with ``_COUNTER_FIELDS``, (start, stop) of a CTA_TIMESTAMP one."""
    pair = [0, 0]
    while pos + 4 <= end:
        length, kind = _NLA.unpack_from(data, pos)
        if length < 4 or pos + length > end:
            break
        field = fields.get(kind & _NLA_TYPE_MASK)
        if field is not None and length >= 4 + field[1].size:
            pair[field[0]] = field[1].unpack_from(data, pos + 4)[0]
        pos += (length + 3) & ~3
    return pair[0], pair[1]


def parse_entry(data: bytes | bytearray, pos: int, end: int, mark_mask: int) -> CtEntry | None:
    """The entry in the message at ``data[pos:end]``, or None when it lacks ``mark_mask`` bits.

    The mark is looked at first, so the entries of other connections cost a
    walk over a handful of top-level attributes and build nothing. A message
    too short or cut short yields what it holds (missing parts are empty or 0).
    """
    mark = ct_id = 0
    orig = reply = counters_orig = counters_reply = stamps = -1
    pos += _NLMSG.size + _NFGEN.size
    while pos + 4 <= end:
        length, kind = _NLA.unpack_from(data, pos)
        if length < 4 or pos + length > end:
            break
        kind &= _NLA_TYPE_MASK
        if kind == CTA_MARK and length >= 8:
            mark = _BE32.unpack_from(data, pos + 4)[0]
        elif kind == CTA_ID and length >= 8:
            ct_id = _BE32.unpack_from(data, pos + 4)[0]
        elif kind == CTA_TUPLE_ORIG:
            orig, orig_end = pos + 4, pos + length
        elif kind == CTA_TUPLE_REPLY:
            reply, reply_end = pos + 4, pos + length
        elif kind == CTA_COUNTERS_ORIG:
            counters_orig, counters_orig_end = pos + 4, pos + length
        elif kind == CTA_COUNTERS_REPLY:
            counters_reply, counters_reply_end = pos + 4, pos + length
        elif kind == CTA_TIMESTAMP:
            stamps, stamps_end = pos + 4, pos + length
        pos += (length + 3) & ~3
    if not mark & mark_mask or orig < 0:
        return None
    protocol, osrc, osport, odst, odport = _tuple(data, orig, orig_end)
    if reply >= 0:
        _, rsrc, rsport, rdst, rdport = _tuple(data, reply, reply_end)
    else:
        rsrc, rsport, rdst, rdport = odst, odport, osrc, osport
    opk, oby = _pair(data, counters_orig, counters_orig_end, _COUNTER_FIELDS) if counters_orig >= 0 else (0, 0)
    rpk, rby = _pair(data, counters_reply, counters_reply_end, _COUNTER_FIELDS) if counters_reply >= 0 else (0, 0)
    start, stop = _pair(data, stamps, stamps_end, _TIMESTAMP_FIELDS) if stamps >= 0 else (0, 0)
    return CtEntry(
        ct_id, protocol, osrc, osport, odst, odport, rsrc, rsport, rdst, rdport, mark, opk, oby, rpk, rby, start, stop
    )


def _walk(
    data: bytes | bytearray, size: int, seq: int | None, on_message: Callable[[int, int, int], None]
) -> tuple[bool, int]:
    """Hand each message of one netlink datagram to ``on_message(kind, pos, end)``.

    Returns (dump complete, errno or 0) once NLMSG_DONE or NLMSG_ERROR is met.
    With ``seq``, messages of another sequence number (left-overs of an
    earlier dump) are skipped; events carry sequence 0 and are read with None.
    """
    pos = 0
    while pos + _NLMSG.size <= size:
        length, kind, _flags, msg_seq, _port = _NLMSG.unpack_from(data, pos)
        if length < _NLMSG.size:
            break
        end = min(pos + length, size)
        if seq is None or msg_seq == seq:
            if kind == NLMSG_DONE:
                return True, 0
            if kind == NLMSG_ERROR:
                return True, -_ERRNO.unpack_from(data, pos + _NLMSG.size)[0] if end - pos >= 20 else errno.EPROTO
            on_message(kind, pos, end)
        pos += (length + 3) & ~3
    return False, 0


def parse_datagram(
    data: bytes | bytearray, size: int, mark_mask: int, into: list[CtEntry], seq: int | None = None
) -> tuple[bool, int]:
    """Append the pmk-marked entries of one netlink datagram; return (dump complete, errno or 0).

    Events (DELETE) and dump answers (NEW) are both read; ``seq`` as in ``_walk``.
    """

    def entry(kind: int, pos: int, end: int) -> None:
        if kind in (_DELETE_TYPE, _NEW_TYPE):
            found = parse_entry(data, pos, end, mark_mask)
            if found is not None:
                into.append(found)

    return _walk(data, size, seq, entry)


# --- this host's side ---------------------------------------------------------


def _parse_addresses(data: bytes | bytearray, size: int, into: set[bytes], seq: int | None = None) -> tuple[bool, int]:
    """Add the addresses of RTM_NEWADDR messages in one datagram; return (dump complete, errno or 0)."""

    def address_of(kind: int, pos: int, end: int) -> None:
        if kind != RTM_NEWADDR:
            return
        local = address = None
        attr = pos + _NLMSG.size + _IFADDR.size
        while attr + 4 <= end:
            alen, akind = _NLA.unpack_from(data, attr)
            if alen < 4 or attr + alen > end:
                break
            if akind == IFA_LOCAL:
                local = bytes(data[attr + 4 : attr + alen])
            elif akind == IFA_ADDRESS:
                address = bytes(data[attr + 4 : attr + alen])
            attr += (alen + 3) & ~3
        # IFA_LOCAL is this side of a point-to-point link, whose IFA_ADDRESS is the peer.
        found = local if local is not None else address
        if found is not None and len(found) in (4, 16):
            into.add(found)

    return _walk(data, size, seq, address_of)


class LocalAddresses:
    """The addresses of this network namespace, kept current from rtnetlink.

    ``refresh`` reads them all; ``watch`` subscribes to new addresses and
    ``update`` reads what arrived since (non-blocking, cheap when nothing
    did), so callers bring the set up to date right before they use it.
    Addresses are added, never removed (see the module's docstring), and all
    of 127.0.0.0/8 counts as local, as the kernel routes it.
    """

    def __init__(self, addresses: Iterable[bytes] = ()) -> None:
        self.addresses: set[bytes] = set(addresses)
        self._watch: socket.socket | None = None
        self._buffer = bytearray(_RECV_SIZE)
        # update() runs on the event loop and in dump_marked's worker thread.
        self._lock = threading.Lock()

    def is_local(self, address: bytes) -> bool:
        return address in self.addresses or (len(address) == 4 and address[0] == 127)

    def refresh(self) -> None:
        """Add every address the kernel has now (one RTM_GETADDR dump)."""
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as sock:
            sock.bind((0, 0))
            body = _IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
            sock.send(_NLMSG.pack(_NLMSG.size + len(body), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)
            found: set[bytes] = set()
            buffer = bytearray(_RECV_SIZE)
            while True:
                size = sock.recv_into(buffer)
                done, failure = _parse_addresses(buffer, size, found, seq=1)
                if failure:
                    raise OSError(failure, f"rtnetlink address dump: {os.strerror(failure)}")
                if done:
                    break
        self.addresses |= found

    def watch(self) -> None:
        """Subscribe to new addresses, then read the current ones (so none is missed in between)."""
        if self._watch is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
            sock.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
            sock.setblocking(False)
            self._watch = sock
        self.refresh()

    def update(self) -> None:
        """Take in the addresses announced since the last call; re-read all if announcements were lost."""
        with self._lock:
            sock = self._watch
            if sock is None:
                return
            while True:
                try:
                    size = sock.recv_into(self._buffer)
                except BlockingIOError:
                    return
                except OSError as error:
                    if error.errno != errno.ENOBUFS:
                        raise
                    self.refresh()
                    continue
                _parse_addresses(self._buffer, size, self.addresses)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None


def place(entry: CtEntry, local: LocalAddresses, wall_ahead: float = 0.0) -> Ended:
    """The entry as pmk keys it: outbound when its original source is this host's.

    ``wall_ahead``: how far CLOCK_REALTIME is ahead of pmk's clock, to put the
    kernel's timestamps on pmk's.
    """
    span = None
    if entry.start_ns and entry.stop_ns:
        span = (entry.start_ns / 1e9 - wall_ahead, entry.stop_ns / 1e9 - wall_ahead)
    if local.is_local(entry.orig_src):
        key = ConnKey(entry.protocol, entry.orig_src, entry.orig_sport, entry.orig_dst, entry.orig_dport)
        counters = Counters(entry.reply_packets, entry.orig_packets, entry.reply_bytes, entry.orig_bytes)
        return Ended(key, True, entry.mark, counters, span)
    key = ConnKey(entry.protocol, entry.reply_src, entry.reply_sport, entry.orig_src, entry.orig_sport)
    counters = Counters(entry.orig_packets, entry.reply_packets, entry.orig_bytes, entry.reply_bytes)
    return Ended(key, False, entry.mark, counters, span)


# --- the kernel's settings ----------------------------------------------------


def _enable_sysctl(path: str, name: str) -> bool:
    """Set a 0/1 sysctl of this namespace to 1 (if it is 0); True if it was changed."""
    try:
        with open(path) as current:
            if current.read().strip() != "0":
                return False
        with open(path, "w") as setting:
            setting.write("1")
    except OSError as error:
        raise PmkError(f"cannot set {name}=1 ({error.strerror}): needs root and nf_conntrack") from None
    return True


def enable_accounting() -> None:
    """Make the kernel count packets and bytes per connection, time it, and send conntrack events.

    These are settings of this network namespace that pmk leaves on when it
    stops (turning them off again would not take counters away from entries
    that have them, only from connections made later). Counters and
    timestamps exist only for connections made after they are on. The
    timestamps tell an end event that comes late from the end of a newer
    connection with the same addresses (``Ended.span``); a kernel without
    them (no CONFIG_NF_CONNTRACK_TIMESTAMP) runs pmk without that check.
    """
    if _enable_sysctl(ACCT_SYSCTL, "net.netfilter.nf_conntrack_acct"):
        log.info("conntrack accounting switched on (net.netfilter.nf_conntrack_acct=1)")
    if _enable_sysctl(EVENTS_SYSCTL, "net.netfilter.nf_conntrack_events"):
        log.info("conntrack events switched on (net.netfilter.nf_conntrack_events=1)")
    if not os.path.exists(TIMESTAMP_SYSCTL):
        log.warning("this kernel has no conntrack timestamps: a late end event can end a newer connection's record")
    elif _enable_sysctl(TIMESTAMP_SYSCTL, "net.netfilter.nf_conntrack_timestamp"):
        log.info("conntrack timestamps switched on (net.netfilter.nf_conntrack_timestamp=1)")


# --- destroy events -----------------------------------------------------------


def mark_filter(mark_mask: int) -> bytes:
    """A classic BPF program passing only conntrack messages whose mark has bits of ``mark_mask``.

    The ``SKF_AD_NLATTR`` extension finds a top-level netlink attribute by
    type (A: where the attributes start, X: the type) and yields its offset,
    or 0 when there is none (a mark of 0 is not sent at all).
    """
    ld_imm, ldx_imm, ld_b_abs, ld_w_ind = 0x00, 0x01, 0x30, 0x40
    jeq_k, and_k, tax, ret_k = 0x15, 0x54, 0x07, 0x06
    nlattr = (-0x1000 + 12) & 0xFFFFFFFF  # SKF_AD_OFF + SKF_AD_NLATTR
    program = [
        (ld_imm, 0, 0, _NLMSG.size + _NFGEN.size),
        (ldx_imm, 0, 0, CTA_MARK),
        (ld_b_abs, 0, 0, nlattr),
        (jeq_k, 5, 0, 0),  # no mark attribute: drop
        (tax, 0, 0, 0),
        (ld_w_ind, 0, 0, 4),  # the mark, network order
        (and_k, 0, 0, mark_mask),
        (jeq_k, 1, 0, 0),
        (ret_k, 0, 0, 0xFFFFFFFF),
        (ret_k, 0, 0, 0),
    ]
    return b"".join(_BPF_INSN.pack(*insn) for insn in program)


def _attach_filter(sock: socket.socket, program: bytes) -> None:
    code = ctypes.create_string_buffer(program)
    fprog = struct.pack("@HP", len(program) // _BPF_INSN.size, ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


class ConntrackEvents:
    """Reads conntrack DESTROY events of pmk-marked connections on the event loop.

    ``start`` subscribes (in the network namespace pmk runs in) and calls
    ``on_ended`` once per wake-up with every end read then, in order. Only
    marked connections are delivered (the BPF filter of ``mark_filter``, and
    the parser checks the mark again). ``close`` is safe to call twice.
    """

    def __init__(
        self,
        local: LocalAddresses,
        mark_mask: int,
        rcvbuf: int = DEFAULT_EVENT_RCVBUF,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.local = local
        self.mark_mask = mark_mask
        self.rcvbuf = rcvbuf
        self.events = 0
        self.lost = 0
        self._clock, self._wall = clock, wall
        self._lost_logged_at: float | None = None
        self._lost_since_log = 0
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_ended: EndedSink | None = None
        self._buffer = bytearray(_RECV_SIZE)

    def open(self) -> None:
        """Switch accounting on and subscribe, in the calling thread's network namespace.

        ``start`` calls it; call it earlier to subscribe before the event loop
        runs. Connections made before it have no counters, and no events at
        all where ``nf_conntrack_events`` is 2 (auto, the default): the kernel
        then equips a connection for events only if someone listens when it is made.
        """
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
            except PermissionError:  # CAP_NET_ADMIN of a container only: capped by net.core.rmem_max
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            _attach_filter(sock, mark_filter(self.mark_mask))
            sock.bind((0, 0))
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_CONNTRACK_DESTROY)
            sock.setblocking(False)
        except OSError as error:
            sock.close()
            raise PmkError(f"cannot subscribe to conntrack events: {error.strerror or error}") from None
        self._sock = sock
        try:
            # After the subscription, which loads nf_conntrack_netlink (and so nf_conntrack's sysctls).
            enable_accounting()
            self.local.watch()
        except BaseException:
            self.close()
            raise

    def start(self, loop: asyncio.AbstractEventLoop, on_ended: EndedSink) -> None:
        """Subscribe (``open``) and deliver ends to ``on_ended`` on ``loop``."""
        self.open()
        assert self._sock is not None
        self._loop, self._on_ended = loop, on_ended
        loop.add_reader(self._sock.fileno(), self._on_readable)

    def read(self, limit: int = EVENTS_PER_WAKEUP) -> list[Ended]:
        """Every end available now (at most ``limit`` datagrams), without waiting."""
        sock = self._sock
        if sock is None:
            return []
        entries: list[CtEntry] = []
        buffer = self._buffer
        for _ in range(limit):
            try:
                size = sock.recv_into(buffer)
            except BlockingIOError:
                break
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    raise
                self._count_lost()
                continue
            parse_datagram(buffer, size, self.mark_mask, entries)
        if not entries:
            return []
        self.events += len(entries)
        local = self.local
        local.update()
        wall_ahead = self._wall() - self._clock()
        return [place(entry, local, wall_ahead) for entry in entries]

    def _on_readable(self) -> None:
        try:
            ended = self.read()
        except OSError as error:
            log.error("conntrack events: %s; connection ends are no longer noticed", error.strerror or error)
            self.close()
            return
        if ended and self._on_ended is not None:
            self._on_ended(ended)

    def _count_lost(self) -> None:
        self.lost += 1
        self._lost_since_log += 1
        now = self._clock()
        if self._lost_logged_at is None or now - self._lost_logged_at >= LOST_LOG_INTERVAL:
            log.warning(
                "conntrack events lost (receive buffer full %d time(s) since the last warning): "
                "their connections' verdicts stay cached until evicted",
                self._lost_since_log,
            )
            self._lost_logged_at, self._lost_since_log = now, 0

    def stats(self) -> dict[str, int]:
        return {"conntrack_events": self.events, "conntrack_events_lost": self.lost}

    def close(self) -> None:
        if self._sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        self.local.close()


# --- dumps --------------------------------------------------------------------


def dump_entries(mark: int, mark_mask: int) -> list[CtEntry]:
    """Every conntrack entry (both IP versions) with ``mark & mark_mask == mark``: one kernel-filtered dump.

    Blocking: run it in a worker thread. Raises OSError when the kernel refuses.
    """
    entries: list[CtEntry] = []
    attrs = struct.pack("=HH", 8, CTA_MARK) + _BE32.pack(mark) + struct.pack("=HH", 8, CTA_MARK_MASK)
    attrs += _BE32.pack(mark_mask)
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, 0) + attrs
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    buffer = bytearray(_RECV_SIZE)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER) as sock:
        sock.bind((0, 0))
        sock.send(_NLMSG.pack(_NLMSG.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)
        while True:
            size = sock.recv_into(buffer)
            done, failure = parse_datagram(buffer, size, mark_mask, entries, seq=1)
            if failure:
                raise OSError(failure, f"conntrack dump: {os.strerror(failure)}")
            if done:
                # Checked again: a kernel that ignored the filter would repeat entries in every dump.
                return [entry for entry in entries if entry.mark & mark_mask == mark]


def dump_marked(marks: Iterable[int], mark_mask: int, local: LocalAddresses) -> dict[ConnKey, Counters]:
    """The counters of every live connection marked with one of ``marks`` (values within ``mark_mask``).

    One kernel-filtered dump per mark value (a dump filter is one
    value/mask). Entries with the same key (ICMP flows of different ids
    between the same addresses) are added up; an entry a dump repeats (it
    moved while the table was read: same id and original tuple) counts once. Blocking: run it in a
    worker thread; the caller computes deltas (the kernel's counters are
    never zeroed, so ``connection_end`` keeps the whole totals).
    """
    local.update()
    result: dict[ConnKey, Counters] = {}
    seen: set[tuple[int, int, bytes, int, bytes, int]] = set()
    for mark in marks:
        for entry in dump_entries(mark, mark_mask):
            identity = (entry.ct_id, entry.protocol, entry.orig_src, entry.orig_sport, entry.orig_dst, entry.orig_dport)
            if identity in seen:
                continue
            seen.add(identity)
            placed = place(entry, local)
            known = result.get(placed.key)
            if known is None:
                result[placed.key] = placed.counters
            else:
                result[placed.key] = Counters(*(a + b for a, b in zip(known, placed.counters, strict=True)))
    return result


def traffic_since(previous: dict[ConnKey, Counters], current: dict[ConnKey, Counters]) -> dict[ConnKey, Counters]:
    """Per-connection traffic between two ``dump_marked`` results, connections without any left out.

    A connection new since ``previous`` counts in full; so does one whose
    counters went down (it ended and another took its key in between).
    """
    moved: dict[ConnKey, Counters] = {}
    for key, now in current.items():
        before = previous.get(key)
        if before is not None and all(a >= b for a, b in zip(now, before, strict=True)):
            now = Counters(*(a - b for a, b in zip(now, before, strict=True)))
        if any(now):
            moved[key] = now
    return moved
