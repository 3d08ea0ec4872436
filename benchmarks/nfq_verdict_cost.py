"""What one NFQUEUE verdict costs, and how much of it is the call rather than the kernel's work.

    sudo .venv/bin/python benchmarks/nfq_verdict_cost.py [--packets N] [--rounds R]

In a throwaway namespace pair, N new UDP flows (one datagram each, each its
own source port) are queued to a netfilterqueue-bound queue and held; then
all N get their verdicts, timed, in one of these ways (alternated per round,
medians printed, microseconds per packet):

- ``lib_accept`` / ``lib_repeat``: netfilterqueue as pmk used it, one
  ``sendmsg`` per packet (``accept()``, or ``set_mark`` + ``repeat()``);
- ``each_repeat``: pmk's own encoding, one ``sendto`` per packet;
- ``batch_accept`` / ``batch_repeat``: every verdict in one ``sendto``.

The batch figure is the kernel's own work per verdict (find the packet,
re-run the hook for a repeat, deliver to the UDP socket) plus encoding; the
difference to the per-packet figures is the call. The receive side is timed
too: netfilterqueue's ``run_socket`` building a Packet per message against
``recv`` plus a parse of the attributes in Python (``own``), and against
``recv`` alone (``recv_only``, the packet id read from its fixed offset).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

QUEUE = 3
PORT = 9999
MODES = ("lib_accept", "lib_repeat", "each_repeat", "batch_accept", "batch_repeat")
RECEIVERS = ("lib", "own", "recv_only")


def sender(host: str, count: int) -> None:
    """Client namespace: ``count`` datagrams, each from a fresh socket (a new flow)."""
    for _ in range(count):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"x" * 32, (host, PORT))


def _queued(queue: int) -> int:
    with open("/proc/net/netfilter/nfnetlink_queue") as f:
        for line in f:
            cols = line.split()
            if int(cols[0]) == queue:
                return int(cols[2])
    return 0


def _own_parse(data: bytes) -> tuple[int, int, int, bytes]:
    """(packet id, mark, hook, payload) of one queued-packet message: the attributes walked in Python."""
    off, end = 20, len(data)
    packet_id = mark = hook = 0
    payload = b""
    unpack = struct.unpack_from
    while off + 4 <= end:
        length, kind = unpack("=HH", data, off)
        kind &= 0x7FFF
        if kind == 1:  # NFQA_PACKET_HDR
            packet_id, hook = unpack(">I2xB", data, off + 4)
        elif kind == 3:  # NFQA_MARK
            mark = unpack(">I", data, off + 4)[0]
        elif kind == 10:  # NFQA_PAYLOAD
            payload = data[off + 4 : off + length]
        off += (length + 3) & ~3
    return packet_id, mark, hook, payload


def _id_and_mark(data: bytes) -> tuple[int, int, int, bytes]:
    """Only what a verdict needs, from the fixed place the kernel puts it (the syscall's share of a receive)."""
    return struct.unpack_from(">I", data, 24)[0], 0, 0, b""


def worker(client_ns: str, server_ip: str, count: int, rounds: int) -> None:
    """Server namespace: bind the queue, then per round queue ``count`` flows, read them, verdict them."""
    from netfilterqueue import COPY_PACKET, NetfilterQueue

    from pmk.capture.nfq_verdicts import NF_ACCEPT, NF_REPEAT, VerdictBatch

    rule = ["INPUT", "-p", "udp", "--dport", str(PORT), "-m", "mark", "--mark", "0/1"]
    subprocess.run(["iptables", "-I", *rule, "-j", "NFQUEUE", "--queue-num", str(QUEUE)], check=True)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
    sink.bind(("0.0.0.0", PORT))
    held: list = []
    nfq = NetfilterQueue()
    nfq.bind(QUEUE, held.append, max_len=count * 2, mode=COPY_PACKET, range=4016, sock_len=count * 8192)
    sock = socket.socket(fileno=os.dup(nfq.get_fd()))
    sock.setblocking(False)
    argv = ["ip", "netns", "exec", client_ns, sys.executable, __file__, "sender", server_ip, str(count)]
    times: dict[str, list[float]] = {m: [] for m in (*MODES, *RECEIVERS)}
    try:
        for n in range(rounds * len(MODES)):
            mode = MODES[n % len(MODES)]
            # netfilterqueue's verdicts need its Packets; pmk's own take either receive path.
            receive = "lib" if mode.startswith("lib") else RECEIVERS[n % len(RECEIVERS)]
            subprocess.run(argv, check=True)
            deadline = time.monotonic() + 20
            while _queued(QUEUE) < count and time.monotonic() < deadline:
                time.sleep(0.01)
            ids: list[tuple[int, int]] = []
            started = time.perf_counter()
            if receive == "lib":
                held.clear()
                nfq.run_socket(sock)  # non-blocking: returns at EAGAIN
                ids = [(p.id, p.mark) for p in held]
            else:
                parse = _own_parse if receive == "own" else _id_and_mark
                while True:
                    try:
                        data = sock.recv(4096)
                    except BlockingIOError:
                        break
                    packet_id, mark, _hook, _payload = parse(data)
                    ids.append((packet_id, mark))
            times[receive].append((time.perf_counter() - started) / max(len(ids), 1))
            if len(ids) != count:
                raise RuntimeError(f"{len(ids)} of {count} packets queued")
            started = time.perf_counter()
            if mode == "lib_accept":
                for p in held:
                    p.accept()
            elif mode == "lib_repeat":
                for p in held:
                    p.set_mark(p.mark | 1)
                    p.repeat()
            else:
                batch = VerdictBatch(QUEUE)
                verdict = NF_ACCEPT if mode == "batch_accept" else NF_REPEAT
                for packet_id, mark in ids:
                    batch.add(packet_id, verdict, None if verdict == NF_ACCEPT else mark | 1)
                    if mode == "each_repeat":
                        sock.sendto(batch.take(), (0, 0))
                if batch:
                    sock.sendto(batch.take(), (0, 0))
            times[mode].append((time.perf_counter() - started) / count * 1e6)
            while _queued(QUEUE) and time.monotonic() < deadline:
                time.sleep(0.01)
            while True:  # empty the sink between rounds
                try:
                    sink.recv(100, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
    finally:
        nfq.unbind()
        subprocess.run(["iptables", "-D", *rule, "-j", "NFQUEUE", "--queue-num", str(QUEUE)], check=False)
    for receive in RECEIVERS:
        times[receive] = [t * 1e6 for t in times[receive]]
    print(json.dumps({k: statistics.median(v) for k, v in times.items() if v}))


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pmk.testing.netns import need_root_reason, two_hosts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packets", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    reason = need_root_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    with two_hosts() as hosts:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        argv = [sys.executable, __file__, "worker", hosts.client, hosts.server_ip, str(args.packets), str(args.rounds)]
        out = subprocess.run(hosts.exec_argv(hosts.server, *argv), capture_output=True, text=True, env=env)
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return 1
    result = json.loads(out.stdout)
    print(f"{args.packets} new UDP flows per round, medians of {args.rounds} rounds, microseconds per packet")
    for name, value in result.items():
        print(f"  {name:13s} {value:6.2f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "sender":
        sender(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit(main())
