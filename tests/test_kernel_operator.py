"""Issue 9 item 5 end to end: operator calls on the kernel fast path, through ``pmk serve``.

``update_verdict`` and ``clear_cache`` change conntrack marks over netlink in a
worker thread: the event loop keeps answering meanwhile, and a change the
kernel refuses is answered with ``internal_error`` while the old verdict stays
in force in pmk's cache and in the kernel alike.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from asyncio.subprocess import PIPE
from pathlib import Path
from typing import Any

import pytest

from pmk.client import Decision, RemoteError
from tests.harness import PYTHON, REPO, Session, Testbed, needs_root, netns

pytestmark = [netns, needs_root]

CONNECTIONS = 200
#: What the issue asks of get_stats while the updates run. Asserted of the
#: median: the worst case on a shared, loaded machine is the scheduler's
#: (printed: 17-106 ms in 12 runs at load 4-8 on 2 cores, against 2-18 ms
#: just before the updates). A loop blocked by the updates, as before this
#: change, answers once or twice in the whole window, after as long as the
#: updates take (measured: once, after 139 ms).
STATS_WITHIN_S = 0.050
FAULTS = str(Path(__file__).resolve().parent / "faults")
CONN_FIELDS = ("protocol", "local_ip", "local_port", "remote_ip", "remote_port")


def _conn(info: dict[str, Any]) -> dict[str, Any]:
    return {field: info[field] for field in CONN_FIELDS}


def watch_main(path: str) -> None:
    """Call get_stats over and over until stdin closes; print [[sent at, seconds to answer], ...].

    A process of its own, so that the test's event loop (busy with the
    decider, the operator and the traffic) does not add to what is measured.
    Times are CLOCK_MONOTONIC, which every process shares.
    """
    from pmk.client import Client

    async def watch() -> None:
        client = await Client.connect(path)
        await client.hello("stats-watch", "observer")
        loop = asyncio.get_running_loop()
        stop = loop.run_in_executor(None, sys.stdin.read)
        print(json.dumps({"ready": True}), flush=True)
        samples = []
        while not stop.done():
            sent = time.monotonic()
            await client.call("get_stats")
            samples.append([sent, time.monotonic() - sent])
            await asyncio.sleep(0.002)
        client.close()
        print(json.dumps(samples), flush=True)

    asyncio.run(watch())


def _marks(bed: Testbed, local_port: int) -> dict[int, int]:
    """pmk's mark bits of the server's connections to ``local_port``, by client port."""
    script = (
        "import json, socket\n"
        "from pyroute2.conntrack import Conntrack\n"
        "with Conntrack() as ct:\n"
        "    print(json.dumps([[e.tuple_orig.sport, e.tuple_orig.dport, e.mark] for e in ct.dump_entries()]))\n"
    )
    out = bed.hosts.sh(bed.hosts.server, "env", f"PYTHONPATH={REPO}", PYTHON, "-c", script).stdout
    return {sport: mark & 0x00700000 for sport, dport, mark in json.loads(out) if dport == local_port}


async def test_update_verdict_on_200_connections_keeps_get_stats_answering() -> None:
    async with Testbed("nfqueue", ["tcp:7231", "tcp:7232"]) as bed:
        ip = bed.hosts.server_ip
        decider = await bed.decider(lambda info: Decision("accept", permanent=True))
        for n in range(CONNECTIONS):
            assert (await bed.client.tcp_connect(ip, 7231, id=f"c{n}"))["ok"]
        conns = [_conn(info) for info in decider.infos_for(local_port=7231)]
        assert len(conns) == CONNECTIONS
        assert set(_marks(bed, 7231).values()) == {0x00100000}

        operator = await bed.server.connect("operator")
        newcomer = await Session.start(bed.hosts, bed.hosts.client)
        watcher = await asyncio.create_subprocess_exec(
            PYTHON,
            __file__,
            "watch",
            bed.server.path,
            stdin=PIPE,
            stdout=PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert watcher.stdin is not None and watcher.stdout is not None
        assert json.loads(await watcher.stdout.readline()) == {"ready": True}
        done = asyncio.Event()

        async def keep_traffic_flowing() -> int:
            """New connections, each one decided by the decider, until the updates end."""
            rounds = 0
            while not done.is_set():
                await newcomer.tcp_connect(ip, 7232, id=f"n{rounds}")
                await newcomer.close_socket(f"n{rounds}")
                rounds += 1
            return rounds

        traffic = asyncio.ensure_future(keep_traffic_flowing())
        await asyncio.sleep(0.5)
        started = time.monotonic()
        results = await asyncio.gather(*(operator.call("update_verdict", conn, "block") for conn in conns))
        ended = time.monotonic()
        done.set()
        rounds = await traffic
        watcher.stdin.close()
        samples = json.loads(await watcher.stdout.readline())
        await watcher.wait()
        during = [seconds for sent, seconds in samples if started <= sent <= ended]
        before = [seconds for sent, seconds in samples if started - 0.4 <= sent < started]
        print(
            f"\n{CONNECTIONS} update_verdict calls at once: {(ended - started) * 1000:.0f} ms; {rounds} new "
            f"connections decided meanwhile; get_stats answered {len(during)} times meanwhile in "
            f"median {statistics.median(during) * 1000:.1f} ms, worst {max(during) * 1000:.1f} ms; "
            f"in the 0.4 s before, with the same traffic: median {statistics.median(before) * 1000:.1f} ms, "
            f"worst {max(before) * 1000:.1f} ms (shared machine: not a benchmark)"
        )
        assert results == [True] * CONNECTIONS
        assert len(during) >= 10 and statistics.median(during) < STATS_WITHIN_S
        # Both places have it: the kernel's marks, and the connections are cut at their next packet.
        assert set(_marks(bed, 7231).values()) == {0x00200000}
        for n in range(0, CONNECTIONS, 20):
            assert await bed.client.ping("x", id=f"c{n}") == {"error": "ECONNRESET"}
        await newcomer.close()
        operator.close()


async def test_refused_kernel_update_is_an_internal_error_and_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    switch = tmp_path / "refuse"
    monkeypatch.setenv("PYTHONPATH", FAULTS)
    monkeypatch.setenv("PMK_TEST_REFUSE_CONNTRACK", str(switch))
    async with Testbed("nfqueue", ["tcp:7233"]) as bed:
        ip = bed.hosts.server_ip
        decider = await bed.decider(lambda info: Decision("accept", permanent=True))
        assert (await bed.client.tcp_connect(ip, 7233, id="c"))["ok"]
        assert await bed.client.ping("before", id="c") == {"data": "before"}
        (info,) = decider.infos_for(local_port=7233)
        client_port = info["remote_port"]
        assert _marks(bed, 7233)[client_port] == 0x00100000

        switch.touch()
        for method, params in (("update_verdict", [_conn(info), "block"]), ("clear_cache", [])):
            with pytest.raises(RemoteError) as refused:
                await bed.server.call(method, *params)
            assert refused.value.code == "internal_error", refused.value.error
            assert "Operation not permitted" in str(refused.value)

        # The kernel kept the accept: the connection works and pmk is not asked.
        assert _marks(bed, 7233)[client_port] == 0x00100000
        assert await bed.client.ping("after", id="c") == {"data": "after"}
        # pmk's cache kept it too: with the kernel's mark gone, the next packet
        # comes up to pmk, which settles it from its cache without asking.
        switch.unlink()
        stats = await bed.server.stats()
        script = (
            "from pyroute2.conntrack import Conntrack\n"
            "with Conntrack() as ct:\n"
            "    for e in list(ct.dump_entries()):\n"
            f"        if e.tuple_orig.sport == {client_port}:\n"
            "            ct.entry('set', tuple_orig=e.tuple_orig, mark=0, mark_mask=0x00700000)\n"
        )
        bed.hosts.sh(bed.hosts.server, "env", f"PYTHONPATH={REPO}", PYTHON, "-c", script)
        assert await bed.client.ping("cached", id="c") == {"data": "cached"}
        later = await bed.server.stats()
        assert later["captured"] > stats["captured"]
        assert len(decider.infos) == 1


if __name__ == "__main__" and sys.argv[1] == "watch":
    watch_main(sys.argv[2])
