"""Row E: a raw msgpack-RPC round trip over a Unix socket on uvloop, the floor of a decision.

    python -m pmk.bench.rpc_echo serve --path SOCK
    python -m pmk.bench.rpc_echo call --path SOCK --count N --window W

The server answers every request with a fixed accept, as a decider would;
the caller sends requests shaped like pmk's ``decide`` (window 1: one at a
time, with per-request latency; larger: pipelined). Both sides decode with
one msgpack Unpacker and write all answers of one read with one call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import msgpack

from pmk.loop import run as run_loop
from pmk.rpc import names

_ANSWER = {"verdict": "accept", "permanent": True}
_INFO = {
    "id": 0,
    "direction": "inbound",
    "ip_version": 4,
    "protocol": 17,
    "local_ip": "198.18.0.2",
    "local_port": 5201,
    "remote_ip": "198.19.0.1",
    "remote_port": 1024,
    "interface": 2,
    "sub_interface": 0,
    "size": 46,
    "pid": None,
}


class _EchoServer(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.unpacker = msgpack.Unpacker(raw=False)

    def data_received(self, data: bytes) -> None:
        self.unpacker.feed(data)
        out = bytearray()
        pack = msgpack.packb
        for message in self.unpacker:
            out += pack([1, message[1], None, _ANSWER])
        self.transport.write(bytes(out))  # type: ignore[attr-defined]


async def serve(path: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(_EchoServer, path)
    print(json.dumps({"ready": True}), flush=True)
    async with server:
        await loop.run_in_executor(None, sys.stdin.read)  # until the bench closes stdin


class _Caller(asyncio.Protocol):
    def __init__(self, count: int, window: int, done: asyncio.Future[None]) -> None:
        self.count, self.window, self.done = count, window, done
        self.unpacker = msgpack.Unpacker(raw=False)
        self.sent = self.answered = 0
        self.sent_at: dict[int, int] = {}
        self.latencies: list[int] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._send(min(self.window, self.count))

    def _send(self, n: int) -> None:
        out = bytearray()
        now = time.monotonic_ns()
        for _ in range(n):
            msgid = self.sent
            _INFO["id"] = msgid
            out += msgpack.packb([0, msgid, names.DECIDE, [_INFO]])
            self.sent_at[msgid] = now
            self.sent += 1
        if out:
            self.transport.write(bytes(out))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.unpacker.feed(data)
        now = time.monotonic_ns()
        answered = 0
        for message in self.unpacker:
            self.latencies.append(now - self.sent_at.pop(message[1]))
            answered += 1
        self.answered += answered
        if self.answered >= self.count:
            if not self.done.done():
                self.done.set_result(None)
            return
        self._send(min(answered, self.count - self.sent))


async def call(path: str, count: int, window: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    start = time.perf_counter()
    transport, caller = await loop.create_unix_connection(lambda: _Caller(count, window, done), path)
    await asyncio.wait_for(done, 60)
    elapsed = time.perf_counter() - start
    transport.close()
    ordered = sorted(caller.latencies)
    return {
        "requests": caller.answered,
        "elapsed": elapsed,
        "rps": caller.answered / elapsed,
        "lat_p50_us": ordered[len(ordered) // 2] / 1e3,
        "lat_p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    modes = parser.add_subparsers(dest="mode", required=True)
    s = modes.add_parser("serve")
    s.add_argument("--path", required=True)
    c = modes.add_parser("call")
    c.add_argument("--path", required=True)
    c.add_argument("--count", type=int, default=20000)
    c.add_argument("--window", type=int, default=1)
    args = parser.parse_args(argv)
    if args.mode == "serve":
        run_loop(serve(args.path))
    else:
        print(json.dumps(run_loop(call(args.path, args.count, args.window))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
