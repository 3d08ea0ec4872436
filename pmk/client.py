"""A client library for pmk: deciders and tools in a few lines of asyncio.

    async def decide(info):
        return Decision("accept", permanent=True)

    asyncio.run(pmk.client.run_decider(decide, name="allow-all"))

It speaks the same sans-IO RPC state as the server (``pmk.rpc``), over the
Unix socket on POSIX or the named pipe on Windows.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pmk
from pmk.config import default_endpoint
from pmk.rpc.connection import RpcConnection
from pmk.rpc.messages import ErrorCode, Notification, ProtocolViolation, Request, Response, wire_error

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Decision:
    """A decider's answer: ``accept``, ``block`` or ``drop``, for the connection or one packet."""

    verdict: str
    permanent: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "permanent": self.permanent}


DecideHandler = Callable[[dict[str, Any]], "Decision | Awaitable[Decision]"]


class RemoteError(Exception):
    """The server answered a call with an error map."""

    def __init__(self, error: Any) -> None:
        self.code = error.get("code") if isinstance(error, dict) else None
        self.error = error
        super().__init__(error.get("message", error) if isinstance(error, dict) else error)


class ConnectionClosed(ConnectionError):
    """The server went away."""


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.client._on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._on_lost(exc)


class Client:
    """One connection to pmk; ``call`` runs methods, ``decide`` answers requests."""

    def __init__(self, decide: DecideHandler | None = None) -> None:
        self.decide = decide
        self.rpc = RpcConnection()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.notifications: list[Notification] = []
        self.on_notification: Callable[[Notification], None] | None = None
        self._transport: asyncio.Transport | None = None
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._answering: set[asyncio.Future[None]] = set()

    @classmethod
    async def connect(cls, path: str | None = None, decide: DecideHandler | None = None) -> Client:
        """Connect to the endpoint (``PMK_PIPE`` or the platform default)."""
        client = cls(decide)
        loop = asyncio.get_running_loop()
        address = path or default_endpoint()
        if sys.platform == "win32":
            await loop.create_pipe_connection(lambda: _ClientProtocol(client), address)  # type: ignore[attr-defined]
        else:
            await loop.create_unix_connection(lambda: _ClientProtocol(client), address)
        return client

    async def hello(self, name: str, role: str = "observer") -> dict[str, Any]:
        """Introduce this client; ``role="decider"`` starts the flow of ``decide`` requests."""
        return await self.call("hello", {"protocol": pmk.PROTOCOL_VERSION, "name": name, "role": role})

    async def call(self, method: str, *params: Any) -> Any:
        """Call a server method and return its result; raise RemoteError on an error answer."""
        if self.closed.done():
            raise ConnectionClosed("connection to pmk is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        msgid = self.rpc.send_request(method, list(params))
        self._calls[msgid] = future
        self._flush()
        return await future

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def wait_closed(self) -> None:
        await asyncio.shield(self.closed)

    # -- protocol callbacks --------------------------------------------------

    def _on_data(self, data: bytes) -> None:
        for event in self.rpc.receive(data):
            if isinstance(event, Response):
                self.rpc.take_context(event)
                future = self._calls.pop(event.msgid, None)
                if future is not None and not future.done():
                    if event.error is not None:
                        future.set_exception(RemoteError(event.error))
                    else:
                        future.set_result(event.result)
            elif isinstance(event, Request):
                self._on_request(event)
            elif isinstance(event, Notification):
                self.notifications.append(event)
                del self.notifications[:-100]
                if self.on_notification is not None:
                    self.on_notification(event)
            elif isinstance(event, ProtocolViolation):
                log.warning("pmk sent something unexpected: %s", event.message)
                if event.fatal:
                    self.close()
        self._flush()

    def _on_request(self, request: Request) -> None:
        if request.method != "decide" or self.decide is None:
            self.rpc.send_error(request.msgid, ErrorCode.UNKNOWN_METHOD, f"client has no {request.method!r}")
            return
        try:
            info = request.params[0]
            outcome = self.decide(info)
        except Exception as error:
            log.exception("decide handler failed")
            self.rpc.send_response(request.msgid, wire_error(ErrorCode.INTERNAL, str(error)), None)
            return
        if type(outcome) is Decision:
            self.rpc.send_response(request.msgid, None, outcome.to_wire())
        elif inspect.isawaitable(outcome):
            task = asyncio.ensure_future(self._answer_later(request.msgid, outcome))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)
        else:
            self._answer(request.msgid, outcome)

    async def _answer_later(self, msgid: int, outcome: Awaitable[Decision]) -> None:
        try:
            decision = await outcome
        except Exception as error:
            log.exception("decide handler failed")
            self.rpc.send_response(msgid, wire_error(ErrorCode.INTERNAL, str(error)), None)
        else:
            self._answer(msgid, decision)
        self._flush()

    def _answer(self, msgid: int, decision: Decision | None) -> None:
        if decision is None:
            return  # the handler chose not to answer; pmk's timeout applies
        self.rpc.send_response(msgid, None, decision.to_wire())

    def _flush(self) -> None:
        data = self.rpc.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _on_lost(self, exc: Exception | None) -> None:
        for future in self._calls.values():
            if not future.done():
                future.set_exception(ConnectionClosed("connection to pmk lost"))
        self._calls.clear()
        if not self.closed.done():
            self.closed.set_result(None)


async def run_decider(
    decide: DecideHandler,
    *,
    name: str,
    path: str | None = None,
    reconnect: bool = True,
    max_backoff: float = 10.0,
) -> None:
    """Serve ``decide`` for ever: connect, say hello as a decider, reconnect with backoff."""
    delay = 0.1
    while True:
        try:
            client = await Client.connect(path, decide)
            await client.hello(name, "decider")
            log.info("connected to pmk as decider %r", name)
            delay = 0.1
            await client.wait_closed()
            log.warning("pmk closed the connection")
        except (OSError, ConnectionClosed, RemoteError) as error:
            log.warning("cannot reach pmk: %s", error)
        if not reconnect:
            return
        await asyncio.sleep(delay * (0.5 + random.random()))
        delay = min(max_backoff, delay * 2)
