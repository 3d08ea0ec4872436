"""A decider author installs the client library with msgpack alone.

The wheel is built offline from this checkout and installed into a fresh venv
that holds only msgpack (copied from this venv, as pip would install it): pip
must find nothing missing, and ``import pmk.client`` must work there without
loading anything of the server.
"""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import msgpack
import pytest

REPO = Path(__file__).resolve().parent.parent
#: Modules a client must never load: the server's I/O side and the server extra's packages.
SERVER_ONLY = (
    "pmk.capture",
    "pmk.server",
    "pydivert",
    "netfilterqueue",
    "uvloop",
    "winloop",
    "rich",
    "psutil",
    "pyroute2",
    "dpkt",
    "prometheus_client",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the sources: the build must not leave build/ or *.egg-info in the checkout.
    source = out / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "build", "__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = out.glob("pmk_verdict-*.whl")
    return path


def metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(archive.read(name))


def test_the_distribution_is_pmk_verdict_and_the_client_needs_only_msgpack(wheel: Path) -> None:
    meta = metadata(wheel)
    assert meta["Name"] == "pmk-verdict"
    assert meta["License-Expression"] == "MIT"
    requires = meta.get_all("Requires-Dist") or []
    assert [r for r in requires if "extra ==" not in r] == ["msgpack>=1.0.5"]
    server = [r for r in requires if 'extra == "server"' in r]
    assert any(r.startswith("pydivert<4.1,>=4.0.1") or r.startswith("pydivert>=4.0.1,<4.1") for r in server), server
    assert any(r.startswith("netfilterqueue") for r in server), server


def test_the_wheel_ships_type_information_the_default_policy_and_the_license(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "pmk/py.typed" in names
    assert "pmk/policies/default.toml" in names  # `pmk serve` without --policy, installed as a service
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names


def test_client_works_in_a_venv_with_only_msgpack(wheel: Path, tmp_path: Path) -> None:
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python = str(env / "bin" / "python")
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # msgpack exactly as installed here: its package and its record for pip.
    installed = Path(msgpack.__file__).parent
    shutil.copytree(installed, site / "msgpack")
    for info in installed.parent.glob("msgpack-*.dist-info"):
        shutil.copytree(info, site / info.name)
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    added = subprocess.run([*pip, "install", "--no-index", "-q", str(wheel)], capture_output=True, text=True)
    assert added.returncode == 0, added.stderr[-3000:]  # offline: nothing else was needed
    check = subprocess.run([*pip, "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    probe = (
        "import sys, pmk.client; "
        "from pmk.client import Client, Decision, run_decider; "
        "print(pmk.client.__file__); "
        f"print([m for m in sys.modules if any(m == s or m.startswith(s + '.') for s in {SERVER_ONLY!r})])"
    )
    # -I: the venv's site-packages only, never this checkout.
    out = subprocess.run([python, "-I", "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    where, loaded = out.stdout.splitlines()
    assert where.startswith(str(env)), where
    assert loaded == "[]", f"pmk.client loaded server modules: {loaded}"
    # The pmk command is there too; without the server's packages it says what to install, in one line.
    command = subprocess.run([str(env / "bin" / "pmk"), "stats"], capture_output=True, text=True, cwd=tmp_path)
    assert command.returncode == 1 and "Traceback" not in command.stderr, command.stderr
    assert command.stderr.count("\n") == 1 and "pmk-verdict[server]" in command.stderr, command.stderr
