"""``connection_new`` for observers: every decision, as an event (SPEC section 8).

The event is the ``Decided`` record turned into a map: the decide info of
its packet (or, without a packet, the connection's fields) plus who decided
what. Cache hits are not events. The same map goes to every observer; a slow
observer is cut off by the server like any client that stops reading.
"""

from __future__ import annotations

from typing import Any

from pmk.core.commands import Decided, Notify
from pmk.rpc import names
from pmk.verdicts import ip_text


def connection_new(decided: Decided) -> dict[str, Any]:
    """The ``connection_new`` event of one decision."""
    if decided.info is not None:
        event = dict(decided.info)
    else:
        key = decided.key
        event = {
            "direction": "outbound" if decided.outbound else "inbound",
            "ip_version": 4 if len(key.local_ip) == 4 else 6,
            "protocol": key.protocol,
            "local_ip": ip_text(key.local_ip),
            "local_port": key.local_port,
            "remote_ip": ip_text(key.remote_ip),
            "remote_port": key.remote_port,
        }
    event["verdict"] = decided.verdict.value
    event["permanent"] = decided.permanent
    event["by"] = decided.by
    event["name"] = decided.name
    if decided.to is not None:
        event["to"] = str(decided.to)
    return event


class Observers:
    """Who observes (latest hello said ``observer``) and how many events there were."""

    def __init__(self) -> None:
        self.clients: set[int] = set()
        #: decisions that were events, whether or not anyone observed (``connections_new``)
        self.events = 0

    def notices(self, decided: Decided) -> list[Notify]:
        """What to send for ``decided``: one notification per observer (none for a cache hit)."""
        if decided.by == "cache":
            return []
        self.events += 1
        if not self.clients:
            return []
        params = [connection_new(decided)]
        return [Notify(client, names.CONNECTION_NEW, params) for client in self.clients]
