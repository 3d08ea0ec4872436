"""Windows named-pipe endpoint. UNTESTED: no Windows machine was available.

asyncio offers a pipe server only on the Proactor loop
(``start_serving_pipe``), and it creates pipes with the default security
descriptor. This module is the one place where Windows-specific serving
lives, so that it can be replaced by hand-made pipe handles with an explicit
DACL without touching the rest of pmk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class _PipeListener:
    """Adapts the Proactor's pipe server list to the ``close``/``wait_closed`` shape."""

    def __init__(self, servers: list[Any]) -> None:
        self._servers = servers

    def close(self) -> None:
        for server in self._servers:
            server.close()

    async def wait_closed(self) -> None:
        return None


async def serve(loop: asyncio.AbstractEventLoop, address: str, factory: Callable[[], asyncio.Protocol]) -> Any:
    """Serve ``factory`` on the pipe ``address`` (Proactor loop required)."""
    start = getattr(loop, "start_serving_pipe", None)
    if start is None:
        raise RuntimeError("named pipes need asyncio's Proactor event loop on Windows")
    servers = await start(factory, address)
    return _PipeListener(servers)
