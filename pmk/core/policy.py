"""The fallback policy: what pmk decides itself when no decider settles a packet.

A policy is an ordered list of rules read from TOML; the first rule that
matches a connection gives the verdict, and a final ``default`` catches the
rest. Parsing checks the whole file and reports every mistake at once, each
with its place, so that an operator fixes a policy in one round.

Matching runs once per undecided connection, also under floods, so rules are
compiled to integers here (address ranges, port ranges, protocol sets) and
``decide`` never parses or formats text.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pmk.errors import UsageError
from pmk.verdicts import ConnKey, Verdict

#: Protocol names a rule may use besides a number 0-255.
PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}
#: Protocols whose connection key carries ports (TCP, UDP, SCTP, UDP-Lite).
PORT_PROTOCOLS = frozenset({6, 17, 132, 136})
DIRECTIONS = {"inbound": False, "outbound": True, "any": None}
RULE_FIELDS = frozenset(
    {"name", "verdict", "cache", "direction", "protocol", "local_net", "remote_net", "local_port", "remote_port"}
)
DEFAULT_FIELDS = frozenset({"verdict", "cache"})
#: The name the final default goes by in decisions and ``policy_hits``.
DEFAULT_RULE = "default"
#: The policy pmk ships, used when no ``--policy`` is given.
SHIPPED_POLICY = "default.toml"

# An inclusive integer range: an address range or a port range.
_Range = tuple[int, int]
# Reports a mistake in one field: add(field, message).
_Add = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    """The policy's answer for one connection."""

    verdict: Verdict
    #: whether the verdict is cached for the connection ("cache" in the TOML)
    permanent: bool
    #: the deciding rule's name, or "default"
    rule: str


@dataclass(frozen=True, slots=True)
class _Rule:
    """One compiled rule; ``None`` in a field means "any" (the v4 and v6 ranges are None together)."""

    decision: PolicyDecision
    outbound: bool | None
    protocols: frozenset[int] | None
    local_v4: tuple[_Range, ...] | None
    local_v6: tuple[_Range, ...] | None
    remote_v4: tuple[_Range, ...] | None
    remote_v6: tuple[_Range, ...] | None
    local_ports: tuple[_Range, ...] | None
    remote_ports: tuple[_Range, ...] | None

    def matches(self, key: ConnKey, outbound: bool, local: int, remote: int, v4: bool) -> bool:
        if self.outbound is not None and self.outbound is not outbound:
            return False
        if self.protocols is not None and key.protocol not in self.protocols:
            return False
        if self.local_v4 is not None and not _within(local, self.local_v4 if v4 else self.local_v6):
            return False
        if self.remote_v4 is not None and not _within(remote, self.remote_v4 if v4 else self.remote_v6):
            return False
        if self.local_ports is not None and not _within(key.local_port, self.local_ports):
            return False
        return self.remote_ports is None or _within(key.remote_port, self.remote_ports)


def _within(value: int, ranges: tuple[_Range, ...] | None) -> bool:
    if not ranges:
        return False
    return any(low <= value <= high for low, high in ranges)


class Policy:
    """Ordered rules and a default; ``decide`` is the hot path."""

    __slots__ = ("_rules", "default", "rule_names", "source")

    def __init__(self, rules: tuple[_Rule, ...], default: PolicyDecision, source: str) -> None:
        self._rules = rules
        self.default = default
        #: every rule's name in order, then "default": the keys of ``policy_hits``
        self.rule_names: tuple[str, ...] = (*(rule.decision.rule for rule in rules), DEFAULT_RULE)
        #: where the policy came from, for logs
        self.source = source

    def decide(self, key: ConnKey, outbound: bool) -> PolicyDecision:
        """The first matching rule's decision, else the default."""
        if self._rules:
            local = int.from_bytes(key.local_ip)
            remote = int.from_bytes(key.remote_ip)
            v4 = len(key.local_ip) == 4
            for rule in self._rules:
                if rule.matches(key, outbound, local, remote, v4):
                    return rule.decision
        return self.default

    def summary(self) -> str:
        """One line for logs and ``--check``."""
        default = self.default
        cached = "cached" if default.permanent else "not cached"
        return f"policy {self.source}: {len(self._rules)} rules, default {default.verdict.value} ({cached})"


def default_only(verdict: Verdict) -> Policy:
    """A policy with no rules, only a default that is never cached (``--default-verdict``)."""
    return Policy((), PolicyDecision(verdict, False, DEFAULT_RULE), f"--default-verdict {verdict.value}")


def load_policy(path: str | Path) -> Policy:
    """Read and parse a policy file; an unreadable file is a UsageError too."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read policy {path}: {_reason(error)}") from None
    return parse_policy(text, str(path))


def shipped_policy() -> Policy:
    """The policy pmk ships: inbound SSH accepted, everything else blocked (not cached)."""
    text = resources.files("pmk.policies").joinpath(SHIPPED_POLICY).read_text(encoding="utf-8")
    return parse_policy(text, f"shipped {SHIPPED_POLICY}")


def _reason(error: BaseException) -> str:
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)


def parse_policy(text: str, source: str) -> Policy:
    """Compile a policy from TOML text; raise UsageError with one line per mistake."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"{source}: not valid TOML: {error}") from None
    errors: list[str] = []
    for name in sorted(set(document) - {"rule", "default"}):
        errors.append(f"{source}: unknown table or key {name!r} (expected [[rule]] and [default])")
    raw_rules = document.get("rule", [])
    if not isinstance(raw_rules, list):
        errors.append(f"{source}: 'rule' must be an array of tables ([[rule]])")
        raw_rules = []
    rules: list[_Rule] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_rules, start=1):
        rule = _compile_rule(raw, _RuleErrors(errors, source, index, raw), seen)
        if rule is not None:
            rules.append(rule)
    default = _compile_default(document.get("default"), errors, source)
    if errors:
        raise UsageError("\n".join(errors))
    assert default is not None
    return Policy(tuple(rules), default, source)


class _RuleErrors:
    """Collects one rule's mistakes, each prefixed with file, rule number and name."""

    def __init__(self, errors: list[str], source: str, index: int, raw: Any) -> None:
        self.errors = errors
        name = raw.get("name") if isinstance(raw, dict) else None
        self.place = f"{source}: rule {index}" + (f" ({name})" if isinstance(name, str) and name else "")
        self.count = 0

    def add(self, field: str, message: str) -> None:
        self.errors.append(f"{self.place}: {field}: {message}" if field else f"{self.place}: {message}")
        self.count += 1


def _compile_rule(raw: Any, errors: _RuleErrors, seen: set[str]) -> _Rule | None:
    if not isinstance(raw, dict):
        errors.add("", "must be a table")
        return None
    for field in sorted(set(raw) - RULE_FIELDS):
        errors.add(field, f"unknown field (known: {', '.join(sorted(RULE_FIELDS))})")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        errors.add("name", "required, a non-empty string")
    elif name == DEFAULT_RULE:
        errors.add("name", f"{DEFAULT_RULE!r} is the final default's name")
    elif name in seen:
        errors.add("name", "used by an earlier rule")
    else:
        seen.add(name)
    verdict = _verdict(raw, errors.add, required=True)
    permanent = _cache(raw, errors.add)
    outbound = _direction(raw.get("direction", "any"), errors.add)
    protocols = _protocols(raw.get("protocol"), errors.add)
    local_v4, local_v6 = _networks(raw.get("local_net"), "local_net", errors.add)
    remote_v4, remote_v6 = _networks(raw.get("remote_net"), "remote_net", errors.add)
    local_ports = _ports(raw.get("local_port"), "local_port", errors.add)
    remote_ports = _ports(raw.get("remote_port"), "remote_port", errors.add)
    if (local_ports is not None or remote_ports is not None) and (protocols is None or not protocols <= PORT_PROTOCOLS):
        errors.add("protocol", "a rule with ports needs protocol tcp or udp (or a list of such)")
    if errors.count or verdict is None or not isinstance(name, str):
        return None
    return _Rule(
        PolicyDecision(verdict, permanent, name),
        outbound,
        protocols,
        local_v4,
        local_v6,
        remote_v4,
        remote_v6,
        local_ports,
        remote_ports,
    )


def _compile_default(raw: Any, errors: list[str], source: str) -> PolicyDecision | None:
    place = f"{source}: [default]"

    def add(field: str, message: str) -> None:
        errors.append(f"{place}: {field}: {message}")

    if raw is None:
        errors.append(f'{place}: missing; say what happens to the rest, e.g. verdict = "block"')
        return None
    if not isinstance(raw, dict):
        errors.append(f"{place}: must be a table")
        return None
    for field in sorted(set(raw) - DEFAULT_FIELDS):
        add(field, "unknown field (known: cache, verdict)")
    verdict = _verdict(raw, add, required=True)
    permanent = _cache(raw, add)
    return None if verdict is None else PolicyDecision(verdict, permanent, DEFAULT_RULE)


# -- fields (each reports through ``add(field, message)`` and returns None when bad) --


def _verdict(raw: dict[str, Any], add: _Add, required: bool) -> Verdict | None:
    if "verdict" not in raw:
        if required:
            add("verdict", "required: accept, block or drop")
        return None
    try:
        return Verdict.parse(raw["verdict"])
    except ValueError:
        add("verdict", f"{raw['verdict']!r} is not accept, block or drop")
        return None


def _cache(raw: dict[str, Any], add: _Add) -> bool:
    value = raw.get("cache", False)
    if not isinstance(value, bool):
        add("cache", f"{value!r} is not true or false")
        return False
    return value


def _direction(value: Any, add: _Add) -> bool | None:
    if isinstance(value, str) and value in DIRECTIONS:
        return DIRECTIONS[value]
    add("direction", f"{value!r} is not inbound, outbound or any")
    return None


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _protocols(value: Any, add: _Add) -> frozenset[int] | None:
    if value is None or value == "any":
        return None
    out: set[int] = set()
    for item in _as_list(value):
        if isinstance(item, str) and item.lower() in PROTOCOLS:
            out.add(PROTOCOLS[item.lower()])
        elif isinstance(item, int) and not isinstance(item, bool) and 0 <= item <= 255:
            out.add(item)
        else:
            add("protocol", f"{item!r} is not tcp, udp, icmp, icmpv6, any or a number 0-255")
    if not out:
        add("protocol", "an empty list matches nothing")
    return frozenset(out)


def _networks(value: Any, field: str, add: _Add) -> tuple[tuple[_Range, ...] | None, tuple[_Range, ...] | None]:
    """Address ranges per IP version; (None, None) means any address."""
    if value is None:
        return None, None
    v4: list[_Range] = []
    v6: list[_Range] = []
    items = _as_list(value)
    if not items:
        add(field, "an empty list matches nothing")
    for item in items:
        if not isinstance(item, str):
            add(field, f"{item!r} is not a CIDR string")
            continue
        try:
            net = ipaddress.ip_network(item, strict=True)
        except ValueError as error:
            add(field, f"{item!r}: {error}")
            continue
        (v4 if net.version == 4 else v6).append((int(net.network_address), int(net.broadcast_address)))
    return tuple(v4), tuple(v6)


def _ports(value: Any, field: str, add: _Add) -> tuple[_Range, ...] | None:
    if value is None:
        return None
    out: list[_Range] = []
    items = _as_list(value)
    if not items:
        add(field, "an empty list matches nothing")
    for item in items:
        port_range = _port_range(item)
        if port_range is None:
            add(field, f'{item!r} is not a port 1-65535 or a range like "1000-2000"')
        else:
            out.append(port_range)
    return tuple(out)


def _port_range(item: Any) -> _Range | None:
    if isinstance(item, int) and not isinstance(item, bool):
        low = high = item
    elif isinstance(item, str):
        low_text, dash, high_text = item.strip().partition("-")
        if not low_text.strip().isdigit() or (dash and not high_text.strip().isdigit()):
            return None
        low = int(low_text)
        high = int(high_text) if dash else low
    else:
        return None
    return (low, high) if 1 <= low <= high <= 65535 else None
