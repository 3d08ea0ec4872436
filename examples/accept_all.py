"""A decider that accepts every connection for good.

python examples/accept_all.py [--pipe PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from pmk.client import Decision, run_decider


def decide(info: dict[str, Any]) -> Decision:
    return Decision("accept", permanent=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pipe", default=None, help="pmk endpoint (default: $PMK_PIPE or the platform default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    asyncio.run(run_decider(decide, name="accept-all", path=args.pipe))


if __name__ == "__main__":
    main()
