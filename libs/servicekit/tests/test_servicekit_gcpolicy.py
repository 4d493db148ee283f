"""The garbage collector's policy: start-up's objects frozen out of the collections, the young threshold
raised, the collections counted."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from v2v_servicekit import gcpolicy


@pytest.fixture
def restored() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.set_threshold(*thresholds)
    gc.unfreeze()
    if gcpolicy.STATS.callback in gc.callbacks:
        gc.callbacks.remove(gcpolicy.STATS.callback)


def test_apply_freezes_sets_the_young_threshold_and_counts_collections(restored: None) -> None:
    _, older, oldest = gc.get_threshold()
    assert gcpolicy.apply(freeze=True, young_threshold=12_345) == (12_345, older, oldest)
    assert gc.get_freeze_count() > 1000  # everything the interpreter and the imports made
    before = sum(gcpolicy.STATS.collections)
    gc.collect(0)
    assert sum(gcpolicy.STATS.collections) == before + 1 and gcpolicy.STATS.seconds > 0


def test_zero_keeps_the_thresholds_and_no_freeze_freezes_nothing(restored: None) -> None:
    thresholds = gc.get_threshold()
    gc.unfreeze()
    assert gcpolicy.apply(freeze=False, young_threshold=0) == thresholds
    assert gc.get_freeze_count() == 0
