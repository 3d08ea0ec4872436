"""Traffic endpoints for the end-to-end tests, run inside a namespace as a script.

Two modes, both speaking JSON lines so the test side (``tests/harness.py``)
can drive them without timing guesses:

``peer SPEC...``
    Listeners (``tcp:PORT``, ``udp:PORT``) on both address families. TCP
    echoes every byte back; UDP echoes every datagram. Each arrival is
    reported on stdout as an event, so a test can tell what really reached
    the host behind pmk. Prints ``{"ready": true}`` once listening.

``session``
    Reads one command a line on stdin, answers one line on stdout. Sockets
    are named by the caller's ``id``; see ``Session`` for the commands.
    Errors come back as errno names (``ECONNREFUSED``) or ``timeout``.

Only the standard library is used: this runs under ``ip netns exec``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import socket
import struct
import sys
import threading
from typing import Any

_print_lock = threading.Lock()


def emit(obj: dict[str, Any]) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def payload(seed: str, size: int) -> bytes:
    """Deterministic bytes both sides can rebuild: a SHA-256 counter stream."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def error_name(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timeout"
    code = getattr(exc, "errno", None)
    if code:
        return errno.errorcode.get(code, str(code))
    return type(exc).__name__


def _plain(address: str) -> str:
    """``::ffff:198.18.0.1`` (a v4 peer on a dual-stack socket) -> ``198.18.0.1``."""
    return address[7:] if address.startswith("::ffff:") else address


# ----------------------------------------------------------------------------
# peer


def _tcp_echo(conn: socket.socket, port: int, peer: tuple[Any, ...]) -> None:
    total = 0
    with conn:
        conn.settimeout(120)
        with contextlib.suppress(OSError):
            while data := conn.recv(262144):
                total += len(data)
                conn.sendall(data)
    emit({"ev": "tcp_closed", "port": port, "peer": [_plain(peer[0]), peer[1]], "bytes": total})


def _tcp_listen(port: int) -> socket.socket:
    return socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=64)


def _tcp_serve(lsock: socket.socket, port: int) -> None:
    while True:
        conn, peer = lsock.accept()
        emit({"ev": "tcp_accept", "port": port, "peer": [_plain(peer[0]), peer[1]]})
        threading.Thread(target=_tcp_echo, args=(conn, port, peer), daemon=True).start()


def _udp_listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    return sock


def _udp_serve(sock: socket.socket, port: int) -> None:
    while True:
        data, peer = sock.recvfrom(65535)
        emit({"ev": "udp", "port": port, "peer": [_plain(peer[0]), peer[1]], "data": data.decode("latin-1")})
        with contextlib.suppress(OSError):
            sock.sendto(data, peer)


def peer_main(specs: list[str]) -> None:
    # Bind everything before saying ready, so no test packet finds a closed port.
    workers = []
    for spec in specs:
        proto, port_text = spec.split(":")
        port = int(port_text)
        if proto == "tcp":
            workers.append((_tcp_serve, _tcp_listen(port), port))
        elif proto == "udp":
            workers.append((_udp_serve, _udp_listen(port), port))
        else:
            raise SystemExit(f"unknown listener {spec!r}")
    for target, sock, port in workers:
        threading.Thread(target=target, args=(sock, port), daemon=True).start()
    emit({"ready": True})
    sys.stdin.read()  # until the test closes our stdin


# ----------------------------------------------------------------------------
# session


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class Session:
    """The command interpreter; each ``op_*`` method is one command."""

    def __init__(self) -> None:
        self.socks: dict[str, socket.socket] = {}

    def op_tcp_connect(self, id: str, host: str, port: int, timeout: float, bind_port: int = 0) -> dict[str, Any]:
        sock = socket.socket(_family(host), socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            if bind_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("", bind_port))
            sock.connect((host, port))
        except OSError:
            sock.close()
            raise
        self.socks[id] = sock
        peer = sock.getpeername()
        return {"ok": True, "local_port": sock.getsockname()[1], "peer": [_plain(peer[0]), peer[1]]}

    def op_udp_query(self, host: str, port: int, data: str, timeout: float) -> dict[str, Any]:
        """One datagram from an unconnected socket and the answer, with where the answer came from."""
        with socket.socket(_family(host), socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.sendto(data.encode("latin-1"), (host, port))
            answer, source = sock.recvfrom(65535)
            return {"data": answer.decode("latin-1"), "from": [_plain(source[0]), source[1]]}

    def op_udp_open(self, id: str, host: str, port: int) -> dict[str, Any]:
        sock = socket.socket(_family(host), socket.SOCK_DGRAM)
        sock.connect((host, port))
        self.socks[id] = sock
        return {"ok": True, "local_port": sock.getsockname()[1]}

    def op_send(self, id: str, data: str) -> dict[str, Any]:
        sock = self.socks[id]
        if sock.type == socket.SOCK_DGRAM:
            sock.send(data.encode("latin-1"))
        else:
            sock.sendall(data.encode("latin-1"))
        return {"ok": True}

    def op_recv(self, id: str, size: int, timeout: float) -> dict[str, Any]:
        """One datagram, or TCP bytes until ``size`` arrived or the stream ended."""
        sock = self.socks[id]
        sock.settimeout(timeout)
        if sock.type == socket.SOCK_DGRAM:
            return {"data": sock.recv(65535).decode("latin-1")}
        got = b""
        while len(got) < size:
            chunk = sock.recv(size - len(got))
            if not chunk:
                return {"data": got.decode("latin-1"), "eof": True}
            got += chunk
        return {"data": got.decode("latin-1")}

    def op_ping(self, id: str, data: str, timeout: float) -> dict[str, Any]:
        self.op_send(id, data)
        return self.op_recv(id, len(data.encode("latin-1")), timeout)

    def op_udp_burst(self, host: str, port: int, count: int, data: str) -> dict[str, Any]:
        """One datagram from each of ``count`` new sockets: as many new connections (source ports)."""
        socks = [socket.socket(_family(host), socket.SOCK_DGRAM) for _ in range(count)]
        try:  # all open at once, so no source port is used twice
            for sock in socks:
                sock.sendto(data.encode("latin-1"), (host, port))
            ports = {sock.getsockname()[1] for sock in socks}
        finally:
            for sock in socks:
                sock.close()
        return {"ok": True, "source_ports": len(ports)}

    def op_close(self, id: str, reset: bool = False) -> dict[str, Any]:
        sock = self.socks.pop(id)
        if reset:  # SO_LINGER with 0 seconds: close sends a RST
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        return {"ok": True}

    def op_transfer(self, host: str, port: int, size: int, seed: str, timeout: float) -> dict[str, Any]:
        """Send ``size`` payload bytes over a new TCP connection, read the echo alongside."""
        data = payload(seed, size)
        sock = socket.socket(_family(host), socket.SOCK_STREAM)
        sock.settimeout(timeout)
        received = hashlib.sha256()
        count = [0]
        failure: list[str] = []

        def reader() -> None:
            try:
                while chunk := sock.recv(262144):
                    received.update(chunk)
                    count[0] += len(chunk)
            except OSError as exc:
                failure.append(error_name(exc))

        with sock:
            sock.connect((host, port))
            local_port = sock.getsockname()[1]
            thread = threading.Thread(target=reader, daemon=True)
            thread.start()
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            thread.join()
        out: dict[str, Any] = {
            "local_port": local_port,
            "sent": len(data),
            "received": count[0],
            "sha256": received.hexdigest(),
        }
        if failure:
            out["error"] = failure[0]
        return out

    def handle(self, line: str) -> dict[str, Any]:
        command = json.loads(line)
        op = getattr(self, f"op_{command.pop('op')}")
        try:
            return op(**command)
        except OSError as exc:
            return {"error": error_name(exc)}


def session_main() -> None:
    session = Session()
    emit({"ready": True})
    for line in sys.stdin:
        if line.strip():
            emit(session.handle(line))


if __name__ == "__main__":
    if sys.argv[1] == "peer":
        peer_main(sys.argv[2:])
    elif sys.argv[1] == "session":
        session_main()
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
