"""Linux kernel fast path: NFQUEUE for verdict requests, conntrack marks as the verdict cache.

Only packets of undecided connections come to user space. A permanent verdict
goes back as a packet mark with NF_REPEAT; pmk's chains (see
``netfilter_rules``) copy it to the connection mark and act on it, and from
then on every packet of that connection, both directions, is accepted,
rejected or dropped by the kernel. Temporary verdicts decide the packet in
hand only. The binding is ``netfilterqueue`` (the PyPI package); its socket is
read from the event loop, a bounded batch per readable event.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import socket
import struct
import subprocess
import sys
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pmk.capture import netfilter_rules as rules
from pmk.capture.base import CaptureBackend, CapturedPacket, PacketSink
from pmk.config import DEFAULT_QUEUE_MAXLEN
from pmk.packet.parse import TCP, UDP, parse_flow
from pmk.verdicts import ConnKey, Verdict

#: Packets taken per readable event, so one flood cannot starve the event loop.
MAX_BATCH = 256
#: netfilterqueue copies at most this much of each packet (its receive buffer
#: is 4 KiB); raw is truncated there, headers are always whole.
COPY_RANGE = 4016
# Per-packet receive-buffer share used by netfilterqueue (copy size + netlink overhead).
_SOCK_BYTES_PER_PACKET = 4800
_NF_HOOK_LOCAL_OUT = 3
_COUNTERS = ("received", "batches", "accepted", "blocked", "dropped", "verdict_errors", "flows_created", "flow_errors")
_PROC_QUEUES = "/proc/net/netfilter/nfnetlink_queue"
# Netlink numbers from linux/netfilter/nfnetlink_queue.h (queue config message).
_NFNL_SUBSYS_QUEUE = 3
_NFQNL_MSG_CONFIG = 2
_NFQA_CFG_MASK = 4
_NFQA_CFG_FLAGS = 5
_NFQA_CFG_F_FAIL_OPEN = 1
_NLM_F_REQUEST, _NLM_F_ACK, _NLMSG_ERROR = 1, 4, 2
# Kernel pieces the rule set needs, as listed under /proc/net once available.
_NEED_TARGETS = ("NFQUEUE", "CONNMARK", "MARK", "REJECT")
_NEED_MATCHES = ("conntrack", "connmark", "mark", "multiport", "comment")


def nfqueue_available() -> str | None:
    """None when this backend can run here, else the reason it cannot."""
    if sys.platform != "linux":
        return "NFQUEUE exists only on Linux"
    try:
        import netfilterqueue  # noqa: F401
    except ImportError as exc:
        return f"the netfilterqueue package is not importable ({exc})"
    for tool in ("iptables", "ip6tables", "iptables-restore", "ip6tables-restore", "conntrack"):
        if shutil.which(tool) is None:
            return f"the {tool} command is missing"
    if not _has_net_admin():
        return "needs root or CAP_NET_ADMIN"
    for kind, names in (("targets", _NEED_TARGETS), ("matches", _NEED_MATCHES)):
        missing = [n for n in names if not _kernel_has(kind, n)]
        if missing:
            return f"kernel lacks iptables {kind} {', '.join(missing)}"
    return None


def _has_net_admin() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 12))
    except OSError:
        pass
    return os.geteuid() == 0


def _kernel_has(kind: str, name: str) -> bool:
    """Registered in /proc/net, or present as a loadable module."""
    try:
        with open(f"/proc/net/ip_tables_{kind}") as f:
            if name in f.read().split():
                return True
    except OSError:
        pass
    moddir = f"/lib/modules/{os.uname().release}/kernel/net/netfilter"
    return os.path.isdir(moddir) and any(n.startswith(f"xt_{name}.") for n in os.listdir(moddir))


def _set_fail_open(sock: socket.socket, queue_num: int, on: bool) -> None:
    """Set the queue's fail-open flag: when the queue is full, accept instead of drop.

    netfilterqueue has no call for it, so the config message is sent on its
    own socket (the kernel only lets the queue's owner configure it).
    """
    flags = _NFQA_CFG_F_FAIL_OPEN if on else 0
    attrs = struct.pack("=HHI", 8, _NFQA_CFG_FLAGS, socket.htonl(flags)) + struct.pack(
        "=HHI", 8, _NFQA_CFG_MASK, socket.htonl(_NFQA_CFG_F_FAIL_OPEN)
    )
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue_num)) + attrs
    msg_type = (_NFNL_SUBSYS_QUEUE << 8) | _NFQNL_MSG_CONFIG
    header = struct.pack("=IHHII", 16 + len(body), msg_type, _NLM_F_REQUEST | _NLM_F_ACK, 0x504D4B, 0)
    sock.sendto(header + body, (0, 0))
    reply = sock.recv(4096, socket.MSG_DONTWAIT)  # the kernel acks inside sendto
    _len, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", reply)
    err = struct.unpack_from("=i", reply, 16)[0] if kind == _NLMSG_ERROR else 0
    if err:
        raise OSError(-err, f"setting fail-open on queue {queue_num}: {os.strerror(-err)}")


def read_queue_counters(queue_num: int) -> dict[str, int]:
    """Kernel counters of one queue in this namespace ({} when it is not bound)."""
    try:
        with open(_PROC_QUEUES) as f:
            for line in f:
                cols = line.split()
                if len(cols) >= 8 and int(cols[0]) == queue_num:
                    return {
                        "kernel_queue_len": int(cols[2]),
                        "kernel_queue_dropped": int(cols[5]),
                        "kernel_user_dropped": int(cols[6]),
                    }
    except (OSError, ValueError):
        pass
    return {}


class _BoundedRecv:
    """A socket stand-in for ``run_socket`` that reports "would block" after a batch."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.left = 0
        self.enobufs = 0

    def recv(self, size: int) -> bytes:
        if self.left <= 0:
            raise BlockingIOError(errno.EAGAIN, "batch full")
        self.left -= 1
        try:
            return self.sock.recv(size)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                self.enobufs += 1  # the kernel dropped packets; counted in /proc too
            raise


class NfqueueBackend(CaptureBackend):
    """Packets from one NFQUEUE; verdicts as packet and connection marks.

    ``match`` scopes what is queued (see ``netfilter_rules.parse_match``,
    e.g. ``"tcp:443,udp:53"``; None queues everything but ICMPv6 neighbour
    discovery). ``fail_open`` lets packets pass when nothing is bound to the
    queue or the queue is full; by default they are dropped.
    """

    name = "nfqueue"
    kernel_verdict_cache = True

    def __init__(
        self,
        queue_num: int = 0,
        match: str | Sequence[str] | None = None,
        fail_open: bool = False,
        queue_maxlen: int = DEFAULT_QUEUE_MAXLEN,
        mark_mask: int = rules.DEFAULT_MARK_MASK,
    ) -> None:
        if not 0 <= queue_num <= 65535:
            raise ValueError("queue_num must be 0..65535")
        if queue_maxlen < 1:
            raise ValueError("queue_maxlen must be positive")
        self.queue_num = queue_num
        self.fail_open = fail_open
        self.queue_maxlen = queue_maxlen
        self.mark_mask = mark_mask
        self._rules = rules.RuleSet(queue_num, match, fail_open, mark_mask)
        self._marks = {code: rules.mark_value(code, mark_mask) for code in rules.MarkCode}
        self._nfq: Any = None
        self._sock: socket.socket | None = None
        self._reader: _BoundedRecv | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: PacketSink | None = None
        self._batch: list[CapturedPacket] = []
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self._installed = False
        self._counts = dict.fromkeys(_COUNTERS, 0)

    # --- lifecycle -------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, sink: PacketSink) -> None:
        """Bind the queue, then install the rules (so no packet finds the queue unbound)."""
        if self._nfq is not None or self._closed:
            raise RuntimeError("backend already started or closed")
        from netfilterqueue import COPY_PACKET, NetfilterQueue

        self._loop, self._sink = loop, sink
        try:
            self._nfq = NetfilterQueue()
            with warnings.catch_warnings():
                # It warns when the kernel caps the receive buffer; not worth failing for.
                warnings.simplefilter("ignore")
                self._nfq.bind(
                    self.queue_num,
                    self._on_packet,
                    max_len=self.queue_maxlen,
                    mode=COPY_PACKET,
                    range=COPY_RANGE,
                    sock_len=max(self.queue_maxlen, 64) * _SOCK_BYTES_PER_PACKET // 2,
                )
            self._sock = socket.socket(fileno=os.dup(self._nfq.get_fd()))
            self._sock.setblocking(False)
            if self.fail_open:
                _set_fail_open(self._sock, self.queue_num, True)
            self._reader = _BoundedRecv(self._sock)
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pmk-conntrack")
            self._rules.install()
            self._installed = True
            loop.add_reader(self._sock.fileno(), self._drain)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Remove the rules, unbind (held packets are dropped), clear pmk's marks."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and self._sock is not None:
            with contextlib.suppress(ValueError, RuntimeError):  # loop already closed
                self._loop.remove_reader(self._sock.fileno())
        try:
            self._rules.remove()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            if self._sock is not None:
                self._sock.close()
            if self._nfq is not None:
                self._nfq.unbind()
                self._nfq = None
            if self._installed:  # only then can the marks be ours
                rules.clear_conn_marks(self.mark_mask)

    # --- receive ---------------------------------------------------------

    def _on_packet(self, pkt: Any) -> None:
        outbound = pkt.hook == _NF_HOOK_LOCAL_OUT
        self._batch.append(CapturedPacket(pkt.get_payload(), outbound, pkt.outdev if outbound else pkt.indev, 0, pkt))

    def _drain(self) -> None:
        reader = self._reader
        if reader is None or self._nfq is None:
            return
        reader.left = MAX_BATCH
        try:
            self._nfq.run_socket(reader)
        except OSError:
            # A receive error other than EAGAIN/ENOBUFS: the socket is gone.
            if not self._closed:
                raise
        batch, self._batch = self._batch, []
        if batch and self._sink is not None:
            self._counts["received"] += len(batch)
            self._counts["batches"] += 1
            self._sink(batch)

    # --- verdicts --------------------------------------------------------

    def apply(self, packets: Sequence[CapturedPacket], verdict: Verdict, permanent: bool) -> None:
        """Mark and repeat (permanent, or any block/accept); plain drop for a temporary drop.

        Accept also goes through NF_REPEAT so the host's own INPUT/OUTPUT rules
        after pmk's jump still judge the packet.
        """
        code: rules.MarkCode | None
        if verdict is Verdict.ACCEPT:
            code, counter = (rules.MarkCode.ACCEPT if permanent else rules.MarkCode.ACCEPT_ONCE), "accepted"
        elif verdict is Verdict.BLOCK:
            code, counter = (rules.MarkCode.BLOCK if permanent else rules.MarkCode.BLOCK_ONCE), "blocked"
        else:
            code, counter = (rules.MarkCode.DROP if permanent else None), "dropped"
        mark, keep = (self._marks[code] if code else 0), ~self.mark_mask & 0xFFFFFFFF
        for cp in packets:
            pkt = cp.token
            try:
                if code is None:
                    pkt.drop()
                else:
                    pkt.set_mark((pkt.mark & keep) | mark)
                    pkt.repeat()
            except (RuntimeError, OSError):
                self._counts["verdict_errors"] += 1  # verdict given twice, or queue gone
                continue
            self._counts[counter] += 1
            if permanent and verdict is not Verdict.ACCEPT:
                self._remember_dropped_flow(cp, code)

    def _remember_dropped_flow(self, packet: CapturedPacket, code: int | None) -> None:
        """Re-create the conntrack entry a dropped first packet took along (see create_flow)."""
        raw = packet.raw
        flow = packet.flow or parse_flow(raw)  # held packets were parsed when held
        if flow is None or flow.protocol not in (TCP, UDP) or code is None or self._pool is None:
            return
        if flow.protocol == TCP:
            offset = flow.transport_offset
            syn_only = offset >= 0 and len(raw) > offset + 13 and (raw[offset + 13] & 0x12) == 0x02
            if not (syn_only and code == rules.MarkCode.DROP):
                return  # later TCP packets have a confirmed entry; a blocked SYN got its reset
        self._pool.submit(self._create_flow, flow.protocol, flow.src, flow.dst, flow.src_port, flow.dst_port, code)

    def _create_flow(self, protocol: int, src: bytes, dst: bytes, sport: int, dport: int, code: int) -> None:
        try:
            if rules.create_flow(protocol, src, dst, sport, dport, code, mark_mask=self.mark_mask):
                self._counts["flows_created"] += 1
        except (rules.RulesError, OSError, subprocess.SubprocessError):
            self._counts["flow_errors"] += 1  # only this worker thread writes it

    def update_connection(self, key: ConnKey, verdict: Verdict | None) -> None:
        """Re-mark a live connection (None: forget it, its next packet is asked about)."""
        code = {
            Verdict.ACCEPT: rules.MarkCode.ACCEPT,
            Verdict.BLOCK: rules.MarkCode.BLOCK,
            Verdict.DROP: rules.MarkCode.DROP,
            None: 0,
        }[verdict]
        rules.set_conn_mark(key, code, self.mark_mask)

    def forget_all(self) -> None:
        rules.clear_conn_marks(self.mark_mask)

    def stats(self) -> dict[str, int]:
        out = dict(self._counts)
        # Fail-closed, no packet in scope passes undecided. With fail_open the
        # kernel passes packets while nobody listens or the queue is full and
        # counts none of them, so "fail_open" says bypassed cannot be trusted.
        out["bypassed"] = 0
        out["fail_open"] = int(self.fail_open)
        out["enobufs"] = self._reader.enobufs if self._reader is not None else 0
        out.update(read_queue_counters(self.queue_num))
        return out
