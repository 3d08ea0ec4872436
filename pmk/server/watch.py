"""A periodic look at counters that need an operator's attention.

``bypassed`` counts packets the kernel let through without asking pmk
(eBPFDivert does this when its ring is full). Nothing in the packet path can
react to it, so the server checks the counter once per interval and logs a
warning when it grew: the operator learns that the firewall failed open.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("pmk.server")

BYPASS_CHECK_INTERVAL = 1.0


class BypassWatch:
    """Logs a warning whenever ``read_bypassed()`` grew since the last check."""

    def __init__(self, read_bypassed: Callable[[], int], interval: float = BYPASS_CHECK_INTERVAL) -> None:
        self._read = read_bypassed
        self._interval = interval
        self._last = 0
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: How many warnings were logged (read by tests and stats).
        self.warnings = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._last = self._safe_read()
        self._handle = loop.call_later(self._interval, self._check)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _safe_read(self) -> int:
        try:
            return int(self._read())
        except Exception:  # a counter read must never stop the server
            log.debug("could not read the bypass counter", exc_info=True)
            return self._last

    def _check(self) -> None:
        now = self._safe_read()
        if now > self._last:
            self.warnings += 1
            log.warning(
                "%d packets bypassed pmk in the last %.0f s (%d in total): the capture backend passed them "
                "unfiltered because pmk could not keep up",
                now - self._last,
                self._interval,
                now,
            )
        self._last = now
        if self._loop is not None:
            self._handle = self._loop.call_later(self._interval, self._check)
