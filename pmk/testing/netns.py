"""Throwaway hosts for packet tests: two network namespaces and a veth pair.

Every name carries a per-run suffix, and everything made is deleted on exit,
also when the test fails. Addresses come from 198.18.0.0/15 and fd00::/8 and
exist only inside these namespaces.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass


def need_root_reason() -> str | None:
    """Why namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (the ip command)"
    return None


def run(*argv: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout)


@dataclass(frozen=True)
class TwoHosts:
    """``client`` and ``server`` namespaces joined by one veth link."""

    client: str
    server: str
    client_if: str
    server_if: str
    client_ip: str = "198.18.0.1"
    server_ip: str = "198.18.0.2"
    client_ip6: str = "fd00:18::1"
    server_ip6: str = "fd00:18::2"

    def exec_argv(self, ns: str, *argv: str) -> list[str]:
        """Argv that runs ``argv`` inside namespace ``ns``."""
        return ["ip", "netns", "exec", ns, *argv]

    def sh(self, ns: str, *argv: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return run(*self.exec_argv(ns, *argv), check=check, timeout=timeout)


@contextlib.contextmanager
def two_hosts() -> Iterator[TwoHosts]:
    """Create the pair of hosts; delete both namespaces (and so the link) on exit."""
    tag = uuid.uuid4().hex[:6]
    hosts = TwoHosts(client=f"pmkc-{tag}", server=f"pmks-{tag}", client_if=f"pc{tag}", server_if=f"ps{tag}")
    made: list[str] = []
    try:
        for ns in (hosts.client, hosts.server):
            run("ip", "netns", "add", ns)
            made.append(ns)
        run("ip", "link", "add", hosts.client_if, "type", "veth", "peer", "name", hosts.server_if)
        run("ip", "link", "set", hosts.client_if, "netns", hosts.client)
        run("ip", "link", "set", hosts.server_if, "netns", hosts.server)
        for ns, ifname, ip4, ip6 in (
            (hosts.client, hosts.client_if, hosts.client_ip, hosts.client_ip6),
            (hosts.server, hosts.server_if, hosts.server_ip, hosts.server_ip6),
        ):
            run("ip", "-n", ns, "addr", "add", f"{ip4}/24", "dev", ifname)
            run("ip", "-n", ns, "addr", "add", f"{ip6}/64", "dev", ifname, "nodad")
            run("ip", "-n", ns, "link", "set", ifname, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        _pin_neighbours(hosts)
        yield hosts
    finally:
        for ns in made:
            run("ip", "netns", "del", ns, check=False)
        # A veth left in the root namespace (failure before the move) goes too.
        run("ip", "link", "del", hosts.client_if, check=False)


def _mac(ns: str, ifname: str) -> str:
    return run("ip", "-n", ns, "-br", "link", "show", "dev", ifname).stdout.split()[2]


def _pin_neighbours(hosts: TwoHosts) -> None:
    """Permanent ARP/NDP entries both ways, so that address resolution (and its
    three-second failure on a loaded machine) never enters a packet test."""
    client_mac = _mac(hosts.client, hosts.client_if)
    server_mac = _mac(hosts.server, hosts.server_if)
    for ns, ifname, peer_ips, peer_mac in (
        (hosts.client, hosts.client_if, (hosts.server_ip, hosts.server_ip6), server_mac),
        (hosts.server, hosts.server_if, (hosts.client_ip, hosts.client_ip6), client_mac),
    ):
        for ip in peer_ips:
            run("ip", "-n", ns, "neigh", "replace", ip, "lladdr", peer_mac, "dev", ifname, "nud", "permanent")
