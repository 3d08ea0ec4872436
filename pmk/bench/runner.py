"""The benchmark run: rows A-F in throwaway namespaces, one table of medians.

Every interceptor runs in the server namespace, every traffic source in the
client namespace; deciders and the RPC echo use Unix sockets in a private
temporary directory. Throughput is read over a window inside each run (after
a warm-up), from the counter that belongs to the row: the server's veth for
the kernel rows (A, F), the loop's own count for B, pmk's ``captured`` for C
and its ``accepted`` (one packet per new connection) for D.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pmk.bench.procs import Proc, ProcGroup
from pmk.rpc import names
from pmk.testing.netns import TwoHosts, need_root_reason, two_hosts

PY = sys.executable
PORT = 5201
SPORT = 41000
MTU = 1500
#: RSS per verdict cache entry (ConnKey, two address bytes, entry, dict slot): tracemalloc
#: counts 340 B, RSS grew ~420 B per entry (overload with and without --verdict-cache 1024).
#: Under overload the growth of RSS is mostly these (see benchmarks/README.md).
VERDICT_ENTRY_BYTES = 420
#: Offered new connections per second for row D, tried in turn.
D_RATES = (5_000, 10_000, 12_000, 14_000, 17_000, 20_000, 25_000, 30_000)


@dataclass
class Settings:
    seconds: float = 4.0
    repeats: int = 3
    latency_packets: int = 1500
    overload_seconds: float = 10.0
    rpc_count: int = 20000
    packet_cache: int = 1024
    divert_args: list[str] = field(default_factory=list)
    nfqueue_args: list[str] = field(default_factory=list)
    rows: str = "ABCFDEO"

    @classmethod
    def quick(cls) -> Settings:
        return cls(seconds=1.0, repeats=1, latency_packets=200, overload_seconds=1.0, rpc_count=2000)


@dataclass
class Measure:
    """One row x workload: lists of per-repeat values, reduced to medians for the table."""

    row: str
    workload: str
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, **kv: float | None) -> None:
        for key, value in kv.items():
            if value is not None:
                self.values.setdefault(key, []).append(float(value))

    def get(self, key: str) -> float | None:
        series = self.values.get(key)
        return statistics.median(series) if series else None


class Bench:
    def __init__(self, hosts: TwoHosts, tmp: str, settings: Settings, log: Callable[[str], None]) -> None:
        self.hosts, self.tmp, self.settings, self.log = hosts, tmp, settings, log
        self.procs = ProcGroup()
        self.results: dict[tuple[str, str], Measure] = {}
        self.extra: dict[str, Any] = {}
        self._seq = 0  # new-flow sequence numbers are never reused in one run

    # -- plumbing ------------------------------------------------------------

    def measure(self, row: str, workload: str) -> Measure:
        return self.results.setdefault((row, workload), Measure(row, workload))

    def server(self, *argv: str, stdin: bool = False, name: str = "") -> Proc:
        return self.procs.start(self.hosts.exec_argv(self.hosts.server, *argv), stdin=stdin, name=name)

    def client(self, *argv: str, name: str = "") -> Proc:
        return self.procs.start(self.hosts.exec_argv(self.hosts.client, *argv), name=name)

    def veth_packets(self) -> int:
        out = self.hosts.sh(self.hosts.server, "cat", f"/sys/class/net/{self.hosts.server_if}/statistics/rx_packets")
        return int(out.stdout)

    def veth_both(self) -> int:
        path = f"/sys/class/net/{self.hosts.server_if}/statistics"
        out = self.hosts.sh(self.hosts.server, "cat", f"{path}/rx_packets", f"{path}/tx_packets")
        return sum(int(x) for x in out.stdout.split())

    def new_seq(self, n: int) -> int:
        first = self._seq
        self._seq += n
        return first

    # -- traffic -------------------------------------------------------------

    def udp_sender(self, *, seconds: float, rate: float = 0, count: int = 0, new_flows: bool = False) -> Proc:
        argv = [PY, "-m", "pmk.bench.traffic", "send", "--dst", self.hosts.server_ip, "--port", str(PORT)]
        argv += ["--seconds", str(seconds), "--rate", str(rate), "--count", str(count)]
        if new_flows:
            budget = int((rate or 400_000) * seconds) + 1
            argv += ["--new-flows", "--first-seq", str(self.new_seq(budget))]
        else:
            argv += ["--sport", str(SPORT)]
        return self.client(*argv, name="udp-send")

    def udp_receiver(self, seconds: float, sample: int = 1) -> Proc:
        proc = self.server(
            PY,
            "-m",
            "pmk.bench.traffic",
            "recv",
            "--port",
            str(PORT),
            "--seconds",
            str(seconds),
            "--sample",
            str(sample),
            "--idle",
            "1.0",
            name="udp-recv",
        )
        proc.json_line(10)
        return proc

    def warm(self) -> None:
        """A few packets of the measured flow first, so every later packet is a cache hit."""
        receiver = self.udp_receiver(3)
        self.udp_sender(seconds=1, rate=200, count=20).wait_json(10)
        receiver.wait_json(10)
        self.procs.stop(receiver)

    def flood_window(
        self,
        counter: Callable[[], int],
        worker: Proc | None,
        *,
        new_flows: bool = False,
        seconds: float | None = None,
        rate: float = 0,
    ) -> dict[str, float]:
        """Flood UDP; return packets/s and CPU s per 100k packets over the middle of the flood."""
        seconds = seconds or self.settings.seconds
        receiver = self.udp_receiver(seconds + 3, sample=1000)
        sender = self.udp_sender(seconds=seconds, new_flows=new_flows, rate=rate)
        warm = min(0.5, seconds / 4)
        time.sleep(warm)
        c0, cpu0, t0 = counter(), worker.cpu_seconds() if worker else 0.0, time.monotonic()
        time.sleep(seconds - 2 * warm)
        c1, cpu1, t1 = counter(), worker.cpu_seconds() if worker else 0.0, time.monotonic()
        sent = sender.wait_json(seconds + 20)
        receiver.wait_json(seconds + 20)
        self.procs.stop(receiver)
        self.procs.stop(sender)
        packets = max(1, c1 - c0)
        return {
            "pps": packets / (t1 - t0),
            "cpu100k": (cpu1 - cpu0) / packets * 1e5 if worker else None,
            "offered_pps": sent["pps"],
        }

    def tcp_bulk(self, counter: Callable[[], int], worker: Proc | None) -> dict[str, float]:
        seconds = self.settings.seconds
        server = self.server("iperf3", "-s", "-1", "-p", str(PORT), name="iperf3-s")
        time.sleep(0.3)
        c0, cpu0 = counter(), worker.cpu_seconds() if worker else 0.0
        client = self.client(
            "iperf3", "-c", self.hosts.server_ip, "-p", str(PORT), "-t", str(seconds), "-J", name="iperf3-c"
        )
        out, _err = client.popen.communicate(timeout=seconds + 30)
        c1, cpu1 = counter(), worker.cpu_seconds() if worker else 0.0
        self.procs.stop(client)
        self.procs.stop(server)
        report = json.loads(out)
        if "error" in report:
            raise RuntimeError(f"iperf3: {report['error']}")
        received = report["end"]["sum_received"]
        packets = max(1, c1 - c0)
        duration = received["seconds"]
        return {
            "gbps": received["bytes"] / duration / 1e9,
            "pps": packets / duration,
            "cpu100k": (cpu1 - cpu0) / packets * 1e5 if worker else None,
        }

    def latency(self, *, new_flows: bool = False) -> dict[str, float]:
        """One-way latency at 1,000 packets/s (one flow, or a new connection per packet)."""
        n = self.settings.latency_packets
        receiver = self.udp_receiver(n / 1000 + 4)
        sender = self.udp_sender(seconds=n / 1000 + 2, rate=1000, count=n, new_flows=new_flows)
        sender.wait_json(n / 1000 + 20)
        result = receiver.wait_json(n / 1000 + 20)
        self.procs.stop(receiver)
        self.procs.stop(sender)
        return {"p50": result["lat_p50_us"], "p99": result["lat_p99_us"], "received": result["received"]}

    # -- interceptors --------------------------------------------------------

    def divert_filter(self) -> str:
        return " or ".join(f"{p}.{d}Port == {PORT}" for p in ("tcp", "udp") for d in ("Dst", "Src"))

    @contextlib.contextmanager
    def pmk(self, backend: str, *extra: str) -> Iterator[PmkHandle]:
        sock = f"{self.tmp}/pmk-{backend}.sock"
        argv = [PY, "-m", "pmk", "serve", "--capture", backend, "--pipe", sock, "--log-level", "warning"]
        argv += ["--packet-cache", str(self.settings.packet_cache)]
        if backend == "divert":
            argv += ["--filter", self.divert_filter(), *self.settings.divert_args]
        else:
            argv += ["--scope", f"tcp:{PORT},udp:{PORT}", "--queue-num", "9", *self.settings.nfqueue_args]
        proc = self.server(*argv, *extra, name=f"pmk-{backend}")
        try:
            while "serving on" not in proc.line(20):
                pass
            decider = self.procs.start([PY, "-m", "pmk.bench.decider", "--pipe", sock], name="decider")
            handle = PmkHandle(proc, sock)
            deadline = time.monotonic() + 15
            while handle.stats().get("deciders", 0) < 1:
                if time.monotonic() > deadline:
                    raise TimeoutError("the bench decider did not connect")
                time.sleep(0.05)
            handle.idle_rss = proc.rss()
            yield handle
        finally:
            self.procs.stop(proc)
            with contextlib.suppress(NameError):
                self.procs.stop(decider)

    @contextlib.contextmanager
    def bare(self, mode: str) -> Iterator[Proc]:
        argv = [PY, "-m", "pmk.bench.bare", "--filter", self.divert_filter(), "--mode", mode]
        argv += [a for a in self.settings.divert_args if not a.startswith("--divert-queue")]
        proc = self.server(*_bare_args(argv), stdin=True, name=f"bare-{mode}")
        try:
            proc.json_line(20)
            yield proc
        finally:
            self.procs.stop(proc)

    # -- rows ----------------------------------------------------------------

    def row_a(self) -> None:
        self.log("A: kernel only")
        for _ in range(self.settings.repeats):
            self.measure("A", "tcp").add(**self.tcp_bulk(self.veth_both, None))
            self.measure("A", "udp").add(**self.flood_window(self.veth_packets, None))
            lat = self.latency()
            self.measure("A", "udp").add(p50=lat["p50"], p99=lat["p99"])
            self.measure("A", "lat1k").add(p50=lat["p50"], p99=lat["p99"])

    def row_b(self, mode: str) -> None:
        row = "B" if mode == "batch" else "B1"
        self.log(f"{row}: bare pydivert loop ({mode})")
        with self.bare(mode) as proc:
            handled = lambda: int(proc.ask("stats")["handled"])  # noqa: E731
            before = proc.ask("stats")["bypassed"]
            for _ in range(self.settings.repeats):
                self.measure(row, "tcp").add(**self.tcp_bulk(handled, proc))
                self.measure(row, "udp").add(**self.flood_window(handled, proc))
                lat = self.latency()
                self.measure(row, "udp").add(p50=lat["p50"], p99=lat["p99"])
            self.measure(row, "udp").add(bypassed=proc.ask("stats")["bypassed"] - before, rss=proc.peak_rss())

    def row_pmk(self, backend: str) -> None:
        row = "C" if backend == "divert" else "F"
        self.log(f"{row}: pmk {backend} backend, cached connection")
        with self.pmk(backend) as pmk:
            self.warm()
            if backend == "divert":
                counter = lambda: int(pmk.stats()["captured"])  # noqa: E731
                tcp_counter = counter
            else:
                counter, tcp_counter = self.veth_packets, self.veth_both
            before = pmk.stats()["bypassed"]
            for _ in range(self.settings.repeats):
                self.measure(row, "tcp").add(**self.tcp_bulk(tcp_counter, pmk.proc))
                self.measure(row, "udp").add(**self.flood_window(counter, pmk.proc))
                lat = self.latency()
                self.measure(row, "udp").add(p50=lat["p50"], p99=lat["p99"])
            stats = pmk.stats()
            self.measure(row, "udp").add(bypassed=stats["bypassed"] - before, rss=pmk.proc.peak_rss())
            self.extra[f"{row}_stats"] = stats

    def row_d(self, backend: str) -> None:
        row = "D" if backend == "divert" else "Dn"
        self.log(f"{row}: pmk {backend} backend, every packet a new connection")
        with self.pmk(backend) as pmk:
            accepted = lambda: int(pmk.stats()["accepted"])  # noqa: E731
            before = pmk.stats()["bypassed"]
            for _ in range(self.settings.repeats):
                # Offered rates step up; the best decided rate is the capacity (a flood
                # far beyond it only measures how the packet cache sheds load).
                best: dict[str, float] = {}
                for rate in D_RATES:
                    result = self.flood_window(accepted, pmk.proc, new_flows=True, rate=rate)
                    if result["pps"] > best.get("pps", 0):
                        best = result
                    if result["pps"] < 0.9 * rate:
                        break
                self.measure(row, "conns").add(**best)
                lat = self.latency(new_flows=True)
                self.measure(row, "conns").add(p50=lat["p50"], p99=lat["p99"])
            stats = pmk.stats()
            self.measure(row, "conns").add(bypassed=stats["bypassed"] - before, rss=pmk.proc.peak_rss())
            self.extra[f"{row}_stats"] = stats

    def row_e(self) -> None:
        self.log("E: raw msgpack-RPC echo over a Unix socket")
        path = f"{self.tmp}/echo.sock"
        server = self.procs.start([PY, "-m", "pmk.bench.rpc_echo", "serve", "--path", path], stdin=True, name="echo")
        try:
            server.json_line(10)
            for _ in range(self.settings.repeats):
                for window, workload in ((1, "one"), (256, "pipelined")):
                    count = self.settings.rpc_count // (5 if window == 1 else 1)
                    caller = self.procs.start(
                        [
                            PY,
                            "-m",
                            "pmk.bench.rpc_echo",
                            "call",
                            "--path",
                            path,
                            "--count",
                            str(count),
                            "--window",
                            str(window),
                        ],
                        name="echo-call",
                    )
                    out = caller.wait_json(120)
                    self.procs.stop(caller)
                    self.measure("E", workload).add(pps=out["rps"], p50=out["lat_p50_us"], p99=out["lat_p99_us"])
        finally:
            self.procs.stop(server)

    def overload(self, backend: str) -> None:
        """New connections as fast as the generator goes, for a while: memory and bypass."""
        self.log(f"overload: pmk {backend}, new connections for {self.settings.overload_seconds}s")
        with self.pmk(backend) as pmk:
            s0 = pmk.stats()
            result = self.flood_window(
                lambda: int(pmk.stats()["captured"]), pmk.proc, new_flows=True, seconds=self.settings.overload_seconds
            )
            s1 = pmk.stats()
            counters = {k: s1[k] - s0.get(k, 0) for k in s1 if isinstance(s1[k], int) and k.startswith("divert_")}
            self.extra[f"overload_{backend}"] = counters | {
                "accepted": s1["accepted"] - s0["accepted"],
                "verdict_cache_entries": s1["verdict_cache_entries"],
                "captured": s1["captured"] - s0["captured"],
                "offered_pps": result["offered_pps"],
                "captured_pps": result["pps"],
                "peak_rss": pmk.proc.peak_rss(),
                "idle_rss": pmk.idle_rss,
                "bypassed": s1["bypassed"] - s0["bypassed"],
                "evicted": s1["evicted"] - s0["evicted"],
                "kernel_dropped": s1.get("kernel_queue_dropped", 0) - s0.get("kernel_queue_dropped", 0),
                "divert_queue_full": s1.get("divert_queue_full", 0) - s0.get("divert_queue_full", 0),
            }

    def run(self) -> None:
        rows = self.settings.rows
        try:
            if "A" in rows:
                self.row_a()
            if "B" in rows:
                self.row_b("batch")
                self.row_b("single")
            if "C" in rows:
                self.row_pmk("divert")
            if "F" in rows:
                self.row_pmk("nfqueue")
            if "D" in rows:
                self.row_d("divert")
                self.row_d("nfqueue")
            if "E" in rows:
                self.row_e()
            if "O" in rows:
                self.overload("divert")
                self.overload("nfqueue")
        finally:
            self.procs.stop_all()


class PmkHandle:
    def __init__(self, proc: Proc, sock: str) -> None:
        self.proc, self.sock = proc, sock
        self.idle_rss = 0

    def stats(self) -> dict[str, Any]:
        from pmk.client import Client

        async def get() -> dict[str, Any]:
            client = await Client.connect(self.sock)
            try:
                return await asyncio.wait_for(client.call(names.GET_STATS), 5)
            finally:
                client.close()

        return asyncio.run(get())


def _bare_args(argv: list[str]) -> list[str]:
    """The divert flags pmk takes, spelt the way the bare loop takes them."""
    out = []
    for arg in argv:
        out.append({"--divert-batch": "--batch"}.get(arg, arg))
    return out


# -- report ------------------------------------------------------------------

_ROW_NAMES = {
    "A": "A kernel only",
    "B": "B bare pydivert, batched",
    "B1": "B1 bare pydivert, 1 at a time",
    "C": "C pmk divert, cache hits",
    "F": "F pmk nfqueue, accepted conn",
    "D": "D pmk divert, new conns",
    "Dn": "D' pmk nfqueue, new conns",
    "E": "E msgpack-RPC echo",
}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def report(bench: Bench) -> str:
    res = bench.results
    base = {w: res.get(("A", w)) for w in ("udp", "lat1k")}

    def added(m: Measure, key: str) -> str:
        value = m.get(key)
        ref = base["lat1k"].get(key) if base["lat1k"] and m.row not in ("A", "E") else None
        if value is None:
            return "-"
        return f"{value:.0f}" + (f" (+{value - ref:.0f})" if ref is not None else "")

    lines = []
    header = (
        f"{'row':32} {'workload':11} {'rate':>22} {'lat p50 us (+added)':>20} {'lat p99 us (+added)':>20} "
        f"{'CPU s/100k':>10} {'peak RSS MB':>11} {'bypassed':>9}"
    )
    lines += [header, "-" * len(header)]
    order = ["A", "B", "B1", "C", "F", "D", "Dn", "E"]
    for (row, workload), m in sorted(res.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        if workload == "lat1k":
            continue
        if workload == "tcp":
            rate = f"{_fmt(m.get('gbps'), '.2f')} GB/s {_fmt((m.get('pps') or 0) / 1e3, '.1f')} kpps"
        elif row == "E":
            rate = f"{_fmt(m.get('pps'), ',.0f')} req/s"
        elif workload == "conns":
            rate = f"{_fmt(m.get('pps'), ',.0f')} conns/s"
        else:
            rate = f"{_fmt(m.get('pps'), ',.0f')} pkt/s"
        lat50 = added(m, "p50") if workload != "tcp" else "-"
        lat99 = added(m, "p99") if workload != "tcp" else "-"
        rss = res.get((row, "udp")) or res.get((row, "conns"))
        rss_bytes = rss.get("rss") if rss else None
        rss_mb = rss_bytes / 2**20 if rss_bytes else None
        bypassed = rss.get("bypassed") if rss and workload in ("udp", "conns") else None
        lines.append(
            f"{_ROW_NAMES.get(row, row):32} {workload:11} {rate:>22} {lat50:>20} {lat99:>20} "
            f"{_fmt(m.get('cpu100k'), '.2f'):>10} {_fmt(rss_mb, '.1f'):>11} {_fmt(bypassed, '.0f'):>9}"
        )

    def get(row: str, workload: str, key: str) -> float | None:
        m = res.get((row, workload))
        return m.get(key) if m else None

    lines.append("")
    lines.append(
        "ratios: "
        f"C/B tcp {_ratio(get('C', 'tcp', 'gbps'), get('B', 'tcp', 'gbps'))}, "
        f"C/B udp {_ratio(get('C', 'udp', 'pps'), get('B', 'udp', 'pps'))}, "
        f"F/A tcp {_ratio(get('F', 'tcp', 'gbps'), get('A', 'tcp', 'gbps'))}, "
        f"F/A udp {_ratio(get('F', 'udp', 'pps'), get('A', 'udp', 'pps'))}, "
        f"D/E {_ratio(get('D', 'conns', 'pps'), get('E', 'pipelined', 'pps'))} "
        f"(D'/E {_ratio(get('Dn', 'conns', 'pps'), get('E', 'pipelined', 'pps'))}, "
        f"D/E one-at-a-time {_ratio(get('D', 'conns', 'pps'), get('E', 'one', 'pps'))})"
    )
    for backend in ("divert", "nfqueue"):
        o = bench.extra.get(f"overload_{backend}")
        if not o:
            continue
        d_rate = get("D" if backend == "divert" else "Dn", "conns", "pps")
        factor = f" = {o['offered_pps'] / d_rate:.1f}x D" if d_rate else ""
        cache_bytes = bench.settings.packet_cache * MTU
        lines.append(
            f"overload {backend}: offered {o['offered_pps']:,.0f} new conns/s{factor} for "
            f"{bench.settings.overload_seconds:g}s; peak RSS {o['peak_rss'] / 2**20:.1f} MB "
            f"(idle {o['idle_rss'] / 2**20:.1f} MB, growth {(o['peak_rss'] - o['idle_rss']) / 2**20:.1f} MB) vs "
            f"packet cache x MTU = {bench.settings.packet_cache} x {MTU} = {cache_bytes / 2**20:.1f} MB; "
            f"bypassed {o['bypassed']}, evicted {o['evicted']}"
            + (f", kernel queue drops {o['kernel_dropped']}" if backend == "nfqueue" else "")
            + (f", driver queue drops {o['divert_queue_full']}" if backend == "divert" else "")
            + f"; decided {o['accepted'] / bench.settings.overload_seconds:,.0f}/s, "
            f"verdict cache then held {o['verdict_cache_entries']:,} connections "
            f"(x ~{VERDICT_ENTRY_BYTES} B = {o['verdict_cache_entries'] * VERDICT_ENTRY_BYTES / 2**20:.1f} MB)"
        )
    return "\n".join(lines)


def main(settings: Settings, as_json: bool = False) -> int:
    reason = need_root_reason()
    if reason:
        print(f"pmk bench: {reason}", file=sys.stderr)
        return 2
    if shutil.which("iperf3") is None:
        print("pmk bench: needs iperf3", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="pmk-bench-")
    try:
        with two_hosts() as hosts:
            hosts.sh(hosts.server, "ip", "route", "add", "198.19.0.0/16", "via", hosts.client_ip)
            bench = Bench(hosts, tmp, settings, lambda text: print(f"... {text}", file=sys.stderr, flush=True))
            bench.log(f"namespaces {hosts.client} {hosts.server}")
            bench.run()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(report(bench), flush=True)
    if as_json:
        print(json.dumps({f"{r}/{w}": m.values for (r, w), m in bench.results.items()} | {"extra": bench.extra}))
    return 0
