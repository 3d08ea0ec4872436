"""Issue 2 end to end: the verdict cache, temporary verdicts, update_verdict and clear_cache.

On divert every packet still reaches pmk and cached ones count as cache
hits; on nfqueue a decided connection stays in the kernel and never reaches
pmk at all. Both must send no new ``decide`` for a decided connection.
"""

from __future__ import annotations

import pytest

from tests.harness import BACKENDS, Decision, Testbed, needs_root, netns

pytestmark = [netns, needs_root, pytest.mark.parametrize("backend", BACKENDS)]

PINGS = 5


def _conn(info: dict) -> dict:
    """The update_verdict connection map of a decide info."""
    return {k: info[k] for k in ("protocol", "local_ip", "local_port", "remote_ip", "remote_port")}


async def test_permanent_verdict_makes_later_packets_cache_hits(backend: str) -> None:
    async with Testbed(backend, ["tcp:7131", "udp:7132"]) as bed:
        decider = await bed.decider(lambda info: Decision("accept", permanent=True))
        connected = await bed.client.tcp_connect(bed.hosts.server_ip, 7131, id="t")
        opened = await bed.client.udp_open(bed.hosts.server_ip, 7132, id="u")
        assert connected["ok"] and opened["ok"]
        assert await bed.client.ping("first", id="u") == {"data": "first"}
        before = await bed.server.check_identity()
        for n in range(PINGS):
            assert await bed.client.ping(f"tcp {n}", id="t") == {"data": f"tcp {n}"}
            assert await bed.client.ping(f"udp {n}", id="u") == {"data": f"udp {n}"}
        after = await bed.server.check_identity()
        # One decide per connection, none for the later packets.
        assert len(decider.infos_for(remote_port=connected["local_port"])) == 1
        assert len(decider.infos_for(remote_port=opened["local_port"])) == 1
        assert len(decider.infos) == 2
        gained = {k: after[k] - before[k] for k in ("captured", "cache_hits", "cache_misses", "requests")}
        print(f"\n{backend}: {2 * PINGS} pings after the verdict: {gained}")
        assert gained["cache_misses"] == gained["requests"] == 0
        if backend == "divert":
            # Every ping and its echo passed through pmk, answered from the cache.
            assert gained["cache_hits"] >= 4 * PINGS
            assert gained["captured"] == gained["cache_hits"]
        else:
            # The kernel kept them: pmk never saw them.
            assert gained["captured"] == gained["cache_hits"] == 0


async def test_temporary_verdict_asks_again_for_the_next_packet(backend: str) -> None:
    async with Testbed(backend, ["tcp:7141", "udp:7142"]) as bed:
        decider = await bed.decider(lambda info: Decision("accept", permanent=False))
        opened = await bed.client.udp_open(bed.hosts.server_ip, 7142, id="u")
        flow = {"protocol": 17, "remote_port": opened["local_port"]}
        for n in range(1, 4):
            assert await bed.client.ping(f"udp {n}", id="u") == {"data": f"udp {n}"}
            # Each datagram in and each echo out was asked about on its own.
            assert len(decider.infos_for(direction="inbound", **flow)) == n
            assert len(decider.infos_for(direction="outbound", **flow)) == n
        outbound = decider.infos_for(direction="outbound", **flow)[0]
        assert (outbound["local_port"], outbound["remote_ip"]) == (7142, bed.hosts.client_ip)

        connected = await bed.client.tcp_connect(bed.hosts.server_ip, 7141, id="t")
        asked = len(decider.infos_for(remote_port=connected["local_port"]))
        assert asked >= 2  # at least the SYN and the SYN-ACK
        assert await bed.client.ping("tcp", id="t") == {"data": "tcp"}
        assert len(decider.infos_for(remote_port=connected["local_port"])) > asked
        stats = await bed.server.check_identity()
        assert stats["verdict_cache_entries"] == 0
        assert stats["requests"] == stats["cache_misses"] == len(decider.infos)


async def test_update_verdict_cuts_a_live_connection(backend: str) -> None:
    async with Testbed(backend, ["tcp:7151"]) as bed:
        decider = await bed.decider(lambda info: Decision("accept", permanent=True))
        connected = await bed.client.tcp_connect(bed.hosts.server_ip, 7151, id="t")
        assert await bed.client.ping("before", id="t") == {"data": "before"}
        [info] = decider.infos_for(remote_port=connected["local_port"])
        assert await bed.server.call("update_verdict", _conn(info), "block") is True
        assert await bed.client.ping("after", id="t") == {"error": "ECONNRESET"}
        assert len(decider.infos) == 1
        stats = await bed.server.check_identity()
        if backend == "divert":
            assert stats["blocked"] >= 1


async def test_clear_cache_makes_the_next_packet_be_asked_again(backend: str) -> None:
    async with Testbed(backend, ["tcp:7161"]) as bed:
        decider = await bed.decider(lambda info: Decision("accept", permanent=True))
        connected = await bed.client.tcp_connect(bed.hosts.server_ip, 7161, id="t")
        mine = {"remote_port": connected["local_port"]}
        assert await bed.client.ping("cached", id="t") == {"data": "cached"}
        assert len(decider.infos_for(**mine)) == 1
        assert await bed.server.call("clear_cache") == 1
        assert await bed.client.ping("asked again", id="t") == {"data": "asked again"}
        assert len(decider.infos_for(**mine)) == 2
        again = decider.infos_for(**mine)[1]
        assert (again["local_port"], again["remote_ip"]) == (7161, bed.hosts.client_ip)
        # Answered permanently again: cached from here on.
        assert await bed.client.ping("cached again", id="t") == {"data": "cached again"}
        assert len(decider.infos_for(**mine)) == 2
        assert await bed.server.call("clear_cache") == 1
