"""Decision lines: what one says, and the token bucket under a flood (fake clock)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest

from pmk.server.decision_log import DEFAULT_LINES_BURST, DEFAULT_LINES_PER_SECOND, DecisionLog, describe
from pmk.verdicts import ConnKey, Verdict, conn_key_from_strings


@dataclass(frozen=True, slots=True)
class Decided:
    key: ConnKey
    outbound: bool
    verdict: Verdict
    permanent: bool
    by: str
    name: str


SSH = conn_key_from_strings(6, "198.18.0.1", 22, "198.18.0.2", 50000)


@pytest.mark.parametrize(
    ("decided", "line"),
    [
        (
            Decided(SSH, False, Verdict.ACCEPT, True, "policy", "ssh-in"),
            "inbound tcp 198.18.0.2:50000 -> 198.18.0.1:22 accept permanent by policy rule ssh-in",
        ),
        (
            Decided(
                conn_key_from_strings(17, "fd00::1", 40000, "fd00::53", 53), True, Verdict.DROP, False, "decider", "fw"
            ),
            "outbound udp [fd00::1]:40000 -> [fd00::53]:53 drop temporary by decider fw",
        ),
        (
            Decided(conn_key_from_strings(1, "198.18.0.1", 0, "198.18.0.2", 0), True, Verdict.BLOCK, True, "cache", ""),
            "outbound icmp 198.18.0.1 -> 198.18.0.2 block permanent by cache",
        ),
        (
            Decided(SSH, False, Verdict.ACCEPT, True, "existing", ""),
            "open tcp 198.18.0.1:22 <-> 198.18.0.2:50000 accept permanent by existing at start",
        ),
        (
            Decided(SSH, False, Verdict.BLOCK, True, "operator", ""),
            "inbound tcp 198.18.0.2:50000 -> 198.18.0.1:22 block permanent by operator (update_verdict)",
        ),
    ],
)
def test_a_line_says_direction_ends_verdict_permanence_and_who(decided: Decided, line: str) -> None:
    assert describe(decided) == line


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        assert record.levelno == logging.INFO
        self.lines.append(record.getMessage())


@pytest.fixture
def captured() -> tuple[logging.Logger, Lines]:
    logger = logging.getLogger("pmk.test.decisions")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = Lines()
    logger.handlers[:] = [handler]
    return logger, handler


ONE = Decided(SSH, False, Verdict.ACCEPT, True, "policy", "ssh-in")


def test_a_flood_logs_the_burst_then_the_rate_and_says_how_many_were_held_back(
    captured: tuple[logging.Logger, Lines],
) -> None:
    logger, handler = captured
    log = DecisionLog(logger, per_second=4, burst=5)
    for _ in range(100):  # 100 decisions at the same instant
        log.record(ONE, now=100.0)
    assert handler.lines == [describe(ONE)] * 5
    assert log.suppressed == 95
    log.record(ONE, now=100.125)  # half a token later: still held back
    log.record(ONE, now=100.25)  # one token: the line passes; the count waits for its interval
    assert handler.lines == [describe(ONE)] * 6
    assert log.suppressed == 96
    log.record(ONE, now=101.0)  # a second after the first held-back line: the count, then this line
    assert handler.lines[6:] == ["96 decision lines suppressed in the last 1.0 s (limit 4 lines/s)", describe(ONE)]
    assert log.suppressed == 0
    for _ in range(10):  # 0.75 s refilled 3 tokens, one went to the line above: 2 pass
        log.record(ONE, now=101.0)
    assert len(handler.lines) == 8 + 2
    assert log.suppressed == 8


def test_flush_reports_a_flood_that_has_ended(captured: tuple[logging.Logger, Lines]) -> None:
    logger, handler = captured
    log = DecisionLog(logger, per_second=1, burst=1)
    log.record(ONE, now=0.0)
    log.record(ONE, now=0.1)
    log.record(ONE, now=0.2)
    log.flush(now=0.5)  # not a second yet
    assert handler.lines == [describe(ONE)]
    log.flush(now=1.5)
    assert handler.lines[1] == "2 decision lines suppressed in the last 1.4 s (limit 1 lines/s)"
    log.flush(now=5.0)  # nothing left to say
    assert len(handler.lines) == 2


def test_the_final_flush_reports_what_is_held_back_at_once(captured: tuple[logging.Logger, Lines]) -> None:
    logger, handler = captured
    log = DecisionLog(logger, per_second=1, burst=1)
    for moment in (0.0, 0.1, 0.2):
        log.record(ONE, now=moment)
    log.flush(now=0.3, final=True)  # pmk stops: no second to wait for
    assert handler.lines[1:] == ["2 decision lines suppressed in the last 0.2 s (limit 1 lines/s)"]
    assert log.suppressed == 0


def test_a_long_flood_is_bounded_and_every_decision_is_logged_or_counted(
    captured: tuple[logging.Logger, Lines],
) -> None:
    logger, handler = captured
    log = DecisionLog(logger)
    now = 0.0
    for _ in range(10_000):  # 1000 decisions/s for 10 s
        log.record(ONE, now)
        now += 0.001
    log.flush(now + 1.0)
    decision_lines = [line for line in handler.lines if "suppressed" not in line]
    reports = [line for line in handler.lines if "suppressed" in line]
    assert len(decision_lines) <= DEFAULT_LINES_BURST + DEFAULT_LINES_PER_SECOND * 10 + 1
    assert len(reports) <= 11
    assert len(decision_lines) + sum(int(line.split()[0]) for line in reports) == 10_000


def test_nothing_is_counted_when_info_is_off(captured: tuple[logging.Logger, Lines]) -> None:
    logger, handler = captured
    logger.setLevel(logging.WARNING)
    log = DecisionLog(logger, per_second=1, burst=1)
    for _ in range(5):
        log.record(ONE, now=0.0)
    assert handler.lines == []
    assert log.suppressed == 0


def test_a_bucket_that_can_never_log_is_refused() -> None:
    with pytest.raises(ValueError):
        DecisionLog(logging.getLogger("x"), per_second=0)
