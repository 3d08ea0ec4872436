"""Which process owns a connection's local socket, asked once per decide request.

The lookup itself is I/O (pmk.host.owner on Linux: one exact sock_diag
request, then /proc, ~50-100 us per new connection), so the service is handed
it as a function and the tests hand it a fake. It runs on the event loop:
a hop to a worker thread and back costs more than the lookup, and the ask it
serves cannot be sent before the answer anyway. A failing lookup must not
cost the packet its decision: the fields stay nil and the failure is counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from pmk.verdicts import ConnKey

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Owner:
    """The process that owns a connection's local socket (what every platform's lookup returns)."""

    pid: int
    process: str | None  # the executable's real path (None when it cannot be read)
    uid: int | None  # the socket's owner; None where the platform has no uids (Windows)


#: (connection key, outbound) -> the local socket's owner, or None when no socket owns it.
OwnerOf = Callable[[ConnKey, bool], "Owner | None"]


def no_owner(key: ConnKey, outbound: bool) -> Owner | None:
    """Where pmk cannot attribute connections (no lookup for the platform)."""
    return None


class Attribution:
    """The injected lookup, with its failures counted instead of raised."""

    def __init__(self, owner_of: OwnerOf = no_owner) -> None:
        self._owner_of = owner_of
        #: lookups that raised (``attribution_errors`` in get_stats)
        self.errors = 0

    def owner(self, key: ConnKey, outbound: bool) -> Owner | None:
        try:
            return self._owner_of(key, outbound)
        except Exception:
            self.errors += 1
            # The first failure in full; a broken lookup would otherwise log per connection.
            log.log(logging.WARNING if self.errors == 1 else logging.DEBUG, "owner lookup failed", exc_info=True)
            return None
