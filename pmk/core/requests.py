"""Every ``decide`` request, one record each, and the one table of how it moves.

Theory of operation: the engine asks about a held packet (the head of its
connection's queue); that ask becomes a ``DecideRequest``. If a decider has
room it is SENT at once, else it WAITs (parked) with the deadline it would
have had, so the fallback policy still comes on time. A decider has at most
``max_in_flight`` requests out; parked asks go out as slots free up, oldest
first, or youngest first while the packet cache is nearly full (the oldest
will be evicted before an answer could help them).

A sent request ends ANSWERED or EXPIRED. When its packet goes away first
(evicted, or settled by ``update_verdict``) it is WITHDRAWN: the decider may
already be working on it, so it keeps its slot until the answer comes (late)
or the deadline passes; a flood of evictions thus never sends a decider more
than it answers. When its decider leaves (or turns observer) it WAITs again,
for another decider, with a new deadline. Records that end without an answer
being wanted are FORGOTTEN.

``TRANSITIONS`` is the only place that says which step is allowed in which
state, which state follows, and which counters it bumps: every request
counter in ``get_stats`` comes from there. The caller (the service) does the
rest: settling the packet, sending, notifying.

Pure bookkeeping: clients are plain ids, time is passed in.
"""

from __future__ import annotations

import enum
import heapq
from collections import OrderedDict
from typing import Any

from pmk.core.packet_cache import HeldPacket


class State(enum.Enum):
    # Members are singletons compared by identity: hash them by identity too (C
    # speed; Enum's own hash is a Python call, and states are hashed per step).
    __hash__ = object.__hash__

    NEW = "new"
    WAITING = "waiting"  # for a decider's slot
    SENT = "sent"
    WITHDRAWN = "withdrawn"  # sent, answer no longer wanted, slot still held
    ANSWERED = "answered"
    EXPIRED = "expired"
    FORGOTTEN = "forgotten"


class Step(enum.Enum):
    __hash__ = object.__hash__  # as State's

    PARK = "park"  # no decider has room
    SEND = "send"
    NO_DECIDER = "no_decider"  # none connected: the policy settles it
    ANSWER = "answer"  # a verdict
    ANSWER_ERROR = "answer_error"  # an error response: the policy settles it
    ANSWER_INVALID = "answer_invalid"  # a malformed result: the policy settles it
    EXPIRE = "expire"
    WITHDRAW = "withdraw"  # the packet is gone
    DECIDER_LEFT = "decider_left"
    SHUTDOWN = "shutdown"


_S, _T = State, Step
#: (state, step) -> (next state, counters bumped). A missing pair is a bug in the caller.
TRANSITIONS: dict[tuple[State, Step], tuple[State, tuple[str, ...]]] = {
    (_S.NEW, _T.PARK): (_S.WAITING, ("requests",)),
    (_S.NEW, _T.SEND): (_S.SENT, ("requests",)),
    (_S.NEW, _T.NO_DECIDER): (_S.FORGOTTEN, ("requests", "default_no_decider")),
    (_S.WAITING, _T.SEND): (_S.SENT, ()),
    (_S.WAITING, _T.NO_DECIDER): (_S.FORGOTTEN, ("default_no_decider",)),
    (_S.WAITING, _T.EXPIRE): (_S.EXPIRED, ("timeouts", "default_timeout")),
    (_S.WAITING, _T.WITHDRAW): (_S.FORGOTTEN, ("withdrawn",)),
    (_S.WAITING, _T.SHUTDOWN): (_S.FORGOTTEN, ()),
    (_S.SENT, _T.ANSWER): (_S.ANSWERED, ()),
    (_S.SENT, _T.ANSWER_ERROR): (_S.ANSWERED, ("default_error",)),
    (_S.SENT, _T.ANSWER_INVALID): (_S.ANSWERED, ("default_invalid",)),
    (_S.SENT, _T.EXPIRE): (_S.EXPIRED, ("timeouts", "default_timeout")),
    (_S.SENT, _T.WITHDRAW): (_S.WITHDRAWN, ("withdrawn",)),
    (_S.SENT, _T.DECIDER_LEFT): (_S.WAITING, ()),
    (_S.SENT, _T.SHUTDOWN): (_S.FORGOTTEN, ()),
    (_S.WITHDRAWN, _T.ANSWER): (_S.FORGOTTEN, ("late_verdicts",)),
    (_S.WITHDRAWN, _T.ANSWER_ERROR): (_S.FORGOTTEN, ("late_verdicts",)),
    (_S.WITHDRAWN, _T.ANSWER_INVALID): (_S.FORGOTTEN, ("late_verdicts",)),
    (_S.WITHDRAWN, _T.EXPIRE): (_S.FORGOTTEN, ()),
    (_S.WITHDRAWN, _T.DECIDER_LEFT): (_S.FORGOTTEN, ()),
    (_S.WITHDRAWN, _T.SHUTDOWN): (_S.FORGOTTEN, ()),
}
#: States in which the request occupies one of its decider's slots.
HOLDS_SLOT = frozenset({State.SENT, State.WITHDRAWN})
#: States in which the packet still wants an answer.
WANTED = frozenset({State.WAITING, State.SENT})


class _Move:
    """One TRANSITIONS entry with what it implies for the indexes worked out once."""

    __slots__ = ("after", "counted", "frees_slot", "unparks", "unwants")

    def __init__(self, before: State, after: State, counted: tuple[str, ...]) -> None:
        self.after = after
        self.counted = counted
        self.frees_slot = before in HOLDS_SLOT and after not in HOLDS_SLOT
        self.unparks = before is State.WAITING
        self.unwants = before in WANTED and after not in WANTED


#: TRANSITIONS as the step function reads it (derived, never edited).
_MOVES = {pair: _Move(pair[0], after, counted) for pair, (after, counted) in TRANSITIONS.items()}
#: Every counter TRANSITIONS names (``answer_forgotten`` counts late answers too).
COUNTERS = (
    "requests",
    "timeouts",
    "withdrawn",
    "late_verdicts",
    "default_no_decider",
    "default_timeout",
    "default_error",
    "default_invalid",
)


class DecideRequest:
    """One ask about one held packet: its state, its decider and msgid, its deadline."""

    __slots__ = ("client", "deadline", "held", "info", "msgid", "sent_at", "state")

    def __init__(self, held: HeldPacket, deadline: float) -> None:
        self.held = held
        self.state = State.NEW
        self.client: int | None = None
        self.msgid = -1
        self.deadline = deadline
        #: when it was last sent, and the info it was sent with (its decision's record reuses it)
        self.sent_at = 0.0
        self.info: dict[str, Any] | None = None

    @property
    def packet_id(self) -> int:
        return self.held.id

    def __repr__(self) -> str:
        return f"<DecideRequest packet={self.held.id} {self.state.value} client={self.client} msgid={self.msgid}>"


class RequestTable:
    """The records, indexed the ways the service looks them up, and their counters."""

    def __init__(self, timeout: float, max_in_flight: int, msgid_limit: int) -> None:
        if timeout <= 0:
            raise ValueError("verdict timeout must be positive")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self._msgid_limit = msgid_limit
        self._next_msgid = 0
        self.counters = dict.fromkeys(COUNTERS, 0)
        #: decider client id -> requests holding one of its slots.
        self.load: dict[int, int] = {}
        #: packet id -> its request while the answer is wanted (WAITING or SENT).
        self._by_packet: dict[int, DecideRequest] = {}
        #: msgid -> request while its decider may answer (SENT or WITHDRAWN).
        self._by_msgid: dict[int, DecideRequest] = {}
        #: WAITING requests in the order they were parked.
        self._parked: OrderedDict[int, DecideRequest] = OrderedDict()
        # (deadline, tie-breaker, request); entries of requests that moved on are skipped.
        self._deadlines: list[tuple[float, int, DecideRequest]] = []
        self._pushed = 0

    # -- the one place states change -----------------------------------------

    def step(self, request: DecideRequest, step: Step) -> State:
        """Move ``request`` by ``step`` per TRANSITIONS; keep indexes, slots and counters in line."""
        move = _MOVES[(request.state, step)]
        after = move.after
        for name in move.counted:
            self.counters[name] += 1
        if move.frees_slot:
            self._by_msgid.pop(request.msgid, None)
            if request.client in self.load:
                self.load[request.client] -= 1
        if move.unparks:
            self._parked.pop(request.held.id, None)
        if move.unwants:
            self._by_packet.pop(request.held.id, None)
        request.state = after
        if after is State.WAITING:
            self._by_packet[request.held.id] = request
            self._parked[request.held.id] = request
            request.client, request.msgid = None, -1
            self._push_deadline(request)
        elif after is State.SENT:
            self._by_packet[request.held.id] = request
        return after

    def answer_forgotten(self) -> None:
        """An answer to a request no longer on record (expired, or its decider turned observer): late."""
        self.counters["late_verdicts"] += 1

    def assign(self, request: DecideRequest, client: int) -> int:
        """Send ``request`` to ``client``: step SEND, take a slot, return the msgid to use."""
        was_new = request.state is State.NEW
        self.step(request, Step.SEND)
        request.client = client
        request.msgid = self._allocate_msgid()
        self._by_msgid[request.msgid] = request
        self.load[client] += 1
        if was_new:
            self._push_deadline(request)
        return request.msgid

    def _push_deadline(self, request: DecideRequest) -> None:
        self._pushed += 1
        heapq.heappush(self._deadlines, (request.deadline, self._pushed, request))

    def _allocate_msgid(self) -> int:
        # Unique among every client's outstanding requests; skips ids still in use after a wrap.
        while True:
            msgid = self._next_msgid
            self._next_msgid = (msgid + 1) % self._msgid_limit
            if msgid not in self._by_msgid:
                return msgid

    # -- lookups ---------------------------------------------------------------

    def new(self, held: HeldPacket, now: float) -> DecideRequest:
        return DecideRequest(held, now + self.timeout)

    def wanted(self, packet_id: int) -> DecideRequest | None:
        """The request about ``packet_id`` whose answer is still wanted."""
        return self._by_packet.get(packet_id)

    def by_msgid(self, msgid: int) -> DecideRequest | None:
        return self._by_msgid.get(msgid)

    def of_client(self, client: int) -> list[DecideRequest]:
        """Requests holding one of ``client``'s slots, oldest msgid first."""
        return [r for r in self._by_msgid.values() if r.client == client]

    def all_wanted(self) -> list[DecideRequest]:
        return list(self._by_packet.values())

    # -- deciders ----------------------------------------------------------------

    def add_decider(self, client: int) -> None:
        self.load.setdefault(client, 0)

    def remove_decider(self, client: int) -> None:
        self.load.pop(client, None)

    def pick(self) -> int | None:
        """The connected decider with the fewest slots taken, or None."""
        load = self.load
        if len(load) == 1:
            return next(iter(load))  # the common case, asked once per request
        if not load:
            return None
        return min(load, key=load.__getitem__)

    def has_room(self, client: int) -> bool:
        return self.load.get(client, self.max_in_flight) < self.max_in_flight

    # -- parked asks and deadlines ---------------------------------------------

    def parked(self) -> int:
        return len(self._parked)

    def next_parked(self, youngest: bool) -> DecideRequest | None:
        """The oldest (or youngest) parked request, still parked."""
        if not self._parked:
            return None
        return next(reversed(self._parked.values())) if youngest else next(iter(self._parked.values()))

    def expired(self, now: float) -> list[DecideRequest]:
        """Requests whose deadline passed, in deadline order (not yet stepped)."""
        due: list[DecideRequest] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            deadline, _, request = heapq.heappop(heap)
            if request.deadline == deadline and request.state in (State.WAITING, State.SENT, State.WITHDRAWN):
                due.append(request)
        return due

    def next_deadline(self) -> float | None:
        heap = self._deadlines
        while heap:
            deadline, _, request = heap[0]
            if request.deadline == deadline and request.state in (State.WAITING, State.SENT, State.WITHDRAWN):
                return deadline
            heapq.heappop(heap)  # the request moved on
        return None

    # -- reading -----------------------------------------------------------------

    def in_flight(self) -> int:
        """Sent requests whose answer is still wanted."""
        return len(self._by_packet) - len(self._parked)

    def withdrawn_in_flight(self) -> int:
        """Withdrawn requests still holding a decider's slot."""
        return len(self._by_msgid) - self.in_flight()
