"""Row S: the cached and the new-connection path with 1k to 1M live connections held.

Live connections are made the way real ones are: the first packet of each of N
new flows (``pmk.bench.traffic --new-flows``) is decided by the accept-all
decider, so every one is in pmk's verdict cache and, on nfqueue, a marked
conntrack entry in the server namespace. Filling goes at a steady rate in
passes; a flow the kernel queue dropped is simply sent again in the next pass
(the ones already held are cache hits). Each size gets a fresh pmk (and an
emptied conntrack table), so the new-connection run of one size does not
inflate the next.

Per size: the cached path (the N flows replayed round-robin, so every packet is
a hit on a different connection; on nfqueue the kernel carries them and pmk's
CPU stays ~0), the new-connection path at row D's peak rate, RSS per held
connection at 50k and 1M, and at 100k the time of ``update_verdict`` and
``clear_cache`` while ``get_stats`` is sampled every 10 ms on another
connection (its latency then stands for how long the event loop stalls).

conntrack: ``nf_conntrack_max`` is the machine's (read-only in a namespace,
and per-namespace counts are held to it), 262,144 by default. Sizes that do
not fit are skipped on nfqueue unless ``--conntrack-max`` raises it for the run.
UDP entries would expire after 30 s; the server namespace keeps them an hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pmk.bench.traffic import new_flow_source
from pmk.client import Client, RemoteError
from pmk.rpc import names

if TYPE_CHECKING:
    from pmk.bench.runner import Bench, PmkHandle

#: Held connections at which RSS per connection is read (during the fill).
MEM_CHECKPOINTS = (50_000, 1_000_000)
#: The size at which update_verdict and clear_cache are timed (or the largest size below it).
OPS_SIZE = 100_000
#: Fill passes: each resends the flows of the chunk; held ones are cache hits.
FILL_PASSES = 3
#: get_stats is sampled this often (seconds) while an operator call runs.
SAMPLE_EVERY = 0.01
#: update_verdict calls timed at OPS_SIZE (one live connection each).
UPDATE_CALLS = 5
#: Conntrack entries left free for everything else in the namespace.
CONNTRACK_HEADROOM = 20_000
UDP_TIMEOUT_S = 3600
CONNTRACK_MAX = "/proc/sys/net/netfilter/nf_conntrack_max"
#: Offered new connections/s when row D has no peak and none is given (--scale-rate).
FALLBACK_RATE = 8_000.0


@contextlib.contextmanager
def conntrack_max_at_least(value: int) -> Iterator[int]:
    """The machine's nf_conntrack_max, raised to ``value`` for the block if asked (0: as is)."""
    with open(CONNTRACK_MAX) as f:
        old = int(f.read())
    if value <= old:
        yield old
        return
    with open(CONNTRACK_MAX, "w") as f:
        f.write(str(value))
    try:
        yield value
    finally:
        with open(CONNTRACK_MAX, "w") as f:
            f.write(str(old))


def conntrack_entry_bytes() -> int | None:
    """The kernel's size of one conntrack entry (slab object), if /proc/slabinfo says."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/slabinfo") as f:
        for line in f:
            if line.startswith("nf_conntrack "):
                return int(line.split()[3])
    return None


class Scale:
    def __init__(self, bench: Bench, backend: str) -> None:
        self.bench, self.backend = bench, backend
        self.nfqueue = backend == "nfqueue"

    def run(self) -> None:
        settings = self.bench.settings
        rate = settings.scale_rate or self._peak()
        with conntrack_max_at_least(settings.conntrack_max if self.nfqueue else 0) as ct_max:
            for size in settings.scale_sizes:
                key = f"S_{self.backend}_{size}"
                if self.nfqueue and size + CONNTRACK_HEADROOM > ct_max:
                    self.bench.extra[key] = {"size": size, "skipped": f"nf_conntrack_max is {ct_max:,}"}
                    continue
                self.bench.extra[key] = self.one_size(size, rate)

    def _peak(self) -> float:
        row = "D" if self.backend == "divert" else "Dn"
        return self.bench.measure(row, "conns").get("pps") or FALLBACK_RATE

    def one_size(self, size: int, rate: float) -> dict[str, Any]:
        bench = self.bench
        bench.log(f"S: pmk {self.backend} with {size:,} live connections (new connections at {rate:,.0f}/s)")
        if self.nfqueue:
            bench.hosts.sh(bench.hosts.server, "conntrack", "-F", check=False)
            bench.hosts.sh(
                bench.hosts.server, "sysctl", "-qw", f"net.netfilter.nf_conntrack_udp_timeout={UDP_TIMEOUT_S}"
            )
        cache = 2 * size + 500_000  # room for the new-connection run: nothing is evicted
        with bench.pmk(self.backend, "--verdict-cache", str(cache)) as pmk:
            first = bench.new_seq(size)
            out: dict[str, Any] = {"size": size, "rss_idle": pmk.idle_rss, "memory": []}
            done = 0
            started = time.monotonic()
            for target in sorted({c for c in MEM_CHECKPOINTS if c < size} | {size}):
                held = self.fill(pmk, first + done, target - done, 0.8 * rate, expect=target)
                done = target
                if target in MEM_CHECKPOINTS:
                    out["memory"].append({"held": held, "rss": pmk.proc.rss()})
            out["fill_seconds"] = time.monotonic() - started
            stats = pmk.settled_stats()
            out["held"] = stats["verdict_cache_entries"]
            out["conntrack"] = self.conntrack_count()
            out["rss_full"] = pmk.proc.rss()
            # nfqueue: the kernel carries cached connections, so count them on the veth.
            captured = lambda: int(pmk.stats()["captured"])  # noqa: E731
            counter = bench.veth_packets if self.nfqueue else captured
            out["cached"] = bench.flood_window(counter, pmk.proc, replay=(first, size))
            accepted = lambda: int(pmk.stats()["accepted"])  # noqa: E731
            ct0 = bench.conntrack_counters() if self.nfqueue else {}
            out["new"] = bench.flood_window(accepted, pmk.proc, new_flows=True, rate=rate)
            if self.nfqueue:
                # New flows the kernel dropped for a full table never reach pmk.
                ct1 = bench.conntrack_counters()
                out["new"]["conntrack_dropped"] = sum(ct1.get(k, 0) - ct0.get(k, 0) for k in ("drop", "insert_failed"))
            if size == self.ops_size():
                out["ops"] = self.time_ops(pmk, first, size)
            out["stats"] = pmk.settled_stats()
        return out

    def ops_size(self) -> int:
        below = [s for s in self.bench.settings.scale_sizes if s <= OPS_SIZE]
        return max(below) if below else 0

    def fill(self, pmk: PmkHandle, first: int, count: int, rate: float, expect: int) -> int:
        """Send the first packet of ``count`` new flows until pmk holds ``expect``; return what it holds."""
        bench = self.bench
        held = 0
        for _ in range(FILL_PASSES):
            seconds = count / rate
            receiver = bench.udp_receiver(seconds + 3, sample=1000)
            sender = bench.udp_sender(seconds=seconds + 5, rate=rate, count=count, replay=(first, count))
            sender.wait_json(seconds + 60)
            bench.procs.stop(receiver)
            held = int(pmk.settled_stats()["verdict_cache_entries"])
            if held >= expect:
                break
        return held

    def conntrack_count(self) -> int | None:
        if not self.nfqueue:
            return None
        hosts = self.bench.hosts
        out = hosts.sh(hosts.server, "cat", "/proc/sys/net/netfilter/nf_conntrack_count", check=False)
        return int(out.stdout) if out.returncode == 0 else None

    def conn(self, seq: int) -> dict[str, Any]:
        """update_verdict's ``conn`` for new flow ``seq`` (pmk's side is the local one)."""
        ip, port = new_flow_source(seq)
        return {
            "protocol": socket.IPPROTO_UDP,
            "local_ip": self.bench.hosts.server_ip,
            "local_port": self.bench.port,
            "remote_ip": socket.inet_ntoa(ip),
            "remote_port": port,
        }

    def time_ops(self, pmk: PmkHandle, first: int, size: int) -> dict[str, Any]:
        conns = [self.conn(first + i * size // UPDATE_CALLS) for i in range(UPDATE_CALLS)]
        self.bench.log(f"S: timing update_verdict and clear_cache with {size:,} held, get_stats every 10 ms")
        ops = asyncio.run(_time_ops(pmk.sock, conns))
        if any("error" in call for call in ops["calls"]):
            time.sleep(0.5)
            ops["pmk_alive"] = pmk.proc.popen.poll() is None
            ops["pmk_stderr"] = pmk.proc.stderr_tail()
        return ops


async def _time_ops(path: str, conns: list[dict[str, Any]]) -> dict[str, Any]:
    """Each call's time and the get_stats latencies sampled meanwhile; a failed call is recorded, not raised."""
    sampler, operator = await Client.connect(path), await Client.connect(path)
    samples: list[tuple[float, float]] = []  # (start, latency)
    stop = asyncio.Event()
    sampler_error: list[str] = []

    async def sample() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                await asyncio.wait_for(sampler.call(names.GET_STATS), 60)
            except (OSError, TimeoutError, RemoteError) as error:
                sampler_error.append(f"{type(error).__name__}: {error}")
                return
            took = time.perf_counter() - t0
            samples.append((t0, took))
            await asyncio.sleep(max(0.0, SAMPLE_EVERY - took))

    async def timed(method: str, *params: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        call: dict[str, Any] = {"method": method}
        try:
            call["result"] = await asyncio.wait_for(operator.call(method, *params), 600)
        except (OSError, TimeoutError, RemoteError) as error:
            call["error"] = f"{type(error).__name__}: {error}"
        call["t0"], call["t1"] = t0, time.perf_counter()
        return call

    task = asyncio.create_task(sample())
    calls = []
    try:
        await asyncio.sleep(0.5)
        quiet = sorted(lat for _, lat in samples)
        for conn in conns:
            calls.append(await timed(names.UPDATE_VERDICT, conn, "block"))
            await asyncio.sleep(0.05)
        calls.append(await timed(names.CLEAR_CACHE))
        await asyncio.sleep(0.2)
    finally:
        stop.set()
        await task
        sampler.close()
        operator.close()

    def during(method: str) -> dict[str, float | int]:
        windows = [(c["t0"] - SAMPLE_EVERY, c["t1"]) for c in calls if c["method"] == method]
        return _summary(sorted(lat for start, lat in samples if any(a <= start <= b for a, b in windows)))

    return {
        "calls": calls,
        "get_stats_quiet": _summary(quiet),
        "get_stats_during": {method: during(method) for method in (names.UPDATE_VERDICT, names.CLEAR_CACHE)},
        "sampler_error": sampler_error[0] if sampler_error else None,
    }


def _summary(latencies: list[float]) -> dict[str, float | int]:
    if not latencies:
        return {"n": 0}
    return {
        "n": len(latencies),
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "max": latencies[-1],
    }


# -- report ------------------------------------------------------------------


def _ms(summary: dict[str, float | int], key: str) -> str:
    return f"{summary[key] * 1e3:.1f}" if key in summary else "-"


def scale_report(bench: Bench) -> list[str]:
    lines: list[str] = []
    for backend in ("divert", "nfqueue"):
        results = [v for k, v in bench.extra.items() if k.startswith(f"S_{backend}_")]
        if not results:
            continue
        lines += ["", f"row S, pmk {backend}: a fresh pmk per size holding that many live connections"]
        header = (
            f"{'live conns':>10} {'held':>9} {'conntrack':>9} {'cached pkt/s':>12} {'CPU s/100k':>10} "
            f"{'new conns/s':>11} {'offered/s':>9} {'CPU s/100k':>10} {'RSS MB':>7} {'B/conn':>6} {'fill s':>6}"
        )
        lines += [header, "-" * len(header)]
        for r in sorted(results, key=lambda r: r["size"]):
            if "skipped" in r:
                lines.append(f"{r['size']:>10,} skipped: {r['skipped']} (see --conntrack-max)")
                continue
            cached, new = r["cached"], r["new"]
            per_conn = (r["rss_full"] - r["rss_idle"]) / r["held"] if r["held"] else None
            lines.append(
                f"{r['size']:>10,} {r['held']:>9,} {_opt(r['conntrack']):>9} {cached['pps']:>12,.0f} "
                f"{_opt(cached['cpu100k'], '.2f'):>10} {new['pps']:>11,.0f} {new['offered_pps']:>9,.0f} "
                f"{_opt(new['cpu100k'], '.2f'):>10} {r['rss_full'] / 2**20:>7.1f} {_opt(per_conn, '.0f'):>6} "
                f"{r['fill_seconds']:>6.0f}"
            )
        lines += _spread(results)
        lines += [
            f"conntrack dropped {r['new']['conntrack_dropped']:,} new flows (table full) in the run of {r['size']:,}"
            for r in results
            if r.get("new", {}).get("conntrack_dropped")
        ]
        for r in results:
            for point in r.get("memory", []):
                grown = point["rss"] - r["rss_idle"]
                lines.append(
                    f"memory (run of {r['size']:,}): {point['held']:,} held: RSS {r['rss_idle'] / 2**20:.1f} -> "
                    f"{point['rss'] / 2**20:.1f} MB, {grown / max(1, point['held']):.0f} B per connection "
                    "(target <= 200)"
                )
            if r.get("ops"):
                lines += _ops_report(r["size"], r["ops"])
    if lines and (ct := conntrack_entry_bytes()):
        lines.append(f"kernel: one conntrack entry is a {ct} B slab object (1M entries: {ct * 1e6 / 2**20:.0f} MB)")
    return lines


def _ops_report(size: int, ops: dict[str, Any]) -> list[str]:
    lines = [f"operator calls with {size:,} held (targets: each < 1 s, get_stats meanwhile < 50 ms):"]
    for method in (names.UPDATE_VERDICT, names.CLEAR_CACHE):
        calls = [c for c in ops["calls"] if c["method"] == method]
        if not calls:
            continue
        took = max(c["t1"] - c["t0"] for c in calls)
        stats = ops["get_stats_during"][method]
        failed = [c["error"] for c in calls if "error" in c]
        result = f"; removed {calls[0]['result']:,}" if method == "clear_cache" and not failed else ""
        lines.append(
            f"  {method} x{len(calls)}: max {took * 1e3:.1f} ms{result}; get_stats meanwhile max "
            f"{_ms(stats, 'max')} ms, p99 {_ms(stats, 'p99')} ms ({stats['n']} samples)"
            + (f"; FAILED {len(failed)}: {failed[0]}" if failed else "")
        )
    lines.append(f"  get_stats with no call running: p99 {_ms(ops['get_stats_quiet'], 'p99')} ms")
    if ops.get("sampler_error"):
        lines.append(f"  get_stats sampling stopped: {ops['sampler_error']}")
    if "pmk_stderr" in ops:
        lines.append(f"  pmk {'still runs' if ops['pmk_alive'] else 'exited'}; its stderr ends:")
        lines += [f"    {text}" for text in ops["pmk_stderr"].splitlines()[-3:]]
    return lines


def _opt(value: float | None, spec: str = ",") -> str:
    return "-" if value is None else format(value, spec)


def _spread(results: list[dict[str, Any]]) -> list[str]:
    """Smallest to largest size: how far throughput and CPU moved (target: within 20%)."""
    done = sorted((r for r in results if "skipped" not in r), key=lambda r: r["size"])
    if len(done) < 2:
        return []
    small, large = done[0], done[-1]
    parts = []
    for path in ("cached", "new"):
        for key, name in (("pps", "rate"), ("cpu100k", "CPU")):
            a, b = small[path].get(key), large[path].get(key)
            if a and b:
                parts.append(f"{path} {name} {100 * (b / a - 1):+.0f}%")
    return [f"{small['size']:,} -> {large['size']:,}: " + ", ".join(parts) + " (target: within 20%)"]
