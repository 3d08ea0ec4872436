"""``pmk bench``: rows A-F of issue 4 side by side, measured in throwaway namespaces."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(commands: argparse._SubParsersAction[Any]) -> None:
    bench = commands.add_parser("bench", help="measure pmk against the kernel and bare pydivert (root)")
    bench.add_argument("--quick", action="store_true", help="seconds, not minutes: one short repeat of each row")
    bench.add_argument("--repeats", type=int, default=None, help="repeats per row (median is shown)")
    bench.add_argument("--seconds", type=float, default=None, help="length of each throughput run")
    bench.add_argument("--overload-seconds", type=float, default=None)
    bench.add_argument("--rows", default=None, help="subset of ABCFDEO (O = overload)")
    bench.add_argument("--json", action="store_true", help="also print every sample as JSON")
    bench.add_argument("--divert-args", default="", help="extra divert flags for pmk serve, e.g. '--divert-batch 64'")


def run(args: argparse.Namespace) -> int:
    from pmk.bench.runner import Settings, main

    settings = Settings.quick() if args.quick else Settings()
    for name in ("repeats", "seconds", "overload_seconds", "rows"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    settings.divert_args = args.divert_args.split()
    return main(settings, as_json=args.json)
