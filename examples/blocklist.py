"""A decider that blocks listed networks, ports and programs, and accepts the rest.

The list file has one rule a line; ``#`` starts a comment:

    198.18.7.0/24        # any port of that network
    fd00:bad::/32
    port 23              # any address, TCP or UDP port 23
    198.18.9.9 port 53   # that address, that port
    program /usr/bin/curl   # every connection of that executable (its real path)

Verdicts are permanent, so each connection is decided once. Run with
``--verdict drop`` to discard silently instead of rejecting.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

from pmk.client import Decision, run_decider
from pmk.client_types import DecideInfo

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Rule:
    network: Network | None
    port: int | None
    program: str | None = None

    def matches(self, address: str, port: int, process: str | None = None) -> bool:
        if self.program is not None:
            return process == self.program
        if self.port is not None and self.port != port:
            return False
        return self.network is None or ipaddress.ip_address(address) in self.network


def parse_rules(text: str) -> list[Rule]:
    """Read the list format above; raise ValueError naming the bad line."""
    rules = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        network: Network | None = None
        port: int | None = None
        if words[0] == "program":
            if len(words) != 2 or not words[1].startswith("/"):
                raise ValueError(f"line {number}: expected 'program /absolute/path'")
            rules.append(Rule(None, None, words[1]))
            continue
        try:
            if words[0] != "port":
                network = ipaddress.ip_network(words.pop(0), strict=False)
            if words:
                if len(words) != 2 or words[0] != "port":
                    raise ValueError("expected 'port N'")
                port = int(words[1])
                if not 0 <= port <= 65535:
                    raise ValueError("port out of range")
        except ValueError as error:
            raise ValueError(f"line {number}: {error}") from None
        rules.append(Rule(network, port))
    return rules


class BlockList:
    def __init__(self, rules: list[Rule], verdict: str = "block") -> None:
        self.rules = rules
        self.verdict = verdict

    def decide(self, info: DecideInfo) -> Decision:
        remote, port = info["remote_ip"], info["remote_port"]
        local_port, process = info["local_port"], info.get("process")
        for rule in self.rules:
            if rule.matches(remote, port, process) or (
                rule.program is None and rule.network is None and rule.port == local_port
            ):
                return Decision(self.verdict, permanent=True)
        return Decision("accept", permanent=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rules", type=Path, help="block-list file")
    parser.add_argument("--verdict", choices=("block", "drop"), default="block")
    parser.add_argument("--pipe", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    blocklist = BlockList(parse_rules(args.rules.read_text()), args.verdict)
    asyncio.run(run_decider(blocklist.decide, name="blocklist", path=args.pipe))


if __name__ == "__main__":
    main()
