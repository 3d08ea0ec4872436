"""Row B: a bare pydivert loop that receives and re-injects with no logic at all.

    python -m pmk.bench.bare --filter F [--mode batch|single] [--batch N] [--ring-bytes B]

``batch`` drains eBPFDivert the way pmk does (``recv_ex`` of up to N packets
on each wake-up of the event fd, on uvloop) and hands the very same buffer
and address array back to ``send_ex``: the floor any pmk-like interceptor
pays. ``single`` is the naive loop written with pydivert's public API
(``recv``/``send``, one packet object each). A line ``stats`` on stdin is
answered with a JSON line of counters; end of input stops the loop.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import errno
import json
import sys

import pydivert

from pmk.capture.divert import MAX_BATCH


class BareLoop:
    def __init__(self, divert: pydivert.Divert, mode: str, batch: int) -> None:
        self.divert, self.mode, self.batch = divert, mode, batch
        self.handled = 0
        self.wakeups = 0
        self.send_errors = 0
        if mode == "batch":
            from pydivert.bpf import libebpfdivert
            from pydivert.windivert_dll.structs import WinDivertAddress

            self.lib = libebpfdivert
            self.handle = divert._impl._handle
            self.buffer = (ctypes.c_char * (MAX_BATCH * 65_575))()
            self.addresses = (WinDivertAddress * batch)()
            self.received = ctypes.c_uint32(0)
            self.count = ctypes.c_uint32(0)
            self.sent = ctypes.c_uint32(0)

    @property
    def event_fd(self) -> int:
        return self.divert._impl._event_fd

    def drain(self) -> None:
        self.wakeups += 1
        if self.mode == "batch":
            self._drain_batch()
        else:
            self._drain_single()

    def _drain_batch(self) -> None:
        lib, handle = self.lib, self.handle
        for _ in range(8):
            self.count.value = self.batch
            ret = lib.ebpfdivert_recv_ex(
                handle,
                self.buffer,
                len(self.buffer),
                ctypes.byref(self.received),
                self.addresses,
                ctypes.byref(self.count),
                0,
            )
            if ret < 0:
                if -ret in (errno.EAGAIN, errno.ETIMEDOUT):
                    return
                raise OSError(-ret, "recv_ex failed")
            n = self.count.value
            if (
                lib.ebpfdivert_send_ex(
                    handle, self.buffer, self.received.value, ctypes.byref(self.sent), self.addresses, n
                )
                < 0
            ):
                self.send_errors += n
            self.handled += n
            if n < self.batch:
                return

    def _drain_single(self) -> None:
        for _ in range(self.batch):
            try:
                packet = self.divert.recv(timeout=0)
            except TimeoutError:
                return
            try:
                self.divert.send(packet, recalculate_checksum=False)
            except OSError:
                self.send_errors += 1
            self.handled += 1

    def stats(self) -> dict[str, int]:
        native = self.divert.stats()
        return {
            "handled": self.handled,
            "wakeups": self.wakeups,
            "send_errors": self.send_errors,
            "bypassed": int(native.get("ringbuf_full", 0)),
            "diverted": int(native.get("diverted", 0)),
        }


async def run(args: argparse.Namespace) -> None:
    options: dict[str, object] = {}
    if args.ring_bytes:
        options["ring_bytes"] = args.ring_bytes
    divert = pydivert.Divert(args.filter, **options)
    divert.open()
    loop = asyncio.get_running_loop()
    bare = BareLoop(divert, args.mode, max(1, min(args.batch, MAX_BATCH)))
    loop.add_reader(bare.event_fd, bare.drain)
    done = loop.create_future()

    def on_command() -> None:
        line = sys.stdin.readline()
        if not line:
            if not done.done():
                done.set_result(None)
            return
        print(json.dumps(bare.stats()), flush=True)

    loop.add_reader(sys.stdin.fileno(), on_command)
    print(json.dumps({"ready": True}), flush=True)
    try:
        await done
    finally:
        loop.remove_reader(sys.stdin.fileno())
        loop.remove_reader(bare.event_fd)
        divert.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--filter", required=True)
    parser.add_argument("--mode", choices=("batch", "single"), default="batch")
    parser.add_argument("--batch", type=int, default=MAX_BATCH)
    parser.add_argument("--ring-bytes", type=int, default=0)
    args = parser.parse_args(argv)
    from pmk.loop import run as run_loop

    run_loop(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
