"""Issue 3 end to end: the kernel fast path, as ``pmk serve --capture nfqueue`` runs it.

Decided connections stay in the kernel, nothing passes while no pmk reads
the queue, and a crashed pmk's rules are cleaned up by the next start.
"""

from __future__ import annotations

import re

from tests.harness import QUIET, Decision, Testbed, needs_root, netns, payload_digest, pmk_rules

pytestmark = [netns, needs_root]

BULK = 20 * 1024 * 1024


async def test_long_transfer_after_permanent_accept_reaches_python_once() -> None:
    async with Testbed("nfqueue", ["tcp:7211"]) as bed:
        decider = await bed.decider(lambda info: Decision("accept", permanent=True))
        result = await bed.client.transfer(bed.hosts.server_ip, 7211, BULK, timeout=120)
        assert result.get("error") is None, result
        assert (result["received"], result["sha256"]) == (BULK, payload_digest(BULK))
        stats = await bed.server.check_identity()
        print(f"\n{BULK} bytes each way after a permanent accept: {stats['captured']} packet(s) reached pmk")
        assert len(decider.infos) == 1
        assert 1 <= stats["captured"] <= 3
        assert stats["accepted"] == stats["captured"]


async def test_crashed_pmk_fails_closed_and_the_next_start_cleans_up() -> None:
    async with Testbed("nfqueue", ["tcp:7215", "udp:7216"]) as bed:
        ip = bed.hosts.server_ip
        await bed.decider(lambda info: Decision("accept", permanent=True), name="first")
        assert (await bed.client.tcp_connect(ip, 7215, id="before"))["ok"]
        crashed = bed.server
        await crashed.kill()

        # Nothing reads the queue, the rules stay: new connections go nowhere.
        left = pmk_rules(bed.hosts)
        assert any(f"pmk pid {crashed.pid}" in line for line in left), left
        assert await bed.client.tcp_connect(ip, 7215, id="t", timeout=QUIET) == {"error": "timeout"}
        await bed.client.udp_open(ip, 7216, id="u")
        assert await bed.client.ping("anyone?", id="u", timeout=QUIET) == {"error": "timeout"}
        assert len(bed.peer.accepts(7215)) == 1 and bed.peer.udp(7216) == []

        restarted = await bed.start_pmk()
        rules = pmk_rules(bed.hosts)
        owners = {int(pid) for pid in re.findall(r"pmk pid (\d+)", "\n".join(rules))}
        assert owners == {restarted.pid}, rules
        # One jump per hook and family: the stale ones went, none doubled.
        assert len([line for line in rules if line.split()[1:3] == ["-A", "INPUT"]]) == 2, rules
        await bed.decider(lambda info: Decision("accept", permanent=True), name="second")
        assert (await bed.client.tcp_connect(ip, 7215, id="after"))["ok"]
        assert await bed.client.ping("back", id="after") == {"data": "back"}
        # The testbed's exit stops this pmk and checks that no rule is left.


async def test_flushed_rules_come_back_and_are_counted() -> None:
    async with Testbed("nfqueue", ["tcp:7217"]) as bed:
        ip = bed.hosts.server_ip
        decider = await bed.decider(lambda info: Decision("block", permanent=True))
        installed = sorted(pmk_rules(bed.hosts))
        for tool in ("iptables", "ip6tables"):
            bed.hosts.sh(bed.hosts.server, tool, "-w", "-F")
        assert not any("-j PMK-IN" in line for line in pmk_rules(bed.hosts))

        stats = await bed.server.wait_stats(lambda s: s["rules_restored"] == 2, "both families' rules restored")
        assert stats["rules_check_errors"] == 0
        assert sorted(pmk_rules(bed.hosts)) == installed
        assert "putting them back" in bed.server.log()
        # Decided by pmk again: the decider is asked and its block holds.
        assert await bed.client.tcp_connect(ip, 7217, id="after", timeout=QUIET) == {"error": "ECONNREFUSED"}
        assert len(decider.infos) == 1


def nat_rules(bed: Testbed) -> list[str]:
    """pmk's chains and jumps in the server namespace's ``mangle`` and ``nat`` tables, both families."""
    lines = []
    for tool in ("iptables", "ip6tables"):
        for table in ("mangle", "nat"):
            out = bed.hosts.sh(bed.hosts.server, tool, "-w", "-t", table, "-S").stdout
            lines += [f"{tool} {table} {line}" for line in out.splitlines() if "PMK" in line]
    return sorted(lines)


async def test_a_flushed_nat_table_comes_back_so_reroutes_keep_their_target() -> None:
    """A firewall reload flushes ``nat``: a first packet marked for a reroute would then leave, un-NATed,
    for the address its application asked for. The rules watchdog puts pmk's NAT chains back."""
    nameserver = 7353
    async with Testbed("nfqueue", ["udp:7218"], start_pmk=False) as bed:
        hosts = bed.hosts
        await bed.start_pmk(["--nameserver", f"{hosts.server_ip}:{nameserver}"])
        await bed.decider(lambda info: Decision("reroute_to_nameserver"))
        target = await bed.listen(hosts.server, [f"udp:{nameserver}"])
        far = await bed.listen(hosts.client, ["udp:7218"])
        app = await bed.session(hosts.server)
        assert await app.udp_query(hosts.client_ip, 7218, "before") == {
            "data": "before",
            "from": [hosts.client_ip, 7218],
        }
        installed = nat_rules(bed)
        for tool in ("iptables", "ip6tables"):
            bed.hosts.sh(hosts.server, tool, "-w", "-t", "nat", "-F")
        assert not any(" nat -A OUTPUT " in line for line in nat_rules(bed))

        stats = await bed.server.wait_stats(lambda s: s["rules_restored"] == 2, "both families' NAT rules restored")
        assert stats["rules_check_errors"] == 0
        assert nat_rules(bed) == installed
        assert await app.udp_query(hosts.client_ip, 7218, "after") == {"data": "after", "from": [hosts.client_ip, 7218]}
        assert target.udp(nameserver) == ["before", "after"] and far.udp(7218) == []
