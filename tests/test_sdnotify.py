"""pmk tells systemd it is ready only once it serves, pings the watchdog, and says when it stops.

The unit tests listen on a datagram socket as systemd does; the end-to-end test
runs ``pmk serve`` in a namespace with ``NOTIFY_SOCKET`` pointing at such a
socket and checks the order of what arrives against what pmk does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator

import pytest

from pmk.server.sdnotify import Notifier, socket_address, watchdog_seconds
from tests.harness import BACKENDS, REPO, PmkProcess, backend_skip_reason, needs_root
from tests.netns import two_hosts


@contextlib.contextmanager
def listening(address: str | bytes) -> Iterator[socket.socket]:
    """A datagram socket bound where systemd's would be."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        yield sock


def received(sock: socket.socket, timeout: float) -> list[str]:
    """The next message, as its lines ([] when none came within ``timeout``)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(4096).decode().split("\n")
    except TimeoutError:
        return []


def test_addresses_with_an_at_sign_are_abstract() -> None:
    assert socket_address("@pmk/notify") == b"\0pmk/notify"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"


def test_watchdog_period_only_for_this_process() -> None:
    assert watchdog_seconds({"WATCHDOG_USEC": "20000000"}, pid=7) == 20.0
    assert watchdog_seconds({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "7"}, pid=7) == 20.0
    assert watchdog_seconds({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "8"}, pid=7) is None
    assert watchdog_seconds({"WATCHDOG_USEC": "0"}, pid=7) is None
    assert watchdog_seconds({}, pid=7) is None


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "1000000"})
    assert notifier.address is None and notifier.watchdog is None
    assert notifier.send("READY=1") is False


def test_messages_reach_an_abstract_socket() -> None:
    name = f"@pmk-test-{uuid.uuid4().hex}"
    with listening(socket_address(name)) as sock:
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": name})
        assert notifier.send("STATUS=hello") is True
        assert received(sock, 2) == ["STATUS=hello"]


def test_a_missing_socket_is_reported_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier("/nonexistent/pmk-notify")
    assert notifier.send("READY=1") is False
    assert notifier.send("READY=1") is False
    assert len([r for r in caplog.records if "cannot notify systemd" in r.message]) == 1  # said once


async def test_ready_then_pings_at_half_the_period_then_stopping() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "notify")
        with listening(path) as sock:
            notifier = Notifier.from_environment({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
            notifier.ready("serving", asyncio.get_running_loop())
            assert received(sock, 2) == ["READY=1", "STATUS=serving"]
            started = time.monotonic()
            await asyncio.sleep(0.5)
            notifier.stopping()
            pings = []
            while (lines := received(sock, 0.1)) and lines != ["STOPPING=1", "STATUS=stopping"]:
                pings.append(lines)
            assert lines == ["STOPPING=1", "STATUS=stopping"]
            # One ping at READY, then one every 0.2 s: 3 or 4 within 0.5 s (the machine may be slow).
            assert pings and all(p == ["WATCHDOG=1"] for p in pings)
            assert 2 <= len(pings) <= 4, (pings, time.monotonic() - started)
            await asyncio.sleep(0.5)
            assert received(sock, 0.1) == []  # no ping after STOPPING


@needs_root
@pytest.mark.netns
@pytest.mark.parametrize("backend", BACKENDS)
async def test_pmk_says_ready_only_once_it_serves(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if reason := backend_skip_reason(backend):
        pytest.skip(reason)
    # A path socket: abstract names belong to a network namespace, and pmk runs in another.
    with tempfile.TemporaryDirectory() as tmp, two_hosts() as hosts:
        notify_path = os.path.join(tmp, "notify")
        with listening(notify_path) as sock:
            monkeypatch.setenv("NOTIFY_SOCKET", notify_path)
            monkeypatch.setenv("WATCHDOG_USEC", "1000000")
            pmk = PmkProcess(hosts, backend, ["tcp:7301"])
            try:
                # Started by hand: PmkProcess.start would wait until pmk serves.
                with open(pmk.log_path, "wb") as log:
                    pmk.proc = subprocess.Popen(
                        pmk.argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
                    )
                ready = await asyncio.to_thread(received, sock, 60)
                assert ready[0] == "READY=1", ready
                # The moment READY arrives the endpoint accepts and capture runs.
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.connect(pmk.path)
                assert "serving on" in pmk.log()
                pings = [await asyncio.to_thread(received, sock, 5) for _ in range(3)]
                assert pings == [["WATCHDOG=1"]] * 3, pings
                assert pmk.proc is not None
                pmk.proc.send_signal(signal.SIGTERM)
                lines = await asyncio.to_thread(received, sock, 10)
                while lines == ["WATCHDOG=1"]:
                    lines = await asyncio.to_thread(received, sock, 10)
                assert lines == ["STOPPING=1", "STATUS=stopping"], pmk.log()
                assert await asyncio.to_thread(pmk.proc.wait, 30) == 0, pmk.log()
            finally:
                pmk.cleanup()
