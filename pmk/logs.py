"""How pmk's log lines look: for a person, for journald, or one JSON object per line.

journald stamps every line it receives with its own time, so under journald
the human format leaves the timestamp out and starts each line with the
``<N>`` syslog priority prefix journald reads (``SyslogLevelPrefix=``, on by
default) so that ``journalctl -p warning`` works. Whether stderr goes to
journald is told by ``JOURNAL_STREAM``: systemd sets it to the device and
inode numbers of the stream it connected, and it only counts if they are
still those of our stderr (a child whose stderr was redirected inherits the
variable but not the stream).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import IO, Any

from pmk.errors import UsageError

#: The first is the default.
FORMATS = ("human", "json")
LEVELS = ("debug", "info", "warning", "error", "critical")
_HUMAN = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_JOURNAL = "<%(priority)d>%(levelname)s %(name)s: %(message)s"
#: syslog priorities (sd-daemon.h) of Python's levels.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "priority"}


def under_journald(stream: IO[str]) -> bool:
    """Whether ``stream`` is the journal stream systemd connected (``JOURNAL_STREAM``)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    device, sep, inode = expected.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{device}:{inode}"


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.priority = _PRIORITY.get(record.levelno, 6)
        # A traceback's lines after the first would reach journald without a prefix: keep them in one entry.
        return super().format(record).replace("\n", "\n  ")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, then the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _RECORD_FIELDS and name not in entry:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: str, fmt: str, stream: IO[str] | None = None) -> None:
    """Send every log record at ``level`` and above to ``stream`` (stderr) in format ``fmt``."""
    if level.lower() not in LEVELS:
        raise UsageError(f"--log-level {level!r}: expected one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise UsageError(f"--log-format {fmt!r}: expected one of {', '.join(FORMATS)}")
    out = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(out)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif under_journald(out):
        handler.setFormatter(_JournalFormatter(_JOURNAL))
    else:
        handler.setFormatter(logging.Formatter(_HUMAN))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
