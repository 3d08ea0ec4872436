"""The three msgpack-RPC message kinds, and the error shape pmk puts on the wire."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

MSGID_LIMIT = 2**32  # msgid is a uint32 on the wire


class Kind(enum.IntEnum):
    """First element of every message (msgpack-RPC spec)."""

    REQUEST = 0
    RESPONSE = 1
    NOTIFICATION = 2


class ErrorCode(enum.StrEnum):
    """The ``code`` of a wire error; protocol/SPEC.md says when each is used."""

    INVALID_MESSAGE = "invalid_message"
    FRAME_TOO_LARGE = "frame_too_large"
    MALFORMED = "malformed"
    UNKNOWN_METHOD = "unknown_method"
    INVALID_PARAMS = "invalid_params"
    UNKNOWN_MSGID = "unknown_msgid"
    UNKNOWN_PACKET = "unknown_packet"
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    NOT_PERMITTED = "not_permitted"
    INTERNAL = "internal_error"


def wire_error(code: ErrorCode, message: str) -> dict[str, str]:
    """The error map carried in responses and ``protocol_error`` notifications."""
    return {"code": code.value, "message": message}


# Request, Response and Notification are built per message (a decide and its
# answer per new connection): not frozen, since a frozen dataclass builds
# three to four times slower. Nothing changes them once made.
@dataclass(slots=True)
class Request:
    msgid: int
    method: str
    params: list[Any]


@dataclass(slots=True)
class Response:
    msgid: int
    error: Any
    result: Any


@dataclass(slots=True)
class Notification:
    method: str
    params: list[Any]


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """Bad data from the peer.

    ``fatal`` means the byte stream can no longer be framed and the
    connection must be closed; otherwise only that one message was bad.
    ``msgid`` is set when the bad message was a request whose id could be read,
    so the error can be answered as a response.
    """

    code: ErrorCode
    message: str
    fatal: bool
    msgid: int | None = None


@dataclass(frozen=True, slots=True)
class LateResponse:
    """An answer to a request this side had abandoned (``RpcConnection.forget``)."""

    msgid: int


Message = Request | Response | Notification
Event = Request | Response | Notification | ProtocolViolation | LateResponse
