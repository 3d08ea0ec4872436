"""pmk's own iptables chains and the conntrack marks they act on.

Theory of operation. pmk adds four chains to the ``filter`` table of both
iptables and ip6tables and one jump at the top of INPUT (destined to this
host: inbound) and OUTPUT (made by this host: outbound); forwarded traffic is
not a host firewall's business. iptables rather than nft because NFQUEUE is
reachable through it on every kernel that has the xt target, also where the
native nft ``queue`` expression is not built (as on these machines).

``PMK-IN``/``PMK-OUT`` send packets in scope to ``PMK-DECIDE``, which:

1. lets kernel-made rejects through (a TCP reset or ICMP error tied to a
   tracked connection has state RELATED), so a block does not eat its reset;
2. for a packet back from user space (NF_REPEAT) carrying a pmk packet mark:
   saves a permanent verdict to the connection mark, then acts on it: accept
   RETURNs (the host's own INPUT/OUTPUT rules still apply), block rejects
   (TCP reset, else ICMP port unreachable), drop drops;
3. acts on a pmk connection mark the same way: decided connections, both
   directions, never leave the kernel;
4. queues everything else, without ``--queue-bypass`` unless fail-open was
   asked for: with nobody bound to the queue, packets are dropped.

Marks use only the bits of ``mark_mask``, so other users of packet and
connection marks keep theirs. Nothing outside these chains and the two jumps
is changed; ``remove`` and ``cleanup_stale`` take exactly those away.
"""

from __future__ import annotations

import enum
import os
import re
import shlex
import subprocess
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pmk.errors import PmkError, UsageError

CHAIN_PREFIX = "PMK-"
HOOKS = (("INPUT", "PMK-IN"), ("OUTPUT", "PMK-OUT"))
CHAINS = ("PMK-IN", "PMK-OUT", "PMK-DECIDE", "PMK-REJECT")
#: Three bits, clear of the low bits that routing setups tend to use.
DEFAULT_MARK_MASK = 0x00700000
#: A flow dropped at its first packet is re-created in conntrack for this long.
FLOW_TIMEOUT_S = 120
#: multiport takes at most 15 ports or ranges per rule.
_MULTIPORT_MAX = 15
_CMD_TIMEOUT = 10.0
# ICMPv6 neighbour discovery and router messages keep the link alive; never queued.
_ND_TYPES = (133, 134, 135, 136, 137)
FAMILIES = (("ipv4", "iptables"), ("ipv6", "ip6tables"))


class MarkCode(enum.IntEnum):
    """Verdict codes stored in the mark bits (shifted to the mask's lowest bit)."""

    ACCEPT = 1
    BLOCK = 2
    DROP = 3
    ACCEPT_ONCE = 4  # packet mark only: decide this packet, remember nothing
    BLOCK_ONCE = 5


class RulesError(PmkError):
    """iptables could not do what pmk asked; one line with its reason."""


def mark_value(code: int, mask: int = DEFAULT_MARK_MASK) -> int:
    """The mark bits for ``code`` inside ``mask``; ValueError if it does not fit."""
    shift = (mask & -mask).bit_length() - 1
    value = code << shift
    if mask <= 0 or value & ~mask:
        raise ValueError(f"code {code} does not fit mark mask {mask:#x}")
    return value


@dataclass(frozen=True)
class MatchItem:
    """One scope entry: a protocol, optionally narrowed to a port range."""

    protocol: str  # "tcp", "udp", "icmp" or "all"
    low: int | None = None
    high: int | None = None


def parse_match(spec: str | Sequence[str] | None) -> tuple[MatchItem, ...]:
    """Parse a scope like ``"tcp:5001,udp:5000-5010,icmp"``.

    Items are ``PROTO``, ``PROTO:PORT`` or ``PROTO:LOW-HIGH`` with PROTO one of
    tcp, udp, icmp (v4 and v6) or all. A port matches on either side, so
    ``tcp:443`` covers a local service on 443 and connections to remote 443.
    None means ``all`` (every protocol but ICMPv6 neighbour discovery).
    Raises UsageError naming the first bad item.
    """
    if spec is None:
        return (MatchItem("all"),)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[MatchItem] = []
    for raw in items:
        text = raw.strip().lower()
        if not text:
            continue
        proto, _, ports = text.partition(":")
        if proto not in ("tcp", "udp", "icmp", "all"):
            raise UsageError(f"scope item {raw.strip()!r}: unknown protocol {proto!r} (use tcp, udp, icmp or all)")
        if not ports:
            out.append(MatchItem(proto))
            continue
        if proto not in ("tcp", "udp"):
            raise UsageError(f"scope item {raw.strip()!r}: only tcp and udp take ports")
        lo_text, _, hi_text = ports.partition("-")
        try:
            low = int(lo_text)
            high = int(hi_text) if hi_text else low
        except ValueError:
            raise UsageError(f"scope item {raw.strip()!r}: {ports!r} is not a port or LOW-HIGH range") from None
        if not 0 < low <= high <= 65535:
            raise UsageError(f"scope item {raw.strip()!r}: ports must be 1-65535, low before high")
        out.append(MatchItem(proto, low, high))
    if not out:
        raise UsageError("scope is empty (give items like tcp:443,udp:53 or leave it out for all traffic)")
    return tuple(out)


def _scope_rules(chain: str, match: Sequence[MatchItem], v6: bool) -> list[str]:
    icmp = "ipv6-icmp" if v6 else "icmp"
    nd_skip = [f"-A {chain} -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j RETURN" for t in _ND_TYPES]
    nd_skip = nd_skip if v6 else []
    rules: list[str] = []
    ports: dict[str, list[str]] = {"tcp": [], "udp": []}
    for item in match:
        if item.protocol == "all":
            rules += [*nd_skip, f"-A {chain} -j PMK-DECIDE"]
        elif item.protocol == "icmp":
            rules += [*nd_skip, f"-A {chain} -p {icmp} -j PMK-DECIDE"]
        elif item.low is None:
            rules.append(f"-A {chain} -p {item.protocol} -j PMK-DECIDE")
        else:
            ports[item.protocol].append(str(item.low) if item.low == item.high else f"{item.low}:{item.high}")
    for proto, plist in ports.items():
        for i in range(0, len(plist), _MULTIPORT_MAX):
            chunk = ",".join(plist[i : i + _MULTIPORT_MAX])
            rules.append(f"-A {chain} -p {proto} -m multiport --ports {chunk} -j PMK-DECIDE")
    return rules


def build_restore(
    queue_num: int,
    match: Sequence[MatchItem],
    v6: bool,
    fail_open: bool = False,
    mark_mask: int = DEFAULT_MARK_MASK,
    owner_pid: int | None = None,
) -> str:
    """The ``iptables-restore --noflush`` script for one family (see the module docstring)."""
    mask = f"{mark_mask:#x}"
    acc, blk, drp, acc1, blk1 = (f"{mark_value(c, mark_mask):#x}/{mask}" for c in MarkCode)
    icmp = "ipv6-icmp" if v6 else "icmp"
    unreach = "icmp6-port-unreachable" if v6 else "icmp-port-unreachable"
    pid = os.getpid() if owner_pid is None else owner_pid
    bypass = " --queue-bypass" if fail_open else ""
    lines = [
        "*filter",
        *(f":{c} - [0:0]" for c in CHAINS),
        # Loopback is never intercepted, as with divert's default filter: local
        # services and pmk's own clients work whatever the decider says.
        "-A PMK-IN -i lo -j RETURN",
        "-A PMK-OUT -o lo -j RETURN",
        *_scope_rules("PMK-IN", match, v6),
        *_scope_rules("PMK-OUT", match, v6),
        "-A PMK-REJECT -p tcp -j REJECT --reject-with tcp-reset",
        f"-A PMK-REJECT -j REJECT --reject-with {unreach}",
        "-A PMK-DECIDE -p tcp --tcp-flags RST RST -m conntrack --ctstate RELATED -j RETURN",
        f"-A PMK-DECIDE -p {icmp} -m conntrack --ctstate RELATED -j RETURN",
        *(f"-A PMK-DECIDE -m mark --mark {m} -j CONNMARK --set-xmark {m}" for m in (acc, blk, drp)),
        *(f"-A PMK-DECIDE -m mark --mark {m} -j RETURN" for m in (acc, acc1)),
        *(f"-A PMK-DECIDE -m mark --mark {m} -j PMK-REJECT" for m in (blk, blk1)),
        f"-A PMK-DECIDE -m mark --mark {drp} -j DROP",
        f"-A PMK-DECIDE -m connmark --mark {acc} -j RETURN",
        f"-A PMK-DECIDE -m connmark --mark {blk} -j PMK-REJECT",
        f"-A PMK-DECIDE -m connmark --mark {drp} -j DROP",
        f"-A PMK-DECIDE -j NFQUEUE --queue-num {queue_num}{bypass}",
        *(f'-I {hook} 1 -m comment --comment "pmk pid {pid}" -j {chain}' for hook, chain in HOOKS),
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


def script_tables(script: str) -> dict[str, str]:
    """The parts of a restore script by table: ``{"mangle": "*mangle ... COMMIT"}``."""
    tables: dict[str, list[str]] = {}
    current: list[str] = []
    for line in script.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:], [])
        current.append(line)
    return {table: "\n".join(lines) + "\n" for table, lines in tables.items()}


def missing_rules(script: str, listing: str) -> list[str]:
    """What of one table's ``script`` (a restore script's part) is missing from ``listing`` (``iptables -t T -S``).

    Compared by count, which is cheap enough to run every few seconds: each
    chain the script declares must exist with as many rules as the script
    gives it, and each hook must hold the script's jump with its owner
    comment. A rule rewritten in place goes unnoticed; a flush, a delete or a
    removed chain does not.
    """
    lines = listing.splitlines()
    script_lines = script.splitlines()
    want = Counter(line.split()[1] for line in script_lines if line.startswith("-A "))
    have = Counter(line.split()[1] for line in lines if line.startswith("-A "))
    chains = {line.split()[1] for line in lines if line.startswith("-N ")}
    problems = []
    for chain in (line[1:].split()[0] for line in script_lines if line.startswith(":")):
        if chain not in chains:
            problems.append(f"chain {chain} is gone")
        elif have[chain] != want[chain]:
            problems.append(f"chain {chain} has {have[chain]} of its {want[chain]} rules")
    for jump in script_lines:
        found = re.match(r'-I (\S+) 1 -m comment --comment "([^"]*)" -j (\S+)$', jump)
        if found:
            hook, comment, chain = found.groups()
            if not any(
                line.startswith(f"-A {hook} ") and f'"{comment}"' in line and line.endswith(f"-j {chain}")
                for line in lines
            ):
                problems.append(f"the jump from {hook} to {chain} is gone")
    return problems


def find_damage(script_of: Callable[[bool], str]) -> dict[str, list[str]]:
    """For each family (tool name) missing some of ``script_of(v6)``'s rules, what is missing, table by table."""
    found = {}
    for family, tool in FAMILIES:
        problems = []
        for table, part in script_tables(script_of(family == "ipv6")).items():
            proc = _run([tool, "-w", "-t", table, "-S"])
            if proc.returncode != 0:
                raise RulesError(f"{tool} -t {table} -S: {_one_line(proc.stderr)}")
            problems += missing_rules(part, proc.stdout)
        if problems:
            found[tool] = problems
    return found


def _run(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=_CMD_TIMEOUT, check=False
        )
    except OSError as error:
        raise RulesError(f"cannot run {argv[0]}: {error.strerror} (the kernel fast path needs iptables)") from None
    except subprocess.TimeoutExpired:
        raise RulesError(f"{argv[0]} gave no answer within {_CMD_TIMEOUT:g} s") from None


def _one_line(stderr: str) -> str:
    """iptables' complaint without its usage hint, on one line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not line.startswith("Try `")]
    return "; ".join(lines) or "failed without a message"


def _hook_rules(tool: str) -> list[tuple[str, str]]:
    """(hook, rule spec) of every jump into a pmk chain from INPUT/OUTPUT."""
    found: list[tuple[str, str]] = []
    for hook, chain in HOOKS:
        proc = _run([tool, "-w", "-t", "filter", "-S", hook])
        for line in proc.stdout.splitlines():
            if line.startswith(f"-A {hook} ") and line.endswith(f"-j {chain}"):
                found.append((hook, line[len(f"-A {hook} ") :]))
    return found


def owners(tool: str = "iptables") -> set[int]:
    """Pids recorded on pmk's hook rules (several only after a crash)."""
    pids = set()
    for _hook, spec in _hook_rules(tool):
        found = re.search(r"pmk pid (\d+)", spec)
        if found:
            pids.add(int(found.group(1)))
    return pids


def chains_present(tool: str = "iptables") -> list[str]:
    """pmk chains that exist in this namespace's filter table."""
    proc = _run([tool, "-w", "-t", "filter", "-S"])
    return [c for c in CHAINS if f"-N {c}" in proc.stdout.splitlines()]


def _remove_family(tool: str) -> bool:
    removed = False
    for hook, spec in _hook_rules(tool):
        # The spec came from -S, so it splits back into the argv iptables printed.
        _run([tool, "-w", "-t", "filter", "-D", hook, *shlex.split(spec)])
        removed = True
    present = chains_present(tool)
    for chain in present:
        _run([tool, "-w", "-t", "filter", "-F", chain])
    for chain in present:
        _run([tool, "-w", "-t", "filter", "-X", chain])
    left = chains_present(tool)
    if left:
        raise RulesError(f"{tool}: could not remove pmk's chains {', '.join(left)}")
    return removed or bool(present)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def refuse_if_owned() -> None:
    """Raise RulesError when a live pmk process (not this one) owns pmk's chains here.

    Two pmks in one namespace would fight over the chains and the queue.
    """
    for _family, tool in FAMILIES:
        live = sorted(p for p in owners(tool) if p != os.getpid() and _alive(p))
        if live:
            pids = ", ".join(map(str, live))
            raise RulesError(
                f"another pmk (pid {pids}) runs the kernel fast path in this network namespace; stop it first"
            )


def cleanup_stale() -> bool:
    """Remove pmk chains left by a pmk that died; True when something was removed.

    Raises RulesError when a live pmk still owns them (``refuse_if_owned``).
    The connection marks a dead pmk left are the caller's to clear (see
    ``pmk.capture.conntrack``).
    """
    refuse_if_owned()
    removed = False
    for _family, tool in FAMILIES:
        removed |= _remove_family(tool)
    return removed


class RuleSet:
    """pmk's chains for one queue; ``install`` replaces stale ones, ``remove`` is idempotent."""

    def __init__(
        self,
        queue_num: int,
        match: str | Sequence[str] | None,
        fail_open: bool = False,
        mark_mask: int = DEFAULT_MARK_MASK,
    ) -> None:
        self.queue_num = queue_num
        self.match = parse_match(match)
        self.fail_open = fail_open
        self.mark_mask = mark_mask
        mark_value(max(MarkCode), mark_mask)  # fail early on a mask too narrow
        self.installed = False

    def script(self, v6: bool) -> str:
        return build_restore(self.queue_num, self.match, v6, self.fail_open, self.mark_mask)

    def install(self) -> None:
        """Install both families (after removing a dead pmk's); on failure nothing of pmk's stays behind."""
        cleanup_stale()
        self.installed = True
        try:
            for family, tool in FAMILIES:
                self._restore(family, tool)
        except BaseException:
            self.remove()
            raise

    def _restore(self, family: str, tool: str) -> None:
        proc = _run([f"{tool}-restore", "-w", "--noflush"], stdin=self.script(family == "ipv6"))
        if proc.returncode != 0:
            raise RulesError(f"{tool}-restore: {_one_line(proc.stderr)}")

    def damage(self) -> dict[str, list[str]]:
        """For each family whose rules are not all in place (tool name), what is missing."""
        return find_damage(self.script)

    def repair(self, tool: str) -> None:
        """Put one family's chains and jumps back as ``install`` made them."""
        family = {t: f for f, t in FAMILIES}[tool]
        _remove_family(tool)
        self._restore(family, tool)

    def remove(self) -> None:
        if self.installed:
            self.installed = False
            for _family, tool in FAMILIES:
                _remove_family(tool)
