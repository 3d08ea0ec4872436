"""A captured packet as the capture backends hand it over, and the types of the hand-over.

Plain data with no I/O, shared by the capture backends (which build and
carry out packets) and the decision core (which only reads them), so that the
core never imports a backend or asyncio.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pmk.packet.parse import Flow

# A connection key in the verdict cache's form (``ConnKey.packed``: protocol,
# local address, remote address, local port, remote port as bytes), which the
# per-packet path builds straight from the packet.
PackedKey = bytes


class CapturedPacket:
    """One intercepted packet, owned by pmk until a verdict is applied.

    ``raw`` starts with the IP header. ``token`` is whatever the backend needs
    to carry out a verdict later (an address record, a queue packet id).
    ``flow`` is set by the core when it parsed the packet to hold it, so that
    a block builds its reset from it instead of parsing the packet again.
    """

    __slots__ = ("flow", "if_index", "outbound", "raw", "sub_if_index", "token")

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
        self.flow: Flow | None = None


# The sink receives each batch as the backend drains it: one call per batch,
# never per packet, so the event loop is not entered once per packet.
PacketSink = Callable[[list[CapturedPacket]], None]

# A run of consecutive packets of one IPv4 connection in one direction:
# (key, packet count, byte count, outbound).
CacheRun = tuple[PackedKey, int, int, bool]
# Given a batch as runs, True (and counted) when every run's connection is
# cached as accepted: the backend may then re-inject the batch untouched.
CacheProbe = Callable[[list[CacheRun]], bool]
