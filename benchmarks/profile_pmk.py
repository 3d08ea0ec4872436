"""Profile pmk (py-spy) while the benchmark drives it: where does the time go?

    sudo .venv/bin/python benchmarks/profile_pmk.py [--case cached|new] [--rate PPS] [--seconds S]

``cached`` floods one accepted UDP flow through the divert backend (row C);
``new`` sends a new connection per packet at ``--rate`` (row D). Prints the
functions with the most samples, own time and including callees, for pmk
and (case ``new``) for the bench decider, which runs on ``pmk.client``. Needs
py-spy in the venv (``.venv/bin/pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time

from pmk.bench.runner import Bench, Settings, bench_hosts

RAW = ("--nonblocking", "-f", "raw", "-o")


def summarise(raw_path: str, top: int = 25) -> str:
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, count_text = line.rstrip().rpartition(" ")
            count = int(count_text)
            frames = [fr.split(" (")[0] + " " + fr.split("/")[-1].rstrip(")") for fr in stack.split(";")]
            samples += count
            own[frames[-1]] += count
            for frame in set(frames):
                total[frame] += count
    lines = [f"{samples} samples", "own time:"]
    lines += [f"  {100 * n / samples:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines.append("including callees:")
    lines += [f"  {100 * n / samples:5.1f}%  {name}" for name, n in total.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--case", choices=("cached", "new"), default="cached")
    parser.add_argument("--rate", type=float, default=0)
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--backend", default="divert")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or f"{sys.prefix}/bin/py-spy"
    tmp = tempfile.mkdtemp(prefix="pmk-prof-")
    out = f"{tmp}/profile.txt"
    out_decider = f"{tmp}/profile-decider.txt"
    with bench_hosts() as hosts:
        bench = Bench(hosts, tmp, Settings(seconds=args.seconds), lambda t: print(t, file=sys.stderr))
        try:
            with bench.pmk(args.backend) as pmk:
                new = args.case == "new"
                if not new:
                    bench.warm()
                receiver = bench.udp_receiver(args.seconds + 4, sample=100)
                sender = bench.udp_sender(seconds=args.seconds, rate=args.rate, new_flows=new)
                time.sleep(0.5)
                spies = [
                    subprocess.Popen(
                        [spy, "record", "-p", str(pid), "-d", str(int(args.seconds - 1)), "-r", "250", *RAW, path],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    for pid, path in ((pmk.proc.popen.pid, out), (pmk.decider.popen.pid, out_decider))
                ]
                for spy_proc in spies:
                    spy_proc.wait(timeout=args.seconds + 30)
                print(sender.wait_json(30), receiver.wait_json(30))
                stats = pmk.stats()
                print(
                    {k: stats[k] for k in ("captured", "accepted", "evicted", "bypassed", "requests", "late_verdicts")}
                )
        finally:
            bench.procs.stop_all()
    print("== pmk ==")
    print(summarise(out))
    if args.case == "new":
        print("== decider (pmk.client) ==")
        print(summarise(out_decider))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
