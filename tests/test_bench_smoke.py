"""``pmk bench`` runs end to end and prints its table (a smoke test: nothing here is timed).

A short run of rows A (kernel only), C (pmk divert, cache hits) and E (RPC
echo) in throwaway namespaces; it checks that each row measured something
and that pmk's cached flow really went through pmk (its C rate is a count
of packets pmk captured, so it is above zero only if the capture worked).
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.netns import need_root_reason

pytestmark = [pytest.mark.netns, pytest.mark.skipif(need_root_reason() is not None, reason=str(need_root_reason()))]


def _rate(table: str, row_prefix: str, workload: str) -> float:
    for line in table.splitlines():
        if line.startswith(row_prefix) and f" {workload} " in line:
            match = re.search(r"([\d,.]+) (?:pkt/s|req/s|GB/s)", line)
            assert match, line
            return float(match.group(1).replace(",", ""))
    raise AssertionError(f"no {row_prefix!r} {workload} row in:\n{table}")


def test_bench_quick_prints_one_table() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pmk", "bench", "--quick", "--rows", "ACE", "--seconds", "1"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    table = out.stdout
    assert table.count("lat p50") == 1  # one table
    assert _rate(table, "A kernel only", "udp") > 0
    assert _rate(table, "A kernel only", "tcp") > 0
    assert _rate(table, "C pmk divert", "udp") > 0
    assert _rate(table, "C pmk divert", "tcp") > 0
    assert _rate(table, "E msgpack-RPC echo", "one") > 0
    assert _rate(table, "E msgpack-RPC echo", "pipelined") > 0
    assert "ratios: C/B tcp" in table
    # Everything it made is gone: its namespaces no longer exist.
    made = re.search(r"namespaces (\S+) (\S+)", out.stderr)
    assert made, out.stderr[-2000:]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert made.group(1) not in listed and made.group(2) not in listed
