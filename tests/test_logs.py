"""Log formats: JSON lines for machines, no timestamp under journald, the usual line otherwise."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from pmk.errors import UsageError
from pmk.logs import configure_logging, under_journald


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def journal_id(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def test_json_lines_carry_the_message_and_extra_fields(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with open(path, "w") as out:
        configure_logging("info", "json", out)
        log = logging.getLogger("pmk.test")
        log.debug("not shown")
        log.info("client %s connected", "blocklist", extra={"client": 3, "peer": Path("/run/x")})
        try:
            raise ValueError("bad")
        except ValueError:
            log.exception("it failed")
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "client blocklist connected"
    assert (first["level"], first["logger"], first["client"], first["peer"]) == ("info", "pmk.test", 3, "/run/x")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", first["ts"])
    assert "args" not in first and "msg" not in first  # the record's own fields stay out
    assert second["level"] == "error" and "ValueError: bad" in second["exception"]


def test_human_format_has_a_timestamp_off_journald(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    path = tmp_path / "log"
    with open(path, "w") as out:
        assert not under_journald(out)
        configure_logging("info", "human", out)
        logging.getLogger("pmk").warning("rules restored")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING pmk: rules restored\n", path.read_text())


def test_under_journald_no_timestamp_and_a_priority_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "log"
    with open(path, "w") as out:
        monkeypatch.setenv("JOURNAL_STREAM", journal_id(path))
        assert under_journald(out)
        configure_logging("info", "human", out)
        logging.getLogger("pmk").warning("rules restored")
        logging.getLogger("pmk").info("two\nlines")
    assert path.read_text() == "<4>WARNING pmk: rules restored\n<6>INFO pmk: two\n  lines\n"


def test_inherited_journal_stream_of_another_file_does_not_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "journal"
    other.write_text("")
    monkeypatch.setenv("JOURNAL_STREAM", journal_id(other))
    with open(tmp_path / "log", "w") as out:
        assert not under_journald(out)
    monkeypatch.setenv("JOURNAL_STREAM", "garbage")
    with open(tmp_path / "log", "w") as out:
        assert not under_journald(out)


def test_bad_level_or_format_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--log-level"):
        configure_logging("loud", "human")
    with pytest.raises(UsageError, match="--log-format"):
        configure_logging("info", "xml")
