"""Issue 2 end to end: accept, block and drop with real packets, on both backends.

pmk serves in the server namespace (scoped to the test's ports), a scripted
decider answers over the socket, and traffic comes from the client namespace.
See ``tests/harness.py`` for the pieces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.harness import BACKENDS, QUIET, Decision, Testbed, needs_root, netns, payload_digest

pytestmark = [netns, needs_root, pytest.mark.parametrize("backend", BACKENDS)]


def _verdict(verdict: str, permanent: bool = True) -> Callable[[dict[str, Any]], Decision]:
    return lambda info: Decision(verdict, permanent=permanent)


async def test_accepted_tcp_and_udp_arrive(backend: str) -> None:
    async with Testbed(backend, ["tcp:7101", "udp:7102"]) as bed:
        decider = await bed.decider(_verdict("accept"))
        hosts = bed.hosts
        for family, server_ip, client_ip in (
            (4, hosts.server_ip, hosts.client_ip),
            (6, hosts.server_ip6, hosts.client_ip6),
        ):
            size = 256 * 1024
            result = await bed.client.transfer(server_ip, 7101, size, seed=f"v{family}")
            assert result.get("error") is None, result
            assert result["received"] == size
            assert result["sha256"] == payload_digest(size, seed=f"v{family}")
            [info] = decider.infos_for(protocol=6, remote_port=result["local_port"])
            assert info["direction"] == "inbound"
            assert info["ip_version"] == family
            assert (info["local_ip"], info["local_port"], info["remote_ip"]) == (server_ip, 7101, client_ip)

            sock = f"udp{family}"
            opened = await bed.client.udp_open(server_ip, 7102, id=sock)
            for n in range(3):
                assert await bed.client.ping(f"datagram {n} over IPv{family}", id=sock) == {
                    "data": f"datagram {n} over IPv{family}"
                }
            [info] = decider.infos_for(protocol=17, remote_port=opened["local_port"])
            assert (info["ip_version"], info["local_port"], info["remote_ip"]) == (family, 7102, client_ip)
        # What arrived at the listener is exactly what was sent.
        assert bed.peer.udp(7102) == [f"datagram {n} over IPv{f}" for f in (4, 6) for n in range(3)]
        stats = await bed.server.check_identity()
        assert stats["accepted"] == stats["captured"] > 0
        assert stats["blocked"] == stats["dropped"] == stats["defaulted"] == 0
        if backend == "divert":
            # The transfers' GSO aggregates went back with the kernel filling their checksums
            # (divert_checksums), and every byte arrived intact (the digests above).
            assert stats["offloaded_checksums"] > 0, stats


async def test_blocked_tcp_is_reset_and_blocked_udp_draws_unreachable(backend: str) -> None:
    async with Testbed(backend, ["tcp:7111", "udp:7112"]) as bed:
        decider = await bed.decider(_verdict("block"))
        hosts = bed.hosts
        for server_ip in (hosts.server_ip, hosts.server_ip6):
            assert await bed.client.tcp_connect(server_ip, 7111) == {"error": "ECONNREFUSED"}
            await bed.client.udp_open(server_ip, 7112, id=server_ip)
            assert await bed.client.ping("let me in", id=server_ip) == {"error": "ECONNREFUSED"}
        assert bed.peer.events == []
        assert len(decider.infos) == 4
        stats = await bed.server.check_identity()
        assert stats["blocked"] >= 4
        assert stats["accepted"] == 0


async def test_temporary_block_rejects_each_packet(backend: str) -> None:
    async with Testbed(backend, ["udp:7116"]) as bed:
        decider = await bed.decider(_verdict("block", permanent=False))
        opened = await bed.client.udp_open(bed.hosts.server_ip, 7116, id="u")
        for _ in range(2):
            assert await bed.client.ping("no", id="u") == {"error": "ECONNREFUSED"}
        # Not cached: each datagram was asked about.
        assert len(decider.infos_for(remote_port=opened["local_port"])) == 2
        assert bed.peer.events == []


async def test_dropped_packets_vanish(backend: str) -> None:
    async with Testbed(backend, ["tcp:7121", "udp:7122"]) as bed:
        decider = await bed.decider(_verdict("drop"))
        hosts = bed.hosts
        assert await bed.client.tcp_connect(hosts.server_ip, 7121, timeout=QUIET) == {"error": "timeout"}
        for server_ip in (hosts.server_ip, hosts.server_ip6):
            await bed.client.udp_open(server_ip, 7122, id=server_ip)
            assert await bed.client.ping("gone", id=server_ip, timeout=QUIET) == {"error": "timeout"}
        assert bed.peer.events == []
        # One connection each: the UDP flows were asked about once, and any
        # retried SYN belongs to the one TCP connection.
        assert len({(i["protocol"], i["remote_port"]) for i in decider.infos}) == 3
        assert len(decider.infos_for(protocol=17)) == 2
        stats = await bed.server.check_identity()
        assert stats["dropped"] >= 3
        assert stats["accepted"] == stats["blocked"] == 0


async def test_outbound_connections_are_decided_too(backend: str) -> None:
    # pmk's own host connects out: the first packets are outbound, and a
    # block has to reach the local socket (an injected inbound reply on divert).
    async with Testbed(backend, ["tcp:7125", "tcp:7126", "udp:7127"]) as bed:
        decider = await bed.decider(
            lambda info: Decision("accept" if info["remote_port"] == 7125 else "block", permanent=True)
        )
        hosts = bed.hosts
        remote = await bed.listen(hosts.client, ["tcp:7125", "tcp:7126", "udp:7127"])
        local = await bed.session(hosts.server)
        result = await local.transfer(hosts.client_ip6, 7125, 100_000)
        assert result["sha256"] == payload_digest(100_000), result
        [info] = decider.infos_for(remote_port=7125)
        assert info["direction"] == "outbound"
        assert (info["local_ip"], info["local_port"], info["remote_ip"]) == (
            hosts.server_ip6,
            result["local_port"],
            hosts.client_ip6,
        )
        assert await local.tcp_connect(hosts.client_ip, 7126) == {"error": "ECONNREFUSED"}
        await local.udp_open(hosts.client_ip, 7127, id="u")
        assert await local.ping("out", id="u") == {"error": "ECONNREFUSED"}
        assert remote.accepts(7126) == [] and remote.udp(7127) == []
        assert len(remote.accepts(7125)) == 1
