"""The ``decide`` request's description of a held packet, built in this one place."""

from __future__ import annotations

from typing import Any

from pmk.core.packet_cache import HeldPacket
from pmk.verdicts import ip_text

#: (IP version, protocol number) of ICMP and ICMPv6, whose infos carry type and code.
_ICMP = frozenset({(4, 1), (6, 58)})


def decide_info(held: HeldPacket, timeout_ms: int | None = None) -> dict[str, Any]:
    """The info map of protocol/SPEC.md 5.1, without ``payload`` (added per decider).

    Built once per sent request; ``timeout_ms`` is left out for a packet that
    was never sent to a decider (the same map then describes a policy decision).
    """
    packet, key, flow, owner = held.packet, held.key, held.packet.flow, held.owner
    assert flow is not None  # parsed when the packet was held
    info: dict[str, Any] = {
        "id": held.id,
        "direction": "outbound" if packet.outbound else "inbound",
        "ip_version": flow.ip_version,
        "protocol": key.protocol,
        "local_ip": ip_text(key.local_ip),
        "local_port": key.local_port,
        "remote_ip": ip_text(key.remote_ip),
        "remote_port": key.remote_port,
        "interface": packet.if_index,
        "sub_interface": packet.sub_if_index,
        "size": len(packet.raw),
        "pid": None if owner is None else owner.pid,
        "process": None if owner is None else owner.process,
        "uid": None if owner is None else owner.uid,
    }
    offset = flow.transport_offset
    if (flow.ip_version, key.protocol) in _ICMP and offset >= 0 and offset + 2 <= len(packet.raw):
        info["icmp_type"] = packet.raw[offset]
        info["icmp_code"] = packet.raw[offset + 1]
    if timeout_ms is not None:
        info["timeout_ms"] = timeout_ms
    return info
