"""Issue 10 item 4 end to end: connection_end, list_connections and bandwidth with real packets.

On divert pmk sees every packet: ends come from FINs, resets and the idle
timeout, counters from the packets. On nfqueue the kernel carries decided
connections: ends are conntrack's (its TIME_WAIT and CLOSE timeouts are cut
to 1 s in the server namespace, else an end takes two minutes), counters are
the kernel's, and bandwidth comes from conntrack dumps.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pmk.client import Client, run_observer
from tests.harness import BACKENDS, WAIT, Testbed, eventually, needs_root, netns

pytestmark = [netns, needs_root]

DATA = "x" * 1000


def short_conntrack_timeouts(bed: Testbed) -> None:
    """Ended TCP connections expire in conntrack after 1 s (instead of up to 2 minutes)."""
    for name in ("time_wait", "close", "last_ack", "fin_wait", "close_wait"):
        bed.hosts.sh(bed.hosts.server, "sysctl", "-qw", f"net.netfilter.nf_conntrack_tcp_timeout_{name}=1")


async def wait_end(bed: Testbed, ends: list[dict[str, Any]], port: int, what: str) -> None:
    """Wait for ``port``'s connection_end; on nfqueue list conntrack meanwhile.

    The kernel removes an expired entry (and sends its DESTROY event) when its
    garbage collector next passes, which may take up to a minute in a quiet
    table, or at once when a dump comes across it.
    """
    deadline = asyncio.get_running_loop().time() + WAIT
    while not of_port(ends, port):
        assert asyncio.get_running_loop().time() < deadline, f"gave up waiting for {what}"
        if bed.backend == "nfqueue":
            await asyncio.to_thread(bed.hosts.sh, bed.hosts.server, "conntrack", "-L", check=False)
        await asyncio.sleep(0.2)


async def observer(bed: Testbed) -> tuple[Client, list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """An observer and what it heard: connection_end records, bandwidth notifications."""
    client = await bed.server.connect("life-observer")
    ends: list[dict[str, Any]] = []
    bandwidth: list[list[dict[str, Any]]] = []

    def heard(note: Any) -> None:
        if note.method == "connection_end":
            ends.append(note.params[0])
        elif note.method == "bandwidth":
            bandwidth.append(note.params[0])

    client.on_notification = heard
    return client, ends, bandwidth


def of_port(records: list[dict[str, Any]], port: int) -> list[dict[str, Any]]:
    return [r for r in records if r["remote_port"] == port]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_closed_connection_ends_with_its_counters_and_loses_its_verdict(backend: str) -> None:
    async with Testbed(backend, ["tcp:7211"]) as bed:
        if backend == "nfqueue":
            short_conntrack_timeouts(bed)
        watcher, ends, _ = await observer(bed)
        decider = await bed.decider(name="life-decider")
        decider_ends: list[dict[str, Any]] = []
        assert decider.client is not None
        decider.client.on_notification = lambda n: decider_ends.extend(n.params if n.method == "connection_end" else [])
        connected = await bed.client.tcp_connect(bed.hosts.server_ip, 7211, id="t")
        port = connected["local_port"]
        for _ in range(3):
            assert await bed.client.ping(DATA, id="t") == {"data": DATA}

        listed = await watcher.list_connections()
        (live,) = of_port(listed["connections"], port)
        assert listed["total"] >= 1
        assert (live["verdict"], live["by"], live["name"], live["local_port"]) == (
            "accept",
            "decider",
            "life-decider",
            7211,
        )
        assert live["remote_ip"] == bed.hosts.client_ip and live["age"] >= 0
        # divert: pmk counts what passes; nfqueue: the kernel's counters, read for the call
        assert live["bytes_in"] >= 3 * len(DATA) and live["bytes_out"] >= 3 * len(DATA)
        assert (await bed.server.stats())["verdict_cache_entries"] == 1

        await bed.client.close_socket("t")  # FIN both ways: the echo server closes on EOF
        await wait_end(bed, ends, port, "connection_end at the observer")
        (end,) = of_port(ends, port)
        assert end["reason"] == ("closed" if backend == "divert" else "destroyed")
        assert (end["verdict"], end["by"], end["name"]) == ("accept", "decider", "life-decider")
        assert end["bytes_in"] >= 3 * len(DATA) and end["bytes_out"] >= 3 * len(DATA)
        assert end["packets_in"] >= 3 and end["packets_out"] >= 3
        await eventually(lambda: bool(of_port(decider_ends, port)), "connection_end at the decider too")
        stats = await bed.server.check_identity()
        assert stats["verdict_cache_entries"] == 0
        assert of_port((await watcher.list_connections())["connections"], port) == []
        watcher.close()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_reset_ends_the_connection_and_the_same_ports_are_asked_about_again(backend: str) -> None:
    async with Testbed(backend, ["tcp:7212"]) as bed:
        if backend == "nfqueue":
            short_conntrack_timeouts(bed)
        _, ends, _ = await observer(bed)
        decider = await bed.decider()
        connected = await bed.client.tcp_connect(bed.hosts.server_ip, 7212, id="t")
        port = connected["local_port"]
        assert await bed.client.ping(DATA, id="t") == {"data": DATA}
        await bed.client.close_socket("t", reset=True)
        await wait_end(bed, ends, port, "connection_end after a reset")
        assert of_port(ends, port)[0]["reason"] == ("closed" if backend == "divert" else "destroyed")
        assert len(decider.infos_for(remote_port=port)) == 1
        again = await bed.client.tcp_connect(bed.hosts.server_ip, 7212, id="t2", bind_port=port)
        assert again["ok"] and again["local_port"] == port
        assert await bed.client.ping("again", id="t2") == {"data": "again"}
        assert len(decider.infos_for(remote_port=port)) == 2  # a new connection: asked anew


async def test_a_quiet_udp_flow_ends_after_the_idle_timeout_on_divert() -> None:
    async with Testbed("divert", ["udp:7213"], ["--idle-timeout", "1"]) as bed:
        _, ends, _ = await observer(bed)
        await bed.decider()
        opened = await bed.client.udp_open(bed.hosts.server_ip, 7213, id="u")
        port = opened["local_port"]
        for n in range(3):
            assert await bed.client.ping(f"datagram {n}", id="u") == {"data": f"datagram {n}"}
        await eventually(lambda: bool(of_port(ends, port)), "an idle end")
        (end,) = of_port(ends, port)
        assert end["reason"] == "idle" and end["protocol"] == 17
        # the first datagram was decided; the two after it and all three echoes passed the cache
        assert (end["packets_in"], end["packets_out"]) == (2, 3)
        assert (await bed.server.stats())["verdict_cache_entries"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
async def test_bandwidth_notifications_carry_a_transfer_in_deltas(backend: str) -> None:
    size = 1 << 20
    async with Testbed(backend, ["tcp:7214"]) as bed:
        watcher, _, bandwidth = await observer(bed)
        await bed.decider()
        await watcher.subscribe_bandwidth(0.2)
        # The client library's observer loop subscribes too, at its own interval.
        heard: list[tuple[str, Any]] = []
        follower = asyncio.ensure_future(
            run_observer(
                lambda method, params: heard.append((method, params)),
                name="life-follower",
                path=bed.server.path,
                bandwidth=0.5,
                reconnect=False,
            )
        )
        await eventually(lambda: any(m == "bandwidth" for m, _ in heard), "the follower's first bandwidth")
        result = await bed.client.transfer(bed.hosts.server_ip, 7214, size)
        assert result["received"] == size
        port = result["local_port"]

        def moved(field: str) -> int:
            return sum(e[field] for note in bandwidth for e in of_port(note, port))

        await eventually(
            lambda: moved("bytes_in") >= size and moved("bytes_out") >= size, "the transfer in bandwidth deltas"
        )
        carrying = [note for note in bandwidth if of_port(note, port)]
        assert len(carrying) >= 1 and all(len(of_port(note, port)) == 1 for note in carrying)
        # Later notifications leave the finished connection out (nothing moved): [[]] comes.
        count = len(bandwidth)
        await eventually(lambda: len(bandwidth) > count + 1, "more notifications")
        assert bandwidth[-1] == []

        def followed() -> int:
            return sum(e["bytes_in"] for method, note in heard if method == "bandwidth" for e in of_port(note, port))

        await eventually(lambda: followed() >= size, "the transfer at the follower")
        follower.cancel()
        await watcher.subscribe_bandwidth(0)
        watcher.close()
