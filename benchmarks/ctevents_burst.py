"""What reading conntrack ends and dumping marked connections costs (pmk.capture.ctevents).

    sudo .venv/bin/python benchmarks/ctevents_burst.py [--connections 1000 10000]

Runs in a throwaway network namespace (loopback only). A mangle rule marks
UDP flows to ports 20000-39999 with pmk's bits; ``N`` one-datagram flows are
made there (and ``N`` unmarked ones to 40000-59999), then one ``conntrack -F``
ends them all at once: a burst of 2N DESTROY events. Rows:

- dump: ``dump_marked`` (one kernel-filtered dump) with N marked entries,
  and pyroute2's ``Conntrack.dump_entries`` with the same filter
- burst read: CPU seconds to read and place the N marked ends with
  ``ConntrackEvents.read`` (the BPF filter leaves the unmarked ones in the kernel)
- pyroute2 events: CPU to receive the same burst with pyroute2's
  AsyncNFCTSocket bound to the DESTROY group (it has no filter: all 2N)
- parse and place / pyroute2 decode: CPU per event of pmk's parser (with
  ``place``) and of pyroute2's message decoder alone, on the same N recorded
  events (the datagrams of a socket with the same BPF filter)
- filtered / unfiltered socket: datagrams a subscriber received with the
  BPF mark filter (N) and without (2N)

The machine may be shared: the numbers are indicative, not a measurement
to compare across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pmk.capture.ctevents import (
    NETLINK_ADD_MEMBERSHIP,
    NETLINK_NETFILTER,
    NFNLGRP_CONNTRACK_DESTROY,
    SO_RCVBUFFORCE,
    SOL_NETLINK,
    ConntrackEvents,
    LocalAddresses,
    _attach_filter,
    dump_marked,
    mark_filter,
    parse_datagram,
    place,
)

MASK = 0x00700000
MARK = 0x00100000
T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent


def cpu(fn: Callable[[], T]) -> tuple[float, T]:
    start = time.process_time()
    result = fn()
    return time.process_time() - start, result


def make_flows(first_port: int, count: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for port in range(first_port, first_port + count):
            sock.sendto(b"x", ("127.0.0.1", port))


def raw_subscriber(filtered: bool) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    if filtered:
        _attach_filter(sock, mark_filter(MASK))
    sock.bind((0, 0))
    sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_CONNTRACK_DESTROY)
    sock.setblocking(False)
    return sock


async def pyroute2_subscriber() -> Any:
    from pyroute2.netlink.nfnetlink.nfctsocket import AsyncNFCTSocket  # type: ignore[import-untyped]

    sock = AsyncNFCTSocket()
    await sock.bind(groups=1 << (NFNLGRP_CONNTRACK_DESTROY - 1))
    sock.socket.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    return sock


async def pyroute2_read(sock: Any, count: int) -> int:
    """Receive ``count`` events with pyroute2 (no BPF filter); return how many were marked."""
    seen = marked = 0
    while seen < count:
        messages = sock.get()
        async for msg in messages:
            seen += 1
            if msg.get_attr("CTA_MARK", 0) & MASK:
                marked += 1
            if seen >= count:
                break
        await messages.aclose()
    return marked


def drain_raw(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


def inside(counts: list[int]) -> dict[str, object]:
    local = LocalAddresses()
    local.refresh()
    return {str(n): measure(n, local) for n in counts}


def measure(n: int, local: LocalAddresses) -> dict[str, object]:
    from pyroute2 import Conntrack  # type: ignore[import-untyped]
    from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg  # type: ignore[import-untyped]

    subprocess.run(["conntrack", "-F"], capture_output=True, check=False)
    # Subscribed first: with nf_conntrack_events=2 (auto) the kernel gives
    # a connection its event extension only if someone listens when it is made.
    events = ConntrackEvents(local, MASK)
    events.open()
    recorder = raw_subscriber(filtered=True)
    unfiltered = raw_subscriber(filtered=False)
    pyroute2_loop = asyncio.new_event_loop()
    pyroute2_events = pyroute2_loop.run_until_complete(pyroute2_subscriber())
    make_flows(20000, n)
    make_flows(40000, n)
    dumps = [cpu(lambda: dump_marked([MARK], MASK, local)) for _ in range(5)]
    assert all(len(result) == n for _, result in dumps), [len(r) for _, r in dumps]
    ct = Conntrack()
    py_dumps = [cpu(lambda: list(ct.dump_entries(mark=MARK, mark_mask=MASK))) for _ in range(3)]
    ct.close()
    assert all(len(result) == n for _, result in py_dumps)

    subprocess.run(["conntrack", "-F"], capture_output=True, check=True)
    time.sleep(0.5)  # the flush has returned: every event is queued
    read_cpu, ended = cpu(lambda: events.read(limit=1 << 30))
    pyroute2_cpu, pyroute2_marked = cpu(lambda: pyroute2_loop.run_until_complete(pyroute2_read(pyroute2_events, 2 * n)))
    pyroute2_events.close()
    pyroute2_loop.close()
    assert pyroute2_marked == n, pyroute2_marked
    datagrams = drain_raw(recorder)
    everything = drain_raw(unfiltered)
    recorder.close()
    unfiltered.close()
    lost = events.lost
    events.close()
    assert len(ended) == n and lost == 0, (len(ended), lost, len(datagrams))

    def decode() -> int:
        count = 0
        for data in datagrams:
            msg = nfct_msg(data)
            msg.decode()
            if msg.get_attr("CTA_MARK", 0) & MASK:
                count += 1
        return count

    def parse() -> int:
        entries: list[Any] = []
        for data in datagrams:
            parse_datagram(data, len(data), MASK, entries)
        return len([place(entry, local) for entry in entries])

    decode()  # pyroute2 builds its classes on first use
    decode_cpu, decoded = cpu(decode)
    parse_cpu, parsed = cpu(parse)
    assert decoded == parsed == n, (decoded, parsed)
    return {
        "dump_marked_ms (min of 5)": round(min(c for c, _ in dumps) * 1e3, 2),
        "pyroute2_dump_ms (min of 3)": round(min(c for c, _ in py_dumps) * 1e3, 2),
        "burst_read_ms": round(read_cpu * 1e3, 2),
        "burst_read_us_per_end": round(read_cpu / n * 1e6, 2),
        "pyroute2_events_ms (unfiltered, 2N)": round(pyroute2_cpu * 1e3, 2),
        "pyroute2_events_us_per_event": round(pyroute2_cpu / (2 * n) * 1e6, 2),
        "parse_and_place_us_per_event": round(parse_cpu / n * 1e6, 2),
        "pyroute2_decode_us_per_event": round(decode_cpu / n * 1e6, 2),
        "filtered_socket_datagrams": len(datagrams),
        "unfiltered_socket_datagrams": len(everything),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        print(json.dumps(inside(args.connections), indent=2))
        return
    ns = f"pmkb-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        rule = ["-t", "mangle", "-A", "OUTPUT", "-p", "udp", "--dport", "20000:39999"]
        subprocess.run(
            ["ip", "netns", "exec", ns, "iptables", *rule, "-j", "CONNMARK", "--set-mark", f"{MARK:#x}/{MASK:#x}"],
            check=True,
        )
        argv = [sys.executable, __file__, "--inside", "--connections", *map(str, args.connections)]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, env=env)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    main()
