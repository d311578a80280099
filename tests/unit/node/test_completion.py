"""Completion over a real SQLite index: quiet periods, versions, NO_RULE, reopened studies."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node import queries
from node.completion import (
    StudyNotReceivingError,
    complete_due_studies,
    force_complete,
    late_series_check,
    next_due_at,
    study_facts,
)
from node.config import Settings
from storage.index import IndexOutcome
from storage.models import Job, JobState, Study, StudyState, utcnow
from tests.unit.node.conftest import MR_IMAGE_STORAGE, IndexFn

STUDY = "1.2.826.0.1.3680043.8.498.10"
SERIES = f"{STUDY}.1"
DESTINATION = "PACS@127.0.0.1:104"


@pytest.fixture
def settings(settings_for: Callable[..., Settings]) -> Settings:
    return settings_for(quiet_period_s=10, destination=DESTINATION)


@pytest.fixture
def t0() -> datetime:
    return utcnow() - timedelta(hours=1)


def _study(sessions: sessionmaker[Session], uid: str = STUDY) -> Study:
    with sessions() as session:
        return session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()


def _jobs(sessions: sessionmaker[Session]) -> list[Job]:
    with sessions() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def test_not_due_before_the_quiet_period(sessions, settings, index: IndexFn, t0) -> None:
    index(STUDY, SERIES, 1, now=t0)
    index(STUDY, SERIES, 2, now=t0 + timedelta(seconds=8))

    assert complete_due_studies(sessions, settings, now=t0 + timedelta(seconds=15)) == []
    study = _study(sessions)
    assert (study.state, study.version, study.completed_at) == (StudyState.RECEIVING, 0, None)
    assert _jobs(sessions) == []


def test_due_after_the_quiet_period_makes_one_job_for_version_1(sessions, settings, index: IndexFn, t0) -> None:
    index(STUDY, SERIES, 1, now=t0)
    index(STUDY, SERIES, 2, now=t0 + timedelta(seconds=1))
    index(STUDY, f"{STUDY}.2", 1, now=t0, modality="SR", sop_class="1.2.840.10008.5.1.4.1.1.88.22")
    done_at = t0 + timedelta(seconds=11.5)

    created = complete_due_studies(sessions, settings, now=done_at)

    [job] = _jobs(sessions)
    assert created == [(job.id, 5)]
    assert (job.state, job.study_version, job.rule_name) == (JobState.QUEUED, 1, "ct-analysis")
    assert job.tasks == ["ct_analysis"]
    assert job.series_uids == [SERIES]  # only the CT series the rule matched
    assert job.destinations == [DESTINATION]
    study = _study(sessions)
    assert (study.state, study.version, study.route_reason) == (StudyState.ROUTED, 1, "ct-analysis")
    assert study.completed_at == done_at
    # nothing more to do on the next round
    assert complete_due_studies(sessions, settings, now=done_at + timedelta(seconds=60)) == []
    assert len(_jobs(sessions)) == 1


def test_unmatched_study_is_recorded_as_no_rule(sessions, settings, index: IndexFn, t0) -> None:
    index(STUDY, SERIES, 1, now=t0, modality="MR", sop_class=MR_IMAGE_STORAGE)

    assert complete_due_studies(sessions, settings, now=t0 + timedelta(seconds=11)) == []

    study = _study(sessions)
    assert (study.state, study.version, study.route_reason) == (StudyState.NO_RULE, 1, "no rule matched")
    assert study.completed_at is not None
    assert _jobs(sessions) == []


def test_reopened_study_supersedes_the_queued_job_and_gets_version_2(
    sessions, settings, index: IndexFn, t0
) -> None:
    index(STUDY, SERIES, 1, now=t0)
    [(first_id, _)] = complete_due_studies(sessions, settings, now=t0 + timedelta(seconds=11))

    later = t0 + timedelta(seconds=20)
    assert index(STUDY, SERIES, 2, now=later) is IndexOutcome.NEW
    assert _study(sessions).state is StudyState.RECEIVING
    assert complete_due_studies(sessions, settings, now=later + timedelta(seconds=5)) == []
    [(second_id, _)] = complete_due_studies(sessions, settings, now=later + timedelta(seconds=11))

    first, second = _jobs(sessions)
    assert (first.id, first.state, first.study_version) == (first_id, JobState.SUPERSEDED, 1)
    assert "superseded" in (first.reason or "")
    assert (second.id, second.state, second.study_version) == (second_id, JobState.QUEUED, 2)
    assert _study(sessions).version == 2


def test_identical_resend_after_completion_changes_nothing(sessions, settings, index: IndexFn, t0) -> None:
    index(STUDY, SERIES, 1, now=t0)
    complete_due_studies(sessions, settings, now=t0 + timedelta(seconds=11))

    assert index(STUDY, SERIES, 1, now=t0 + timedelta(seconds=30)) is IndexOutcome.UNCHANGED
    assert complete_due_studies(sessions, settings, now=t0 + timedelta(seconds=60)) == []

    assert _study(sessions).state is StudyState.ROUTED
    assert [(j.state, j.study_version) for j in _jobs(sessions)] == [(JobState.QUEUED, 1)]


def test_finished_job_of_an_old_version_keeps_its_state(sessions, settings, index: IndexFn, t0) -> None:
    index(STUDY, SERIES, 1, now=t0)
    [(first_id, _)] = complete_due_studies(sessions, settings, now=t0 + timedelta(seconds=11))
    with sessions() as session, session.begin():
        session.get(Job, first_id).state = JobState.DELIVERED  # type: ignore[union-attr]
    index(STUDY, SERIES, 2, now=t0 + timedelta(seconds=20))
    complete_due_studies(sessions, settings, now=t0 + timedelta(seconds=40))

    assert [(j.state, j.study_version) for j in _jobs(sessions)] == [
        (JobState.DELIVERED, 1), (JobState.QUEUED, 2)
    ]


def test_a_rule_quiet_period_overrides_the_default(settings_for, sessions, index: IndexFn, t0) -> None:
    rules = [
        {"name": "fast-ct", "match": {"modality": "CT"}, "tasks": ["ct_analysis"], "destinations": [],
         "quiet_period_s": 2, "priority": 9},
    ]
    settings = settings_for(quiet_period_s=60, rules=rules)
    index(STUDY, SERIES, 1, now=t0)
    index("1.2.3.99", "1.2.3.99.1", 1, now=t0, modality="MR", sop_class=MR_IMAGE_STORAGE)

    created = complete_due_studies(sessions, settings, now=t0 + timedelta(seconds=3))

    assert [p for _, p in created] == [9]
    assert _study(sessions).state is StudyState.ROUTED
    assert _study(sessions, "1.2.3.99").state is StudyState.RECEIVING  # no rule: default 60 s
    [job] = _jobs(sessions)
    assert job.destinations == []


def test_continue_makes_one_job_per_matching_rule(settings_for, sessions, index: IndexFn, t0) -> None:
    rules = [
        {"name": "a", "match": {"modality": "CT"}, "tasks": ["ct_analysis"], "continue": True,
         "destinations": ["PACS@127.0.0.1:104"]},
        {"name": "b", "match": {"calling_ae_title": "MODALITY"}, "tasks": ["ct_analysis"],
         "destinations": ["ARCHIVE@127.0.0.1:105"]},
    ]
    settings = settings_for(quiet_period_s=1, rules=rules)
    index(STUDY, SERIES, 1, now=t0)

    assert len(complete_due_studies(sessions, settings, now=t0 + timedelta(seconds=2))) == 2

    assert [(j.rule_name, j.destinations) for j in _jobs(sessions)] == [
        ("a", ["PACS@127.0.0.1:104"]), ("b", ["ARCHIVE@127.0.0.1:105"])
    ]
    assert _study(sessions).route_reason == "a, b"


# -- completion per rule, force-complete, returned results and late series (issue 12) ----------
CHEST_RULES = [{
    "name": "chest", "match": {"modality": "DX"}, "tasks": ["ct_analysis"], "destinations": [],
    "completion": {"required_series": [{"modality": "DX", "series_description": "PA"},
                                       {"modality": "DX", "series_description": "LAT"}],
                   "max_wait_s": 600},
}]
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


def _dx(index: IndexFn, series: str, description: str, now: datetime) -> None:
    index(STUDY, series, 1, now=now, modality="DX", sop_class=DX_STORAGE, SeriesDescription=description)


def test_a_study_waits_for_its_required_series(settings_for, sessions, index: IndexFn, t0) -> None:
    settings = settings_for(quiet_period_s=10, rules=CHEST_RULES)
    _dx(index, f"{STUDY}.1", "PA", t0)

    assert complete_due_studies(sessions, settings, now=t0 + timedelta(seconds=300)) == []
    assert _study(sessions).state is StudyState.RECEIVING

    _dx(index, f"{STUDY}.2", "LAT", t0 + timedelta(seconds=301))
    assert complete_due_studies(sessions, settings, now=t0 + timedelta(seconds=305)) == []  # quiet still counts
    assert len(complete_due_studies(sessions, settings, now=t0 + timedelta(seconds=312))) == 1

    study = _study(sessions)
    assert study.completion_reason == "quiet for 10 s with every required series"
    assert sorted(_jobs(sessions)[0].series_uids) == [f"{STUDY}.1", f"{STUDY}.2"]


def test_max_wait_completes_without_the_missing_series_and_says_so(settings_for, sessions, index: IndexFn,
                                                                   t0) -> None:
    settings = settings_for(quiet_period_s=10, rules=CHEST_RULES)
    _dx(index, f"{STUDY}.1", "PA", t0)

    assert complete_due_studies(sessions, settings, now=t0 + timedelta(seconds=599)) == []
    assert len(complete_due_studies(sessions, settings, now=t0 + timedelta(seconds=600))) == 1

    study = _study(sessions)
    assert study.state is StudyState.ROUTED
    assert study.completion_reason is not None and "max wait 600 s" in study.completion_reason
    assert "'LAT'" in study.completion_reason


def test_the_max_wait_clock_restarts_when_a_study_reopens(settings_for, sessions, index: IndexFn, t0) -> None:
    settings = settings_for(quiet_period_s=10, rules=CHEST_RULES)
    _dx(index, f"{STUDY}.1", "PA", t0)
    _dx(index, f"{STUDY}.2", "LAT", t0)
    assert len(complete_due_studies(sessions, settings, now=t0 + timedelta(seconds=11))) == 1
    later = t0 + timedelta(seconds=2000)
    index(STUDY, f"{STUDY}.1", 2, now=later, modality="DX", sop_class=DX_STORAGE, SeriesDescription="PA")

    # long past the first instance's max wait, but the study only began receiving again now
    assert complete_due_studies(sessions, settings, now=later + timedelta(seconds=5)) == []
    assert len(complete_due_studies(sessions, settings, now=later + timedelta(seconds=11))) == 1
    assert _study(sessions).version == 2


def test_force_complete_routes_a_receiving_study_now(sessions, settings, index: IndexFn, t0) -> None:
    index(STUDY, SERIES, 1, now=t0)

    created = force_complete(sessions, settings, STUDY, actor="admin", now=t0 + timedelta(seconds=1))

    [job] = _jobs(sessions)
    assert created == [(job.id, job.priority)]
    study = _study(sessions)
    assert (study.state, study.version, study.completion_reason) == (StudyState.ROUTED, 1, "completed by admin")
    with pytest.raises(StudyNotReceivingError, match="complete already"):
        force_complete(sessions, settings, STUDY, actor="admin")
    with pytest.raises(LookupError, match="not stored"):
        force_complete(sessions, settings, "1.2.3.404", actor="admin")


def test_returned_results_are_never_input_to_a_job(sessions, settings, index: IndexFn, t0) -> None:
    index(STUDY, SERIES, 1, now=t0)
    # mednode's SR of an earlier install, forwarded by the PACS inside the study while it receives
    index(STUDY, f"{STUDY}.9", 1, now=t0, modality="CT", sop_class="1.2.840.10008.5.1.4.1.1.88.33",
          Manufacturer="mednode")

    complete_due_studies(sessions, settings, now=t0 + timedelta(seconds=11))

    [job] = _jobs(sessions)
    assert job.series_uids == [SERIES]
    with sessions() as session:
        facts = study_facts(session, session.scalars(select(Study)).one())
    assert [s.series_instance_uid for s in facts.series] == [SERIES]


@pytest.mark.parametrize(("modality", "sop_class", "reopens"), [
    ("CT", "1.2.840.10008.5.1.4.1.1.2", True),
    ("MR", MR_IMAGE_STORAGE, False),
])
def test_a_late_series_reopens_only_if_a_rule_runs_on_it(sessions, settings, index: IndexFn, t0,
                                                         modality: str, sop_class: str, reopens: bool) -> None:
    index(STUDY, SERIES, 1, now=t0)
    complete_due_studies(sessions, settings, now=t0 + timedelta(seconds=11))
    check = late_series_check(settings.effective_rules)
    at = t0 + timedelta(seconds=100)

    index(STUDY, f"{STUDY}.3", 1, now=at, modality=modality, sop_class=sop_class, late_series_check=check)
    index(STUDY, f"{STUDY}.3", 2, now=at, modality=modality, sop_class=sop_class, late_series_check=check)
    created = complete_due_studies(sessions, settings, now=at + timedelta(seconds=11))

    assert bool(created) is reopens
    study = _study(sessions)
    assert study.version == (2 if reopens else 1)
    with sessions() as session:  # what /metrics reports
        counts = queries.arrival_counts(session)
    assert (counts.split_studies, counts.late_studies) == (1 if reopens else 0, 1)
    assert counts.held_series == {"acquired": 0 if reopens else 1, "mednode_result": 0, "derived": 0}
    if reopens:
        assert sorted(_jobs(sessions)[-1].series_uids) == sorted([SERIES, f"{STUDY}.3"])


def test_next_due_at_is_the_end_of_the_earliest_running_quiet_period(sessions, settings, index: IndexFn, t0) -> None:
    """The scheduler wakes up when a quiet period ends: the earliest last instance plus the quiet
    period, among studies not yet past it; a study already past it is left to the poll."""
    assert next_due_at(sessions, settings, now=t0) is None
    index(STUDY, SERIES, 1, now=t0)
    index("1.2.826.0.1.3680043.8.498.11", "1.2.826.0.1.3680043.8.498.11.1", 1, now=t0 + timedelta(seconds=3))
    assert next_due_at(sessions, settings, now=t0 + timedelta(seconds=4)) == t0 + timedelta(seconds=10)
    # more instances of the first study move its end; the second study's comes first now
    index(STUDY, SERIES, 2, now=t0 + timedelta(seconds=5))
    assert next_due_at(sessions, settings, now=t0 + timedelta(seconds=6)) == t0 + timedelta(seconds=13)
    # past both ends: nothing left to wake up for (the poll completes them)
    assert next_due_at(sessions, settings, now=t0 + timedelta(seconds=16)) is None
    complete_due_studies(sessions, settings, now=t0 + timedelta(seconds=16))
    assert next_due_at(sessions, settings, now=t0 + timedelta(seconds=4)) is None


def test_next_due_at_includes_a_rules_max_wait(sessions, settings_for, index: IndexFn, t0) -> None:
    settings = settings_for(quiet_period_s=100, destination=DESTINATION, rules=[{
        "name": "ct", "match": {"modality": "CT"}, "tasks": ["ct_analysis"], "destinations": [DESTINATION],
        "completion": {"max_wait_s": 120}}])
    index(STUDY, SERIES, 1, now=t0)
    index(STUDY, SERIES, 2, now=t0 + timedelta(seconds=50))
    # quiet period ends at 150 s, the maximum wait at 120 s
    assert next_due_at(sessions, settings, now=t0 + timedelta(seconds=60)) == t0 + timedelta(seconds=120)
