"""Clean up what a pmk killed with SIGKILL left in the kernel, before starting again.

nfqueue: its chains carry the owner's pid and ``RuleSet.install`` removes
stale ones (``netfilter_rules.cleanup_stale``). divert: eBPFDivert keeps its
tc programs attached after its process dies, still stealing matching packets
into a ring nobody reads, so the network stays *closed* for them until
someone detaches them. ``pydivert.Divert.unregister()`` does that for
programs it registered, but its registry lives on bpffs at /sys/fs/bpf; where
no bpffs is mounted there (as inside ``ip netns exec``) it finds nothing. So
pmk also looks at this network namespace's tc filters itself and detaches
eBPFDivert programs that no live process holds open.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

log = logging.getLogger(__name__)

# eBPFDivert's tc program names (the kernel keeps the first 15 characters).
_DIVERT_PROGRAMS = ("tc_divert_ingre", "tc_divert_egres")
_TC_TIMEOUT = 10.0


def clean_stale_divert() -> int:
    """Detach eBPFDivert programs of dead processes; return how many tc filters went."""
    if not sys.platform.startswith("linux"):
        return 0  # WinDivert's driver lets go of a dead process's handle by itself
    try:
        import pydivert

        pydivert.Divert.unregister()
    except (OSError, RuntimeError, ImportError) as error:
        log.debug("pydivert unregister: %s", error)
    removed = 0
    for ifname, direction, pref, handle, _prog_id in _orphaned_filters():
        proc = _tc("filter", "del", "dev", ifname, direction, "pref", str(pref), "handle", handle, "bpf")
        if proc is not None and proc.returncode == 0:
            removed += 1
    if removed:
        log.warning("removed %d divert program(s) left attached by a pmk that died", removed)
    return removed


def divert_filters() -> list[tuple[str, str, int, str, int]]:
    """(interface, direction, pref, handle, program id) of every eBPFDivert tc filter here."""
    if shutil.which("tc") is None:
        return []
    found = []
    for ifname in _interfaces():
        for direction in ("ingress", "egress"):
            proc = _tc("-j", "filter", "show", "dev", ifname, direction)
            if proc is None or proc.returncode != 0 or not proc.stdout.strip():
                continue
            try:
                entries = json.loads(proc.stdout)
            except ValueError:
                continue
            for entry in entries:
                options = entry.get("options") or {}
                prog = options.get("prog") or {}
                if entry.get("kind") == "bpf" and prog.get("name") in _DIVERT_PROGRAMS:
                    found.append((ifname, direction, int(entry["pref"]), str(options["handle"]), int(prog["id"])))
    return found


def _orphaned_filters() -> list[tuple[str, str, int, str, int]]:
    filters = divert_filters()
    if not filters:
        return []
    held = live_program_ids()
    return [f for f in filters if f[4] not in held]


def live_program_ids() -> set[int]:
    """Ids of the BPF programs some live process holds a file descriptor to."""
    ids: set[int] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") != "anon_inode:bpf-prog":
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    for line in info:
                        if line.startswith("prog_id:"):
                            ids.add(int(line.split()[1]))
            except (OSError, ValueError):
                continue
    return ids


def _interfaces() -> list[str]:
    """Interfaces of this network namespace (sysfs may show another one's)."""
    try:
        return sorted(name for _index, name in socket.if_nameindex())
    except OSError:
        return []


def _tc(*argv: str) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(["tc", *argv], capture_output=True, text=True, timeout=_TC_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
