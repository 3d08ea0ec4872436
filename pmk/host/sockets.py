"""The connections the kernel has when pmk starts, so they can be let through."""

from __future__ import annotations

import socket

from pmk.host.sockdiag import (
    ALL_STATES,
    TCP_CLOSE,
    TCP_LISTEN,
    TCP_TIME_WAIT,
    DiagEntry,
    SockDiag,
)
from pmk.verdicts import ConnKey

#: Every TCP state that carries a connection. Not listeners and closed sockets
#: (no peer), and not TIME_WAIT: its application is gone, and a new SYN may
#: reuse its 4-tuple, which must then be asked about like any new connection.
CONNECTED_TCP_STATES = ALL_STATES & ~((1 << TCP_LISTEN) | (1 << TCP_CLOSE) | (1 << TCP_TIME_WAIT))

_V4_MAPPED = bytes(10) + b"\xff\xff"


def entry_key(protocol: int, entry: DiagEntry) -> ConnKey:
    """The connection key of a socket; a dual-stack socket's IPv4-mapped peers give an IPv4 key."""
    local, remote = entry.local_ip, entry.remote_ip
    if len(local) == 16 and local.startswith(_V4_MAPPED) and remote.startswith(_V4_MAPPED):
        local, remote = local[12:], remote[12:]
    return ConnKey(protocol, local, entry.local_port, remote, entry.remote_port)


def existing_connections() -> list[ConnKey]:
    """TCP connections and connected UDP sockets, IPv4 and IPv6, in this network namespace now.

    Raises OSError when the kernel has no sock_diag (no CONFIG_INET_DIAG).
    """
    keys: list[ConnKey] = []
    with SockDiag() as diag:
        for family in (socket.AF_INET, socket.AF_INET6):
            for entry in diag.dump(family, socket.IPPROTO_TCP, CONNECTED_TCP_STATES):
                keys.append(entry_key(socket.IPPROTO_TCP, entry))
            for entry in diag.dump(family, socket.IPPROTO_UDP):
                if entry.remote_port != 0:
                    keys.append(entry_key(socket.IPPROTO_UDP, entry))
    return keys
