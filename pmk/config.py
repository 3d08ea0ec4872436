"""Settings for ``pmk serve``: every default (docs/operators.md explains them) and the option table.

Each ``serve`` option is one row of ``OPTIONS``: its name, kind, default and
help. The flag (``--verdict-timeout``), the environment variable
(``PMK_VERDICT_TIMEOUT``) and the config file key (``verdict-timeout``) are
derived from the name, so the three ways to set an option cannot drift
apart; ``pmk/config_layers.py`` reads them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pmk.core.policy import Policy, default_only
from pmk.logs import FORMATS
from pmk.verdicts import FILTER_VERDICTS, Target, Verdict

POSIX_ENDPOINT = "/run/pmk/pmk.sock"
WINDOWS_ENDPOINT = r"\\.\pipe\pmk"
ENDPOINT_ENV = "PMK_PIPE"
#: The prefix of every environment variable that sets a ``serve`` option.
ENV_PREFIX = "PMK_"

# Held packets: the kernel extension pmk follows uses 1024 slots.
DEFAULT_PACKET_CACHE = 1024
# Cached connections: large, since a miss costs a decider round trip.
DEFAULT_VERDICT_CACHE = 65536
# Fail closed: an undecided packet is rejected (not silently dropped, so
# applications fail fast), and the verdict is never cached, so the
# connection is asked about again as soon as a decider answers. The shipped
# policy (pmk/policies/default.toml) ends in this default, with inbound SSH
# accepted before it.
DEFAULT_VERDICT = Verdict.BLOCK
# decide requests outstanding per decider (SPEC 5.3): enough pipelining to
# keep one decider busy (a round trip on a Unix socket is tens of
# microseconds), few enough that its backlog stays fresh.
DEFAULT_MAX_IN_FLIGHT = 256
# Divert: receives with anything but cache hits per wake-up of the event loop:
# one, so that a flood of new connections cannot starve decider sockets.
DEFAULT_DIVERT_BATCHES_PER_WAKEUP = 1
# Long enough for a decider to look at a payload, short enough that a TCP
# handshake is not yet retried many times.
DEFAULT_VERDICT_TIMEOUT = 2.0
# Everything with ports or ICMP, but never loopback: pmk's own clients and
# local services keep working whatever the decider does.
DEFAULT_FILTER = "not loopback and (tcp or udp or icmp or icmpv6)"
# nfqueue: kernel queue length. The kernel counts the packets pmk holds in
# it too, so at the packet cache's 1024 a burst found the queue full while
# pmk still kept up (2-3% dropped at 21k new connections/s). pmk reads no
# more than its packet cache has room for (``set_room``), so the rest is
# room for a burst to wait in the kernel, not a backlog that evicts.
DEFAULT_QUEUE_MAXLEN = 4096
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
# Also how long a connection's cached verdict outlives FINs both ways (divert).
REDIRECT_LINGER = 10.0
# Divert: a cached connection without a packet for this long has ended (its
# verdict goes, connection_end says "idle"). One value for every protocol:
# UDP and ICMP have no end but this, and 5 minutes covers the gaps of
# request/response and streaming flows (Linux keeps an answered UDP flow
# 120 s); a TCP connection quiet for longer is asked about again when it
# resumes, which costs one decide.
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_LOG_LEVEL = "info"
LOG_LEVELS = ("debug", "info", "warning", "error")
CAPTURES = ("auto", "divert", "nfqueue")


def platform_endpoint() -> str:
    """Where pmk listens unless told otherwise."""
    return WINDOWS_ENDPOINT if sys.platform == "win32" else POSIX_ENDPOINT


def default_endpoint() -> str:
    """The endpoint path: ``PMK_PIPE`` if set, else the platform default."""
    return os.environ.get(ENDPOINT_ENV) or platform_endpoint()


@dataclass
class ServeConfig:
    """Everything ``pmk serve`` can be told."""

    endpoint: str = field(default_factory=default_endpoint)
    filter: str = DEFAULT_FILTER
    capture: str = "auto"
    packet_cache: int = DEFAULT_PACKET_CACHE
    verdict_cache: int = DEFAULT_VERDICT_CACHE
    #: the policy's final default (the engine reads it until it applies ``policy`` itself)
    default_verdict: Verdict = DEFAULT_VERDICT
    #: what pmk decides when no decider does; the command line sets the shipped one
    policy: Policy = field(default_factory=lambda: default_only(DEFAULT_VERDICT))
    #: the file ``policy`` was read from and SIGHUP re-reads ("" when not from a file)
    policy_file: str = ""
    #: ask about the connections open at start instead of accepting them (off: a remote
    #: session that started pmk must survive its start, whatever the deciders do).
    decide_existing: bool = False
    verdict_timeout: float = DEFAULT_VERDICT_TIMEOUT
    #: divert: seconds without a packet after which a cached connection has ended.
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    #: decide requests outstanding per decider before further asks wait (SPEC 5.3).
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    allow_uids: tuple[int, ...] = ()
    allow_gids: tuple[int, ...] = ()
    fail_open: bool = False
    queue_num: int = 0
    #: nfqueue: what to intercept, e.g. "tcp:443,udp:53,icmp"; empty means all.
    scope: str = ""
    queue_maxlen: int = DEFAULT_QUEUE_MAXLEN
    #: divert: packets per recv_ex/send_ex call (1..255).
    divert_batch: int = DEFAULT_DIVERT_BATCH
    #: divert: receives with anything but cache hits per wake-up of the event loop.
    divert_batches_per_wakeup: int = DEFAULT_DIVERT_BATCHES_PER_WAKEUP
    #: divert (eBPFDivert): ring buffer bytes; 0 keeps the library's default (8 MiB).
    divert_ring_bytes: int = DEFAULT_RING_BYTES
    #: divert: packets the driver queues for pmk; 0 keeps the library's default.
    divert_queue_len: int = 0
    #: reroute_to_nameserver targets (``--nameserver ADDR:PORT``), at most one per IP version.
    nameservers: tuple[Target, ...] = ()
    #: reroute_to_tunnel targets (``--tunnel ADDR:PORT``), at most one per IP version.
    tunnels: tuple[Target, ...] = ()
    log_level: str = DEFAULT_LOG_LEVEL
    log_format: str = FORMATS[0]
    #: "ADDR:PORT" to serve Prometheus metrics on; empty: none.
    metrics: str = ""
    #: Whether ``metrics`` may be a non-loopback address.
    metrics_public: bool = False


# -- the option table -----------------------------------------------------------------------


class Kind:
    """How an option's value is read: from text (flag, environment) or from a TOML value."""

    def metavar(self) -> str:
        """How ``--help`` names the value."""
        return "VALUE"

    def from_text(self, text: str) -> Any:
        """Parse a flag or environment value; raise ValueError saying what is wrong."""
        return self.check(text)

    def from_toml(self, value: Any) -> Any:
        """Check a config file value; raise ValueError saying what is wrong."""
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not a string")
        return self.check(value)

    def check(self, value: Any) -> Any:
        return value


@dataclass(frozen=True)
class Integer(Kind):
    minimum: int = 0
    maximum: int | None = None

    def metavar(self) -> str:
        return "N"

    def from_text(self, text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
        return self.check(value)

    def from_toml(self, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{value!r} is not a whole number")
        return self.check(value)

    def check(self, value: int) -> int:
        if value < self.minimum:
            raise ValueError(f"{value} is less than {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"{value} is more than {self.maximum}")
        return value


@dataclass(frozen=True)
class Seconds(Kind):
    """A positive number of seconds."""

    def metavar(self) -> str:
        return "S"

    def from_text(self, text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
        return self.check(value)

    def from_toml(self, value: Any) -> float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number")
        return self.check(float(value))

    def check(self, value: float) -> float:
        if not value > 0 or value == float("inf"):
            raise ValueError(f"{value} is not a positive number of seconds")
        return value


@dataclass(frozen=True)
class Choice(Kind):
    choices: tuple[str, ...]

    def metavar(self) -> str:
        return "{" + ",".join(self.choices) + "}"

    def from_text(self, text: str) -> str:
        return self.check(text.strip().lower())

    def check(self, value: str) -> str:
        if value not in self.choices:
            raise ValueError(f"{value!r} is not one of {', '.join(self.choices)}")
        return value


@dataclass(frozen=True)
class Text(Kind):
    """Free text, optionally checked by ``validate`` (which raises ValueError or UsageError)."""

    label: str = "TEXT"
    validate: Callable[[str], object] | None = None

    def metavar(self) -> str:
        return self.label

    def check(self, value: str) -> str:
        if self.validate is not None and value:
            from pmk.errors import UsageError

            try:
                self.validate(value)
            except (ValueError, UsageError) as error:
                raise ValueError(str(error)) from None
        return value


@dataclass(frozen=True)
class Switch(Kind):
    """On or off: ``--x``/``--no-x``, ``PMK_X=1``/``0``, ``x = true``."""

    def from_text(self, text: str) -> bool:
        word = text.strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{text!r} is not one of 1, 0, true, false, yes, no, on, off")

    def from_toml(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"{value!r} is not true or false")
        return value


class Repeated(Kind):
    """A list: a repeated flag, a comma list in the environment, a TOML list (or one value)."""

    def one(self, text: str) -> Any:
        """Parse one item; raise ValueError saying what is wrong."""
        raise NotImplementedError

    def one_toml(self, value: Any) -> Any:
        raise NotImplementedError

    def from_text(self, text: str) -> tuple[Any, ...]:
        return self.check(tuple(self.one(item) for item in text.split(",") if item.strip()))

    def from_toml(self, value: Any) -> tuple[Any, ...]:
        return self.check(tuple(self.one_toml(item) for item in (value if isinstance(value, list) else [value])))


@dataclass(frozen=True)
class IdList(Repeated):
    """User or group ids."""

    def metavar(self) -> str:
        return "ID"

    def one(self, text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"{text.strip()!r} is not a numeric id") from None
        return self.one_toml(value)

    def one_toml(self, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{value!r} is not a numeric id")
        return value


@dataclass(frozen=True)
class Targets(Repeated):
    """Reroute targets ``ADDR:PORT`` / ``[ADDR6]:PORT``, at most one per IP version."""

    def metavar(self) -> str:
        return "ADDR:PORT"

    def one(self, text: str) -> Target:
        return Target.parse(text.strip())

    def one_toml(self, value: Any) -> Target:
        return Target.parse(value)

    def check(self, value: tuple[Target, ...]) -> tuple[Target, ...]:
        versions = [len(target.ip) for target in value]
        if len(versions) != len(set(versions)):
            raise ValueError(f"at most one target per IP version ({', '.join(map(str, value))})")
        return value


def _check_scope(text: str) -> object:
    from pmk.capture.netfilter_rules import parse_match  # the kernel backend owns the syntax

    return parse_match(text)


def _check_metrics(text: str) -> object:
    """The address's form; whether it may be non-loopback depends on metrics-public (config_layers)."""
    from pmk.errors import UsageError
    from pmk.metrics import parse_listen  # the metrics server owns the syntax

    try:
        return parse_listen(text, public=True)
    except UsageError as error:  # the caller names the flag, variable or file key itself
        raise ValueError(str(error).removeprefix("--metrics ")) from None


@dataclass(frozen=True)
class Option:
    """One ``serve`` option; flag, environment variable and file key derive from ``name``."""

    name: str  # as in the config file: "verdict-timeout"
    kind: Kind
    default: Any
    help: str
    #: the ServeConfig attribute it sets ("" when it is only read by the command line)
    attribute: str = ""
    #: an environment variable other than PMK_<NAME> (PMK_PIPE predates the table)
    env_name: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name

    @property
    def env(self) -> str:
        return self.env_name or ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


OPTIONS: tuple[Option, ...] = (
    Option(
        "pipe",
        Text("PATH"),
        platform_endpoint(),
        "the endpoint deciders connect to",
        "endpoint",
        ENDPOINT_ENV,
    ),
    Option("policy", Text("FILE"), "", "fallback policy file (default: the shipped policy)", "policy_file"),
    Option(
        "default-verdict",
        Choice(tuple(v.value for v in Verdict if v in FILTER_VERDICTS)),
        None,
        "shorthand for a policy with only this default (not with --policy)",
    ),
    Option(
        "decide-existing",
        Switch(),
        False,
        "ask about connections open at start instead of accepting them",
        "decide_existing",
    ),
    Option("capture", Choice(CAPTURES), "auto", "capture backend", "capture"),
    Option("filter", Text("FILTER"), DEFAULT_FILTER, "divert: WinDivert filter", "filter"),
    Option(
        "scope",
        Text("SCOPE", _check_scope),
        "",
        "nfqueue: what to intercept, e.g. 'tcp:443,udp:5000-5010,icmp' (default: all)",
        "scope",
    ),
    Option("packet-cache", Integer(1), DEFAULT_PACKET_CACHE, "held packets", "packet_cache"),
    Option("verdict-cache", Integer(1), DEFAULT_VERDICT_CACHE, "cached connections", "verdict_cache"),
    Option("verdict-timeout", Seconds(), DEFAULT_VERDICT_TIMEOUT, "how long a decider may take", "verdict_timeout"),
    Option(
        "idle-timeout",
        Seconds(),
        DEFAULT_IDLE_TIMEOUT,
        "divert: a connection without packets this long ended",
        "idle_timeout",
    ),
    Option("allow-uid", IdList(), (), "also admit this uid (repeatable)", "allow_uids"),
    Option("allow-group", IdList(), (), "also admit this gid (repeatable)", "allow_gids"),
    Option("fail-open", Switch(), False, "nfqueue: pass packets when pmk is not reading", "fail_open"),
    Option("queue-num", Integer(0, 65535), 0, "nfqueue: the queue number", "queue_num"),
    Option("queue-maxlen", Integer(1), DEFAULT_QUEUE_MAXLEN, "nfqueue: kernel queue length", "queue_maxlen"),
    Option("divert-batch", Integer(1, 255), DEFAULT_DIVERT_BATCH, "divert: packets per receive", "divert_batch"),
    Option(
        "divert-wakeup-batches",
        Integer(1),
        DEFAULT_DIVERT_BATCHES_PER_WAKEUP,
        "divert: receives per wake-up",
        "divert_batches_per_wakeup",
    ),
    Option(
        "ring-bytes",
        Integer(0),
        DEFAULT_RING_BYTES,
        "divert (Linux): eBPF ring, 0 = library default",
        "divert_ring_bytes",
    ),
    Option("divert-queue-len", Integer(0), 0, "divert: driver queue length, 0 = library default", "divert_queue_len"),
    Option(
        "nameserver", Targets(), (), "where reroute_to_nameserver goes, one per IP version (repeatable)", "nameservers"
    ),
    Option("tunnel", Targets(), (), "where reroute_to_tunnel goes, one per IP version (repeatable)", "tunnels"),
    Option("log-level", Choice(LOG_LEVELS), DEFAULT_LOG_LEVEL, "log threshold", "log_level"),
    Option("log-format", Choice(FORMATS), FORMATS[0], "json: one object per line", "log_format"),
    Option(
        "metrics",
        Text("ADDR:PORT", _check_metrics),
        "",
        "serve Prometheus metrics at http://ADDR:PORT/metrics (loopback only without --metrics-public)",
        "metrics",
    ),
    Option("metrics-public", Switch(), False, "allow --metrics on a non-loopback address", "metrics_public"),
)
