"""Row D's rate ladder finds the peak decided rate (pure: a fake pmk with a known capacity)."""

from __future__ import annotations

from collections.abc import Callable

from pmk.bench.ladder import Ladder, Step


def climb(ladder: Ladder, decided: Callable[[float], float], generator_max: float = 1e9) -> Ladder:
    while (rate := ladder.next_rate()) is not None:
        offered = min(rate, generator_max)
        ladder.record(Step(rate, offered, decided(offered)))
        assert len(ladder.steps) < 30, ladder.steps
    return ladder


def test_peak_found_past_the_first_miss() -> None:
    # Decides 85% of what is offered up to 25k/s: never "follows within 10%", which is where
    # the old ladder stopped (at 5k/s, reporting 4.25k/s).
    ladder = climb(Ladder(), lambda offered: min(0.85 * offered, 25_000))
    assert ladder.peak.decided == 25_000
    assert ladder.knee is None


def test_peak_and_knee_with_a_plateau() -> None:
    ladder = climb(Ladder(), lambda offered: min(offered, 24_900))
    assert ladder.peak.decided == 24_900
    assert ladder.knee is not None and 16_000 < ladder.knee <= 24_900 / 0.9
    assert len(ladder.steps) <= 10


def test_collapse_beyond_the_peak_keeps_the_peak() -> None:
    # Past 20k/s the decided rate falls (the overload collapse of issue 12).
    ladder = climb(Ladder(), lambda offered: offered if offered <= 20_000 else max(2_000, 40_000 - offered))
    assert ladder.peak.decided >= 0.9 * 20_000
    # The refinement steps look on both sides of the best rate climbed.
    rates = [s.rate for s in ladder.steps]
    assert any(16_875 < r < 25_312 for r in rates if r not in (16_875, 25_312.5))


def test_generator_limit_ends_the_climb() -> None:
    ladder = climb(Ladder(), lambda offered: offered, generator_max=30_000)
    assert ladder.peak.decided == 30_000
    assert max(s.rate for s in ladder.steps) < 60_000
