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


def test_bench_scale_row_quick() -> None:
    """Row S with 1,000 live connections on both backends: filled, measured, operator calls timed."""
    with open("/proc/sys/net/netfilter/nf_conntrack_max") as f:
        conntrack_max = f.read()
    argv = ["bench", "--quick", "--rows", "S", "--scale-sizes", "1000", "--scale-rate", "3000"]
    out = subprocess.run(
        [sys.executable, "-m", "pmk", *argv],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    table = out.stdout
    for backend in ("divert", "nfqueue"):
        assert f"row S, pmk {backend}" in table, table
        section = table.split(f"row S, pmk {backend}")[1]
        size_row = next(line for line in section.splitlines() if line.split()[:1] == ["1,000"])
        held, cached_pps = size_row.split()[1], size_row.split()[3]
        assert held == "1,000", size_row  # every filled connection is held
        assert float(cached_pps.replace(",", "")) > 0, size_row
        assert "operator calls with 1,000 held" in section, section
    assert "update_verdict x5: max" in table.split("row S, pmk nfqueue")[0]
    with open("/proc/sys/net/netfilter/nf_conntrack_max") as f:
        assert f.read() == conntrack_max  # left as it was
