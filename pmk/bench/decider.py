"""The benchmark's decider: accepts every connection for good, through pmk's own client.

python -m pmk.bench.decider --pipe PATH
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from pmk.client import Decision, run_decider
from pmk.client_types import DecideInfo

_ACCEPT = Decision("accept", permanent=True)


def decide(info: DecideInfo) -> Decision:
    return _ACCEPT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pipe", required=True)
    args = parser.parse_args(argv)
    from pmk.loop import run

    with contextlib.suppress(KeyboardInterrupt):
        run(run_decider(decide, name="bench-accept-all", path=args.pipe, reconnect=True, max_backoff=0.5))
    return 0


if __name__ == "__main__":
    sys.exit(main())
