"""Process attribution on Windows, from WinDivert socket events.

UNTESTED: written against pydivert's and WinDivert 2.2's documented APIs
(``pydivert.WinDivert`` with ``Layer.SOCKET``, ``Flag.SNIFF | Flag.RECV_ONLY``,
``recv(timeout=...)``, ``Packet.event``, ``Packet.socket``,
``Packet.wd_addr.IPv6``; ``psutil.Process``) without a Windows machine to run
it on. Import it only on win32.

A sniff-only, receive-only SOCKET-layer handle reports every socket's
bind, listen, connect, accept and close with the process id; a reader thread
keeps a table of connections (connect, accept) by 5-tuple and of local
endpoints (bind, listen) by protocol, address and port. Not the FLOW layer:
its FLOW_ESTABLISHED event for TCP follows the handshake (WFP's ALE
flow-established layer), i.e. it comes after the SYN that pmk holds while it
asks, whereas CONNECT comes before the SYN is sent and LISTEN/BIND name the
process an inbound SYN or datagram reaches. Sockets opened before the handle
are unknown (their connections are let through at start anyway).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

if sys.platform != "win32":
    raise ImportError("pmk.host.windows is for Windows only; Linux uses pmk.host.owner")

import psutil  # type: ignore[import-untyped]
import pydivert  # type: ignore[import-untyped]

from pmk.core.attribution import Owner
from pmk.verdicts import ConnKey

# WINDIVERT_EVENT_SOCKET_* (windivert.h)
_BIND, _CONNECT, _LISTEN, _ACCEPT, _CLOSE = 3, 4, 5, 6, 7
#: How long an outbound lookup waits for the reader thread to catch up with the
#: CONNECT event, which the driver queues before the packet pmk is deciding.
CATCH_UP_SECONDS = 0.05
#: Table size at which it is emptied (CLOSE events lost to a full queue).
MAX_ENTRIES = 65536

_Endpoint = tuple[int, bytes, int]  # protocol, local address, local port


def _address(words: Any, ipv6: bool) -> bytes:
    """WinDivert's UINT32[4] (a 128-bit number, least significant word first; IPv4 as
    ::ffff:a.b.c.d) as packed network-order bytes."""
    value = words[0] | words[1] << 32 | words[2] << 64 | words[3] << 96
    packed = value.to_bytes(16, "big")
    return packed if ipv6 else packed[12:]


class WindowsOwnerLookup:
    """``lookup(key, outbound)`` as on Linux, fed by a reader thread; ``uid`` is None."""

    def __init__(self) -> None:
        self._handle = pydivert.WinDivert(
            "true", layer=pydivert.Layer.SOCKET, flags=pydivert.Flag.SNIFF | pydivert.Flag.RECV_ONLY
        )
        self._connections: dict[ConnKey, int] = {}
        self._endpoints: dict[_Endpoint, int] = {}
        self._exe: dict[int, tuple[float, str]] = {}  # pid -> (create time, executable)
        self._changed = threading.Condition()
        self._stopping = False
        self._handle.open()
        self._reader = threading.Thread(target=self._read, name="pmk-socket-events", daemon=True)
        self._reader.start()

    def close(self) -> None:
        self._stopping = True
        self._reader.join()
        self._handle.close()

    def lookup(self, key: ConnKey, outbound: bool) -> Owner | None:
        with self._changed:
            pid = self._find(key)
            if pid is None and outbound:
                self._changed.wait(CATCH_UP_SECONDS)
                pid = self._find(key)
        return None if pid is None else Owner(pid, self._executable(pid), None)

    def _find(self, key: ConnKey) -> int | None:
        pid = self._connections.get(key)
        if pid is None:
            pid = self._endpoints.get((key.protocol, key.local_ip, key.local_port))
        if pid is None:
            pid = self._endpoints.get((key.protocol, bytes(len(key.local_ip)), key.local_port))
        return pid

    def _read(self) -> None:
        while not self._stopping:
            try:
                event = self._handle.recv(timeout=0.5)
            except TimeoutError:
                continue
            data, ipv6 = event.socket, bool(event.wd_addr.IPv6)
            local = _address(data.LocalAddr, ipv6)
            remote = _address(data.RemoteAddr, ipv6)
            key = ConnKey(data.Protocol, local, data.LocalPort, remote, data.RemotePort)
            endpoint = (data.Protocol, local, data.LocalPort)
            with self._changed:
                if len(self._connections) > MAX_ENTRIES or len(self._endpoints) > MAX_ENTRIES:
                    self._connections.clear()
                    self._endpoints.clear()
                if event.event in (_CONNECT, _ACCEPT):
                    self._connections[key] = data.ProcessId
                elif event.event in (_BIND, _LISTEN):
                    self._endpoints[endpoint] = data.ProcessId
                elif event.event == _CLOSE:
                    self._connections.pop(key, None)
                    if data.RemotePort == 0:
                        self._endpoints.pop(endpoint, None)
                self._changed.notify_all()

    def _executable(self, pid: int) -> str | None:
        """The process's executable, cached while its create time is unchanged (None if gone)."""
        try:
            process = psutil.Process(pid)
            created = process.create_time()
            cached = self._exe.get(pid)
            if cached is not None and cached[0] == created:
                return cached[1]
            path = process.exe()
        except psutil.Error:
            return None
        if len(self._exe) > MAX_ENTRIES:
            self._exe.clear()
        self._exe[pid] = (created, path)
        return path
