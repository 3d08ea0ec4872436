"""nfqueue's kernel queue length: where do packets go when new connections come in bursts?

    sudo .venv/bin/python benchmarks/nfq_queue.py [--rates 21000 42000 90000] [--maxlen 1024 4096] [--repeats 2]

For each rate and ``--queue-maxlen``, a fresh pmk (nfqueue, accept-all decider
on ``pmk.client``) gets a new UDP connection per packet for 4 s, as row D does
(``pmk.bench``). Printed per run: connections decided per second over the middle
of the flood, packets the kernel dropped because its queue was full
(``kernel_queue_dropped``: the kernel counts the packets pmk holds in that queue
too), packets pmk's own packet cache evicted (``evicted``), the times pmk stopped
reading for lack of room (``read_pauses``), and pmk's CPU per connection.
"""

from __future__ import annotations

import argparse
import tempfile

from pmk.bench.runner import Bench, Settings, bench_hosts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[21000, 42000, 90000])
    parser.add_argument("--maxlen", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"{'rate/s':>8} {'maxlen':>6} {'decided/s':>9} {'q-drops':>8} {'evicted':>8} {'pauses':>6} {'us/conn':>7}")
    with bench_hosts() as hosts, tempfile.TemporaryDirectory(prefix="pmk-nfq-") as tmp:
        bench = Bench(hosts, tmp, Settings(), lambda text: None)
        try:
            for rate in args.rates:
                for _ in range(args.repeats):
                    for maxlen in args.maxlen:
                        with bench.pmk("nfqueue", "--queue-maxlen", str(maxlen)) as pmk:
                            s0 = pmk.stats()
                            result = bench.flood_window(
                                lambda: int(pmk.stats()["accepted"]), pmk.proc, new_flows=True, rate=rate
                            )
                            s1 = pmk.settled_stats()
                        moved = {k: s1.get(k, 0) - s0.get(k, 0) for k in ("kernel_queue_dropped", "evicted")}
                        print(
                            f"{rate:>8,.0f} {maxlen:>6} {result['pps']:>9,.0f} {moved['kernel_queue_dropped']:>8,} "
                            f"{moved['evicted']:>8,} {s1.get('read_pauses', 0):>6} {10 * result['cpu100k']:>7.1f}",
                            flush=True,
                        )
        finally:
            bench.procs.stop_all()


if __name__ == "__main__":
    main()
