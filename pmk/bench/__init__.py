"""``pmk bench``: rows A-F (issue 4), O and S (issue 12) side by side, in throwaway namespaces."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(commands: argparse._SubParsersAction[Any]) -> None:
    bench = commands.add_parser("bench", help="measure pmk against the kernel and bare pydivert (root)")
    bench.add_argument("--quick", action="store_true", help="seconds, not minutes: one short repeat of each row")
    bench.add_argument("--repeats", type=int, default=None, help="repeats per row (median is shown)")
    bench.add_argument("--seconds", type=float, default=None, help="length of each throughput run")
    bench.add_argument("--overload-seconds", type=float, default=None)
    bench.add_argument(
        "--rows",
        default=None,
        help="subset of ABCFDEOST (O = 1x, 2x and 5x D's peak, S = scale, T = new TCP connections)",
    )
    bench.add_argument(
        "--scale-sizes",
        type=_sizes,
        default=None,
        help="row S: live connections per step, comma-separated (default 1000,10000,100000,1000000)",
    )
    bench.add_argument(
        "--conntrack-max",
        type=int,
        default=0,
        help="row S on nfqueue: raise the machine's nf_conntrack_max to this for the run (restored after)",
    )
    bench.add_argument("--scale-rate", type=float, default=None, help="row S: new connections/s (default: D's peak)")
    bench.add_argument("--json", action="store_true", help="also print every sample as JSON")
    bench.add_argument("--divert-args", default="", help="extra divert flags for pmk serve, e.g. '--divert-batch 64'")


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(size) for size in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of whole numbers: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be at least 1: {text!r}")
    return sizes


def run(args: argparse.Namespace) -> int:
    from pmk.bench.runner import Settings, main

    settings = Settings.quick() if args.quick else Settings()
    for name in ("repeats", "seconds", "overload_seconds", "rows", "scale_sizes", "scale_rate"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    settings.conntrack_max = args.conntrack_max
    settings.divert_args = args.divert_args.split()
    return main(settings, as_json=args.json)
