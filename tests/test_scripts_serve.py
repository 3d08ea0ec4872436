"""``scripts/serve`` becomes pmk itself, so the terminal's signals reach pmk and not a shell.

Closing a terminal sends SIGHUP to the process in it. If a shell stood between
the terminal and pmk, the shell would die and pmk with it, without its cleanup
(on the kernel fast path its rules would then drop all traffic in scope). The
script therefore ``exec``s pmk: the process the terminal started is pmk.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import pytest

from tests.harness import PmkProcess, Testbed, eventually, needs_root, netns, scope_args

REPO = Path(__file__).resolve().parent.parent
SIGHUP_BIT = 1 << (signal.SIGHUP - 1)

pytestmark = [
    netns,
    needs_root,
    # scripts/serve runs scripts/setup first; without its stamp that would install.
    pytest.mark.skipif(
        not (REPO / ".venv" / "pmk-setup.stamp").exists(), reason="scripts/setup has not run here (it has in CI)"
    ),
]


def caught_signals(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no SigCgt for {pid}")


def serving(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


async def start_script(bed: Testbed) -> PmkProcess:
    """``sh scripts/serve`` in the server namespace, on a private socket."""
    process = PmkProcess(bed.hosts, bed.backend, bed.ports)
    process.argv = [
        *bed.hosts.exec_argv(bed.hosts.server, "sh", str(REPO / "scripts" / "serve")),
        "--pipe",
        process.path,
        *scope_args(bed.backend, bed.ports),
    ]
    bed.processes.append(process)
    bed.pmk = await process.start()
    return process


async def test_the_script_execs_pmk() -> None:
    async with Testbed("nfqueue", ["tcp:7321"], start_pmk=False) as bed:
        pmk = await start_script(bed)
        cmdline = Path(f"/proc/{pmk.pid}/cmdline").read_bytes().split(b"\0")
        try:
            assert cmdline[1:4] == [b"-m", b"pmk", b"serve"], cmdline  # the process started is pmk, no shell
            assert cmdline[0] == b".venv/bin/python" and os.path.samefile(f"/proc/{pmk.pid}/cwd", REPO)
        except AssertionError:
            os.killpg(pmk.pid, signal.SIGKILL)  # a shell's pmk child would outlive the testbed
            raise


async def test_sighup_from_a_closing_terminal_does_not_stop_pmk() -> None:
    async with Testbed("nfqueue", ["tcp:7322"], start_pmk=False) as bed:
        pmk = await start_script(bed)
        assert caught_signals(pmk.pid) & SIGHUP_BIT, "pmk leaves SIGHUP to its default action: dying"
        os.kill(pmk.pid, signal.SIGHUP)
        await eventually(lambda: "SIGHUP" in pmk.log(), "pmk to log that it handled SIGHUP")
        await asyncio.sleep(0.5)
        assert pmk.proc is not None and pmk.proc.poll() is None, pmk.log()
        assert serving(pmk.path)
        # Leaving the testbed stops pmk with SIGTERM: status 0 and no rules left behind.
