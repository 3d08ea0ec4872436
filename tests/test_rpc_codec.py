"""The frame decoder's limits and the content rules of protocol/SPEC.md, without sockets."""

from __future__ import annotations

import msgpack
import pytest

from pmk.rpc.codec import MAX_DEPTH, MAX_FRAME_BYTES, Decoder, encode, interpret
from pmk.rpc.messages import ErrorCode, Event, Notification, ProtocolViolation, Request, Response


def pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def notification_of_size(size: int) -> bytes:
    """A ``[2, "x", [bin]]`` frame of exactly ``size`` bytes (size >= 2**16 + 10)."""
    frame = pack([2, "x", [b"\0" * (size - 10)]])  # 5 bytes before the bin 32 header, 5 in it
    assert len(frame) == size
    return frame


def feed_in(decoder: Decoder, data: bytes, step: int) -> list[Event]:
    events: list[Event] = []
    for start in range(0, len(data), step):
        events.extend(decoder.feed(data[start : start + step]))
    return events


def is_fatal(event: Event, code: ErrorCode) -> bool:
    return isinstance(event, ProtocolViolation) and event.fatal and event.code is code


# -- frame size -------------------------------------------------------------


@pytest.mark.parametrize("step", [MAX_FRAME_BYTES * 2, 65536, 65537, 1000])
def test_a_frame_of_exactly_the_maximum_is_accepted(step: int) -> None:
    frame = notification_of_size(MAX_FRAME_BYTES)
    (event,) = feed_in(Decoder(), frame, step)
    assert event == Notification("x", [b"\0" * (MAX_FRAME_BYTES - 10)])


@pytest.mark.parametrize("step", [MAX_FRAME_BYTES * 2, 65536, 65537, 1000])
def test_one_byte_over_the_maximum_is_fatal(step: int) -> None:
    decoder = Decoder()
    events = feed_in(decoder, notification_of_size(MAX_FRAME_BYTES + 1), step)
    assert len(events) >= 1 and all(is_fatal(e, ErrorCode.FRAME_TOO_LARGE) for e in events)
    assert decoder.broken is not None and decoder.broken.code is ErrorCode.FRAME_TOO_LARGE


def test_many_small_frames_in_one_big_read_do_not_trip_the_limit() -> None:
    frame = pack([0, 1, "get_stats", []])
    count = 3 * MAX_FRAME_BYTES // len(frame)
    decoder = Decoder()
    events = decoder.feed(frame * count)
    assert len(events) == count
    assert all(e == Request(1, "get_stats", []) for e in events)
    assert decoder.broken is None and decoder.buffered() == 0


def test_large_frames_back_to_back_in_one_read_are_each_within_the_limit() -> None:
    frame = notification_of_size(MAX_FRAME_BYTES - 100)
    events = Decoder().feed(frame * 3 + frame[:500])
    assert len(events) == 3 and all(isinstance(e, Notification) for e in events)


def test_an_oversized_frame_is_refused_before_it_is_complete() -> None:
    frame = notification_of_size(MAX_FRAME_BYTES * 2)
    decoder = Decoder()
    events = decoder.feed(frame[: MAX_FRAME_BYTES + 65536 + 1])
    assert [e.code for e in events if isinstance(e, ProtocolViolation)] == [ErrorCode.FRAME_TOO_LARGE]


def test_a_long_array_of_small_items_counts_as_one_frame() -> None:
    # msgpack's own read position moves inside a partly read array: the limit
    # must still count from where the frame began.
    header = b"\xdd" + (MAX_FRAME_BYTES * 4).to_bytes(4, "big")
    decoder = Decoder()
    events = feed_in(decoder, header + b"\xc0" * (MAX_FRAME_BYTES + 1), 4096)
    assert events and is_fatal(events[-1], ErrorCode.FRAME_TOO_LARGE)


def test_a_container_announcing_too_many_items_is_refused_at_once() -> None:
    for header in (b"\xdd", b"\xdf"):  # array 32, map 32
        decoder = Decoder()
        events = decoder.feed(b"\x93\x02\xa1x" + header + (MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
        assert len(events) == 1 and is_fatal(events[0], ErrorCode.FRAME_TOO_LARGE), header


def test_a_small_limit_is_honoured_exactly() -> None:
    frame = pack([2, "x", ["y" * 20]])
    (ok,) = Decoder(len(frame)).feed(frame)
    assert isinstance(ok, Notification)
    (refused,) = feed_in(Decoder(len(frame) - 1), frame, 1)
    assert is_fatal(refused, ErrorCode.FRAME_TOO_LARGE)


# -- malformed and broken ---------------------------------------------------


def test_after_a_fatal_violation_the_decoder_stays_broken() -> None:
    decoder = Decoder()
    events = decoder.feed(pack([2, "a", []]) + b"\xc1" + pack([2, "b", []]))
    assert events[0] == Notification("a", [])
    assert len(events) == 2 and is_fatal(events[1], ErrorCode.MALFORMED)
    assert decoder.feed(pack([2, "c", []])) == [decoder.broken]
    assert decoder.feed(b"") == [decoder.broken]


def test_nesting_beyond_the_limit_is_invalid_but_not_fatal() -> None:
    def request(depth: int) -> bytes:
        # depth counts the message array (1) and params (2)
        return b"\x94\x00\x07\xa1m" + b"\x91" * (depth - 2) + b"\x90"

    decoder = Decoder()
    ok, bad, after = decoder.feed(request(MAX_DEPTH) + request(MAX_DEPTH + 1) + pack([2, "n", []]))
    assert isinstance(ok, Request)
    assert bad == ProtocolViolation(ErrorCode.INVALID_MESSAGE, f"nesting deeper than {MAX_DEPTH} levels", False, 7)
    assert after == Notification("n", [])


def test_nesting_deeper_than_msgpack_follows_is_malformed_not_a_crash() -> None:
    (event,) = Decoder().feed(b"\x91" * 100_000)
    assert is_fatal(event, ErrorCode.MALFORMED)


def test_deep_maps_are_counted_too() -> None:
    value: object = 1
    for _ in range(MAX_DEPTH):
        value = {"k": value}
    (event,) = Decoder().feed(pack([0, 3, "m", [value]]))
    assert isinstance(event, ProtocolViolation) and not event.fatal and event.msgid == 3


@pytest.mark.parametrize(
    "text",
    [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"ok\xe2\x82"],
    ids=["ff", "bad-continuation", "surrogate", "over-max", "truncated"],
)
def test_strings_must_be_utf8(text: bytes) -> None:
    frame = b"\x94\x00\x09\xa1m\x91" + bytes([0xA0 | len(text)]) + text
    decoder = Decoder()
    bad, good = decoder.feed(frame + pack([2, "n", ["\u00e9\U0001f600"]]))
    assert bad == ProtocolViolation(ErrorCode.INVALID_MESSAGE, "a string is not valid UTF-8", False, 9)
    assert good == Notification("n", ["\u00e9\U0001f600"])


@pytest.mark.parametrize(
    "ext",
    [b"\xd4\x05\x01", b"\xd6\xff\x00\x00\x00\x01", b"\xc7\x00\x07", b"\xd7\xff" + b"\0" * 8],
    ids=["fixext1", "timestamp32", "ext8-empty", "timestamp64"],
)
def test_ext_types_are_invalid_but_not_fatal(ext: bytes) -> None:
    bad, good = Decoder().feed(b"\x94\x00\x0a\xa1m\x91" + ext + pack([2, "n", []]))
    assert isinstance(bad, ProtocolViolation) and not bad.fatal and bad.msgid == 10
    assert good == Notification("n", [])


@pytest.mark.parametrize(
    "mapping",
    [b"\x81\x01\x01", b"\x81\x91\x01\x01", b"\x81\x80\x01", b"\x81\xc4\x01k\x01", b"\x82\xa1k\x01\xa1k\x02"],
    ids=["int-key", "array-key", "map-key", "bin-key", "repeated-key"],
)
def test_map_keys_must_be_distinct_strings(mapping: bytes) -> None:
    bad, good = Decoder().feed(b"\x94\x00\x0b\xa1m\x91" + mapping + pack([2, "n", []]))
    assert isinstance(bad, ProtocolViolation) and not bad.fatal and bad.msgid == 11
    assert good == Notification("n", [])


def test_a_bad_response_cannot_be_answered_with_its_msgid() -> None:
    (bad,) = Decoder().feed(b"\x94\x01\x05\xc0\xa1\xff")
    assert isinstance(bad, ProtocolViolation) and bad.msgid is None and not bad.fatal


# -- encoding ---------------------------------------------------------------


def test_strings_go_as_str_and_bytes_as_bin() -> None:
    frame = encode(Response(1, None, {"payload": b"\x45\x00", "text": "ab"}))
    assert frame.hex() == "940101c082a77061796c6f6164c4024500a474657874a26162"


def test_msgid_extremes_use_the_shortest_form() -> None:
    assert encode(Request(0, "m", [])).hex() == "940000a16d90"
    assert encode(Request(2**32 - 1, "m", [])).hex() == "9400ceffffffffa16d90"


def test_interpret_keeps_bools_apart_from_ints() -> None:
    assert isinstance(interpret([False, 1, "m", []]), ProtocolViolation)
    assert isinstance(interpret([0, True, "m", []]), ProtocolViolation)
    assert interpret([0, 1, "m", []]) == Request(1, "m", [])
