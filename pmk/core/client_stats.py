"""Per-decider figures for ``get_stats``' ``client_list``: answers, timeouts, answer times.

Answer times are kept in a ring of the last ``LATENCY_SAMPLES`` answers and
sorted only when someone asks for the stats, so an answer costs one store.
"""

from __future__ import annotations

#: Answers per decider the latency percentiles are taken over.
LATENCY_SAMPLES = 1024


class DeciderFigures:
    """Counters and recent answer times (seconds) of one client."""

    __slots__ = ("_next", "_samples", "answered", "timeouts")

    def __init__(self) -> None:
        self.answered = 0
        self.timeouts = 0
        self._samples: list[float] = []
        self._next = 0  # where the next sample goes once the ring is full

    def answer(self, seconds: float) -> None:
        self.answered += 1
        if len(self._samples) < LATENCY_SAMPLES:
            self._samples.append(seconds)
        else:
            self._samples[self._next] = seconds
            self._next = (self._next + 1) % LATENCY_SAMPLES

    def percentile_ms(self, fraction: float) -> float | None:
        """The answer time below which ``fraction`` of the recent answers fall, in ms (None: no answer yet)."""
        if not self._samples:
            return None
        ordered = sorted(self._samples)
        index = min(len(ordered) - 1, int(fraction * len(ordered)))
        return round(ordered[index] * 1000, 3)
