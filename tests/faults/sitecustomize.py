"""A fault for end-to-end tests: conntrack mark changes refused, as the kernel would refuse them.

Python imports ``sitecustomize`` at start from PYTHONPATH. With
``PMK_TEST_REFUSE_CONNTRACK`` naming a file, every conntrack mark change
(pyroute2's ``entry("set")``, and the bulk changes of ``pmk.capture.ctbulk``
before they send anything) fails with EPERM for as long as that file exists.
Without the variable this does nothing.
"""

from __future__ import annotations

import errno
import os

_SWITCH = os.environ.get("PMK_TEST_REFUSE_CONNTRACK")

if _SWITCH:
    from typing import Any

    from pyroute2.conntrack import AsyncConntrack
    from pyroute2.netlink.exceptions import NetlinkError

    from pmk.capture.ctbulk import BulkMarks

    _real_entry = AsyncConntrack.entry

    async def _entry(self: AsyncConntrack, cmd: str, **kwargs: Any) -> Any:
        if cmd == "set" and os.path.exists(str(_SWITCH)):
            raise NetlinkError(errno.EPERM)
        return await _real_entry(self, cmd, **kwargs)

    AsyncConntrack.entry = _entry

    _real_rewrite = BulkMarks._rewrite

    def _rewrite(self: BulkMarks, *args: Any) -> int:
        if os.path.exists(str(_SWITCH)):
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        return _real_rewrite(self, *args)

    BulkMarks._rewrite = _rewrite  # type: ignore[method-assign]
