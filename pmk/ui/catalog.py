"""What each ``get_stats`` key is: counter or gauge, which group, what it means.

One table for ``pmk stats``, ``pmk top`` and the Prometheus exporter, so that
a key is a counter (rates, ``_total``) or a gauge in all of them alike. Keys
the table does not know (a newer server, a backend's own counters) are shown
under "other" and exported as untyped: no rate is guessed for them.
No rich import here: the server's metrics exporter uses this module.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class Kind(enum.StrEnum):
    COUNTER = "counter"  # only grows while the server runs: a rate makes sense
    GAUGE = "gauge"  # a level right now
    UNTYPED = "untyped"  # a number the table does not know


class StatGroup(enum.StrEnum):
    PACKETS = "packets"
    CACHE = "cache"
    REQUESTS = "requests"
    CLIENTS = "clients"
    POLICY = "policy"
    BACKEND = "backend"
    SERVER = "server"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Stat:
    """One ``get_stats`` key as the views and the exporter treat it."""

    key: str
    kind: Kind
    group: StatGroup
    help: str
    #: For a key whose value is a map (``policy_hits``): the label its keys become.
    label: str = ""
    #: Unit suffix of the exported metric name (``seconds``), empty for plain counts.
    unit: str = ""


C, G = Kind.COUNTER, Kind.GAUGE
_P, _K, _R, _CL, _PO, _B, _S = (
    StatGroup.PACKETS,
    StatGroup.CACHE,
    StatGroup.REQUESTS,
    StatGroup.CLIENTS,
    StatGroup.POLICY,
    StatGroup.BACKEND,
    StatGroup.SERVER,
)

#: Every key pmk's server is known to report (protocol/SPEC.md, get_stats), in display order.
STATS: tuple[Stat, ...] = (
    Stat("captured", C, _P, "packets intercepted"),
    Stat("accepted", C, _P, "packets accepted"),
    Stat("blocked", C, _P, "packets rejected actively (TCP RST or ICMP unreachable)"),
    Stat("dropped", C, _P, "packets discarded silently"),
    Stat("rerouted", C, _P, "packets sent to a reroute or redirect target"),
    Stat("evicted", C, _P, "held packets discarded because the packet cache was full"),
    Stat("pending", G, _P, "packets held right now"),
    Stat("unparsed", C, _P, "captured packets pmk could not parse"),
    Stat("bypassed", C, _P, "packets that escaped the verdict"),
    Stat("preaccepted", C, _P, "connections open before capture started, entered as accepted"),
    Stat("cache_hits", C, _K, "packets answered from the verdict cache"),
    Stat("cache_misses", C, _K, "packets not found in the verdict cache"),
    Stat("verdict_cache_entries", G, _K, "connections with a cached verdict"),
    Stat("verdict_cache_evictions", C, _K, "cached verdicts evicted to make room"),
    Stat("connections_new", C, _R, "decisions that are connection_new events (not cache hits)"),
    Stat("attribution_errors", C, _R, "owner lookups that failed (pid, process, uid left nil)"),
    Stat("requests", C, _R, "decide requests made (one per connection)"),
    Stat("timeouts", C, _R, "decide requests that got no answer in time"),
    Stat("withdrawn", C, _R, "decide requests withdrawn"),
    Stat("late_verdicts", C, _R, "answers that came after their request was settled"),
    Stat("in_flight", G, _R, "decide requests awaiting an answer"),
    Stat("waiting_for_decider", G, _R, "asks not yet sent: every decider is at its limit"),
    Stat("withdrawn_in_flight", G, _R, "withdrawn requests still holding a decider's slot"),
    Stat("deciders", G, _CL, "connected deciders"),
    Stat("clients", G, _CL, "connected clients"),
    Stat("protocol_errors", C, _CL, "bad messages received from clients"),
    Stat("refused_clients", C, _CL, "peers refused at connect"),
    Stat("slow_clients", C, _CL, "clients cut off for not reading"),
    Stat("defaulted", C, _PO, "outcomes that came from the default verdict or policy"),
    Stat("policy_hits", C, _PO, "connections settled by a policy rule", label="rule"),
    Stat("rules_restored", C, _B, "times the kernel rules were found missing and put back"),
    Stat("rules_check_errors", C, _B, "rules watchdog checks that iptables could not answer"),
    Stat("fail_open", G, _B, "1 when the kernel passes packets pmk does not read (nfqueue)"),
    Stat("received", C, _B, "packets read from the kernel queue"),
    Stat("conntrack_events", C, _B, "ends of decided connections read from conntrack (nfqueue)"),
    Stat("conntrack_events_lost", C, _B, "conntrack event buffer overflows: some ends were not seen"),
    Stat("batches", C, _B, "reads from the kernel queue"),
    Stat("verdict_errors", C, _B, "verdicts the kernel refused"),
    Stat("verdict_sends", C, _B, "datagrams that carried verdicts to the kernel, many each (nfqueue)"),
    Stat("flows_created", C, _B, "kernel flow entries made for permanent non-accept verdicts"),
    Stat("flow_errors", C, _B, "kernel flow entries that could not be made"),
    Stat("nat_errors", C, _B, "reroutes blocked because their NAT target could not be installed (nfqueue)"),
    Stat("enobufs", C, _B, "netlink receive overruns (the kernel dropped packets)"),
    Stat("kernel_queue_len", G, _B, "packets waiting in the kernel queue"),
    Stat("kernel_queue_dropped", C, _B, "packets the kernel dropped: queue full"),
    Stat("kernel_user_dropped", C, _B, "packets the kernel dropped: netlink buffer full"),
    Stat("send_errors", C, _B, "packets the divert driver failed to re-inject"),
    Stat("rejects_sent", C, _B, "TCP RST or ICMP unreachable packets sent for block"),
    Stat("cached_batches", C, _B, "divert receives answered wholly from the cache"),
    Stat("other_batches", C, _B, "divert receives with anything else"),
    Stat("offloaded_checksums", C, _B, "re-injected TCP aggregates the kernel checksummed, not the divert library"),
    Stat("replay_frames", C, _B, "frames read from the capture file (pmk replay)"),
    Stat("replay_not_ip", C, _B, "frames skipped: not IP, or unreadable (pmk replay)"),
    Stat("replay_not_local", C, _B, "packets skipped: neither side is --local (pmk replay)"),
    Stat("replay_written", C, _B, "accepted frames written to --write-accepted (pmk replay)"),
    Stat("redirects", G, _B, "rerouted connections pmk rewrites itself (divert)"),
    Stat("uptime", G, _S, "seconds since the server started", unit="seconds"),
)

_BY_KEY: dict[str, Stat] = {stat.key: stat for stat in STATS}
#: Families of keys named by prefix: (prefix, kind, group, help with {} for the rest of the key).
_PREFIXES: tuple[tuple[str, Kind, StatGroup, str], ...] = (
    ("default_", C, _PO, "requests given the default verdict because: {}"),
    ("divert_", C, _B, "divert driver counter {}"),
    ("nfqueue_", C, _B, "nfqueue backend's own count of {}"),
)
#: Keys that are not numbers: shown as text, exported as labels of an info metric.
TEXT_KEYS = ("backend",)
#: Keys that hold lists, shown in a section of their own (connected clients).
CLIENT_LIST_KEYS = ("client_list", "clients")


def describe(key: str) -> Stat:
    """The table's entry for ``key``; keys it does not know come back untyped, in "other"."""
    stat = _BY_KEY.get(key)
    if stat is not None:
        return stat
    for prefix, kind, group, text in _PREFIXES:
        if key.startswith(prefix):
            return Stat(key, kind, group, text.format(key[len(prefix) :]))
    return Stat(key, Kind.UNTYPED, StatGroup.OTHER, f"{key} (not described by this pmk)")


def numbers(stats: Mapping[str, Any]) -> dict[str, float]:
    """The plain numeric keys of a snapshot (bools, text, lists and maps left out)."""
    return {
        key: value for key, value in stats.items() if isinstance(value, int | float) and not isinstance(value, bool)
    }


def client_list(stats: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The connected clients' details, when the server reports them (else empty)."""
    for key in CLIENT_LIST_KEYS:
        value = stats.get(key)
        if isinstance(value, list):
            return [entry for entry in value if isinstance(entry, dict)]
    return []


def rates(current: Mapping[str, Any], previous: Mapping[str, Any] | None, seconds: float) -> dict[str, float]:
    """Per-second change of every counter present in both snapshots.

    A counter that went down means the server restarted: its rate is left out
    rather than shown negative.
    """
    if previous is None or seconds <= 0:
        return {}
    before = numbers(previous)
    out: dict[str, float] = {}
    for key, value in numbers(current).items():
        if describe(key).kind is Kind.COUNTER and key in before and value >= before[key]:
            out[key] = (value - before[key]) / seconds
    return out


#: Fields of one ``client_list`` entry that are numbers, as the views and the exporter treat them.
#: The latency fields are milliseconds over the decider's recent answers (absent or None
#: before its first answer).
CLIENT_FIELDS: tuple[Stat, ...] = (
    Stat("in_flight", G, _CL, "decide requests awaiting this client's answer"),
    Stat("answered", C, _CL, "decide requests this client answered"),
    Stat("timeouts", C, _CL, "decide requests this client let time out"),
    Stat("latency_p50_ms", G, _CL, "median answer time of this decider, milliseconds"),
    Stat("latency_p99_ms", G, _CL, "99th percentile answer time of this decider, milliseconds"),
)
