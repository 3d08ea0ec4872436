"""The server: the asyncio shell around the decision service.

It turns I/O into events (a batch from the capture backend, what a client
sent, the timer, a kernel update finishing) and carries out the commands the
service returns: apply verdicts through the backend, write to clients, arm
the timer, run blocking kernel updates in a worker thread. Every decision
rule is in ``pmk.core.service``; this module has none.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import pmk
from pmk.capture.base import CaptureBackend, CapturedPacket, KernelEnd, KernelUpdateError, Traffic
from pmk.config import ServeConfig
from pmk.core import commands as cmd
from pmk.core import events as ev
from pmk.core.attribution import OwnerOf, no_owner
from pmk.core.policy import Policy
from pmk.core.service import Service
from pmk.rpc.messages import ErrorCode
from pmk.rpc.names import DECIDE
from pmk.server import endpoint
from pmk.server.session import ClientSession
from pmk.server.watch import BypassWatch
from pmk.verdicts import ConnKey, RerouteTargets

log = logging.getLogger(__name__)
decisions = logging.getLogger("pmk.decisions")
T = TypeVar("T")
#: What ``CaptureBackend.traffic_since`` returns: the kernel's totals and the deltas.
Measured = tuple[Mapping[ConnKey, Traffic], list[Mapping[ConnKey, Traffic]]]


class Server:
    """One pmk instance: owns the backend, the service and every session."""

    def __init__(
        self,
        config: ServeConfig,
        backend: CaptureBackend,
        *,
        clock: Callable[[], float] = time.monotonic,
        owner_of: OwnerOf | None = None,
    ) -> None:
        """``owner_of`` attributes connections to processes; by default the platform's lookup."""
        self.config = config
        self.backend = backend
        self._clock = clock
        self._close_owners: Callable[[], None] | None = None
        if owner_of is None:
            owner_of = self._platform_owner_lookup()
        self.service = Service(
            backend=backend,
            policy=config.policy,
            packet_cache=config.packet_cache,
            verdict_cache=config.verdict_cache,
            verdict_timeout=config.verdict_timeout,
            max_in_flight=config.max_in_flight,
            started=clock(),
            targets=RerouteTargets(config.nameservers, config.tunnels),
            reroutable=backend.reroutable if backend.can_reroute else None,
            idle_timeout=config.idle_timeout,
            owner_of=owner_of or no_owner,
        )
        self.sessions: dict[int, ClientSession] = {}
        self._next_session = 1
        self._timer: asyncio.TimerHandle | None = None
        self._life_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: asyncio.AbstractServer | None = None
        # One worker: kernel updates run in the order they were asked for.
        self._kernel_worker: ThreadPoolExecutor | None = None
        #: Called with every Decided record (the decision log); DEBUG lines by default.
        self.on_decided: Callable[[cmd.Decided], None] = _log_decided
        self.bypass_watch = BypassWatch(lambda: self.backend.stats().get("bypassed", 0))

    def _platform_owner_lookup(self) -> OwnerOf | None:
        """The platform's attribution, or None where there is none (pid, process, uid stay nil).

        Linux: one exact sock_diag request per new connection, in the namespace
        pmk serves; it runs on the event loop (see ``pmk.core.attribution``).
        Windows (UNTESTED): a table fed by a sniff-only WinDivert SOCKET handle.
        """
        try:
            if sys.platform == "linux":
                from pmk.host.owner import OwnerLookup

                lookup = OwnerLookup()
            elif sys.platform == "win32":
                from pmk.host.windows import WindowsOwnerLookup

                lookup = WindowsOwnerLookup()
            else:
                return None
        except OSError as error:
            log.warning("process attribution unavailable: %s", error)
            return None
        self._close_owners = lookup.close
        return lookup.lookup

    # -- lifecycle -----------------------------------------------------------

    async def start(self, existing: Callable[[bool], Iterable[ConnKey]] | None = None) -> None:
        """Listen, enter the connections ``existing`` lists as accepted, then start capturing.

        ``existing(False)`` lists every connection right before the backend
        starts; ``existing(True)``, right after it (no packet has been handled
        yet), only TCP connections past their handshake: those that opened
        while the backend started. A connection whose handshake spans the
        start, and a UDP socket connected meanwhile, are asked about.
        """
        self._loop = asyncio.get_running_loop()
        self._listener = await endpoint.listen(self.config, self._new_session)
        self.backend.cache_probe = self.service.accept_cached
        self.backend.on_ended = self._on_ended
        before = set(existing(False)) if existing is not None else set()
        if before:
            self._run([ev.Preaccept(tuple(before))])
        self.backend.start(self._loop, self._on_packets)
        if existing is not None:
            meanwhile = tuple(key for key in existing(True) if key not in before)
            if meanwhile:
                self._run([ev.Preaccept(meanwhile)])
        self.bypass_watch.start(self._loop)
        log.info("pmk %s serving on %s with the %s backend", pmk.__version__, self.config.endpoint, self.backend.name)

    async def stop(self) -> None:
        """The fallback policy for everything held, then release backend and endpoint."""
        self._run([ev.Shutdown()])
        for timer in (self._timer, self._life_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._life_timer = None
        self.bypass_watch.stop()
        if self._kernel_worker is not None:
            self._kernel_worker.shutdown(wait=False, cancel_futures=True)
            self._kernel_worker = None
        if self._close_owners is not None:
            self._close_owners()
            self._close_owners = None
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

    def replace_policy(self, policy: Policy) -> None:
        """Decide with ``policy`` from the next packet on (SIGHUP)."""
        self.service.replace_policy(policy)

    # -- I/O into events -----------------------------------------------------

    def admit(self, session: ClientSession, transport: asyncio.BaseTransport) -> dict[str, str] | None:
        """Check the peer's identity; return the error to send it, or None to admit it."""
        refusal = endpoint.check_peer(self.config, transport)
        if refusal is not None:
            log.warning("refused a client: %s", refusal)
            self._run([ev.ClientRefused()])
            return {"code": ErrorCode.NOT_PERMITTED.value, "message": refusal}
        self.sessions[session.id] = session
        credentials = endpoint.peer_credentials(transport) if sys.platform != "win32" else None
        pid, uid = (credentials[0], credentials[1]) if credentials is not None else (None, None)
        self._run([ev.ClientJoined(session.id, pid, uid)])
        return None

    def on_events(self, events: Sequence[ev.Event]) -> None:
        """A session's events (one read, or its end)."""
        for event in events:
            if type(event) is ev.ClientLeft:
                self.sessions.pop(event.client, None)
        self._run(events)

    def _on_packets(self, packets: list[CapturedPacket]) -> None:
        self._run((ev.PacketsCaptured(packets),))

    def _on_timer(self) -> None:
        self._timer = None
        self._run((ev.Tick(),))

    def _on_life_timer(self) -> None:
        self._life_timer = None
        self._run((ev.LifeTick(),))

    def _on_ended(self, ends: list[KernelEnd]) -> None:
        self._run((ev.ConnectionsEnded(tuple(ends)),))

    def _measured(self, clients: tuple[int, ...], future: Future[Measured]) -> None:
        if future.cancelled():
            return  # shutting down
        error = future.exception()
        if error is not None:
            log.warning("bandwidth: the kernel's counters could not be read: %s", error)
            self._run((ev.TrafficMeasured(clients, None, ()),))
            return
        totals, moved = future.result()
        self._run((ev.TrafficMeasured(clients, totals, tuple(moved)),))

    def _totals_read(self, op: int, future: Future[Measured]) -> None:
        if future.cancelled():
            return  # shutting down
        error = future.exception()
        if error is not None:
            log.warning("list_connections: the kernel's counters could not be read: %s", error)
        self._run((ev.TotalsRead(op, None if error is not None else future.result()[0]),))

    def _kernel_done(self, op: int, future: Future[None]) -> None:
        if future.cancelled():
            return  # shutting down
        error = future.exception()
        if error is None:
            self._run((ev.KernelUpdated(op),))
            return
        if not isinstance(error, KernelUpdateError):
            log.error("kernel update failed unexpectedly", exc_info=error)
        self._run((ev.KernelUpdateFailed(op, str(error) or type(error).__name__),))

    # -- commands out --------------------------------------------------------

    def _run(self, events: Iterable[ev.Event]) -> None:
        self._carry_out(self.service.handle_all(events, self._clock()))

    def _carry_out(self, commands: list[cmd.Command]) -> None:
        sessions = self.sessions
        written: set[ClientSession] = set()
        for command in commands:
            match command:
                case cmd.Apply(packets, verdict, permanent, target):
                    self.backend.apply(packets, verdict, permanent, target)
                case cmd.SendDecide(client, msgid, info):
                    if (session := sessions.get(client)) is not None:
                        session.send_request(DECIDE, [info], msgid)
                        written.add(session)
                case cmd.Decided():
                    self.on_decided(command)
                case cmd.ArmTimer(at):
                    self._arm_timer(at)
                case cmd.ArmLifeTimer(at):
                    self._arm_life_timer(at)
                case cmd.ReadTotals(op):
                    self._submit(self.backend.traffic_since, ()).add_done_callback(
                        self._reporter(functools.partial(self._totals_read, op))
                    )
                case cmd.MeasureTraffic(clients, previous):
                    self._submit(self.backend.traffic_since, previous).add_done_callback(
                        self._reporter(functools.partial(self._measured, clients))
                    )
                case cmd.UpdateConnection(op, key, verdict):
                    self._in_worker(op, self.backend.update_connection, key, verdict)
                case cmd.ForgetConnections(op):
                    self._in_worker(op, self.backend.forget_all)
                case cmd.Reply(client, msgid, result):
                    if (session := sessions.get(client)) is not None:
                        session.respond(msgid, result)
                        written.add(session)
                case cmd.ReplyError(client, msgid, code, message):
                    if (session := sessions.get(client)) is not None:
                        session.respond_error(msgid, code, message)
                        written.add(session)
                case cmd.Notify(client, method, params):
                    if (session := sessions.get(client)) is not None:
                        session.notify(method, params)
                        written.add(session)
                case cmd.Forget(client, msgid):
                    if (session := sessions.get(client)) is not None:
                        session.forget(msgid)
        self.backend.flush_verdicts()
        self.backend.set_room(self.service.packet_room())
        for session in written:
            session.schedule_flush()

    def _arm_timer(self, at: float) -> None:
        if self._loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(max(0.0, at - self._clock()), self._on_timer)

    def _arm_life_timer(self, at: float) -> None:
        if self._loop is None:
            return
        if self._life_timer is not None:
            self._life_timer.cancel()
        self._life_timer = self._loop.call_later(max(0.0, at - self._clock()), self._on_life_timer)

    def _in_worker(self, op: int, call: Callable[..., None], *args: object) -> None:
        """Run a blocking kernel update off the event loop; its end comes back as an event."""
        self._submit(call, *args).add_done_callback(self._reporter(lambda done: self._kernel_done(op, done)))

    def _submit(self, call: Callable[..., T], *args: object) -> Future[T]:
        """Run a blocking kernel call in the one kernel worker (calls run in the order they were asked for)."""
        if self._kernel_worker is None:
            self._kernel_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pmk-kernel")
        return self._kernel_worker.submit(call, *args)

    def _reporter(self, then: Callable[[Future[T]], None]) -> Callable[[Future[T]], None]:
        """A done-callback that hands the finished future to ``then`` on the event loop."""
        loop = self._loop
        assert loop is not None

        def report(done: Future[T]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed while the call ran
                loop.call_soon_threadsafe(then, done)

        return report

    # -- reading -------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        return self.service.stats(self._clock())


def _log_decided(decided: cmd.Decided) -> None:
    if decisions.isEnabledFor(logging.DEBUG):
        decisions.debug(
            "%s %s %s (%s%s)",
            decided.verdict.value,
            "permanent" if decided.permanent else "once",
            decided.key,
            decided.by,
            f" {decided.name}" if decided.name else "",
        )
