"""Issue 2 end to end: held packets: eviction, default verdicts, lost deciders, payloads.

Every test ends (in the testbed's exit) with the stats identity
``captured == accepted + blocked + dropped + rerouted + evicted + pending``.
"""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from tests.harness import (
    BACKENDS,
    HOLD,
    NEVER,
    QUIET,
    Decision,
    RemoteError,
    Testbed,
    check_identity,
    eventually,
    needs_root,
    netns,
)

pytestmark = [netns, needs_root, pytest.mark.parametrize("backend", BACKENDS)]

ACCEPT = Decision("accept", permanent=True)


async def _unknown(bed: Testbed, packet_id: int) -> bool:
    """True when pmk answers get_payload for ``packet_id`` with ``unknown_packet``."""
    try:
        await bed.server.call("get_payload", packet_id)
    except RemoteError as error:
        assert error.code == "unknown_packet", error.error
        return True
    return False


async def test_full_packet_cache(backend: str) -> None:
    """Divert evicts the oldest held packet; nfqueue reads no more than pmk can hold."""
    if backend == "divert":
        await _divert_evicts_the_oldest_first()
    else:
        await _nfqueue_leaves_new_packets_in_the_kernel()


async def _divert_evicts_the_oldest_first() -> None:
    flows = 6
    async with Testbed("divert", ["udp:7171"], ["--packet-cache", "4"]) as bed:
        decider = await bed.decider(lambda info: HOLD)
        for n in range(flows):
            await bed.client.udp_open(bed.hosts.server_ip, 7171, id=f"f{n}")
            await bed.client.send(f"flow {n}", id=f"f{n}")
            # Wait for each request, so the arrival order is the sending order.
            await decider.wait_decides(n + 1)
        ids = decider.ids()
        assert ids == sorted(ids) and len(set(ids)) == flows
        stats = await bed.server.check_identity()
        assert (stats["captured"], stats["pending"], stats["evicted"], stats["withdrawn"]) == (flows, 4, 2, 2)
        # The two oldest went, with their requests withdrawn; the rest is still held.
        await eventually(lambda: len(decider.withdrawn) >= 2, "withdrawn notifications")
        assert decider.withdrawn == ids[:2]
        assert [await _unknown(bed, i) for i in ids] == [True, True, False, False, False, False]

        decider.policy = lambda info: ACCEPT
        assert decider.release(ACCEPT) == ids
        for n in range(2, flows):
            assert await bed.client.recv(f"f{n}") == {"data": f"flow {n}"}
        for n in range(2):
            assert await bed.client.recv(f"f{n}", timeout=QUIET) == {"error": "timeout"}
        assert sorted(bed.peer.udp(7171)) == [f"flow {n}" for n in range(2, flows)]
        stats = await bed.server.check_identity()
        assert (stats["pending"], stats["evicted"]) == (0, 2)
        # The late answers about the evicted packets changed nothing.
        assert stats["accepted"] == stats["captured"] - 2


async def _nfqueue_leaves_new_packets_in_the_kernel() -> None:
    flows, capacity = 6, 4
    args = ["--packet-cache", str(capacity), "--verdict-timeout", "30"]
    async with Testbed("nfqueue", ["udp:7171"], args) as bed:
        decider = await bed.decider(lambda info: HOLD)
        for n in range(flows):
            await bed.client.udp_open(bed.hosts.server_ip, 7171, id=f"f{n}")
            await bed.client.send(f"flow {n}", id=f"f{n}")
            if n < capacity:
                await decider.wait_decides(n + 1)
        # The two newest wait in the kernel's queue: pmk stopped reading instead of evicting.
        stats = await bed.server.wait_stats(lambda s: s["read_pauses"] >= 1, "the reader to pause")
        assert (stats["captured"], stats["pending"], stats["evicted"], stats["withdrawn"]) == (capacity, 4, 0, 0)
        check_identity(stats)
        first = decider.ids()
        assert len(first) == capacity

        # One answer makes room for one more packet, and so on: none is lost.
        decider.policy = lambda info: ACCEPT
        assert decider.release(ACCEPT, first[:1]) == first[:1]
        await decider.wait_decides(capacity + 1)
        decider.release(ACCEPT)
        for n in range(flows):
            assert await bed.client.recv(f"f{n}") == {"data": f"flow {n}"}
        assert sorted(bed.peer.udp(7171)) == [f"flow {n}" for n in range(flows)]
        stats = await bed.server.check_identity()
        assert (stats["captured"], stats["accepted"], stats["evicted"], stats["pending"]) == (flows, flows, 0, 0)


@pytest.mark.parametrize("default", ["block", "accept"])
async def test_default_verdict_applies_without_a_decider(backend: str, default: str) -> None:
    async with Testbed(backend, ["tcp:7175", "udp:7176"], ["--default-verdict", default]) as bed:
        ip = bed.hosts.server_ip
        await bed.client.udp_open(ip, 7176, id="u")
        if default == "block":
            assert await bed.client.tcp_connect(ip, 7175) == {"error": "ECONNREFUSED"}
            assert await bed.client.ping("no decider", id="u") == {"error": "ECONNREFUSED"}
        else:
            assert (await bed.client.tcp_connect(ip, 7175, id="t"))["ok"]
            assert await bed.client.ping("tcp too", id="t") == {"data": "tcp too"}
            assert await bed.client.ping("no decider", id="u") == {"data": "no decider"}
        stats = await bed.server.check_identity()
        assert stats["deciders"] == 0
        # Every packet got the default, none was cached.
        assert stats["defaulted"] == stats["captured"] == stats[f"{default}ed"] >= 2
        assert stats["default_no_decider"] >= 2
        assert stats["verdict_cache_entries"] == 0


@pytest.mark.parametrize("default", ["block", "accept"])
async def test_default_verdict_applies_after_a_timeout(backend: str, default: str) -> None:
    args = ["--default-verdict", default, "--verdict-timeout", "0.5"]
    async with Testbed(backend, ["tcp:7177", "udp:7178"], args) as bed:
        decider = await bed.decider(lambda info: NEVER)
        ip = bed.hosts.server_ip
        await bed.client.udp_open(ip, 7178, id="u")
        if default == "block":
            assert await bed.client.tcp_connect(ip, 7177) == {"error": "ECONNREFUSED"}
            assert await bed.client.ping("too slow", id="u") == {"error": "ECONNREFUSED"}
        else:
            assert await bed.client.ping("too slow", id="u") == {"data": "too slow"}
        assert len(decider.infos) >= 2
        stats = await bed.server.wait_stats(lambda s: s["pending"] == 0, "every held packet settled")
        assert stats["timeouts"] == stats["default_timeout"] == len(decider.infos)
        assert stats["defaulted"] >= stats["timeouts"]
        assert stats["verdict_cache_entries"] == 0


@pytest.mark.parametrize("second", [True, False], ids=["another-decider", "no-decider-left"])
async def test_a_decider_leaving_mid_request_strands_nothing(backend: str, second: bool) -> None:
    args = ["--default-verdict", "block", "--verdict-timeout", "60"]
    async with Testbed(backend, ["tcp:7181"], args) as bed:
        leaving = await bed.decider(lambda info: HOLD, name="leaving")
        connecting = asyncio.ensure_future(bed.client.tcp_connect(bed.hosts.server_ip, 7181, id="t"))
        [asked] = await leaving.wait_decides(1)
        if second:
            staying = await bed.decider(lambda info: ACCEPT, name="staying")
            await bed.server.wait_stats(lambda s: s["deciders"] == 2, "the second decider")
        await leaving.close()
        if second:
            # The same packet is asked about again, of the decider that is left.
            [again] = await staying.wait_decides(1)
            assert again == asked
            assert (await connecting)["ok"]
            assert await bed.client.ping("rescued", id="t") == {"data": "rescued"}
            stats = await bed.server.check_identity()
            assert stats["defaulted"] == 0
        else:
            assert await connecting == {"error": "ECONNREFUSED"}
            stats = await bed.server.check_identity()
            assert stats["default_no_decider"] >= 1 and stats["defaulted"] >= 1
        assert stats["pending"] == 0
        assert stats["timeouts"] == 0


@pytest.mark.parametrize("family", [4, 6])
async def test_get_payload_returns_the_held_packet(backend: str, family: int) -> None:
    async with Testbed(backend, ["udp:7185"]) as bed:
        decider = await bed.decider(lambda info: HOLD)
        hosts = bed.hosts
        server_ip, client_ip = (
            (hosts.server_ip, hosts.client_ip) if family == 4 else (hosts.server_ip6, hosts.client_ip6)
        )
        opened = await bed.client.udp_open(server_ip, 7185, id="u")
        text = f"inspect me over IPv{family}"
        await bed.client.send(text, id="u")
        [info] = await decider.wait_decides(1)
        raw = await bed.server.call("get_payload", info["id"])
        assert isinstance(raw, bytes) and len(raw) == info["size"]
        # The IP header comes first, then UDP, then the datagram.
        assert raw[0] >> 4 == family
        if family == 4:
            header, proto, src, dst = (raw[0] & 15) * 4, raw[9], raw[12:16], raw[16:20]
            assert int.from_bytes(raw[2:4], "big") == len(raw)
        else:
            header, proto, src, dst = 40, raw[6], raw[8:24], raw[24:40]
            assert 40 + int.from_bytes(raw[4:6], "big") == len(raw)
        assert proto == 17
        assert (ipaddress.ip_address(src), ipaddress.ip_address(dst)) == (
            ipaddress.ip_address(client_ip),
            ipaddress.ip_address(server_ip),
        )
        udp = raw[header:]
        assert int.from_bytes(udp[0:2], "big") == opened["local_port"]
        assert int.from_bytes(udp[2:4], "big") == 7185
        assert udp[8:] == text.encode()

        decider.release(ACCEPT)
        assert await bed.client.recv("u") == {"data": text}
        assert await _unknown(bed, info["id"])
