"""Method and notification names of protocol/SPEC.md, spelled once.

Plain strings (not an enum) because they go on the wire as they are, once
per request.
"""

from __future__ import annotations

# Client -> server methods (SPEC section 4).
HELLO = "hello"
GET_PAYLOAD = "get_payload"
GET_STATS = "get_stats"
GET_VERSION = "get_version"
CLEAR_CACHE = "clear_cache"
UPDATE_VERDICT = "update_verdict"
LIST_CONNECTIONS = "list_connections"
SUBSCRIBE = "subscribe"

# Server -> decider request (SPEC section 5).
DECIDE = "decide"

# Server -> client notifications (SPEC section 8).
PROTOCOL_ERROR = "protocol_error"
WITHDRAWN = "withdrawn"
REFUSED = "refused"
CONNECTION_NEW = "connection_new"
CONNECTION_END = "connection_end"
#: also the topic of ``subscribe``
BANDWIDTH = "bandwidth"
