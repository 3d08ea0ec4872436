"""What process attribution costs per new connection, and why one exact request matters.

    sudo .venv/bin/python benchmarks/attribution.py [--connections N] [--background N]

Runs in a throwaway network namespace. A background process holds
``--background`` idle TCP connections (a busy host's socket table); an owner
process opens new TCP connections one at a time, and each is attributed
(socket -> pid -> executable) as pmk would on its first packet. Rows:

- exact: one sock_diag request by 5-tuple (what ``OwnerLookup`` sends)
- dump: every TCP socket, IPv4 and IPv6 (what a dump-per-connection firewall
  such as OpenSnitch reads per new connection), raw netlink and pyroute2
- new connection: exact request + /proc (the owner was seen before: its
  descriptors are read again, the executable is cached), for a process that
  opens one connection at a time and one that keeps 20 open and closes the
  oldest (its new socket lands on any descriptor: the search reads about all)
- new inbound connection: its SYN names the listener, whose process is cached
- new connection, cold: the same with empty caches (a full /proc scan)
- new connection, dump: a full dump to find the socket, then /proc as above

The machine may be shared: the numbers are indicative, not a measurement
to compare across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from pmk.host.owner import OwnerLookup
from pmk.host.procs import ProcessTable
from pmk.host.sockdiag import SockDiag
from pmk.host.sockets import CONNECTED_TCP_STATES
from pmk.verdicts import ConnKey

LOCALHOST = socket.inet_aton("127.0.0.1")
LISTEN_PORT = 7301
BACKGROUND_PORT = 7302

# Standard library only: runs as its own process inside the namespace.
OWNER = r"""
import socket, sys
port = int(sys.argv[1])
listener = socket.create_server(("127.0.0.1", port), backlog=1024)
held = []
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "hold":
        # idle connections: both ends stay open in this process
        for _ in range(int(sys.argv[2])):
            c = socket.create_connection(("127.0.0.1", port))
            held += [c, listener.accept()[0]]
        print("held", flush=True)
        continue
    if line.strip() == "reopen":  # one connection at a time: the new one reuses the descriptors
        for s in held[-2:]:
            s.close()
        del held[-2:]
    c = socket.create_connection(("127.0.0.1", port))
    a, _ = listener.accept()
    held += [c, a]
    if len(held) > 40:  # "pool": 20 connections open, the oldest closed first
        for s in held[:2]:
            s.close()
        del held[:2]
    print(c.getsockname()[1], flush=True)
"""


class Owner:
    """A process that opens TCP connections when asked."""

    def __init__(self, port: int, hold: int = 0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", OWNER, str(port), str(hold)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        assert self.stdout.readline().strip() == "ready"
        if hold:
            self.stdin.write("hold\n")
            self.stdin.flush()
            assert self.stdout.readline().strip() == "held"

    def new_connection(self, pattern: str = "pool") -> ConnKey:
        self.stdin.write(pattern + "\n")
        self.stdin.flush()
        return ConnKey(socket.IPPROTO_TCP, LOCALHOST, int(self.stdout.readline()), LOCALHOST, LISTEN_PORT)

    def close(self) -> None:
        self.stdin.close()
        self.proc.wait(10)


def per_second(label: str, count: int, seconds: float) -> dict[str, object]:
    us = seconds / count * 1e6
    print(f"{label:<56} {us:>10.1f} us {count / seconds:>12,.0f} /s")
    return {"row": label, "us": round(us, 2), "per_second": round(count / seconds)}


def timed(fn: Callable[[], object], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        fn()
    return time.perf_counter() - start


def attribute_new(owner: Owner, count: int, attribute: Callable[[ConnKey], object], pattern: str = "pool") -> float:
    """Seconds spent attributing ``count`` new connections (opening them is not counted)."""
    spent = 0.0
    for _ in range(count):
        key = owner.new_connection(pattern)
        start = time.perf_counter()
        found = attribute(key)
        spent += time.perf_counter() - start
        assert found is not None and found.pid == owner.proc.pid, found  # type: ignore[attr-defined]
    return spent


def dump_all(diag: SockDiag) -> list[object]:
    return [e for family in (socket.AF_INET, socket.AF_INET6) for e in diag.dump(family, socket.IPPROTO_TCP)]


def inside(connections: int, background: int) -> list[dict[str, object]]:
    rows = []
    holder = Owner(BACKGROUND_PORT, hold=background)
    owner = Owner(LISTEN_PORT)
    diag = SockDiag()
    try:
        tcp_sockets = len(dump_all(diag))
        print(f"TCP sockets in the namespace: {tcp_sockets}; processes on the machine: {len(os.listdir('/proc'))}")
        key = owner.new_connection()
        rows.append(
            per_second(
                "exact sock_diag request",
                20000,
                timed(lambda: diag.find(6, key.local_ip, key.local_port, key.remote_ip, key.remote_port), 20000),
            )
        )
        dumps = max(20, 2000 // max(1, tcp_sockets // 100))
        rows.append(per_second("full TCP dump (raw netlink)", dumps, timed(lambda: dump_all(diag), dumps)))
        from pyroute2 import DiagSocket  # type: ignore[import-untyped]

        with DiagSocket() as ds:
            ds.bind()

            def pyroute2_dump() -> None:
                for family in (socket.AF_INET, socket.AF_INET6):
                    ds.get_sock_stats(family=family, protocol=socket.IPPROTO_TCP)

            n = max(5, dumps // 20)
            rows.append(per_second("full TCP dump (pyroute2 DiagSocket)", n, timed(pyroute2_dump, n)))

        lookup = OwnerLookup()
        lookup.lookup(owner.new_connection(), outbound=True)  # the owner becomes a known process
        for pattern, label in (("reopen", "one at a time"), ("pool", "20 open, oldest closed")):
            rows.append(
                per_second(
                    f"new connection ({label}): exact + /proc",
                    connections,
                    attribute_new(owner, connections, lambda k: lookup.lookup(k, True), pattern),
                )
            )
        inbound = ConnKey(socket.IPPROTO_TCP, LOCALHOST, LISTEN_PORT, LOCALHOST, 40000)
        rows.append(
            per_second(
                "new inbound connection (listener known): exact + /proc",
                20000,
                timed(lambda: lookup.lookup(inbound, False), 20000),
            )
        )
        cold = max(10, connections // 50)
        spent = 0.0
        for _ in range(cold):
            fresh = OwnerLookup()
            spent += attribute_new(owner, 1, lambda k, f=fresh: f.lookup(k, True))  # type: ignore[misc]
            fresh.close()
        rows.append(per_second("new connection, cold caches: full /proc scan", cold, spent))

        table = ProcessTable()

        def by_dump(k: ConnKey) -> object:
            for family in (socket.AF_INET, socket.AF_INET6):
                for e in diag.dump(family, socket.IPPROTO_TCP, CONNECTED_TCP_STATES):
                    if (e.local_ip, e.local_port, e.remote_ip, e.remote_port) == k[1:]:
                        found = table.owner_of(e.inode, e.uid)
                        return None if found is None else type("Found", (), {"pid": found[0]})
            return None

        table.owner_of(0, 0)
        n = max(10, connections // 10)
        rows.append(per_second("new connection: full dump + /proc", n, attribute_new(owner, n, by_dump)))
        lookup.close()
    finally:
        diag.close()
        owner.close()
        holder.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=2000, help="new connections attributed per row")
    parser.add_argument("--background", type=int, default=1000, help="idle TCP connections held meanwhile")
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        rows = inside(args.connections, args.background)
        if args.json:
            print(json.dumps(rows))
        return 0
    if os.geteuid() != 0:
        print("attribution benchmark: needs root (it makes a network namespace)", file=sys.stderr)
        return 2
    ns = f"pmkattr-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        print("indicative numbers: the machine may be shared with other work")
        argv = [sys.executable, str(Path(__file__).resolve()), "--inside", *sys.argv[1:]]
        return subprocess.run(["ip", "netns", "exec", ns, *argv], cwd=Path(__file__).resolve().parent.parent).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    sys.exit(main())
