"""Framing: turn a byte stream into msgpack-RPC messages and back.

The decoder owns a bounded buffer. Input that msgpack cannot parse, or a
single frame larger than ``MAX_FRAME_BYTES``, leaves the stream unframeable:
that is reported as a fatal violation and the decoder refuses further
input. A well-formed msgpack value that is not a valid RPC message is a
non-fatal violation; decoding continues with the next frame.
"""

from __future__ import annotations

from typing import Any

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
# Input is fed in slices of this size so that many small frames arriving in
# one read never trip the buffer bound meant for a single frame.
_FEED_SLICE = 64 * 1024


def encode(message: Message) -> bytes:
    """Serialise one message to its frame."""
    if isinstance(message, Request):
        value: list[Any] = [Kind.REQUEST, message.msgid, message.method, message.params]
    elif isinstance(message, Response):
        value = [Kind.RESPONSE, message.msgid, message.error, message.result]
    else:
        value = [Kind.NOTIFICATION, message.method, message.params]
    return msgpack.packb(value, use_bin_type=True)


def _valid_msgid(value: object) -> bool:
    return type(value) is int and 0 <= value < MSGID_LIMIT


def interpret(value: object) -> Message | ProtocolViolation:
    """Check one decoded msgpack value against the msgpack-RPC message shapes."""
    if not isinstance(value, list) or not value:
        return ProtocolViolation(ErrorCode.INVALID_MESSAGE, "a message must be a non-empty array", False)
    kind = value[0]
    if type(kind) is not int or kind not in (0, 1, 2):
        return ProtocolViolation(ErrorCode.INVALID_MESSAGE, "message type must be 0, 1 or 2", False)
    if kind == Kind.NOTIFICATION:
        if len(value) != 3:
            return ProtocolViolation(ErrorCode.INVALID_MESSAGE, "a notification has 3 elements", False)
        _, method, params = value
        if not isinstance(method, str) or not isinstance(params, list):
            return ProtocolViolation(
                ErrorCode.INVALID_MESSAGE, "a notification is [2, method: str, params: array]", False
            )
        return Notification(method, params)
    if len(value) != 4:
        return ProtocolViolation(ErrorCode.INVALID_MESSAGE, "requests and responses have 4 elements", False)
    msgid = value[1]
    if not _valid_msgid(msgid):
        return ProtocolViolation(ErrorCode.INVALID_MESSAGE, "msgid must be an unsigned 32-bit integer", False)
    if kind == Kind.REQUEST:
        method, params = value[2], value[3]
        if not isinstance(method, str) or not isinstance(params, list):
            return ProtocolViolation(
                ErrorCode.INVALID_MESSAGE, "a request is [0, msgid, method: str, params: array]", False, msgid
            )
        return Request(msgid, method, params)
    return Response(msgid, value[2], value[3])


class Decoder:
    """Incremental decoder for one peer's byte stream."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._unpacker = msgpack.Unpacker(
            raw=False,
            unicode_errors="surrogateescape",
            strict_map_key=False,
            max_buffer_size=max_frame_bytes + _FEED_SLICE,
        )
        self._fed = 0
        self.broken: ProtocolViolation | None = None

    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return self._fed - self._unpacker.tell()

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
            except msgpack.BufferFull:
                return self._fail(events, ErrorCode.FRAME_TOO_LARGE, f"a frame exceeds {self.max_frame_bytes} bytes")
            self._fed += len(chunk)
            if not self._drain(events):
                return events
            if self.buffered() > self.max_frame_bytes:
                return self._fail(events, ErrorCode.FRAME_TOO_LARGE, f"a frame exceeds {self.max_frame_bytes} bytes")
        return events

    def _drain(self, events: list[Event]) -> bool:
        while True:
            try:
                value = next(self._unpacker)
            except StopIteration:
                return True
            except ValueError as error:  # FormatError, StackError, ExtraData, limits
                self._fail(events, ErrorCode.MALFORMED, f"not msgpack: {type(error).__name__}")
                return False
            except Exception as error:
                self._fail(events, ErrorCode.MALFORMED, f"not msgpack: {type(error).__name__}")
                return False
            events.append(interpret(value))

    def _fail(self, events: list[Event], code: ErrorCode, message: str) -> list[Event]:
        self.broken = ProtocolViolation(code, message, True)
        events.append(self.broken)
        return events
