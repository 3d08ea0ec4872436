"""What a new connection costs at steady rates below the peak, and its first packet's latency.

    sudo .venv/bin/python benchmarks/cost_by_rate.py [--backends divert nfqueue] [--rates 1000 2000 5000 10000 15000]

One fresh pmk per backend (accept-all decider on ``pmk.client``), then, per
rate, a new UDP connection per packet for ``--seconds`` (3) at that rate, as
row D's latency step does (``pmk.bench``). Printed per rate: the one-way
latency of each connection's first packet (p50, p99), pmk's and the decider's
CPU per decided connection, how busy that keeps pmk (its CPU per second at
this rate: 1.0 is a whole core), and how many packets pmk took per read from
the capture backend (divert: per drain of its ring; nfqueue: per batch).
Where packets come one per read, every read is a whole pass through pmk's
code, its answer another, and the cost per connection is that of two passes;
this is what the latency at 5,000/s is made of (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from pmk.bench.runner import Bench, Settings, bench_hosts

#: The stats counters that count reads from each backend.
READS = {"divert": ("cached_batches", "other_batches"), "nfqueue": ("batches",)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", choices=tuple(READS), default=list(READS))
    parser.add_argument("--rates", type=int, nargs="+", default=[1000, 2000, 5000, 10000, 15000])
    parser.add_argument("--seconds", type=float, default=3.0, help="traffic per rate")
    args = parser.parse_args()
    header = f"{'backend':>8} {'rate/s':>7} {'p50 us':>7} {'p99 us':>7} {'pmk us/conn':>11} {'pmk busy':>8}"
    print(f"{header} {'decider us/conn':>15} {'pkts/read':>9}")
    with bench_hosts() as hosts, tempfile.TemporaryDirectory(prefix="pmk-cost-") as tmp:
        settings = Settings(latency_packets=int(args.seconds * 1000))
        bench = Bench(hosts, tmp, settings, lambda text: None)
        try:
            for backend in args.backends:
                with bench.pmk(backend) as pmk:
                    for rate in args.rates:
                        before = pmk.stats()
                        cpu0, dcpu0 = pmk.proc.cpu_seconds(), pmk.decider.cpu_seconds()
                        lat = bench.latency(new_flows=True, rate=rate)
                        after = pmk.settled_stats()
                        cpu, dcpu = pmk.proc.cpu_seconds() - cpu0, pmk.decider.cpu_seconds() - dcpu0
                        decided = max(1, after["accepted"] - before["accepted"])
                        reads = max(1, sum(after[k] - before[k] for k in READS[backend]))
                        per = cpu / decided * 1e6
                        print(
                            f"{backend:>8} {rate:>7} {lat['p50']:>7.0f} {lat['p99']:>7.0f} {per:>11.0f}"
                            f" {per * rate / 1e6:>8.2f} {dcpu / decided * 1e6:>15.0f} {decided / reads:>9.2f}",
                            flush=True,
                        )
                        time.sleep(1)
        finally:
            bench.procs.stop_all()


if __name__ == "__main__":
    main()
