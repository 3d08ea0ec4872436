"""What the decision service tells the server to do, as small records.

``Service.handle`` returns them in the order they must be carried out; the
server does each without deciding anything itself. A command addressed to a
client that is gone is skipped. Like events (see ``events.py``) they are
never changed once made, without being frozen dataclasses, for speed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pmk.packet.captured import CapturedPacket
from pmk.rpc.messages import ErrorCode
from pmk.verdicts import ConnKey, Target, Verdict

if TYPE_CHECKING:
    from pmk.core.attribution import Owner


@dataclass(slots=True)
class Apply:
    """Carry out ``verdict`` for ``packets`` through the backend (``target``: where a reroute goes)."""

    packets: list[CapturedPacket]
    verdict: Verdict
    permanent: bool
    target: Target | None = None


@dataclass(slots=True)
class SendDecide:
    """Send ``decide [info]`` to ``client`` under ``msgid`` (the service numbers its requests)."""

    client: int
    msgid: int
    info: dict[str, Any]


@dataclass(slots=True)
class Notify:
    client: int
    method: str
    params: list[Any]


@dataclass(slots=True)
class Forget:
    """Stop waiting for the answer to ``msgid``: if it comes, it is a LateAnswer."""

    client: int
    msgid: int


@dataclass(slots=True)
class Reply:
    client: int
    msgid: int
    result: Any


@dataclass(slots=True)
class ReplyError:
    client: int
    msgid: int
    code: ErrorCode
    message: str


@dataclass(slots=True)
class UpdateConnection:
    """Set the kernel's verdict for one connection (blocking: run it off the loop); report ``op``."""

    op: int
    key: ConnKey
    verdict: Verdict


@dataclass(slots=True)
class ForgetConnections:
    """Forget every kernel-side verdict (blocking: run it off the loop); report ``op``."""

    op: int


@dataclass(slots=True)
class ArmTimer:
    """Deliver a Tick at monotonic time ``at`` (replaces any earlier timer)."""

    at: float


@dataclass(slots=True)
class ArmLifeTimer:
    """Deliver a LifeTick at monotonic time ``at`` (replaces any earlier one; a second timer beside ArmTimer)."""

    at: float


@dataclass(slots=True)
class MeasureTraffic:
    """Dump the kernel's per-connection totals (blocking: off the loop) and report TrafficMeasured.

    ``previous`` holds, per client of ``clients``, its totals at its previous
    notification (None: none yet), for the deltas.
    """

    clients: tuple[int, ...]
    previous: tuple[Mapping[ConnKey, tuple[int, int, int, int]] | None, ...]


@dataclass(slots=True)
class ReadTotals:
    """Read the kernel's totals of every decided connection (blocking: off the loop); report TotalsRead ``op``."""

    op: int


@dataclass(slots=True)
class Decided:
    """A connection (or, for a temporary verdict, one packet) was decided: for the decision log."""

    key: ConnKey
    outbound: bool
    verdict: Verdict
    permanent: bool
    #: "decider", "policy", "cache", "existing" or "operator" (SPEC 5.6)
    by: str
    #: the decider's hello name or the policy rule; "" otherwise
    name: str
    #: where a reroute sends the connection
    to: Target | None = None
    #: the local socket's process, when the decision was about a held packet and it has one
    owner: Owner | None = None
    #: the decide info of that packet (no ``payload``); None for cache, existing and operator
    info: Mapping[str, Any] | None = None


Command = (
    Apply
    | SendDecide
    | Notify
    | Forget
    | Reply
    | ReplyError
    | UpdateConnection
    | ForgetConnections
    | ArmTimer
    | ArmLifeTimer
    | MeasureTraffic
    | ReadTotals
    | Decided
)
