"""The collector settings pmk serve runs with (pmk/server/collector.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from pmk.server import collector


@pytest.fixture
def restored_collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_collector")
def test_serving_freezes_what_exists_and_spaces_collections_out() -> None:
    collector.tune_for_serving()
    assert gc.get_threshold() == (collector.YOUNG_THRESHOLD, collector.MIDDLE_THRESHOLD, collector.FULL_THRESHOLD)
    assert gc.get_freeze_count() > 0
    # Cycles made later are still collected.
    ring: list[object] = []
    ring.append(ring)
    del ring
    assert gc.collect() >= 1
