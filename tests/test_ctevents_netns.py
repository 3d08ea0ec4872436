"""Conntrack ends and counters from a real kernel: marked connections in a namespace.

The "server" namespace plays pmk's host. Hand-written mangle rules set pmk's
connection mark (as pmk's own rules do for decided connections) on TCP port
7401 and UDP port 7402, both directions, IPv4 and IPv6; port 7403 stays
unmarked. Sockets are made in the namespaces (``in_netns``) and used from
the test's thread; ``conntrack -F`` in the server namespace ends everything.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator

import pytest

from pmk.capture.ctevents import (
    DEFAULT_EVENT_RCVBUF,
    NETLINK_ADD_MEMBERSHIP,
    NETLINK_NETFILTER,
    NFNLGRP_CONNTRACK_DESTROY,
    SOL_NETLINK,
    ConntrackEvents,
    Counters,
    Ended,
    LocalAddresses,
    dump_marked,
)
from pmk.verdicts import ConnKey
from tests.netns import TwoHosts, need_root_reason, two_hosts
from tests.test_host import in_netns

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        need_root_reason() is not None and not os.environ.get("CI"),
        reason=f"{need_root_reason()}; conntrack tests mark connections in network namespaces",
    ),
]

MASK = 0x00700000
ACCEPT_MARK = 0x00100000
TCP_PORT, UDP_PORT, UNMARKED_PORT = 7401, 7402, 7403
WAIT = 10.0


@pytest.fixture
def hosts() -> Iterator[TwoHosts]:
    with two_hosts() as made:
        for tool in ("iptables", "ip6tables"):
            for chain in ("OUTPUT", "INPUT"):
                for proto, port in (("tcp", TCP_PORT), ("udp", UDP_PORT)):
                    for side in ("--dport", "--sport"):
                        made.sh(
                            made.server,
                            *(tool, "-w", "-t", "mangle", "-A", chain, "-p", proto, side, str(port)),
                            *("-j", "CONNMARK", "--set-mark", f"{ACCEPT_MARK:#x}/{MASK:#x}"),
                        )
        yield made


def packed(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)


def make(ns: str, family: int, kind: int) -> socket.socket:
    sock = in_netns(ns, lambda: socket.socket(family, kind))
    sock.settimeout(WAIT)
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data


def tcp_exchange(hosts: TwoHosts, family: int, client_ns: str, listen_ip: str, port: int, sent: int, back: int) -> int:
    """Connect from ``client_ns`` to a listener on the other host, send ``sent`` bytes,
    get ``back`` bytes back, close both ends; return the connecting side's port."""
    listen_ns = hosts.server if client_ns == hosts.client else hosts.client
    with make(listen_ns, family, socket.SOCK_STREAM) as listener, make(client_ns, family, socket.SOCK_STREAM) as conn:
        listener.bind((listen_ip, port))
        listener.listen()
        conn.connect((listen_ip, port))
        accepted, _ = listener.accept()
        with accepted:
            conn.sendall(b"o" * sent)
            recv_exactly(accepted, sent)
            accepted.sendall(b"b" * back)
            recv_exactly(conn, back)
            conn.shutdown(socket.SHUT_WR)
            assert accepted.recv(1) == b""
        assert conn.recv(1) == b""
        return int(conn.getsockname()[1])


def read_until(events: ConntrackEvents, count: int) -> list[Ended]:
    found: list[Ended] = []
    deadline = time.monotonic() + WAIT
    while len(found) < count and time.monotonic() < deadline:
        found += events.read()
        time.sleep(0.02)
    found += events.read()
    return found


def flush(hosts: TwoHosts) -> None:
    hosts.sh(hosts.server, "conntrack", "-F")


def opened(hosts: TwoHosts, rcvbuf: int = DEFAULT_EVENT_RCVBUF) -> ConntrackEvents:
    events = ConntrackEvents(LocalAddresses(), MASK, rcvbuf)
    in_netns(hosts.server, events.open)
    return events


def unmarked_udp_flows(hosts: TwoHosts, count: int) -> None:
    """``count`` one-datagram UDP flows to ports no rule marks (one socket, many ports)."""
    with make(hosts.server, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for offset in range(count):
            sock.sendto(b"x", (hosts.client_ip, 20000 + offset))


def marked_udp_flows(hosts: TwoHosts, count: int) -> None:
    """``count`` one-datagram UDP flows to the marked port (a socket, so a source port, each)."""
    for _ in range(count):
        with make(hosts.server, socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"x", (hosts.client_ip, UDP_PORT))


def test_marked_connections_end_with_their_keys_and_the_kernels_counters(hosts: TwoHosts) -> None:
    events = opened(hosts)
    began = time.monotonic()
    try:
        here, here6, peer, peer6 = (
            packed(a) for a in (hosts.server_ip, hosts.server_ip6, hosts.client_ip, hosts.client_ip6)
        )
        out_port = tcp_exchange(hosts, socket.AF_INET, hosts.server, hosts.client_ip, TCP_PORT, 10000, 3000)
        in_port = tcp_exchange(hosts, socket.AF_INET6, hosts.client, hosts.server_ip6, TCP_PORT, 7000, 2000)
        tcp_exchange(hosts, socket.AF_INET, hosts.server, hosts.client_ip, UNMARKED_PORT, 500, 500)
        with (
            make(hosts.client, socket.AF_INET, socket.SOCK_DGRAM) as peer_udp,
            make(hosts.server, socket.AF_INET, socket.SOCK_DGRAM) as udp,
        ):
            peer_udp.bind((hosts.client_ip, UDP_PORT))
            for _ in range(3):
                udp.sendto(b"u" * 100, (hosts.client_ip, UDP_PORT))
                _, source = peer_udp.recvfrom(200)
            peer_udp.sendto(b"r" * 50, source)
            udp.recv(100)
            udp_port = udp.getsockname()[1]

        out_key = ConnKey(6, here, out_port, peer, TCP_PORT)
        in_key = ConnKey(6, here6, TCP_PORT, peer6, in_port)
        udp_key = ConnKey(17, here, udp_port, peer, UDP_PORT)
        live = in_netns(hosts.server, lambda: dump_marked([ACCEPT_MARK], MASK, events.local))
        assert set(live) == {out_key, in_key, udp_key}
        assert live[udp_key] == Counters(1, 3, 78, 3 * 128)

        flushed = time.monotonic()
        flush(hosts)
        ended = {e.key: e for e in read_until(events, 3)}
        read = time.monotonic()
        assert set(ended) == {out_key, in_key, udp_key}, "exactly the marked connections end"
        # The kernel's timestamps (switched on by open), on pmk's clock: begun after the
        # subscription, stopped by the flush (a few ms for the clocks' conversion).
        for end in ended.values():
            assert end.span is not None
            start, stop = end.span
            assert began - 0.005 <= start <= flushed and flushed - 0.005 <= stop <= read + 0.005
        assert all(e.mark == ACCEPT_MARK for e in ended.values())
        assert [ended[k].outbound for k in (out_key, in_key, udp_key)] == [True, False, True]
        # UDP: IP packet lengths, exact (20 + 8 + payload).
        assert ended[udp_key].counters == Counters(packets_in=1, packets_out=3, bytes_in=78, bytes_out=384)
        # TCP: payload plus headers of every segment, each direction on its own.
        out, inb = ended[out_key].counters, ended[in_key].counters
        assert 10000 < out.bytes_out < 10000 + 60 * out.packets_out and 3000 < out.bytes_in < 3000 + 60 * out.packets_in
        assert 7000 < inb.bytes_in < 7000 + 80 * inb.packets_in and 2000 < inb.bytes_out < 2000 + 80 * inb.packets_out
        assert out.packets_out >= 4 and out.packets_in >= 4  # handshake, data, FIN, ACKs
        assert live[out_key] == out, "nothing moved after the close: the dump saw the final counters"
        assert events.stats() == {"conntrack_events": 3, "conntrack_events_lost": 0}
    finally:
        events.close()


def test_an_address_added_after_the_start_is_local_at_once(hosts: TwoHosts) -> None:
    events = opened(hosts)
    try:
        added = "198.18.0.9"
        hosts.sh(hosts.server, "ip", "addr", "add", f"{added}/24", "dev", hosts.server_if)
        with make(hosts.server, socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((added, 0))
            sock.sendto(b"x" * 10, (hosts.client_ip, UDP_PORT))
            port = sock.getsockname()[1]
        flush(hosts)
        [ended] = read_until(events, 1)
        assert ended.span is not None
        assert ended._replace(span=None) == Ended(
            ConnKey(17, packed(added), port, packed(hosts.client_ip), UDP_PORT),
            True,
            ACCEPT_MARK,
            Counters(0, 1, 0, 38),
        )
    finally:
        events.close()


def test_unmarked_ends_stay_in_the_kernel(hosts: TwoHosts) -> None:
    """The BPF filter drops them before delivery: the socket receives nothing, an unfiltered one all."""

    def unfiltered() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_CONNTRACK_DESTROY)
        sock.setblocking(False)
        return sock

    events = opened(hosts)
    with in_netns(hosts.server, unfiltered) as raw:
        try:
            unmarked_udp_flows(hosts, 50)
            flush(hosts)
            time.sleep(0.3)
            assert events._sock is not None
            with pytest.raises(BlockingIOError):
                events._sock.recv(65536)
            received = 0
            while True:
                try:
                    raw.recv(65536)
                except BlockingIOError:
                    break
                received += 1
            assert received == 50
        finally:
            events.close()


def test_the_event_loop_gets_one_list_per_wakeup(hosts: TwoHosts) -> None:
    events = opened(hosts)
    batches: list[list[Ended]] = []

    async def main() -> None:
        events.start(asyncio.get_running_loop(), batches.append)
        marked_udp_flows(hosts, 40)
        unmarked_udp_flows(hosts, 40)
        flush(hosts)  # blocking, but the kernel may queue a few destroy events after it returns
        deadline = time.monotonic() + WAIT
        while sum(map(len, batches)) < 40 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        events.close()

    try:
        asyncio.run(main())
    finally:
        events.close()
    ended = [e for batch in batches for e in batch]
    assert len(ended) == 40
    # Drained per wake-up, not per event: the flush's burst arrives in a few lists at most.
    assert 1 <= len(batches) <= 3, [len(batch) for batch in batches]
    assert {e.key.remote_port for e in ended} == {UDP_PORT}
    assert all(e.outbound and e.counters == Counters(0, 1, 0, 29) for e in ended)


def test_a_full_receive_buffer_counts_lost_events(hosts: TwoHosts) -> None:
    events = opened(hosts, rcvbuf=4096)
    try:
        many = 300
        marked_udp_flows(hosts, many)
        flush(hosts)
        ended = read_until(events, 1)
        assert 0 < len(ended) < many
        assert events.lost >= 1 and events.stats()["conntrack_events"] == len(ended)
    finally:
        events.close()
