"""The block-list example's rule format and decisions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "blocklist_example", Path(__file__).parent.parent / "examples" / "blocklist.py"
)
assert _spec is not None and _spec.loader is not None
blocklist = importlib.util.module_from_spec(_spec)
sys.modules["blocklist_example"] = blocklist
_spec.loader.exec_module(blocklist)


def info(remote_ip: str, remote_port: int, local_port: int = 40000) -> dict:  # type: ignore[type-arg]
    return {"remote_ip": remote_ip, "remote_port": remote_port, "local_port": local_port}


def test_rules_block_networks_ports_and_pairs() -> None:
    rules = blocklist.parse_rules(
        """
        # comment line
        198.18.7.0/24
        fd00:bad::/32   # v6
        port 23
        198.18.9.9 port 53
        """
    )
    decider = blocklist.BlockList(rules)
    assert decider.decide(info("198.18.7.200", 443)).verdict == "block"
    assert decider.decide(info("fd00:bad::1", 443)).verdict == "block"
    assert decider.decide(info("198.18.1.1", 23)).verdict == "block"
    assert decider.decide(info("198.18.1.1", 5555, local_port=23)).verdict == "block"  # inbound to port 23
    assert decider.decide(info("198.18.9.9", 53)).verdict == "block"
    allowed = decider.decide(info("198.18.9.9", 54))
    assert allowed.verdict == "accept" and allowed.permanent


def test_bad_lines_are_named() -> None:
    with pytest.raises(ValueError, match="line 2"):
        blocklist.parse_rules("198.18.0.0/16\nnot-an-address\n")
    with pytest.raises(ValueError, match="line 1"):
        blocklist.parse_rules("port 70000")


def test_program_rules_match_the_executable_path() -> None:
    rules = blocklist.parse_rules("program /usr/bin/curl  # the whole program\n")
    decider = blocklist.BlockList(rules)
    curl = {**info("198.18.1.1", 443), "process": "/usr/bin/curl"}
    wget = {**info("198.18.1.1", 443), "process": "/usr/bin/wget"}
    unknown = {**info("198.18.1.1", 443), "process": None}
    assert decider.decide(curl).verdict == "block"
    assert decider.decide(wget).verdict == "accept"
    assert decider.decide(unknown).verdict == "accept"
    with pytest.raises(ValueError, match="line 1"):
        blocklist.parse_rules("program curl\n")
