"""Tell systemd how pmk is doing (``Type=notify``): ready, alive, stopping.

systemd passes a datagram socket in ``$NOTIFY_SOCKET``; each message is one
datagram of ``KEY=value`` lines. READY=1 is sent only once pmk serves, so units
ordered after pmk start when verdicts can be asked for. The watchdog ping runs on
the event loop itself: if the loop hangs, the pings stop and systemd restarts pmk
(``WatchdogSec``). Without ``$NOTIFY_SOCKET`` (not under systemd) every call does
nothing. The protocol is small enough that no library is needed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def socket_address(value: str) -> str | bytes:
    """The address to send to: a path, or an abstract name written with a leading '@'."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def watchdog_seconds(environ: Mapping[str, str], pid: int) -> float | None:
    """The watchdog period systemd asks of this process, or None when there is none."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (owner and owner != str(pid)):
        return None
    return int(usec) / 1e6


class Notifier:
    """Sends sd_notify messages; a no-op when ``address`` is None."""

    def __init__(self, address: str | bytes | None, watchdog: float | None = None) -> None:
        self.address = address
        #: systemd's watchdog period in seconds; pmk pings at half of it.
        self.watchdog = watchdog if address is not None else None
        self._ping: asyncio.TimerHandle | None = None
        self._failed = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        value = environ.get("NOTIFY_SOCKET", "")
        address = socket_address(value) if value else None
        return cls(address, watchdog_seconds(environ, os.getpid()))

    def send(self, *lines: str) -> bool:
        """Send one message; False when not under systemd or when it failed (logged once)."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as error:
            if not self._failed:
                log.warning("cannot notify systemd at %r: %s", self.address, error)
                self._failed = True
            return False
        return True

    def ready(self, status: str, loop: asyncio.AbstractEventLoop) -> None:
        """pmk serves: say so, and start the watchdog pings on ``loop`` when asked for."""
        self.send("READY=1", f"STATUS={status}")
        if self.watchdog is not None:
            self._ping_every(loop, self.watchdog / 2)

    def _ping_every(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        self.send("WATCHDOG=1")
        self._ping = loop.call_later(seconds, self._ping_every, loop, seconds)

    def stopping(self) -> None:
        """pmk is shutting down: stop the pings (systemd expects none now) and say so."""
        if self._ping is not None:
            self._ping.cancel()
            self._ping = None
        self.send("STOPPING=1", "STATUS=stopping")
