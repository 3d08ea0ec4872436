"""The examples as a user runs them: a separate process deciding for a live pmk."""

from __future__ import annotations

import asyncio
import os
import tempfile

import pytest

from tests.harness import BACKENDS, Testbed, needs_root, netns, payload_digest, run_example

pytestmark = [netns, needs_root, pytest.mark.parametrize("backend", BACKENDS)]


async def _stop(proc: asyncio.subprocess.Process) -> str:
    if proc.returncode is None:
        proc.terminate()
    out, _ = await proc.communicate()
    return out.decode(errors="replace")


async def test_blocklist_blocks_a_listed_port_and_accepts_another(backend: str) -> None:
    async with Testbed(backend, ["tcp:7201", "tcp:7202", "udp:7203"]) as bed:
        with tempfile.TemporaryDirectory() as tmp:
            rules = os.path.join(tmp, "blocklist.txt")
            with open(rules, "w") as f:
                f.write("# test rules\nport 7201\nport 7203   # and a UDP port\n")
            example = await run_example(bed, "blocklist.py", rules)
            try:
                await bed.server.wait_stats(lambda s: s["deciders"] == 1, "blocklist.py to connect")
                ip = bed.hosts.server_ip
                assert await bed.client.tcp_connect(ip, 7201) == {"error": "ECONNREFUSED"}
                await bed.client.udp_open(ip, 7203, id="u")
                assert await bed.client.ping("blocked", id="u") == {"error": "ECONNREFUSED"}
                result = await bed.client.transfer(ip, 7202, 100_000)
                assert result["sha256"] == payload_digest(100_000), result
                # Its verdicts are permanent: a second connection to the
                # blocked port is asked about once more, not its retries.
                assert await bed.client.tcp_connect(ip, 7201) == {"error": "ECONNREFUSED"}
            finally:
                log = await _stop(example)
        assert bed.peer.accepts(7201) == [] and bed.peer.udp(7203) == []
        assert len(bed.peer.accepts(7202)) == 1, log
        stats = await bed.server.check_identity()
        assert stats["requests"] == 4, stats
        assert stats["defaulted"] == 0


async def test_accept_all_lets_everything_through(backend: str) -> None:
    async with Testbed(backend, ["tcp:7205", "udp:7206"]) as bed:
        example = await run_example(bed, "accept_all.py")
        try:
            await bed.server.wait_stats(lambda s: s["deciders"] == 1, "accept_all.py to connect")
            ip6 = bed.hosts.server_ip6
            result = await bed.client.transfer(ip6, 7205, 100_000)
            assert result["sha256"] == payload_digest(100_000), result
            await bed.client.udp_open(ip6, 7206, id="u")
            assert await bed.client.ping("welcome", id="u") == {"data": "welcome"}
        finally:
            await _stop(example)
        stats = await bed.server.check_identity()
        assert stats["accepted"] == stats["captured"] and stats["requests"] == 2
