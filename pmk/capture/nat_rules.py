"""Kernel NAT for rerouted connections on the nfqueue backend.

Theory of operation. A connection's NAT binding is fixed by the ``nat``
table at its first packet, and ``nat`` OUTPUT runs before ``filter`` OUTPUT,
where pmk's other chains queue. So the first packet of every outbound TCP or
UDP connection in scope is queued earlier, from ``mangle`` OUTPUT (chain
``PMK-NAT-Q``), marked ``FIRST_PACKET``: the backend knows from that mark
that a reroute can still be carried out. The decider's verdict comes back
as the usual pmk mark (a reroute as a permanent accept) plus, for a reroute,
the target's *slot* in the bits of ``target_mask``. ``nat`` OUTPUT (chain
``PMK-NAT``) then DNATs a packet carrying slot S to the target in slot S,
conntrack rewrites the replies back, and the filter chains accept the rest
of the connection by its connection mark: no later packet reaches pmk.

Slots: ``target_mask`` (4 bits by default, 15 slots per IP version) holds
which target a packet goes to. The nameserver and tunnel targets hold their
slots for good; explicit ``redirect`` targets share the rest and the least
recently used one is given to a new target. Reusing a slot is safe: a slot
matters only for a connection's first packet, and NAT bindings made
earlier stay as they are.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from pmk.capture import netfilter_rules as rules
from pmk.verdicts import Target, ip_text

#: Four bits next to pmk's verdict bits: up to 15 reroute targets per IP version.
DEFAULT_TARGET_MASK = 0x0F000000
#: pmk verdict code (in ``netfilter_rules``' mark bits) of a packet queued before NAT.
FIRST_PACKET = 6
QUEUE_CHAIN = "PMK-NAT-Q"
FIRST_CHAIN = "PMK-NAT-FIRST"
NAT_CHAIN = "PMK-NAT"
#: (table, hook, chain jumped to) of each hook rule this module adds.
HOOKS = (("mangle", "OUTPUT", QUEUE_CHAIN), ("nat", "OUTPUT", NAT_CHAIN))
_PROTOCOLS = ("tcp", "udp")
_CMD_TIMEOUT = 10.0


def slot_count(target_mask: int) -> int:
    """How many targets the mask can tell apart (slot 0 means none)."""
    return (target_mask >> ((target_mask & -target_mask).bit_length() - 1)) if target_mask > 0 else 0


def is_first_packet(mark: int, mark_mask: int = rules.DEFAULT_MARK_MASK) -> bool:
    """True for a packet queued from ``mangle``: its connection has no NAT binding yet."""
    return mark & mark_mask == rules.mark_value(FIRST_PACKET, mark_mask)


def _dnat_rules(slot: int, target: Target | None, target_mask: int) -> list[str]:
    """The two rule specs (TCP, UDP) of one slot; an empty slot RETURNs, so rule positions never move."""
    value = rules.mark_value(slot, target_mask)
    match = f"-m mark --mark {value:#x}/{target_mask:#x}"
    if target is None:
        return [f"-p {proto} {match} -j RETURN" for proto in _PROTOCOLS]
    host = ip_text(target.ip)
    address = f"[{host}]" if len(target.ip) == 16 else host
    return [f"-p {proto} {match} -j DNAT --to-destination {address}:{target.port}" for proto in _PROTOCOLS]


def _queue_scope(match: Sequence[rules.MatchItem]) -> list[str]:
    """Rule specs sending first packets in scope to ``FIRST_CHAIN``: only TCP and UDP can be rerouted."""
    specs: list[str] = []
    ports: dict[str, list[str]] = {proto: [] for proto in _PROTOCOLS}
    for item in match:
        protocols = _PROTOCOLS if item.protocol == "all" else (item.protocol,) if item.protocol in _PROTOCOLS else ()
        for proto in protocols:
            if item.low is None:
                specs.append(f"-p {proto} -j {FIRST_CHAIN}")
            else:
                ports[proto].append(str(item.low) if item.low == item.high else f"{item.low}:{item.high}")
    for proto, plist in ports.items():
        for i in range(0, len(plist), 15):  # multiport takes at most 15 ports or ranges
            specs.append(f"-p {proto} -m multiport --ports {','.join(plist[i : i + 15])} -j {FIRST_CHAIN}")
    return specs


def build_nat_restore(
    queue_num: int,
    match: Sequence[rules.MatchItem],
    slots: Sequence[Target | None],
    fail_open: bool = False,
    mark_mask: int = rules.DEFAULT_MARK_MASK,
    target_mask: int = DEFAULT_TARGET_MASK,
    owner_pid: int | None = None,
) -> str:
    """The ``iptables-restore --noflush`` script for one family; ``slots[i]`` is slot i+1's target."""
    if mark_mask & target_mask:
        raise ValueError(f"target mask {target_mask:#x} overlaps the verdict mask {mark_mask:#x}")
    if len(slots) > slot_count(target_mask):
        raise ValueError(f"{len(slots)} slots do not fit target mask {target_mask:#x}")
    pid = os.getpid() if owner_pid is None else owner_pid
    first = rules.mark_value(FIRST_PACKET, mark_mask)
    bypass = " --queue-bypass" if fail_open else ""
    lines = [
        "*mangle",
        f":{QUEUE_CHAIN} - [0:0]",
        f":{FIRST_CHAIN} - [0:0]",
        f"-A {QUEUE_CHAIN} -o lo -j RETURN",
        # Back from the queue with a verdict (NF_REPEAT restarts this hook), or decided otherwise.
        f"-A {QUEUE_CHAIN} -m mark ! --mark 0x0/{mark_mask:#x} -j RETURN",
        f"-A {QUEUE_CHAIN} -m conntrack ! --ctstate NEW -j RETURN",
        # A retransmitted SYN or a second datagram is NEW too, but its NAT binding is made already.
        f"-A {QUEUE_CHAIN} -m conntrack --ctstatus CONFIRMED -j RETURN",
        *(f"-A {QUEUE_CHAIN} {spec}" for spec in _queue_scope(match)),
        f"-A {FIRST_CHAIN} -j MARK --set-xmark {first:#x}/{mark_mask:#x}",
        f"-A {FIRST_CHAIN} -j NFQUEUE --queue-num {queue_num}{bypass}",
        f'-I OUTPUT 1 -m comment --comment "pmk pid {pid}" -j {QUEUE_CHAIN}',
        "COMMIT",
        "*nat",
        f":{NAT_CHAIN} - [0:0]",
        *(f"-A {NAT_CHAIN} {spec}" for i, t in enumerate(slots) for spec in _dnat_rules(i + 1, t, target_mask)),
        f'-I OUTPUT 1 -m comment --comment "pmk pid {pid}" -j {NAT_CHAIN}',
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


def build_slot_update(slot: int, target: Target | None, target_mask: int = DEFAULT_TARGET_MASK) -> str:
    """The restore script that points ``slot`` at ``target`` in place (rule positions are fixed)."""
    first = 2 * (slot - 1) + 1
    specs = _dnat_rules(slot, target, target_mask)
    return "\n".join(["*nat", *(f"-R {NAT_CHAIN} {first + i} {s}" for i, s in enumerate(specs)), "COMMIT"]) + "\n"


class SlotTable:
    """Which target each slot stands for, for one IP version; explicit targets are reused LRU.

    Pure: the caller installs a new assignment (``build_slot_update``)
    before it marks any packet with the slot.
    """

    def __init__(self, count: int, pinned: Iterable[Target] = ()) -> None:
        self.slots: list[Target | None] = [None] * count
        self._slot_of: dict[Target, int] = {}
        self._pinned = 0
        for target in dict.fromkeys(pinned):
            if self._pinned == count:
                raise ValueError(f"more fixed targets than the {count} slots")
            self._pinned += 1
            self.slots[self._pinned - 1] = target
            self._slot_of[target] = self._pinned
        # Explicit targets, least recently used first.
        self._recent: OrderedDict[Target, int] = OrderedDict()

    def lookup(self, target: Target) -> int | None:
        """The slot ``target`` is installed in (now most recently used), or None."""
        slot = self._slot_of.get(target)
        if slot is not None and target in self._recent:
            self._recent.move_to_end(target)
        return slot

    def assign(self, target: Target) -> int:
        """Give ``target`` a slot: a free one, else the least recently used explicit target's.

        Raises ValueError when every slot is fixed.
        """
        known = self.lookup(target)
        if known is not None:
            return known
        free = [i + 1 for i in range(self._pinned, len(self.slots)) if self.slots[i] is None]
        if free:
            slot = free[0]
        elif self._recent:
            old, slot = self._recent.popitem(last=False)
            del self._slot_of[old]
        else:
            raise ValueError("no slot for a redirect target: every slot holds a nameserver or tunnel")
        self.slots[slot - 1] = target
        self._slot_of[target] = slot
        self._recent[target] = slot
        return slot

    def release(self, target: Target) -> None:
        """Free an explicit target's slot (its rule could not be installed)."""
        slot = self._recent.pop(target, None)
        if slot is not None:
            del self._slot_of[target]
            self.slots[slot - 1] = None


def _run(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=_CMD_TIMEOUT, check=False)


def remove_chains(tool: str) -> bool:
    """Take this module's hook rules and chains out of one family; True if there were any."""
    removed = False
    for table, hook, chain in HOOKS:
        for line in _run([tool, "-w", "-t", table, "-S", hook]).stdout.splitlines():
            if line.startswith(f"-A {hook} ") and line.endswith(f"-j {chain}"):
                _run([tool, "-w", "-t", table, "-D", hook, *shlex.split(line[len(f"-A {hook} ") :])])
                removed = True
    for table, chains in (("mangle", (QUEUE_CHAIN, FIRST_CHAIN)), ("nat", (NAT_CHAIN,))):
        present = [c for c in chains if f"-N {c}" in _run([tool, "-w", "-t", table, "-S"]).stdout.splitlines()]
        for step in ("-F", "-X"):
            for chain in present:
                _run([tool, "-w", "-t", table, step, chain])
        removed |= bool(present)
    return removed


class NatRuleSet:
    """The NAT chains of both families and their slots; blocking calls, run off the event loop."""

    def __init__(
        self,
        queue_num: int,
        match: str | Sequence[str] | None,
        pinned: Iterable[Target] = (),
        fail_open: bool = False,
        mark_mask: int = rules.DEFAULT_MARK_MASK,
        target_mask: int = DEFAULT_TARGET_MASK,
    ) -> None:
        self.queue_num = queue_num
        self.match = rules.parse_match(match)
        self.fail_open = fail_open
        self.mark_mask = mark_mask
        self.target_mask = target_mask
        pinned = tuple(pinned)
        count = slot_count(target_mask)
        self.tables = {length: SlotTable(count, (t for t in pinned if len(t.ip) == length)) for length in (4, 16)}
        self.installed = False

    def script(self, v6: bool) -> str:
        slots = self.tables[16 if v6 else 4].slots
        return build_nat_restore(self.queue_num, self.match, slots, self.fail_open, self.mark_mask, self.target_mask)

    def install(self) -> None:
        """Install both families (after pmk's filter chains); on failure nothing stays behind."""
        self.installed = True
        try:
            for _family, tool in rules.FAMILIES:
                self.repair(tool)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        if self.installed:
            self.installed = False
            for _family, tool in rules.FAMILIES:
                remove_chains(tool)

    def damage(self) -> dict[str, list[str]]:
        """For each family whose NAT chains or jumps are not all in place (tool name), what is missing.

        A flushed ``nat`` table would send rerouted connections to where
        their application asked (a leak, for a DNS or tunnel reroute), so the
        rules watchdog checks these chains as it checks the filter ones.
        """
        return rules.find_damage(self.script)

    def repair(self, tool: str) -> None:
        """(Re)install one family's NAT chains and jumps, with the targets now in their slots."""
        remove_chains(tool)
        proc = _run([f"{tool}-restore", "-w", "--noflush"], stdin=self.script(tool == "ip6tables"))
        if proc.returncode != 0:
            raise rules.RulesError(f"{tool}-restore: {proc.stderr.strip()}")

    def mark_for(self, target: Target) -> int | None:
        """The slot bits for ``target`` if it is installed (no I/O), else None."""
        slot = self.tables[len(target.ip)].lookup(target)
        return None if slot is None else rules.mark_value(slot, self.target_mask)

    def add_target(self, target: Target) -> int:
        """Install ``target`` in a slot (blocking) and return its slot bits; RulesError on failure."""
        table = self.tables[len(target.ip)]
        slot = table.assign(target)
        tool = "iptables" if len(target.ip) == 4 else "ip6tables"
        proc = _run([f"{tool}-restore", "-w", "--noflush"], stdin=build_slot_update(slot, target, self.target_mask))
        if proc.returncode != 0:
            table.release(target)
            raise rules.RulesError(f"{tool}-restore: {proc.stderr.strip()}")
        return rules.mark_value(slot, self.target_mask)
