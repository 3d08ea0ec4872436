"""nfqueue reads no more than pmk can hold; the rest waits in the kernel (stand-ins, no root needed).

The backend is never started: a stand-in netfilterqueue hands it packets as
the real one does (one callback per packet, until the reader's budget is
spent), and a stand-in loop records when reading stops and starts again.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pmk.capture.nfqueue import MAX_BATCH, NfqueueBackend, _BoundedRecv
from pmk.packet.captured import CapturedPacket


class FakePacket:
    def __init__(self, packet_id: int) -> None:
        self.id = packet_id
        self.mark = 0
        self.hook = 1  # NF_INET_LOCAL_IN
        self.indev = self.outdev = 2

    def get_payload(self) -> bytes:
        return b""


class KernelQueue:
    """netfilterqueue's ``run_socket``: packets waiting in the kernel, read until the budget is spent."""

    def __init__(self, backend: NfqueueBackend, waiting: int) -> None:
        self.backend, self.waiting, self.next_id = backend, waiting, 1

    def run_socket(self, reader: Any) -> None:
        while self.waiting and reader.left > 0:
            reader.left -= 1
            self.waiting -= 1
            self.backend._on_packet(FakePacket(self.next_id))
            self.next_id += 1


class Socket:
    def fileno(self) -> int:
        return 99

    def close(self) -> None:
        pass


class Loop:
    """Records the reader's registration."""

    def __init__(self) -> None:
        self.reading = True
        self.changes: list[str] = []

    def add_reader(self, fd: int, callback: Any) -> None:
        self.reading = True
        self.changes.append("add")

    def remove_reader(self, fd: int) -> bool:
        self.reading = False
        self.changes.append("remove")
        return True


@pytest.fixture
def setup() -> Iterator[tuple[NfqueueBackend, KernelQueue, Loop, list[list[CapturedPacket]]]]:
    backend = NfqueueBackend(queue_num=7)
    batches: list[list[CapturedPacket]] = []
    loop = Loop()
    kernel = KernelQueue(backend, waiting=1000)
    backend._nfq = kernel
    backend._sock = Socket()  # type: ignore[assignment]
    backend._reader = _BoundedRecv(backend._sock)  # type: ignore[arg-type]
    backend._loop = loop  # type: ignore[assignment]
    backend._sink = batches.append
    try:
        yield backend, kernel, loop, batches
    finally:
        backend._nfq = None
        backend._loop = None
        backend.close()


def test_without_word_from_the_server_a_read_takes_a_whole_batch(setup) -> None:  # type: ignore[no-untyped-def]
    backend, _kernel, loop, batches = setup
    backend._drain()
    backend._drain()
    assert [len(b) for b in batches] == [MAX_BATCH, MAX_BATCH]
    assert loop.changes == []


def test_a_read_takes_no_more_than_the_room_pmk_has(setup) -> None:  # type: ignore[no-untyped-def]
    backend, kernel, _loop, batches = setup
    backend.set_room(5)
    backend._drain()
    assert [len(b) for b in batches] == [5]
    assert kernel.waiting == 995  # the rest stays in the kernel's queue


def test_with_no_room_reading_stops_until_the_server_says_there_is_some(setup) -> None:  # type: ignore[no-untyped-def]
    backend, _kernel, loop, batches = setup
    backend.set_room(3)
    backend._drain()  # takes 3: the room is used up until the server says again
    backend._drain()
    assert [len(b) for b in batches] == [3]
    assert loop.changes == ["remove"] and not loop.reading
    assert backend.stats()["read_pauses"] == 1
    backend.set_room(0)  # still none: stays paused, no second registration
    assert loop.changes == ["remove"]
    backend.set_room(MAX_BATCH + 10)
    assert loop.changes == ["remove", "add"] and loop.reading
    backend._drain()
    assert [len(b) for b in batches] == [3, MAX_BATCH]
    assert backend.stats()["received"] == 3 + MAX_BATCH
