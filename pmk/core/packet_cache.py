"""Packets held while their connection waits for a verdict.

Bounded like the kernel extension's ring: when full, a held packet is
evicted to make room for the newest. Packets of one connection wait in
arrival order behind a single verdict request.

The packet evicted is the oldest one no decider is working on (waiting
behind its connection's ask, or an ask not sent yet); only when every held
packet is with a decider is the oldest of all evicted. Evicting a packet a
decider has already been sent throws that decider's work away, and under a
flood (the cache stays full, every new packet evicts one) it would throw
nearly all of it away: the decided rate would collapse instead of staying
at what the deciders can answer.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import TYPE_CHECKING

from pmk.packet.captured import CapturedPacket
from pmk.verdicts import ConnKey

if TYPE_CHECKING:
    from pmk.core.attribution import Owner


class HeldPacket:
    """A captured packet (its ``flow`` parsed) with the id a decider refers to it by.

    ``owner`` is the local socket's process, looked up once (``looked_up``)
    when the packet's request is sent or the policy settles it (None: no
    socket owns it, or not looked up yet).
    """

    __slots__ = ("id", "key", "looked_up", "owner", "packet")

    def __init__(self, packet_id: int, packet: CapturedPacket, key: ConnKey) -> None:
        self.id = packet_id
        self.packet = packet
        self.key = key
        self.owner: Owner | None = None
        self.looked_up = False


class WaitingConnection:
    """A connection without a verdict: its held packets and the one asked about."""

    __slots__ = ("asked", "key", "packets")

    def __init__(self, key: ConnKey) -> None:
        self.key = key
        self.packets: deque[HeldPacket] = deque()
        self.asked: int | None = None


class PacketCache:
    """Held packets in age order, grouped by connection."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("packet cache capacity must be at least 1")
        self.capacity = capacity
        self._by_id: OrderedDict[int, HeldPacket] = OrderedDict()
        #: held packets no decider is working on, oldest first (a packet taken
        #: back from a decider that left counts as new)
        self._idle: OrderedDict[int, HeldPacket] = OrderedDict()
        self.connections: dict[ConnKey, WaitingConnection] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def is_full(self) -> bool:
        return len(self._by_id) >= self.capacity

    def get(self, packet_id: int) -> HeldPacket | None:
        return self._by_id.get(packet_id)

    def hold(self, held: HeldPacket) -> WaitingConnection:
        """Queue ``held`` behind its connection; the caller makes room first."""
        if len(self._by_id) >= self.capacity:
            raise OverflowError("packet cache is full; evict before holding")
        self._by_id[held.id] = held
        self._idle[held.id] = held
        waiting = self.connections.get(held.key)
        if waiting is None:
            waiting = self.connections[held.key] = WaitingConnection(held.key)
        waiting.packets.append(held)
        return waiting

    def oldest(self) -> HeldPacket | None:
        return next(iter(self._by_id.values()), None)

    def next_to_evict(self) -> HeldPacket | None:
        """The oldest packet no decider works on, else the oldest of all (see the module docstring)."""
        return next(iter(self._idle.values()), None) or self.oldest()

    def deciding(self, packet_id: int) -> None:
        """A decider was sent the ask about ``packet_id``: evict it only when nothing else is left."""
        self._idle.pop(packet_id, None)

    def not_deciding(self, packet_id: int) -> None:
        """Its decider left: ``packet_id`` waits for another one, evictable again."""
        held = self._by_id.get(packet_id)
        if held is not None:
            self._idle[packet_id] = held

    def release(self, held: HeldPacket) -> WaitingConnection | None:
        """Take ``held`` out of the cache; return its connection if packets still wait."""
        del self._by_id[held.id]
        self._idle.pop(held.id, None)
        waiting = self.connections[held.key]
        waiting.packets.remove(held)
        if waiting.asked == held.id:
            waiting.asked = None
        if not waiting.packets:
            del self.connections[held.key]
            return None
        return waiting

    def release_connection(self, key: ConnKey) -> list[HeldPacket]:
        """Take every held packet of ``key`` out, oldest first."""
        waiting = self.connections.pop(key, None)
        if waiting is None:
            return []
        for held in waiting.packets:
            del self._by_id[held.id]
            self._idle.pop(held.id, None)
        return list(waiting.packets)

    def all_packets(self) -> list[HeldPacket]:
        return list(self._by_id.values())
