"""Process attribution on Linux: the owner of the local socket of a connection."""

from __future__ import annotations

import socket

from pmk.core.attribution import Owner
from pmk.host.procs import ProcessTable
from pmk.host.sockdiag import SockDiag
from pmk.verdicts import ConnKey


class OwnerLookup:
    """One exact sock_diag request per lookup, then /proc (cached) for the pid.

    Blocking and thread-safe; it reads the network namespace it was created in.
    """

    def __init__(self, processes: ProcessTable | None = None) -> None:
        self._diag = SockDiag()
        self._processes = processes if processes is not None else ProcessTable()

    def close(self) -> None:
        self._diag.close()

    def lookup(self, key: ConnKey, outbound: bool) -> Owner | None:
        """The owner of ``key``'s local socket, or None when no socket owns it (a closed port).

        ``outbound`` is not needed here: the kernel's lookup is the receive
        path's, so it finds a connected socket (an outbound SYN is sent in
        SYN-SENT, a datagram after its socket exists) and else the listener or
        bound socket an inbound packet would reach. A TCP socket no file refers
        to (a handshake in progress, a connection not yet accepted, TIME-WAIT)
        is the listener's on that local port, if there is one.
        """
        diag = self._diag
        entry = diag.find(key.protocol, key.local_ip, key.local_port, key.remote_ip, key.remote_port)
        if entry is not None and entry.inode == 0 and key.protocol == socket.IPPROTO_TCP:
            entry = diag.find(key.protocol, key.local_ip, key.local_port, bytes(len(key.remote_ip)), 0)
        if entry is None or entry.inode == 0:
            return None
        found = self._processes.owner_of(entry.inode, entry.uid)
        if found is None:
            return None
        pid, path = found
        return Owner(pid, path, entry.uid)
