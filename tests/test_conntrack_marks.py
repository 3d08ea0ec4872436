"""ConntrackMarks against a real conntrack table, in a throwaway network namespace.

The backend tests cover TCP and UDP connections; this covers what they do
not reach: a key without ports (ICMP), an entry that is gone, other users'
mark bits, and calls after close. The checks run as a script inside the
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
ACCEPT, BLOCK = 0x00100000, 0x00200000
OTHERS_BITS = 0x1  # someone else's mark bit, outside pmk's mask

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
    from pmk.verdicts import ConnKey

    def icmp(dst: str, ident: int) -> dict[str, NFCTAttrTuple]:
        there = NFCTAttrTuple(saddr="198.18.0.1", daddr=dst, proto=1, icmp_id=ident, icmp_type=8, icmp_code=0)
        back = NFCTAttrTuple(saddr=dst, daddr="198.18.0.1", proto=1, icmp_id=ident, icmp_type=0, icmp_code=0)
        return {"tuple_orig": there, "tuple_reply": back}

    with Conntrack() as ct:
        for dst, ident in (("198.18.0.2", 5), ("198.18.0.2", 6), ("198.18.0.3", 7)):
            ct.entry("add", timeout=120, mark=OTHERS_BITS, **icmp(dst, ident))
    out: dict[str, object] = {}
    here, there, other = (socket.inet_aton(a) for a in ("198.18.0.2", "198.18.0.1", "198.18.0.9"))
    marks = ConntrackMarks(MASK, [ACCEPT, BLOCK])
    out["icmp_changed"] = marks.set_mark(ConnKey(1, here, 0, there, 0), BLOCK)
    out["gone_changed"] = marks.set_mark(ConnKey(6, here, 80, other, 4000), BLOCK)
    flow = marks.create_flow(17, there, here, 4000, 53, ACCEPT, 60)
    out["created"] = flow.result()
    out["created_again"] = marks.create_flow(17, there, here, 4000, 53, ACCEPT, 60).result()
    with Conntrack() as ct:
        out["marks"] = sorted([e.tuple_orig.daddr, e.tuple_orig.proto, e.mark] for e in ct.dump_entries())
    out["cleared"] = marks.clear_marks()
    with Conntrack() as ct:
        out["after_clear"] = sorted(e.mark for e in ct.dump_entries())
    marks.close()
    try:
        marks.set_mark(ConnKey(1, here, 0, there, 0), ACCEPT)
    except ConntrackError as error:
        out["after_close"] = str(error)
    print(json.dumps(out))


@pytest.fixture(scope="module")
def hosts() -> Iterator[TwoHosts]:
    with two_hosts() as h:
        yield h


def test_marks_without_ports_gone_entries_and_others_bits(hosts: TwoHosts) -> None:
    out = run_script(hosts, hosts.server, __file__, timeout=60)
    # An ICMP key covers every ICMP flow between its two addresses, and only those.
    assert out["icmp_changed"] == 2
    assert out["gone_changed"] == 0
    assert (out["created"], out["created_again"]) == (True, False)
    assert out["marks"] == [
        ["198.18.0.2", 1, BLOCK | OTHERS_BITS],
        ["198.18.0.2", 1, BLOCK | OTHERS_BITS],
        ["198.18.0.2", 17, ACCEPT],
        ["198.18.0.3", 1, OTHERS_BITS],
    ]
    # Clearing takes pmk's bits only, and leaves the others' bit.
    assert out["cleared"] == 3
    assert out["after_clear"] == [0, OTHERS_BITS, OTHERS_BITS, OTHERS_BITS]
    assert out["after_close"] == "conntrack: pmk is shutting down its kernel fast path"


if __name__ == "__main__" and sys.argv[1:] == ["run"]:
    script_main()
