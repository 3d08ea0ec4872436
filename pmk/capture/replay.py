"""A capture file as a packet source: ``pmk replay`` without privileges or network.

Frames are read with dpkt (pcap or pcapng), their link-layer header is cut
off, and the IP packets go to the server's sink like captured ones; the
verdicts come back through ``apply`` and are counted (and, if asked, the
accepted frames are written to a pcap file, in the order of the input).

Pacing: pmk's own, not the capture's timestamps. Packets go in batches as
fast as the decision path settles them, but never more than ``window``
are unsettled at once. With ``window`` at most the packet cache's size the
cache can never evict, so each packet's outcome is what the deciders (or the
fallback) chose, not an artefact of how fast the file was read.

Direction: with ``local`` networks, a packet from a local address is outbound,
one to a local address inbound, and one with neither side local is skipped
and counted (``replay_not_local``): pmk on a host never sees such a packet.
Without ``local`` the side that opened the conversation is taken as this
host (the sender of a TCP SYN, or the receiver of a SYN-ACK, else the sender
of the first packet seen): right for captures taken on a client.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
from collections.abc import Iterator, Sequence
from typing import IO, Any

import dpkt

from pmk.capture.base import CaptureBackend, CapturedPacket, PacketSink
from pmk.errors import PmkError, UsageError
from pmk.packet.parse import TCP, Flow, parse_flow
from pmk.verdicts import Target, Verdict

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Link types (the pcap header's LINKTYPE_* values; 12 and 14 are the DLT_RAW
# spellings some old writers used).
LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = (101, 12, 14)
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
SUPPORTED_LINK_TYPES = "Ethernet, raw IP, Linux cooked (SLL, SLL2), BSD loopback"

_ETHERTYPE_IPV4, _ETHERTYPE_IPV6 = 0x0800, 0x86DD
_ETHERTYPE_VLAN = frozenset({0x8100, 0x88A8, 0x9100})
# Address families in a loopback header: AF_INET, and AF_INET6 on Linux, the BSDs and macOS.
_LOOPBACK_FAMILIES = frozenset({2, 10, 24, 28, 30})

# Packets handed to the sink per call: big enough to batch, small enough that
# decider answers are read in between.
REPLAY_BATCH = 64
# Written pcap files' snap length: larger than any frame pmk reads.
_SNAPLEN = 262_144


def ip_packet(link_type: int, frame: bytes) -> bytes | None:
    """The IP packet in ``frame`` (trailing padding cut), or None if it carries none."""
    if link_type == LINKTYPE_ETHERNET:
        offset, ethertype = 14, _u16(frame, 12)
        while ethertype in _ETHERTYPE_VLAN:
            offset, ethertype = offset + 4, _u16(frame, offset + 2)
        raw = frame[offset:] if ethertype in (_ETHERTYPE_IPV4, _ETHERTYPE_IPV6) else b""
    elif link_type in LINKTYPE_RAW or link_type in (LINKTYPE_IPV4, LINKTYPE_IPV6):
        raw = frame
    elif link_type == LINKTYPE_LINUX_SLL:
        raw = frame[16:] if _u16(frame, 14) in (_ETHERTYPE_IPV4, _ETHERTYPE_IPV6) else b""
    elif link_type == LINKTYPE_LINUX_SLL2:
        raw = frame[20:] if _u16(frame, 0) in (_ETHERTYPE_IPV4, _ETHERTYPE_IPV6) else b""
    elif link_type in (LINKTYPE_NULL, LINKTYPE_LOOP):
        # NULL: the capturing host's byte order; LOOP: network order. Either is accepted.
        family = frame[:4]
        known = len(family) == 4 and (
            struct.unpack("<I", family)[0] in _LOOPBACK_FAMILIES or struct.unpack(">I", family)[0] in _LOOPBACK_FAMILIES
        )
        raw = frame[4:] if known else b""
    else:
        raise ValueError(f"link type {link_type}")
    return _trimmed(raw)


def _u16(frame: bytes, offset: int) -> int:
    return int.from_bytes(frame[offset : offset + 2], "big") if len(frame) >= offset + 2 else -1


def _trimmed(raw: bytes) -> bytes | None:
    """``raw`` cut to the IP header's length (Ethernet pads short frames); None if not IP."""
    if not raw:
        return None
    version = raw[0] >> 4
    if version == 4 and len(raw) >= 20:
        total = _u16(raw, 2)
        return raw[:total] if 20 <= total < len(raw) else raw
    if version == 6 and len(raw) >= 40:
        payload = _u16(raw, 4)
        return raw[: 40 + payload] if 0 < payload < len(raw) - 40 else raw
    return None


class Directions:
    """Which packets are outbound: by ``--local`` networks, or by who opened the conversation."""

    def __init__(self, local: Sequence[Network]) -> None:
        self._local = [(net.version, int(net.network_address), int(net.netmask)) for net in local]
        self._openers: dict[tuple[int, bytes, int, bytes, int], tuple[bytes, int]] = {}

    def outbound(self, flow: Flow, raw: bytes) -> bool | None:
        """True outbound, False inbound, None when neither side is this host's."""
        if self._local:
            if self._is_local(flow.ip_version, flow.src):
                return True
            return False if self._is_local(flow.ip_version, flow.dst) else None
        source, destination = (flow.src, flow.src_port), (flow.dst, flow.dst_port)
        conversation = (flow.protocol, *min(source, destination), *max(source, destination))
        opener = self._openers.get(conversation)
        if opener is None:
            opener = destination if _is_syn_ack(flow, raw) else source
            self._openers[conversation] = opener
        return opener == source

    def _is_local(self, version: int, packed: bytes) -> bool:
        address = int.from_bytes(packed, "big")
        return any(v == version and address & mask == net for v, net, mask in self._local)


def _is_syn_ack(flow: Flow, raw: bytes) -> bool:
    flags_at = flow.transport_offset + 13
    return flow.protocol == TCP and flow.transport_offset >= 0 and len(raw) > flags_at and raw[flags_at] & 0x12 == 0x12


class _Frame:
    """What ``apply`` needs to write an accepted packet back: its place, time and bytes."""

    __slots__ = ("frame", "index", "timestamp")

    def __init__(self, index: int, timestamp: float, frame: bytes) -> None:
        self.index = index
        self.timestamp = timestamp
        self.frame = frame


class ReplayBackend(CaptureBackend):
    """Feeds a pcap or pcapng file to the server; see the module docstring."""

    name = "replay"
    kernel_verdict_cache = False

    def __init__(
        self,
        path: str,
        *,
        local: Sequence[Network] = (),
        window: int,
        write_accepted: str | None = None,
        batch: int = REPLAY_BATCH,
    ) -> None:
        self.path = path
        self.window = max(1, window)
        self.batch = max(1, min(batch, self.window))
        self._directions = Directions(local)
        self._input, reader = _open_capture(path)
        self.link_type: int = reader.datalink()
        try:
            ip_packet(self.link_type, b"")
        except ValueError:
            self._input.close()
            raise UsageError(f"{path}: link type {self.link_type} is not supported ({SUPPORTED_LINK_TYPES})") from None
        self._frames: Iterator[tuple[Any, bytes]] = iter(reader)
        self._output: IO[bytes] | None = None
        self._writer: Any = None
        if write_accepted is not None:
            try:
                self._output = open(write_accepted, "wb")  # noqa: SIM115 (closed in close())
            except OSError as error:
                self._input.close()
                raise UsageError(f"cannot write {write_accepted}: {error.strerror}") from None
            self._writer = dpkt.pcap.Writer(self._output, snaplen=_SNAPLEN, linktype=self.link_type)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: PacketSink | None = None
        self._feeding = False
        self._feed_scheduled = False
        self._exhausted = False
        self._done: asyncio.Future[None] | None = None
        # Settled packets not yet written: accepted frames wait for every earlier packet.
        self._settled: dict[int, _Frame | None] = {}
        self._next_to_write = 0
        self.outstanding = 0
        #: Why reading stopped before the end of the file, if it did.
        self.damaged: str | None = None
        self.frames = self.not_ip = self.not_local = self.fed = self.written = 0
        #: Packets per verdict as applied (evicted packets are applied as drop).
        self.verdicts: dict[str, int] = {verdict.value: 0 for verdict in Verdict}

    def start(self, loop: asyncio.AbstractEventLoop, sink: PacketSink) -> None:
        """Keep the sink; nothing is fed before ``play`` (deciders connect first)."""
        self._loop, self._sink = loop, sink

    def play(self) -> asyncio.Future[None]:
        """Start feeding; the future is done once every fed packet has its outcome."""
        assert self._loop is not None, "start() first"
        if self._done is None:
            self._done = self._loop.create_future()
            self._feeding = True
            self._schedule_feed()
        return self._done

    def _schedule_feed(self) -> None:
        if self._feeding and not self._feed_scheduled and not self._exhausted and self._loop is not None:
            self._feed_scheduled = True
            self._loop.call_soon(self._feed)

    def _feed(self) -> None:
        self._feed_scheduled = False
        if not self._feeding:
            return  # closed since this was scheduled
        if self.window - self.outstanding < self.batch:
            return  # apply() schedules the next batch once enough has settled
        batch = self._read(self.batch)
        if batch:
            assert self._sink is not None
            self.outstanding += len(batch)
            self.fed += len(batch)
            self._sink(batch)
        # Yield to the loop between batches, so that decider answers are read in between.
        self._schedule_feed()
        self._check_done()

    def _read(self, count: int) -> list[CapturedPacket]:
        batch: list[CapturedPacket] = []
        while len(batch) < count:
            try:
                timestamp, frame = next(self._frames)
            except StopIteration:
                self._exhausted = True
                break
            except (dpkt.Error, ValueError, struct.error) as error:
                self._exhausted = True
                self.damaged = f"{self.path}: unreadable after frame {self.frames}: {error or type(error).__name__}"
                log.warning("%s", self.damaged)
                break
            self.frames += 1
            raw = ip_packet(self.link_type, frame)
            flow = parse_flow(raw) if raw is not None else None
            if raw is None or flow is None:
                self.not_ip += 1
                continue
            outbound = self._directions.outbound(flow, raw)
            if outbound is None:
                self.not_local += 1
                continue
            token = _Frame(self.fed + len(batch), float(timestamp), frame)
            batch.append(CapturedPacket(raw, outbound, token=token))
        return batch

    def apply(
        self, packets: Sequence[CapturedPacket], verdict: Verdict, permanent: bool, target: Target | None = None
    ) -> None:
        self.verdicts[verdict.value] = self.verdicts.get(verdict.value, 0) + len(packets)
        self.outstanding -= len(packets)
        accepted = verdict is Verdict.ACCEPT
        for packet in packets:
            frame: _Frame = packet.token
            self._settled[frame.index] = frame if accepted else None
        self._write_settled()
        if self.window - self.outstanding >= self.batch:
            self._schedule_feed()
        self._check_done()

    def _write_settled(self) -> None:
        """Write accepted frames in input order, as far as every earlier packet is settled."""
        while self._next_to_write in self._settled:
            frame = self._settled.pop(self._next_to_write)
            self._next_to_write += 1
            if frame is not None and self._writer is not None:
                self._writer.writepkt_time(frame.frame, frame.timestamp)
                self.written += 1

    def _check_done(self) -> None:
        if self._exhausted and not self.outstanding and self._done is not None and not self._done.done():
            self._done.set_result(None)

    def stats(self) -> dict[str, int]:
        return {
            "bypassed": 0,
            "replay_frames": self.frames,
            "replay_not_ip": self.not_ip,
            "replay_not_local": self.not_local,
            "replay_written": self.written,
        }

    def close(self) -> None:
        """Close the input, and the output with every accepted frame settled so far."""
        self._feeding = False
        if self._output is not None and not self._output.closed:
            for index in sorted(self._settled):
                frame = self._settled[index]
                if frame is not None:
                    self._writer.writepkt_time(frame.frame, frame.timestamp)
                    self.written += 1
            self._settled.clear()
            self._output.close()
        self._input.close()


def _open_capture(path: str) -> tuple[IO[bytes], Any]:
    """The open file and a dpkt reader for it; UsageError (one line) if it is neither format."""
    try:
        stream = open(path, "rb")  # noqa: SIM115 (closed by the backend's close())
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from None
    try:
        return stream, dpkt.pcap.UniversalReader(stream)
    except (ValueError, dpkt.Error, struct.error):
        stream.close()
        raise UsageError(f"{path} is not a pcap or pcapng file") from None
    except OSError as error:
        stream.close()
        raise PmkError(f"cannot read {path}: {error.strerror or error}") from None
