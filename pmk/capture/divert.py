"""The pydivert backend: WinDivert on Windows, eBPFDivert on Linux.

Every packet of a matching flow comes to user space, so this path is built
for batches: on Linux one ``recv_ex`` call drains up to ``batch`` packets,
the sink settles them, and accepted packets go back with one ``send_ex``.
Packets are re-injected byte for byte; nothing is re-parsed or re-checksummed.

A batch whose every packet belongs to a connection cached as accepted (the
server's ``cache_probe`` says so from 12 header bytes per packet) goes back
from the receive buffer without any per-packet object, and the next receive
takes a full 255; after a batch with anything else the next one is ``batch``
(small, so that decider answers are read in between under a flood).

Reroutes are rewritten here, both ways (``divert_reroute``): the
application's packets go to the target, and the target's replies, captured
on loopback (the configured targets' in the main filter, each explicit
redirect target's by a handle of its own), are made to come from the
original peer *before* the service sees them, so that they find their
connection's cached verdict like any inbound packet.

The Windows path uses only pydivert's public API in a reader thread; it is
written to WinDivert's documented behaviour and is untested (no Windows here).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import operator
import sys
import time
from collections.abc import Sequence

import pydivert

from pmk.capture.base import CacheRun, CaptureBackend, CapturedPacket, PacketSink
from pmk.capture.divert_address import (
    ADDRESS_BYTES,
    ETH_DST,
    ETH_SRC,
    FLAGS_BYTE,
    INTERFACES,
    INTERFACES_OFFSET,
    LOOPBACK_BIT,
    OUTBOUND_BIT,
)
from pmk.capture.divert_checksums import InterfaceMtu, mark_offloaded
from pmk.capture.divert_reroute import Rerouter, reply_filter
from pmk.config import DEFAULT_DIVERT_BATCH, DEFAULT_DIVERT_BATCHES_PER_WAKEUP, DEFAULT_RING_BYTES
from pmk.packet.parse import parse_flow, simple_ipv4_runs
from pmk.packet.reject import reject_packet
from pmk.verdicts import REROUTE_VERDICTS, RerouteTargets, Target, Verdict

log = logging.getLogger(__name__)

# How often the redirect table drops connections that ended.
_EXPIRE_EVERY = 5.0
# WinDivert's batch limit; eBPFDivert accepts the same.
MAX_BATCH = 255
# Batches that were all cache hits need no decider: drain up to this many per wake-up.
CACHED_BATCHES_PER_WAKEUP = 8
# Big enough for MAX_BATCH full-size packets (64 KiB GSO aggregates included).
_RECV_BUFFER_BYTES = MAX_BATCH * 65_575


def flipped_address(address: bytes) -> bytes:
    """The address record for a packet sent the opposite way (for rejects).

    The MACs are swapped too: a reply sent with the original frame's
    addresses would be addressed to pmk's own host and dropped by the peer.
    """
    record = bytearray(address)
    record[FLAGS_BYTE] ^= OUTBOUND_BIT
    if sys.platform.startswith("linux"):
        record[ETH_DST], record[ETH_SRC] = address[ETH_SRC], address[ETH_DST]
    return bytes(record)


def split_batch(buf: bytearray, total: int, records: bytes) -> tuple[list[CapturedPacket], bool]:
    """Packets received back to back in ``buf[:total]``, one 80-byte address record each.

    The second value is True when the packets cover ``buf[:total]`` exactly,
    one per record: only then may the batch be re-injected from the buffer.
    """
    view = memoryview(buf)
    interfaces = INTERFACES.unpack_from
    packets: list[CapturedPacket] = []
    append = packets.append
    offset = 0
    for start in range(0, len(records) - ADDRESS_BYTES + 1, ADDRESS_BYTES):
        if offset >= total:
            break
        first = buf[offset]
        if first >> 4 == 4:
            length = buf[offset + 2] << 8 | buf[offset + 3]
        elif first >> 4 == 6:
            length = 40 + (buf[offset + 4] << 8 | buf[offset + 5])
        else:
            length = 0
        # A GSO aggregate may carry 0 in the length field; it then fills the rest.
        end = offset + length if length else total
        if_index, sub_if_index = interfaces(records, start + INTERFACES_OFFSET)
        append(
            CapturedPacket(
                bytes(view[offset : min(end, total)]),
                bool(records[start + FLAGS_BYTE] & OUTBOUND_BIT),
                if_index,
                sub_if_index,
                records[start : start + ADDRESS_BYTES],
            )
        )
        offset = end
    return packets, len(packets) * ADDRESS_BYTES == len(records) and offset == total


class DivertBackend(CaptureBackend):
    """Capture with pydivert; see the module docstring for the two paths."""

    name = "divert"
    kernel_verdict_cache = False
    can_reroute = True

    def __init__(
        self,
        filter: str,
        *,
        batch: int = DEFAULT_DIVERT_BATCH,
        ring_bytes: int = DEFAULT_RING_BYTES,
        queue_len: int | None = None,
        batches_per_wakeup: int = DEFAULT_DIVERT_BATCHES_PER_WAKEUP,
        interfaces: list[str] | None = None,
        targets: RerouteTargets | None = None,
    ) -> None:
        pinned = (*targets.nameservers, *targets.tunnels) if targets is not None else ()
        if pinned:
            filter = f"({filter}) or {reply_filter(pinned)}"
        self.filter = filter
        self.batch = max(1, min(batch, MAX_BATCH))
        self.batches_per_wakeup = max(1, batches_per_wakeup)
        options: dict[str, object] = {}
        if sys.platform.startswith("linux"):
            if ring_bytes:
                options["ring_bytes"] = ring_bytes
            if interfaces:
                options["interfaces"] = interfaces
        self._options = options
        self._divert = pydivert.Divert(filter, **options)
        self._rerouter: Rerouter | None = None
        #: Targets whose loopback replies some handle captures (the configured ones by the main filter).
        self._reply_targets: set[Target] = set(pinned)
        self._pinned_sources = {(t.ip, t.port) for t in pinned}
        self._reply_handles: list[tuple[pydivert.Divert, _LinuxBatchIO | _ThreadReader]] = []
        self._expire_at = 0.0
        self._queue_len = queue_len
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: PacketSink | None = None
        self._linux: _LinuxBatchIO | None = None
        self._reader: _ThreadReader | None = None
        self.send_errors = 0
        self.rejects_sent = 0
        #: Set by the server: true (and counted) when every run of a batch is an accepted connection.
        self.cached_batches = 0
        self.other_batches = 0

    def start(self, loop: asyncio.AbstractEventLoop, sink: PacketSink) -> None:
        self._loop, self._sink = loop, sink
        self._divert.open()
        if self._queue_len:
            self._divert.set_param(pydivert.Param.QUEUE_LEN, self._queue_len)
        if sys.platform.startswith("linux"):
            self._linux = _LinuxBatchIO(self._divert, self.batch, InterfaceMtu())
            loop.add_reader(self._linux.event_fd, self._drain)
        else:
            self._reader = _ThreadReader(self._divert, loop, sink, self.batch)
            self._reader.start()
        log.info("divert backend capturing %r", self.filter)

    def _drain(self) -> None:
        linux, sink = self._linux, self._sink
        assert linux is not None and sink is not None
        others = 0
        for _ in range(CACHED_BATCHES_PER_WAKEUP):
            want = linux.batch
            count = linux.receive_batch()
            if not count:
                return
            probe = self.cache_probe
            runs = linux.cached_runs() if probe is not None else None
            if runs is not None and probe(runs):  # type: ignore[misc]
                self.cached_batches += 1
                self.send_errors += linux.send_received()
                # Cached traffic: full batches halve the cost per packet of recv_ex/send_ex.
                linux.batch = MAX_BATCH
            else:
                self.other_batches += 1
                sink(self._unreroute(linux.packets()))
                # New connections: small batches let decider answers in between.
                linux.batch = self.batch
                others += 1
                if others >= self.batches_per_wakeup:
                    return
            if count < want:
                return

    def reroutable(self, packet: CapturedPacket) -> bool:
        """UDP, or a TCP SYN: a connection pmk saw start (anything later is mid-stream)."""
        flow = packet.flow or parse_flow(packet.raw)
        if flow is None or flow.protocol not in (6, 17):
            return False
        if flow.protocol == 17:
            return True
        at = flow.transport_offset + 13
        return 0 <= at < len(packet.raw) and packet.raw[at] & 0x12 == 0x02

    def apply(
        self, packets: Sequence[CapturedPacket], verdict: Verdict, permanent: bool, target: Target | None = None
    ) -> None:
        if verdict in REROUTE_VERDICTS and target is not None:
            self._reroute(packets, target)
        elif verdict is Verdict.ACCEPT:
            linux = self._linux
            if linux is not None and linux.is_current(packets):
                # The whole batch just received: inject the receive buffer as it is.
                self.send_errors += linux.send_current()
            else:
                self._send([(p.raw, p.token) for p in packets])
        elif verdict is Verdict.BLOCK:
            replies = []
            for packet in packets:
                # Held packets carry the flow parsed when they were held; cache hits are parsed here.
                flow = packet.flow or parse_flow(packet.raw)
                reply = reject_packet(packet.raw, flow) if flow is not None else None
                if reply is not None:
                    replies.append((reply, flipped_address(packet.token)))
            self.rejects_sent += len(replies)
            self._send(replies)
        # DROP: the packet is simply never re-injected.

    def _reroute(self, packets: Sequence[CapturedPacket], target: Target) -> None:
        """The application's packets rewritten to ``target``; replies (rewritten on capture) as they are."""
        rerouter = self._rerouter
        if rerouter is None:
            rerouter = self._rerouter = Rerouter()
        now = time.monotonic()
        if now >= self._expire_at:
            rerouter.table.expire(now)
            self._expire_at = now + _EXPIRE_EVERY
        if target not in self._reply_targets and rerouter.is_local(target.ip):
            self._capture_replies(target)
        frames = []
        for packet in packets:
            raw, record = packet.raw, packet.token
            if packet.outbound and not record[FLAGS_BYTE] & LOOPBACK_BIT:
                flow = packet.flow or parse_flow(raw)
                if flow is not None:
                    raw, record = rerouter.outbound(raw, record, flow.key(True), target, now)
            frames.append((raw, record))
        self._send(frames)

    def _unreroute(self, packets: list[CapturedPacket], only_replies: bool = False) -> list[CapturedPacket]:
        """Replies of rerouted connections made to come from the original peer, as inbound packets.

        What else a reply clause caught (a local program talking to the
        resolver directly) is none of pmk's business and goes back untouched:
        everything, with ``only_replies`` (a reply handle's catch); on the
        main handle, loopback packets from a configured target.
        """
        rerouter = self._rerouter
        table_empty = rerouter is None or not len(rerouter.table)
        if table_empty and not only_replies and not self._pinned_sources:
            return packets
        now = time.monotonic()
        out: list[CapturedPacket] = []
        others: list[tuple[bytes, bytes]] = []
        for packet in packets:
            record = packet.token
            loopback = record[FLAGS_BYTE] & LOOPBACK_BIT
            if packet.outbound and not loopback:
                out.append(packet)  # the application's own: its connection's verdict decides
                continue
            reply = None if rerouter is None or table_empty else rerouter.inbound(packet.raw, record, now)
            if reply is not None:
                out.append(CapturedPacket(reply[0], False, packet.if_index, packet.sub_if_index, record))
            elif only_replies or (loopback and self._from_pinned(packet.raw)):
                others.append((packet.raw, record))
            else:
                out.append(packet)
        self._send(others)
        return out

    def _from_pinned(self, raw: bytes) -> bool:
        flow = parse_flow(raw)
        return flow is not None and (flow.src, flow.src_port) in self._pinned_sources

    def _capture_replies(self, target: Target) -> None:
        """Open a handle for a new local target's replies over loopback."""
        self._reply_targets.add(target)
        if self._loop is None:
            return
        divert = pydivert.Divert(reply_filter([target]), **self._options)
        try:
            divert.open()
            reader: _LinuxBatchIO | _ThreadReader
            if sys.platform.startswith("linux"):
                io = reader = _LinuxBatchIO(divert, self.batch)
                self._loop.add_reader(io.event_fd, self._drain_replies, io)
            else:
                reader = _ThreadReader(divert, self._loop, self._on_replies, self.batch)
                reader.start()
        except (OSError, RuntimeError) as error:
            log.warning("cannot capture the replies of redirect target %s: %s", target, error)
            with contextlib.suppress(OSError, RuntimeError):
                divert.close()
            return
        self._reply_handles.append((divert, reader))

    def _drain_replies(self, io: _LinuxBatchIO) -> None:
        for _ in range(CACHED_BATCHES_PER_WAKEUP):
            count = io.receive_batch()
            if not count:
                return
            self._on_replies(io.packets())
            if count < io.batch:
                return

    def _on_replies(self, packets: list[CapturedPacket]) -> None:
        replies = self._unreroute(packets, only_replies=True)
        if replies and self._sink is not None:
            self._sink(replies)

    def _send(self, frames: list[tuple[bytes, bytes]]) -> None:
        if not frames:
            return
        if self._linux is not None:
            self.send_errors += self._linux.send(frames)
            return
        for raw, address in frames:
            try:
                packet = pydivert.Packet(bytearray(raw), wd_addr=_address_struct(address))
                self._divert.send(packet, recalculate_checksum=False)
            except OSError as error:
                self.send_errors += 1
                log.debug("re-injection failed: %s", error)

    def stats(self) -> dict[str, int]:
        stats: dict[str, int] = {
            "send_errors": self.send_errors,
            "redirects": len(self._rerouter.table) if self._rerouter is not None else 0,
            "rejects_sent": self.rejects_sent,
            "cached_batches": self.cached_batches,
            "other_batches": self.other_batches,
            "offloaded_checksums": self._linux.offloaded if self._linux is not None else 0,
        }
        try:
            native = self._divert.stats() if self._divert.is_open else {}
        except (OSError, RuntimeError):
            native = {}
        for name, value in native.items():
            stats[f"divert_{name}"] = int(value)
        # eBPFDivert lets packets through unfiltered when its ring is full.
        stats["bypassed"] = int(native.get("ringbuf_full", 0))
        return stats

    def close(self) -> None:
        if self._loop is not None and self._linux is not None:
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                self._loop.remove_reader(self._linux.event_fd)
        if self._reader is not None:
            self._reader.stop()
        for divert, reader in self._reply_handles:
            if isinstance(reader, _ThreadReader):
                reader.stop()
            elif self._loop is not None:
                with contextlib.suppress(ValueError, RuntimeError, OSError):
                    self._loop.remove_reader(reader.event_fd)
            with contextlib.suppress(OSError, RuntimeError):
                divert.close()
        self._reply_handles = []
        if self._linux is not None:
            self._linux.close()
        if self._divert.is_open:
            self._divert.close()


def _address_struct(address: bytes) -> ctypes.Structure:
    from pydivert.windivert_dll.structs import WinDivertAddress

    return WinDivertAddress.from_buffer_copy(address)


class _LinuxBatchIO:
    """Batched receive and send through libebpfdivert's ``recv_ex``/``send_ex``."""

    def __init__(self, divert: pydivert.Divert, batch: int, mtu_of: InterfaceMtu | None = None) -> None:
        """``mtu_of``: for the handle that re-injects, to let the kernel checksum TCP aggregates (divert_checksums)."""
        from pydivert.bpf import libebpfdivert
        from pydivert.windivert_dll.structs import WinDivertAddress

        if libebpfdivert is None:
            raise RuntimeError("libebpfdivert is not loadable")
        self._lib = libebpfdivert
        self._handle = divert._impl._handle  # the open native handle
        self.event_fd: int = self._lib.ebpfdivert_get_event_fd(self._handle)
        self.batch = batch
        self._buffer = bytearray(_RECV_BUFFER_BYTES)
        self._buffer_c = (ctypes.c_char * len(self._buffer)).from_buffer(self._buffer)
        self._addresses = (WinDivertAddress * MAX_BATCH)()
        self._address_view = memoryview(self._addresses).cast("B")
        self._current: list[CapturedPacket] | None = None
        self._received = ctypes.c_uint32(0)
        self._count = ctypes.c_uint32(0)
        self._sent = ctypes.c_uint32(0)
        self._address_type = WinDivertAddress
        self._mtu_of = mtu_of
        #: Re-injected aggregates whose checksum was left to the kernel.
        self.offloaded = 0

    def close(self) -> None:
        if self._mtu_of is not None:
            self._mtu_of.close()

    def receive_batch(self) -> int:
        """Receive whatever is queued, up to one batch, into the buffer; return the count."""
        self._current = None
        self._count.value = self.batch
        ret = self._lib.ebpfdivert_recv_ex(
            self._handle,
            self._buffer_c,
            len(self._buffer),
            ctypes.byref(self._received),
            self._addresses,
            ctypes.byref(self._count),
            0,
        )
        if ret < 0:
            if -ret in (errno.EAGAIN, errno.ETIMEDOUT):
                return 0
            raise OSError(-ret, "ebpfdivert_recv_ex failed")
        return self._count.value

    def cached_runs(self) -> list[CacheRun] | None:
        """The received batch as runs of one IPv4 TCP/UDP connection each; None if any packet is not such.

        Only a 12-byte slice per packet is taken here: when the whole batch
        turns out to be cached, no per-packet object is ever built.
        """
        count = self._count.value
        flags = self._address_view[FLAGS_BYTE : count * ADDRESS_BYTES : ADDRESS_BYTES]
        return simple_ipv4_runs(self._buffer, self._received.value, map(OUTBOUND_BIT.__and__, flags))

    def packets(self) -> list[CapturedPacket]:
        """The received batch as packets.

        Each packet gets its own copy of its bytes (held packets outlive the
        buffer); the buffer itself stays as received until the next receive,
        so that a fully accepted batch goes back without being rebuilt.
        """
        count = self._count.value
        packets, whole = split_batch(
            self._buffer, self._received.value, bytes(self._address_view[: count * ADDRESS_BYTES])
        )
        if whole:
            self._current = packets
        return packets

    def is_current(self, packets: Sequence[CapturedPacket]) -> bool:
        """True when ``packets`` is exactly the last received batch, in order."""
        current = self._current
        return current is not None and len(packets) == len(current) and all(map(operator.is_, packets, current))

    def send_current(self) -> int:
        """Inject the last received batch, handed out by ``packets()``, from the receive buffer."""
        assert self._current is not None
        return self.send_received()

    def send_received(self) -> int:
        """Inject the last received batch as it is in the receive buffer; return failures."""
        self._current = None
        count = self._count.value
        if self._mtu_of is not None:
            self.offloaded += mark_offloaded(
                self._buffer, self._received.value, self._address_view, count, self._mtu_of
            )
        ret = self._lib.ebpfdivert_send_ex(
            self._handle, self._buffer_c, self._received.value, ctypes.byref(self._sent), self._addresses, count
        )
        if ret < 0:
            log.debug("send_ex failed: %s", -ret)
            return count
        return 0

    def send(self, frames: list[tuple[bytes, bytes]]) -> int:
        """Inject ``frames`` in batches; return how many could not be sent."""
        failures = 0
        for start in range(0, len(frames), MAX_BATCH):
            chunk = frames[start : start + MAX_BATCH]
            data = b"".join(raw for raw, _ in chunk)
            records = (self._address_type * len(chunk)).from_buffer_copy(b"".join(a for _, a in chunk))
            ret = self._lib.ebpfdivert_send_ex(
                self._handle, data, len(data), ctypes.byref(self._sent), records, len(chunk)
            )
            if ret < 0:
                failures += len(chunk)
                log.debug("send_ex failed: %s", -ret)
        return failures


class _ThreadReader:
    """Windows: a thread blocks in recv and hands packets to the loop in batches."""

    def __init__(self, divert: pydivert.Divert, loop: asyncio.AbstractEventLoop, sink: PacketSink, batch: int) -> None:
        import threading

        self._divert, self._loop, self._sink, self._batch = divert, loop, sink, batch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pmk-divert-reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                received = self._divert.recv_batch(self._batch, timeout=0.25)
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            packets = [
                CapturedPacket(
                    bytes(p.raw),
                    bool(p.wd_addr.Outbound),
                    int(p.wd_addr.Network.IfIdx),
                    int(p.wd_addr.Network.SubIfIdx),
                    bytes(p.wd_addr),
                )
                for p in received
            ]
            if packets:
                self._loop.call_soon_threadsafe(self._sink, packets)
