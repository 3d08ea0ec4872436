"""Throwaway hosts for packet tests; the helper lives in ``pmk.testing.netns``.

It moved into the package so that ``pmk bench`` can build the same hosts;
tests keep importing it from here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pmk.testing.netns import TwoHosts, need_root_reason, run, two_hosts

__all__ = ["TwoHosts", "need_root_reason", "run", "run_script", "two_hosts"]

REPO = Path(__file__).resolve().parent.parent


def run_script(hosts: TwoHosts, ns: str, script: str, timeout: float) -> Any:
    """Run ``script run`` inside namespace ``ns`` (this checkout importable) and return the JSON it prints.

    For tests whose netlink sockets must live in the namespace: the script
    must exit 0 and write nothing to stderr (warnings are errors there).
    """
    argv = ["env", f"PYTHONPATH={REPO}", sys.executable, "-W", "error", script, "run"]
    proc = hosts.sh(ns, *argv, check=False, timeout=timeout)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return json.loads(proc.stdout)
