"""The systemd unit in packaging/systemd verifies, and pmk works with exactly its privileges.

``systemd-analyze verify`` checks the file as systemd would load it (it needs
ExecStart to exist, so the test points it at this checkout's pmk). The unit
claims pmk needs only the capabilities it lists; the namespace test runs pmk
with exactly those (``setpriv``, as systemd would set them for uid 0, with
NoNewPrivileges) on both backends and checks that it decides, blocks, cleans up
after a crash and shuts down cleanly.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import BACKENDS, QUIET, Decision, PmkProcess, Testbed, needs_root, netns
from tests.test_setup_tools import listed

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "packaging" / "systemd" / "pmk.service"
INSTALLED_PMK = "/opt/pmk/bin/pmk"


def settings(unit: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit, values in order (keys may repeat)."""
    found: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def capabilities() -> list[str]:
    (bounding,) = settings(UNIT.read_text())["CapabilityBoundingSet"]
    return bounding.split()


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is missing (scripts/setup installs it; never skipped in CI)")
    return tool


def test_unit_verifies(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_PMK} serve" in text
    pmk = Path(sys.executable).parent / "pmk"
    assert pmk.exists(), f"{pmk}: scripts/setup installs pmk's console script in the venv"
    rendered = tmp_path / "pmk.service"
    rendered.write_text(text.replace(INSTALLED_PMK, str(pmk)))
    out = subprocess.run([tool, "verify", str(rendered)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out


def test_unit_says_what_the_service_needs() -> None:
    unit = settings(UNIT.read_text())
    expected = {
        "Type": ["notify"],
        "RuntimeDirectory": ["pmk"],
        "RuntimeDirectoryMode": ["0750"],
        "Restart": ["on-failure"],
        "Before": ["network-pre.target"],
        "Wants": ["network-pre.target"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"],
    }
    assert {key: unit.get(key) for key in expected} == expected
    assert unit["WatchdogSec"] and unit["CapabilityBoundingSet"] == unit["AmbientCapabilities"]


def test_programs_the_unit_starts_besides_pmk_are_installed_by_setup() -> None:
    unit = settings(UNIT.read_text())
    others = {Path(command.split()[0]).name for key in ("ExecReload", "ExecStop") for command in unit.get(key, [])}
    assert others and others <= set(listed()), f"add to scripts/programs: {others - set(listed())}"


def test_unit_capabilities_are_known_to_systemd() -> None:
    tool = _systemd_analyze()
    out = subprocess.run([tool, "capability", *capabilities()], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "CAP_DAC_OVERRIDE" not in capabilities()


def with_unit_privileges(pmk: PmkProcess) -> PmkProcess:
    """Run ``pmk`` as the unit would: uid 0 with only the unit's capabilities, no new privileges."""
    caps = "-all," + ",".join("+" + name.removeprefix("CAP_").lower() for name in capabilities())
    at = pmk.argv.index(sys.executable)
    pmk.argv[at:at] = ["setpriv", "--bounding-set", caps, "--inh-caps", caps, "--ambient-caps", caps, "--no-new-privs"]
    return pmk


async def start(bed: Testbed) -> PmkProcess:
    process = with_unit_privileges(PmkProcess(bed.hosts, bed.backend, bed.ports))
    bed.processes.append(process)
    bed.pmk = await process.start()
    return process


@netns
@needs_root
@pytest.mark.parametrize("backend", BACKENDS)
async def test_pmk_serves_with_only_the_units_capabilities(backend: str) -> None:
    accept_port, block_port = 7311, 7312
    async with Testbed(backend, [f"tcp:{accept_port}", f"tcp:{block_port}"], start_pmk=False) as bed:
        first = await start(bed)
        caps = first.argv[first.argv.index("--bounding-set") + 1]
        assert "sys_module" not in caps and "dac_override" not in caps

        def decide(info: dict[str, object]) -> Decision:
            return Decision("accept" if info["local_port"] == accept_port else "block", permanent=True)

        await bed.decider(decide)
        assert (await bed.client.tcp_connect(bed.hosts.server_ip, accept_port))["ok"] is True
        # block sends a TCP reset: that needs a raw socket (divert) or the REJECT rule (nfqueue).
        refused = await bed.client.tcp_connect(bed.hosts.server_ip, block_port, id="blocked", timeout=QUIET * 4)
        assert refused == {"error": "ECONNREFUSED"}
        # What a crashed pmk left in the kernel, the next start removes with the same privileges.
        await first.kill()
        second = await start(bed)
        if backend == "divert":
            assert "left attached by a pmk that died" in second.log(), second.log()
        await bed.decider(decide, name="again")
        assert (await bed.client.tcp_connect(bed.hosts.server_ip, accept_port, id="again"))["ok"] is True
        # Leaving the testbed stops pmk with SIGTERM: exit status 0 and, on nfqueue, no rules left.
