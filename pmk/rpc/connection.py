"""One side of a msgpack-RPC conversation, without I/O.

It numbers this side's requests, remembers which are outstanding so that
responses can be matched (and stray ones reported), and collects outgoing
frames in one buffer so that the shell writes many frames with one call.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from pmk.rpc.codec import MAX_FRAME_BYTES, Decoder, encode_notification, encode_request, encode_response
from pmk.rpc.messages import (
    MSGID_LIMIT,
    ErrorCode,
    Event,
    LateResponse,
    ProtocolViolation,
    Response,
    wire_error,
)
from pmk.rpc.names import PROTOCOL_ERROR

# Abandoned msgids remembered so that an answer arriving just after its
# timeout or withdrawal is dropped quietly instead of flagged as an error.
_ABANDONED_MEMORY = 4096


class RpcConnection:
    """Request numbering, response matching and output buffering for one peer."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.decoder = Decoder(max_frame_bytes)
        self._next_msgid = 0
        #: msgid -> what the caller attached to the request it sent.
        self.outstanding: dict[int, Any] = {}
        self._out = bytearray()
        self._abandoned: OrderedDict[int, None] = OrderedDict()

    # -- receiving -----------------------------------------------------------

    def receive(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Decode ``data``; responses to requests we never sent become violations.

        The first answer to an abandoned request (``forget``) comes out as a
        ``LateResponse``: not an error on the wire, but worth counting.
        """
        events = self.decoder.feed(data)
        kept: list[Event] = []
        for event in events:
            if isinstance(event, Response) and event.msgid not in self.outstanding:
                if self._abandoned.pop(event.msgid, False) is None:
                    kept.append(LateResponse(event.msgid))
                    continue
                event = ProtocolViolation(
                    ErrorCode.UNKNOWN_MSGID, f"no request with msgid {event.msgid} is outstanding", False
                )
            kept.append(event)
        return kept

    def take_context(self, response: Response) -> Any:
        """Forget the answered request and return what was attached to it."""
        return self.outstanding.pop(response.msgid)

    # -- sending -------------------------------------------------------------

    def send_request(self, method: str, params: list[Any], context: Any = None, msgid: int | None = None) -> int:
        """Queue a request; return its msgid.

        ``msgid`` lets the caller choose the id (the server's decision core
        numbers its requests itself); it must not be outstanding.
        """
        if msgid is None:
            msgid = self._allocate_msgid()
        elif msgid in self.outstanding or not 0 <= msgid < MSGID_LIMIT:
            raise ValueError(f"msgid {msgid} is outstanding or out of range")
        self.outstanding[msgid] = context
        self._out += encode_request(msgid, method, params)
        return msgid

    def forget(self, msgid: int) -> Any:
        """Stop waiting for ``msgid``: a late answer is then dropped quietly."""
        if msgid in self.outstanding:
            self._abandoned[msgid] = None
            if len(self._abandoned) > _ABANDONED_MEMORY:
                self._abandoned.popitem(last=False)
        return self.outstanding.pop(msgid, None)

    def send_response(self, msgid: int, error: Any = None, result: Any = None) -> None:
        self._out += encode_response(msgid, error, result)

    def send_error(self, msgid: int, code: ErrorCode, message: str) -> None:
        self.send_response(msgid, wire_error(code, message), None)

    def send_notification(self, method: str, params: list[Any]) -> None:
        self._out += encode_notification(method, params)

    def report(self, violation: ProtocolViolation) -> None:
        """Tell the peer what was wrong: as a response if it had a msgid, else a notification."""
        if violation.msgid is not None:
            self.send_error(violation.msgid, violation.code, violation.message)
        else:
            self.send_notification(PROTOCOL_ERROR, [wire_error(violation.code, violation.message)])

    def data_to_send(self) -> bytes:
        """Everything queued since the last call, as one buffer."""
        if not self._out:
            return b""
        data = bytes(self._out)
        self._out.clear()
        return data

    def pending_output(self) -> int:
        return len(self._out)

    def _allocate_msgid(self) -> int:
        # Skip ids still outstanding after a wrap-around (2**32 requests later).
        for _ in range(len(self.outstanding) + 1):
            msgid = self._next_msgid
            self._next_msgid = (self._next_msgid + 1) % MSGID_LIMIT
            if msgid not in self.outstanding:
                return msgid
        raise RuntimeError("every msgid is outstanding")  # pragma: no cover
