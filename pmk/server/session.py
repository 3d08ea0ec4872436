"""One connected client: bytes from its socket into events for the server, and frames back.

The session owns its ``RpcConnection``. It turns what the client sent into
decision-core events, hands every event of one read to its owner at once
(``on_events``), and offers the server a small interface to write with:
``send_request``, ``notify``, ``respond``, ``respond_error``, ``forget``,
``schedule_flush``, ``flush`` and ``close``. It decides nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from pmk.core import events as ev
from pmk.rpc.connection import RpcConnection
from pmk.rpc.messages import ErrorCode, LateResponse, ProtocolViolation, Request, Response, wire_error
from pmk.rpc.names import REFUSED

log = logging.getLogger(__name__)

# A client whose unread output passes this is too far behind: it is cut off
# and its pending requests go to another decider (or to the fallback policy).
MAX_UNREAD_OUTPUT = 4 * 1024 * 1024


class SessionOwner(Protocol):
    """What a session needs from the server."""

    def admit(self, session: ClientSession, transport: asyncio.BaseTransport) -> dict[str, str] | None:
        """None to serve the peer, else the error to send it before closing."""

    def on_events(self, events: Sequence[ev.Event]) -> None:
        """Everything one read (or the connection's end) produced, in order."""


class ClientSession(asyncio.Protocol):
    """Transport glue for one client."""

    def __init__(self, owner: SessionOwner, session_id: int) -> None:
        self.owner = owner
        self.id = session_id
        self._rpc = RpcConnection()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._admitted = False
        self._flush_scheduled = False

    # -- asyncio callbacks ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        refusal = self.owner.admit(self, transport)
        if refusal is not None:
            self._rpc.send_notification(REFUSED, [refusal])
            self.flush()
            self.close()
            return
        self._admitted = True

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        events: list[ev.Event] = []
        try:
            self._decode(data, events)
        finally:
            if events:
                self.owner.on_events(events)
        self.flush()

    def _decode(self, data: bytes, events: list[ev.Event]) -> None:
        rpc = self._rpc
        for event in rpc.receive(data):
            if type(event) is Response:
                rpc.take_context(event)
                events.append(ev.DecideAnswered(self.id, event.msgid, event.error, event.result))
            elif type(event) is Request:
                events.append(ev.ClientRequest(self.id, event.msgid, event.method, event.params))
            elif type(event) is LateResponse:
                events.append(ev.LateAnswer(self.id, event.msgid))
            elif type(event) is ProtocolViolation:
                log.info("client %s: %s (%s)", self.id, event.message, event.code.value)
                events.append(ev.ProtocolErrorSeen(self.id))
                rpc.report(event)
                if event.fatal:
                    self.flush()
                    self.close()
                    return
            # Notifications from clients are ignored by contract.
            if self.unread_output() > MAX_UNREAD_OUTPUT:
                # A flood of requests from a client that does not read its answers.
                events.append(ev.ClientCutOff(self.id))
                self._cut_off()
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._admitted:
            self._admitted = False
            self.owner.on_events([ev.ClientLeft(self.id)])

    # -- output --------------------------------------------------------------

    def send_request(self, method: str, params: list[Any], msgid: int) -> None:
        self._rpc.send_request(method, params, msgid=msgid)

    def notify(self, method: str, params: list[Any]) -> None:
        self._rpc.send_notification(method, params)

    def respond(self, msgid: int, result: Any) -> None:
        self._rpc.send_response(msgid, None, result)

    def respond_error(self, msgid: int, code: ErrorCode, message: str) -> None:
        self._rpc.send_response(msgid, wire_error(code, message), None)

    def forget(self, msgid: int) -> None:
        """Stop waiting for ``msgid``; an answer to it becomes a LateAnswer."""
        self._rpc.forget(msgid)

    def schedule_flush(self) -> None:
        """Write once per loop iteration, however many frames were queued."""
        if not self._flush_scheduled and not self.closed:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self.closed or self.transport is None:
            return
        data = self._rpc.data_to_send()
        if data:
            self.transport.write(data)
            if self.transport.get_write_buffer_size() > MAX_UNREAD_OUTPUT:
                self.owner.on_events([ev.ClientCutOff(self.id)])
                self._cut_off()

    def unread_output(self) -> int:
        """Bytes queued for this client that it has not taken yet (beyond the kernel's buffer)."""
        buffered = self.transport.get_write_buffer_size() if self.transport is not None else 0
        return buffered + self._rpc.pending_output()

    def _cut_off(self) -> None:
        """Drop a client that is too far behind; connection_lost hands its requests on."""
        log.warning("client %s stopped reading; disconnecting it", self.id)
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
