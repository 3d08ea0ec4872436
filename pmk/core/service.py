"""The decision service: every rule about packets, requests and clients, without I/O.

Theory of operation: the server hands each event (``events.py``) to
``handle(event, now)`` and carries out the commands (``commands.py``) it
gets back, in order. Packets go to the engine (verdict cache, packet cache);
what the engine asks about becomes a request record (``requests.py``) that
is sent to the least-loaded decider, parked until one has room, or settled
by the fallback policy when no decider is connected. Answers, timeouts and
clients leaving move those records through their one transition table.
Operator calls that change the kernel's verdict cache are answered only
once the kernel has the change (``UpdateConnection`` -> ``KernelUpdated``),
so the engine and the kernel never disagree.

After every event the engine's outbox is drained into commands, parked
requests go out while deciders have room, and the timer is re-armed when
the earliest deadline changed. Nothing here awaits or reads a clock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from itertools import islice
from typing import Any, Protocol

import pmk
from pmk.config import DEFAULT_IDLE_TIMEOUT, REDIRECT_LINGER
from pmk.core import bandwidth, lifecycle
from pmk.core import commands as cmd
from pmk.core import events as ev
from pmk.core.attribution import Attribution, OwnerOf, no_owner
from pmk.core.client_stats import DeciderFigures
from pmk.core.engine import Apply, Engine
from pmk.core.info import decide_info
from pmk.core.observers import Observers
from pmk.core.packet_cache import HeldPacket
from pmk.core.params import (
    InvalidParams,
    check_hello,
    check_no_params,
    check_packet_id,
    check_update_verdict,
)
from pmk.core.policy import Policy
from pmk.core.requests import DecideRequest, RequestTable, State, Step
from pmk.core.verdict_cache import CachedVerdict
from pmk.packet.captured import CacheRun, CapturedPacket
from pmk.packet.parse import conn_key
from pmk.rpc import names
from pmk.rpc.messages import MSGID_LIMIT, ErrorCode, wire_error
from pmk.verdicts import REROUTE_VERDICTS, ConnKey, Decision, RerouteTargets, Verdict, parse_decision

log = logging.getLogger(__name__)

# Parked asks go youngest first once the packet cache is this full (SPEC 5.3).
_PRESSURE_NUMERATOR, _PRESSURE_DENOMINATOR = 3, 4


class BackendFacts(Protocol):
    """What the service needs to know of the capture backend (no I/O through it but stats)."""

    @property
    def name(self) -> str: ...

    @property
    def kernel_verdict_cache(self) -> bool: ...

    def stats(self) -> dict[str, int]: ...


class MethodError(Exception):
    """A method failed in a way the wire names with ``code``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Client:
    __slots__ = ("figures", "greeted", "name", "payload", "pid", "role", "uid")

    def __init__(self, pid: int | None = None, uid: int | None = None) -> None:
        self.name = ""
        self.role = "observer"
        #: said hello: gets connection_end
        self.greeted = False
        self.payload = False  # decide infos carry the packet's bytes (hello)
        self.pid, self.uid = pid, uid
        self.figures = DeciderFigures()


class Service:
    """Engine, request records, clients and the fallback policy behind one event interface."""

    def __init__(
        self,
        *,
        backend: BackendFacts,
        policy: Policy,
        packet_cache: int,
        verdict_cache: int,
        verdict_timeout: float,
        max_in_flight: int,
        started: float,
        targets: RerouteTargets | None = None,
        reroutable: Callable[[CapturedPacket], bool] | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        owner_of: OwnerOf = no_owner,
    ) -> None:
        """``targets``: the configured reroute targets; ``reroutable`` (None: the
        backend cannot reroute) says whether a packet starts its connection, so
        that a reroute can still take effect (SPEC 5.2)."""
        self.engine = Engine(
            packet_cache_size=packet_cache,
            verdict_cache_size=verdict_cache,
            hits_permanent=backend.kernel_verdict_cache,
        )
        self.requests = RequestTable(verdict_timeout, max_in_flight, MSGID_LIMIT)
        self.targets = targets = targets if targets is not None else RerouteTargets()
        self._reroutable = reroutable
        #: What a decide answer may say (hello's ``verdicts``).
        self.verdicts = targets.verdicts(redirect=reroutable is not None)
        self.policy = policy
        self.policy_hits: dict[str, int] = dict.fromkeys(policy.rule_names, 0)
        self._backend = backend
        self._started = started
        self._clients: dict[int, _Client] = {}
        self._out: list[cmd.Command] = []
        self._timer_at: float | None = None
        self._next_op = 1
        #: kernel update op -> (client, msgid, key, verdict); key None for clear_cache.
        self._kernel_ops: dict[int, tuple[int, int, ConnKey | None, Verdict | None]] = {}
        self.protocol_errors = 0
        self.refused_clients = 0
        self.slow_clients = 0
        #: the owner lookup, asked once per decide request when it is sent or settled (``_owner``)
        self.attribution = Attribution(owner_of)
        self.observers = Observers()
        #: Whole-batch fast path for backends that see every packet (``CaptureBackend.cache_probe``).
        self.accept_cached: Callable[[list[CacheRun]], bool] = self.engine.accept_cached
        #: Connection ends (divert: FIN, RST, idle) and bandwidth subscriptions.
        self.life = lifecycle.Lifecycle(self.engine.verdicts, idle_timeout, REDIRECT_LINGER)
        self.bandwidth = bandwidth.Bandwidth()
        self._life_at: float | None = None
        #: Something was added (a closing connection, a subscription, a measured client) that may be
        #: due before the armed life timer; until then a pass need not look (``_arm_life_timer``).
        self._life_sooner = True
        #: The armed life timer is no later than the next sweep (divert: something is cached or closing).
        self._life_sweeps = False
        #: list_connections waiting for the kernel's totals: op -> (client, msgid, offset, limit)
        self._list_ops: dict[int, tuple[int, int, int, int]] = {}
        self._handlers: dict[type, Callable[[Any, float], None]] = {
            ev.PacketsCaptured: self._on_packets,
            ev.Tick: self._on_tick,
            ev.ClientJoined: self._on_joined,
            ev.ClientRefused: self._on_refused,
            ev.ClientLeft: self._on_left,
            ev.ClientCutOff: self._on_cut_off,
            ev.ClientRequest: self._on_request,
            ev.DecideAnswered: self._on_answer,
            ev.LateAnswer: self._on_late_answer,
            ev.ProtocolErrorSeen: self._on_protocol_error,
            ev.KernelUpdated: self._on_kernel_updated,
            ev.KernelUpdateFailed: self._on_kernel_failed,
            ev.Preaccept: self._on_preaccept,
            ev.LifeTick: self._on_life_tick,
            ev.ConnectionsEnded: self._on_connections_ended,
            ev.TrafficMeasured: self._on_traffic_measured,
            ev.TotalsRead: self._on_totals_read,
            ev.Shutdown: self._on_shutdown,
        }

    # -- the interface -----------------------------------------------------------

    def handle(self, event: ev.Event, now: float) -> list[cmd.Command]:
        """Take one event; return what the server must do, in order."""
        return self.handle_all((event,), now)

    def handle_all(self, events: Iterable[ev.Event], now: float) -> list[cmd.Command]:
        """Take events that arrived together (one read from a client) and return their commands.

        Verdicts they produce are carried out together, one backend call per
        kind, instead of one per answer.
        """
        handlers = self._handlers
        self.engine.verdicts.now = now  # lookups stamp entries with it (last seen)
        for event in events:
            handlers[type(event)](event, now)
        self._drain(now)
        out, self._out = self._out, []
        return out

    def replace_policy(self, policy: Policy) -> None:
        """Use ``policy`` from now on (SIGHUP); hits of rules it keeps keep counting."""
        self.policy = policy
        for rule in policy.rule_names:
            self.policy_hits.setdefault(rule, 0)

    def packet_room(self) -> int:
        """Packets the packet cache can take before it must evict one."""
        held = self.engine.held
        return held.capacity - len(held)

    def stats(self, now: float) -> dict[str, Any]:
        """The ``get_stats`` result (SPEC section 4)."""
        stats: dict[str, Any] = self.engine.stats()
        stats.update(self.requests.counters)
        for name, value in self._backend.stats().items():
            # The engine's accounting wins; a backend counter of the same name
            # (nfqueue counts its own accepted/blocked/dropped) gets a prefix.
            stats[f"{self._backend.name}_{name}" if name in stats else name] = value
        requests = self.requests
        stats["deciders"] = len(requests.load)
        stats["clients"] = len(self._clients)
        stats["in_flight"] = requests.in_flight()
        stats["waiting_for_decider"] = requests.parked()
        stats["withdrawn_in_flight"] = requests.withdrawn_in_flight()
        stats["protocol_errors"] = self.protocol_errors
        stats["refused_clients"] = self.refused_clients
        stats["slow_clients"] = self.slow_clients
        stats["policy_hits"] = dict(self.policy_hits)
        stats["connections_new"] = self.observers.events
        stats["attribution_errors"] = self.attribution.errors
        stats["client_list"] = self._client_list()
        stats["backend"] = self._backend.name
        stats["uptime"] = round(now - self._started, 3)
        return stats

    def _client_list(self) -> list[dict[str, Any]]:
        load = self.requests.load
        out = []
        for client_id, client in self._clients.items():
            figures = client.figures
            entry: dict[str, Any] = {
                "id": client_id,
                "name": client.name,
                "role": client.role,
                "in_flight": load.get(client_id, 0),
                "answered": figures.answered,
                "timeouts": figures.timeouts,
                "latency_p50_ms": figures.percentile_ms(0.5),
                "latency_p99_ms": figures.percentile_ms(0.99),
            }
            if client.pid is not None:
                entry["pid"] = client.pid
            if client.uid is not None:
                entry["uid"] = client.uid
            out.append(entry)
        return out

    # -- packets -------------------------------------------------------------------

    def _on_packets(self, event: ev.PacketsCaptured, now: float) -> None:
        self.engine.on_packets(event.packets)

    def _drain(self, now: float) -> None:
        """Turn the engine's outbox into commands and send parked asks, until nothing is left."""
        engine = self.engine
        while True:
            while engine.outbox:
                work = engine.outbox.take()
                for packets, verdict, permanent, to in _coalesced(work.applies):
                    self._out.append(cmd.Apply(packets, verdict, permanent, to))
                if work.unparsed:
                    decision = self.policy.default
                    self.policy_hits[decision.rule] = self.policy_hits.get(decision.rule, 0) + len(work.unparsed)
                    engine.settle_unparsed(work.unparsed, decision.verdict)
                for packets, verdict in work.kernel_hits:
                    self._decided_from_cache(packets, verdict, now)
                for key, entry, reset in work.closing:
                    self._closing(key, entry, reset, now)
                for held in work.withdrawn:
                    self._withdraw(held)
                for held in work.asks:
                    self._ask(held, now)
            self._pump(now)
            if not engine.outbox:
                break
        # Armed only when something is due earlier: an answer that removes the
        # earliest deadline leaves the timer to fire early (a Tick re-arms it),
        # instead of costing the loop a cancel and a new timer per answer.
        deadline = self.requests.next_deadline()
        if deadline is not None and (self._timer_at is None or deadline < self._timer_at):
            self._timer_at = deadline
            self._out.append(cmd.ArmTimer(deadline))
        self._arm_life_timer(now)

    def _decided_from_cache(self, packets: list[CapturedPacket], verdict: Verdict, now: float) -> None:
        """A kernel-cache backend only sees packets of connections it has no verdict for: record the hand-over.

        Such a packet begins a connection in the kernel (a new one with a
        cached key, or one whose mark was taken away), so the entry's record
        begins again: an end the kernel reports for an earlier connection with
        this key stopped before that (``_on_connections_ended``).
        """
        cache = self.engine.verdicts
        for packet in packets:
            key = conn_key(packet.raw, packet.outbound)
            if key is not None:
                entry = cache.peek(key)
                if entry is not None:
                    entry.created = now
                self._record(cmd.Decided(key, packet.outbound, verdict, True, "cache", ""))

    def _record(self, decided: cmd.Decided) -> None:
        """The one record of a decision (the decision log), and its event for observers."""
        self._out.append(decided)
        self._out.extend(self.observers.notices(decided))

    def _ask(self, held: HeldPacket, now: float) -> None:
        requests = self.requests
        request = requests.new(held, now)
        target = requests.pick()
        if target is None:
            requests.step(request, Step.NO_DECIDER)
            self._settle_by_policy(held)
        elif requests.parked() or not requests.has_room(target):
            requests.step(request, Step.PARK)  # a new ask never overtakes parked ones
        else:
            self._send(request, target, now)

    def _owner(self, held: HeldPacket) -> None:
        """Look up who owns ``held``'s socket, once, when its decision is near.

        Not when it is held: under overload most parked requests are evicted
        unsent, and the lookup (two system calls) is the largest part of a
        request's cost after the kernel's own work.
        """
        if not held.looked_up:
            held.owner = self.attribution.owner(held.key, held.packet.outbound)
            held.looked_up = True

    def _send(self, request: DecideRequest, client: int, now: float) -> None:
        msgid = self.requests.assign(request, client)
        held = request.held
        self.engine.held.deciding(held.id)
        self._owner(held)
        info = request.info = decide_info(held, max(0, round((request.deadline - now) * 1000)))
        request.sent_at = now
        known = self._clients.get(client)
        if known is not None and known.payload:
            info = {**info, "payload": bytes(held.packet.raw)}
        self._out.append(cmd.SendDecide(client, msgid, info))

    def _pump(self, now: float) -> None:
        """Send parked asks while a decider has room, or settle them if none is left."""
        requests, held = self.requests, self.engine.held
        while requests.parked():
            target = requests.pick()
            if target is not None and not requests.has_room(target):
                return
            # Under pressure the oldest packets are the next to be evicted: ask about the youngest.
            youngest = len(held) * _PRESSURE_DENOMINATOR >= held.capacity * _PRESSURE_NUMERATOR
            request = requests.next_parked(youngest)
            assert request is not None
            if target is None:
                requests.step(request, Step.NO_DECIDER)
                self._settle_by_policy(request.held, request)
            else:
                self._send(request, target, now)

    def _withdraw(self, held: HeldPacket) -> None:
        """The packet is gone: drop its parked ask, or tell its decider."""
        request = self.requests.wanted(held.id)
        if request is None:
            return
        was_sent = request.state is State.SENT
        self.requests.step(request, Step.WITHDRAW)
        if was_sent:
            assert request.client is not None
            self._out.append(cmd.Notify(request.client, names.WITHDRAWN, [held.id]))

    def _settle_by_policy(self, held: HeldPacket, request: DecideRequest | None = None) -> None:
        self._owner(held)
        decision = self.policy.decide(held.key, held.packet.outbound)
        self.policy_hits[decision.rule] = self.policy_hits.get(decision.rule, 0) + 1
        info = request.info if request is not None and request.info is not None else decide_info(held)
        self._record(
            cmd.Decided(
                held.key,
                held.packet.outbound,
                decision.verdict,
                decision.permanent,
                "policy",
                decision.rule,
                owner=held.owner,
                info=info,
            )
        )
        if self.engine.on_verdict(held.id, decision.verdict, decision.permanent, defaulted=True) and decision.permanent:
            self._remember(held, "policy", decision.rule)

    # -- time ------------------------------------------------------------------------

    def _on_tick(self, event: ev.Tick, now: float) -> None:
        self._timer_at = None
        requests = self.requests
        for request in requests.expired(now):
            state = request.state
            if state not in (State.WAITING, State.SENT, State.WITHDRAWN):
                continue  # settled while an earlier one expired
            requests.step(request, Step.EXPIRE)
            if state is not State.WAITING:
                assert request.client is not None
                self._out.append(cmd.Forget(request.client, request.msgid))
                if state is State.SENT and (client := self._clients.get(request.client)) is not None:
                    client.figures.timeouts += 1
            if state is not State.WITHDRAWN:
                self._settle_by_policy(request.held, request)

    # -- answers -----------------------------------------------------------------------

    def _on_answer(self, event: ev.DecideAnswered, now: float) -> None:
        requests = self.requests
        request = requests.by_msgid(event.msgid)
        if request is None or request.client != event.client:
            requests.answer_forgotten()  # cannot happen: the RPC layer matched the msgid
            return
        if (client := self._clients.get(event.client)) is not None:
            client.figures.answer(now - request.sent_at)
        if request.state is State.WITHDRAWN:
            requests.step(request, Step.ANSWER)  # late; frees the decider's slot
            return
        held = request.held
        if event.error is not None:
            log.info("decider %s answered packet %d with an error: %r", self._name(event.client), held.id, event.error)
            requests.step(request, Step.ANSWER_ERROR)
            self._settle_by_policy(held, request)
            return
        try:
            decision = self._decision(event.result, held)
        except ValueError as error:
            requests.step(request, Step.ANSWER_INVALID)
            self._out.append(
                cmd.Notify(event.client, names.PROTOCOL_ERROR, [wire_error(ErrorCode.INVALID_PARAMS, str(error))])
            )
            self._settle_by_policy(held, request)
            return
        requests.step(request, Step.ANSWER)
        verdict, permanent, to = decision.verdict, decision.permanent, decision.target
        self._record(
            cmd.Decided(
                held.key,
                held.packet.outbound,
                verdict,
                permanent,
                "decider",
                self._name(event.client),
                to=to,
                owner=held.owner,
                info=request.info,
            )
        )
        if self.engine.on_verdict(held.id, verdict, permanent, target=to) and permanent:
            self._remember(held, "decider", self._name(event.client))

    def _decision(self, result: object, held: HeldPacket) -> Decision:
        """Check a decide answer for ``held``; ValueError (a protocol error) if it is invalid.

        A reroute for a packet that does not start its connection comes too
        late to change the connection's addresses: it is carried out as a
        permanent block (SPEC 5.2).
        """
        decision = parse_decision(result, self.targets, held.key, held.packet.outbound)
        if decision.verdict not in self.verdicts:
            raise ValueError(f"this server does not offer {decision.verdict.value} (see hello's verdicts)")
        reroutable = self._reroutable
        if decision.verdict in REROUTE_VERDICTS and not (reroutable is not None and reroutable(held.packet)):
            log.info("%s for packet %d came after its connection's first packet: blocked", decision.verdict, held.id)
            return Decision(Verdict.BLOCK, True)
        return decision

    def _on_late_answer(self, event: ev.LateAnswer, now: float) -> None:
        self.requests.answer_forgotten()

    # -- clients ------------------------------------------------------------------------

    def _on_joined(self, event: ev.ClientJoined, now: float) -> None:
        self._clients[event.client] = _Client(event.pid, event.uid)

    def _on_refused(self, event: ev.ClientRefused, now: float) -> None:
        self.refused_clients += 1

    def _on_cut_off(self, event: ev.ClientCutOff, now: float) -> None:
        self.slow_clients += 1

    def _on_protocol_error(self, event: ev.ProtocolErrorSeen, now: float) -> None:
        self.protocol_errors += 1

    def _on_left(self, event: ev.ClientLeft, now: float) -> None:
        self.bandwidth.stop(event.client)
        self.observers.clients.discard(event.client)
        if self._clients.pop(event.client, None) is not None:
            self._stop_deciding(event.client, now, connected=False)

    def _stop_deciding(self, client: int, now: float, *, connected: bool) -> None:
        """Take back what ``client`` was asked: re-ask elsewhere (the pump sends or settles them)."""
        requests = self.requests
        requests.remove_decider(client)
        moved = 0
        for request in requests.of_client(client):
            msgid = request.msgid
            if request.state is State.SENT:
                request.deadline = now + requests.timeout
                self.engine.held.not_deciding(request.held.id)
                moved += 1
            requests.step(request, Step.DECIDER_LEFT)
            if connected:
                self._out.append(cmd.Forget(client, msgid))
        if moved:
            log.info("decider %s left with %d requests pending; re-asking", self._name(client), moved)

    def _name(self, client: int) -> str:
        known = self._clients.get(client)
        return known.name if known is not None and known.name else f"#{client}"

    # -- client requests ----------------------------------------------------------------------

    def _on_request(self, event: ev.ClientRequest, now: float) -> None:
        handler = _METHODS.get(event.method)
        if handler is None:
            self._out.append(
                cmd.ReplyError(event.client, event.msgid, ErrorCode.UNKNOWN_METHOD, f"no method {event.method!r}")
            )
            return
        try:
            result = handler(self, event, now)
        except InvalidParams as error:
            self._out.append(cmd.ReplyError(event.client, event.msgid, ErrorCode.INVALID_PARAMS, str(error)))
        except MethodError as error:
            self._out.append(cmd.ReplyError(event.client, event.msgid, error.code, str(error)))
        else:
            if result is not _LATER:
                self._out.append(cmd.Reply(event.client, event.msgid, result))

    def _hello(self, event: ev.ClientRequest, now: float) -> Any:
        hello = check_hello(event.params)
        if hello.protocol not in pmk.PROTOCOL_VERSIONS:
            spoken = ", ".join(str(version) for version in pmk.PROTOCOL_VERSIONS)
            raise MethodError(
                ErrorCode.UNSUPPORTED_PROTOCOL,
                f"protocol {hello.protocol} is not spoken here; this server speaks {spoken}",
            )
        client = self._clients.setdefault(event.client, _Client())
        client.name, client.role, client.payload, client.greeted = hello.name, hello.role, hello.payload, True
        if hello.role == "decider":
            self.observers.clients.discard(event.client)
            self.requests.add_decider(event.client)
        else:
            self.observers.clients.add(event.client)
            if event.client in self.requests.load:
                # A decider turning observer must not strand what it was asked (SPEC 5.4).
                self._stop_deciding(event.client, now, connected=True)
        # Returned as the Reply, which goes out before any decide this hello made possible:
        # asks are sent after every event of the batch (``_drain``).
        return {
            "protocol": pmk.PROTOCOL_VERSION,
            "version": pmk.__version__,
            "backend": self._backend.name,
            "verdict_timeout": float(self.requests.timeout),
            "verdicts": [verdict.value for verdict in self.verdicts],
            "max_in_flight": self.requests.max_in_flight,
        }

    def _get_payload(self, event: ev.ClientRequest, now: float) -> Any:
        packet_id = check_packet_id(event.params, names.GET_PAYLOAD)
        held = self.engine.held.get(packet_id)
        if held is None:
            raise MethodError(ErrorCode.UNKNOWN_PACKET, f"packet {packet_id} is not held")
        return bytes(held.packet.raw)

    def _get_stats(self, event: ev.ClientRequest, now: float) -> Any:
        check_no_params(event.params, names.GET_STATS)
        return self.stats(now)

    def _get_version(self, event: ev.ClientRequest, now: float) -> Any:
        check_no_params(event.params, names.GET_VERSION)
        return {"protocol": pmk.PROTOCOL_VERSION, "version": pmk.__version__, "protocols": list(pmk.PROTOCOL_VERSIONS)}

    def _clear_cache(self, event: ev.ClientRequest, now: float) -> Any:
        check_no_params(event.params, names.CLEAR_CACHE)
        if not self._backend.kernel_verdict_cache:
            return self.engine.clear_cache()
        op = self._kernel_op(event, None, None)
        self._out.append(cmd.ForgetConnections(op))
        return _LATER

    def _update_verdict(self, event: ev.ClientRequest, now: float) -> Any:
        key, verdict = check_update_verdict(event.params)
        if not self._backend.kernel_verdict_cache:
            self._apply_update(key, verdict)
            return True
        op = self._kernel_op(event, key, verdict)
        self._out.append(cmd.UpdateConnection(op, key, verdict))
        return _LATER

    # -- operator calls on the kernel ------------------------------------------------------

    def _kernel_op(self, event: ev.ClientRequest, key: ConnKey | None, verdict: Verdict | None) -> int:
        op = self._next_op
        self._next_op += 1
        self._kernel_ops[op] = (event.client, event.msgid, key, verdict)
        return op

    def _apply_update(self, key: ConnKey, verdict: Verdict) -> None:
        self._record(cmd.Decided(key, False, verdict, True, "operator", ""))
        self.engine.update_verdict(key, verdict)
        entry = self.engine.verdicts.peek(key)
        if entry is not None:
            entry.by, entry.name = "operator", ""

    def _on_kernel_updated(self, event: ev.KernelUpdated, now: float) -> None:
        client, msgid, key, verdict = self._kernel_ops.pop(event.op)
        if key is None:
            self._out.append(cmd.Reply(client, msgid, self.engine.clear_cache()))
            return
        assert verdict is not None
        self._apply_update(key, verdict)
        self._out.append(cmd.Reply(client, msgid, True))

    def _on_kernel_failed(self, event: ev.KernelUpdateFailed, now: float) -> None:
        client, msgid, key, _ = self._kernel_ops.pop(event.op)
        what = names.CLEAR_CACHE if key is None else names.UPDATE_VERDICT
        log.warning("%s failed in the kernel, nothing changed: %s", what, event.message)
        self._out.append(cmd.ReplyError(client, msgid, ErrorCode.INTERNAL, f"kernel not updated: {event.message}"))

    # -- the connection's life (lifecycle.py, bandwidth.py) ------------------------------------

    def _remember(self, held: HeldPacket, by: str, name: str) -> None:
        """Who decided a connection that just got a cached verdict (for its record)."""
        entry = self.engine.verdicts.peek(held.key)
        if entry is not None:
            entry.decided(by, name, held.owner)

    def _closing(self, key: ConnKey, entry: CachedVerdict, reset: bool, now: float) -> None:
        if self._backend.kernel_verdict_cache:
            return  # the kernel reports ends itself (ConnectionsEnded)
        end = self.life.closing(key, entry, reset, now)
        if end is not None:
            self._ended([end], now)
        else:
            self._life_sooner = True

    def _ended(self, ends: list[lifecycle.End], now: float) -> None:
        """Tell every client that said hello (SPEC 8, connection_end); the entries are already out of the cache."""
        records = []
        for key, entry, reason in ends:
            record = lifecycle.record(key, entry, now)
            record["reason"] = reason
            records.append(record)
        self._send_ends(records)

    def _send_ends(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        greeted = [client for client, known in self._clients.items() if known.greeted]
        for record in records:
            for client in greeted:
                self._out.append(cmd.Notify(client, names.CONNECTION_END, [record]))

    def _on_life_tick(self, event: ev.LifeTick, now: float) -> None:
        self._life_at = None
        kernel = self._backend.kernel_verdict_cache
        if not kernel:
            self._ended(self.life.due(now), now)
        due = self.bandwidth.due(now)
        if not due:
            return
        if kernel:
            clients = tuple(due)
            self._out.append(cmd.MeasureTraffic(clients, tuple(self.bandwidth.measuring(due))))
            return
        for client in due:
            moved = self.bandwidth.moved_in_cache(client, self.engine.verdicts, now)
            self._out.append(cmd.Notify(client, names.BANDWIDTH, [bandwidth.entries(moved)]))

    def _on_connections_ended(self, event: ev.ConnectionsEnded, now: float) -> None:
        """End the cached connections the kernel stopped tracking, but not a newer one with the same key.

        An end event can be read after a new connection with the same
        addresses has come through the cache (the kernel drops an entry in
        TIME_WAIT when a new SYN reuses its ports): its stop then precedes the
        entry's begin (``_decided_from_cache``). That older connection's end
        is still told, with the kernel's totals and lifetime, and the entry
        stays for the newer one.
        """
        cache, records = self.engine.verdicts, []
        for key, traffic, span in event.ends:
            entry = cache.peek(key)
            if entry is None:
                continue  # not cached (evicted, cleared, or never decided permanently)
            record = lifecycle.record(key, entry, now, traffic)
            if span is not None and span[1] < entry.created:
                record["age"] = round(max(0.0, span[1] - span[0]), 3)  # the older one's; the entry stays
            else:
                cache.pop(key)
            record["reason"] = "destroyed"
            records.append(record)
        self._send_ends(records)

    def _on_traffic_measured(self, event: ev.TrafficMeasured, now: float) -> None:
        self._life_sooner = True  # the measured clients' next notifications are due again
        for n, client in enumerate(event.clients):
            if self.bandwidth.measured(client, event.totals):
                self._out.append(cmd.Notify(client, names.BANDWIDTH, [bandwidth.entries(event.moved[n])]))

    def _arm_life_timer(self, now: float) -> None:
        """Arm the life timer when something is due earlier than it is armed for.

        This runs after every pass, so it returns at once when nothing can
        be due sooner: the timer is armed, it covers the next sweep (where
        pmk sweeps), and nothing was added since (``_life_sooner``). The
        oldest cached entry only gets later (it is seen again, or leaves),
        and new entries join behind it.
        """
        kernel = self._backend.kernel_verdict_cache
        if self._life_at is not None and not self._life_sooner and (kernel or self._life_sweeps):
            return
        self._life_sooner = False
        times = [self.bandwidth.next_due()]
        if not kernel:
            sweep = self.life.next_sweep(now)
            self._life_sweeps = sweep is not None
            times.append(sweep)
        at = min((t for t in times if t is not None), default=None)
        if at is not None and (self._life_at is None or at < self._life_at):
            self._life_at = at
            self._out.append(cmd.ArmLifeTimer(at))

    def _list_connections(self, event: ev.ClientRequest, now: float) -> Any:
        offset, limit = lifecycle.check_list(event.params)
        if not self._backend.kernel_verdict_cache:
            return self._connections(offset, limit, now, None)
        # The kernel carries the packets: its counters are read first (off the loop).
        op = self._next_op
        self._next_op += 1
        self._list_ops[op] = (event.client, event.msgid, offset, limit)
        self._out.append(cmd.ReadTotals(op))
        return _LATER

    def _on_totals_read(self, event: ev.TotalsRead, now: float) -> None:
        client, msgid, offset, limit = self._list_ops.pop(event.op)
        if event.totals is None:
            log.warning("list_connections: the kernel's counters could not be read; sending pmk's own")
        self._out.append(cmd.Reply(client, msgid, self._connections(offset, limit, now, event.totals)))

    def _connections(
        self, offset: int, limit: int, now: float, totals: Mapping[ConnKey, tuple[int, int, int, int]] | None
    ) -> dict[str, Any]:
        """A list_connections result; ``totals``: the kernel's counters, where it carries the packets."""
        cache = self.engine.verdicts
        page = islice(cache.oldest(), offset, offset + limit)
        records = [
            lifecycle.record(key, entry, now, totals.get(key) if totals is not None else None) for key, entry in page
        ]
        return {"total": len(cache), "connections": records}

    def _subscribe(self, event: ev.ClientRequest, now: float) -> Any:
        interval = bandwidth.check_subscribe(event.params)
        kernel = self._backend.kernel_verdict_cache
        self.bandwidth.subscribe(event.client, interval, now, self.engine.verdicts, kernel)
        self._life_sooner = True
        return True

    # -- start and end ------------------------------------------------------------------------

    def _on_preaccept(self, event: ev.Preaccept, now: float) -> None:
        self.engine.preaccept(event.keys)
        for key in event.keys:
            # Which side opened it is unknown: recorded as inbound.
            self._record(cmd.Decided(key, False, Verdict.ACCEPT, True, "existing", ""))
            entry = self.engine.verdicts.peek(key)
            if entry is not None:
                entry.by = "existing"

    def _on_shutdown(self, event: ev.Shutdown, now: float) -> None:
        requests = self.requests
        for request in requests.all_wanted():
            requests.step(request, Step.SHUTDOWN)
        released = self.engine.release_all()
        for held in released:
            decision = self.policy.decide(held.key, held.packet.outbound)
            self.policy_hits[decision.rule] = self.policy_hits.get(decision.rule, 0) + 1
            self.engine.settle_released([held], decision.verdict)
        if released:
            log.info("shutdown: %d held packets got the default verdict of the fallback policy", len(released))


# A handler's result meaning "the reply comes later" (after a kernel update).
_LATER = object()
_METHODS: Mapping[str, Callable[[Service, ev.ClientRequest, float], Any]] = {
    names.HELLO: Service._hello,
    names.GET_PAYLOAD: Service._get_payload,
    names.GET_STATS: Service._get_stats,
    names.GET_VERSION: Service._get_version,
    names.CLEAR_CACHE: Service._clear_cache,
    names.UPDATE_VERDICT: Service._update_verdict,
    names.LIST_CONNECTIONS: Service._list_connections,
    names.SUBSCRIBE: Service._subscribe,
}


def _coalesced(applies: list[Apply]) -> list[Apply]:
    """Join neighbouring applies of one kind, so that many answers go out in one backend call."""
    if len(applies) < 2:
        return applies
    out: list[Apply] = []
    joined = False  # whether out[-1] holds a list of our own (safe to extend)
    for packets, verdict, permanent, to in applies:
        if out and out[-1][1] is verdict and out[-1][2] == permanent and out[-1][3] == to:
            if not joined:
                out[-1] = (list(out[-1][0]), verdict, permanent, to)
                joined = True
            out[-1][0].extend(packets)
        else:
            out.append((packets, verdict, permanent, to))
            joined = False
    return out
