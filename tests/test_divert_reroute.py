"""Reroutes on eBPFDivert with real packets: rewrite, re-inject on loopback, rewrite the replies back.

A small harness (this file run as a script, in the client namespace) diverts
outbound DNS and port-80 traffic plus the targets' loopback replies and
carries out the reroute with ``pmk.capture.divert_reroute`` the way the
divert backend does; the application, in the same namespace, must see only
the peers it addressed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pmk.capture.divert_reroute import checksum_partial, loopback_inbound, reply_filter
from pmk.verdicts import Target
from tests.netns import TwoHosts, need_root_reason, two_hosts
from tests.reroute_app import run_app

REPO = Path(__file__).resolve().parent.parent
NS4, NS6 = Target.parse("127.0.0.1:5353"), Target.parse("[::1]:5353")
PROXY = Target.parse("127.0.0.1:8080")
OUTBOUND = "(outbound and not loopback and (udp.DstPort == 53 or tcp.DstPort == 80))"


def test_reply_filter_names_each_target_once() -> None:
    text = reply_filter([NS4, NS6, NS4])
    assert text == (
        "(loopback and ((ip.SrcAddr == 127.0.0.1 and (tcp.SrcPort == 5353 or udp.SrcPort == 5353))"
        " or (ipv6.SrcAddr == ::1 and (tcp.SrcPort == 5353 or udp.SrcPort == 5353))))"
    )
    assert reply_filter([]) == "false"


def test_records_for_loopback_injection_and_partial_checksums() -> None:
    record = bytearray(80)
    record[10] = 0x02 | 0x20  # outbound, IPv4 checksum valid, TCP/UDP checksums partial
    record[16:20] = (68).to_bytes(4, "little")
    injected = loopback_inbound(bytes(record), 1)
    assert injected[10] == 0x04 | 0x20 and injected[16:20] == (1).to_bytes(4, "little")
    assert injected[:10] == bytes(record[:10]) and injected[20:] == bytes(record[20:])
    assert checksum_partial(bytes(record), 17) and checksum_partial(bytes(record), 6)
    record[10] |= 0x80
    assert not checksum_partial(bytes(record), 17) and checksum_partial(bytes(record), 6)
    assert not checksum_partial(injected, 6)  # inbound: the checksum is whole


def _harness() -> None:
    """Script mode: divert and reroute until stdin closes, then print the counts."""
    import threading
    import time

    import pydivert
    from pydivert.windivert_dll.structs import WinDivertAddress

    from pmk.capture.divert_reroute import Rerouter
    from pmk.packet.parse import parse_flow

    rerouter = Rerouter()
    divert = pydivert.Divert(f"{OUTBOUND} or {reply_filter([NS4, NS6, PROXY])}")
    divert.open()
    counts = {"outbound": 0, "replies": 0, "other": 0}

    def run() -> None:
        while True:
            try:
                packet = divert.recv()
            except OSError:
                return
            raw, record = bytes(packet.raw), bytes(packet.wd_addr)
            flow = parse_flow(raw)
            assert flow is not None
            if packet.wd_addr.Outbound and not packet.wd_addr.Loopback:
                target = PROXY if flow.dst_port == 80 else NS4 if flow.ip_version == 4 else NS6
                raw, record = rerouter.outbound(raw, record, flow.key(True), target, time.monotonic())
                counts["outbound"] += 1
            else:
                reply = rerouter.inbound(raw, record, time.monotonic())
                if reply is not None:
                    raw = reply[0]
                counts["replies" if reply is not None else "other"] += 1
            out = pydivert.Packet(memoryview(bytearray(raw)), wd_addr=WinDivertAddress.from_buffer_copy(record))
            divert.send(out, recalculate_checksum=False)

    threading.Thread(target=run, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
    print(json.dumps(counts | {"left": len(rerouter.table)}), flush=True)
    divert.close()


def _script(hosts: TwoHosts, mode: str) -> list[str]:
    return hosts.exec_argv(hosts.client, "env", f"PYTHONPATH={REPO}", sys.executable, __file__, mode)


@pytest.mark.netns
@pytest.mark.skipif(need_root_reason() is not None and not os.environ.get("CI"), reason=f"{need_root_reason()}")
def test_rerouted_connections_reach_local_services_and_see_their_peer() -> None:
    with two_hosts() as hosts:
        harness = subprocess.Popen(_script(hosts, "harness"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert harness.stdout is not None and harness.stdout.readline().strip() == "ready"
            app = run_app(hosts)
            counts = json.loads(harness.communicate("", timeout=30)[0])
        finally:
            if harness.poll() is None:
                harness.kill()
    assert app.returncode == 0, app.stderr
    view = json.loads(app.stdout)
    assert view["udp4"] == [[f"answer:q{i}", "198.18.0.2", 53] for i in range(3)]
    assert view["udp6"] == [[f"answer:q{i}", "fd00:18::2", 53] for i in range(3)]
    assert view["tcp_peer"] == ["198.18.0.2", 80] and view["tcp_ok"]
    # On divert every packet passes through pmk, both ways.
    assert counts["outbound"] >= 6 + 3 and counts["replies"] >= 6 + 2 and counts["other"] == 0


if __name__ == "__main__":
    {"harness": _harness}[sys.argv[1]]()
