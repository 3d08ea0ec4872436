"""The connections the kernel has when pmk starts, so they can be let through."""

from __future__ import annotations

import socket

from pmk.host.sockdiag import (
    ALL_STATES,
    TCP_CLOSE,
    TCP_CLOSE_WAIT,
    TCP_CLOSING,
    TCP_ESTABLISHED,
    TCP_FIN_WAIT1,
    TCP_FIN_WAIT2,
    TCP_LAST_ACK,
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

#: The TCP states past the handshake. A connection in one of them at some moment
#: finished its handshake before then: if its packets were being captured, pmk saw it.
HANDSHAKE_DONE_TCP_STATES = sum(
    1 << state for state in (TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING)
)

_V4_MAPPED = bytes(10) + b"\xff\xff"


def entry_key(protocol: int, entry: DiagEntry) -> ConnKey:
    """The connection key of a socket; a dual-stack socket's IPv4-mapped peers give an IPv4 key."""
    local, remote = entry.local_ip, entry.remote_ip
    if len(local) == 16 and local.startswith(_V4_MAPPED) and remote.startswith(_V4_MAPPED):
        local, remote = local[12:], remote[12:]
    return ConnKey(protocol, local, entry.local_port, remote, entry.remote_port)


def existing_connections(handshake_done: bool = False) -> list[ConnKey]:
    """TCP connections and connected UDP sockets, IPv4 and IPv6, in this network namespace now.

    ``handshake_done``: only TCP connections past their handshake, no UDP
    (which has no handshake): right after capture started, these are the
    ones that cannot have begun under it.
    Raises OSError when the kernel has no sock_diag (no CONFIG_INET_DIAG).
    """
    keys: list[ConnKey] = []
    states = HANDSHAKE_DONE_TCP_STATES if handshake_done else CONNECTED_TCP_STATES
    with SockDiag() as diag:
        for family in (socket.AF_INET, socket.AF_INET6):
            for entry in diag.dump(family, socket.IPPROTO_TCP, states):
                keys.append(entry_key(socket.IPPROTO_TCP, entry))
            if handshake_done:
                continue
            for entry in diag.dump(family, socket.IPPROTO_UDP):
                if entry.remote_port != 0:
                    keys.append(entry_key(socket.IPPROTO_UDP, entry))
    return keys
