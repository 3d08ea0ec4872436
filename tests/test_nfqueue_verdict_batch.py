"""The nfqueue backend's verdict batching and its counters, against a stand-in socket (no root needed).

The backend is never started: packets come in through its netfilterqueue
callback as stand-ins, and its socket is one that records what is sent.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator

import pytest

from pmk.capture.netfilter_rules import MarkCode, mark_value
from pmk.capture.nfq_verdicts import MESSAGE_SIZE_MARKED, NF_DROP, NF_REPEAT
from pmk.capture.nfqueue import NfqueueBackend
from pmk.packet.captured import CapturedPacket
from pmk.verdicts import Verdict

QUEUE = 5
OTHER_BITS = 0x0000_00FF  # a mark outside pmk's mask, which the verdict must keep


class FakePacket:
    """What the backend reads of a netfilterqueue Packet."""

    def __init__(self, packet_id: int) -> None:
        self.id = packet_id
        self.mark = OTHER_BITS
        self.hook = 1  # NF_INET_LOCAL_IN
        self.indev = self.outdev = 2

    def get_payload(self) -> bytes:
        return b""  # no flow: a block or drop re-creates no conntrack entry


class RecordingSocket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.error: int | None = None

    def sendto(self, data: bytes, address: tuple[int, int]) -> None:
        assert address == (0, 0)  # the kernel
        if self.error is not None:
            raise OSError(self.error, "refused")
        self.sent.append(data)

    def close(self) -> None:
        pass


@pytest.fixture
def backend() -> Iterator[NfqueueBackend]:
    b = NfqueueBackend(queue_num=QUEUE)
    b._sock = RecordingSocket()  # type: ignore[assignment]
    try:
        yield b
    finally:
        b.close()


def receive(backend: NfqueueBackend, *ids: int) -> list[CapturedPacket]:
    for packet_id in ids:
        backend._on_packet(FakePacket(packet_id))
    batch, backend._batch = backend._batch, []
    return batch


def sent(backend: NfqueueBackend) -> list[bytes]:
    return backend._sock.sent  # type: ignore[union-attr]


def messages(datagram: bytes) -> list[tuple[int, int, int | None]]:
    """(verdict, packet id, mark or None) of each message in a datagram."""
    out, off = [], 0
    while off < len(datagram):
        length = struct.unpack_from("=I", datagram, off)[0]
        verdict, packet_id = struct.unpack_from(">II", datagram, off + 24)
        mark = struct.unpack_from(">I", datagram, off + 36)[0] if length == MESSAGE_SIZE_MARKED else None
        out.append((verdict, packet_id, mark))
        off += length
    return out


def counts(backend: NfqueueBackend) -> dict[str, int]:
    stats = backend.stats()
    return {k: stats[k] for k in ("accepted", "blocked", "dropped", "verdict_errors", "verdict_sends")}


def test_verdicts_of_several_applies_go_out_in_one_datagram_at_the_flush(backend: NfqueueBackend) -> None:
    a, b, c = receive(backend, 11, 12, 13)
    backend.apply([a], Verdict.ACCEPT, True)
    backend.apply([b], Verdict.BLOCK, True)
    backend.apply([c], Verdict.DROP, False)
    assert sent(backend) == []
    assert counts(backend)["accepted"] == 0  # counted once sent
    backend.flush_verdicts()
    assert [messages(d) for d in sent(backend)] == [
        [
            (NF_REPEAT, 11, OTHER_BITS | mark_value(MarkCode.ACCEPT)),
            (NF_REPEAT, 12, OTHER_BITS | mark_value(MarkCode.BLOCK)),
            (NF_DROP, 13, None),
        ]
    ]
    assert counts(backend) == {"accepted": 1, "blocked": 1, "dropped": 1, "verdict_errors": 0, "verdict_sends": 1}
    backend.flush_verdicts()  # nothing left: nothing sent
    assert len(sent(backend)) == 1


def test_a_packet_gets_one_verdict_only(backend: NfqueueBackend) -> None:
    (a,) = receive(backend, 21)
    backend.apply([a], Verdict.ACCEPT, False)
    backend.apply([a], Verdict.BLOCK, False)
    backend.flush_verdicts()
    assert [messages(d) for d in sent(backend)] == [[(NF_REPEAT, 21, OTHER_BITS | mark_value(MarkCode.ACCEPT_ONCE))]]
    assert counts(backend) == {"accepted": 1, "blocked": 0, "dropped": 0, "verdict_errors": 1, "verdict_sends": 1}


def test_a_failed_send_counts_every_verdict_in_it_as_an_error(backend: NfqueueBackend) -> None:
    backend.apply(receive(backend, 31, 32), Verdict.ACCEPT, True)
    backend._sock.error = errno.ENOBUFS  # type: ignore[union-attr]
    backend.flush_verdicts()
    assert counts(backend) == {"accepted": 0, "blocked": 0, "dropped": 0, "verdict_errors": 2, "verdict_sends": 0}
    backend._sock.error = None  # type: ignore[union-attr]
    backend.apply(receive(backend, 33), Verdict.ACCEPT, True)
    backend.flush_verdicts()  # the failed ones are not sent again; the next batch stands alone
    assert [[m[1] for m in messages(d)] for d in sent(backend)] == [[33]]
    assert counts(backend)["accepted"] == 1


def test_a_long_batch_is_split_and_every_verdict_counted_once(backend: NfqueueBackend) -> None:
    packets = receive(backend, *range(1000, 3000))
    backend.apply(packets, Verdict.ACCEPT, True)
    backend.flush_verdicts()
    ids = [m[1] for d in sent(backend) for m in messages(d)]
    assert len(sent(backend)) == 2
    assert ids == list(range(1000, 3000))
    assert counts(backend) == {"accepted": 2000, "blocked": 0, "dropped": 0, "verdict_errors": 0, "verdict_sends": 2}


def test_close_sends_what_is_pending_and_later_verdicts_are_errors(backend: NfqueueBackend) -> None:
    a, b = receive(backend, 41, 42)
    backend.apply([a], Verdict.DROP, False)
    backend.close()
    assert [messages(d) for d in sent(backend)] == [[(NF_DROP, 41, None)]]
    backend.apply([b], Verdict.ACCEPT, False)  # its queue is gone
    assert counts(backend)["verdict_errors"] == 1
