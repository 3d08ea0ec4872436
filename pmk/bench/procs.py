"""Processes the benchmark starts: bounded waits, CPU and memory readings, sure cleanup."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import time
from typing import Any

import psutil


class Proc:
    """One child process with line-based JSON output on stdout."""

    def __init__(self, argv: list[str], *, stdin: bool = False, name: str = "") -> None:
        self.name = name or argv[-1]
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.ps = psutil.Process(self.popen.pid)

    def line(self, timeout: float) -> str:
        """The next stdout line; raise TimeoutError if none comes in time."""
        assert self.popen.stdout is not None
        ready, _, _ = select.select([self.popen.stdout], [], [], timeout)
        if not ready:
            tail = self.stderr_tail().strip().replace("\n", " | ")[-300:]
            raise TimeoutError(f"{self.name}: no output within {timeout}s" + (f" (stderr: {tail})" if tail else ""))
        text = self.popen.stdout.readline()
        if not text:
            raise RuntimeError(f"{self.name} exited: {self.stderr_tail()}")
        return text

    def json_line(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            text = self.line(max(0.01, deadline - time.monotonic())).strip()
            if text.startswith("{"):
                return json.loads(text)

    def ask(self, command: str, timeout: float = 5.0) -> dict[str, Any]:
        """Send one command line and read the JSON answer."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(command + "\n")
        self.popen.stdin.flush()
        return self.json_line(timeout)

    def wait_json(self, timeout: float) -> dict[str, Any]:
        """Wait for a run-to-completion child and return its last JSON line."""
        out, err = self.popen.communicate(timeout=timeout)
        for text in reversed(out.splitlines()):
            if text.startswith("{"):
                return json.loads(text)
        raise RuntimeError(f"{self.name} printed no result: {err.strip()[-500:]}")

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def peak_rss(self) -> int:
        """Bytes: the kernel's high-water mark of the resident set (VmHWM)."""
        with open(f"/proc/{self.popen.pid}/status") as f:
            for text in f:
                if text.startswith("VmHWM:"):
                    return int(text.split()[1]) * 1024
        return 0

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def stderr_tail(self) -> str:
        """The end of what the process wrote to stderr so far (without waiting, also while it runs)."""
        with contextlib.suppress(Exception):
            if self.popen.stderr is not None:
                os.set_blocking(self.popen.stderr.fileno(), False)
                return (self.popen.stderr.read() or "")[-800:]
        return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (or end of stdin), then SIGKILL if it lingers."""
        if self.popen.poll() is None:
            if self.popen.stdin is not None:
                with contextlib.suppress(OSError):
                    self.popen.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        for stream in (self.popen.stdout, self.popen.stderr, self.popen.stdin):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class ProcGroup:
    """Every child of one benchmark run; ``stop_all`` ends them, newest first."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(self, argv: list[str], *, stdin: bool = False, name: str = "") -> Proc:
        proc = Proc(argv, stdin=stdin, name=name)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        while self.procs:
            self.procs.pop().stop()
