"""What the decision service is told: every input, as a small record.

The asyncio server turns I/O into these and hands each to
``Service.handle(event, now)``; clients are plain ids, time is passed in.
Records are never changed once made, but they are not frozen dataclasses:
those build three to four times slower (one ``object.__setattr__`` per
field), and several of these are made per new connection.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pmk.packet.captured import CapturedPacket
from pmk.verdicts import ConnKey


@dataclass(slots=True)
class PacketsCaptured:
    """A batch from the capture backend."""

    packets: list[CapturedPacket]


@dataclass(slots=True)
class Tick:
    """The timer the service armed (``ArmTimer``) fired."""


@dataclass(slots=True)
class ClientJoined:
    """A peer passed the endpoint's identity check; it is an observer until its hello.

    ``pid`` and ``uid`` are the peer's credentials where the platform tells them.
    """

    client: int
    pid: int | None = None
    uid: int | None = None


@dataclass(slots=True)
class ClientRefused:
    """A peer failed the identity check and was turned away."""


@dataclass(slots=True)
class ClientLeft:
    client: int


@dataclass(slots=True)
class ClientCutOff:
    """The server cut a client off for not reading its output (ClientLeft follows)."""

    client: int


@dataclass(slots=True)
class ClientRequest:
    """A well-formed request from a client (SPEC section 4)."""

    client: int
    msgid: int
    method: str
    params: list[Any]


@dataclass(slots=True)
class DecideAnswered:
    """A response to a ``decide`` the service sent under ``msgid``."""

    client: int
    msgid: int
    error: Any
    result: Any


@dataclass(slots=True)
class LateAnswer:
    """A response to a ``decide`` the service had told the server to forget."""

    client: int
    msgid: int


@dataclass(slots=True)
class ProtocolErrorSeen:
    """The client sent something that is not a valid message (counted only)."""

    client: int


@dataclass(slots=True)
class KernelUpdated:
    """The kernel update ``op`` (UpdateConnection, ForgetConnections) is in force."""

    op: int


@dataclass(slots=True)
class KernelUpdateFailed:
    """The kernel update ``op`` failed; the kernel still has the old state."""

    op: int
    message: str


@dataclass(slots=True)
class Preaccept:
    """Connections that existed before capture started: enter them as accepted."""

    keys: tuple[ConnKey, ...]


@dataclass(slots=True)
class LifeTick:
    """The connection-life timer (``ArmLifeTimer``) fired: ends to sweep, bandwidth to send."""


@dataclass(slots=True)
class ConnectionsEnded:
    """The kernel stopped tracking these connections (nfqueue: conntrack DESTROY events).

    Each is (key, (packets_in, packets_out, bytes_in, bytes_out), span): the
    kernel's totals, and (began, stopped) on the service's clock when the
    kernel timed the connection, else None. A stop earlier than the cached
    entry began is the late end of an older connection with the same key.
    """

    ends: tuple[tuple[ConnKey, tuple[int, int, int, int], tuple[float, float] | None], ...]


@dataclass(slots=True)
class TrafficMeasured:
    """A ``MeasureTraffic`` dump finished: the kernel's totals and, per client, what moved since its previous.

    ``totals`` is None when the dump failed (``moved`` is then empty).
    """

    clients: tuple[int, ...]
    totals: Mapping[ConnKey, tuple[int, int, int, int]] | None
    moved: tuple[Mapping[ConnKey, tuple[int, int, int, int]], ...]


@dataclass(slots=True)
class TotalsRead:
    """A ``ReadTotals`` finished: every decided connection's kernel totals (None: the read failed)."""

    op: int
    totals: Mapping[ConnKey, tuple[int, int, int, int]] | None


@dataclass(slots=True)
class Shutdown:
    """Settle everything held with the fallback policy; nothing is asked any more."""


Event = (
    PacketsCaptured
    | Tick
    | ClientJoined
    | ClientRefused
    | ClientLeft
    | ClientCutOff
    | ClientRequest
    | DecideAnswered
    | LateAnswer
    | ProtocolErrorSeen
    | KernelUpdated
    | KernelUpdateFailed
    | Preaccept
    | LifeTick
    | ConnectionsEnded
    | TrafficMeasured
    | TotalsRead
    | Shutdown
)
