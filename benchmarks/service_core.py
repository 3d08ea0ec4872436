"""pmk's own Python work per new connection, without the kernel or another process.

    .venv/bin/python benchmarks/service_core.py [--connections N] [--batch B] [--gap-us G] [--repeats R] [--profile]

Drives the decision service the way the server does for row D (a new UDP
connection per packet, an accept-all decider answering permanently):
captured batches of ``--batch`` packets go in, the decide requests are
encoded as the session would, the decider's answers (built outside the
timed part) are decoded and handed back. The time per connection is what
pmk's event loop spends on a new connection besides system calls, so a
change to the core shows here without the noise of a shared machine.
Attribution is a fake that returns one owner (the real lookup is measured
by ``benchmarks/attribution.py``). ``--profile`` prints cProfile's top
functions for one run. ``--gap-us`` sleeps that long before each batch, as
pmk's loop does between packets below its peak: the same work then costs
what it costs with cold caches (on this machine's VM, 2.5-3.5x).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import msgpack

from pmk.core import commands as cmd
from pmk.core import events as ev
from pmk.core.attribution import Owner
from pmk.core.policy import default_only
from pmk.core.service import Service
from pmk.packet.captured import CapturedPacket
from pmk.rpc.connection import RpcConnection
from pmk.rpc.messages import Response
from pmk.testing.fakes import FakeBackend
from pmk.verdicts import ConnKey, Verdict

OWNER = Owner(4242, "/usr/bin/bench", 1000)
ANSWER = {"verdict": "accept", "permanent": True}


def _owner(key: ConnKey, outbound: bool) -> Owner:
    return OWNER


def _packets(count: int) -> list[bytes]:
    """Inbound IPv4 UDP datagrams, each from a new source port and address (checksums left zero)."""
    out = []
    for n in range(count):
        src = bytes([198, 19, (n >> 16) & 0xFF, (n >> 8) & 0xFF])
        udp = (1024 + n % 60000).to_bytes(2, "big") + (9000).to_bytes(2, "big") + (16).to_bytes(2, "big") + b"\0\0"
        payload = b"12345678"
        ip = bytes([0x45, 0, 0, 36, 0, 0, 0x40, 0, 64, 17, 0, 0]) + src + bytes([198, 18, 0, 2])
        out.append(ip + udp + payload)
    return out


def one_run(raws: list[bytes], batch: int, gap: float = 0.0) -> float:
    """CPU seconds of pmk work for every connection in ``raws`` (this thread's: a busy machine does not inflate it)."""
    service = Service(
        backend=FakeBackend(),
        policy=default_only(Verdict.BLOCK),
        packet_cache=1024,
        verdict_cache=len(raws) + 1,
        verdict_timeout=2.0,
        max_in_flight=256,
        started=0.0,
        owner_of=_owner,
    )
    rpc = RpcConnection()
    now = 1.0
    service.handle_all([ev.ClientJoined(1), ev.ClientRequest(1, 0, "hello", [{"protocol": 1, "role": "decider"}])], now)
    spent = 0.0
    for start in range(0, len(raws), batch):
        packets = [CapturedPacket(raw, False) for raw in raws[start : start + batch]]
        if gap:
            time.sleep(gap)
        began = time.thread_time()
        out = service.handle_all((ev.PacketsCaptured(packets),), now)
        msgids = []
        for command in out:
            if type(command) is cmd.SendDecide:
                rpc.send_request("decide", [command.info], msgid=command.msgid)
                msgids.append(command.msgid)
        rpc.data_to_send()
        spent += time.thread_time() - began
        answers = b"".join(msgpack.packb([1, msgid, None, ANSWER]) for msgid in msgids)
        began = time.thread_time()
        events = []
        for event in rpc.receive(answers):
            if type(event) is Response:
                rpc.take_context(event)
                events.append(ev.DecideAnswered(1, event.msgid, event.error, event.result))
        service.handle_all(events, now)
        spent += time.thread_time() - began
        now += 0.001
    stats = service.stats(now)
    assert stats["accepted"] == len(raws), stats
    return spent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--gap-us", type=float, default=0.0, help="sleep before each batch (microseconds)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    raws = _packets(args.connections)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        one_run(raws, args.batch, args.gap_us / 1e6)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return 0
    runs = [one_run(raws, args.batch, args.gap_us / 1e6) for _ in range(args.repeats)]
    per = statistics.median(runs) / args.connections * 1e6
    best = min(runs) / args.connections * 1e6
    print(
        f"{args.connections} new connections, batch {args.batch}, gap {args.gap_us:g} us: "
        f"median {per:.2f} us each, best {best:.2f} "
        f"(runs {', '.join(f'{r / args.connections * 1e6:.2f}' for r in runs)})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
