"""Settings for ``pmk serve``, with the defaults README.md explains."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from pmk.verdicts import Target, Verdict

POSIX_ENDPOINT = "/run/pmk/pmk.sock"
WINDOWS_ENDPOINT = r"\\.\pipe\pmk"
ENDPOINT_ENV = "PMK_PIPE"

# Held packets: the kernel extension pmk follows uses 1024 slots.
DEFAULT_PACKET_CACHE = 1024
# Cached connections: large, since a miss costs a decider round trip.
DEFAULT_VERDICT_CACHE = 65536
# Fail closed: an undecided packet is rejected (not silently dropped, so
# applications fail fast), and the verdict is never cached, so the
# connection is asked about again as soon as a decider answers.
DEFAULT_VERDICT = Verdict.BLOCK
# Long enough for a decider to look at a payload, short enough that a TCP
# handshake is not yet retried many times.
DEFAULT_VERDICT_TIMEOUT = 2.0
# Everything with ports or ICMP, but never loopback: pmk's own clients and
# local services keep working whatever the decider does.
DEFAULT_FILTER = "not loopback and (tcp or udp or icmp or icmpv6)"
# Divert: packets per receive. Small enough that decider answers get in
# between receives under a flood (255 let the packet cache evict nearly every
# asked packet before its answer came: benchmarks/README.md, the sweep).
DEFAULT_DIVERT_BATCH = 32
# eBPFDivert ring: with the library's 8 MiB a 65k/s flood made it pass
# packets unfiltered (ringbuf_full); 16 MiB passed none in the sweep. The
# ring is mapped into pmk, so it shows in RSS (about twice its size).
DEFAULT_RING_BYTES = 16 << 20
# Divert redirects: a rerouted connection is forgotten after this long without
# a packet (TCP: the kernel extension pmk follows cleans idle connections
# after 10 minutes; UDP has no end, so a DNS exchange is over much sooner),
# or this long after FINs went both ways (the last ACK and retransmissions).
REDIRECT_IDLE_TCP = 600.0
REDIRECT_IDLE_UDP = 60.0
REDIRECT_LINGER = 10.0


def default_endpoint() -> str:
    """The endpoint path: ``PMK_PIPE`` if set, else the platform default."""
    configured = os.environ.get(ENDPOINT_ENV)
    if configured:
        return configured
    return WINDOWS_ENDPOINT if sys.platform == "win32" else POSIX_ENDPOINT


@dataclass
class ServeConfig:
    """Everything ``pmk serve`` can be told."""

    endpoint: str = field(default_factory=default_endpoint)
    filter: str = DEFAULT_FILTER
    capture: str = "auto"
    packet_cache: int = DEFAULT_PACKET_CACHE
    verdict_cache: int = DEFAULT_VERDICT_CACHE
    default_verdict: Verdict = DEFAULT_VERDICT
    verdict_timeout: float = DEFAULT_VERDICT_TIMEOUT
    #: decide requests outstanding per decider before further asks wait (SPEC 5.3).
    max_in_flight: int = 256
    allow_uids: tuple[int, ...] = ()
    allow_gids: tuple[int, ...] = ()
    fail_open: bool = False
    queue_num: int = 0
    #: nfqueue: what to intercept, e.g. "tcp:443,udp:53,icmp"; empty means all.
    scope: str = ""
    queue_maxlen: int = 1024
    #: divert: packets per recv_ex/send_ex call (1..255).
    divert_batch: int = DEFAULT_DIVERT_BATCH
    #: divert: receives with anything but cache hits per wake-up of the event loop.
    divert_batches_per_wakeup: int = 1
    #: divert (eBPFDivert): ring buffer bytes; 0 keeps the library's default (8 MiB).
    divert_ring_bytes: int = DEFAULT_RING_BYTES
    #: divert: packets the driver queues for pmk; 0 keeps the library's default.
    divert_queue_len: int = 0
    #: reroute_to_nameserver targets (``--nameserver ADDR:PORT``), at most one per IP version.
    nameservers: tuple[Target, ...] = ()
    #: reroute_to_tunnel targets (``--tunnel ADDR:PORT``), at most one per IP version.
    tunnels: tuple[Target, ...] = ()
    #: "ADDR:PORT" to serve Prometheus metrics on; empty: none.
    metrics: str = ""
    #: Whether ``metrics`` may be a non-loopback address.
    metrics_public: bool = False
