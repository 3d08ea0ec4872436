"""ConntrackMarks.clear_marks (bulk, ``pmk.capture.ctbulk``) against a real conntrack table.

A few hundred entries carry pmk's three stored values, over both IP
versions, a zone other than the default, and ICMP; one has someone else's
bit besides pmk's, one only someone else's bit, one no mark. Clearing must
take pmk's bits from exactly the first kind, keep every other bit, delete
nothing, and turn a failure into ConntrackError (a closed socket) from
which the next call recovers. The checks run as a script inside a
namespace (this file with ``run``) and print JSON.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator

import pytest

from tests.netns import TwoHosts, need_root_reason, run_script, two_hosts

MASK = 0x00700000
VALUES = (0x00100000, 0x00200000, 0x00300000)  # ACCEPT, BLOCK, DROP
OTHERS_BIT = 0x1  # someone else's, outside pmk's mask
ZONE = 7
PMK_ENTRIES = 300

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        need_root_reason() is not None and not os.environ.get("CI"),
        reason=f"{need_root_reason()}; conntrack tests run in a network namespace",
    ),
]


def script_main() -> None:
    from pyroute2.conntrack import Conntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    from pmk.capture.conntrack import ConntrackError, ConntrackMarks

    def udp(i: int) -> tuple[NFCTAttrTuple, NFCTAttrTuple]:
        if i % 5 == 4:
            src, dst, family = "fd00:18::1", f"fd00:19::{i + 1:x}", 10
        else:
            src, dst, family = "198.18.0.1", f"198.19.{i // 250}.{i % 250 + 1}", 2
        there = NFCTAttrTuple(family, saddr=src, daddr=dst, proto=17, sport=1024 + i, dport=53)
        return there, there.reverse()

    def icmp(ident: int) -> tuple[NFCTAttrTuple, NFCTAttrTuple]:
        there = NFCTAttrTuple(saddr="198.18.0.1", daddr="198.18.0.2", proto=1, icmp_id=ident, icmp_type=8, icmp_code=0)
        back = NFCTAttrTuple(saddr="198.18.0.2", daddr="198.18.0.1", proto=1, icmp_id=ident, icmp_type=0, icmp_code=0)
        return there, back

    def add(tuples: tuple[NFCTAttrTuple, NFCTAttrTuple], mark: int, zone: int = 0) -> None:
        extra = {"zone": zone} if zone else {}
        with Conntrack(nfgen_family=tuples[0].family) as ct:
            ct.entry("add", tuple_orig=tuples[0], tuple_reply=tuples[1], timeout=600, mark=mark, **extra)

    expected: dict[str, int] = {}  # "source port" -> mark after the clear
    for i in range(PMK_ENTRIES):
        add(udp(i), VALUES[i % 3], zone=ZONE if i % 7 == 6 else 0)
        expected[f"{udp(i)[0].saddr} {1024 + i}"] = 0
    for i, before, after in ((0, VALUES[0] | OTHERS_BIT, OTHERS_BIT), (1, OTHERS_BIT, OTHERS_BIT), (2, 0, 0)):
        add(udp(PMK_ENTRIES + i), before)
        expected[f"{udp(PMK_ENTRIES + i)[0].saddr} {1024 + PMK_ENTRIES + i}"] = after
    add(icmp(9), VALUES[1])
    expected["198.18.0.1 0"] = 0

    def table() -> dict[str, int]:
        found = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            with Conntrack(nfgen_family=family) as ct:
                found |= {f"{e.tuple_orig.saddr} {e.tuple_orig.sport or 0}": e.mark for e in ct.dump_entries()}
        return found

    out: dict[str, object] = {"expected": expected, "before": len(table())}
    marks = ConntrackMarks(MASK, VALUES)
    out["cleared"] = marks.clear_marks()
    out["after"] = table()
    out["cleared_again"] = marks.clear_marks()
    # A failure (here its dump socket closed under it) is a ConntrackError; the next call opens fresh sockets.
    add(udp(PMK_ENTRIES + 3), VALUES[2])
    marks._bulk._dump.close()  # type: ignore[union-attr]
    try:
        marks.clear_marks()
    except ConntrackError as error:
        out["error"] = str(error)
    out["recovered"] = marks.clear_marks()
    marks.close()
    print(json.dumps(out))


@pytest.fixture(scope="module")
def hosts() -> Iterator[TwoHosts]:
    with two_hosts() as h:
        yield h


def test_clear_takes_pmks_bits_only_and_deletes_nothing(hosts: TwoHosts) -> None:
    out = run_script(hosts, hosts.server, __file__, timeout=120)
    expected = out["expected"]
    # Every pmk-marked entry (UDP over both versions, zone 7, ICMP), the one with others' bit besides.
    assert out["cleared"] == PMK_ENTRIES + 2
    assert out["before"] == len(expected) == PMK_ENTRIES + 4
    assert out["after"] == expected  # nothing deleted, others' bits kept, pmk's gone
    assert out["cleared_again"] == 0
    assert out["error"] == "conntrack: clearing pmk's marks: Bad file descriptor"
    assert out["recovered"] == 1


if __name__ == "__main__" and sys.argv[1:] == ["run"]:
    script_main()
