"""The small interface every capture backend implements.

The decision path (verdict cache, packet cache, dispatch, stats) is shared;
backends differ only in how packets arrive and how a verdict is carried out.
A backend never decides anything itself.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Mapping, Sequence

from pmk.packet.captured import CacheProbe, CacheRun, CapturedPacket, PackedKey, PacketSink
from pmk.verdicts import ConnKey, Target, Verdict

__all__ = [
    "CacheProbe",
    "CacheRun",
    "CaptureBackend",
    "CapturedPacket",
    "KernelUpdateError",
    "PackedKey",
    "PacketSink",
]


#: (packets_in, packets_out, bytes_in, bytes_out) of a connection, as the kernel counted them.
Traffic = tuple[int, int, int, int]
#: A connection the kernel stopped tracking: its key, its totals, and (began, stopped) on
#: pmk's clock when the kernel timed it (None otherwise).
KernelEnd = tuple[ConnKey, Traffic, "tuple[float, float] | None"]
#: Called on the event loop with connections the kernel stopped tracking.
EndedSink = Callable[[list[KernelEnd]], None]


class KernelUpdateError(Exception):
    """The kernel's verdict cache could not be changed; the message says why."""


class CaptureBackend(abc.ABC):
    """A packet source with the means to accept, block or drop what it gave."""

    #: Name shown in logs and stats ("divert", "nfqueue").
    name: str = "abstract"
    #: True when permanent verdicts are enforced in the kernel, so later
    #: packets of a decided connection never reach pmk.
    kernel_verdict_cache: bool = False
    #: Set by the server before ``start``: a backend that sees every packet may
    #: use it to settle whole batches of cached connections without building
    #: per-packet objects. Backends that do not need it ignore it.
    cache_probe: CacheProbe | None = None
    #: True when ``apply`` can carry out reroutes (SPEC 5.2).
    can_reroute: bool = False
    #: Set by the server before ``start``: a backend with a kernel verdict
    #: cache reports there the ends of connections it marked (with the
    #: kernel's counters); others see every packet and need no report.
    on_ended: EndedSink | None = None

    @abc.abstractmethod
    def start(self, loop: asyncio.AbstractEventLoop, sink: PacketSink) -> None:
        """Begin delivering batches to ``sink`` on ``loop``."""

    @abc.abstractmethod
    def apply(
        self, packets: Sequence[CapturedPacket], verdict: Verdict, permanent: bool, target: Target | None = None
    ) -> None:
        """Carry out ``verdict`` for packets that all got it.

        accept re-injects, block rejects actively (TCP RST or ICMP
        unreachable), drop discards, a reroute sends the packets' connection
        to ``target`` (replies back as from the original peer). ``permanent``
        lets a backend with a kernel verdict cache remember the verdict for
        the packets' connections.
        """

    def set_room(self, room: int) -> None:  # noqa: B027
        """How many more packets pmk can hold now; the server says so after each pass.

        A backend whose undecided packets can wait in the kernel (nfqueue)
        reads no more than this, so that a burst waits in the kernel's queue
        instead of evicting packets pmk holds. Divert ignores it: its reader
        also carries cache hits, which must not wait behind undecided packets.
        """

    def flush_verdicts(self) -> None:  # noqa: B027
        """Send verdicts ``apply`` collected; the server calls it once per pass of its commands.

        A backend that gives verdicts in batches (nfqueue) sends them here at
        the latest; others carry out each ``apply`` at once.
        """

    def reroutable(self, packet: CapturedPacket) -> bool:
        """Whether a reroute can still take effect for ``packet``'s connection (it starts it)."""
        return False

    def update_connection(self, key: ConnKey, verdict: Verdict | None) -> None:  # noqa: B027
        """Change (or with None, forget) a kernel-side verdict of a live connection.

        Blocking: the server calls it in a worker thread, never on the event
        loop. Raises KernelUpdateError when the kernel could not be changed.
        """

    def forget_all(self) -> None:  # noqa: B027
        """Forget every kernel-side verdict (clear_cache); blocking and raising like update_connection."""

    def traffic_since(
        self, previous: Sequence[Mapping[ConnKey, Traffic] | None]
    ) -> tuple[Mapping[ConnKey, Traffic], list[Mapping[ConnKey, Traffic]]]:
        """The kernel's totals of every live decided connection, and what moved since each of ``previous``.

        Only for a backend with a kernel verdict cache (the server asks no
        other); blocking, run in a worker thread. Connections without
        traffic since a previous are left out of its delta.
        """
        raise NotImplementedError(f"the {self.name} backend has no kernel counters")

    def stats(self) -> dict[str, int]:
        """Backend counters; ``bypassed`` counts packets that escaped the verdict."""
        return {"bypassed": 0}

    @abc.abstractmethod
    def close(self) -> None:
        """Stop capturing and release kernel resources; safe to call twice."""
