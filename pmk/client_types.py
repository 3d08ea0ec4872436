"""What pmk sends its clients, as types (protocol/SPEC.md sections 4, 5 and 8).

These are TypedDicts over the decoded msgpack maps: a decider gets the
server's map itself, with no copying, and a type checker knows its keys.
Servers may add keys (SPEC 3); ``total=False`` marks the keys that are only
present in some messages.
"""

from __future__ import annotations

from typing import Literal, TypedDict

Direction = Literal["inbound", "outbound"]
Role = Literal["decider", "observer"]
#: Who made a decision (SPEC 5.6).
DecidedBy = Literal["decider", "policy", "cache", "existing", "operator"]
#: Why a connection ended (SPEC 8).
EndReason = Literal["closed", "idle", "destroyed"]


class Conn(TypedDict):
    """A connection as this host sees it: the same for both directions."""

    protocol: int
    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int


class _InfoKeys(Conn):
    id: int
    direction: Direction
    ip_version: int
    interface: int
    sub_interface: int
    size: int
    pid: int | None
    process: str | None
    uid: int | None
    timeout_ms: int


class DecideInfo(_InfoKeys, total=False):
    """The map of a ``decide`` request (SPEC 5.1)."""

    icmp_type: int
    icmp_code: int
    #: Only when the decider's hello asked for ``payload``.
    payload: bytes


class HelloResult(TypedDict, total=False):
    protocol: int
    version: str
    backend: str
    verdict_timeout: float
    verdicts: list[str]
    max_in_flight: int


class ConnectionNew(DecideInfo, total=False):
    """``connection_new``: a decision, sent to observers."""

    verdict: str
    permanent: bool
    by: DecidedBy
    name: str
    to: str


class ConnRecord(Conn, total=False):
    """One entry of ``list_connections``; ``connection_end`` adds ``reason``."""

    verdict: str
    by: DecidedBy
    name: str
    pid: int | None
    process: str | None
    uid: int | None
    packets_in: int
    packets_out: int
    bytes_in: int
    bytes_out: int
    age: float
    #: for a rerouted connection: where it goes, "ADDR:PORT"
    to: str


class ConnectionEnd(ConnRecord, total=False):
    reason: EndReason


class BandwidthEntry(Conn):
    """One connection's traffic since the previous ``bandwidth`` notification."""

    packets_in: int
    packets_out: int
    bytes_in: int
    bytes_out: int


class ConnectionList(TypedDict):
    total: int
    connections: list[ConnRecord]
