"""Which process holds a socket, from /proc: socket inode -> pid -> executable.

The kernel tells a socket's inode; only /proc/PID/fd says which process has
it open, one readlink per descriptor. A full scan of every process costs
milliseconds, so answers are cached, every socket seen on the way is cached
too, and a miss searches where it is likely to end early: processes that
owned sockets lately, then the socket uid's processes, then the rest, newest
first; within a process, near the descriptor of its last new socket first.
A socket no process holds is not searched for again for a moment. A cached
pid is trusted only while its start time is unchanged, so a reused pid never
inherits another process's sockets or executable; that start time is read
again at most once per ``RECHECK_SECONDS`` per pid, since reading it was a
third of attribution's cost (py-spy, row D) and a pid cannot be reused that
fast: the kernel hands pids out in order up to ``pid_max`` (at least 32,768)
before it wraps around.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

#: Cached entries kept before a cache is emptied and rebuilt from scans.
MAX_CACHED = 65536
#: Processes remembered as recent socket owners, scanned first on a miss.
MAX_RECENT = 64
#: How long a socket that no process holds (a kernel socket, say) is not
#: searched for again: such sockets would otherwise cost a full scan each time.
UNOWNED_SECONDS = 2.0
#: How long a process's start time, once read, vouches for its pid (see above).
RECHECK_SECONDS = 1.0
_DELETED = " (deleted)"


class ProcessTable:
    """Socket inode -> (pid, executable path); thread-safe."""

    def __init__(self, proc: str = "/proc", clock: Callable[[], float] = time.monotonic) -> None:
        self._proc = proc
        self._clock = clock
        self._holder: dict[int, tuple[int, int]] = {}  # socket inode -> (pid, its start time)
        self._exe: dict[int, tuple[int, str]] = {}  # pid -> (start time, executable)
        self._recent: dict[int, None] = {}  # pids, most recent owner last
        self._last_fd: dict[int, int] = {}  # pid -> descriptor where its last sought socket was
        self._unowned: dict[int, float] = {}  # socket inode -> when to search for it again
        self._checked: dict[int, float] = {}  # pid -> until when its start time needs no new read
        self._lock = threading.Lock()
        self.scanned_processes = 0  # for the benchmark: how much work misses cost

    def owner_of(self, inode: int, uid: int) -> tuple[int, str | None] | None:
        """The pid and executable path of a process holding socket ``inode``, or None.

        ``uid`` (the socket's owner, from the kernel) only orders the search.
        The path is None when the executable cannot be read (process exiting).
        """
        with self._lock:
            holder = self._holder.get(inode)
            if holder is not None and not self._still_running(*holder):
                self._recent.pop(holder[0], None)
                holder = None
            if holder is None:
                holder = self._scan_for(inode, uid)
                if holder is None:
                    return None
            pid, started = holder
            self._recent.pop(pid, None)
            self._recent[pid] = None
            if len(self._recent) > MAX_RECENT:
                oldest = next(iter(self._recent))
                del self._recent[oldest]
                self._last_fd.pop(oldest, None)
            return pid, self._executable(pid, started)

    def _still_running(self, pid: int, started: int) -> bool:
        """Whether ``pid`` is still the process that started at ``started`` (read at most once a second)."""
        now = self._clock()
        if self._checked.get(pid, 0.0) > now:
            return True
        if self._start_time(pid) != started:
            self._checked.pop(pid, None)
            return False
        if len(self._checked) > MAX_CACHED:
            self._checked.clear()
        self._checked[pid] = now + RECHECK_SECONDS
        return True

    def _scan_for(self, inode: int, uid: int) -> tuple[int, int] | None:
        now = self._clock()
        if self._unowned.get(inode, 0.0) > now:
            return None
        for pid in self._candidates(uid):
            started = self._read_sockets(pid, inode)
            if started is not None:
                return pid, started
        if len(self._unowned) > MAX_CACHED:
            self._unowned.clear()
        self._unowned[inode] = now + UNOWNED_SECONDS
        return None

    def _candidates(self, uid: int) -> Iterator[int]:
        recent = list(reversed(self._recent))
        yield from recent
        seen = set(recent)
        same_uid: list[int] = []
        others: list[int] = []
        try:
            entries = list(os.scandir(self._proc))
        except OSError:
            entries = []
        for entry in entries:
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid in seen:
                continue
            try:
                owner = entry.stat().st_uid
            except OSError:
                continue
            (same_uid if owner == uid else others).append(pid)
        same_uid.sort(reverse=True)
        others.sort(reverse=True)
        yield from same_uid
        yield from others

    def _read_sockets(self, pid: int, wanted: int) -> int | None:
        """Cache the sockets ``pid`` has open, up to ``wanted``; return its start time if it holds it.

        A readlink per descriptor is the dominant cost of attribution, so the
        search stops at ``wanted`` and starts where it is likely: the
        descriptor that held this process's last new socket and the next two
        (a process that closes and reopens, or only opens), then the rest,
        highest first.
        """
        started = self._start_time(pid)
        if started is None:
            return None
        try:
            fd_dir = os.open(f"{self._proc}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            self.scanned_processes += 1
            if len(self._holder) > MAX_CACHED:
                self._holder.clear()
            holder = (pid, started)
            last = self._last_fd.get(pid)
            likely = [] if last is None else [last, last + 1, last + 2]
            for fds in (likely, None):
                if fds is None:
                    fds = sorted(map(int, os.listdir(fd_dir)), reverse=True)
                for fd in fds:
                    try:
                        target = os.readlink(str(fd), dir_fd=fd_dir)
                    except OSError:
                        continue
                    if target.startswith("socket:["):
                        inode = int(target[8:-1])
                        self._holder[inode] = holder
                        if inode == wanted:
                            self._last_fd[pid] = fd
                            return started
        except OSError:
            return None
        finally:
            os.close(fd_dir)
        return None

    def _start_time(self, pid: int) -> int | None:
        """Field 22 of /proc/PID/stat (clock ticks since boot); None if the process is gone."""
        try:  # os.open and os.read: half the cost of open(), and this runs once per lookup
            fd = os.open(f"{self._proc}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
            try:
                text = os.read(fd, 4096)
            finally:
                os.close(fd)
        except OSError:
            return None
        # The command name (field 2) may hold spaces and ")": split after its last ")".
        fields = text[text.rfind(b")") + 2 :].split()
        try:
            return int(fields[19])
        except (IndexError, ValueError):
            return None

    def _executable(self, pid: int, started: int) -> str | None:
        cached = self._exe.get(pid)
        if cached is not None and cached[0] == started:
            return cached[1]
        try:
            path = os.readlink(f"{self._proc}/{pid}/exe")
        except OSError:
            return None
        path = path.removesuffix(_DELETED)
        if len(self._exe) > MAX_CACHED:
            self._exe.clear()
        self._exe[pid] = (started, path)
        return path
