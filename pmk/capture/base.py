"""The small interface every capture backend implements.

The decision path (verdict cache, packet cache, dispatch, stats) is shared;
backends differ only in how packets arrive and how a verdict is carried out.
A backend never decides anything itself.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from pmk.verdicts import ConnKey, Verdict


class CapturedPacket:
    """One intercepted packet, owned by pmk until a verdict is applied.

    ``raw`` starts with the IP header. ``token`` is whatever the backend needs
    to carry out a verdict later (an address record, a queue packet id).
    """

    __slots__ = ("if_index", "outbound", "raw", "sub_if_index", "token")

    def __init__(
        self,
        raw: bytes,
        outbound: bool,
        if_index: int = 0,
        sub_if_index: int = 0,
        token: Any = None,
    ) -> None:
        self.raw = raw
        self.outbound = outbound
        self.if_index = if_index
        self.sub_if_index = sub_if_index
        self.token = token


# The sink receives each batch as the backend drains it: one call per batch,
# never per packet, so the event loop is not entered once per packet.
PacketSink = Callable[[list[CapturedPacket]], None]

# A run of consecutive packets of one IPv4 connection: (key tuple as a
# ConnKey's fields, packet count, byte count).
CacheRun = tuple[tuple[int, bytes, int, bytes, int], int, int]
# Given a batch as runs, True (and counted) when every run's connection is
# cached as accepted: the backend may then re-inject the batch untouched.
CacheProbe = Callable[[list[CacheRun]], bool]


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

    @abc.abstractmethod
    def start(self, loop: asyncio.AbstractEventLoop, sink: PacketSink) -> None:
        """Begin delivering batches to ``sink`` on ``loop``."""

    @abc.abstractmethod
    def apply(self, packets: Sequence[CapturedPacket], verdict: Verdict, permanent: bool) -> None:
        """Carry out ``verdict`` for packets that all got it.

        accept re-injects, block rejects actively (TCP RST or ICMP
        unreachable), drop discards. ``permanent`` lets a backend with a kernel
        verdict cache remember the verdict for the packets' connections.
        """

    def update_connection(self, key: ConnKey, verdict: Verdict | None) -> None:  # noqa: B027
        """Change (or with None, forget) a kernel-side verdict of a live connection."""

    def forget_all(self) -> None:  # noqa: B027
        """Forget every kernel-side verdict (clear_cache)."""

    def stats(self) -> dict[str, int]:
        """Backend counters; ``bypassed`` counts packets that escaped the verdict."""
        return {"bypassed": 0}

    @abc.abstractmethod
    def close(self) -> None:
        """Stop capturing and release kernel resources; safe to call twice."""
