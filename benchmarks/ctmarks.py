"""What clearing pmk's conntrack marks costs with many marked entries, per-entry (old) beside bulk (new).

    sudo .venv/bin/python benchmarks/ctmarks.py [--entries 100000 1000000] [--old-max 100000] [--repeat 3]
    sudo .venv/bin/python benchmarks/ctmarks.py --start --entries 170000 [--old-tree CHECKOUT]

Runs in a throwaway network namespace. For each size N it creates N UDP
conntrack entries (batched ctnetlink creates, an hour's timeout; one in ten
IPv6), marked with pmk's three stored values in turn and one in a hundred
with someone else's bit besides, plus ``--unmarked`` entries without a mark;
then times ``ConntrackMarks.clear_marks`` of this tree ("new") and of the
commit ``OLD_REF`` (per-entry pyroute2 requests, "old", only up to
``--old-max`` entries: it takes about 1 ms per entry), alternating, entries
re-created before each run. Meanwhile an asyncio loop on the main thread
ticks every millisecond and records how late each tick is (the clear runs on
ConntrackMarks' worker thread, as in pmk): its maximum stands for how long
``get_stats`` could wait (beside it: the maximum over as long without a
clear). After each clear it checks that no entry keeps pmk's bits, others'
bits stayed, and the entry count is unchanged. Also timed with N entries:
``set_mark`` (update_verdict) of one UDP connection (median of 20) and of
one ICMP key (once; a key without ports needs dumps), and
``ctevents.dump_marked`` (what bandwidth subscriptions read) once.

With ``--start``: the time from starting ``pmk serve --capture nfqueue``
(this tree, and a checkout ``--old-tree`` beside it, e.g. of ``OLD_REF``) to serving, and from SIGINT to its
exit, with N entries unmarked and with N entries still marked by a pmk that
died (start clears them; so does stop, of the entries marked since).

``nf_conntrack_max`` is the machine's; it is raised for the run when N does
not fit (and written back after). The machine may be shared: compare the
old and new figures of one run, not across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pmk.bench.scale import conntrack_max_at_least
from pmk.capture.conntrack import ConntrackMarks
from pmk.capture.ctbulk import failures_of
from pmk.capture.ctevents import (
    _NFGEN,
    _NLMSG,
    NETLINK_NETFILTER,
    NFNL_SUBSYS_CTNETLINK,
    SO_RCVBUFFORCE,
    LocalAddresses,
    dump_entries,
    dump_marked,
)
from pmk.testing.netns import run
from pmk.verdicts import ConnKey

REPO = Path(__file__).resolve().parent.parent
MASK = 0x00700000
VALUES = (0x00100000, 0x00200000, 0x00300000)  # ACCEPT, BLOCK, DROP under the default mask
OTHERS_BIT = 0x1
#: The last commit whose clear_marks sent one request per entry.
OLD_REF = "65c6501"
COUNT = "/proc/sys/net/netfilter/nf_conntrack_count"
_NLA = struct.Struct("=HH")
_NEW = NFNL_SUBSYS_CTNETLINK << 8
NLM_F_CREATE, NLM_F_EXCL, NLA_F_NESTED = 0x400, 0x200, 0x8000
BATCH = 200


def attr(kind: int, payload: bytes) -> bytes:
    return _NLA.pack(4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def nest(kind: int, *parts: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(parts))


def udp_tuple(kind: int, src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    v6 = len(src) == 16
    ip = nest(1, attr(3 if v6 else 1, src), attr(4 if v6 else 2, dst))
    proto = nest(2, attr(1, b"\x11"), attr(2, struct.pack(">H", sport)), attr(3, struct.pack(">H", dport)))
    return nest(kind, ip, proto)


def flow(i: int) -> tuple[bytes, bytes, int, int]:
    """The i-th entry's (src, dst, sport, dport): 198.18.0.1 or fd00:18::1 to many peers."""
    peer, sport = divmod(i, 60000)
    if i % 10 == 9:
        return (
            socket.inet_pton(socket.AF_INET6, "fd00:18::1"),
            socket.inet_pton(socket.AF_INET6, f"fd00:19::{peer + 1:x}"),
            1024 + sport,
            53,
        )
    return socket.inet_aton("198.18.0.1"), socket.inet_aton(f"198.19.{peer // 250}.{peer % 250 + 1}"), 1024 + sport, 53


def create_entries(first: int, count: int, mark: Any) -> None:
    """Create ``count`` UDP entries (batched creates); ``mark(i)`` is the i-th entry's mark."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        sock.bind((0, 0))
        buffer = bytearray(65536)
        batch: list[bytes] = []
        for i in range(first, first + count):
            src, dst, sport, dport = flow(i)
            body = udp_tuple(1, src, dst, sport, dport) + udp_tuple(2, dst, src, dport, sport)
            body += attr(7, struct.pack(">I", 3600)) + attr(8, struct.pack(">I", mark(i)))
            family = socket.AF_INET6 if len(src) == 16 else socket.AF_INET
            head = _NLMSG.pack(20 + len(body), _NEW, 1 | NLM_F_CREATE | NLM_F_EXCL, i, 0)
            batch.append(head + _NFGEN.pack(family, 0, 0) + body)
            if len(batch) == BATCH or i == first + count - 1:
                sock.send(b"".join(batch))
                batch.clear()
                while True:
                    try:
                        size = sock.recv_into(buffer, 0, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
                    _gone, failure = failures_of(buffer, size)
                    if failure:
                        raise OSError(failure, f"creating entry {i}: {os.strerror(failure)}")


def pmk_mark(i: int) -> int:
    return VALUES[i % 3] | (OTHERS_BIT if i % 100 == 0 else 0)


def entry_count() -> int:
    with open(COUNT) as f:
        return int(f.read())


def old_marks_class() -> Any:
    """ConntrackMarks as of ``OLD_REF`` (loaded from git), to run beside this tree's."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{OLD_REF}:pmk/capture/conntrack.py"], capture_output=True, check=True
    ).stdout
    with tempfile.NamedTemporaryFile("wb", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("old_conntrack", f.name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(f.name)
    return module.ConntrackMarks


async def probe(marks: Any) -> dict[str, float]:
    """Run ``clear_marks`` on a worker thread while this loop ticks every 1 ms; its lateness and the time.

    The loop then ticks on as long again (at most 3 s) with nothing else
    running: that lateness is the machine's own (other processes), for comparison.
    """
    loop = asyncio.get_running_loop()
    lags: list[float] = []
    done = False

    async def tick() -> None:
        while not done:
            expected = time.perf_counter() + 0.001
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - expected)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)
    lags.clear()
    started, cpu = time.perf_counter(), time.process_time()
    cleared = await loop.run_in_executor(None, marks.clear_marks)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    during = sorted(lags)
    lags.clear()
    await asyncio.sleep(min(elapsed, 3.0))
    done = True
    await ticker
    return {
        "cleared": cleared,
        "seconds": round(elapsed, 3),
        "cpu_seconds": round(cpu, 3),
        "loop_lag_max_ms": round(during[-1] * 1e3, 2),
        "loop_lag_p99_ms": round(during[int(0.99 * (len(during) - 1))] * 1e3, 2),
        "idle_loop_lag_max_ms": round(max(lags) * 1e3, 2),
    }


def check_cleared(n: int, total: int) -> None:
    left = [len(dump_entries(value, MASK)) for value in VALUES]
    others = len(dump_entries(OTHERS_BIT, OTHERS_BIT))
    assert left == [0, 0, 0], f"entries still marked: {left}"
    assert entry_count() == total, f"entries: {entry_count()} (were {total})"
    assert others == len(range(0, n, 100)), f"someone else's bit is left on {others} entries"


def icmp_set_mark_seconds(marks: ConntrackMarks) -> float:
    """set_mark of one ICMP connection (a key without ports: every flow between its two addresses)."""
    from pyroute2.conntrack import Conntrack  # type: ignore[import-untyped]
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple  # type: ignore[import-untyped]

    here, there = "198.18.0.1", "198.18.0.2"
    ping = NFCTAttrTuple(saddr=here, daddr=there, proto=1, icmp_id=7, icmp_type=8, icmp_code=0)
    pong = NFCTAttrTuple(saddr=there, daddr=here, proto=1, icmp_id=7, icmp_type=0, icmp_code=0)
    with Conntrack() as ct:
        ct.entry("add", tuple_orig=ping, tuple_reply=pong, timeout=600, mark=VALUES[0])
    started = time.perf_counter()
    changed = marks.set_mark(ConnKey(1, socket.inet_aton(here), 0, socket.inet_aton(there), 0), VALUES[1])
    assert changed == 1, changed
    return time.perf_counter() - started


def set_mark_seconds(marks: ConntrackMarks, n: int) -> float:
    """Median time of set_mark of one UDP connection with n entries (keyed as pmk keys outbound ones)."""
    times = []
    for i in range(0, n, max(1, n // 20)):
        src, dst, sport, dport = flow(i)
        started = time.perf_counter()
        changed = marks.set_mark(ConnKey(17, src, sport, dst, dport), VALUES[0])
        times.append(time.perf_counter() - started)
        assert changed == 1, changed
    return statistics.median(times)


def fill(n: int, unmarked: int) -> int:
    """An emptied table, then ``unmarked`` entries without a mark and ``n`` marked ones; the count."""
    run("conntrack", "-F", check=False)
    create_entries(10_000_000, unmarked, lambda i: 0)
    create_entries(0, n, pmk_mark)
    return entry_count()


def measure(n: int, unmarked: int, repeat: int, old_max: int) -> dict[str, Any]:
    started = time.perf_counter()
    total = fill(n, unmarked)
    out: dict[str, Any] = {"entries": n, "unmarked": unmarked, "fill_seconds": round(time.perf_counter() - started, 2)}
    old = old_marks_class() if n <= old_max else None
    results: dict[str, list[dict[str, float]]] = {"new": [], "old": []}
    for round_ in range(repeat):
        # The old clear once (about 1 ms per entry), first, then the new one each round.
        for kind, cls in ([("old", old)] if round_ == 0 and old is not None else []) + [("new", ConntrackMarks)]:
            if results["new"] or results["old"]:
                fill(n, unmarked)
            marks = cls(MASK, VALUES)
            try:
                result = asyncio.run(probe(marks))
            finally:
                marks.close()
            assert result["cleared"] == n, result
            check_cleared(n, total)
            results[kind].append(result)
    for kind, rows in results.items():
        if rows:
            out[kind] = {key: statistics.median(row[key] for row in rows) for key in rows[0]} | {"runs": len(rows)}
    fill(n, unmarked)
    started = time.perf_counter()
    assert len(dump_marked(VALUES, MASK, LocalAddresses())) == n
    out["dump_marked_seconds"] = round(time.perf_counter() - started, 3)
    marks = ConntrackMarks(MASK, VALUES)
    try:
        out["set_mark_ms_median"] = round(set_mark_seconds(marks, n) * 1e3, 3)
        out["icmp_set_mark_ms"] = round(icmp_set_mark_seconds(marks) * 1e3, 3)
    finally:
        marks.close()
    return out


def pmk_start_stop(tree: Path) -> dict[str, float]:
    """Seconds from starting ``pmk serve --capture nfqueue`` (code of ``tree``) to serving, and from SIGINT to exit."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, "-m", "pmk", "serve", "--pipe", f"{tmp}/pmk.sock", "--capture", "nfqueue"]
        env = dict(os.environ, PYTHONPATH=str(tree))
        started = time.perf_counter()
        proc = subprocess.Popen(
            [*argv, "--scope", "udp:9"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tree, env=env
        )
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                if line.startswith("pmk ") and "serving on" in line:
                    break
            else:
                raise RuntimeError(f"pmk did not start (exit {proc.wait()})")
            start = time.perf_counter() - started
            started = time.perf_counter()
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return {"start_seconds": round(start, 3), "stop_seconds": round(time.perf_counter() - started, 3)}


def measure_start(n: int, trees: dict[str, Path]) -> dict[str, Any]:
    """pmk's start and stop with n entries left unmarked, and with n left marked by a pmk that died."""
    out: dict[str, Any] = {}
    for left, mark in (("unmarked", lambda i: 0), ("marked", pmk_mark)):
        for name, tree in trees.items():
            run("conntrack", "-F", check=False)
            create_entries(0, n, mark)
            out[f"{left} {name}"] = pmk_start_stop(tree)
    return out


def inside(args: argparse.Namespace) -> None:
    if args.start:
        trees = {"new": REPO} | ({"old": Path(args.old_tree)} if args.old_tree else {})
        report = {str(n): measure_start(n, trees) for n in args.entries}
    else:
        report = {
            str(n): measure(n, args.unmarked, args.repeat, args.old_max)
            for n in args.entries  # smallest first
        }
    print(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, nargs="+", default=[100_000])
    parser.add_argument("--unmarked", type=int, default=10_000, help="entries without any mark besides")
    parser.add_argument("--repeat", type=int, default=3, help="runs of the new clear per size (median)")
    parser.add_argument("--old-max", type=int, default=100_000, help="largest size the old clear is timed at (once)")
    parser.add_argument("--start", action="store_true", help="time pmk's start and stop instead (nfqueue)")
    parser.add_argument("--old-tree", help="with --start: a checkout to time beside this tree (e.g. of --old-ref)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        inside(args)
        return
    ns = f"pmkm-{os.getpid()}"
    run("ip", "netns", "add", ns)
    try:
        with conntrack_max_at_least(max(args.entries) + args.unmarked + 20_000):
            argv = [sys.executable, __file__, "--inside", *sys.argv[1:]]
            env = dict(os.environ, PYTHONPATH=str(REPO))
            subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, env=env)
    finally:
        run("ip", "netns", "del", ns, check=False)


if __name__ == "__main__":
    main()
