"""Framing: turn a byte stream into msgpack-RPC messages and back.

The decoder owns a bounded buffer. Input that msgpack cannot parse, or a
single frame larger than ``MAX_FRAME_BYTES``, leaves the stream unframeable:
that is reported as a fatal violation and the decoder refuses further
input. A well-formed msgpack value that is not a valid RPC message (wrong
shape, invalid UTF-8, ext types, non-string map keys, nesting deeper than
``MAX_DEPTH``) is a non-fatal violation; decoding continues with the next
frame. protocol/SPEC.md is the contract this implements.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import msgpack

from pmk.rpc.messages import (
    MSGID_LIMIT,
    ErrorCode,
    Event,
    Kind,
    Message,
    Notification,
    ProtocolViolation,
    Request,
    Response,
)

# Largest frame pmk accepts: far above any real request (a held packet's
# payload is at most 64 KiB), small enough that a hostile client cannot make
# the server buffer much.
MAX_FRAME_BYTES = 1024 * 1024
# Deepest nesting of arrays and maps a valid message may have, counting the
# message's own array. pmk's messages need 3; the bound keeps every walk over
# a decoded value short.
MAX_DEPTH = 32
# Input is fed in slices of this size so that many small frames arriving in
# one read never trip the buffer bound meant for a single frame.
_FEED_SLICE = 64 * 1024


# One packer for every frame: msgpack.packb builds a new Packer per call. pack()
# runs in C without releasing the GIL, so sharing it between threads is safe.
_pack: Callable[[object], bytes] = msgpack.Packer(use_bin_type=True).pack


def encode(message: Message) -> bytes:
    """Serialise one message to its frame."""
    if isinstance(message, Request):
        return encode_request(message.msgid, message.method, message.params)
    if isinstance(message, Response):
        return encode_response(message.msgid, message.error, message.result)
    return encode_notification(message.method, message.params)


def encode_request(msgid: int, method: str, params: list[Any]) -> bytes:
    """The frame of a request (no message object: this runs once per ``decide``)."""
    return _pack([0, msgid, method, params])


def encode_response(msgid: int, error: Any, result: Any) -> bytes:
    return _pack([1, msgid, error, result])


def encode_notification(method: str, params: list[Any]) -> bytes:
    return _pack([2, method, params])


class _BadMap:
    """Stands in for a map Python cannot or must not build (unhashable or repeated keys)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _build_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any] | _BadMap:
    # Raising here would leave msgpack's unpacker mid-frame, so a bad map is
    # returned as a marker and rejected later, frame by frame.
    try:
        built = dict(pairs)
    except TypeError:
        return _BadMap("map keys must be strings")
    if len(built) != len(pairs):
        return _BadMap("a map repeats a key")
    return built


def _bad_text(text: str) -> bool:
    """True if ``text`` came from bytes that are not UTF-8 (surrogateescape left lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_SCALARS = frozenset({int, float, bool, bytes, type(None)})


def _content_problem(value: object, depth: int = 1) -> str | None:
    """Why a decoded value cannot be part of a pmk message, or None if it can.

    Recursion is bounded: it stops one level past ``MAX_DEPTH``. Scalars are
    checked inline because this runs for every message received.
    """
    kind = type(value)
    if kind is list:
        items: Any = value
    elif kind is dict:
        for key in value:  # type: ignore[attr-defined]
            if type(key) is not str:
                return "map keys must be strings"
            if not key.isascii() and _bad_text(key):
                return "a string is not valid UTF-8"
        items = value.values()  # type: ignore[attr-defined]
    elif kind is str:
        return "a string is not valid UTF-8" if _bad_text(value) else None  # type: ignore[arg-type]
    elif kind in _SCALARS:
        return None
    elif kind is _BadMap:
        return cast(_BadMap, value).reason
    else:  # ExtType, Timestamp
        return "ext types are not used by this protocol"
    if depth > MAX_DEPTH:
        return f"nesting deeper than {MAX_DEPTH} levels"
    for item in items:
        kind = type(item)
        if kind is str:
            if not item.isascii() and _bad_text(item):
                return "a string is not valid UTF-8"
        elif kind not in _SCALARS:
            problem = _content_problem(item, depth + 1)
            if problem is not None:
                return problem
    return None


def _valid_msgid(value: object) -> bool:
    return type(value) is int and 0 <= value < MSGID_LIMIT


def _invalid(message: str, msgid: int | None = None) -> ProtocolViolation:
    return ProtocolViolation(ErrorCode.INVALID_MESSAGE, message, False, msgid)


def interpret(value: object) -> Message | ProtocolViolation:
    """Check one decoded msgpack value against the msgpack-RPC message shapes."""
    if not isinstance(value, list) or not value:
        return _invalid("a message must be a non-empty array")
    kind = value[0]
    if type(kind) is not int or kind not in (0, 1, 2):
        return _invalid("message type must be 0, 1 or 2")
    if kind == Kind.NOTIFICATION:
        if len(value) != 3:
            return _invalid("a notification has 3 elements")
        _, method, params = value
        if not isinstance(method, str) or not isinstance(params, list):
            return _invalid("a notification is [2, method: str, params: array]")
        problem = _content_problem(value)
        return _invalid(problem) if problem else Notification(method, params)
    if len(value) != 4:
        return _invalid("requests and responses have 4 elements")
    msgid = value[1]
    if not _valid_msgid(msgid):
        return _invalid("msgid must be an unsigned 32-bit integer")
    if kind == Kind.REQUEST:
        method, params = value[2], value[3]
        if not isinstance(method, str) or not isinstance(params, list):
            return _invalid("a request is [0, msgid, method: str, params: array]", msgid)
        problem = _content_problem(value)
        return _invalid(problem, msgid) if problem else Request(msgid, method, params)
    problem = _content_problem(value)
    return _invalid(problem) if problem else Response(msgid, value[2], value[3])


class Decoder:
    """Incremental decoder for one peer's byte stream."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._unpacker = msgpack.Unpacker(
            raw=False,
            unicode_errors="surrogateescape",
            strict_map_key=False,
            object_pairs_hook=_build_map,
            max_buffer_size=max_frame_bytes + _FEED_SLICE,
            # A header announcing more than a frame can hold fails at once.
            max_str_len=max_frame_bytes,
            max_bin_len=max_frame_bytes,
            max_ext_len=max_frame_bytes,
            max_array_len=max_frame_bytes,
            max_map_len=max_frame_bytes // 2,
        )
        self._fed = 0
        # Stream offset where the frame being received began. msgpack's own
        # position moves inside a partly received frame, so it cannot say this.
        self._frame_start = 0
        self.broken: ProtocolViolation | None = None

    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return self._fed - self._frame_start

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Decode what ``data`` completes; a fatal violation ends the list and the stream."""
        if self.broken is not None:
            return [self.broken]
        events: list[Event] = []
        view = memoryview(data)
        for start in range(0, len(view), _FEED_SLICE):
            chunk = view[start : start + _FEED_SLICE]
            try:
                self._unpacker.feed(chunk)
            except msgpack.BufferFull:  # pragma: no cover - the check below fires first
                return self._too_large(events)
            self._fed += len(chunk)
            if not self._drain(events):
                return events
            if self.buffered() > self.max_frame_bytes:
                return self._too_large(events)
        return events

    def _drain(self, events: list[Event]) -> bool:
        unpacker = self._unpacker
        while True:
            try:
                value = next(unpacker)
            except StopIteration:
                return True
            except ValueError as error:  # FormatError, StackError, declared lengths over the limits
                if "exceeds max_" in str(error):
                    self._too_large(events)
                else:
                    self._fail(events, ErrorCode.MALFORMED, f"not msgpack: {type(error).__name__}")
                return False
            except Exception as error:
                self._fail(events, ErrorCode.MALFORMED, f"not msgpack: {type(error).__name__}")
                return False
            end = unpacker.tell()
            if end - self._frame_start > self.max_frame_bytes:
                self._too_large(events)
                return False
            self._frame_start = end
            events.append(interpret(value))

    def _too_large(self, events: list[Event]) -> list[Event]:
        return self._fail(events, ErrorCode.FRAME_TOO_LARGE, f"a frame exceeds {self.max_frame_bytes} bytes")

    def _fail(self, events: list[Event], code: ErrorCode, message: str) -> list[Event]:
        self.broken = ProtocolViolation(code, message, True)
        events.append(self.broken)
        return events
