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
import ipaddress
import os
import re
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from pmk.verdicts import ConnKey

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


class RulesError(RuntimeError):
    """iptables or conntrack refused a command; the message carries its stderr."""


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
    Raises ValueError for anything else.
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
            raise ValueError(f"unknown protocol in match item {raw!r}")
        if not ports:
            out.append(MatchItem(proto))
            continue
        if proto not in ("tcp", "udp"):
            raise ValueError(f"ports need tcp or udp: {raw!r}")
        lo_text, _, hi_text = ports.partition("-")
        try:
            low = int(lo_text)
            high = int(hi_text) if hi_text else low
        except ValueError:
            raise ValueError(f"bad port in match item {raw!r}") from None
        if not 0 < low <= high <= 65535:
            raise ValueError(f"port out of range in match item {raw!r}")
        out.append(MatchItem(proto, low, high))
    if not out:
        raise ValueError("empty match")
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


def _run(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=_CMD_TIMEOUT, check=False)


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
        raise RulesError(f"{tool}: could not remove chains {left}")
    return removed or bool(present)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(mark_mask: int = DEFAULT_MARK_MASK) -> bool:
    """Remove pmk chains left by a pmk that died, and the connection marks it left.

    Returns True when something was removed. Raises RulesError when a live
    pmk process still owns the chains (two pmks in one namespace would fight).
    """
    removed = False
    for _family, tool in FAMILIES:
        live = {p for p in owners(tool) if p != os.getpid() and _alive(p)}
        if live:
            raise RulesError(f"pmk chains in this namespace belong to running pid(s) {sorted(live)}")
    for _family, tool in FAMILIES:
        removed |= _remove_family(tool)
    if removed:
        clear_conn_marks(mark_mask)
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
        """Install both families; on failure nothing of pmk's stays behind."""
        cleanup_stale(self.mark_mask)
        self.installed = True
        try:
            for family, tool in FAMILIES:
                proc = _run([f"{tool}-restore", "-w", "--noflush"], stdin=self.script(family == "ipv6"))
                if proc.returncode != 0:
                    raise RulesError(f"{tool}-restore: {proc.stderr.strip()}")
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        if self.installed:
            self.installed = False
            for _family, tool in FAMILIES:
                _remove_family(tool)


def _tuple_args(proto: int, src: str, dst: str, sport: int, dport: int) -> list[str]:
    """conntrack's tuple options; port options need the protocol by name."""
    name = {6: "tcp", 17: "udp"}.get(proto)
    argv = ["-p", name or str(proto), "-s", src, "-d", dst]
    if name:
        argv += ["--sport", str(sport), "--dport", str(dport)]
    return argv


def set_conn_mark(key: ConnKey, code: int, mark_mask: int = DEFAULT_MARK_MASK) -> int:
    """Set (code 0: clear) the pmk bits of the conntrack entry for ``key``.

    Both orientations are tried, since the key does not say who opened the
    connection. Returns how many entries changed; raises RulesError when
    conntrack itself fails.
    """
    family = "ipv4" if len(key.local_ip) == 4 else "ipv6"
    local, remote = str(ipaddress.ip_address(key.local_ip)), str(ipaddress.ip_address(key.remote_ip))
    value = f"{mark_value(code, mark_mask) if code else 0:#x}/{mark_mask:#x}"
    changed = 0
    for src, dst, sport, dport in (
        (local, remote, key.local_port, key.remote_port),
        (remote, local, key.remote_port, key.local_port),
    ):
        # -f is needed with -U: without it the kernel gets AF_UNSPEC and refuses.
        argv = ["conntrack", "-U", "-f", family, *_tuple_args(key.protocol, src, dst, sport, dport)]
        changed += _count(_run([*argv, "-m", value]), "updated")
    return changed


def create_flow(
    protocol: int,
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    code: int,
    mark_mask: int = DEFAULT_MARK_MASK,
) -> bool:
    """Create a marked conntrack entry for a flow whose first packet was dropped.

    A dropped first packet takes its unconfirmed conntrack entry (and the mark
    just set on it) along, so its retries would reach user space again; this
    puts the verdict where the kernel rules find it. Returns False when the
    entry already existed (then the rule's mark stuck).
    """
    argv = _tuple_args(protocol, str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst)), sport, dport)
    extra = ["--state", "SYN_SENT"] if protocol == 6 else []
    mark = f"{mark_value(code, mark_mask):#x}"
    proc = _run(["conntrack", "-I", *argv, *extra, "--timeout", str(FLOW_TIMEOUT_S), "-m", mark])
    return _count(proc, "created", exists_ok=True) > 0


def clear_conn_marks(mark_mask: int = DEFAULT_MARK_MASK) -> int:
    """Clear pmk's bits from every conntrack entry; other bits stay. Returns the count changed."""
    value = f"0/{mark_mask:#x}"
    return sum(_count(_run(["conntrack", "-U", "-f", fam, "-m", value]), "updated") for fam, _ in FAMILIES)


def _count(proc: subprocess.CompletedProcess[str], verb: str, exists_ok: bool = False) -> int:
    # conntrack exits 1 when nothing matched; only a real failure lacks the count line.
    found = re.search(rf"(\d+) flow entries have been {verb}", proc.stderr)
    if found:
        return int(found.group(1))
    if proc.returncode == 0 or (exists_ok and "exists" in proc.stderr):
        return 0
    raise RulesError(f"conntrack: {proc.stderr.strip()}")
