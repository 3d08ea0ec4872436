"""pmk's bits of conntrack marks, read and written over netlink (ctnetlink: pyroute2 and ``ctbulk``).

Why netlink rather than the ``conntrack`` program: one request per change
instead of a process, errors as numbers instead of text to parse, dumps the
kernel filters by mark, and a mark change the kernel makes atomically with a
mask (the new mark is ``(old & ~mask) ^ value``), so other users' bits and a
rule marking the same connection at the same moment are never overwritten
with stale bits.

Threads: pyroute2 speaks netlink through asyncio, and pmk's event loop must
not wait on it; two threads must not share one netlink socket either. So
every request runs on one worker thread owned by ``ConntrackMarks``, on that
thread's own event loop, which alone holds the sockets (one per address
family) and carries out one request at a time. Callers wait for the answer
(``set_mark``, ``clear_marks``) or collect it later (``create_flow``); the
packet path never waits. (pyroute2's blocking wrappers would do the same
work with a fresh event loop per call, at twice the CPU per request.)

Changes of many entries (``clear_marks``, and ``set_mark`` of a key without
ports, which needs a dump) run on the same worker thread through
``ctbulk.BulkMarks`` and its own sockets: pyroute2's one request per entry,
each awaited, cost about 1 ms per entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from pyroute2.conntrack import AsyncConntrack
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import TCP_CONNTRACK_SYN_SENT, NFCTAttrTuple

from pmk.capture.ctbulk import BulkMarks
from pmk.errors import PmkError
from pmk.packet.parse import PORT_PROTOCOLS, TCP
from pmk.verdicts import ConnKey, ip_text

T = TypeVar("T")
_PROTOCOL_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
# What the errno most likely means here. nfnetlink answers EINVAL for a
# subsystem it does not have, and pmk's own requests are well-formed.
_HINTS = {
    errno.EPERM: "needs root or CAP_NET_ADMIN",
    errno.EINVAL: "the kernel may lack nf_conntrack_netlink",
    errno.EOPNOTSUPP: "the kernel may lack nf_conntrack_netlink",
}


class ConntrackError(PmkError):
    """The kernel refused a conntrack request (or cannot take one); one line saying which and why."""


def _family(address: bytes) -> int:
    return socket.AF_INET if len(address) == 4 else socket.AF_INET6


def _tuple(protocol: int, src: bytes, dst: bytes, sport: int, dport: int) -> NFCTAttrTuple:
    ports = {"sport": sport, "dport": dport} if protocol in PORT_PROTOCOLS else {}
    return NFCTAttrTuple(_family(src), saddr=ip_text(src), daddr=ip_text(dst), proto=protocol, **ports)


def _describe(key: ConnKey) -> str:
    """A connection as a person reads it in an error message."""
    name = _PROTOCOL_NAMES.get(key.protocol, f"protocol {key.protocol}")
    if key.protocol in PORT_PROTOCOLS:
        local, remote = f"{ip_text(key.local_ip)}:{key.local_port}", f"{ip_text(key.remote_ip)}:{key.remote_port}"
    else:
        local, remote = ip_text(key.local_ip), ip_text(key.remote_ip)
    return f"{name} {local} <-> {remote}"


def _reason(error: BaseException) -> str:
    code = getattr(error, "code", None) if isinstance(error, NetlinkError) else getattr(error, "errno", None)
    if isinstance(code, int) and code > 0:
        hint = _HINTS.get(code)
        return os.strerror(code) + (f" ({hint})" if hint else "")
    return str(error) or type(error).__name__


def _closed() -> ConntrackError:
    return ConntrackError("conntrack: pmk is shutting down its kernel fast path")


class ConntrackMarks:
    """Reads and changes the bits of conntrack marks under ``mark_mask``; other bits stay.

    ``connection_values`` are the mark values pmk's rules store on
    connections (what ``clear_marks`` looks for). Any thread may call any
    method; after ``close`` they raise ConntrackError.
    """

    def __init__(self, mark_mask: int, connection_values: Iterable[int]) -> None:
        self.mark_mask = mark_mask
        self.connection_values = tuple(connection_values)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pmk-conntrack")
        # Used on the worker thread only.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sockets: dict[int, AsyncConntrack] = {}
        self._bulk = BulkMarks(mark_mask)
        self._done = False

    # --- called from any thread ----------------------------------------------

    def set_mark(self, key: ConnKey, value: int) -> int:
        """Set pmk's bits of ``key``'s entries to ``value`` (0 clears); returns how many changed.

        A connection that has no entry (it ended) changes nothing and is no
        error. Raises ConntrackError when the kernel refuses.
        """
        if key.protocol in PORT_PROTOCOLS:
            return self._submit(self._set_mark(key, value)).result()
        return self._submit_call(lambda: self._set_between(key, value)).result()

    def clear_marks(self) -> int:
        """Clear pmk's bits from every entry that has one of ``connection_values``; returns the count.

        In bulk (``ctbulk``): a few microseconds per entry, in chunks that let
        pmk's event loop run meanwhile.
        """
        return self._submit_call(self._clear_marks).result()

    def create_flow(
        self, protocol: int, src: bytes, dst: bytes, sport: int, dport: int, value: int, timeout: int
    ) -> Future[bool]:
        """Create a marked entry for a flow; the future says False when one already existed."""
        return self._submit(self._create_flow(protocol, src, dst, sport, dport, value, timeout))

    def close(self) -> None:
        """Wait for queued requests, then close the sockets; safe to call twice."""
        with contextlib.suppress(RuntimeError):  # closed before
            self._worker.submit(self._close)
        self._worker.shutdown(wait=True)

    def _submit(self, request: Coroutine[Any, Any, T]) -> Future[T]:
        try:
            return self._worker.submit(self._run, request)
        except RuntimeError:  # closed
            request.close()
            raise _closed() from None

    def _submit_call(self, call: Callable[[], T]) -> Future[T]:
        try:
            return self._worker.submit(self._call, call)
        except RuntimeError:  # closed
            raise _closed() from None

    # --- on the worker thread ------------------------------------------------

    def _call(self, call: Callable[[], T]) -> T:
        if self._done:  # submitted while close was under way
            raise _closed()
        return call()

    def _run(self, request: Coroutine[Any, Any, T]) -> T:
        if self._done:  # submitted while close was under way
            request.close()
            raise _closed()
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(request)

    def _close(self) -> None:
        self._done = True
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
        self._bulk.close()
        if self._loop is not None:
            self._loop.run_until_complete(asyncio.sleep(0))  # lets the closed transports finish
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    async def _request(self, what: str, family: int, action: Callable[[AsyncConntrack], Awaitable[T]]) -> T:
        """Run ``action`` on the family's socket; a failure becomes ConntrackError and a fresh socket."""
        try:
            sock = self._sockets.get(family)
            if sock is None:
                sock = self._sockets[family] = AsyncConntrack(nfgen_family=family)
            return await action(sock)
        except (NetlinkError, OSError) as error:
            stale = self._sockets.pop(family, None)
            if stale is not None:
                stale.close()
            raise ConntrackError(f"conntrack: {what}: {_reason(error)}") from error

    async def _change(self, family: int, what: str, value: int, **lookup: Any) -> int:
        """One mark change of the entry ``lookup`` names; 0 when that entry is gone."""

        async def change(sock: AsyncConntrack) -> int:
            try:
                await sock.entry("set", mark=value, mark_mask=self.mark_mask, **lookup)
            except NetlinkError as error:
                if error.code == errno.ENOENT:
                    return 0
                raise
            return 1

        return await self._request(what, family, change)

    async def _set_mark(self, key: ConnKey, value: int) -> int:
        # The kernel finds an entry by either direction's tuple: one request.
        local_first = _tuple(key.protocol, key.local_ip, key.remote_ip, key.local_port, key.remote_port)
        return await self._change(
            _family(key.local_ip), f"setting the mark of {_describe(key)}", value, tuple_orig=local_first
        )

    def _set_between(self, key: ConnKey, value: int) -> int:
        # Without ports a key covers every flow of the protocol between the two addresses.
        try:
            return self._bulk.set_between(key.protocol, key.local_ip, key.remote_ip, value)
        except OSError as error:
            raise ConntrackError(f"conntrack: setting the mark of {_describe(key)}: {_reason(error)}") from error

    def _clear_marks(self) -> int:
        try:
            return self._bulk.clear(self.connection_values)
        except OSError as error:
            raise ConntrackError(f"conntrack: clearing pmk's marks: {_reason(error)}") from error

    async def _create_flow(
        self, protocol: int, src: bytes, dst: bytes, sport: int, dport: int, value: int, timeout: int
    ) -> bool:
        orig = _tuple(protocol, src, dst, sport, dport)
        request: dict[str, Any] = {"tuple_orig": orig, "tuple_reply": orig.reverse(), "timeout": timeout, "mark": value}
        if protocol == TCP:  # the state a SYN leaves behind, so retries match it
            state = [["CTA_PROTOINFO_TCP_STATE", TCP_CONNTRACK_SYN_SENT]]
            request["protoinfo"] = {"attrs": [["CTA_PROTOINFO_TCP", {"attrs": state}]]}

        async def create(sock: AsyncConntrack) -> bool:
            try:
                await sock.entry("add", **request)
            except NetlinkError as error:
                if error.code == errno.EEXIST:
                    return False
                raise
            return True

        what = f"creating an entry for {_describe(ConnKey(protocol, src, sport, dst, dport))}"
        return await self._request(what, _family(src), create)
