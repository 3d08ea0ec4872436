"""The ``decide`` request's description of a held packet, built in this one place."""

from __future__ import annotations

from typing import Any

from pmk.core.packet_cache import HeldPacket
from pmk.verdicts import ip_text


def decide_info(held: HeldPacket) -> dict[str, Any]:
    """The info map of protocol/SPEC.md, built once per asked packet."""
    packet, key, flow = held.packet, held.key, held.packet.flow
    assert flow is not None  # parsed when the packet was held
    return {
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
        "pid": None,
    }
