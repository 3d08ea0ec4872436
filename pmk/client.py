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
from typing import Any, cast

import pmk
from pmk.client_types import ConnectionList, DecideInfo, HelloResult, Role
from pmk.config import default_endpoint
from pmk.rpc import names
from pmk.rpc.connection import RpcConnection
from pmk.rpc.messages import ErrorCode, Notification, ProtocolViolation, Request, Response, wire_error
from pmk.verdicts import DECIDE_VERDICTS, Verdict

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Decision:
    """A decider's answer, for the connection (``permanent``) or one packet.

    ``verdict`` is a ``Verdict`` (its wire spelling is accepted too);
    ``to`` is the ``"ADDR:PORT"`` target of a ``redirect``.
    """

    verdict: Verdict | str
    permanent: bool = False
    to: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.verdict, Verdict):
            object.__setattr__(self, "verdict", Verdict.parse(self.verdict, DECIDE_VERDICTS))

    def to_wire(self) -> dict[str, Any]:
        verdict = cast(Verdict, self.verdict)
        wire: dict[str, Any] = {"verdict": verdict.value, "permanent": self.permanent}
        if self.to is not None:
            wire["to"] = self.to
        return wire


DecideHandler = Callable[[DecideInfo], "Decision | Awaitable[Decision] | None"]
#: Called with a notification's method and its first param: ``connection_new``
#: (a ``ConnectionNew``), ``connection_end`` (a ``ConnectionEnd``) or
#: ``bandwidth`` (a list of ``BandwidthEntry``).
EventHandler = Callable[[str, Any], None]
#: The notifications an observer receives (SPEC 8).
EVENTS = (names.CONNECTION_NEW, names.CONNECTION_END, names.BANDWIDTH)


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

    async def hello(self, name: str, role: Role = "observer", *, payload: bool = False) -> HelloResult:
        """Introduce this client; ``role="decider"`` starts the flow of ``decide`` requests.

        ``payload=True`` asks for each held packet's bytes inline in ``decide``.
        """
        hello: dict[str, Any] = {"protocol": pmk.PROTOCOL_VERSION, "name": name, "role": role}
        if payload:
            hello["payload"] = True
        return cast(HelloResult, await self.call(names.HELLO, hello))

    async def list_connections(self, offset: int = 0, limit: int = 1000) -> ConnectionList:
        """One page of the connections with a cached verdict (SPEC 4)."""
        return cast(ConnectionList, await self.call(names.LIST_CONNECTIONS, {"offset": offset, "limit": limit}))

    async def subscribe_bandwidth(self, seconds: float) -> None:
        """Receive ``bandwidth`` every ``seconds`` (0 stops it)."""
        await self.call(names.SUBSCRIBE, names.BANDWIDTH, seconds)

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
        if request.method != names.DECIDE or self.decide is None:
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
    payload: bool = False,
) -> None:
    """Serve ``decide`` for ever: connect, say hello as a decider, reconnect with backoff."""
    await _run(name, "decider", path, reconnect, max_backoff, decide=decide, payload=payload)


async def run_observer(
    on_event: EventHandler,
    *,
    name: str,
    path: str | None = None,
    bandwidth: float | None = None,
    reconnect: bool = True,
    max_backoff: float = 10.0,
) -> None:
    """Follow pmk's event stream for ever (``EVENTS``), reconnecting with backoff.

    ``bandwidth`` subscribes to ``bandwidth`` notifications at that interval.
    """
    await _run(name, "observer", path, reconnect, max_backoff, on_event=on_event, bandwidth=bandwidth)


async def _run(
    name: str,
    role: Role,
    path: str | None,
    reconnect: bool,
    max_backoff: float,
    *,
    decide: DecideHandler | None = None,
    payload: bool = False,
    on_event: EventHandler | None = None,
    bandwidth: float | None = None,
) -> None:
    """Connect, say hello in ``role``, serve until pmk closes; again with backoff if ``reconnect``."""
    delay = 0.1
    while True:
        try:
            client = await Client.connect(path, decide)
            if on_event is not None:
                client.on_notification = _event_forwarder(on_event)
            await client.hello(name, role, payload=payload)
            if bandwidth is not None:
                await client.subscribe_bandwidth(bandwidth)
            log.info("connected to pmk as %s %r", role, name)
            delay = 0.1
            await client.wait_closed()
            log.warning("pmk closed the connection")
        except (OSError, ConnectionClosed, RemoteError) as error:
            log.warning("cannot reach pmk: %s", error)
        if not reconnect:
            return
        await asyncio.sleep(delay * (0.5 + random.random()))
        delay = min(max_backoff, delay * 2)


def _event_forwarder(on_event: EventHandler) -> Callable[[Notification], None]:
    def forward(notification: Notification) -> None:
        if notification.method in EVENTS and notification.params:
            on_event(notification.method, notification.params[0])

    return forward
