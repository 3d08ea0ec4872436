"""Issue 10 item 2 end to end: reroutes and redirects with real packets through ``pmk serve``, both backends.

pmk runs in the server namespace, so the application whose connections are
rerouted runs there too (a session in ``hosts.server``); the peers it
addresses are in the client namespace, where nothing may arrive. The
targets (a resolver, a tunnel entry, a proxy) are echo listeners in the
server namespace: what reaches them is recorded, and an answer proves it
came back as from the addressed peer (the session's ``udp_query`` reports
the answer's source; a TCP socket's peer is fixed). The UDP targets are the
namespace's own address: the echo listener's socket is bound to every
address and answers from the address the route to the application picks,
which a target on 127.0.0.1 would not be (a real resolver binds its address).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.harness import BACKENDS, QUIET, Decision, Testbed, eventually, needs_root, netns, payload_digest

pytestmark = [netns, needs_root, pytest.mark.parametrize("backend", BACKENDS)]

NAMESERVER, TUNNEL, PROXY = 7353, 7354, 7355
#: The capture scope: the ports the application addresses (nothing listens there in the client namespace).
PORTS = ["udp:7301", "udp:7302", "tcp:7303", "udp:7304"]


ACCEPT = Decision("accept", permanent=True)


def by_port(verdicts: dict[int, Decision], other: Decision = ACCEPT) -> Callable[[dict[str, Any]], Decision]:
    return lambda info: verdicts.get(info["remote_port"], other)


async def test_dns_goes_to_the_local_resolver_and_the_answer_comes_from_the_peer(backend: str) -> None:
    async with Testbed(backend, PORTS, start_pmk=False) as bed:
        hosts = bed.hosts
        await bed.start_pmk(
            [
                *("--nameserver", f"{hosts.server_ip}:{NAMESERVER}"),
                *("--nameserver", f"[{hosts.server_ip6}]:{NAMESERVER}"),
                *("--tunnel", f"{hosts.server_ip}:{TUNNEL}"),
            ]
        )
        decider = await bed.decider(
            by_port({7301: Decision("reroute_to_nameserver"), 7302: Decision("reroute_to_tunnel")}, Decision("block"))
        )
        targets = await bed.listen(hosts.server, [f"udp:{NAMESERVER}", f"udp:{TUNNEL}"])
        far = await bed.listen(hosts.client, ["udp:7301", "udp:7302"])
        app = await bed.session(hosts.server)
        # A program asking the resolver itself is none of pmk's business (its replies are not decided).
        direct = await app.udp_query(hosts.server_ip, NAMESERVER, "direct")
        assert direct == {"data": "direct", "from": [hosts.server_ip, NAMESERVER]}
        for n in range(2):
            answer = await app.udp_query(hosts.client_ip, 7301, f"query {n}")
            assert answer == {"data": f"query {n}", "from": [hosts.client_ip, 7301]}
        answer = await app.udp_query(hosts.client_ip6, 7301, "query 6")
        assert answer == {"data": "query 6", "from": [hosts.client_ip6, 7301]}
        answer = await app.udp_query(hosts.client_ip, 7302, "through the tunnel")
        assert answer == {"data": "through the tunnel", "from": [hosts.client_ip, 7302]}
        assert targets.udp(NAMESERVER) == ["direct", "query 0", "query 1", "query 6"]
        assert targets.udp(TUNNEL) == ["through the tunnel"]
        assert far.udp(7301) == far.udp(7302) == []
        assert [i["direction"] for i in decider.infos] == ["outbound"] * 4
        assert decider.protocol_errors == []
        stats = await bed.server.check_identity()
        # Each query and its answer: every captured packet was rerouted.
        assert stats["rerouted"] == stats["captured"] >= 4
        assert stats["accepted"] == stats["blocked"] == stats["defaulted"] == 0


async def test_a_redirected_tcp_connection_carries_data_both_ways_and_keeps_its_peer(backend: str) -> None:
    async with Testbed(backend, PORTS) as bed:
        hosts = bed.hosts
        decider = await bed.decider(by_port({7303: Decision("redirect", to=f"127.0.0.1:{PROXY}", permanent=True)}))
        proxy = await bed.listen(hosts.server, [f"tcp:{PROXY}"])
        far = await bed.listen(hosts.client, ["tcp:7303"])
        app = await bed.session(hosts.server)
        connected = await app.tcp_connect(hosts.client_ip, 7303, id="c")
        assert connected["peer"] == [hosts.client_ip, 7303], connected
        assert await app.ping("there and back", id="c") == {"data": "there and back"}
        await app.close_socket("c")
        size = 300_000
        result = await app.transfer(hosts.client_ip, 7303, size)
        assert (result["received"], result["sha256"]) == (size, payload_digest(size)), result
        assert len(proxy.accepts(PROXY)) == 2 and far.accepts(7303) == []
        # The proxy sees the application's own address, as with kernel NAT.
        assert proxy.accepts(PROXY)[0]["peer"] == [hosts.server_ip, connected["local_port"]]
        assert len(decider.infos) == 2 and decider.protocol_errors == []
        stats = await bed.server.check_identity()
        assert stats["accepted"] == stats["blocked"] == 0
        if backend == "nfqueue":
            # Kernel NAT: each connection's first packet came to Python, nothing after it.
            assert stats["captured"] == stats["rerouted"] == 2
        else:
            # pmk rewrites every packet of the 300 kB both ways itself.
            assert stats["captured"] == stats["rerouted"] > 2 * size // 65536


async def test_invalid_reroutes_get_the_policy_and_a_protocol_error(backend: str) -> None:
    # Only an IPv4 nameserver; the policy blocks what the decider gets wrong.
    async with Testbed(backend, PORTS, start_pmk=False) as bed:
        hosts = bed.hosts
        await bed.start_pmk(["--nameserver", f"{hosts.server_ip}:{NAMESERVER}"])
        decider = await bed.decider(
            by_port({7304: Decision("reroute_to_tunnel"), 7301: Decision("reroute_to_nameserver")})
        )
        app = await bed.session(hosts.server)
        # No tunnel configured at all, and no IPv6 nameserver.
        await app.udp_open(hosts.client_ip, 7304, id="t")
        assert await app.ping("tunnel?", id="t") == {"error": "ECONNREFUSED"}
        await app.udp_open(hosts.client_ip6, 7301, id="n6")
        assert await app.ping("resolve?", id="n6") == {"error": "ECONNREFUSED"}
        # Inbound: a connection made to pmk's host cannot be rerouted.
        decider.policy = lambda info: Decision("redirect", to=f"127.0.0.1:{PROXY}")
        await bed.client.udp_open(hosts.server_ip, 7302, id="in")
        assert await bed.client.ping("inbound", id="in", timeout=QUIET) == {"error": "ECONNREFUSED"}
        assert bed.peer.udp(7302) == []
        # The notification and the reject travel apart: the decider may read it a moment later.
        await eventually(lambda: len(decider.protocol_errors) == 3, "three protocol errors")
        assert "no tunnel" in decider.protocol_errors[0] and "IPv6" in decider.protocol_errors[1]
        assert "outbound" in decider.protocol_errors[2]
        stats = await bed.server.check_identity()
        assert stats["default_invalid"] == 3 and stats["rerouted"] == 0 and stats["blocked"] >= 3


async def test_a_reroute_for_a_later_packet(backend: str) -> None:
    """nfqueue: the flow's NAT binding is made, so it is blocked; divert rewrites a UDP flow at any point."""
    async with Testbed(backend, PORTS, start_pmk=False) as bed:
        hosts = bed.hosts
        await bed.start_pmk(["--nameserver", f"{hosts.server_ip}:{NAMESERVER}"])
        outbound = iter([Decision("accept"), Decision("reroute_to_nameserver")])
        decider = await bed.decider(
            lambda info: next(outbound) if info["direction"] == "outbound" else Decision("accept")
        )
        resolver = await bed.listen(hosts.server, [f"udp:{NAMESERVER}"])
        far = await bed.listen(hosts.client, ["udp:7301"])
        app = await bed.session(hosts.server)
        await app.udp_open(hosts.client_ip, 7301, id="u")
        assert await app.ping("first, accepted once", id="u") == {"data": "first, accepted once"}
        second = await app.ping("second", id="u")
        # Asked about: the first datagram, the peer's echo of it, the second datagram.
        assert [i["direction"] for i in decider.infos] == ["outbound", "inbound", "outbound"]
        assert decider.protocol_errors == [] and far.udp(7301) == ["first, accepted once"]
        stats = await bed.server.check_identity()
        if backend == "nfqueue":
            assert second == {"error": "ECONNREFUSED"} and resolver.udp(NAMESERVER) == []
            assert (stats["accepted"], stats["blocked"], stats["rerouted"]) == (2, 1, 0)
        else:
            # The answer arrives on the connected socket: it came as from the peer.
            assert second == {"data": "second"} and resolver.udp(NAMESERVER) == ["second"]
            assert (stats["accepted"], stats["blocked"], stats["rerouted"]) == (2, 0, 2)
