"""Sweep the capture settings under overload: which ones let the fewest packets bypass pmk?

    sudo .venv/bin/python benchmarks/sweep.py [--seconds S] [--backend divert|nfqueue|both]

Each setting gets a fresh pmk and a flood of new connections (one per packet)
as fast as the generator goes. Printed per setting: offered rate, what pmk
captured and decided, evictions, packets that bypassed the verdict (divert:
``ringbuf_full``), driver-queue drops (divert: ``queue_full``; nfqueue: kernel
queue drops) and peak RSS.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile

from pmk.bench.runner import Bench, Settings, bench_hosts

DIVERT = [
    [],
    ["--divert-batch", "64"],
    ["--divert-wakeup-batches", "4"],
    ["--ring-bytes", str(1 << 20)],
    ["--ring-bytes", str(16 << 20)],
    ["--ring-bytes", str(64 << 20)],
    ["--divert-queue-len", "1024"],
    ["--divert-queue-len", "16384"],
]
NFQUEUE = [["--queue-maxlen", "256"], ["--queue-maxlen", "1024"], ["--queue-maxlen", "8192"]]


def row(bench: Bench, backend: str, args: list[str]) -> str:
    o = bench.extra[f"overload_{backend}"]
    seconds = bench.settings.overload_seconds
    drops = o["kernel_dropped"] if backend == "nfqueue" else o.get("divert_queue_full", 0)
    return (
        f"{backend:8} {' '.join(args) or '(defaults)':34} {o['offered_pps']:>9,.0f} {o['captured'] / seconds:>9,.0f} "
        f"{o['accepted'] / seconds:>9,.0f} {o['evicted']:>8} {o['bypassed']:>9} {drops:>9} "
        f"{o['peak_rss'] / 2**20:>7.1f} {o['idle_rss'] / 2**20:>7.1f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--backend", choices=("divert", "nfqueue", "both"), default="both")
    parser.add_argument(
        "--case",
        action="append",
        default=[],
        help="a divert setting to try instead of the list, e.g. '--ring-bytes 1048576'",
    )
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="pmk-sweep-")
    header = (
        f"{'backend':8} {'setting':34} {'offered/s':>9} {'capt/s':>9} {'decid/s':>9} {'evicted':>8} "
        f"{'bypassed':>9} {'q-drops':>9} {'peakMB':>7} {'idleMB':>7}"
    )
    print(header, flush=True)
    cases = []
    if args.backend in ("divert", "both"):
        cases += [("divert", a) for a in ([c.split() for c in args.case] or DIVERT)]
    if args.backend in ("nfqueue", "both"):
        cases += [("nfqueue", a) for a in NFQUEUE]
    try:
        with bench_hosts() as hosts:
            settings = Settings(overload_seconds=args.seconds)
            bench = Bench(hosts, tmp, settings, lambda t: print(f"... {t}", file=sys.stderr, flush=True))
            try:
                for backend, extra in cases:
                    if backend == "divert":
                        settings.divert_args = extra
                    else:
                        settings.nfqueue_args = extra
                    bench.overload(backend)
                    print(row(bench, backend, extra), flush=True)
            finally:
                bench.procs.stop_all()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
