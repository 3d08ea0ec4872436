"""One connected client: bytes from its socket into the RPC state and back."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from pmk.rpc.connection import RpcConnection
from pmk.rpc.messages import Notification, ProtocolViolation, Request, Response

if TYPE_CHECKING:
    from pmk.server.app import Server

log = logging.getLogger(__name__)

# A client whose unread output passes this is too far behind: it is cut off
# and its pending requests go to another decider (or get the default).
MAX_UNREAD_OUTPUT = 4 * 1024 * 1024


class ClientSession(asyncio.Protocol):
    """Transport glue; every decision about a message is the server's."""

    def __init__(self, server: Server, session_id: int) -> None:
        self.server = server
        self.id = session_id
        self.rpc = RpcConnection()
        self.transport: asyncio.Transport | None = None
        self.name = ""
        self.role = "observer"
        self.closed = False
        self._flush_scheduled = False
        self._answered = False

    # -- asyncio callbacks ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        refusal = self.server.admit(self, self.transport)
        if refusal is not None:
            self.rpc.send_notification("refused", [refusal])
            self.flush()
            self.close()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self._handle(data)
        finally:
            # Answers read together are applied together: one backend call, one write.
            if self._answered:
                self._answered = False
                self.server.carry_out()
        self.flush()

    def _handle(self, data: bytes) -> None:
        for event in self.rpc.receive(data):
            if type(event) is Response:
                self._answered = True
                self.server.on_response(self, event)
            elif isinstance(event, Request):
                self.server.on_request(self, event)
            elif isinstance(event, Notification):
                pass  # unknown notifications are ignored by contract
            elif isinstance(event, ProtocolViolation):
                self.server.on_violation(self, event)
                self.rpc.report(event)
                if event.fatal:
                    self.flush()
                    self.close()
                    return
            if self.unread_output() > MAX_UNREAD_OUTPUT:
                # A flood of requests from a client that does not read its answers.
                self._cut_off()
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.on_session_lost(self)

    # -- output --------------------------------------------------------------

    def schedule_flush(self) -> None:
        """Write once per loop iteration, however many frames were queued."""
        if not self._flush_scheduled and not self.closed:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self.closed or self.transport is None:
            return
        data = self.rpc.data_to_send()
        if data:
            self.transport.write(data)
            if self.transport.get_write_buffer_size() > MAX_UNREAD_OUTPUT:
                self._cut_off()

    def unread_output(self) -> int:
        """Bytes queued for this client that it has not taken yet (beyond the kernel's buffer)."""
        buffered = self.transport.get_write_buffer_size() if self.transport is not None else 0
        return buffered + self.rpc.pending_output()

    def _cut_off(self) -> None:
        """Drop a client that is too far behind; connection_lost hands its requests on."""
        log.warning("client %s (%s) stopped reading; disconnecting it", self.id, self.name or "unnamed")
        self.server.counters_slow_clients += 1
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
