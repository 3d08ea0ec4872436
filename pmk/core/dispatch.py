"""Which decider is asked about which packet, and until when.

Pure bookkeeping: sessions are plain ids here. Every request gets the same
timeout; a heap of deadlines finds the expired ones.

A decider has at most ``max_in_flight`` requests out. Asks beyond that wait
here and go out as answers come back, oldest first; when the packet cache
is nearly full the shell takes the youngest instead, since the oldest will
be evicted before an answer could help them. Either way a decider works on
packets that are still held instead of on a backlog the packet cache has
long evicted. A waiting ask keeps the deadline it would have had, so the
default verdict still comes on time.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass

# Enough pipelining to keep one decider busy (a round trip on a Unix socket
# is tens of microseconds), few enough that its backlog stays fresh.
DEFAULT_MAX_IN_FLIGHT = 256


@dataclass(slots=True)
class Assignment:
    """A request in flight: to whom, under which msgid, answered by when."""

    session: int
    msgid: int
    deadline: float


class Dispatcher:
    """Least-loaded choice among connected deciders, with per-request deadlines."""

    def __init__(self, timeout: float, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        if timeout <= 0:
            raise ValueError("verdict timeout must be positive")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self._load: dict[int, int] = {}
        self._assignments: dict[int, Assignment] = {}
        # A heap: parked asks keep their earlier deadline, so requests are not sent in deadline order.
        self._deadlines: list[tuple[float, int, int, int]] = []
        #: packet id -> deadline, for asks no decider has room for yet.
        self._waiting: OrderedDict[int, float] = OrderedDict()
        #: (session, msgid) of withdrawn requests the decider may still be working on.
        self._withdrawn: dict[tuple[int, int], Assignment] = {}

    @property
    def deciders(self) -> int:
        return len(self._load)

    def add_decider(self, session: int) -> None:
        self._load.setdefault(session, 0)

    def remove_decider(self, session: int) -> list[int]:
        """Forget a decider; return the packet ids it still owed an answer for."""
        self._load.pop(session, None)
        orphans = [pid for pid, a in self._assignments.items() if a.session == session]
        for pid in orphans:
            del self._assignments[pid]
        for gone in [k for k in self._withdrawn if k[0] == session]:
            del self._withdrawn[gone]
        return orphans

    def pick(self) -> int | None:
        """The connected decider with the fewest requests in flight, or None."""
        load = self._load
        if len(load) == 1:
            return next(iter(load))  # the common case, asked once per request
        if not load:
            return None
        return min(load, key=load.__getitem__)

    def has_room(self, session: int) -> bool:
        return self._load.get(session, self.max_in_flight) < self.max_in_flight

    def wait(self, packet_id: int, now: float) -> None:
        """Park an ask until a decider has room; it expires like a sent request."""
        self._waiting.setdefault(packet_id, now + self.timeout)

    def next_waiting(self, newest: bool = False) -> tuple[int, float] | None:
        """Take the oldest (or, with ``newest``, the youngest) parked ask and its deadline."""
        if not self._waiting:
            return None
        return self._waiting.popitem(last=newest)

    def unpark(self, packet_id: int) -> bool:
        """Forget a parked ask (its packet was settled or evicted)."""
        return self._waiting.pop(packet_id, None) is not None

    def waiting(self) -> int:
        return len(self._waiting)

    def assign(self, packet_id: int, session: int, msgid: int, now: float, deadline: float | None = None) -> None:
        """Record a sent request; ``deadline`` carries over from a parked ask."""
        if deadline is None:
            deadline = now + self.timeout
        self._assignments[packet_id] = Assignment(session, msgid, deadline)
        self._load[session] += 1
        heapq.heappush(self._deadlines, (deadline, packet_id, session, msgid))

    def complete(self, packet_id: int) -> Assignment | None:
        """The request for ``packet_id`` is answered or withdrawn: stop tracking it."""
        assignment = self._assignments.pop(packet_id, None)
        if assignment is not None and assignment.session in self._load:
            self._load[assignment.session] -= 1
        return assignment

    def withdraw(self, packet_id: int) -> Assignment | None:
        """The packet is gone, but its request keeps the decider's slot.

        The decider is likely working on it already; its slot is freed when
        it answers (``settle_withdrawn``) or the deadline passes. So a flood
        of evictions never sends a decider more than it answers.
        """
        assignment = self._assignments.pop(packet_id, None)
        if assignment is not None:
            self._withdrawn[(assignment.session, assignment.msgid)] = assignment
        return assignment

    def settle_withdrawn(self, session: int, msgid: int) -> bool:
        """A withdrawn request was answered after all: free its slot."""
        if self._withdrawn.pop((session, msgid), None) is None:
            return False
        if session in self._load:
            self._load[session] -= 1
        return True

    def owner(self, packet_id: int) -> Assignment | None:
        return self._assignments.get(packet_id)

    def expired_waiting(self, now: float) -> list[int]:
        """Parked asks whose deadline passed; they are no longer tracked."""
        due: list[int] = []
        while self._waiting:
            packet_id, deadline = next(iter(self._waiting.items()))
            if deadline > now:
                break
            del self._waiting[packet_id]
            due.append(packet_id)
        return due

    def expired(self, now: float) -> list[tuple[int | None, Assignment]]:
        """Requests whose deadline passed; they are no longer tracked.

        A withdrawn request comes back with packet id None: its packet is
        gone, only its msgid needs forgetting.
        """
        due: list[tuple[int | None, Assignment]] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, packet_id, session, msgid = heapq.heappop(self._deadlines)
            assignment = self._assignments.get(packet_id)
            # A stale deadline belongs to a request already answered or re-sent.
            if assignment is not None and (assignment.session, assignment.msgid) == (session, msgid):
                self.complete(packet_id)
                due.append((packet_id, assignment))
            elif (session, msgid) in self._withdrawn:
                withdrawn = self._withdrawn[(session, msgid)]
                self.settle_withdrawn(session, msgid)
                due.append((None, withdrawn))
        return due

    def next_deadline(self) -> float | None:
        candidates = []
        if self._deadlines:
            candidates.append(self._deadlines[0][0])
        if self._waiting:
            candidates.append(next(iter(self._waiting.values())))
        return min(candidates) if candidates else None

    def in_flight(self) -> int:
        """Requests whose answer is still wanted."""
        return len(self._assignments)

    def withdrawn_in_flight(self) -> int:
        """Withdrawn requests still holding a decider's slot."""
        return len(self._withdrawn)
