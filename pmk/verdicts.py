"""Verdicts and the connection key they are cached under."""

from __future__ import annotations

import enum
import ipaddress
import socket
from typing import NamedTuple


class Verdict(enum.StrEnum):
    """What happens to a packet; the value (and the str) is the wire spelling."""

    ACCEPT = "accept"
    BLOCK = "block"
    DROP = "drop"

    @classmethod
    def parse(cls, text: object) -> Verdict:
        """Return the verdict named by ``text``; raise ValueError for anything else."""
        if isinstance(text, str):
            try:
                return cls(text)
            except ValueError:
                pass
        raise ValueError(f"unknown verdict {text!r}")


class ConnKey(NamedTuple):
    """A connection as seen from this host: the same key for both directions.

    Addresses are packed bytes (4 or 16) so that the per-packet path never
    formats strings; ``conn_key_from_strings`` builds one from wire fields.
    """

    protocol: int
    local_ip: bytes
    local_port: int
    remote_ip: bytes
    remote_port: int


def conn_key_from_strings(protocol: int, local_ip: str, local_port: int, remote_ip: str, remote_port: int) -> ConnKey:
    """Build a key from textual addresses; raise ValueError if they are not IPs."""
    local = ipaddress.ip_address(local_ip)
    remote = ipaddress.ip_address(remote_ip)
    if local.version != remote.version:
        raise ValueError("local_ip and remote_ip are of different IP versions")
    return ConnKey(protocol, local.packed, local_port, remote.packed, remote_port)


def ip_text(packed: bytes) -> str:
    """Format a packed IPv4 or IPv6 address (inet_ntop: once per decide, ipaddress is slow)."""
    if len(packed) == 4:
        return socket.inet_ntop(socket.AF_INET, packed)
    if len(packed) == 16:
        return str(ipaddress.IPv6Address(packed))  # the same compressed spelling as before
    return str(ipaddress.ip_address(packed))
