"""Bytes pmk holds per cached connection, measured through the decision service.

    .venv/bin/python benchmarks/cache_memory.py [--sizes 1000,100000,1000000] [--mix v4,v6,mixed]

Each figure comes from a fresh interpreter (RSS and tracemalloc runs apart:
tracemalloc's own bookkeeping would count as RSS).

Deterministic and without root: a ``Service`` on a fake clock (as the
playbook tests drive it) with an accept-all decider gets the first packet
of N new connections in batches of 1,000, and the decider answers each
``decide`` with a permanent accept, so every connection is cached the way a
live one is (who decided, its owner, when). Owners come from a fake lookup
that, like the real one, returns a new ``Owner`` per lookup (16 processes).
Connections go from 2 local addresses per IP version to 65,536 remote ones,
outbound UDP from a fresh local port and inbound TCP to port 443.

Then a "traffic" step sends one 1,400-byte packet each way per connection
(cache hits, so the counters hold real numbers, as on a divert backend).

Per size and mix it prints the bytes per connection after the decisions and
after the traffic, as ``tracemalloc`` counts them (Python's own allocations,
exact and repeatable) and as RSS grew (what the process asks of the kernel,
pymalloc's free room included). Everything the service keeps per connection
is in these numbers, not only the verdict cache's entries.
"""

from __future__ import annotations

import argparse
import gc
import os
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator

from pmk.core import commands as cmd
from pmk.core import events as ev
from pmk.core.attribution import Owner
from pmk.core.policy import default_only
from pmk.core.service import Service
from pmk.packet.captured import CapturedPacket
from pmk.testing.fakes import FakeBackend
from pmk.verdicts import ConnKey, Verdict

BATCH = 1000
PROCESSES = 16
DATA = 1400
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _owner_of(key: ConnKey, outbound: bool) -> Owner:
    """A new object per lookup, as pmk.host.owner returns one (pids above the small-int cache)."""
    n = key.local_port % PROCESSES
    return Owner(4000 + n, f"/usr/bin/app{n}", 1000 + n)


def _ip(version: int, local: bool, n: int) -> bytes:
    if version == 4:
        return bytes((198, 18 if local else 19, n >> 8 & 0xFF, n & 0xFF))
    return bytes((0xFD, 0, 0x18 if local else 0x19)) + bytes(11) + bytes((n >> 8 & 0xFF, n & 0xFF))


def _packet(version: int, proto: int, src: bytes, dst: bytes, sport: int, dport: int, size: int) -> bytes:
    transport = struct.pack("!HH", sport, dport)
    if proto == 6:  # TCP: seq, ack, offset 5, ACK
        transport += struct.pack("!IIBBHHH", 1, 1, 0x50, 0x10, 65535, 0, 0)
    else:
        transport += struct.pack("!HH", 8 + max(0, size - 28), 0)
    header = 20 if version == 4 else 40
    payload = bytes(max(0, size - header - len(transport)))
    if version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, header + len(transport) + len(payload), 0, 0, 64, proto, 0, src, dst)
    else:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(transport) + len(payload), proto, 64, src, dst)
    return ip + transport + payload


def connections(n: int, mix: str) -> Iterator[tuple[int, int, bytes, int, bytes, int, bool]]:
    """(version, protocol, local ip, local port, remote ip, remote port, outbound) of connection 0..n-1."""
    for i in range(n):
        version = 4 if mix == "v4" or (mix == "mixed" and i % 2 == 0) else 6
        local = _ip(version, True, i & 1)
        remote = _ip(version, False, (i >> 1) & 0xFFFF)
        if i % 4 < 2:  # outbound UDP from a fresh local port (DNS-like)
            yield version, 17, local, 1024 + (i >> 17) % 64000, remote, 53 + (i >> 1) % 7, True
        else:  # inbound TCP to a server
            yield version, 6, local, 443, remote, 1024 + (i >> 17) % 64000, False


def _first(conn: tuple[int, int, bytes, int, bytes, int, bool], size: int, reply: bool = False) -> CapturedPacket:
    version, proto, local, lport, remote, rport, outbound = conn
    if outbound != reply:
        return CapturedPacket(_packet(version, proto, local, remote, lport, rport, size), outbound=True)
    return CapturedPacket(_packet(version, proto, remote, local, rport, lport, size), outbound=False)


def new_service(capacity: int) -> tuple[Service, list[float]]:
    svc = Service(
        backend=FakeBackend(),
        policy=default_only(Verdict.DROP),
        packet_cache=4 * BATCH,
        verdict_cache=capacity,
        verdict_timeout=2.0,
        max_in_flight=4 * BATCH,
        started=0.0,
        owner_of=_owner_of,
    )
    clock = [0.0]
    svc.handle_all(
        [ev.ClientJoined(1), ev.ClientRequest(1, 0, "hello", [{"protocol": 1, "name": "all", "role": "decider"}])], 0.0
    )
    return svc, clock


def decide_all(svc: Service, conns: list[tuple[int, int, bytes, int, bytes, int, bool]], clock: list[float]) -> None:
    """Capture the batch's first packets and answer every decide with a permanent accept."""
    clock[0] += 0.001
    out = svc.handle(ev.PacketsCaptured([_first(c, 60) for c in conns]), clock[0])
    answers = [
        ev.DecideAnswered(c.client, c.msgid, None, {"verdict": "accept", "permanent": True})
        for c in out
        if isinstance(c, cmd.SendDecide)
    ]
    assert len(answers) == len(conns), "every new connection is asked about"
    clock[0] += 0.001
    svc.handle_all(answers, clock[0])


def traffic(svc: Service, conns: list[tuple[int, int, bytes, int, bytes, int, bool]], clock: list[float]) -> None:
    """One data packet each way per connection: cache hits that fill the counters."""
    clock[0] += 0.001
    packets = [_first(c, DATA) for c in conns] + [_first(c, DATA, reply=True) for c in conns]
    svc.handle(ev.PacketsCaptured(packets), clock[0])


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def measure(n: int, mix: str, trace: bool) -> dict[str, float]:
    """Bytes per connection after the decisions and after the traffic (traced, or RSS)."""
    svc, clock = new_service(n + BATCH)
    all_conns = list(connections(n, mix))
    gc.collect()
    if trace:
        tracemalloc.start()
    used = _traced if trace else _rss
    base = used()
    for start in range(0, n, BATCH):
        decide_all(svc, all_conns[start : start + BATCH], clock)
    assert len(svc.engine.verdicts) == n
    decided = (used() - base) / n
    for start in range(0, n, BATCH):
        traffic(svc, all_conns[start : start + BATCH], clock)
    assert svc.stats(clock[0])["cache_hits"] == 2 * n
    return {"decided": decided, "traffic": (used() - base) / n}


def _in_child(n: int, mix: str, trace: bool) -> dict[str, float]:
    argv = [sys.executable, __file__, "--one", f"{n},{mix},{int(trace)}"]
    decided, traffic = subprocess.run(argv, check=True, capture_output=True, text=True).stdout.split()
    return {"decided": float(decided), "traffic": float(traffic)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,100000,1000000", help="connection counts, comma-separated")
    parser.add_argument("--mix", default="v4,v6,mixed", help="v4, v6 and/or mixed (half each), comma-separated")
    parser.add_argument(
        "--trace-up-to", type=int, default=100_000, help="tracemalloc for sizes up to this (it is slow); RSS always"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # N,mix,trace: one measurement, in a child
    args = parser.parse_args()
    if args.one:
        n, mix, trace = args.one.split(",")
        r = measure(int(n), mix, trace == "1")
        print(r["decided"], r["traffic"])
        return
    print("bytes per cached connection (traced: tracemalloc; RSS: growth of the process)")
    print(f"{'N':>9} {'mix':>6} | {'decided: traced':>15} {'RSS':>6} | {'+traffic: traced':>16} {'RSS':>6}")
    for size in (int(s) for s in args.sizes.split(",")):
        for mix in args.mix.split(","):
            rss = _in_child(size, mix, False)
            traced = _in_child(size, mix, True) if size <= args.trace_up_to else None
            t1 = f"{traced['decided']:.0f}" if traced else "-"
            t2 = f"{traced['traffic']:.0f}" if traced else "-"
            line = f"{size:>9,} {mix:>6} | {t1:>15} {rss['decided']:>6.0f} | {t2:>16} {rss['traffic']:>6.0f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
