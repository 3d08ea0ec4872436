"""Issue 10 items 1, 3 and 5 end to end: which process, payload inline, ICMP fields, observers.

pmk serves in the server namespace, so an *outbound* connection is one that a
process in the server namespace opens (a traffic session started there) to a
listener in the client namespace, and an *inbound* one reaches a listener in
the server namespace (the testbed's echo peer): ``decide`` must name that
process (its pid, executable and uid), for TCP and UDP over IPv4 and IPv6.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from pmk.client import Client
from tests.harness import BACKENDS, PYTHON, WAIT, Decision, Testbed, eventually, needs_root, netns, scope_args

pytestmark = [netns, needs_root, pytest.mark.parametrize("backend", BACKENDS)]

TCP, UDP = 7401, 7402


def process_of(pid: int) -> tuple[str, int]:
    """What the info must say about ``pid``: its executable's real path and its uid."""
    return os.path.realpath(f"/proc/{pid}/exe"), os.stat(f"/proc/{pid}").st_uid


def owner_fields(info: dict[str, Any]) -> tuple[Any, Any, Any]:
    return info["pid"], info["process"], info["uid"]


async def test_decide_names_the_process_of_the_local_socket(backend: str) -> None:
    async with Testbed(backend, [f"tcp:{TCP}", f"udp:{UDP}"]) as bed:
        decider = await bed.decider(lambda info: Decision("accept", permanent=True))
        hosts = bed.hosts
        remote = await bed.listen(hosts.client, [f"tcp:{TCP}", f"udp:{UDP}"])
        local = await bed.session(hosts.server)  # a process in pmk's namespace: its connections are outbound
        listener_pid, local_pid = bed.peer.proc.pid, local.proc.pid
        for server_ip, client_ip in ((hosts.server_ip, hosts.client_ip), (hosts.server_ip6, hosts.client_ip6)):
            family = 6 if ":" in server_ip else 4
            # Inbound: the listener in the server namespace owns the connection.
            tcp_in = await bed.client.tcp_connect(server_ip, TCP, id=f"tcp-in{family}")
            udp_in = await bed.client.udp_open(server_ip, UDP, id=f"udp-in{family}")
            assert (await bed.client.ping("in", id=f"udp-in{family}")) == {"data": "in"}
            # Outbound: the session in the server namespace opened it.
            tcp_out = await local.tcp_connect(client_ip, TCP, id=f"tcp-out{family}")
            udp_out = await local.udp_open(client_ip, UDP, id=f"udp-out{family}")
            assert (await local.ping("out", id=f"udp-out{family}")) == {"data": "out"}
            cases = (
                ("inbound", 6, tcp_in, listener_pid),
                ("inbound", 17, udp_in, listener_pid),
                ("outbound", 6, tcp_out, local_pid),
                ("outbound", 17, udp_out, local_pid),
            )
            for direction, protocol, opened, pid in cases:
                port_field = "remote_port" if direction == "inbound" else "local_port"
                [info] = decider.infos_for(protocol=protocol, ip_version=family, **{port_field: opened["local_port"]})
                assert info["direction"] == direction
                assert owner_fields(info) == (pid, *process_of(pid)), (direction, protocol, family, info)
                assert 0 < info["timeout_ms"] <= 2000
        await remote.settle(lambda: len(remote.accepts(TCP)) >= 2 and len(remote.udp(UDP)) >= 2, "two of each")
        assert len(remote.accepts(TCP)) == 2 and remote.udp(UDP) == ["out", "out"]
        stats = await bed.server.check_identity()
        assert stats["attribution_errors"] == 0


# Root sends one ICMP echo request over a raw socket (no ping binary needed) and waits for the reply.
_ECHO = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
sock.settimeout(float(sys.argv[2]))
body = bytes([8, 0, 0, 0, 0x12, 0x34, 0, 1]) + b"pmk-echo"
total = sum(int.from_bytes(body[i:i + 2], "big") for i in range(0, len(body), 2))
total = (total & 0xFFFF) + (total >> 16)
checksum = ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF
sock.sendto(body[:2] + checksum.to_bytes(2, "big") + body[4:], (sys.argv[1], 0))
reply = sock.recv(1500)
print(reply[(reply[0] & 15) * 4])
"""


async def test_observers_payload_deciders_and_icmp(backend: str) -> None:
    ports = [f"tcp:{TCP}", f"udp:{UDP}"]
    scope = scope_args(backend, ports)
    # The testbed's scope, plus ICMP.
    scope[-1] = f"{scope[-1]},icmp" if backend == "nfqueue" else f"{scope[-1]} or icmp"
    async with Testbed(backend, ports, start_pmk=False) as bed:
        await bed.start_pmk(scope)
        path = bed.server.path
        infos: list[dict[str, Any]] = []

        def decide(info: dict[str, Any]) -> Decision:
            infos.append(info)
            return Decision("accept", permanent=True)

        decider = await Client.connect(path, decide)
        hello = await decider.hello("e2e-judge", "decider", payload=True)
        # Both backends can redirect; no --nameserver or --tunnel was given.
        assert hello["verdicts"] == ["accept", "block", "drop", "redirect"] and hello["verdict_timeout"] == 2.0
        events: list[dict[str, Any]] = []
        observer = await Client.connect(path)
        observer.on_notification = lambda n: events.append(n.params[0]) if n.method == "connection_new" else None
        await observer.hello("e2e-observer", "observer")
        try:
            hosts = bed.hosts
            opened = await bed.client.udp_open(hosts.server_ip, UDP, id="u")
            assert (await bed.client.ping("inspect-this-datagram", id="u")) == {"data": "inspect-this-datagram"}
            [info] = [i for i in infos if i["protocol"] == 17 and i["remote_port"] == opened["local_port"]]
            payload = info["payload"]
            assert isinstance(payload, bytes) and len(payload) == info["size"]
            assert payload[0] >> 4 == 4 and payload.endswith(b"inspect-this-datagram")
            # The observer heard of it, with who decided, and without the bytes.
            await eventually(lambda: any(e.get("id") == info["id"] for e in events), "connection_new for the datagram")
            [event] = [e for e in events if e.get("id") == info["id"]]
            assert (event["by"], event["name"], event["verdict"], event["permanent"]) == (
                "decider",
                "e2e-judge",
                "accept",
                True,
            )
            assert "payload" not in event and event["pid"] == bed.peer.proc.pid

            reply = await asyncio.to_thread(hosts.sh, hosts.client, PYTHON, "-c", _ECHO, hosts.server_ip, str(WAIT))
            assert reply.stdout.strip() == "0", reply  # an echo reply came back
            [echo] = [i for i in infos if i["protocol"] == 1]
            assert (echo["icmp_type"], echo["icmp_code"], echo["direction"]) == (8, 0, "inbound")
            assert echo["pid"] is None  # the kernel answers pings: no socket owns them
            stats = await bed.server.stats()
            assert stats["connections_new"] >= 2
            names = {entry["name"]: entry for entry in stats["client_list"]}
            assert names["e2e-judge"]["answered"] >= 2 and names["e2e-observer"]["role"] == "observer"
        finally:
            decider.close()
            observer.close()
