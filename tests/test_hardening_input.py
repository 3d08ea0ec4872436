"""Hostile and broken clients against a live pmk (issue 5, item 2).

pmk runs in the server namespace with the nfqueue backend scoped to one UDP
port; a well-behaved decider answers every datagram with a temporary accept,
so every datagram of a steady ping stream is a ``decide`` request. While it
runs, raw clients (plain msgpack over the socket, no pmk client library) send
garbage of every kind. After each attack: pmk is alive, the attacker got
protocol errors or was closed, the decider went on getting and answering
requests, and the stats identity holds. (Decoder-level fuzzing lives in
tests/test_fuzz_decoder.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack

from pmk.client import Decision
from pmk.rpc.codec import MAX_FRAME_BYTES
from tests.harness import ScriptedDecider, Testbed, eventually, needs_root, netns

PORT = 7211
READ_QUIET = 0.5

pytestmark = [netns, needs_root]


class RawPeer:
    """A client speaking raw bytes; collects whatever pmk sends until EOF."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        self.messages: list[Any] = []
        self.eof = False

    @classmethod
    async def connect(cls, path: str) -> RawPeer:
        reader, writer = await asyncio.open_unix_connection(path, limit=4 << 20)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def request(self, msgid: Any, method: Any, params: Any) -> None:
        await self.send(msgpack.packb([0, msgid, method, params]))

    async def _read_once(self, seconds: float) -> bool:
        """Read until a message arrives; False on silence for ``seconds`` or EOF.

        ``connection_new`` events are left out: a peer whose hello said
        observer gets one per decision of the steady ping stream, which would
        otherwise never let the line fall silent.
        """
        deadline = asyncio.get_running_loop().time() + seconds
        while True:
            try:
                data = await asyncio.wait_for(self.reader.read(1 << 16), deadline - asyncio.get_running_loop().time())
            except TimeoutError:
                return False
            except ConnectionError:
                data = b""
            if not data:
                self.eof = True
                return False
            self.unpacker.feed(data)
            before = len(self.messages)
            self.messages.extend(
                m for m in self.unpacker if not (isinstance(m, list) and m[:2] == [2, "connection_new"])
            )
            if len(self.messages) > before:
                return True

    async def read_some(self, seconds: float) -> list[Any]:
        """What one read brings (nothing after ``seconds`` of silence): to answer each message at once."""
        start = len(self.messages)
        await self._read_once(seconds)
        return self.messages[start:]

    async def read_for(self, seconds: float = READ_QUIET) -> list[Any]:
        """Read until EOF or ``seconds`` of silence; return the new messages."""
        start = len(self.messages)
        while not self.eof and await self._read_once(seconds):
            pass
        return self.messages[start:]

    async def read_while(self, wanted: Callable[[], bool], seconds: float = 10.0) -> None:
        """Read while ``wanted()`` holds, until EOF or ``seconds`` of silence."""
        while wanted() and not self.eof and await self._read_once(seconds):
            pass

    async def read_until(self, count: int, seconds: float = 30.0) -> list[Any]:
        """Read until ``count`` messages in total, EOF, or ``seconds`` of silence."""
        while len(self.messages) < count and await self._read_once(seconds):
            pass
        return self.messages

    def close(self) -> None:
        self.writer.close()


def errors(messages: list[Any]) -> list[str]:
    """The error codes in responses and protocol_error notifications."""
    codes = []
    for message in messages:
        if message[0] == 1 and message[2] is not None:
            codes.append(message[2]["code"])
        elif message[0] == 2 and message[1] == "protocol_error":
            codes.append(message[2][0]["code"])
    return codes


@contextlib.asynccontextmanager
async def live_pmk(args: list[str] = ()) -> AsyncIterator[tuple[Testbed, ScriptedDecider]]:  # type: ignore[assignment]
    """pmk + a temporary-accept decider + a steady ping stream through pmk."""
    async with Testbed("nfqueue", [f"udp:{PORT}"], list(args)) as bed:
        decider = await bed.decider(lambda info: Decision("accept"), name="well-behaved")
        await bed.client.udp_open(bed.hosts.server_ip, PORT, id="p")
        stop = asyncio.Event()

        async def ping() -> None:
            n = 0
            while not stop.is_set():
                await bed.client.ping(f"ping {n}", id="p", timeout=3)
                n += 1
                await asyncio.sleep(0.02)

        pinger = asyncio.ensure_future(ping())
        try:
            await decider.wait_decides(3)
            yield bed, decider
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await pinger


async def still_serving(bed: Testbed, decider: ScriptedDecider) -> None:
    """The decider keeps getting (and answering) requests; the identity holds."""
    before = len(decider.infos)
    await decider.wait_decides(before + 3)
    await eventually(lambda: len(bed.peer.udp(PORT)) >= before + 1, "pings answered after the attack")
    stats = await bed.server.check_identity()
    assert stats["deciders"] == 1


async def test_random_bytes_truncated_and_oversized_frames() -> None:
    async with live_pmk() as (bed, decider):
        path = bed.server.path
        rng = random.Random(5)
        # Random bytes: protocol errors, and pmk closes once the stream cannot be framed.
        for _ in range(20):
            peer = await RawPeer.connect(path)
            await peer.send(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096))))
            got = await peer.read_for()
            assert all(m[0] in (1, 2) for m in got), got
            assert all(
                code
                in {
                    "malformed",
                    "invalid_message",
                    "frame_too_large",
                    "unknown_method",
                    "invalid_params",
                    "unknown_msgid",
                }
                for code in errors(got)
            ), got
            peer.close()
        # A truncated frame: pmk waits for the rest, answering nothing; the writer goes away.
        peer = await RawPeer.connect(path)
        frame = msgpack.packb([0, 1, "get_stats", []])
        await peer.send(frame[: len(frame) // 2])
        assert await peer.read_for() == [] and not peer.eof
        peer.close()
        # Oversized: one frame past the documented maximum -> frame_too_large, then closed.
        peer = await RawPeer.connect(path)
        await peer.send(msgpack.packb([0, 2, "get_stats", [b"x" * (MAX_FRAME_BYTES + 1)]]))
        got = await peer.read_for(5.0)
        assert errors(got) == ["frame_too_large"] and peer.eof, got
        peer.close()
        # Just under the maximum is an ordinary (invalid) request, answered.
        peer = await RawPeer.connect(path)
        await peer.send(msgpack.packb([0, 3, "get_stats", [b"x" * (MAX_FRAME_BYTES - 64)]]))
        got = await peer.read_for(5.0)
        assert [(m[0], m[1]) for m in got] == [(1, 3)] and errors(got) == ["invalid_params"], got
        assert not peer.eof
        peer.close()
        stats = await bed.server.stats()
        assert stats["protocol_errors"] >= 2
        await still_serving(bed, decider)


WRONG = [None, True, -1, 2**40, 1.5, "x", b"\x00", [], [1, 2], {}, {"a": 1}]
CONN = {"protocol": 17, "local_ip": "198.18.0.2", "local_port": 9, "remote_ip": "198.18.0.1", "remote_port": 9}
METHODS: dict[str, list[Any]] = {
    "hello": [{"protocol": 1, "name": "x", "role": "observer"}],
    "get_payload": [1],
    "get_stats": [],
    "get_version": [],
    "clear_cache": [],
    "update_verdict": [CONN, "accept"],
}


def mutations() -> list[tuple[str, list[Any]]]:
    """Every method with each param (and each field of a map param) replaced by each wrong value."""
    out: list[tuple[str, list[Any]]] = []
    for method, params in METHODS.items():
        out += [(method, wrong) for wrong in WRONG if not isinstance(wrong, list) or wrong != params]
        out.append((method, [*params, "extra"]))
        for index, value in enumerate(params):
            for wrong in WRONG:
                out.append((method, [*params[:index], wrong, *params[index + 1 :]]))
            if isinstance(value, dict):
                for field in value:
                    for wrong in WRONG:
                        out.append((method, [*params[:index], {**value, field: wrong}, *params[index + 1 :]]))
    return out


async def test_wrong_types_in_every_field_of_every_method() -> None:
    async with live_pmk() as (bed, decider):
        peer = await RawPeer.connect(bed.server.path)
        cases = mutations()
        for msgid, (method, params) in enumerate(cases):
            await peer.request(msgid, method, params)
        got = await peer.read_until(len(cases))
        assert not peer.eof
        assert sorted(m[1] for m in got) == list(range(len(cases))), "every request answered exactly once"
        for message in got:
            assert message[0] == 1
            method, params = cases[message[1]]
            if message[2] is not None:
                assert message[2]["code"] in {
                    "invalid_params",
                    "invalid_message",
                    "unknown_packet",
                    "unsupported_protocol",
                }
            else:  # a mutation that happens to be valid, e.g. hello with the name "x"
                assert method in {"hello", "update_verdict"} and params != [], (method, params, message)
        # The message level: wrong types for the envelope itself.
        envelopes = (
            [0, "1", "get_stats", []],
            [0, 1, 5, []],
            [0, 1, "get_stats", {}],
            [0, -1, "x", []],
            [7, 1, "x", []],
            [0, 1, "x"],
            [],
            "hello",
            [2, 5, []],
            [1, "x", None, None],
        )
        for bad in envelopes:
            await peer.send(msgpack.packb(bad))
        got = await peer.read_for()
        assert errors(got) == ["invalid_message"] * len(envelopes) and not peer.eof, got
        peer.close()
        await still_serving(bed, decider)


async def test_responses_to_unknown_msgids_and_verdicts_for_gone_ids() -> None:
    async with live_pmk(["--verdict-timeout", "2"]) as (bed, decider):
        hostile = await RawPeer.connect(bed.server.path)
        for msgid in (0, 7, 2**32 - 1):
            await hostile.send(msgpack.packb([1, msgid, None, {"verdict": "accept", "permanent": True}]))
        got = await hostile.read_for()
        assert errors(got) == ["unknown_msgid"] * 3 and not hostile.eof, got
        # Become a second decider. Least-loaded dispatch gives it requests when
        # several connections ask at once, so send bursts from four sockets.
        await hostile.request(100, "hello", [{"protocol": 1, "name": "hostile", "role": "decider"}])
        for n in range(4):
            await bed.client.udp_open(bed.hosts.server_ip, PORT, id=f"burst{n}")
        bad_answers = ({"verdict": 5}, {"verdict": "accept", "permanent": "yes"}, "accept")
        kept: list[Any] = []  # the first request, answered only after pmk gave up on it
        answered_badly = 0

        def invalid() -> int:
            return errors(hostile.messages).count("invalid_params")

        async def collect() -> None:
            nonlocal answered_badly
            # Until each bad answer got its notification. Each is sent the moment its decide is
            # read, but a decide that a loaded machine delivers after its deadline gets a late
            # answer, which by design gets no error: then the next decide is answered badly too.
            while invalid() < len(bad_answers):
                for n in range(4):
                    await bed.client.send(f"burst {n}", id=f"burst{n}")
                # One read at a time: reading on until a quiet moment could hold a decide past its
                # deadline while other requests trickle in.
                for message in await hostile.read_some(0.2):
                    if message[0] != 0 or message[2] != "decide":
                        continue
                    if not kept:
                        kept.append(message)
                    elif invalid() < len(bad_answers):
                        before = invalid()
                        bad = bad_answers[answered_badly % len(bad_answers)]
                        await hostile.send(msgpack.packb([1, message[1], None, bad]))
                        answered_badly += 1
                        # Its notification, one at a time, so that none is still on its way later.
                        await hostile.read_while(lambda before=before: invalid() == before, 3.0)

        try:
            await asyncio.wait_for(collect(), 60)
        finally:
            if invalid() < len(bad_answers):
                hostile.close()
        await bed.server.wait_stats(lambda s: s["default_timeout"] >= 1, "pmk to give up on the kept request")
        # The answer for a packet that is gone: dropped quietly, the connection stays.
        await hostile.send(msgpack.packb([1, kept[0][1], None, {"verdict": "accept", "permanent": True}]))
        assert errors(await hostile.read_for()) == []
        assert not hostile.eof
        stats = await bed.server.stats()
        assert stats["default_invalid"] == invalid() >= len(bad_answers)
        hostile.close()
        await bed.server.wait_stats(lambda s: s["deciders"] == 1, "the hostile decider to be gone")
        await still_serving(bed, decider)


async def test_request_flood_is_answered_or_cut_off_without_stalling_the_decider() -> None:
    async with live_pmk() as (bed, decider):
        # A pipelining client that reads: every request answered.
        reader = await RawPeer.connect(bed.server.path)
        count = 20_000
        flood = b"".join(msgpack.packb([0, i, "get_version", []]) for i in range(count))
        sending = asyncio.ensure_future(reader.send(flood))
        await asyncio.wait_for(reader.read_until(count), 120)
        await sending
        assert len(reader.messages) == count and errors(reader.messages) == []
        reader.close()
        # One that never reads: cut off once too far behind, others unaffected.
        rude = await RawPeer.connect(bed.server.path)
        stats_flood = msgpack.packb([0, 1, "get_stats", []]) * 50_000
        with contextlib.suppress(ConnectionError):
            rude.writer.write(stats_flood)
            await asyncio.wait_for(rude.writer.drain(), 30)
        await bed.server.wait_stats(lambda s: s["slow_clients"] >= 1, "the non-reading client to be cut off")
        rude.close()
        await still_serving(bed, decider)
        assert os.path.exists(bed.server.path)
