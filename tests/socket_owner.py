"""Opens the sockets a host test names, reports them, and holds them until stdin closes.

Run inside a namespace (standard library only; it may run as another user):
``socket_owner.py OP,HOST,PORT ...`` with OP one of tcp_listen,
tcp_listen_unaccepted (never accepts), udp_bind (all dual-stack on ``::``),
tcp_connect, tcp_connect_unaccepted, tcp_connect_pending (non-blocking, left
in SYN-SENT), udp_connect, udp_sendto (unconnected, one datagram).
Prints one JSON line: ``{"pid": ..., "sockets": [{"op", "local", "remote"}]}``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from typing import Any


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _accept_forever(listener: socket.socket, held: list[socket.socket]) -> None:
    while True:
        conn, _ = listener.accept()
        held.append(conn)


def open_socket(op: str, host: str, port: int, held: list[socket.socket]) -> dict[str, Any]:
    remote: Any = None
    if op in ("tcp_listen", "tcp_listen_unaccepted"):
        sock = socket.create_server((host, port), family=_family(host), dualstack_ipv6=host == "::", backlog=64)
        if op == "tcp_listen":
            threading.Thread(target=_accept_forever, args=(sock, held), daemon=True).start()
    elif op == "udp_bind":
        sock = socket.socket(_family(host), socket.SOCK_DGRAM)
        if host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
    elif op in ("tcp_connect", "tcp_connect_unaccepted", "tcp_connect_pending"):
        sock = socket.socket(_family(host), socket.SOCK_STREAM)
        if op != "tcp_connect_pending":
            sock.settimeout(10)
            sock.connect((host, port))
        else:
            sock.setblocking(False)
            assert sock.connect_ex((host, port)) in (0, 115)  # EINPROGRESS
        remote = [host, port]
    elif op == "udp_connect":
        sock = socket.socket(_family(host), socket.SOCK_DGRAM)
        sock.connect((host, port))
        remote = [host, port]
    elif op == "udp_sendto":
        sock = socket.socket(_family(host), socket.SOCK_DGRAM)
        sock.sendto(b"hello", (host, port))
        remote = [host, port]
    else:
        raise SystemExit(f"unknown op {op!r}")
    held.append(sock)
    local = sock.getsockname()
    return {"op": op, "local": [local[0], local[1]], "remote": remote}


def main(specs: list[str]) -> None:
    held: list[socket.socket] = []
    sockets = []
    for spec in specs:
        op, host, port = spec.split(",")
        sockets.append(open_socket(op, host, int(port), held))
    sys.stdout.write(json.dumps({"pid": os.getpid(), "sockets": sockets}) + "\n")
    sys.stdout.flush()
    sys.stdin.read()


if __name__ == "__main__":
    main(sys.argv[1:])
