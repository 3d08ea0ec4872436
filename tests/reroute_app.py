"""The application side of the reroute tests: local services on the targets, then its view of its peers.

Run inside the client namespace (``python -m tests.reroute_app``). It serves
a resolver on 127.0.0.1:5353 and [::1]:5353 and an upper-casing proxy on
127.0.0.1:8080, then, as the application, asks 198.18.0.2:53 and
[fd00:18::2]:53 three times each and sends 240 kB through 198.18.0.2:80, and
prints where every answer seemed to come from.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.netns import TwoHosts

REPO = Path(__file__).resolve().parent.parent


def run_app(hosts: TwoHosts) -> subprocess.CompletedProcess[str]:
    """Run ``main`` in the client namespace."""
    argv = hosts.exec_argv(hosts.client, "env", f"PYTHONPATH={REPO}", sys.executable, "-m", "tests.reroute_app")
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd=REPO)


def main() -> None:
    """Serve the targets, talk to the peers, print what the application saw as JSON."""

    def resolver(family: int, host: str) -> None:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((host, 5353))
        while True:
            data, peer = sock.recvfrom(2048)
            sock.sendto(b"answer:" + data, peer)

    def proxy() -> None:
        server = socket.create_server(("127.0.0.1", 8080))
        while True:
            conn, _ = server.accept()
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data.upper())

    for target, args in ((resolver, (socket.AF_INET, "127.0.0.1")), (resolver, (socket.AF_INET6, "::1")), (proxy, ())):
        threading.Thread(target=target, args=args, daemon=True).start()
    time.sleep(0.3)
    out: dict[str, object] = {}
    for name, family, peer in (
        ("udp4", socket.AF_INET, ("198.18.0.2", 53)),
        ("udp6", socket.AF_INET6, ("fd00:18::2", 53)),
    ):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.settimeout(5)
        answers = []
        for i in range(3):
            sock.sendto(b"q%d" % i, peer)
            data, source = sock.recvfrom(2048)
            answers.append([data.decode(), source[0], source[1]])
        out[name] = answers
    conn = socket.create_connection(("198.18.0.2", 80), timeout=5)
    out["tcp_peer"] = list(conn.getpeername())
    payload = b"hello proxy " * 20000
    conn.sendall(payload)
    conn.shutdown(socket.SHUT_WR)
    received = b""
    while data := conn.recv(65536):
        received += data
    out["tcp_ok"] = received == payload.upper()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
