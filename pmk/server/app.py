"""The server: capture backend, decision engine and client sessions wired together.

Data flow: the backend hands a batch to ``_on_packets``; the engine settles
cache hits and records requests; ``carry_out`` applies verdicts through the
backend and sends ``decide`` requests to deciders. Answers come back through
``on_response``. Timeouts are one timer armed for the earliest deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pmk
from pmk.capture.base import CaptureBackend, CapturedPacket
from pmk.config import ServeConfig
from pmk.core.dispatch import Dispatcher
from pmk.core.engine import Engine
from pmk.core.info import decide_info
from pmk.rpc.messages import ErrorCode, ProtocolViolation, Request, Response
from pmk.server import endpoint
from pmk.server.methods import (
    InvalidParams,
    check_decision,
    check_hello,
    check_no_params,
    check_packet_id,
    check_update_verdict,
)
from pmk.server.session import ClientSession
from pmk.server.watch import BypassWatch
from pmk.verdicts import Verdict

log = logging.getLogger(__name__)


class Server:
    """One pmk instance: owns the backend, the engine and every session."""

    def __init__(self, config: ServeConfig, backend: CaptureBackend) -> None:
        self.config = config
        self.backend = backend
        self.engine = Engine(
            packet_cache_size=config.packet_cache,
            verdict_cache_size=config.verdict_cache,
            default_verdict=config.default_verdict,
        )
        self.dispatcher = Dispatcher(config.verdict_timeout, config.max_in_flight)
        self.sessions: dict[int, ClientSession] = {}
        self._next_session = 1
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._started = time.monotonic()
        self.counters_slow_clients = 0
        self.protocol_errors = 0
        # Late answers are dropped in the RPC layer; their count outlives the session.
        self._late_answers_of_gone_sessions = 0
        self.refused_clients = 0
        self.default_reasons: dict[str, int] = {"no_decider": 0, "timeout": 0, "error": 0, "invalid": 0}
        self.bypass_watch = BypassWatch(lambda: self.backend.stats().get("bypassed", 0))

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._listener = await endpoint.listen(self.config, self._new_session)
        self.backend.cache_probe = self.engine.accept_cached
        self.backend.start(self._loop, self._on_packets)
        self.bypass_watch.start(self._loop)
        log.info("pmk %s serving on %s with the %s backend", pmk.__version__, self.config.endpoint, self.backend.name)

    async def stop(self) -> None:
        """Default verdict for everything held, then release backend and endpoint."""
        settled = self.engine.settle_all_with_default()
        if settled:
            log.info("shutdown: %d held packets got the default verdict", settled)
        self.carry_out()
        if self._timer is not None:
            self._timer.cancel()
        self.bypass_watch.stop()
        try:
            self.backend.close()
        finally:
            for session in list(self.sessions.values()):
                session.flush()
                session.close()
            if self._listener is not None:
                self._listener.close()
                await self._listener.wait_closed()
            endpoint.remove(self.config)

    def _new_session(self) -> ClientSession:
        session = ClientSession(self, self._next_session)
        self._next_session += 1
        return session

    def admit(self, session: ClientSession, transport: asyncio.Transport) -> dict[str, str] | None:
        """Check the peer's identity; return the error to send it, or None to admit it."""
        refusal = endpoint.check_peer(self.config, transport)
        if refusal is not None:
            self.refused_clients += 1
            log.warning("refused a client: %s", refusal)
            return {"code": ErrorCode.NOT_PERMITTED.value, "message": refusal}
        self.sessions[session.id] = session
        return None

    # -- packets -------------------------------------------------------------

    def _on_packets(self, packets: list[CapturedPacket]) -> None:
        self.engine.on_packets(packets, time.monotonic())
        self.carry_out()

    def carry_out(self) -> None:
        """Do what the engine recorded, until asking produces no more defaults."""
        engine = self.engine
        while True:
            while engine.outbox:
                work = engine.outbox.take()
                for packets, verdict, permanent in _coalesced(work.applies):
                    self.backend.apply(packets, verdict, permanent)
                for held in work.withdrawn:
                    self._withdraw(held.id)
                now = time.monotonic()
                for held in work.asks:
                    self._send_decide(held.id, now)
            self._pump_waiting(time.monotonic())
            if not engine.outbox:
                break
        self._arm_timer()

    def _withdraw(self, packet_id: int) -> None:
        """The packet is gone: cancel its parked ask or tell its decider."""
        if self.dispatcher.unpark(packet_id):
            return
        # The request stays outstanding (and keeps its decider's slot) until it
        # is answered or times out; the answer is then dropped as late.
        assignment = self.dispatcher.withdraw(packet_id)
        if assignment is not None:
            session = self.sessions.get(assignment.session)
            if session is not None:
                session.rpc.send_notification("withdrawn", [packet_id])
                session.schedule_flush()

    def _send_decide(self, packet_id: int, now: float, deadline: float | None = None) -> None:
        """Ask the least-loaded decider about a packet, park the ask, or settle it by default."""
        held = self.engine.held.get(packet_id)
        if held is None or not self.engine.is_asked(packet_id):
            return
        target = self.dispatcher.pick()
        if target is None:
            self.default_reasons["no_decider"] += 1
            self.engine.on_default(packet_id)
            return
        if deadline is None and (self.dispatcher.waiting() or not self.dispatcher.has_room(target)):
            # Oldest first: a new ask never overtakes parked ones.
            self.dispatcher.wait(packet_id, now)
            return
        session = self.sessions[target]
        msgid = session.rpc.send_request("decide", [decide_info(held)], context=packet_id)
        self.dispatcher.assign(packet_id, target, msgid, now, deadline)
        session.schedule_flush()

    def _pump_waiting(self, now: float) -> None:
        """Send parked asks while a decider has room (or default them if none is left)."""
        dispatcher, held = self.dispatcher, self.engine.held
        while dispatcher.waiting():
            target = dispatcher.pick()
            if target is not None and not dispatcher.has_room(target):
                return
            # Under pressure the oldest packets are the next to be evicted: ask about the youngest.
            parked = dispatcher.next_waiting(newest=len(held) * 4 >= held.capacity * 3)
            assert parked is not None
            self._send_decide(parked[0], now, deadline=parked[1])

    def _arm_timer(self) -> None:
        deadline = self.dispatcher.next_deadline()
        if deadline is None or self._loop is None or deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        now = time.monotonic()
        for packet_id in self.dispatcher.expired_waiting(now):
            self.engine.counters.timeouts += 1
            self.default_reasons["timeout"] += 1
            self.engine.on_default(packet_id)
        for packet_id, assignment in self.dispatcher.expired(now):
            session = self.sessions.get(assignment.session)
            if session is not None:
                session.rpc.forget(assignment.msgid)
            if packet_id is None:
                continue  # a withdrawn request that was never answered: its slot is free again
            self.engine.counters.timeouts += 1
            self.default_reasons["timeout"] += 1
            self.engine.on_default(packet_id)
        self.carry_out()

    # -- client messages -----------------------------------------------------

    def on_response(self, session: ClientSession, response: Response) -> None:
        """Record a decider's answer; the session calls ``carry_out()`` once per read, for all its answers."""
        packet_id = session.rpc.take_context(response)
        if self.dispatcher.settle_withdrawn(session.id, response.msgid):
            self.engine.counters.late_verdicts += 1  # its freed slot is used by carry_out()
            return
        assignment = self.dispatcher.owner(packet_id)
        if assignment is None or assignment.session != session.id or assignment.msgid != response.msgid:
            self.engine.counters.late_verdicts += 1
            return
        self.dispatcher.complete(packet_id)
        if response.error is not None:
            log.info("decider %s answered packet %d with an error: %r", session.name, packet_id, response.error)
            self.default_reasons["error"] += 1
            self.engine.on_default(packet_id)
        else:
            try:
                verdict, permanent = check_decision(response.result)
            except InvalidParams as error:
                self.default_reasons["invalid"] += 1
                session.rpc.send_notification(
                    "protocol_error", [{"code": ErrorCode.INVALID_PARAMS.value, "message": str(error)}]
                )
                self.engine.on_default(packet_id)
            else:
                self.engine.on_verdict(packet_id, verdict, permanent)

    def on_violation(self, session: ClientSession, violation: ProtocolViolation) -> None:
        self.protocol_errors += 1
        log.info("client %s: %s (%s)", session.id, violation.message, violation.code.value)

    def on_request(self, session: ClientSession, request: Request) -> None:
        handler = self._methods.get(request.method)
        if handler is None:
            session.rpc.send_error(request.msgid, ErrorCode.UNKNOWN_METHOD, f"no method {request.method!r}")
            return
        try:
            result = handler(self, session, request.params)
        except InvalidParams as error:
            session.rpc.send_error(request.msgid, ErrorCode.INVALID_PARAMS, str(error))
        except _MethodError as error:
            session.rpc.send_error(request.msgid, error.code, str(error))
        else:
            session.rpc.send_response(request.msgid, None, result)
        if request.method == "hello":
            self.carry_out()  # a new decider may take parked asks

    def on_session_lost(self, session: ClientSession) -> None:
        self.sessions.pop(session.id, None)
        self._late_answers_of_gone_sessions += session.rpc.late_responses
        orphans = self.dispatcher.remove_decider(session.id)
        if orphans:
            log.info("decider %s left with %d requests pending; re-asking", session.name, len(orphans))
        now = time.monotonic()
        for packet_id in orphans:
            self._send_decide(packet_id, now)
        self.carry_out()

    # -- methods -------------------------------------------------------------

    def _hello(self, session: ClientSession, params: list[Any]) -> dict[str, Any]:
        protocol, name, role = check_hello(params)
        if protocol != pmk.PROTOCOL_VERSION:
            raise _MethodError(ErrorCode.UNSUPPORTED_PROTOCOL, f"this server speaks protocol {pmk.PROTOCOL_VERSION}")
        session.name, session.role = name, role
        if role == "decider":
            self.dispatcher.add_decider(session.id)
        else:
            # A decider turning observer must not strand what it was asked: re-ask elsewhere.
            now = time.monotonic()
            for packet_id in self.dispatcher.remove_decider(session.id):
                self._send_decide(packet_id, now)
            self.carry_out()
        return {"protocol": pmk.PROTOCOL_VERSION, "version": pmk.__version__, "backend": self.backend.name}

    def _get_payload(self, session: ClientSession, params: list[Any]) -> bytes:
        packet_id = check_packet_id(params, "get_payload")
        held = self.engine.held.get(packet_id)
        if held is None:
            raise _MethodError(ErrorCode.UNKNOWN_PACKET, f"packet {packet_id} is not held")
        return bytes(held.packet.raw)

    def _get_stats(self, session: ClientSession, params: list[Any]) -> dict[str, Any]:
        check_no_params(params, "get_stats")
        return self.stats()

    def _get_version(self, session: ClientSession, params: list[Any]) -> dict[str, Any]:
        check_no_params(params, "get_version")
        return {"protocol": pmk.PROTOCOL_VERSION, "version": pmk.__version__}

    def _clear_cache(self, session: ClientSession, params: list[Any]) -> int:
        check_no_params(params, "clear_cache")
        removed = self.engine.clear_cache()
        self.backend.forget_all()
        return removed

    def _update_verdict(self, session: ClientSession, params: list[Any]) -> bool:
        key, verdict = check_update_verdict(params)
        self.engine.update_verdict(key, verdict)
        self.backend.update_connection(key, verdict)
        self.carry_out()
        return True

    _methods = {
        "hello": _hello,
        "get_payload": _get_payload,
        "get_stats": _get_stats,
        "get_version": _get_version,
        "clear_cache": _clear_cache,
        "update_verdict": _update_verdict,
    }

    # -- reading -------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.engine.stats()
        for name, value in self.backend.stats().items():
            # The engine's accounting wins; a backend counter of the same name
            # (nfqueue counts its own accepted/blocked/dropped) gets a prefix.
            stats[f"{self.backend.name}_{name}" if name in stats else name] = value
        stats["deciders"] = self.dispatcher.deciders
        stats["clients"] = len(self.sessions)
        stats["in_flight"] = self.dispatcher.in_flight()
        stats["late_verdicts"] += self._late_answers_of_gone_sessions + sum(
            session.rpc.late_responses for session in self.sessions.values()
        )
        stats["waiting_for_decider"] = self.dispatcher.waiting()
        stats["withdrawn_in_flight"] = self.dispatcher.withdrawn_in_flight()
        stats["protocol_errors"] = self.protocol_errors
        stats["refused_clients"] = self.refused_clients
        stats["slow_clients"] = self.counters_slow_clients
        for reason, count in self.default_reasons.items():
            stats[f"default_{reason}"] = count
        stats["backend"] = self.backend.name
        stats["uptime"] = round(time.monotonic() - self._started, 3)
        return stats


_Apply = tuple[list[CapturedPacket], Verdict, bool]


def _coalesced(applies: list[_Apply]) -> list[_Apply]:
    """Join neighbouring applies of one kind, so that many answers go out in one backend call."""
    if len(applies) < 2:
        return applies
    out: list[_Apply] = []
    joined = False  # whether out[-1] holds a list of our own (safe to extend)
    for packets, verdict, permanent in applies:
        if out and out[-1][1] is verdict and out[-1][2] == permanent:
            if not joined:
                out[-1] = (list(out[-1][0]), verdict, permanent)
                joined = True
            out[-1][0].extend(packets)
        else:
            out.append((packets, verdict, permanent))
            joined = False
    return out


class _MethodError(Exception):
    """A method failed in a way the wire names with ``code``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
