"""The ctnetlink codec without a kernel: messages built byte by byte as nfnetlink_conntrack.h lays them out."""

from __future__ import annotations

import errno
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pmk.capture.ctevents import (
    CTA_COUNTERS_ORIG,
    CTA_COUNTERS_REPLY,
    CTA_MARK,
    CTA_TUPLE_ORIG,
    CTA_TUPLE_REPLY,
    IFA_ADDRESS,
    IFA_LOCAL,
    NLMSG_DONE,
    NLMSG_ERROR,
    RTM_NEWADDR,
    ConntrackEvents,
    Counters,
    CtEntry,
    Ended,
    LocalAddresses,
    _attach_filter,
    _parse_addresses,
    _tuple,
    dump_marked,
    mark_filter,
    parse_datagram,
    place,
    traffic_since,
)
from pmk.verdicts import ConnKey

MASK = 0x00700000
ACCEPT_MARK = 0x00100000
DELETE = 0x0102  # (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
NEW = 0x0100
NESTED = 0x8000
HERE, PEER = socket.inet_aton("198.18.0.2"), socket.inet_aton("198.18.0.1")
HERE6 = socket.inet_pton(socket.AF_INET6, "fd00:18::2")
PEER6 = socket.inet_pton(socket.AF_INET6, "fd00:18::1")


def attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    header = struct.pack("=HH", 4 + len(payload), kind | (NESTED if nested else 0))
    return header + payload + bytes(-len(payload) % 4)


def ct_tuple(protocol: int, src: bytes, sport: int, dst: bytes, dport: int) -> bytes:
    v6 = len(src) == 16
    ip = attr(3 if v6 else 1, src) + attr(4 if v6 else 2, dst)
    proto = attr(1, bytes([protocol]))
    if protocol in (6, 17):
        proto += attr(2, struct.pack(">H", sport)) + attr(3, struct.pack(">H", dport))
    else:  # ICMP: id, type, code
        proto += attr(4, struct.pack(">H", 77)) + attr(5, b"\x08") + attr(6, b"\x00")
    return attr(1, ip, nested=True) + attr(2, proto, nested=True) + attr(3, struct.pack(">H", 0))


def counters(packets: int, octets: int, wide: bool = True) -> bytes:
    if wide:
        return attr(1, struct.pack(">Q", packets)) + attr(2, struct.pack(">Q", octets))
    return attr(3, struct.pack(">I", packets)) + attr(4, struct.pack(">I", octets))


def ct_message(
    orig: tuple[int, bytes, int, bytes, int],
    reply: tuple[int, bytes, int, bytes, int] | None = None,
    mark: int | None = ACCEPT_MARK,
    counts: tuple[int, int, int, int] | None = (3, 300, 2, 200),
    kind: int = DELETE,
    seq: int = 0,
    wide: bool = True,
    ct_id: int = 0xABCDEF,
    stamps: tuple[int, int | None] = (0, None),
) -> bytes:
    """A conntrack message ordered as the kernel sends a DESTROY event."""
    protocol, src, sport, dst, dport = orig
    if reply is None:
        reply = (protocol, dst, dport, src, sport)
    family = socket.AF_INET6 if len(src) == 16 else socket.AF_INET
    body = struct.pack("=BBH", family, 0, 0)
    body += attr(CTA_TUPLE_ORIG, ct_tuple(*orig), nested=True) + attr(CTA_TUPLE_REPLY, ct_tuple(*reply), nested=True)
    body += attr(12, struct.pack(">I", ct_id))  # CTA_ID
    if counts is not None:
        body += attr(CTA_COUNTERS_ORIG, counters(counts[0], counts[1], wide), nested=True)
        body += attr(CTA_COUNTERS_REPLY, counters(counts[2], counts[3], wide), nested=True)
    start, stop = stamps
    times = attr(1, struct.pack(">Q", start)) + (attr(2, struct.pack(">Q", stop)) if stop is not None else b"")
    body += attr(20, times, nested=True)  # CTA_TIMESTAMP
    if mark is not None:
        body += attr(CTA_MARK, struct.pack(">I", mark))
    return struct.pack("=IHHII", 16 + len(body), kind, 0, seq, 0) + body


def control(seq: int, kind: int, code: int = 0) -> bytes:
    return struct.pack("=IHHII", 20, kind, 0, seq, 0) + struct.pack("=i", code)


def parse(data: bytes, seq: int | None = None) -> tuple[list[CtEntry], tuple[bool, int]]:
    found: list[CtEntry] = []
    status = parse_datagram(data, len(data), MASK, found, seq)
    return found, status


def test_an_event_yields_both_tuples_the_mark_and_both_counters() -> None:
    [entry], status = parse(ct_message((6, HERE, 40000, PEER, 7401), counts=(5, 6000, 4, 3200)))
    assert status == (False, 0)
    assert entry == CtEntry(
        0xABCDEF, 6, HERE, 40000, PEER, 7401, PEER, 7401, HERE, 40000, ACCEPT_MARK, 5, 6000, 4, 3200
    )


def test_an_end_says_when_the_kernel_began_and_stopped_tracking_it_on_pmks_clock() -> None:
    began, stopped = 1_700_000_000_250_000_000, 1_700_000_003_750_000_000  # CLOCK_REALTIME ns
    [found], _ = parse(ct_message((6, HERE, 40000, PEER, 7401), stamps=(began, stopped)))
    assert (found.start_ns, found.stop_ns) == (began, stopped)
    wall_ahead = 1_699_999_000.0  # realtime minus monotonic
    ended = place(found, LocalAddresses([HERE]), wall_ahead)
    assert ended.span == pytest.approx((1000.25, 1003.75))


def test_an_entry_without_both_timestamps_has_no_span() -> None:
    local = LocalAddresses([HERE])
    [unstopped], _ = parse(ct_message((6, HERE, 1, PEER, 2), stamps=(5_000_000_000, None)))
    [unstarted], _ = parse(ct_message((6, HERE, 1, PEER, 2), stamps=(0, 5_000_000_000)))
    assert place(unstopped, local, 1.0).span is None and place(unstarted, local, 1.0).span is None


def test_ipv6_and_32_bit_counters() -> None:
    [entry], _ = parse(ct_message((17, PEER6, 5353, HERE6, 7402), counts=(1, 2, 3, 4), wide=False))
    assert (entry.orig_src, entry.orig_dst, entry.orig_packets, entry.reply_bytes) == (PEER6, HERE6, 1, 4)


def test_connections_without_pmk_bits_are_skipped_and_the_rest_kept_in_order() -> None:
    data = (
        ct_message((6, HERE, 1, PEER, 2), mark=None)
        + ct_message((6, HERE, 3, PEER, 4), mark=0x00800001)  # someone else's bits only
        + ct_message((6, HERE, 5, PEER, 6), mark=0x00300001)
        + ct_message((17, HERE, 7, PEER, 8))
    )
    found, _ = parse(data)
    assert [(e.orig_sport, e.mark) for e in found] == [(5, 0x00300001), (7, ACCEPT_MARK)]


def test_protocols_without_ports_have_port_zero_and_missing_counters_are_zero() -> None:
    [entry], _ = parse(ct_message((1, HERE, 0, PEER, 0), counts=None))
    assert (entry.protocol, entry.orig_sport, entry.orig_dport, entry.orig_packets, entry.reply_bytes) == (
        1,
        0,
        0,
        0,
        0,
    )


def test_a_dump_reads_its_own_answer_until_done_and_reports_errors() -> None:
    stale = ct_message((6, HERE, 9, PEER, 9), kind=NEW, seq=6)
    found, status = parse(stale + ct_message((6, HERE, 1, PEER, 2), kind=NEW, seq=7) + control(7, NLMSG_DONE), seq=7)
    assert status == (True, 0) and [e.orig_sport for e in found] == [1]
    assert parse(control(7, NLMSG_ERROR, -errno.EPERM), seq=7)[1] == (True, errno.EPERM)


@given(st.integers(min_value=0, max_value=400), st.binary(max_size=8))
def test_cut_or_garbled_messages_never_raise(cut: int, junk: bytes) -> None:
    whole = ct_message((6, HERE6, 1, PEER6, 2))
    data = whole[:cut] + junk
    parse_datagram(data, len(data), MASK, [])
    # A message claiming more than the datagram holds is read as far as it goes.
    parse_datagram(whole[:cut], len(whole[:cut]), MASK, [])


# --- this host's side ---------------------------------------------------------


def entry(orig: tuple[int, bytes, int, bytes, int], reply: tuple[bytes, int, bytes, int] | None = None) -> CtEntry:
    protocol, src, sport, dst, dport = orig
    rsrc, rsport, rdst, rdport = reply if reply is not None else (dst, dport, src, sport)
    return CtEntry(1, protocol, src, sport, dst, dport, rsrc, rsport, rdst, rdport, ACCEPT_MARK, 5, 500, 4, 4000)


def test_a_connection_from_a_local_address_is_outbound_and_sends_the_original_direction() -> None:
    local = LocalAddresses([HERE, HERE6])
    ended = place(entry((6, HERE, 40000, PEER, 443)), local)
    assert ended == Ended(ConnKey(6, HERE, 40000, PEER, 443), True, ACCEPT_MARK, Counters(4, 5, 4000, 500))


def test_a_connection_from_elsewhere_is_inbound_and_receives_the_original_direction() -> None:
    local = LocalAddresses([HERE, HERE6])
    ended = place(entry((17, PEER6, 5353, HERE6, 7402)), local)
    assert ended == Ended(ConnKey(17, HERE6, 7402, PEER6, 5353), False, ACCEPT_MARK, Counters(5, 4, 500, 4000))


def test_inbound_keys_name_the_address_reached_after_dnat() -> None:
    public = socket.inet_aton("198.19.0.9")  # forwarded to HERE:8080 in PREROUTING
    ended = place(entry((6, PEER, 1234, public, 80), (HERE, 8080, PEER, 1234)), LocalAddresses([HERE]))
    assert ended.key == ConnKey(6, HERE, 8080, PEER, 1234) and not ended.outbound


def test_outbound_keys_keep_the_destination_the_application_asked_for() -> None:
    resolver = socket.inet_aton("127.0.0.53")  # rerouted DNS: DNAT in nat OUTPUT
    ended = place(entry((17, HERE, 5000, PEER, 53), (resolver, 53, HERE, 5000)), LocalAddresses([HERE]))
    assert ended.key == ConnKey(17, HERE, 5000, PEER, 53) and ended.outbound


def test_all_of_127_8_is_local_so_loopback_connections_are_outbound() -> None:
    loop2 = socket.inet_aton("127.0.0.2")
    ended = place(entry((6, loop2, 1, socket.inet_aton("127.0.0.1"), 2)), LocalAddresses())
    assert ended.outbound and ended.key.local_ip == loop2


def test_a_dump_adds_up_flows_of_one_key_and_counts_a_repeated_entry_once(monkeypatch: pytest.MonkeyPatch) -> None:
    ping = entry((1, HERE, 0, PEER, 0))
    tcp = entry((6, PEER, 5000, HERE, 22))
    by_mark = {
        ACCEPT_MARK: [ping._replace(ct_id=1), tcp._replace(ct_id=2), tcp._replace(ct_id=2)],
        0x00200000: [ping._replace(ct_id=3, mark=0x00200000)],
    }
    monkeypatch.setattr("pmk.capture.ctevents.dump_entries", lambda mark, mask: by_mark[mark])
    live = dump_marked([ACCEPT_MARK, 0x00200000], MASK, LocalAddresses([HERE]))
    assert live == {
        ConnKey(1, HERE, 0, PEER, 0): Counters(8, 10, 8000, 1000),
        ConnKey(6, HERE, 22, PEER, 5000): Counters(5, 4, 500, 4000),
    }


def test_a_dump_counts_two_entries_sharing_an_id_both(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's ids are 32-bit hashes: among 100k live entries a pair or two share one."""
    one, other = entry((6, PEER, 5000, HERE, 22)), entry((6, PEER, 5001, HERE, 22))
    monkeypatch.setattr("pmk.capture.ctevents.dump_entries", lambda mark, mask: [one, other])
    assert one.ct_id == other.ct_id
    assert len(dump_marked([ACCEPT_MARK], MASK, LocalAddresses([HERE]))) == 2


def test_traffic_since_the_last_dump_leaves_out_quiet_connections() -> None:
    quiet, busy, new, reused = (ConnKey(6, HERE, port, PEER, 443) for port in (1, 2, 3, 4))
    previous = {quiet: Counters(1, 1, 60, 60), busy: Counters(2, 3, 200, 300), reused: Counters(9, 9, 900, 900)}
    current = {
        quiet: Counters(1, 1, 60, 60),
        busy: Counters(5, 3, 5200, 300),
        new: Counters(1, 2, 100, 200),
        reused: Counters(1, 1, 60, 60),
    }
    assert traffic_since(previous, current) == {
        busy: Counters(3, 0, 5000, 0),
        new: Counters(1, 2, 100, 200),
        reused: Counters(1, 1, 60, 60),
    }


def addr_message(family: int, seq: int = 0, **attrs: bytes) -> bytes:
    kinds = {"address": IFA_ADDRESS, "local": IFA_LOCAL}
    body = struct.pack("=BBBBI", family, 24, 0, 0, 2) + b"".join(attr(kinds[k], v) for k, v in attrs.items())
    return struct.pack("=IHHII", 16 + len(body), RTM_NEWADDR, 0, seq, 0) + body


def test_address_announcements_take_the_local_side_of_point_to_point_links() -> None:
    found: set[bytes] = set()
    data = (
        addr_message(socket.AF_INET, address=HERE, local=HERE)
        + addr_message(socket.AF_INET, address=PEER, local=socket.inet_aton("198.18.1.1"))
        + addr_message(socket.AF_INET6, address=HERE6)
        + control(0, NLMSG_DONE)
    )
    assert _parse_addresses(data, len(data), found) == (True, 0)
    assert found == {HERE, socket.inet_aton("198.18.1.1"), HERE6}


# --- the kernel-side filter, run by the kernel on a local socket ------------------


def test_the_bpf_filter_passes_exactly_the_messages_with_pmk_bits() -> None:
    """An AF_UNIX datagram carries the bytes as they are: the program runs on them as on an event."""
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sender, receiver:
        _attach_filter(receiver, mark_filter(MASK))
        receiver.setblocking(False)
        marks = [None, 0x00000001, ACCEPT_MARK, 0x00800000, 0x00300001, 0xFFFFFFFF]
        for mark in marks:
            sender.send(ct_message((6, HERE, 1, PEER, 2), mark=mark))
        received = []
        while True:
            try:
                received.append(receiver.recv(4096))
            except BlockingIOError:
                break
    found, _ = parse(b"".join(received))
    assert [e.mark for e in found] == [ACCEPT_MARK, 0x00300001, 0xFFFFFFFF]


# --- lost events --------------------------------------------------------------


class FakeSocket:
    """A netlink socket whose receive buffer overflowed twice, then holds two events."""

    def __init__(self, datagrams: list[bytes | OSError]) -> None:
        self.datagrams = datagrams

    def recv_into(self, buffer: bytearray) -> int:
        if not self.datagrams:
            raise BlockingIOError
        item = self.datagrams.pop(0)
        if isinstance(item, OSError):
            raise item
        buffer[: len(item)] = item
        return len(item)


def test_lost_events_are_counted_and_logged_at_most_once_a_second(caplog: object) -> None:
    now = [100.0]
    events = ConntrackEvents(LocalAddresses([HERE]), MASK, clock=lambda: now[0])
    overflow = OSError(errno.ENOBUFS, "No buffer space available")
    events._sock = FakeSocket(  # type: ignore[assignment]
        [overflow, ct_message((6, HERE, 1, PEER, 2)), overflow, ct_message((17, PEER, 3, HERE, 4))]
    )
    ended = events.read()
    assert [e.key.local_port for e in ended] == [1, 4]
    assert events.stats() == {"conntrack_events": 2, "conntrack_events_lost": 2}
    warnings = [r for r in caplog.records if "conntrack events lost" in r.getMessage()]  # type: ignore[attr-defined]
    assert len(warnings) == 1
    now[0] += 1.5
    events._sock = FakeSocket([overflow])  # type: ignore[assignment]
    assert events.read() == []
    warnings = [r for r in caplog.records if "conntrack events lost" in r.getMessage()]  # type: ignore[attr-defined]
    assert len(warnings) == 2 and events.lost == 3
    events._sock = None


@pytest.mark.parametrize("orig", [(6, HERE, 40000, PEER, 443), (17, HERE6, 5353, PEER6, 53), (1, HERE, 0, PEER, 0)])
def test_a_tuple_in_the_kernels_layout_reads_as_one_in_another_order(orig: tuple[int, bytes, int, bytes, int]) -> None:
    """The kernel's TCP/UDP layout is read in one unpack; the same attributes in another order are walked."""
    kernel = ct_tuple(*orig)
    ip_length = struct.unpack_from("=H", kernel)[0]
    swapped = kernel[ip_length:] + kernel[:ip_length]  # CTA_TUPLE_PROTO (and the zone) before CTA_TUPLE_IP
    assert _tuple(kernel, 0, len(kernel)) == _tuple(swapped, 0, len(swapped)) == orig
