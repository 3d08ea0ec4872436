"""Which connections are rerouted where, for a backend that rewrites packets itself (divert).

A rerouted connection keeps the application's view: the application talks
to the peer it addressed (the *original* remote), pmk sends its packets to
the *target* instead and makes the target's replies look as if they came
from the original peer. The table is keyed both ways: by the connection as
the application sees it (its outbound packets) and by the local side plus
the target (the replies).

Two connections from one local address and port rerouted to one target
(one unconnected UDP socket asking two DNS servers, both rerouted to the
local resolver) look the same at the target: their replies are given the
original peer of the more recent one. The kernel extension pmk follows
keys its table by the local side alone and has the same limit.

Entries end with the connection: after a TCP reset, shortly after FINs went
both ways (``linger``: the last ACK and retransmissions still need
rewriting), or after ``idle`` seconds without a packet. No I/O: the caller
passes the time and calls ``expire`` now and then.
"""

from __future__ import annotations

from pmk.config import REDIRECT_IDLE_TCP, REDIRECT_IDLE_UDP, REDIRECT_LINGER
from pmk.packet.nat import rewrite_destination, rewrite_source
from pmk.packet.parse import TCP, Flow
from pmk.verdicts import ConnKey, Target

_FIN, _RST = 0x01, 0x04
# (protocol, local ip, local port, target ip, target port): how a reply finds its entry.
ReplyKey = tuple[int, bytes, int, bytes, int]


class Redirect:
    """One rerouted connection: the application's key, where it goes, and how far it has got."""

    __slots__ = ("expires", "fin_in", "fin_out", "key", "target")

    def __init__(self, key: ConnKey, target: Target, expires: float) -> None:
        self.key = key
        self.target = target
        self.expires = expires
        self.fin_out = False
        self.fin_in = False

    @property
    def reply_key(self) -> ReplyKey:
        key = self.key
        return (key.protocol, key.local_ip, key.local_port, self.target.ip, self.target.port)


class RedirectTable:
    """The rerouted connections of one backend; see the module docstring."""

    def __init__(
        self, idle_tcp: float = REDIRECT_IDLE_TCP, idle_udp: float = REDIRECT_IDLE_UDP, linger: float = REDIRECT_LINGER
    ) -> None:
        self.idle_tcp = idle_tcp
        self.idle_udp = idle_udp
        self.linger = linger
        self._by_key: dict[ConnKey, Redirect] = {}
        self._by_reply: dict[ReplyKey, Redirect] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: ConnKey) -> Target | None:
        """Where the connection ``key`` (as the application sees it) is rerouted, or None."""
        entry = self._by_key.get(key)
        return None if entry is None else entry.target

    def add(self, key: ConnKey, target: Target, now: float) -> None:
        """Reroute the connection ``key`` to ``target`` (again: the newer target wins)."""
        old = self._by_key.get(key)
        if old is not None:
            self._forget(old)
        entry = Redirect(key, target, now + self._idle(key.protocol))
        self._by_key[key] = entry
        self._by_reply[entry.reply_key] = entry

    def outbound(self, packet: bytearray, flow: Flow, now: float, partial: bool = False) -> Target | None:
        """Send the application's packet to its connection's target; the target, or None if not rerouted.

        ``flow`` is the packet as the application sent it (local side = source);
        ``partial``: its checksum is the kernel's partial one (``pmk.packet.nat``).
        """
        entry = self._by_key.get(flow.key(True))
        if entry is None or not rewrite_destination(packet, flow, entry.target.ip, entry.target.port, partial):
            return None
        self._seen(entry, packet, flow, now, outbound=True)
        return entry.target

    def inbound(self, packet: bytearray, flow: Flow, now: float, partial: bool = False) -> ConnKey | None:
        """Make a reply from a target come from the original peer; that connection's key, or None."""
        reply = (flow.protocol, flow.dst, flow.dst_port, flow.src, flow.src_port)
        entry = self._by_reply.get(reply)
        if entry is None or not rewrite_source(packet, flow, entry.key.remote_ip, entry.key.remote_port, partial):
            return None
        self._seen(entry, packet, flow, now, outbound=False)
        return entry.key

    def expire(self, now: float) -> list[ConnKey]:
        """Forget the connections that ended or idled out by ``now``; their keys."""
        ended = [entry for entry in self._by_key.values() if entry.expires <= now]
        for entry in ended:
            self._forget(entry)
        return [entry.key for entry in ended]

    def remove(self, key: ConnKey) -> bool:
        """Forget one connection (its cached verdict went away); True if it was rerouted."""
        entry = self._by_key.get(key)
        if entry is None:
            return False
        self._forget(entry)
        return True

    def clear(self) -> None:
        self._by_key.clear()
        self._by_reply.clear()

    def _idle(self, protocol: int) -> float:
        return self.idle_tcp if protocol == TCP else self.idle_udp

    def _seen(self, entry: Redirect, packet: bytearray, flow: Flow, now: float, outbound: bool) -> None:
        flags_at = flow.transport_offset + 13
        if flow.protocol == TCP and len(packet) > flags_at:
            flags = packet[flags_at]
            if flags & _RST:
                entry.expires = now  # nothing follows a reset
                return
            if flags & _FIN:
                if outbound:
                    entry.fin_out = True
                else:
                    entry.fin_in = True
        if entry.fin_out and entry.fin_in:
            entry.expires = min(entry.expires, now + self.linger)
        else:
            entry.expires = now + self._idle(flow.protocol)

    def _forget(self, entry: Redirect) -> None:
        del self._by_key[entry.key]
        reply_key = entry.reply_key
        if self._by_reply.get(reply_key) is entry:
            del self._by_reply[reply_key]
