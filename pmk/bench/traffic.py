"""Bounded UDP traffic for the benchmark: a sender and a receiver, run inside namespaces.

    python -m pmk.bench.traffic send --dst IP --port P [--rate PPS] [--count N] [--seconds S] [--new-flows]
    python -m pmk.bench.traffic recv --port P --seconds S

Every datagram carries a sequence number and the sender's CLOCK_MONOTONIC
time, so the receiver can measure one-way latency (namespaces share the
clock). ``--new-flows`` sends from a raw socket with a fresh source address
and port per packet, so every packet is a new connection for pmk; those
sources come from 198.19.0.0/16, which the server namespace routes back to
the client. With ``--tcp-syn`` those packets are TCP SYNs instead (the
listener's SYN-ACK goes to a client namespace with no such socket, which
resets it), so pmk decides new TCP connections. Both ends stop by themselves: count, time and idle bounds.
Each prints one JSON line with what it saw.
"""

from __future__ import annotations

import argparse
import array
import ctypes
import json
import socket
import struct
import sys
import time

_STAMP = struct.Struct("!QQ")  # sequence, send time in ns
_IP_UDP = struct.Struct("!BBHHHBBH4s4sHHHH")
_IP_TCP_SYN = struct.Struct("!BBHHHBBH4s4sHHIIBBHHH")
_PSEUDO_TCP = struct.Struct("!4s4sBBH")
#: Source network for --new-flows (inside 198.18.0.0/15, routed back by the bench).
NEW_FLOW_NET = "198.19.0.0/16"
_PR_SET_TIMERSLACK = 29  # prctl(2)


def new_flow_source(seq: int) -> tuple[bytes, int]:
    """The source address and port of new flow number ``seq`` (unique for 3.9e9 flows)."""
    return bytes((198, 19, (seq >> 8) & 0xFF, seq & 0xFF)), 1024 + (seq >> 16) % 60000


def _tcp_syn(frame: bytearray, src: bytes, dst: bytes, sport: int, dport: int, seq: int) -> None:
    """A SYN with a correct TCP checksum (the kernel fills in only the IP header's)."""
    _IP_TCP_SYN.pack_into(
        frame, 0, 0x45, 0, 40, 0, 0, 64, 6, 0, src, dst, sport, dport, seq, 0, 0x50, 0x02, 64240, 0, 0
    )
    data = _PSEUDO_TCP.pack(src, dst, 0, 6, 20) + bytes(frame[20:40])
    total = sum(struct.unpack("!16H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    struct.pack_into("!H", frame, 36, ~total & 0xFFFF)


def _percentile(sorted_values: list[int] | array.array, fraction: float) -> int:
    if not sorted_values:
        return 0
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]


def _precise_sleeps() -> None:
    """Wake from sleeps on time: the default 50 us timer slack is a quarter of a 5,000/s gap."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)


def send(args: argparse.Namespace) -> dict[str, object]:
    """Send ``count`` datagrams (or until ``seconds``), paced at ``rate`` or as fast as possible."""
    size = max(args.size, _STAMP.size)
    payload = bytearray(size)
    if args.new_flows:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        frame = bytearray(28 + size)
        dst = socket.inet_aton(args.dst)
        target = (args.dst, 0)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if args.sport:
            sock.bind(("", args.sport))
        sock.connect((args.dst, args.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    _precise_sleeps()
    clock = time.monotonic_ns
    start = clock()
    deadline = start + int(args.seconds * 1e9)
    interval = int(1e9 / args.rate) if args.rate > 0 else 0
    sent = errors = 0
    seq = args.first_seq
    count = args.count or (1 << 62)
    # --flows N: cycle over the same N flows (a cached workload over many connections).
    wrap = args.first_seq + args.flows if args.flows else 0
    next_at = start
    while sent < count:
        now = clock()
        if now >= deadline:
            break
        if interval:
            if now < next_at:
                # Sleep, never spin: a spinning sender takes a whole core from pmk and its
                # decider on this 2-core machine, which a real traffic source does not.
                time.sleep((next_at - now) / 1e9)
                continue
            next_at += interval
        try:
            if args.tcp_syn:
                src, sport = new_flow_source(seq)
                _tcp_syn(frame, src, dst, sport, args.port, seq & 0xFFFFFFFF)
                sock.sendto(frame[:40], target)
            elif args.new_flows:
                # A new (source address, port) per packet; the kernel fills in checksum and id.
                src, sport = new_flow_source(seq)
                _IP_UDP.pack_into(
                    frame, 0, 0x45, 0, 28 + size, 0, 0, 64, 17, 0, src, dst, sport, args.port, 8 + size, 0
                )
                _STAMP.pack_into(frame, 28, seq, clock())
                sock.sendto(frame, target)
            else:
                _STAMP.pack_into(payload, 0, seq, clock())
                sock.send(payload)
            sent += 1
            seq += 1
            if seq == wrap:
                seq = args.first_seq
        except OSError:
            errors += 1  # ENOBUFS under flood: the kernel refused, the loop goes on
    elapsed = (clock() - start) / 1e9
    sock.close()
    return {"sent": sent, "errors": errors, "elapsed": elapsed, "pps": sent / elapsed if elapsed else 0.0}


def receive(args: argparse.Namespace) -> dict[str, object]:
    """Count datagrams and their one-way latency until ``seconds`` pass or the line goes idle."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    sock.bind(("", args.port))
    sock.settimeout(0.05)
    print(json.dumps({"ready": True}), flush=True)
    clock = time.monotonic_ns
    buffer = bytearray(65536)
    latencies = array.array("q")
    received = 0
    first = last = 0
    stop_at = clock() + int(args.seconds * 1e9)
    idle_ns = int(args.idle * 1e9)
    while True:
        try:
            n = sock.recv_into(buffer)
        except TimeoutError:
            now = clock()
            if now >= stop_at or (received and now - last > idle_ns):
                break
            continue
        now = clock()
        if n >= _STAMP.size:
            _seq, sent_at = _STAMP.unpack_from(buffer, 0)
            if received % args.sample == 0:
                latencies.append(now - sent_at)
        received += 1
        if not first:
            first = now
        last = now
        if now >= stop_at:
            break
    sock.close()
    ordered = sorted(latencies)
    span = (last - first) / 1e9
    return {
        "received": received,
        "span": span,
        "pps": received / span if span > 0 else 0.0,
        "lat_p50_us": _percentile(ordered, 0.50) / 1e3,
        "lat_p99_us": _percentile(ordered, 0.99) / 1e3,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    modes = parser.add_subparsers(dest="mode", required=True)
    s = modes.add_parser("send")
    s.add_argument("--dst", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--sport", type=int, default=0, help="fixed source port (one flow)")
    s.add_argument("--size", type=int, default=18, help="UDP payload bytes (at least 16)")
    s.add_argument("--rate", type=float, default=0, help="packets per second; 0 floods")
    s.add_argument("--count", type=int, default=0)
    s.add_argument("--seconds", type=float, default=5.0)
    s.add_argument("--new-flows", action="store_true")
    s.add_argument("--tcp-syn", action="store_true", help="with --new-flows: TCP SYNs instead of UDP")
    s.add_argument("--first-seq", type=int, default=0)
    s.add_argument("--flows", type=int, default=0, help="with --new-flows: cycle over this many flows")
    r = modes.add_parser("recv")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--seconds", type=float, default=10.0)
    r.add_argument("--idle", type=float, default=1.0)
    r.add_argument("--sample", type=int, default=1, help="keep the latency of every Nth packet")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = send(args) if args.mode == "send" else receive(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
