"""Property tests: whatever bytes arrive, the decoder yields messages or protocol violations."""

from __future__ import annotations

import itertools

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pmk.rpc.codec import Decoder, encode
from pmk.rpc.connection import RpcConnection
from pmk.rpc.messages import Event, Notification, ProtocolViolation, Request, Response

SMALL_LIMIT = 256
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Bytes biased towards msgpack structure so that fuzzing gets past the first byte.
_TOKENS = st.sampled_from(
    [
        *(b"\x90", b"\x91", b"\x93", b"\x94", b"\x80", b"\x81", b"\x00", b"\x01", b"\x02", b"\xc0", b"\xc3", b"\xa1m"),
        *(b"\xc4\x02ab", b"\xce\xff\xff\xff\xff", b"\xd4\x05\x01", b"\xa1\xff", b"\xc1", b"\xdd\x00\x10\x00\x00"),
    ]
)
_STREAMS = st.one_of(st.binary(max_size=600), st.lists(_TOKENS, max_size=120).map(b"".join))


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def run(decoder: Decoder, chunks: list[bytes]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    return events


def check_shape(events: list[Event], decoder: Decoder) -> None:
    for event in events:
        assert isinstance(event, Request | Response | Notification | ProtocolViolation)
    fatal = [i for i, e in enumerate(events) if isinstance(e, ProtocolViolation) and e.fatal]
    if fatal:
        # Only repeats of the one fatal violation may follow it.
        assert decoder.broken is not None
        assert all(events[i] == decoder.broken for i in range(fatal[0], len(events)))
    else:
        assert decoder.broken is None


@FUZZ
@given(data=_STREAMS, cuts=st.lists(st.integers(min_value=0), max_size=20), limit=st.sampled_from([SMALL_LIMIT, 2**20]))
def test_any_bytes_in_any_chunking_give_messages_or_violations(data: bytes, cuts: list[int], limit: int) -> None:
    whole_decoder, chunked_decoder = Decoder(limit), Decoder(limit)
    whole = run(whole_decoder, [data])
    pieces = run(chunked_decoder, chunked(data, cuts))
    check_shape(whole, whole_decoder)
    check_shape(pieces, chunked_decoder)
    # Chunking never changes what was decoded, nor whether the stream broke.
    # (Which fatal code is reported first may differ: a frame can be both too
    # large and malformed.)
    assert [e for e in whole if not getattr(e, "fatal", False)] == [e for e in pieces if not getattr(e, "fatal", False)]
    assert (whole_decoder.broken is None) == (chunked_decoder.broken is None)


@FUZZ
@given(data=_STREAMS, more=st.binary(max_size=50))
def test_a_broken_decoder_stays_broken(data: bytes, more: bytes) -> None:
    decoder = Decoder(SMALL_LIMIT)
    # 0xc1 is never valid msgpack; inside a str or bin it soon makes the frame too large.
    decoder.feed(data + b"\xc1" * (SMALL_LIMIT + 1))
    assert decoder.broken is not None
    assert decoder.feed(more + encode(Notification("x", []))) == [decoder.broken]


@FUZZ
@given(data=_STREAMS)
def test_the_connection_layer_never_raises(data: bytes) -> None:
    connection = RpcConnection()
    for _ in range(3):
        connection.send_request("decide", [])
    connection.forget(1)
    for event in connection.receive(data):
        if isinstance(event, ProtocolViolation):
            connection.report(event)
        elif isinstance(event, Response):
            connection.take_context(event)
    # Whatever was reported can itself be framed and read back.
    for event in Decoder().feed(connection.data_to_send()):
        assert isinstance(event, Request | Response | Notification)


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.binary(max_size=40),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=30,
)
_MSGIDS = st.integers(min_value=0, max_value=2**32 - 1)
_PARAMS = st.lists(_VALUES, max_size=4)
_MESSAGES = st.one_of(
    st.builds(Request, _MSGIDS, st.text(max_size=20), _PARAMS),
    st.builds(Response, _MSGIDS, _VALUES, _VALUES),
    st.builds(Notification, st.text(max_size=20), _PARAMS),
)


@FUZZ
@given(messages=st.lists(_MESSAGES, min_size=1, max_size=8), cuts=st.lists(st.integers(min_value=0), max_size=10))
def test_valid_messages_round_trip(messages: list[Request | Response | Notification], cuts: list[int]) -> None:
    stream = b"".join(encode(m) for m in messages)
    assert run(Decoder(), chunked(stream, cuts)) == messages
    # The frames are plain msgpack: any msgpack reader sees the same arrays.
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(stream)
    assert [v[0] for v in unpacker] == [{Request: 0, Response: 1, Notification: 2}[type(m)] for m in messages]
