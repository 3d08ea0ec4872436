"""ProcessTable against a fake /proc: what is cached, when it is trusted, what a miss costs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from pmk.host.procs import RECHECK_SECONDS, ProcessTable


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_process(proc: Path, pid: int, start: int, exe: str, sockets: list[int]) -> None:
    root = proc / str(pid)
    shutil.rmtree(root, ignore_errors=True)
    (root / "fd").mkdir(parents=True)
    # The command name may hold spaces and ")": the parser must split after the last one.
    fields = ["S", *["0"] * 18, str(start), *["0"] * 5]
    (root / "stat").write_text(f"{pid} (a) b) {' '.join(fields)}\n")
    os.symlink(exe, root / "exe")
    os.symlink("/dev/null", root / "fd" / "0")
    for fd, inode in enumerate(sockets, start=3):
        os.symlink(f"socket:[{inode}]", root / "fd" / str(fd))


def test_finds_the_holder_and_its_executable(tmp_path: Path) -> None:
    make_process(tmp_path, 10, 500, "/usr/bin/first", [1001])
    make_process(tmp_path, 20, 600, "/usr/bin/second (deleted)", [2001, 2002])
    table = ProcessTable(str(tmp_path))
    assert table.owner_of(2002, uid=0) == (20, "/usr/bin/second")
    assert table.owner_of(1001, uid=0) == (10, "/usr/bin/first")


def test_a_hit_reads_no_descriptors(tmp_path: Path) -> None:
    make_process(tmp_path, 10, 500, "/usr/bin/first", [1001, 1002])
    table = ProcessTable(str(tmp_path))
    assert table.owner_of(1001, uid=0) == (10, "/usr/bin/first")
    scanned = table.scanned_processes
    # 1002 was read in the same pass as 1001.
    assert table.owner_of(1002, uid=0) == (10, "/usr/bin/first")
    assert table.scanned_processes == scanned


def test_a_new_socket_of_a_recent_owner_is_found_first(tmp_path: Path) -> None:
    for pid in range(10, 30):
        make_process(tmp_path, pid, 500, f"/usr/bin/p{pid}", [pid * 100])
    table = ProcessTable(str(tmp_path))
    assert table.owner_of(1200, uid=0) == (12, "/usr/bin/p12")
    make_process(tmp_path, 12, 500, "/usr/bin/p12", [1200, 1201])
    scanned = table.scanned_processes
    assert table.owner_of(1201, uid=0) == (12, "/usr/bin/p12")
    assert table.scanned_processes == scanned + 1


def test_a_reused_pid_is_not_trusted(tmp_path: Path) -> None:
    make_process(tmp_path, 10, 500, "/usr/bin/old", [1001])
    clock = Clock()
    table = ProcessTable(str(tmp_path), clock)
    assert table.owner_of(1001, uid=0) == (10, "/usr/bin/old")
    # Same pid, another process (later start time), another executable and socket.
    make_process(tmp_path, 10, 900, "/usr/bin/new", [1002])
    clock.now += RECHECK_SECONDS
    assert table.owner_of(1001, uid=0) is None
    assert table.owner_of(1002, uid=0) == (10, "/usr/bin/new")


def test_an_unowned_socket_is_not_searched_again_at_once(tmp_path: Path) -> None:
    make_process(tmp_path, 10, 500, "/usr/bin/first", [1001])
    table = ProcessTable(str(tmp_path))
    assert table.owner_of(4242, uid=0) is None
    scanned = table.scanned_processes
    assert scanned > 0
    assert table.owner_of(4242, uid=0) is None
    assert table.scanned_processes == scanned


def test_a_vanished_process_is_skipped(tmp_path: Path) -> None:
    make_process(tmp_path, 10, 500, "/usr/bin/first", [1001])
    make_process(tmp_path, 20, 600, "/usr/bin/second", [2001])
    clock = Clock()
    table = ProcessTable(str(tmp_path), clock)
    assert table.owner_of(1001, uid=0) == (10, "/usr/bin/first")
    shutil.rmtree(tmp_path / "10")
    clock.now += RECHECK_SECONDS
    assert table.owner_of(1001, uid=0) is None
    assert table.owner_of(2001, uid=0) == (20, "/usr/bin/second")


def test_a_process_that_reopens_costs_one_readlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_process(tmp_path, 10, 500, "/usr/bin/busy", list(range(1000, 1050)))
    table = ProcessTable(str(tmp_path))
    assert table.owner_of(1020, uid=0) == (10, "/usr/bin/busy")
    # The descriptor of socket 1020 now holds a new socket, as after close() and socket().
    fd = tmp_path / "10" / "fd" / str(3 + 20)
    fd.unlink()
    os.symlink("socket:[2000]", fd)
    calls: list[object] = []
    readlink = os.readlink

    def counted(*args: Any, **kwargs: Any) -> str:
        calls.append(args)
        return readlink(*args, **kwargs)

    monkeypatch.setattr(os, "readlink", counted)
    assert table.owner_of(2000, uid=0) == (10, "/usr/bin/busy")
    assert len(calls) == 1


def test_a_pid_is_checked_at_most_once_per_recheck_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_process(tmp_path, 10, 500, "/usr/bin/first", [1001])
    clock = Clock()
    table = ProcessTable(str(tmp_path), clock)
    assert table.owner_of(1001, uid=0) == (10, "/usr/bin/first")
    reads: list[str] = []
    real_open = os.open

    def counted(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith("/stat"):
            reads.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", counted)
    for _ in range(5):
        assert table.owner_of(1001, uid=0) == (10, "/usr/bin/first")
    assert len(reads) == 1
    clock.now += RECHECK_SECONDS
    assert table.owner_of(1001, uid=0) == (10, "/usr/bin/first")
    assert len(reads) == 2
