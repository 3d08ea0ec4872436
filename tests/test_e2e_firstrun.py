"""The first run, with real packets on both backends (issue 8).

Connections open when pmk starts keep working with no decider (or are asked
about with ``--decide-existing``); the shipped policy keeps inbound SSH
open and blocks the rest; a policy file's rule with a CIDR and a port range
applies and is counted; every decision is one INFO line, and a flood of new
connections is summarised instead of flooding the log.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pmk.server.decision_log import DEFAULT_LINES_BURST
from tests.harness import BACKENDS, Testbed, accept_permanently, eventually, needs_root, netns

pytestmark = [netns, needs_root]


def decision_lines(log: str, fragment: str) -> list[str]:
    """The decision log's lines (logger ``pmk.decisions``) that contain ``fragment``."""
    return [line for line in log.splitlines() if " pmk.decisions: " in line and fragment in line]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_connection_open_before_pmk_starts_keeps_echoing_with_no_decider(backend: str) -> None:
    port = 7401
    async with Testbed(backend, [f"tcp:{port}"], start_pmk=False) as bed:
        ip, client_ip = bed.hosts.server_ip, bed.hosts.client_ip
        opened = await bed.client.tcp_connect(ip, port, id="old")
        assert await bed.client.ping("before pmk", id="old") == {"data": "before pmk"}
        pmk = await bed.start_pmk()
        # No decider: without the snapshot the policy's default (block) would reset it here.
        assert await bed.client.ping("first", id="old") == {"data": "first"}
        first = await pmk.stats()
        for n in range(5):
            assert await bed.client.ping(f"echo {n}", id="old") == {"data": f"echo {n}"}
        stats = await pmk.check_identity()
        assert stats["preaccepted"] == 1  # the peer's side of it; listeners are not connections
        assert stats["blocked"] == stats["defaulted"] == 0
        assert stats["accepted"] == stats["captured"] >= 1
        if backend == "nfqueue":
            # The first packet was settled from the cache and marked: the rest stay in the kernel.
            assert stats["captured"] == first["captured"], (first, stats)
        else:
            assert stats["captured"] > first["captured"]  # divert sees every packet
        where = f"{ip}:{port} <-> {client_ip}:{opened['local_port']}"
        assert decision_lines(pmk.log(), f"open tcp {where} accept permanent by existing at start")
        assert "1 connection(s) open at start are accepted without asking" in pmk.log()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_with_decide_existing_an_open_connection_is_asked_about(backend: str) -> None:
    port = 7402
    async with Testbed(backend, [f"tcp:{port}"], start_pmk=False) as bed:
        ip = bed.hosts.server_ip
        assert (await bed.client.tcp_connect(ip, port, id="a"))["ok"]
        b = await bed.client.tcp_connect(ip, port, id="b")
        pmk = await bed.start_pmk(["--decide-existing"])
        # No decider: the policy's default blocks the first packet pmk sees of it.
        assert await bed.client.ping("to a", id="a") == {"error": "ECONNRESET"}
        decider = await bed.decider(accept_permanently, name="first-run")
        assert await bed.client.ping("to b", id="b") == {"data": "to b"}
        asked = decider.infos_for(remote_port=b["local_port"], local_port=port)
        assert len(asked) == 1 and asked[0]["direction"] == "inbound", decider.infos
        stats = await pmk.check_identity()
        assert stats["preaccepted"] == 0
        assert stats["policy_hits"]["default"] >= 1
        where = f"{bed.hosts.client_ip}:{b['local_port']} -> {ip}:{port}"
        assert decision_lines(pmk.log(), f"inbound tcp {where} accept permanent by decider first-run")
        assert "open at start are asked about like new ones (--decide-existing)" in pmk.log()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_shipped_policy_keeps_ssh_open_and_blocks_the_rest(backend: str) -> None:
    async with Testbed(backend, ["tcp:22", "tcp:7403"]) as bed:
        ip, client_ip = bed.hosts.server_ip, bed.hosts.client_ip
        ssh = await bed.client.tcp_connect(ip, 22, id="ssh")
        assert ssh["ok"]
        assert await bed.client.ping("still reachable", id="ssh") == {"data": "still reachable"}
        other = await bed.client.tcp_connect(ip, 7403, id="other")
        assert other == {"error": "ECONNREFUSED"}
        assert bed.peer.accepts(7403) == []
        stats = await bed.server.check_identity()
        assert stats["policy_hits"]["ssh-in"] == 1  # cached: the connection is decided once
        assert stats["policy_hits"]["default"] >= 1
        assert stats["defaulted"] >= 2
        log = bed.server.log()
        assert decision_lines(
            log, f"inbound tcp {client_ip}:{ssh['local_port']} -> {ip}:22 accept permanent by policy rule ssh-in"
        )
        refused = decision_lines(log, f"-> {ip}:7403 block temporary by policy rule default")
        assert refused and all(line.split(" pmk.decisions: ")[1].startswith("inbound tcp ") for line in refused)


POLICY = """
[[rule]]
name = "lab-clients"
direction = "inbound"
protocol = "tcp"
remote_net = "198.18.0.0/31"
local_port = "7410-7412"
verdict = "accept"
cache = true

[default]
verdict = "block"
"""


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_policy_rule_with_a_cidr_and_a_port_range_applies_and_is_counted(backend: str, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    tmp_path.chmod(0o755)
    async with Testbed(backend, ["tcp:7411", "tcp:7413"], ["--policy", str(policy)]) as bed:
        ip = bed.hosts.server_ip
        assert bed.hosts.client_ip == "198.18.0.1"  # inside the rule's 198.18.0.0/31
        assert (await bed.client.tcp_connect(ip, 7411, id="in-range"))["ok"]
        assert await bed.client.ping("ranged", id="in-range") == {"data": "ranged"}
        assert await bed.client.tcp_connect(ip, 7413, id="outside") == {"error": "ECONNREFUSED"}
        stats = await bed.server.check_identity()
        assert stats["policy_hits"]["lab-clients"] == 1
        assert stats["policy_hits"]["default"] >= 1
        assert decision_lines(bed.server.log(), f"-> {ip}:7411 accept permanent by policy rule lab-clients")


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_flood_of_new_connections_is_summarised_in_the_decision_log(backend: str) -> None:
    port, count = 7420, 300
    async with Testbed(backend, [f"udp:{port}"]) as bed:
        ip = bed.hosts.server_ip
        assert await bed.client.udp_burst(ip, port, count) == {"ok": True, "source_ports": count}
        pmk = bed.server
        await pmk.wait_stats(lambda s: s["policy_hits"]["default"] >= count, f"{count} policy decisions")
        stats = await pmk.check_identity()
        assert stats["policy_hits"]["default"] == count

        def written_and_held_back() -> tuple[int, list[int]]:
            log = pmk.log()
            logged = decision_lines(log, f"-> {ip}:{port} block temporary by policy rule default")
            reports = re.findall(r"pmk\.decisions: (\d+) decision lines suppressed in the last", log)
            return len(logged), [int(n) for n in reports]

        def every_decision_is_written_or_counted() -> bool:
            logged, reports = written_and_held_back()
            return logged + sum(reports) == count

        # The flood is over: what was held back is reported within a second or so, without
        # waiting for another decision or for pmk's exit.
        await eventually(every_decision_is_written_or_counted, "every decision to be logged or counted")
        logged, reports = written_and_held_back()
        assert reports
        assert DEFAULT_LINES_BURST <= logged < count // 2
