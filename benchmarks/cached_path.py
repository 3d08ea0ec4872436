"""Micro-benchmark of the divert cached path, without packets on the wire.

    PYTHONPATH=. .venv/bin/python benchmarks/cached_path.py [--rounds N]

Times the two things every cached packet costs in Python: building a
batch's runs from the receive buffer (``simple_ipv4_runs``) plus the
whole-batch probe (``Engine.accept_cached``), and the per-packet path
(``Engine.on_packets``) for a batch the probe refused. The batch is 255 TCP
data segments of 4 accepted connections, both directions interleaved in runs
of 8, as a bulk transfer gives them. Prints nanoseconds per packet (best of
``--rounds``); only indicative on a shared machine.
"""

from __future__ import annotations

import argparse
import timeit

from pmk.core.engine import Engine
from pmk.packet.captured import CapturedPacket
from pmk.packet.parse import simple_ipv4_runs
from pmk.verdicts import Verdict
from tests.packets import ACK, tcp

BATCH = 255
LOCAL, REMOTE = "198.18.0.1", "198.18.0.2"


def batch() -> list[tuple[bytes, bool]]:
    packets = []
    for n in range(BATCH):
        port = 40000 + (n // 64)
        outbound = (n // 8) % 2 == 0
        if outbound:
            raw = tcp(LOCAL, REMOTE, port, 443, flags=ACK, data=b"x" * 1400)
        else:
            raw = tcp(REMOTE, LOCAL, 443, port, flags=ACK, data=b"x" * 1400)
        packets.append((raw, outbound))
    return packets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    packets = batch()
    engine = Engine(packet_cache_size=1024, verdict_cache_size=65536)
    engine.on_packets([CapturedPacket(raw, out) for raw, out in packets])
    for held in engine.held.all_packets():
        engine.on_verdict(held.id, Verdict.ACCEPT, permanent=True)
    engine.outbox.take()
    buf = bytearray(b"".join(raw for raw, _ in packets))
    flags = [2 if out else 0 for _, out in packets]
    total = len(buf)

    def fast() -> None:
        runs = simple_ipv4_runs(buf, total, flags)
        assert runs is not None and engine.accept_cached(runs)

    captured = [CapturedPacket(raw, out) for raw, out in packets]

    def slow() -> None:
        engine.on_packets(captured)
        engine.outbox.take()

    loops = 200
    for name, call in (("runs + accept_cached", fast), ("on_packets (cached)", slow)):
        best = min(timeit.repeat(call, number=loops, repeat=args.rounds))
        print(f"{name:22} {best / loops / BATCH * 1e9:8.1f} ns/packet")


if __name__ == "__main__":
    main()
