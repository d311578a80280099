"""Prefetch of quiet studies: the decision (pure) and the round over a real SQLite index and store."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from node.completion import complete_due_studies
from node.config import Settings
from node.prefetch import Prefetcher, QuietStudy, choose, prefetch_after_s
from storage.models import utcnow
from storage.store import InstanceStore
from tests.unit.node.conftest import IndexFn

STUDY = "1.2.826.0.1.3680043.8.498.20"
SERIES = f"{STUDY}.1"
DESTINATION = "PACS@127.0.0.1:104"
T0 = datetime(2026, 12, 6, 1, 0, 0).astimezone()


def test_after_is_half_a_second_or_half_a_short_quiet_period() -> None:
    assert prefetch_after_s(15) == 0.5
    assert prefetch_after_s(2) == 0.5
    assert prefetch_after_s(0.6) == 0.3


def test_choose_takes_quiet_studies_once_per_last_instance_and_bounds_their_size() -> None:
    quiet = QuietStudy(1, T0, 100)
    busy = QuietStudy(2, T0 + timedelta(seconds=0.8), 100)
    huge = QuietStudy(3, T0, 10_000)
    now = T0 + timedelta(seconds=1)

    assert choose([quiet, busy, huge], {}, now=now, after_s=0.5, max_bytes=1_000) == [1]
    # read back once: not again while nothing new arrived
    assert choose([quiet, busy, huge], {1: T0}, now=now, after_s=0.5, max_bytes=1_000) == []
    # the busy one turns quiet; the first received more since it was read back and is quiet again
    later = now + timedelta(seconds=2)
    again = QuietStudy(1, T0 + timedelta(seconds=1.2), 150)
    assert choose([again, busy], {1: T0}, now=later, after_s=0.5, max_bytes=1_000) == [1, 2]
    # exactly at the moment counts as quiet (the scheduler wakes up then)
    assert choose([busy], {}, now=busy.last_received_at + timedelta(seconds=0.5), after_s=0.5) == [2]


@pytest.fixture
def settings(settings_for: Callable[..., Settings]) -> Settings:
    return settings_for(quiet_period_s=10, destination=DESTINATION)


def _spy(store: InstanceStore, monkeypatch: pytest.MonkeyPatch) -> list[list[Path]]:
    calls: list[list[Path]] = []
    real = store.prefetch

    def prefetch(paths):  # type: ignore[no-untyped-def]
        asked = real(paths)
        calls.append(asked)
        return asked

    monkeypatch.setattr(store, "prefetch", prefetch)
    return calls


def test_a_round_reads_back_the_series_a_rule_would_process_once(
    sessions: sessionmaker[Session], settings: Settings, store: InstanceStore, index: IndexFn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t0 = utcnow() - timedelta(hours=1)
    calls = _spy(store, monkeypatch)
    # an SR series in the same study: no rule reads it, so it stays on disk
    index(STUDY, f"{STUDY}.2", 1, now=t0, modality="SR", sop_class="1.2.840.10008.5.1.4.1.1.88.22")
    index(STUDY, SERIES, 1, now=t0)
    index(STUDY, SERIES, 2, now=t0 + timedelta(seconds=1))
    prefetcher = Prefetcher(sessions, settings, store)
    ct_files = sorted(p for p in (store.root / "instances" / STUDY / SERIES).iterdir())

    assert prefetcher.next_at(now=t0 + timedelta(seconds=1.2)) == t0 + timedelta(seconds=1.5)
    assert prefetcher.run(now=t0 + timedelta(seconds=1.2)) == 0  # not quiet long enough
    assert prefetcher.run(now=t0 + timedelta(seconds=1.5)) == 2
    assert [sorted(c) for c in calls] == [ct_files]
    assert prefetcher.next_at(now=t0 + timedelta(seconds=1.6)) is None
    assert prefetcher.run(now=t0 + timedelta(seconds=3)) == 0  # once

    # a third instance: read back again once quiet, the whole series
    index(STUDY, SERIES, 3, now=t0 + timedelta(seconds=4))
    assert prefetcher.run(now=t0 + timedelta(seconds=5)) == 3
    assert prefetcher.run(now=t0 + timedelta(seconds=6)) == 0

    # completed: forgotten, nothing more to read
    complete_due_studies(sessions, settings, now=t0 + timedelta(seconds=15))
    assert prefetcher.run(now=t0 + timedelta(seconds=16)) == 0
    assert prefetcher._prefetched == {}


def test_a_study_no_rule_reads_is_not_read_back(
    sessions: sessionmaker[Session], settings: Settings, store: InstanceStore, index: IndexFn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t0 = utcnow() - timedelta(hours=1)
    calls = _spy(store, monkeypatch)
    index(STUDY, f"{STUDY}.2", 1, now=t0, modality="SR", sop_class="1.2.840.10008.5.1.4.1.1.88.22")
    assert Prefetcher(sessions, settings, store).run(now=t0 + timedelta(seconds=2)) == 0
    assert calls == []
