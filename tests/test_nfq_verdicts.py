"""The verdict messages pmk batches for NFQUEUE, byte for byte (no root needed)."""

from __future__ import annotations

import struct

import pytest

from pmk.capture.nfq_verdicts import (
    ERROR_TYPE,
    MESSAGE_SIZE_MARKED,
    MESSAGE_SIZE_PLAIN,
    NF_DROP,
    NF_REPEAT,
    VerdictBatch,
    refusal_errno,
)


def _nlmsghdr(size: int) -> bytes:
    # nlmsg_len, type NFNL_SUBSYS_QUEUE<<8 | NFQNL_MSG_VERDICT, flags NLM_F_REQUEST only (no ack), seq, pid
    return struct.pack("=IHHII", size, 0x0301, 1, 0, 0)


def test_a_repeat_with_a_new_mark_is_one_40_byte_message() -> None:
    batch = VerdictBatch(7)
    batch.add(0x01020304, NF_REPEAT, 0xAABBCCDD)
    expected = (
        _nlmsghdr(40)
        + bytes([0, 0, 0x00, 0x07])  # nfgenmsg: AF_UNSPEC, version 0, queue 7 big-endian
        + struct.pack("=HH", 12, 2)  # NFQA_VERDICT_HDR
        + bytes([0, 0, 0, 4, 1, 2, 3, 4])  # NF_REPEAT, packet id, both big-endian
        + struct.pack("=HH", 8, 3)  # NFQA_MARK
        + bytes([0xAA, 0xBB, 0xCC, 0xDD])
    )
    assert len(batch) == MESSAGE_SIZE_MARKED
    assert batch.take() == expected
    assert len(batch) == 0


def test_a_drop_carries_no_mark_and_messages_follow_each_other() -> None:
    batch = VerdictBatch(0x1234)
    batch.add(5, NF_DROP)
    batch.add(6, NF_REPEAT, 0x10)
    data = batch.take()
    assert len(data) == MESSAGE_SIZE_PLAIN + MESSAGE_SIZE_MARKED
    first, second = data[:MESSAGE_SIZE_PLAIN], data[MESSAGE_SIZE_PLAIN:]
    assert first == _nlmsghdr(32) + b"\x00\x00\x12\x34" + struct.pack("=HH", 12, 2) + b"\x00" * 4 + b"\x00\x00\x00\x05"
    assert second[:16] == _nlmsghdr(40)
    assert (
        second[20:]
        == struct.pack("=HH", 12, 2)
        + b"\x00\x00\x00\x04\x00\x00\x00\x06"
        + struct.pack("=HH", 8, 3)
        + b"\x00\x00\x00\x10"
    )


def test_refusals_are_told_apart_from_packets_and_acks() -> None:
    refused = struct.pack("=IHHIIi", 36, 2, 0, 0, 99, -2) + _nlmsghdr(40)[:16]
    ack = struct.pack("=IHHIIi", 36, 2, 0, 0, 99, 0) + _nlmsghdr(40)[:16]
    packet = struct.pack("=IHHII", 100, 0x0300, 0, 0, 0)
    assert refused[4:6] == ack[4:6] == ERROR_TYPE != packet[4:6]
    assert refusal_errno(refused) == 2  # ENOENT: the packet was no longer queued
    assert refusal_errno(ack) == 0
    with pytest.raises(ValueError):
        refusal_errno(packet)


def test_queue_numbers_outside_16_bits_are_refused() -> None:
    with pytest.raises(ValueError):
        VerdictBatch(65536)
