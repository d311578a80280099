"""A study's series read ahead by an idle worker (node.preload, node.preloaded): hinted once per
quiet spell and, while instances arrive, every second in which more did; a volume used only by a
job over exactly the files it was read from, held slices only for the files the job's series has;
never holding memory another job needs, and giving the same results as a job that reads the
series itself."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select

from dicom_io.header import parse_header
from dicom_io.volume import SeriesAccumulator
from node import pipeline
from node.completion import complete_due_studies
from node.config import Settings, load_settings
from node.context import NodeContext
from node.preload import PRELOAD_AT, Preloads, volume_hint
from node.preloaded import PreloadedVolume, key_of, process_preloaded
from node.routing import SeriesFacts, StudyFacts
from node.scheduler import Scheduler
from node.volume_budget import resident_bytes
from storage.db import upgrade
from storage.index import index_instance
from storage.models import Job, JobState, Result, utcnow
from tests.phantom import PhantomGeometry, make_ct_phantom
from tests.unit.node.conftest import IndexFn, drain

GEOMETRY = PhantomGeometry(rows=80, columns=80, pixel_spacing_mm=(4.0, 4.0), slice_spacing_mm=10.0, num_slices=18)
CT_RULE = {"name": "ct", "match": {"modality": "CT"}, "tasks": ["ct_analysis"], "destinations": []}


def _count(outcome: str) -> float:
    return REGISTRY.get_sample_value("mednode_volume_preloads_total", {"outcome": outcome}) or 0.0


# -- the worker's slot ---------------------------------------------------------------------------
def test_a_read_ahead_is_taken_once_by_a_job_over_exactly_its_files() -> None:
    slot = PreloadedVolume()
    volume: Any = object()
    reading = slot.begin(key_of("1.2", ["a", "b"]), "series 1.2", hold_s=60)
    assert reading is not None and slot.begin(key_of("1.3", ["c"]), "series 1.3", hold_s=60) is None  # one at a time
    reading.done(volume)
    assert slot.held == key_of("1.2", ["a", "b"])
    used = _count("used")
    assert slot.take(key_of("1.2", ["a", "b"]), "job") is volume
    assert _count("used") == used + 1
    assert slot.take(key_of("1.2", ["a", "b"]), "job") is None and slot.held is None


def test_a_job_over_other_files_drops_the_read_ahead_before_it_loads() -> None:
    slot = PreloadedVolume()
    reading = slot.begin(key_of("1.2", ["a", "b"]), "series 1.2", hold_s=60)
    assert reading is not None
    reading.done(object())  # type: ignore[arg-type]
    discarded = _count("discarded")
    # one more instance arrived after the read: the job's files differ, and it reads them itself
    assert slot.take(key_of("1.2", ["a", "b", "c"]), "job") is None
    assert slot.held is None and _count("discarded") == discarded + 1
    assert slot.take(key_of("1.2", ["a", "b"]), "job") is None


def test_a_job_waits_for_a_read_of_its_own_files_that_is_still_running() -> None:
    slot = PreloadedVolume()
    volume: Any = object()
    reading = slot.begin(key_of("1.2", ["a"]), "series 1.2", hold_s=60)
    assert reading is not None
    taken: list[object] = []
    job = threading.Thread(target=lambda: taken.append(slot.take(key_of("1.2", ["a"]), "job")))
    job.start()
    time.sleep(0.1)
    assert job.is_alive() and not taken  # waiting, not reading the files a second time
    reading.done(volume)
    job.join(5)
    assert taken == [volume]


def test_held_slices_go_on_with_the_next_read_of_their_series_and_serve_a_job_of_more_files() -> None:
    slot = PreloadedVolume()
    reading = slot.begin(key_of("1.2", ["a"]), "series 1.2", hold_s=60, slices=True)
    assert reading is not None and reading.held is None
    held = SeriesAccumulator()
    reading.done(held)
    assert slot.begin(key_of("1.3", ["c"]), "series 1.3", hold_s=60, slices=True) is None  # another series
    again = slot.begin(key_of("1.2", ["a", "b"]), "series 1.2", hold_s=60, slices=True)
    assert again is not None and again.held is held  # the next read adds to what is held
    assert slot.begin(key_of("1.2", ["a", "b", "c"]), "series 1.2", hold_s=60, slices=True) is None  # one at a time
    again.done(held)
    assert slot.take(key_of("1.2", ["a", "b", "c"]), "job") is held  # the job reads "c" itself
    assert slot.held is None


def test_a_read_ahead_of_another_series_of_the_same_study_replaces_the_held_one() -> None:
    slot = PreloadedVolume()
    reading = slot.begin(key_of("1.2.1", ["scout"]), "series 1.2.1", hold_s=60, slices=True, study="1.2")
    assert reading is not None
    reading.done(SeriesAccumulator())
    discarded = _count("discarded")
    # another study's read waits for this one to be taken or let go
    assert slot.begin(key_of("1.3.1", ["x"]), "series 1.3.1", hold_s=60, slices=True, study="1.3") is None
    # the same study's CT is now the largest series: its job will read that one
    ct = slot.begin(key_of("1.2.2", ["a", "b"]), "series 1.2.2", hold_s=60, slices=True, study="1.2")
    assert ct is not None and ct.held is None and _count("discarded") == discarded + 1
    ct.done(SeriesAccumulator())
    assert slot.held == key_of("1.2.2", ["a", "b"])


def test_a_held_volume_is_not_added_to() -> None:
    slot = PreloadedVolume()
    reading = slot.begin(key_of("1.2", ["a"]), "series 1.2", hold_s=60)
    assert reading is not None
    reading.done(object())  # type: ignore[arg-type]
    assert slot.begin(key_of("1.2", ["a", "b"]), "series 1.2", hold_s=60, slices=True) is None


def test_a_read_dropped_while_it_runs_stops_and_is_not_kept() -> None:
    slot = PreloadedVolume()
    reading = slot.begin(key_of("1.2", ["a"]), "series 1.2", hold_s=60)
    assert reading is not None and reading.wanted
    assert slot.take(key_of("9.9", ["z"]), "job of another series") is None
    assert not reading.wanted  # the reader stops between files
    reading.done(object())  # type: ignore[arg-type]  # a reader that finished anyway
    assert slot.held is None
    assert slot.begin(key_of("1.3", ["b"]), "series 1.3", hold_s=60) is not None  # the slot is free again


def test_a_read_ahead_nobody_takes_is_let_go() -> None:
    slot = PreloadedVolume()
    reading = slot.begin(key_of("1.2", ["a"]), "series 1.2", hold_s=0.05)
    assert reading is not None
    expired = _count("expired")
    reading.done(object())  # type: ignore[arg-type]
    deadline = time.monotonic() + 5
    while _count("expired") == expired:  # by its timer: nothing else touches the slot
        assert time.monotonic() < deadline, "the held volume was never let go"
        time.sleep(0.01)
    assert slot.held is None


# -- which studies are read ahead --------------------------------------------------------------
def test_only_a_rule_that_loads_a_volume_asks_for_a_read_ahead(
        settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    settings = settings_for(models={"bundles": {"spleen": str(tmp_path)}}, rules=[
        {"name": "report", "match": {"modality": "CT"}, "tasks": [{"report": {}}], "destinations": []},
        {"name": "seg", "match": {"modality": "MR"}, "tasks": [{"segment": {"bundle": "spleen"}}],
         "destinations": [], "priority": 9},
    ])
    ct = StudyFacts("1.2", series=(SeriesFacts("1.2.1", modality="CT", instance_count=3),))
    mr = StudyFacts("1.3", series=(SeriesFacts("1.3.1", modality="MR", instance_count=3),))
    queue_for: Callable[[Any], str] = lambda rule: f"queue of {rule.name}"
    assert volume_hint(ct, settings.effective_rules, queue_for, 1.0) is None
    hint = volume_hint(mr, settings.effective_rules, queue_for, 1.0)
    assert hint is not None
    assert (hint.series_uids, hint.modalities, hint.queue) == (("1.3.1",), ("CT", "MR"), "queue of seg")


def test_a_study_is_hinted_once_per_quiet_spell_from_half_its_quiet_period(
        sessions: Any, settings_for: Callable[..., Settings], index: IndexFn) -> None:
    settings = settings_for(quiet_period_s=10, volume_preload_while_receiving=False,
                            rules=[CT_RULE, {**CT_RULE, "name": "slow", "quiet_period_s": 40, "match": {"modality": "MR"}}])
    preloads = Preloads(sessions, settings)
    start = utcnow()
    index("1.2", "1.2.1", 1, now=start)
    index("1.2", "1.2.1", 2, now=start)
    assert preloads.due(start + timedelta(seconds=PRELOAD_AT * 10 - 0.5)) == []
    [hint] = preloads.due(start + timedelta(seconds=PRELOAD_AT * 10 + 0.5))
    assert (hint.study_instance_uid, hint.series_uids, hint.modalities) == ("1.2", ("1.2.1",), ("CT",))
    assert hint.expires_s == pytest.approx(10 - (PRELOAD_AT * 10 + 0.5))
    assert preloads.due(start + timedelta(seconds=7)) == []  # once
    # a new instance: a new quiet spell, a new read-ahead
    later = start + timedelta(seconds=8)
    index("1.2", "1.2.1", 3, now=later)
    assert preloads.due(later + timedelta(seconds=1)) == []
    assert len(preloads.due(later + timedelta(seconds=6))) == 1
    # due (quiet for all its quiet period): completion's, no read-ahead any more
    index("1.4", "1.4.1", 1, now=start)
    assert preloads.due(start + timedelta(seconds=11)) == []
    # a rule with a longer quiet period: half of its own
    index("1.5", "1.5.1", 1, now=start, modality="MR")
    assert preloads.due(start + timedelta(seconds=12)) == []
    [hint] = preloads.due(start + timedelta(seconds=21))
    assert hint.study_instance_uid == "1.5"


def test_a_study_still_receiving_is_hinted_each_second_in_which_more_arrived(
        sessions: Any, settings_for: Callable[..., Settings], index: IndexFn) -> None:
    preloads = Preloads(sessions, settings_for(quiet_period_s=10, rules=[CT_RULE]))
    start = utcnow()
    index("1.2", "1.2.1", 1, now=start)
    [hint] = preloads.due(start + timedelta(seconds=0.1))
    assert (hint.study_instance_uid, hint.while_receiving) == ("1.2", True)
    assert hint.expires_s == pytest.approx(9.9)
    index("1.2", "1.2.1", 2, now=start + timedelta(seconds=0.5))
    assert preloads.due(start + timedelta(seconds=0.6)) == []  # not a second since the last
    assert len(preloads.due(start + timedelta(seconds=1.2))) == 1  # a second later, more arrived
    assert preloads.due(start + timedelta(seconds=2.5)) == []  # nothing more arrived
    # quiet for half its quiet period: the quiet spell's own hint, as without this setting
    [quiet] = preloads.due(start + timedelta(seconds=0.5 + PRELOAD_AT * 10 + 0.1))
    assert not quiet.while_receiving


def test_the_scheduler_sends_the_hint_to_the_queue_of_the_job(
        tmp_path: Path, memory_celery: Any, index: IndexFn) -> None:
    settings = load_settings(data_dir=tmp_path / "var", broker_url="memory://", quiet_period_s=30,
                             rules=[CT_RULE])
    ctx = NodeContext.create(settings)
    try:
        upgrade(ctx.engine)
        index("1.2", "1.2.1", 1, now=utcnow() - timedelta(seconds=20))
        scheduler = Scheduler(ctx)
        scheduler.tick()
        [(task, args)] = drain(memory_celery, "inference")
        assert (task, args[:3]) == ("mednode.preload_volume", ["1.2", ["1.2.1"], ["CT"]])
        assert 5 < args[3] <= 10  # seconds until the study is due: the read-ahead is held that long and more
        scheduler.tick()
        assert drain(memory_celery, "inference") == []  # once
        assert 0 < scheduler.wait_s() <= settings.completion_poll_s
    finally:
        ctx.close()


def test_the_scheduler_tells_the_worker_that_the_study_is_still_receiving(
        tmp_path: Path, memory_celery: Any, index: IndexFn) -> None:
    settings = load_settings(data_dir=tmp_path / "var", broker_url="memory://", quiet_period_s=30, rules=[CT_RULE])
    ctx = NodeContext.create(settings)
    try:
        upgrade(ctx.engine)
        index("1.2", "1.2.1", 1, now=utcnow())
        Scheduler(ctx).tick()
        with memory_celery.connection_for_read() as conn:
            queue = conn.SimpleQueue("inference")
            try:
                message = queue.get(block=False)
                message.ack()
            finally:
                queue.close()
        assert message.headers["task"] == "mednode.preload_volume"
        args, kwargs, _ = message.payload
        assert args[:3] == ["1.2", ["1.2.1"], ["CT"]] and kwargs == {"while_receiving": True}
    finally:
        ctx.close()


# -- through the pipeline ------------------------------------------------------------------------
@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[NodeContext]:
    settings = load_settings(data_dir=tmp_path / "var", quiet_period_s=1, rules=[CT_RULE])
    context = NodeContext.create(settings)
    upgrade(context.engine)
    process_preloaded().drop()
    yield context
    process_preloaded().drop()
    context.close()


def _receive(ctx: NodeContext, datasets: list[pydicom.Dataset], now: datetime) -> None:
    for ds in datasets:
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
        header, _ = parse_header(data)
        stored = ctx.store.write_instance(header.study_instance_uid, header.series_instance_uid,
                                          header.sop_instance_uid, data)
        with ctx.sessions() as session, session.begin():
            index_instance(session, header, stored, calling_ae_title="MODALITY", called_ae_title="MEDNODE", now=now)


def _run(ctx: NodeContext, now: datetime) -> dict[str, pydicom.Dataset]:
    [(job_id, _)] = complete_due_studies(ctx.sessions, ctx.settings, now=now + timedelta(seconds=5))
    pipeline.run_job(ctx, job_id)
    with ctx.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == JobState.SUCCEEDED, job.reason if job else None
        return {r.kind: pydicom.dcmread(ctx.store.absolute(r.path))
                for r in session.scalars(select(Result).where(Result.job_pk == job_id))}


def _same_results(a: dict[str, pydicom.Dataset], b: dict[str, pydicom.Dataset]) -> None:
    assert a["seg"].PixelData == b["seg"].PixelData
    assert a["seg"].NumberOfFrames == b["seg"].NumberOfFrames
    assert a["sr"].ContentSequence == b["sr"].ContentSequence  # measurements and references


def _without_read_ahead(tmp_path: Path, slices: list[pydicom.Dataset], now: datetime) -> dict[str, pydicom.Dataset]:
    """The results of the same study on a node that reads its series only in the job."""
    other = NodeContext.create(load_settings(data_dir=tmp_path / "other", quiet_period_s=1, rules=[CT_RULE],
                                             volume_preload=False))
    try:
        upgrade(other.engine)
        _receive(other, slices, now)
        return _run(other, now)
    finally:
        other.close()


@contextmanager
def _decoded() -> Iterator[list[str]]:
    """The SOP Instance UIDs whose pixels are decoded (a slice or a whole volume) meanwhile."""
    decoded: list[str] = []
    add, load_volume = SeriesAccumulator.add, pipeline.load_volume

    def counting_add(self: SeriesAccumulator, key: str, ds: pydicom.Dataset, **kwargs: Any) -> None:
        decoded.append(ds.SOPInstanceUID)
        add(self, key, ds, **kwargs)

    def counting_load(datasets: list[pydicom.Dataset], **kwargs: Any) -> Any:
        decoded.extend(ds.SOPInstanceUID for ds in datasets)
        return load_volume(datasets, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SeriesAccumulator, "add", counting_add)
        patch.setattr(pipeline, "load_volume", counting_load)
        yield decoded


def test_a_job_takes_the_read_ahead_and_writes_what_it_would_have_written(
        ctx: NodeContext, tmp_path: Path) -> None:
    slices = make_ct_phantom(geometry=GEOMETRY, noise_hu_sd=10.0, seed=3)
    now = utcnow() - timedelta(hours=1)
    _receive(ctx, slices, now)
    read, used = _count("read"), _count("used")
    assert pipeline.preload_series(ctx, slices[0].StudyInstanceUID, [slices[0].SeriesInstanceUID], ("CT",)) == "read"
    assert process_preloaded().held is not None
    with _decoded() as decoded:
        preloaded = _run(ctx, now)
    assert decoded == [] and process_preloaded().held is None  # the job decoded no file of the series
    assert _count("used") == used + 1

    _same_results(preloaded, _without_read_ahead(tmp_path, slices, now))
    assert _count("read") == read + 1


def test_an_instance_received_after_the_read_ahead_is_read_by_the_job_alone(ctx: NodeContext) -> None:
    slices = make_ct_phantom(geometry=GEOMETRY, noise_hu_sd=10.0, seed=4)
    now = utcnow() - timedelta(hours=1)
    _receive(ctx, slices[:-1], now)
    study, series = slices[0].StudyInstanceUID, slices[0].SeriesInstanceUID
    assert pipeline.preload_series(ctx, study, [series], ("CT",)) == "read"
    _receive(ctx, slices[-1:], now)  # the last slice arrives during the quiet period
    used, discarded = _count("used"), _count("discarded")
    with _decoded() as decoded:
        results = _run(ctx, now)
    assert decoded == [slices[-1].SOPInstanceUID]  # the held slices are used, the late one read
    assert _count("used") == used + 1 and _count("discarded") == discarded
    referenced = {item.ReferencedSOPInstanceUID
                  for item in results["seg"].ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in slices}  # every slice, the late one included


def test_a_series_read_as_it_arrives_gives_the_results_of_a_job_that_reads_it_all(
        ctx: NodeContext, tmp_path: Path) -> None:
    slices = make_ct_phantom(geometry=GEOMETRY, noise_hu_sd=10.0, seed=8)
    now = utcnow() - timedelta(hours=1)
    study, series = slices[0].StudyInstanceUID, slices[0].SeriesInstanceUID
    for part in (slices[:5], slices[5:12], slices[12:16]):  # three hints while it arrives
        _receive(ctx, part, now)
        with _decoded() as decoded:
            assert pipeline.preload_series(ctx, study, [series], ("CT",), while_receiving=True) == "read"
        assert sorted(decoded) == sorted(ds.SOPInstanceUID for ds in part)  # only what arrived since
    _receive(ctx, slices[16:], now)
    with _decoded() as decoded:
        results = _run(ctx, now)
    assert sorted(decoded) == sorted(ds.SOPInstanceUID for ds in slices[16:])
    _same_results(results, _without_read_ahead(tmp_path, slices, now))


def test_a_scout_received_first_gives_way_to_the_series_the_job_reads(ctx: NodeContext) -> None:
    slices = make_ct_phantom(geometry=GEOMETRY, noise_hu_sd=10.0, seed=12)
    study, series = slices[0].StudyInstanceUID, slices[0].SeriesInstanceUID
    scout = make_ct_phantom(geometry=GEOMETRY, study_instance_uid=study, series_instance_uid="2.25.77",
                            frame_of_reference_uid=slices[0].FrameOfReferenceUID, series_number=9, seed=13)[:3]
    now = utcnow() - timedelta(hours=1)
    _receive(ctx, scout, now)
    with _decoded() as decoded:
        assert pipeline.preload_series(ctx, study, [series, "2.25.77"], ("CT",), while_receiving=True) == "read"
    assert sorted(decoded) == sorted(ds.SOPInstanceUID for ds in scout)  # the largest series so far
    _receive(ctx, slices, now)
    with _decoded() as decoded:
        assert pipeline.preload_series(ctx, study, [series, "2.25.77"], ("CT",), while_receiving=True) == "read"
    assert len(decoded) == len(slices)
    held = process_preloaded().held
    assert held is not None and held[0] == series  # the scout's slices let go
    with _decoded() as decoded:
        _run(ctx, now)
    assert decoded == []  # the job found its series read


def test_a_held_slice_of_a_replaced_instance_is_left_out(ctx: NodeContext, tmp_path: Path) -> None:
    slices = make_ct_phantom(geometry=GEOMETRY, noise_hu_sd=10.0, seed=9)
    now = utcnow() - timedelta(hours=1)
    _receive(ctx, slices, now)
    study, series = slices[0].StudyInstanceUID, slices[0].SeriesInstanceUID
    assert pipeline.preload_series(ctx, study, [series], ("CT",)) == "read"
    replaced = copy.deepcopy(slices[7])  # sent again with other pixels: a new file in the store
    replaced.PixelData = bytes(len(replaced.PixelData))
    _receive(ctx, [replaced], now)
    with _decoded() as decoded:
        results = _run(ctx, now)
    assert decoded == [replaced.SOPInstanceUID]  # its held slice was not used
    _same_results(results, _without_read_ahead(tmp_path, [*slices[:7], replaced, *slices[8:]], now))


def test_a_multi_frame_series_is_not_read_while_it_arrives(ctx: NodeContext) -> None:
    slices = make_ct_phantom(geometry=GEOMETRY, noise_hu_sd=10.0, seed=10)
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        slices, series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(), instance_number=1)
    _receive(ctx, [enhanced], utcnow() - timedelta(hours=1))
    outcome = pipeline.preload_series(ctx, enhanced.StudyInstanceUID, [enhanced.SeriesInstanceUID], ("CT",),
                                      while_receiving=True)
    assert outcome == "skipped: a multi-frame series is read once its study is quiet"
    assert process_preloaded().held is None


def test_a_series_the_worker_cannot_hold_is_not_read_ahead(ctx: NodeContext, monkeypatch: pytest.MonkeyPatch) -> None:
    slices = make_ct_phantom(geometry=GEOMETRY, noise_hu_sd=10.0, seed=6)
    _receive(ctx, slices, utcnow() - timedelta(hours=1))
    monkeypatch.setattr(pipeline, "memory_limit_bytes", lambda: resident_bytes() + 1024)  # 1 KB of room
    outcome = pipeline.preload_series(ctx, slices[0].StudyInstanceUID, [slices[0].SeriesInstanceUID], ("CT",))
    assert outcome == "skipped: larger than this worker can hold"
    assert process_preloaded().held is None


def test_a_busy_worker_or_a_complete_study_is_not_read_ahead(ctx: NodeContext) -> None:
    slices = make_ct_phantom(geometry=GEOMETRY, noise_hu_sd=10.0, seed=5)
    now = utcnow() - timedelta(hours=1)
    _receive(ctx, slices, now)
    study, series = slices[0].StudyInstanceUID, slices[0].SeriesInstanceUID
    with pipeline.RUNNING_JOBS.one():
        assert pipeline.preload_series(ctx, study, [series], ("CT",)) == "skipped: the worker is busy"
    with pipeline.volume_budget(ctx).reserve(1, "another job"):
        assert pipeline.preload_series(ctx, study, [series], ("CT",)) == "skipped: the worker is busy"
    assert pipeline.preload_series(ctx, study, [series], ("MR",)) == "skipped: no such series"
    complete_due_studies(ctx.sessions, ctx.settings, now=now + timedelta(seconds=5))
    assert pipeline.preload_series(ctx, study, [series], ("CT",)) == "skipped: the study is no longer receiving"
    assert process_preloaded().held is None
