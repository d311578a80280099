"""Completion over a real SQLite index: quiet periods, versions, NO_RULE, reopened studies."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.completion import complete_due_studies
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
