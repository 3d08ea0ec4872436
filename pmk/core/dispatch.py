"""Which decider is asked about which packet, and until when.

Pure bookkeeping: sessions are plain ids here. Every request gets the same
timeout, so deadlines arrive in order and a deque is enough to find the
expired ones.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(slots=True)
class Assignment:
    """A request in flight: to whom, under which msgid, answered by when."""

    session: int
    msgid: int
    deadline: float


class Dispatcher:
    """Least-loaded choice among connected deciders, with per-request deadlines."""

    def __init__(self, timeout: float) -> None:
        if timeout <= 0:
            raise ValueError("verdict timeout must be positive")
        self.timeout = timeout
        self._load: dict[int, int] = {}
        self._assignments: dict[int, Assignment] = {}
        self._deadlines: deque[tuple[float, int, int, int]] = deque()

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
        return orphans

    def pick(self) -> int | None:
        """The connected decider with the fewest requests in flight, or None."""
        if not self._load:
            return None
        return min(self._load, key=self._load.__getitem__)

    def assign(self, packet_id: int, session: int, msgid: int, now: float) -> None:
        deadline = now + self.timeout
        self._assignments[packet_id] = Assignment(session, msgid, deadline)
        self._load[session] += 1
        self._deadlines.append((deadline, packet_id, session, msgid))

    def complete(self, packet_id: int) -> Assignment | None:
        """The request for ``packet_id`` is answered or withdrawn: stop tracking it."""
        assignment = self._assignments.pop(packet_id, None)
        if assignment is not None and assignment.session in self._load:
            self._load[assignment.session] -= 1
        return assignment

    def owner(self, packet_id: int) -> Assignment | None:
        return self._assignments.get(packet_id)

    def expired(self, now: float) -> list[tuple[int, Assignment]]:
        """Requests whose deadline passed; they are no longer tracked."""
        due: list[tuple[int, Assignment]] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, packet_id, session, msgid = self._deadlines.popleft()
            assignment = self._assignments.get(packet_id)
            # A stale deadline belongs to a request already answered or re-sent.
            if assignment is not None and (assignment.session, assignment.msgid) == (session, msgid):
                self.complete(packet_id)
                due.append((packet_id, assignment))
        return due

    def next_deadline(self) -> float | None:
        return self._deadlines[0][0] if self._deadlines else None

    def in_flight(self) -> int:
        return len(self._assignments)
