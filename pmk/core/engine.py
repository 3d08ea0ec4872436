"""The decision path for captured packets, as pure state.

Theory of operation: a packet whose connection has a cached verdict is
settled at once. Otherwise it is held; the first held packet of a connection
is *asked about* and later ones wait behind it, so one connection has at
most one request out. A permanent answer is cached and settles every waiting
packet of the connection; a temporary one settles only its packet, and the
next waiting packet is asked about anew. When the packet cache is full a
held packet is evicted (the oldest no decider is working on, see
``packet_cache``) and its request withdrawn.

The engine never does I/O and knows nothing of deciders: it records what
must happen in an ``Outbox`` (apply verdicts, ask about or withdraw a held
packet, settle unparseable packets) that the service (``service.py``) turns
into requests and commands.
"""

from __future__ import annotations

from collections.abc import Iterable

from pmk.core.packet_cache import HeldPacket, PacketCache
from pmk.core.stats import Counters
from pmk.core.verdict_cache import CachedVerdict, VerdictCache
from pmk.packet.captured import CacheRun, CapturedPacket, PackedKey
from pmk.packet.parse import TCP, parse_flow, simple_ipv4_key
from pmk.verdicts import REROUTE_VERDICTS, ConnKey, Target, Verdict

#: One group of packets that got one verdict: (packets, verdict, permanent, a reroute's target).
Apply = tuple[list[CapturedPacket], Verdict, bool, Target | None]
# TCP flags that end a connection (FIN, RST).
_FIN, _RST = 0x01, 0x04
_ENDS = _FIN | _RST


class Outbox:
    """What the shell must do after an engine call, in order of kind."""

    __slots__ = ("applies", "asks", "closing", "kernel_hits", "unparsed", "withdrawn")

    def __init__(self) -> None:
        self.applies: list[Apply] = []
        #: held packets to ask about (each the head of its connection's queue)
        self.asks: list[HeldPacket] = []
        #: held packets whose request is no longer wanted (evicted or settled by update_verdict)
        self.withdrawn: list[HeldPacket] = []
        #: packets without a readable key: the fallback policy's default settles them
        self.unparsed: list[CapturedPacket] = []
        #: with ``hits_permanent``: cache hits, handed to the kernel now (decided "by cache")
        self.kernel_hits: list[tuple[list[CapturedPacket], Verdict]] = []
        #: cached TCP connections that just ended (True: a reset) or began closing (FINs both ways)
        self.closing: list[tuple[ConnKey, CachedVerdict, bool]] = []

    def __bool__(self) -> bool:
        return bool(self.applies or self.asks or self.withdrawn or self.unparsed or self.kernel_hits or self.closing)

    def take(self) -> Outbox:
        """Hand over the recorded work and start empty."""
        taken = Outbox()
        taken.applies, self.applies = self.applies, []
        taken.asks, self.asks = self.asks, []
        taken.withdrawn, self.withdrawn = self.withdrawn, []
        taken.unparsed, self.unparsed = self.unparsed, []
        taken.kernel_hits, self.kernel_hits = self.kernel_hits, []
        taken.closing, self.closing = self.closing, []
        return taken


class Engine:
    """Verdict cache, packet cache and counters for one capture backend."""

    def __init__(self, *, packet_cache_size: int, verdict_cache_size: int, hits_permanent: bool = False) -> None:
        self.verdicts = VerdictCache(verdict_cache_size)
        self.held = PacketCache(packet_cache_size)
        #: Cache hits are applied as permanent: a backend with a kernel verdict
        #: cache then hands the connection to the kernel (nfqueue marks it).
        self.hits_permanent = hits_permanent
        self.counters = Counters()
        self.outbox = Outbox()
        # Packet ids count up for the server's lifetime and are never reused (SPEC 5.1). A Python
        # int does not wrap; 2**53 would take 28 years at ten million held packets a second.
        self._next_id = 1

    # -- packets in ----------------------------------------------------------

    def on_packets(self, packets: Iterable[CapturedPacket]) -> None:
        """Settle cache hits, hold and ask about the rest.

        This runs for every captured packet, so the common case (IPv4 TCP or
        UDP without options) reads its key straight from the bytes as a plain
        tuple, which finds the ConnKey entries (equal tuples hash alike), and
        consecutive packets of one connection share a single cache lookup.
        Hits are counted per direction on their entry; a TCP hit with FIN or
        RST is handed to ``_tcp_end`` (the whole-batch path never sees one).
        """
        counters = self.counters
        lookup = self.verdicts.get
        accept = Verdict.ACCEPT
        accepted: list[CapturedPacket] = []
        # Keyed by verdict and target: rerouted connections differ by where they go.
        others: dict[tuple[Verdict, Target | None], list[CapturedPacket]] = {}
        last_key: PackedKey | None = None
        entry = None
        hits = captured = 0
        # this run's hits per direction (added to its entry, and to hits, when the run ends)
        p_in = p_out = b_in = b_out = 0
        for packet in packets:
            captured += 1
            raw = packet.raw
            outbound = packet.outbound
            fast = simple_ipv4_key(raw, outbound)
            if fast is not None:
                key = fast
                if key != last_key:
                    if entry is not None:
                        _add(entry, p_in, p_out, b_in, b_out)
                        hits += p_in + p_out
                        p_in = p_out = b_in = b_out = 0
                    entry = lookup(key)
                    last_key = key if entry is not None else None
                if entry is not None:
                    if outbound:
                        p_out += 1
                        b_out += len(raw)
                    else:
                        p_in += 1
                        b_in += len(raw)
                    # TCP (6) with FIN or RST (0x05) at byte 33 of a simple packet: literals, this is per packet
                    if raw[9] == 6 and len(raw) > 33 and raw[33] & 0x05:
                        self._tcp_end(key, entry, raw[33], outbound)
                    if entry.verdict is accept:
                        accepted.append(packet)
                    else:
                        others.setdefault((entry.verdict, entry.facts.target), []).append(packet)
                    continue
            flow = parse_flow(raw)
            if flow is None:
                counters.unparsed += 1
                self.outbox.unparsed.append(packet)
                continue
            # A fast-path packet got here because its key is not cached: no second lookup.
            hit = None if fast is not None else lookup(flow.packed(outbound))
            if hit is not None:
                if outbound:
                    _add(hit, 0, 1, 0, len(raw))
                else:
                    _add(hit, 1, 0, len(raw), 0)
                counters.cache_hits += 1
                flags_at = flow.transport_offset + 13
                if flow.protocol == TCP and len(raw) > flags_at and raw[flags_at] & _ENDS:
                    self._tcp_end(flow.key(outbound), hit, raw[flags_at], outbound)
                if hit.verdict is accept:
                    accepted.append(packet)
                else:
                    others.setdefault((hit.verdict, hit.facts.target), []).append(packet)
                continue
            counters.cache_misses += 1
            packet.flow = flow  # a block builds its reset from it
            self._hold(HeldPacket(self._next_id, packet, flow.key(outbound)))
            self._next_id += 1
            # A verdict for this key may now be cached; the next packet looks it up anew.
            if entry is not None:
                _add(entry, p_in, p_out, b_in, b_out)
                counters.cache_hits += hits + p_in + p_out
                hits = p_in = p_out = b_in = b_out = 0
            last_key = entry = None
        if entry is not None:
            _add(entry, p_in, p_out, b_in, b_out)
            hits += p_in + p_out
        counters.captured += captured
        counters.cache_hits += hits
        permanent = self.hits_permanent
        if accepted:
            counters.accepted += len(accepted)
            self.outbox.applies.append((accepted, Verdict.ACCEPT, permanent, None))
            if permanent:
                self.outbox.kernel_hits.append((accepted, Verdict.ACCEPT))
        for (verdict, target), group in others.items():
            self._count(verdict, len(group))
            self.outbox.applies.append((group, verdict, permanent, target))
            if permanent:
                self.outbox.kernel_hits.append((group, verdict))

    def _tcp_end(self, key: ConnKey | PackedKey, entry: CachedVerdict, flags: int, outbound: bool) -> None:
        """A cached TCP connection's packet with FIN or RST: note how far its end has got."""
        if isinstance(key, bytes):
            key = ConnKey.of(key)  # the fast path's cache form, for the record
        if flags & _RST:
            self.outbox.closing.append((key, entry, True))
            return
        both = entry.fin_in and entry.fin_out
        if outbound:
            entry.fin_out = True
        else:
            entry.fin_in = True
        if entry.fin_in and entry.fin_out and not both:
            self.outbox.closing.append((key, entry, False))

    def accept_cached(self, runs: list[CacheRun]) -> bool:
        """Whole-batch fast path: True, and counted, if every run's connection is cached as accepted.

        ``runs`` lists (IPv4 key tuple as on_packets builds it, packets, bytes,
        outbound) for consecutive packets of one connection in one direction,
        none with a TCP FIN or RST (those take on_packets). A backend that gets True
        re-injects the batch as received, with no per-packet objects at all;
        on False nothing has changed and the batch goes through on_packets.
        """
        lookup = self.verdicts.get
        accept = Verdict.ACCEPT
        entries = []
        for key, _, _, _ in runs:
            entry = lookup(key)
            if entry is None or entry.verdict is not accept:
                return False
            entries.append(entry)
        total = 0
        for entry, (_, packets, size, outbound) in zip(entries, runs, strict=True):
            if outbound:
                entry.packets_out += packets
                entry.bytes_out += size
            else:
                entry.packets_in += packets
                entry.bytes_in += size
            total += packets
        counters = self.counters
        counters.captured += total
        counters.cache_hits += total
        counters.accepted += total
        return True

    def _hold(self, held: HeldPacket) -> None:
        if self.held.is_full():
            self._evict()
        waiting = self.held.hold(held)
        if waiting.asked is None:
            self._ask(held)

    def _ask(self, held: HeldPacket) -> None:
        self.held.connections[held.key].asked = held.id
        self.outbox.asks.append(held)

    def _evict(self) -> None:
        victim = self.held.next_to_evict()
        assert victim is not None
        was_asked = self.held.connections[victim.key].asked == victim.id
        waiting = self.held.release(victim)
        self.counters.evicted += 1
        # Evicted packets are discarded; the backend must still let go of them.
        self.outbox.applies.append(([victim.packet], Verdict.DROP, False, None))
        if was_asked:
            self.outbox.withdrawn.append(victim)
            if waiting is not None:
                self._ask(waiting.packets[0])

    # -- verdicts in ---------------------------------------------------------

    def is_asked(self, packet_id: int) -> bool:
        """True while ``packet_id`` is held and is the one its connection is asked about."""
        held = self.held.get(packet_id)
        return held is not None and self.held.connections[held.key].asked == packet_id

    def on_verdict(
        self,
        packet_id: int,
        verdict: Verdict,
        permanent: bool,
        *,
        defaulted: bool = False,
        target: Target | None = None,
    ) -> bool:
        """Settle the asked-about ``packet_id`` (by a decider, or the policy with ``defaulted``).

        A permanent verdict is cached (a reroute with its ``target``) and
        settles every packet waiting behind it; a temporary one settles this
        packet and asks about the next. False, and nothing done, if the
        packet is not held and asked about.
        """
        if not self.is_asked(packet_id):
            return False
        held = self.held.get(packet_id)
        assert held is not None
        if permanent:
            self.verdicts.put(held.key, verdict, target)
            settled = self.held.release_connection(held.key)
            self._settle([h.packet for h in settled], verdict, True, defaulted=defaulted, target=target)
            return True
        waiting = self.held.release(held)
        self._settle([held.packet], verdict, False, defaulted=defaulted)
        if waiting is not None:
            self._ask(waiting.packets[0])
        return True

    def settle_unparsed(self, packets: list[CapturedPacket], verdict: Verdict) -> None:
        """Settle packets without a key (the policy's default, never cached)."""
        self._settle(packets, verdict, False, defaulted=True)

    def _settle(
        self,
        packets: list[CapturedPacket],
        verdict: Verdict,
        permanent: bool,
        *,
        defaulted: bool,
        target: Target | None = None,
    ) -> None:
        self._count(verdict, len(packets))
        if defaulted:
            self.counters.defaulted += len(packets)
        self.outbox.applies.append((packets, verdict, permanent, target))

    def _count(self, verdict: Verdict, n: int) -> None:
        if verdict is Verdict.ACCEPT:
            self.counters.accepted += n
        elif verdict is Verdict.BLOCK:
            self.counters.blocked += n
        elif verdict in REROUTE_VERDICTS:
            self.counters.rerouted += n
        else:
            self.counters.dropped += n

    # -- operator requests ---------------------------------------------------

    def update_verdict(self, key: ConnKey, verdict: Verdict) -> None:
        """Set a connection's cached verdict; packets waiting for it get it too."""
        self.verdicts.put(key, verdict)
        waiting = self.held.connections.get(key)
        if waiting is None:
            return
        asked = waiting.asked
        settled = self.held.release_connection(key)
        self._settle([h.packet for h in settled], verdict, True, defaulted=False)
        for held in settled:
            if held.id == asked:
                # The decider's answer is no longer wanted.
                self.outbox.withdrawn.append(held)

    def clear_cache(self) -> int:
        """Forget every cached verdict; return how many there were."""
        return self.verdicts.clear()

    def preaccept(self, keys: Iterable[ConnKey]) -> int:
        """Cache ``keys`` as accepted without asking (connections that existed at start)."""
        count = 0
        for key in keys:
            self.verdicts.put(key, Verdict.ACCEPT)
            count += 1
        self.counters.preaccepted += count
        return count

    def release_all(self) -> list[HeldPacket]:
        """At shutdown: take every held packet out, oldest first; the caller settles them."""
        held = self.held.all_packets()
        for key in list(self.held.connections):
            self.held.release_connection(key)
        return held

    def settle_released(self, held: list[HeldPacket], verdict: Verdict) -> None:
        """Settle packets ``release_all`` handed out (the policy's verdict, not cached)."""
        self._settle([h.packet for h in held], verdict, False, defaulted=True)

    # -- reading -------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self.held)

    def stats(self) -> dict[str, int]:
        stats = self.counters.as_dict()
        stats["pending"] = len(self.held)
        stats["verdict_cache_entries"] = len(self.verdicts)
        stats["verdict_cache_evictions"] = self.verdicts.evictions
        return stats


def _add(entry: CachedVerdict, packets_in: int, packets_out: int, bytes_in: int, bytes_out: int) -> None:
    entry.packets_in += packets_in
    entry.packets_out += packets_out
    entry.bytes_in += bytes_in
    entry.bytes_out += bytes_out
