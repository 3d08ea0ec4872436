"""The server over a real Unix socket, fed by a recording backend.

These tests pin down dispatch and method behaviour without root; the same
behaviour with real packets is covered by the namespace tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from pmk.capture.base import CaptureBackend, CapturedPacket, KernelUpdateError, PacketSink
from pmk.client import Client, Decision, RemoteError, run_observer
from pmk.config import ServeConfig
from pmk.core.policy import default_only
from pmk.server.app import Server
from pmk.verdicts import ConnKey, Verdict
from tests.packets import udp


class RecordingBackend(CaptureBackend):
    """Packets are pushed by the test; verdicts are recorded."""

    name = "recording"

    def __init__(self) -> None:
        self.sink: PacketSink | None = None
        self.applied: list[tuple[bytes, Verdict, bool]] = []
        self.rooms: list[int] = []
        self.closed = False

    def start(self, loop: asyncio.AbstractEventLoop, sink: PacketSink) -> None:
        self.sink = sink

    def push(self, *packets: bytes) -> None:
        assert self.sink is not None
        self.sink([CapturedPacket(raw, outbound=False) for raw in packets])

    def apply(
        self, packets: Sequence[CapturedPacket], verdict: Verdict, permanent: bool, target: object = None
    ) -> None:
        self.applied.extend((p.raw, verdict, permanent) for p in packets)

    def set_room(self, room: int) -> None:
        self.rooms.append(room)

    def close(self) -> None:
        self.closed = True


def packet(port: int, data: bytes = b"x") -> bytes:
    return udp("198.18.0.1", "198.18.0.2", port, 53, data)


@contextlib.asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[tuple[Server, RecordingBackend, str]]:
    """A started server with a recording backend and ``ServeConfig(**options)``, on a fresh socket path."""
    directory = tempfile.mkdtemp(prefix="pmk-test-")
    os.chmod(directory, 0o700)
    path = os.path.join(directory, "pmk.sock")
    backend = RecordingBackend()
    server = Server(ServeConfig(endpoint=path, **options), backend)
    await server.start()
    try:
        yield server, backend, path
    finally:
        await server.stop()
        os.rmdir(directory)


@pytest.fixture
async def served() -> AsyncIterator[tuple[Server, RecordingBackend, str]]:
    async with serving(verdict_timeout=0.3, policy=default_only(Verdict.DROP)) as running:
        yield running


async def held_decider(path: str) -> tuple[Client, dict[int, asyncio.Future[Decision]]]:
    """A decider whose answers wait for the test: one future per remote port, in arrival order."""
    answers: dict[int, asyncio.Future[Decision]] = {}

    def decide(info: dict) -> asyncio.Future[Decision]:  # type: ignore[type-arg]
        answers[info["remote_port"]] = asyncio.get_running_loop().create_future()
        return answers[info["remote_port"]]

    decider = await Client.connect(path, decide)
    await decider.hello("slow", "decider")
    return decider, answers


async def until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def identity_holds(stats: dict) -> bool:  # type: ignore[type-arg]
    settled = stats["accepted"] + stats["blocked"] + stats["dropped"] + stats["rerouted"] + stats["evicted"]
    return stats["captured"] == settled + stats["pending"]


async def test_methods_answer_with_or_without_hello(served) -> None:  # type: ignore[no-untyped-def]
    _, _, path = served
    client = await Client.connect(path)
    version = await client.call("get_version")
    assert version["protocol"] == 1
    stats = await client.call("get_stats")
    for name in ("captured", "accepted", "blocked", "dropped", "evicted", "defaulted", "cache_hits", "cache_misses"):
        assert stats[name] == 0
    assert stats["deciders"] == 0 and stats["pending"] == 0
    hello = await client.hello("tool")
    assert hello["protocol"] == 1 and "version" in hello
    with pytest.raises(RemoteError) as error:
        await client.call("no_such_method")
    assert error.value.code == "unknown_method"
    with pytest.raises(RemoteError) as error:
        await client.call("get_stats", 1)
    assert error.value.code == "invalid_params"
    with pytest.raises(RemoteError) as error:
        await client.call("hello", {"protocol": 99, "name": "x", "role": "decider"})
    assert error.value.code == "unsupported_protocol"
    client.close()


async def test_decider_gets_one_request_per_connection_and_payload_is_served(served) -> None:  # type: ignore[no-untyped-def]
    _, backend, path = served
    seen: list[dict] = []  # type: ignore[type-arg]
    release = asyncio.Event()

    async def decide(info: dict) -> Decision:  # type: ignore[type-arg]
        seen.append(info)
        await release.wait()
        return Decision("accept", permanent=True)

    decider = await Client.connect(path, decide)
    await decider.hello("d", "decider")
    backend.push(packet(1000, b"first"), packet(1000, b"second"))
    await until(lambda: len(seen) == 1)
    info = seen[0]
    assert info["direction"] == "inbound" and info["protocol"] == 17 and info["remote_port"] == 1000
    assert info["local_ip"] == "198.18.0.2" and info["pid"] is None
    tool = await Client.connect(path)
    payload = await tool.call("get_payload", info["id"])
    assert payload == packet(1000, b"first")
    release.set()
    await until(lambda: len(backend.applied) == 2)
    assert [v for _, v, _ in backend.applied] == [Verdict.ACCEPT, Verdict.ACCEPT]
    with pytest.raises(RemoteError) as error:
        await tool.call("get_payload", info["id"])
    assert error.value.code == "unknown_packet"
    backend.push(packet(1000, b"third"))
    stats = await tool.call("get_stats")
    assert stats["cache_hits"] == 1 and len(seen) == 1 and identity_holds(stats)
    tool.close()
    decider.close()


async def test_no_decider_and_timeout_both_give_the_default(served) -> None:  # type: ignore[no-untyped-def]
    server, backend, path = served
    backend.push(packet(1))
    assert backend.applied == [(packet(1), Verdict.DROP, False)]
    silent = await Client.connect(path, lambda info: None)  # never answers
    await silent.hello("silent", "decider")
    backend.push(packet(2))
    await until(lambda: len(backend.applied) == 2, timeout=3)
    stats = server.stats()
    assert stats["timeouts"] == 1 and stats["defaulted"] == 2 and identity_holds(stats)
    silent.close()


async def test_a_leaving_decider_hands_its_requests_to_another(served) -> None:  # type: ignore[no-untyped-def]
    server, backend, path = served
    first_seen: list[int] = []
    leaver = await Client.connect(path, lambda info: first_seen.append(info["id"]))  # type: ignore[func-returns-value]
    await leaver.hello("leaver", "decider")
    backend.push(packet(7))
    await until(lambda: first_seen == [1])
    stayer = await Client.connect(path, lambda info: Decision("block", permanent=False))
    await stayer.hello("stayer", "decider")
    leaver.close()
    await until(lambda: len(backend.applied) == 1)
    assert backend.applied == [(packet(7), Verdict.BLOCK, False)]
    assert server.stats()["defaulted"] == 0
    stayer.close()


async def test_update_verdict_and_clear_cache(served) -> None:  # type: ignore[no-untyped-def]
    _, backend, path = served
    tool = await Client.connect(path)
    conn = {"protocol": 17, "local_ip": "198.18.0.2", "local_port": 53, "remote_ip": "198.18.0.1", "remote_port": 9}
    assert await tool.call("update_verdict", conn, "block") is True
    backend.push(packet(9))
    assert backend.applied[-1] == (packet(9), Verdict.BLOCK, False)
    assert await tool.call("clear_cache") == 1
    with pytest.raises(RemoteError) as error:
        await tool.call("update_verdict", {**conn, "local_ip": "nonsense"}, "block")
    assert error.value.code == "invalid_params"
    with pytest.raises(RemoteError) as error:
        await tool.call("update_verdict", conn, "reroute")
    assert error.value.code == "invalid_params"
    tool.close()


async def test_shutdown_gives_held_packets_the_default(served) -> None:  # type: ignore[no-untyped-def]
    server, backend, path = served
    silent = await Client.connect(path, lambda info: None)
    await silent.hello("silent", "decider")
    backend.push(packet(1), packet(2))
    await until(lambda: server.stats()["in_flight"] == 2)
    await server.stop()
    assert sorted(v.value for _, v, _ in backend.applied) == ["drop", "drop"]
    assert backend.closed and not os.path.exists(path)
    await server.start()  # the fixture stops it again


async def test_asks_beyond_the_in_flight_limit_wait_their_turn() -> None:
    async with serving(max_in_flight=1, verdict_timeout=5.0) as (server, backend, path):
        decider, answers = await held_decider(path)
        backend.push(packet(1), packet(2), packet(3))
        await until(lambda: list(answers) == [1])
        assert server.stats()["waiting_for_decider"] == 2 and server.stats()["in_flight"] == 1
        answers[1].set_result(Decision("accept"))
        await until(lambda: list(answers) == [1, 2])
        answers[2].set_result(Decision("drop"))
        await until(lambda: list(answers) == [1, 2, 3])
        answers[3].set_result(Decision("block"))
        await until(lambda: len(backend.applied) == 3)
        assert [v for _, v, _ in backend.applied] == [Verdict.ACCEPT, Verdict.DROP, Verdict.BLOCK]
        assert identity_holds(server.stats()) and server.stats()["defaulted"] == 0
        decider.close()


async def test_the_backend_is_told_how_many_more_packets_pmk_can_hold() -> None:
    async with serving(packet_cache=8, verdict_timeout=5.0) as (_server, backend, path):
        decider, answers = await held_decider(path)
        backend.push(packet(1), packet(2), packet(3))
        await until(lambda: len(answers) == 3)
        assert backend.rooms[-1] == 5  # three of eight held
        answers[1].set_result(Decision("accept"))
        await until(lambda: backend.rooms[-1] == 6)
        for port in (2, 3):
            answers[port].set_result(Decision("accept"))
        await until(lambda: backend.rooms[-1] == 8)
        decider.close()


async def test_an_answer_after_the_timeout_counts_as_late(served) -> None:  # type: ignore[no-untyped-def]
    server, backend, path = served
    pending: list[asyncio.Future[Decision]] = []

    def decide(info: dict) -> asyncio.Future[Decision]:  # type: ignore[type-arg]
        pending.append(asyncio.get_running_loop().create_future())
        return pending[-1]

    decider = await Client.connect(path, decide)
    await decider.hello("slow", "decider")
    backend.push(packet(4))
    await until(lambda: server.stats()["timeouts"] == 1)
    pending[0].set_result(Decision("accept"))
    await until(lambda: server.stats()["late_verdicts"] == 1)
    assert backend.applied == [(packet(4), Verdict.DROP, False)]  # the default, not the late accept
    assert server.stats()["protocol_errors"] == 0
    decider.close()


class SlowKernelBackend(RecordingBackend):
    """A kernel verdict cache whose updates take a while, and fail when told to."""

    kernel_verdict_cache = True

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.fail = False
        self.marks: dict[object, Verdict | None] = {}

    def update_connection(self, key: ConnKey, verdict: Verdict | None) -> None:
        assert self.release.wait(10), "the test never let the update finish"
        if self.fail:
            raise KernelUpdateError("conntrack refused")
        self.marks[key] = verdict


async def test_a_kernel_update_runs_off_the_loop_and_a_failure_is_an_internal_error() -> None:
    directory = tempfile.mkdtemp(prefix="pmk-test-")
    path = os.path.join(directory, "pmk.sock")
    backend = SlowKernelBackend()
    server = Server(ServeConfig(endpoint=path, policy=default_only(Verdict.DROP)), backend)
    await server.start()
    try:
        tool = await Client.connect(path)
        conn = {"protocol": 17, "local_ip": "198.18.0.2", "local_port": 53, "remote_ip": "198.18.0.1", "remote_port": 9}
        update = asyncio.ensure_future(tool.call("update_verdict", conn, "block"))
        # While the kernel update blocks its worker, the loop still answers.
        stats = await asyncio.wait_for(tool.call("get_stats"), 2)
        assert stats["verdict_cache_entries"] == 0 and not update.done()
        backend.release.set()
        assert await asyncio.wait_for(update, 5) is True
        assert list(backend.marks.values()) == [Verdict.BLOCK]
        assert (await tool.call("get_stats"))["verdict_cache_entries"] == 1
        backend.fail = True
        with pytest.raises(RemoteError) as error:
            await tool.call("update_verdict", conn, "accept")
        assert error.value.code == "internal_error"
        # The old verdict is still in force in pmk's cache (and the kernel's, the stand-in says).
        backend.push(packet(9))
        assert backend.applied[-1] == (packet(9), Verdict.BLOCK, True)
        assert list(backend.marks.values()) == [Verdict.BLOCK]
        tool.close()
    finally:
        await server.stop()
        os.rmdir(directory)


async def test_connections_open_at_start_are_listed_right_before_and_after_capture_starts() -> None:
    calls: list[str] = []

    class OrderedBackend(RecordingBackend):
        def start(self, loop: asyncio.AbstractEventLoop, sink: PacketSink) -> None:
            calls.append("backend.start")
            super().start(loop, sink)

    def existing(handshake_done: bool) -> list[ConnKey]:
        calls.append(f"existing({handshake_done})")
        # Port 2 is in both snapshots; port 3 finished its handshake while capture started.
        ports = (2, 3) if handshake_done else (1, 2)
        return [ConnKey(17, bytes([198, 18, 0, 2]), 53, bytes([198, 18, 0, 1]), port) for port in ports]

    directory = tempfile.mkdtemp(prefix="pmk-test-")
    path = os.path.join(directory, "pmk.sock")
    backend = OrderedBackend()
    server = Server(ServeConfig(endpoint=path, policy=default_only(Verdict.DROP)), backend)
    await server.start(existing)
    try:
        assert calls == ["existing(False)", "backend.start", "existing(True)"]
        assert server.stats()["preaccepted"] == 3
        backend.push(packet(1), packet(3), packet(4))
        await until(lambda: len(backend.applied) == 3)
        verdicts = {raw: verdict for raw, verdict, _ in backend.applied}
        # No decider: only the connection that was not open at start gets the policy's drop.
        assert verdicts == {packet(1): Verdict.ACCEPT, packet(3): Verdict.ACCEPT, packet(4): Verdict.DROP}
        assert identity_holds(server.stats())
    finally:
        await server.stop()
        os.rmdir(directory)


async def test_payload_deciders_observers_and_the_client_list_through_the_client_library(served) -> None:  # type: ignore[no-untyped-def]
    server, backend, path = served
    infos: list[dict] = []  # type: ignore[type-arg]

    def decide(info: dict) -> Decision:  # type: ignore[type-arg]
        infos.append(info)
        return Decision("accept", permanent=True)

    decider = await Client.connect(path, decide)
    hello = await decider.hello("inspector", "decider", payload=True)
    assert hello["verdicts"] == ["accept", "block", "drop"] and hello["verdict_timeout"] == 0.3
    assert hello["max_in_flight"] == server.config.max_in_flight
    events: list[tuple[str, dict]] = []  # type: ignore[type-arg]
    observer = asyncio.ensure_future(
        run_observer(lambda method, event: events.append((method, event)), name="watcher", path=path, reconnect=False)
    )
    await until(lambda: any(e["name"] == "watcher" for e in server.stats()["client_list"]))
    backend.push(packet(1200, b"inspect me"))
    await until(lambda: len(events) == 1)
    assert infos[0]["payload"] == packet(1200, b"inspect me")
    assert 0 < infos[0]["timeout_ms"] <= 300
    method, event = events[0]
    assert method == "connection_new" and "payload" not in event
    assert (event["by"], event["name"], event["verdict"], event["permanent"]) == (
        "decider",
        "inspector",
        "accept",
        True,
    )
    assert event["id"] == infos[0]["id"] and event["remote_port"] == 1200
    stats = server.stats()
    assert stats["connections_new"] == 1
    entries = {e["name"]: e for e in stats["client_list"]}  # type: ignore[attr-defined]
    assert entries["inspector"]["role"] == "decider" and entries["inspector"]["answered"] == 1
    assert entries["inspector"]["latency_p50_ms"] is not None and entries["watcher"]["role"] == "observer"
    assert entries["inspector"]["pid"] == entries["watcher"]["pid"] == os.getpid()
    assert entries["inspector"]["uid"] == os.getuid()
    decider.close()
    observer.cancel()


async def test_an_observer_that_stops_reading_is_cut_off_and_the_packet_path_goes_on(served) -> None:  # type: ignore[no-untyped-def]
    server, backend, path = served
    observer = await Client.connect(path)
    await observer.hello("stuck", "observer")
    assert observer._transport is not None
    observer._transport.pause_reading()
    # No decider: the policy settles every new connection, each an event of ~300 bytes for the
    # observer, far more than the 4 MiB a client may leave unread.
    sent = 0
    for batch in range(60):
        packets = [udp(f"198.18.{1 + batch}.{1 + n // 250}", "198.18.0.2", 1000 + n % 250, 53) for n in range(500)]
        backend.push(*packets)
        sent += len(packets)
        await asyncio.sleep(0)  # let writes happen, as between real batches
        if server.stats()["slow_clients"]:
            break
    assert len(backend.applied) == sent  # every packet got its verdict meanwhile
    assert server.stats()["slow_clients"] == 1, "the observer was never cut off"
    await until(lambda: server.stats()["clients"] == 0)  # connection_lost follows the abort
    stats = server.stats()
    assert stats["connections_new"] == sent and identity_holds(stats)
    # Deciding goes on for everyone else.
    decider = await Client.connect(path, lambda info: Decision("block"))
    await decider.hello("d", "decider")
    backend.push(packet(7))
    await until(lambda: backend.applied[-1] == (packet(7), Verdict.BLOCK, False))
    decider.close()
    observer.close()
