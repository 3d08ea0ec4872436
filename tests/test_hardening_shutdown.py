"""Shutdown, crash and restart (issue 5, items 5 and 6).

SIGTERM with packets held: they get the default verdict (block: a held SYN
is answered with a reset), the backend lets go of the kernel (no pmk rules,
no divert programs), the socket file is gone, the exit status is 0.
SIGKILL: what the kernel is left with is observed, then the next start
cleans it up, and after a clean stop the network is as it is without pmk.
A decider built on ``pmk.client.run_decider`` outlives a server restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys

import pytest

import pmk.client
from tests.harness import (
    BACKENDS,
    HOLD,
    QUIET,
    WAIT,
    Decision,
    PmkProcess,
    Testbed,
    eventually,
    needs_root,
    netns,
    pmk_rules,
)
from tests.netns import TwoHosts

pytestmark = [netns, needs_root]


def divert_filters(hosts: TwoHosts) -> list[list[object]]:
    """eBPFDivert tc filters in the server namespace."""
    return in_server_ns(hosts, "from pmk.capture.cleanup import divert_filters as f")


def in_server_ns(hosts: TwoHosts, importing: str) -> list[object]:
    """JSON of ``f()`` run inside the server namespace after ``importing`` (which binds ``f``)."""
    code = f"import json; {importing}; print(json.dumps(sorted(f())))"
    return json.loads(hosts.sh(hosts.server, sys.executable, "-c", code).stdout)


def queue_bound(hosts: TwoHosts) -> bool:
    out = hosts.sh(hosts.server, "cat", "/proc/net/netfilter/nfnetlink_queue", check=False).stdout
    return bool(out.strip())


def kernel_state(bed: Testbed) -> list[object]:
    """What pmk has in the server namespace's kernel (empty: nothing)."""
    if bed.backend == "nfqueue":
        return [*pmk_rules(bed.hosts), *(["queue bound"] if queue_bound(bed.hosts) else [])]
    return list(divert_filters(bed.hosts))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_settles_held_packets_and_cleans_up(backend: str, signum: signal.Signals) -> None:
    async with Testbed(backend, ["tcp:7221"], ["--verdict-timeout", "60"]) as bed:
        decider = await bed.decider(lambda info: HOLD)
        connecting = asyncio.ensure_future(bed.client.tcp_connect(bed.hosts.server_ip, 7221, timeout=WAIT))
        await decider.wait_decides(1)
        assert (await bed.server.stats())["pending"] >= 1
        assert kernel_state(bed) != []
        pmk = bed.server
        assert pmk.proc is not None
        pmk.proc.send_signal(signum)
        assert await asyncio.to_thread(pmk.proc.wait, WAIT) == 0, pmk.log()
        pmk.returncode = 0
        # The held SYN got the default verdict (block): a reset, not a timeout.
        assert await connecting == {"error": "ECONNREFUSED"}
        assert "held packets got the default verdict" in pmk.log()
        assert not os.path.exists(pmk.path)
        assert kernel_state(bed) == []
        # Without pmk the port is simply open.
        assert (await bed.client.tcp_connect(bed.hosts.server_ip, 7221, id="after"))["ok"] is True


@pytest.mark.parametrize(
    ("backend", "args", "while_dead"),
    [
        ("nfqueue", [], "closed"),  # fail-closed: rules stay, nobody reads the queue
        ("nfqueue", ["--fail-open"], "open"),  # --queue-bypass: the kernel passes packets
        ("divert", [], "closed"),  # eBPFDivert's programs stay attached, stealing into a dead ring
    ],
)
async def test_after_kill_9_the_next_start_cleans_up(backend: str, args: list[str], while_dead: str) -> None:
    port = 7222
    async with Testbed(backend, [f"tcp:{port}"], args) as bed:
        await bed.decider(lambda info: Decision("accept", permanent=True))
        assert (await bed.client.tcp_connect(bed.hosts.server_ip, port, id="alive"))["ok"] is True
        crashed = bed.server
        await crashed.kill()
        left = kernel_state(bed)
        assert left and all(item != "queue bound" for item in left), left
        attempt = await bed.client.tcp_connect(bed.hosts.server_ip, port, id="dead", timeout=QUIET)
        assert ("ok" in attempt) == (while_dead == "open"), attempt
        # The next start removes what the dead one left.
        restarted = await bed.start_pmk()
        if backend == "nfqueue":
            owners = in_server_ns(bed.hosts, "from pmk.capture.netfilter_rules import owners as f")
            # The pid on the rules is the python process under ``ip netns exec`` (it execs).
            assert owners == [restarted.pid], owners
        else:
            assert "left attached by a pmk that died" in restarted.log()
            from pmk.capture.cleanup import live_program_ids

            now = {f[4] for f in divert_filters(bed.hosts)}  # type: ignore[index]
            stale = {f[4] for f in left}  # type: ignore[index]
            assert now and now.isdisjoint(stale) and now <= live_program_ids(), (now, stale)
        await bed.decider(lambda info: Decision("accept", permanent=True), name="again")
        assert (await bed.client.tcp_connect(bed.hosts.server_ip, port, id="again"))["ok"] is True
        assert await restarted.stop() == 0
        assert kernel_state(bed) == []
        assert (await bed.client.tcp_connect(bed.hosts.server_ip, port, id="after"))["ok"] is True


async def test_run_decider_reconnects_after_a_server_restart() -> None:
    port = 7223
    attempts = 0
    real_connect = pmk.client.Client.connect

    async def counting_connect(*args: object, **kwargs: object) -> pmk.client.Client:
        nonlocal attempts
        attempts += 1
        return await real_connect(*args, **kwargs)  # type: ignore[arg-type]

    decided: list[int] = []

    def decide(info: dict[str, object]) -> Decision:
        decided.append(int(info["id"]))  # type: ignore[call-overload]
        return Decision("accept")

    async with Testbed("nfqueue", [f"udp:{port}"]) as bed:
        first = bed.server
        pmk.client.Client.connect = classmethod(lambda cls, *a, **k: counting_connect(*a, **k))  # type: ignore[method-assign,assignment]
        task = asyncio.ensure_future(pmk.client.run_decider(decide, name="survivor", path=first.path, max_backoff=0.5))
        try:
            await first.wait_stats(lambda s: s["deciders"] == 1, "run_decider to say hello")
            await bed.client.udp_open(bed.hosts.server_ip, port, id="u")
            assert "data" in await bed.client.ping("before", id="u")
            assert await first.stop() == 0
            before_restart = attempts
            await asyncio.sleep(2.0)  # down for a while: run_decider keeps trying, with backoff
            retries_while_down = attempts - before_restart
            second = PmkProcess(bed.hosts, bed.backend, bed.ports)
            second.argv[second.argv.index(second.path)] = first.path
            second.path = first.path
            bed.processes.append(second)
            bed.pmk = await second.start()
            await second.wait_stats(lambda s: s["deciders"] == 1, "run_decider to come back")
            seen = len(decided)
            assert "data" in await bed.client.ping("after", id="u")
            await eventually(lambda: len(decided) > seen, "a decide answered after the restart")
        finally:
            pmk.client.Client.connect = real_connect  # type: ignore[method-assign]
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        print(f"run_decider: {retries_while_down} connection attempts during 2.0 s of downtime")
        assert 2 <= retries_while_down < 100  # it retried, and not in a tight loop
