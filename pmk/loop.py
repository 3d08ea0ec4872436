"""Pick the fastest event loop the platform has."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_name() -> str:
    """Which loop ``run`` will use: uvloop, winloop or asyncio."""
    if sys.platform == "win32":
        try:
            import winloop  # noqa: F401
        except ImportError:
            return "asyncio"
        return "winloop"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T], *, need_pipes: bool = False) -> T:
    """Run ``main`` on uvloop (POSIX) or winloop (Windows), else asyncio's loop.

    ``need_pipes``: a named-pipe server needs asyncio's Proactor loop on Windows.
    """
    name = "asyncio" if need_pipes and sys.platform == "win32" else loop_name()
    if name == "uvloop":
        import uvloop

        return uvloop.run(main)
    if name == "winloop":
        import winloop

        return winloop.run(main)
    return asyncio.run(main)
