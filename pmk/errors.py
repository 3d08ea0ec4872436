"""Errors a person can act on: one line for them, and the exit status to end with.

Anything raised as a ``PmkError`` reaches the command line as a single line
on stderr (``pmk: <message>``) and the status below, never as a traceback.
"""

from __future__ import annotations

# A mistake in how pmk was invoked: a bad flag, a bad config or policy file.
EXIT_USAGE = 2
# pmk was invoked well but could not do it: busy endpoint, no privileges, no kernel support.
EXIT_RUNTIME = 1


class PmkError(Exception):
    """A failure with a message fit for a person; ends ``pmk`` with ``exit_status``."""

    exit_status = EXIT_RUNTIME


class UsageError(PmkError):
    """The operator asked for something invalid (flag, config, policy, scope)."""

    exit_status = EXIT_USAGE
