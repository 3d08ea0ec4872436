"""The Node.js decider (examples/node), written from protocol/SPEC.md alone, deciding for a live pmk."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest

from tests.harness import BACKENDS, REPO, Testbed, needs_root, netns, payload_digest

NODE_DIR = REPO / "examples" / "node"
NODE = shutil.which("node")
#: scripts/setup installs Node.js and the example's package (npm ci); only a
#: machine set up some other way lacks them, and never under CI.
missing = NODE is None or not (NODE_DIR / "node_modules" / "@msgpack" / "msgpack").is_dir()

pytestmark = [
    netns,
    needs_root,
    pytest.mark.skipif(missing and not os.environ.get("CI"), reason="node or examples/node/node_modules missing"),
    pytest.mark.parametrize("backend", BACKENDS),
]


async def test_node_decider_blocks_a_listed_port_and_accepts_another(backend: str) -> None:
    async with Testbed(backend, ["tcp:7211", "tcp:7212", "udp:7213"]) as bed:
        assert NODE is not None, "scripts/setup installs Node.js"
        proc = await asyncio.create_subprocess_exec(
            NODE,
            str(NODE_DIR / "decider.mjs"),
            "--pipe",
            bed.server.path,
            "--name",
            "node-test",
            "--block-port",
            "7211",
            "--block-port",
            "7213",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            await bed.server.wait_stats(lambda s: s["deciders"] == 1, "the Node.js decider to connect")
            ip = bed.hosts.server_ip
            assert await bed.client.tcp_connect(ip, 7211) == {"error": "ECONNREFUSED"}
            await bed.client.udp_open(ip, 7213, id="u")
            assert await bed.client.ping("blocked", id="u") == {"error": "ECONNREFUSED"}
            result = await bed.client.transfer(bed.hosts.server_ip6, 7212, 100_000)
            assert result["sha256"] == payload_digest(100_000), result
        finally:
            if proc.returncode is None:
                proc.terminate()
            out, _ = await proc.communicate()
        log = out.decode(errors="replace")
        assert "connected to pmk" in log, log
        assert "=> block" in log and "=> accept" in log, log
        assert bed.peer.accepts(7211) == [] and bed.peer.udp(7213) == []
        assert len(bed.peer.accepts(7212)) == 1, log
        stats = await bed.server.check_identity()
        assert stats["requests"] == 3 and stats["defaulted"] == 0, stats
