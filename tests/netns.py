"""Throwaway hosts for packet tests; the helper lives in ``pmk.testing.netns``.

It moved into the package so that ``pmk bench`` can build the same hosts;
tests keep importing it from here.
"""

from pmk.testing.netns import TwoHosts, need_root_reason, run, two_hosts

__all__ = ["TwoHosts", "need_root_reason", "run", "two_hosts"]
