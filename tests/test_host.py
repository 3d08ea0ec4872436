"""pmk.host on real sockets in namespaces: the socket table at start and process attribution.

A client namespace holds a process running as ``nobody`` with outbound TCP
and UDP sockets; a server namespace holds a root process with a dual-stack
TCP listener (which accepts) and a dual-stack bound UDP socket. The lookups
run in the test process, in a thread moved into the namespace being read.
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pmk.core.attribution import Owner
from pmk.host.owner import OwnerLookup
from pmk.host.sockets import existing_connections
from pmk.verdicts import ConnKey, conn_key_from_strings
from tests.netns import TwoHosts, need_root_reason, two_hosts

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        need_root_reason() is not None and not os.environ.get("CI"),
        reason=f"{need_root_reason()}; host tests read sockets in network namespaces",
    ),
]

OWNER_SCRIPT = (Path(__file__).resolve().parent / "socket_owner.py").read_text()
PYTHON = os.path.realpath(sys.executable)
NOBODY = 65534
TCP_PORT, UDP_PORT, UNACCEPTED_PORT, CLOSED_PORT = 7201, 7202, 7203, 7299
UNREACHABLE = "198.18.0.77"  # on the client's link, nobody answers: a connect stays in SYN-SENT
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread that entered namespace ``ns`` (setns moves one thread only)."""
    libc = ctypes.CDLL(None, use_errno=True)
    results: queue.Queue[tuple[bool, Any]] = queue.Queue()

    def body() -> None:
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
            results.put((True, fn()))
        except BaseException as exc:
            results.put((False, exc))
        finally:
            os.close(fd)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    ok, value = results.get_nowait()
    if not ok:
        raise value
    return value


@dataclass
class OwnerProcess:
    proc: subprocess.Popen[str]
    pid: int
    sockets: list[dict[str, Any]]

    def local_port(self, op: str, host: str) -> int:
        [port] = [s["local"][1] for s in self.sockets if s["op"] == op and s["remote"] == [host, _port_of(op)]]
        return port


PORT_OF = {
    "tcp_connect": TCP_PORT,
    "tcp_connect_unaccepted": UNACCEPTED_PORT,
    "udp_connect": UDP_PORT,
    "udp_sendto": UDP_PORT,
    "tcp_connect_pending": 80,
}


def _port_of(op: str) -> int:
    return PORT_OF[op]


def start_owner(hosts: TwoHosts, ns: str, specs: list[str], user: int | None = None) -> OwnerProcess:
    argv = hosts.exec_argv(ns)
    if user is not None:
        argv += ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    argv += [PYTHON, "-c", OWNER_SCRIPT, *specs]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise AssertionError(f"socket owner {specs} exited with {proc.returncode}")
    report = json.loads(line)
    return OwnerProcess(proc, report["pid"], report["sockets"])


@dataclass
class Scene:
    hosts: TwoHosts
    server: OwnerProcess
    client: OwnerProcess
    client_lookup: OwnerLookup
    server_lookup: OwnerLookup


@pytest.fixture(scope="module")
def scene() -> Iterator[Scene]:
    with two_hosts() as hosts:
        owners: list[OwnerProcess] = []
        lookups: list[OwnerLookup] = []
        try:
            server = start_owner(
                hosts,
                hosts.server,
                [f"tcp_listen,::,{TCP_PORT}", f"udp_bind,::,{UDP_PORT}", f"tcp_listen_unaccepted,::,{UNACCEPTED_PORT}"],
            )
            owners.append(server)
            specs = [
                f"{op},{ip},{_port_of(op)}"
                for ip in (hosts.server_ip, hosts.server_ip6)
                for op in ("tcp_connect", "udp_connect", "udp_sendto")
            ]
            specs.append(f"tcp_connect_pending,{UNREACHABLE},80")
            specs.append(f"tcp_connect_unaccepted,{hosts.server_ip},{UNACCEPTED_PORT}")
            client = start_owner(hosts, hosts.client, specs, user=NOBODY)
            owners.append(client)
            lookups = [in_netns(ns, OwnerLookup) for ns in (hosts.client, hosts.server)]
            yield Scene(hosts, server, client, *lookups)
        finally:
            for lookup in lookups:
                lookup.close()
            for owner in owners:
                assert owner.proc.stdin is not None
                owner.proc.stdin.close()
                owner.proc.wait(10)
                if owner.proc.stdout is not None:
                    owner.proc.stdout.close()  # unclosed pipes are ResourceWarnings, and warnings are errors


def key(protocol: int, local: str, local_port: int, remote: str, remote_port: int) -> ConnKey:
    return conn_key_from_strings(protocol, local, local_port, remote, remote_port)


TCP, UDP = socket.IPPROTO_TCP, socket.IPPROTO_UDP


def client_ip(hosts: TwoHosts, server_ip: str) -> str:
    return hosts.client_ip if server_ip == hosts.server_ip else hosts.client_ip6


def server_ips(scene: Scene) -> list[str]:
    return [scene.hosts.server_ip, scene.hosts.server_ip6]


# ----------------------------------------------------------------------------
# existing_connections


def test_existing_connections_lists_connections_not_listeners(scene: Scene) -> None:
    hosts = scene.hosts
    client_keys = set(in_netns(hosts.client, existing_connections))
    server_keys = set(in_netns(hosts.server, existing_connections))

    expected_client = set()
    expected_server = set()
    for ip in server_ips(scene):
        mine = client_ip(hosts, ip)
        tcp_port = scene.client.local_port("tcp_connect", ip)
        udp_port = scene.client.local_port("udp_connect", ip)
        expected_client |= {key(TCP, mine, tcp_port, ip, TCP_PORT), key(UDP, mine, udp_port, ip, UDP_PORT)}
        # Accepted on a dual-stack listener: the IPv4 one comes back with an IPv4 key.
        expected_server.add(key(TCP, ip, TCP_PORT, mine, tcp_port))
    pending_port = scene.client.local_port("tcp_connect_pending", UNREACHABLE)
    expected_client.add(key(TCP, hosts.client_ip, pending_port, UNREACHABLE, 80))
    unaccepted_port = scene.client.local_port("tcp_connect_unaccepted", hosts.server_ip)
    expected_client.add(key(TCP, hosts.client_ip, unaccepted_port, hosts.server_ip, UNACCEPTED_PORT))
    expected_server.add(key(TCP, hosts.server_ip, UNACCEPTED_PORT, hosts.client_ip, unaccepted_port))

    assert client_keys == expected_client  # no unconnected sendto sockets
    assert server_keys == expected_server  # no listener, no bound UDP socket


def test_existing_connections_past_the_handshake_leave_out_connects_in_progress_and_udp(scene: Scene) -> None:
    hosts = scene.hosts
    everything = set(in_netns(hosts.client, existing_connections))
    done = set(in_netns(hosts.client, lambda: existing_connections(handshake_done=True)))
    pending = key(TCP, hosts.client_ip, scene.client.local_port("tcp_connect_pending", UNREACHABLE), UNREACHABLE, 80)
    assert pending in everything
    assert done == {k for k in everything if k.protocol == TCP} - {pending}


# ----------------------------------------------------------------------------
# OwnerLookup


def client_owner(scene: Scene) -> Owner:
    return Owner(scene.client.pid, PYTHON, NOBODY)


def server_owner(scene: Scene) -> Owner:
    return Owner(scene.server.pid, PYTHON, 0)


@pytest.mark.parametrize("op", ["tcp_connect", "udp_connect", "udp_sendto"])
@pytest.mark.parametrize("version", [4, 6])
def test_outbound_is_the_sending_process(scene: Scene, op: str, version: int) -> None:
    server_ip = server_ips(scene)[version == 6]
    protocol = TCP if op.startswith("tcp") else UDP
    local = client_ip(scene.hosts, server_ip)
    conn = key(protocol, local, scene.client.local_port(op, server_ip), server_ip, _port_of(op))
    assert scene.client_lookup.lookup(conn, outbound=True) == client_owner(scene)


def test_outbound_syn_sent_is_found(scene: Scene) -> None:
    port = scene.client.local_port("tcp_connect_pending", UNREACHABLE)
    conn = key(TCP, scene.hosts.client_ip, port, UNREACHABLE, 80)
    assert scene.client_lookup.lookup(conn, outbound=True) == client_owner(scene)


@pytest.mark.parametrize("op", ["tcp_connect", "udp_connect", "udp_sendto"])
@pytest.mark.parametrize("version", [4, 6])
def test_inbound_is_the_listening_process(scene: Scene, op: str, version: int) -> None:
    server_ip = server_ips(scene)[version == 6]
    protocol = TCP if op.startswith("tcp") else UDP
    remote = client_ip(scene.hosts, server_ip)
    conn = key(protocol, server_ip, _port_of(op), remote, scene.client.local_port(op, server_ip))
    assert scene.server_lookup.lookup(conn, outbound=False) == server_owner(scene)


@pytest.mark.parametrize("protocol", [TCP, UDP])
@pytest.mark.parametrize("version", [4, 6])
def test_new_inbound_connection_names_the_listener(scene: Scene, protocol: int, version: int) -> None:
    """A SYN (or first datagram) from a port no socket knows yet reaches the listener."""
    server_ip = server_ips(scene)[version == 6]
    port = TCP_PORT if protocol == TCP else UDP_PORT
    conn = key(protocol, server_ip, port, client_ip(scene.hosts, server_ip), 40999)
    assert scene.server_lookup.lookup(conn, outbound=False) == server_owner(scene)


def test_connection_not_yet_accepted_names_the_listener(scene: Scene) -> None:
    """Its socket has no file yet (inode 0): the process that will accept it owns it."""
    hosts = scene.hosts
    port = scene.client.local_port("tcp_connect_unaccepted", hosts.server_ip)
    conn = key(TCP, hosts.server_ip, UNACCEPTED_PORT, hosts.client_ip, port)
    assert scene.server_lookup.lookup(conn, outbound=False) == server_owner(scene)


@pytest.mark.parametrize("protocol", [TCP, UDP])
@pytest.mark.parametrize("version", [4, 6])
def test_closed_port_has_no_owner(scene: Scene, protocol: int, version: int) -> None:
    server_ip = server_ips(scene)[version == 6]
    conn = key(protocol, server_ip, CLOSED_PORT, client_ip(scene.hosts, server_ip), 40999)
    assert scene.server_lookup.lookup(conn, outbound=False) is None
    # The same ports from the other side: the client has no socket on them either.
    mirrored = key(protocol, client_ip(scene.hosts, server_ip), 40999, server_ip, CLOSED_PORT)
    assert scene.client_lookup.lookup(mirrored, outbound=True) is None
