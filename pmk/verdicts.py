"""Verdicts, redirect targets and the connection key verdicts are cached under."""

from __future__ import annotations

import enum
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import NamedTuple


class Verdict(enum.StrEnum):
    """What happens to a packet; the value (and the str) is the wire spelling."""

    ACCEPT = "accept"
    BLOCK = "block"
    DROP = "drop"
    #: The connection goes to the local resolver (``--nameserver``), replies come back as from the peer.
    REROUTE_TO_NAMESERVER = "reroute_to_nameserver"
    #: The same, to the local tunnel entry (``--tunnel``).
    REROUTE_TO_TUNNEL = "reroute_to_tunnel"
    #: The same, to the target the decider names (``"to": "ADDR:PORT"``).
    REDIRECT = "redirect"

    @classmethod
    def parse(cls, text: object, allowed: frozenset[Verdict] | None = None) -> Verdict:
        """Return the verdict named by ``text``; raise ValueError for anything else.

        ``allowed`` defaults to the filtering verdicts: reroutes need a target
        and a connection's first packet, so only a decide answer may give one.
        """
        allowed = FILTER_VERDICTS if allowed is None else allowed
        if isinstance(text, str):
            try:
                verdict = cls(text)
            except ValueError:
                pass
            else:
                if verdict in allowed:
                    return verdict
        raise ValueError(f"unknown verdict {text!r}")


#: Verdicts that decide a packet where it is going: the only ones outside a decide answer.
FILTER_VERDICTS = frozenset({Verdict.ACCEPT, Verdict.BLOCK, Verdict.DROP})
#: Verdicts that send the connection elsewhere; counted as the outcome ``rerouted``.
REROUTE_VERDICTS = frozenset({Verdict.REROUTE_TO_NAMESERVER, Verdict.REROUTE_TO_TUNNEL, Verdict.REDIRECT})
#: Everything a decider may answer.
DECIDE_VERDICTS = FILTER_VERDICTS | REROUTE_VERDICTS


class ConnKey(NamedTuple):
    """A connection as seen from this host: the same key for both directions.

    Addresses are packed bytes (4 or 16) so that the per-packet path never
    formats strings; ``conn_key_from_strings`` builds one from wire fields.

    The verdict cache keeps a key as its ``packed`` bytes, ``protocol |
    local_ip | remote_ip | local_port | remote_port`` (13 bytes for IPv4, 37
    for IPv6, ports big-endian): one small object per cached connection
    instead of this tuple of five (46 instead of about 210 bytes; see
    ``benchmarks/cache_memory.py``). The per-packet path builds that form
    straight from the packet (an outbound simple IPv4 packet's bytes 12-24
    are the addresses and ports in this order). The tuple stays what
    everything else handles: its fields read at C speed, per new connection.
    """

    protocol: int
    local_ip: bytes
    local_port: int
    remote_ip: bytes
    remote_port: int

    def packed(self) -> bytes:
        """The verdict cache's form of this key (see the class docstring)."""
        return KEY_PACKERS[len(self.local_ip)](
            self.protocol, self.local_ip, self.remote_ip, self.local_port, self.remote_port
        )

    @classmethod
    def of(cls, packed: bytes) -> ConnKey:
        """The key whose ``packed`` form is ``packed``."""
        protocol, local_ip, remote_ip, local_port, remote_port = _UNPACK[len(packed)](packed)
        return cls(protocol, local_ip, local_port, remote_ip, remote_port)


#: ConnKey.packed's layout: its packers by address length (the per-packet path uses them too), and back.
_LAYOUTS = (struct.Struct("!B4s4sHH"), struct.Struct("!B16s16sHH"))
KEY_PACKERS = {4: _LAYOUTS[0].pack, 16: _LAYOUTS[1].pack}
_UNPACK = {13: _LAYOUTS[0].unpack, 37: _LAYOUTS[1].unpack}


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


class Target(NamedTuple):
    """Where a rerouted connection goes: a packed address (4 or 16 bytes) and a port."""

    ip: bytes
    port: int

    @classmethod
    def parse(cls, text: object) -> Target:
        """Read ``"ADDR:PORT"`` or ``"[ADDR6]:PORT"``; raise ValueError for anything else."""
        if not isinstance(text, str):
            raise ValueError(f'a target must be a string "ADDR:PORT", not {text!r}')
        host, sep, port_text = text.rpartition(":")
        if not sep or not port_text.isdigit() or port_text != port_text.strip():
            raise ValueError(f"target {text!r} is not ADDR:PORT")
        if host.startswith("[") and host.endswith("]"):
            host, bracketed = host[1:-1], True
        else:
            bracketed = False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"target {text!r}: {host!r} is not an IP address") from None
        if address.version == 6 and not bracketed:
            raise ValueError(f"target {text!r}: write an IPv6 address as [ADDR]:PORT")
        if address.version == 4 and bracketed:
            raise ValueError(f"target {text!r}: only IPv6 addresses go in brackets")
        port = int(port_text)
        if not 0 < port <= 65535:
            raise ValueError(f"target {text!r}: port must be 1..65535")
        return cls(address.packed, port)

    def __str__(self) -> str:
        if len(self.ip) == 16:
            return f"[{ip_text(self.ip)}]:{self.port}"
        return f"{ip_text(self.ip)}:{self.port}"


@dataclass(frozen=True, slots=True)
class RerouteTargets:
    """The configured targets of the two reroute verdicts, at most one per IP version each."""

    nameservers: tuple[Target, ...] = ()
    tunnels: tuple[Target, ...] = ()

    def __post_init__(self) -> None:
        for name, targets in (("nameserver", self.nameservers), ("tunnel", self.tunnels)):
            versions = [len(t.ip) for t in targets]
            if len(versions) != len(set(versions)):
                raise ValueError(f"at most one {name} per IP version")

    def verdicts(self, redirect: bool = True) -> list[Verdict]:
        """The verdicts a server with these targets can carry out, for ``hello`` (SPEC 5.2).

        ``redirect``: whether the capture backend can rewrite at all.
        """
        available = [Verdict.ACCEPT, Verdict.BLOCK, Verdict.DROP]
        if redirect:
            if self.nameservers:
                available.append(Verdict.REROUTE_TO_NAMESERVER)
            if self.tunnels:
                available.append(Verdict.REROUTE_TO_TUNNEL)
            available.append(Verdict.REDIRECT)
        return available

    def resolve(self, verdict: Verdict, to: Target | None, ip_length: int) -> Target:
        """The target ``verdict`` sends a connection with ``ip_length``-byte addresses to.

        Raises ValueError when there is none (nothing configured for that IP
        version, or an explicit target of the other version): NAT cannot
        change a packet's IP version.
        """
        if verdict is Verdict.REDIRECT:
            if to is None:
                raise ValueError('redirect needs "to": "ADDR:PORT"')
            if len(to.ip) != ip_length:
                raise ValueError(f"redirect target {to} is not of the connection's IP version")
            return to
        if to is not None:
            raise ValueError(f'"to" goes only with redirect, not {verdict.value}')
        name, targets = (
            ("nameserver", self.nameservers) if verdict is Verdict.REROUTE_TO_NAMESERVER else ("tunnel", self.tunnels)
        )
        for target in targets:
            if len(target.ip) == ip_length:
                return target
        raise ValueError(f"{verdict.value}: no {name} for IPv{4 if ip_length == 4 else 6} is configured")


@dataclass(frozen=True, slots=True)
class Decision:
    """A decider's answer: the verdict, whether it holds for the connection, and a reroute's target."""

    verdict: Verdict
    permanent: bool
    target: Target | None = None


def parse_decision(result: object, targets: RerouteTargets, key: ConnKey, outbound: bool) -> Decision:
    """Check a ``decide`` result for the connection ``key``; raise ValueError saying what is wrong.

    A reroute applies to the whole connection (its addresses cannot change
    midway), so it is always permanent whatever ``permanent`` says, and only
    an outbound TCP or UDP connection can be rerouted.
    """
    if not isinstance(result, dict):
        raise ValueError("a decide result must be a map")
    verdict = Verdict.parse(result.get("verdict"), DECIDE_VERDICTS)
    permanent = result.get("permanent", False)
    if type(permanent) is not bool:
        raise ValueError("permanent must be a boolean")
    if verdict in FILTER_VERDICTS:
        if "to" in result:
            raise ValueError(f'"to" goes only with redirect, not {verdict.value}')
        return Decision(verdict, permanent)
    if key.protocol not in (6, 17) or not outbound:
        raise ValueError(f"{verdict.value} applies only to outbound TCP and UDP connections")
    to = Target.parse(result["to"]) if "to" in result else None
    return Decision(verdict, True, targets.resolve(verdict, to, len(key.local_ip)))
