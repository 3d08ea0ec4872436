"""Row D's rate ladder: find the peak decided rate, not the first rate pmk falls behind.

Pure (no I/O): the runner asks ``next_rate()``, offers that rate, and hands the
outcome to ``record()``. Offered rates climb geometrically for as long as the
decided rate keeps rising, also past the first rate pmk does not follow within
10% (that first miss was where the old ladder stopped, well below the peak); the
climb ends after ``flat_steps`` steps in a row that raise the best decided rate
by less than ``gain``, or when the generator cannot offer more. Then one step
on each side of the best offered rate (geometric midpoints) sharpens the peak.
The peak is the largest decided rate seen; the knee is the highest offered
rate that was followed within ``follow``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Step:
    rate: float  # offered rate asked of the generator
    offered: float  # what the generator sent, per second
    decided: float  # connections decided per second over the window
    cpu100k: float | None = None  # pmk's CPU seconds per 100k decided


@dataclass
class Ladder:
    start: float = 5_000.0
    factor: float = 1.5
    flat_steps: int = 2
    gain: float = 1.03
    follow: float = 0.9
    ceiling: float = 400_000.0
    steps: list[Step] = field(default_factory=list)
    _flat: int = 0
    _climbing: bool = True
    _refine: list[float] | None = None

    def next_rate(self) -> float | None:
        """The next offered rate to try, or None when the peak is found."""
        if self._climbing:
            if not self.steps:
                return self.start
            rate = self.steps[-1].rate * self.factor
            if rate <= self.ceiling:
                return rate
            self._climbing = False
        if self._refine is None:
            self._refine = self._refine_rates()
        return self._refine.pop(0) if self._refine else None

    def record(self, step: Step) -> None:
        best_before = max((s.decided for s in self.steps), default=0.0)
        self.steps.append(step)
        if not self._climbing:
            return
        if step.decided >= best_before * self.gain:
            self._flat = 0
        else:
            self._flat += 1
        generator_spent = step.offered < self.follow * step.rate
        if self._flat >= self.flat_steps or generator_spent:
            self._climbing = False

    def _refine_rates(self) -> list[float]:
        climbed = sorted({s.rate for s in self.steps})
        best = self.peak.rate
        i = climbed.index(best)
        neighbours = climbed[max(0, i - 1) : i] + climbed[i + 1 : i + 2]
        return [math.sqrt(best * other) for other in neighbours]

    @property
    def peak(self) -> Step:
        return max(self.steps, key=lambda s: s.decided)

    @property
    def knee(self) -> float | None:
        """The highest offered rate decided in full (within ``follow``), if any."""
        followed = [s.rate for s in self.steps if s.decided >= self.follow * s.offered]
        return max(followed) if followed else None
