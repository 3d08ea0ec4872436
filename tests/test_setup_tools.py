"""scripts/programs is complete and scripts/setup installed everything in it.

The list is the one place that says which programs outside Python pmk, its
tests and its benchmarks start. Two ways it can go wrong, each a test: the code
starts a program the list does not name (a fresh machine then lacks it, as
iperf3 once did), or setup did not install a listed program (CI runs this after
scripts/setup, so there it must all be on PATH).
"""

from __future__ import annotations

import ast
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROGRAMS = REPO / "scripts" / "programs"
SOURCES = ("pmk", "tests", "benchmarks", "examples")
#: Calls whose first argument, or the first item of a list given first, is a program.
_SPAWNERS = {"run", "Popen", "check_output", "check_call", "create_subprocess_exec", "which", "_run"}
#: Calls that start their second argument inside a namespace: ``sh(ns, "ip", ...)``.
_IN_NAMESPACE = {"sh", "exec_argv"}
#: Calls of pmk.bench that start their first argument in a namespace.
_BENCH = {"server", "client"}


def listed() -> dict[str, str]:
    """Program -> package, from scripts/programs (rows with a program)."""
    table = {}
    for line in PROGRAMS.read_text().splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#") and fields[0] != "-":
            table[fields[0]] = fields[1]
    return table


def _program_args(call: ast.Call) -> Iterator[ast.expr]:
    """The argument of ``call`` that names a program, if it is a spawning call."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    args = call.args
    if name in _SPAWNERS and args:
        first = args[0]
        yield first.elts[0] if isinstance(first, ast.List | ast.Tuple) and first.elts else first
    elif name in _IN_NAMESPACE and len(args) >= 2:
        yield args[1]
    elif name in _BENCH and args and isinstance(func, ast.Attribute):
        yield args[0]


def _loop_strings(tree: ast.AST) -> dict[str, set[str]]:
    """``for tool in ("a", "b")``: loop variable -> its string values."""
    values: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and isinstance(node.iter, ast.Tuple):
            strings = {e.value for e in node.iter.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            values.setdefault(node.target.id, set()).update(strings)
    return values


def spawned(source: str) -> set[str]:
    """Programs a Python source starts or looks up on PATH, by literal name."""
    tree = ast.parse(source)
    loops = _loop_strings(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        for arg in _program_args(node):
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and " " not in arg.value:
                found.add(arg.value)
            elif isinstance(arg, ast.Name) and arg.id in loops:
                found |= loops[arg.id]
    return found


def spawned_by_project() -> dict[str, list[str]]:
    """Program -> the files that start it, over every Python file of the project."""
    where: dict[str, list[str]] = {}
    for folder in SOURCES:
        for path in sorted((REPO / folder).rglob("*.py")):
            for program in spawned(path.read_text()):
                where.setdefault(program, []).append(str(path.relative_to(REPO)))
    return where


def test_the_scanner_finds_programs_in_each_way_they_are_started() -> None:
    code = """
subprocess.run(["iperf3", "-s"])
run("ip", "netns", "add", ns)
hosts.sh(ns, "cat", path)
self.server("tmux", "new")
shutil.which("node")
for tool in ("iptables", "conntrack"):
    if shutil.which(tool) is None: pass
asyncio.run(main())
bed.client.ping("ping 1")
"""
    assert spawned(code) == {"iperf3", "ip", "cat", "tmux", "node", "iptables", "conntrack"}


def test_every_program_the_project_starts_is_listed() -> None:
    where = spawned_by_project()
    assert {"ip", "iperf3", "conntrack", "iptables-restore"} <= set(where)  # the scanner sees the known ones
    unlisted = {program: files for program, files in where.items() if program not in listed()}
    assert not unlisted, f"add these to scripts/programs with their Debian package: {unlisted}"


def test_every_listed_program_is_installed() -> None:
    if not os.environ.get("CI") and not (REPO / ".venv" / "pmk-setup.stamp").exists():
        pytest.skip("scripts/setup has not run here (it always has in CI)")
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", str(Path(sys.executable).parent)])
    missing = {p: pkg for p, pkg in listed().items() if shutil.which(p, path=search) is None}
    assert not missing, f"scripts/setup did not install: {missing}"
