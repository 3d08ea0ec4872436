"""Kernel NAT for reroutes: the generated rules, the slot table, and real packets in namespaces.

The namespace test installs pmk's filter chains and the NAT chains in the
client namespace and decides with a tiny NFQUEUE reader (this file run as a
script) that reroutes the first packet of each connection the way the
nfqueue backend will: a permanent accept plus the target's slot bits.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
from pathlib import Path

import pytest

from pmk.capture import netfilter_rules as rules
from pmk.capture.nat_rules import (
    DEFAULT_TARGET_MASK,
    FIRST_PACKET,
    SlotTable,
    build_nat_restore,
    build_slot_update,
    is_first_packet,
    slot_count,
)
from pmk.packet.parse import parse_flow
from pmk.verdicts import Target
from tests.netns import TwoHosts, need_root_reason, two_hosts
from tests.reroute_app import run_app

REPO = Path(__file__).resolve().parent.parent
QUEUE = 9
NS4, NS6 = Target.parse("127.0.0.1:5353"), Target.parse("[::1]:5353")
PROXY = Target.parse("127.0.0.1:8080")


def test_first_packets_in_scope_are_queued_from_mangle_and_marked() -> None:
    script = build_nat_restore(3, rules.parse_match("tcp:80,udp:53,icmp"), [NS4], owner_pid=42)
    mangle, nat = script.split("*nat")
    assert '-I OUTPUT 1 -m comment --comment "pmk pid 42" -j PMK-NAT-Q' in mangle
    assert "-A PMK-NAT-Q -m conntrack ! --ctstate NEW -j RETURN" in mangle
    assert "-A PMK-NAT-Q -m conntrack --ctstatus CONFIRMED -j RETURN" in mangle
    assert "-A PMK-NAT-Q -p tcp -m multiport --ports 80 -j PMK-NAT-FIRST" in mangle
    assert "-A PMK-NAT-Q -p udp -m multiport --ports 53 -j PMK-NAT-FIRST" in mangle
    assert "icmp" not in mangle  # only TCP and UDP can be rerouted
    assert f"-j MARK --set-xmark {rules.mark_value(FIRST_PACKET):#x}/0x700000" in mangle
    assert mangle.index("--ctstate NEW") < mangle.index("-j PMK-NAT-FIRST")
    assert "-A PMK-NAT -p udp -m mark --mark 0x1000000/0xf000000 -j DNAT --to-destination 127.0.0.1:5353" in nat
    assert '-I OUTPUT 1 -m comment --comment "pmk pid 42" -j PMK-NAT' in nat


def test_fail_open_and_ipv6_targets() -> None:
    script = build_nat_restore(0, rules.parse_match(None), [None, NS6], fail_open=True)
    assert "-j NFQUEUE --queue-num 0 --queue-bypass" in script
    assert "-A PMK-NAT-Q -p tcp -j PMK-NAT-FIRST" in script and "-A PMK-NAT-Q -p udp -j PMK-NAT-FIRST" in script
    assert "-p tcp -m mark --mark 0x1000000/0xf000000 -j RETURN" in script  # an empty slot keeps its place
    assert "--mark 0x2000000/0xf000000 -j DNAT --to-destination [::1]:5353" in script


def test_slot_update_replaces_the_slots_two_rules_in_place() -> None:
    lines = build_slot_update(3, PROXY).splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    assert lines[1] == "-R PMK-NAT 5 -p tcp -m mark --mark 0x3000000/0xf000000 -j DNAT --to-destination 127.0.0.1:8080"
    assert lines[2].startswith("-R PMK-NAT 6 -p udp ")


def test_masks_must_not_overlap_and_slots_must_fit() -> None:
    with pytest.raises(ValueError, match="overlaps"):
        build_nat_restore(0, rules.parse_match(None), [], target_mask=0x00F00000)
    with pytest.raises(ValueError, match="do not fit"):
        build_nat_restore(0, rules.parse_match(None), [None] * 4, target_mask=0x03000000)
    assert slot_count(DEFAULT_TARGET_MASK) == 15 and slot_count(0x03000000) == 3


def test_first_packet_mark_is_recognised_among_other_bits() -> None:
    first = rules.mark_value(FIRST_PACKET)
    assert is_first_packet(first | 0x1234)
    assert not is_first_packet(rules.mark_value(rules.MarkCode.ACCEPT))
    assert not is_first_packet(0)


def test_slot_table_pins_fixed_targets_and_reuses_the_least_recently_used() -> None:
    table = SlotTable(3, [NS4])
    a, b, c = (Target(bytes([10, 0, 0, n]), 80) for n in (1, 2, 3))
    assert table.lookup(NS4) == 1
    assert (table.assign(a), table.assign(b)) == (2, 3)
    assert table.assign(a) == 2  # already there
    table.lookup(a)  # b is now the least recently used
    assert table.assign(c) == 3
    assert table.lookup(b) is None and table.slots == [NS4, a, c]
    table.release(c)
    assert table.slots == [NS4, a, None] and table.assign(b) == 3
    with pytest.raises(ValueError, match="every slot"):
        SlotTable(1, [NS4]).assign(a)
    with pytest.raises(ValueError, match="more fixed targets"):
        SlotTable(1, [NS4, PROXY])


# ----------------------------------------------------------------------------
# Real packets


def _decider() -> None:
    """Script mode: reroute each first packet per the JSON map "port" -> slot bits; report on stdin EOF."""
    from netfilterqueue import NetfilterQueue

    from pmk.capture.nat_rules import NatRuleSet

    plan = json.loads(sys.argv[1])
    nat = NatRuleSet(QUEUE, plan["match"], pinned=[NS4, NS6])
    filters = rules.RuleSet(QUEUE, plan["match"])
    seen: list[dict[str, object]] = []
    accept = rules.mark_value(rules.MarkCode.ACCEPT)

    def on_packet(pkt: object) -> None:
        raw = pkt.get_payload()  # type: ignore[attr-defined]
        mark = pkt.get_mark()  # type: ignore[attr-defined]
        flow = parse_flow(raw)
        assert flow is not None
        slot_bits = 0
        if is_first_packet(mark):
            target = plan["targets"].get(str(flow.dst_port))
            if target is not None:
                parsed = (NS4 if flow.ip_version == 4 else NS6) if target == "nameserver" else Target.parse(target)
                slot_bits = nat.mark_for(parsed) or nat.add_target(parsed)
        seen.append({"port": flow.dst_port, "first": is_first_packet(mark), "slot": slot_bits})
        pkt.set_mark((mark & ~(rules.DEFAULT_MARK_MASK | DEFAULT_TARGET_MASK)) | accept | slot_bits)  # type: ignore[attr-defined]
        pkt.repeat()  # type: ignore[attr-defined]

    queue = NetfilterQueue()
    queue.bind(QUEUE, on_packet)
    filters.install()
    nat.install()
    try:
        sel = selectors.DefaultSelector()
        sel.register(queue.get_fd(), selectors.EVENT_READ)
        sel.register(sys.stdin, selectors.EVENT_READ)
        print("ready", flush=True)
        while True:
            events = sel.select()
            if any(key.fileobj is sys.stdin for key, _ in events):
                break
            queue.run(block=False)
        print(json.dumps(seen), flush=True)
    finally:
        nat.remove()
        filters.remove()
        queue.unbind()


def _script(hosts: TwoHosts, *args: str) -> list[str]:
    return hosts.exec_argv(hosts.client, "env", f"PYTHONPATH={REPO}", sys.executable, __file__, *args)


@pytest.mark.netns
@pytest.mark.skipif(need_root_reason() is not None and not os.environ.get("CI"), reason=f"{need_root_reason()}")
def test_rerouted_connections_reach_local_services_and_see_their_peer() -> None:
    from pmk.capture.nfqueue import nfqueue_available

    reason = nfqueue_available()
    if reason is not None and not os.environ.get("CI"):
        pytest.skip(f"NFQUEUE unavailable: {reason}")
    # UDP 53 goes to the pinned nameserver of its IP version; TCP 80 to a proxy installed on demand.
    plan = {"match": "udp:53,tcp:80", "targets": {"53": "nameserver", "80": str(PROXY)}}
    with two_hosts() as hosts:
        decider = subprocess.Popen(
            _script(hosts, json.dumps(plan)), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            assert decider.stdout is not None and decider.stdout.readline().strip() == "ready"
            app = run_app(hosts)
            assert app.returncode == 0, app.stderr
            seen = json.loads(decider.communicate("", timeout=30)[0])
        finally:
            if decider.poll() is None:
                decider.kill()
        view = json.loads(app.stdout)
        after = hosts.sh(hosts.client, "iptables-save").stdout + hosts.sh(hosts.client, "ip6tables-save").stdout
    assert view["udp4"] == [[f"answer:q{i}", "198.18.0.2", 53] for i in range(3)]
    assert view["udp6"] == [[f"answer:q{i}", "fd00:18::2", 53] for i in range(3)]
    assert view["tcp_peer"] == ["198.18.0.2", 80] and view["tcp_ok"]
    # One first packet per connection reached user space (two UDP flows, one TCP), nothing after it.
    assert sorted((s["port"], s["first"]) for s in seen) == [(53, True), (53, True), (80, True)]
    assert all(s["slot"] for s in seen)
    assert "PMK" not in after


if __name__ == "__main__":
    _decider()
