"""The audit trail: writing, de-duplicated views, filters, the events the node records by itself
(received at completion), and the admin-only ``/api/v1/audit`` endpoint."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node import audit, context
from node.completion import complete_due_studies
from node.config import Settings
from storage.db import upgrade
from storage.models import AuditEvent, utcnow
from tests.unit.node.conftest import IndexFn
from tests.unit.web.conftest import ADMIN, TOKEN, WebSettings

STUDY = "1.2.826.0.1.3680043.8.498.71"
SERIES = f"{STUDY}.1"


def _events(sessions: sessionmaker[Session]) -> list[AuditEvent]:
    with sessions() as session:
        return list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all())


def test_record_writes_one_row(sessions) -> None:  # type: ignore[no-untyped-def]
    audit.record(sessions, "admin", "retry", STUDY, "job 3")
    [event] = _events(sessions)
    assert (event.actor, event.action, event.study_instance_uid, event.detail) == ("admin", "retry", STUDY, "job 3")
    assert event.at is not None


def test_add_commits_with_the_change_it_records(sessions) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RuntimeError), sessions() as session, session.begin():
        audit.add(session, "admin", "cancel", STUDY)
        raise RuntimeError("the change failed")
    assert _events(sessions) == []


def test_actor_and_action_are_required(sessions) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="actor and an action"):
        audit.record(sessions, "", "retry")
    with pytest.raises(ValueError):
        audit.record(sessions, "admin", "")


def test_long_values_are_cut_to_the_columns(sessions) -> None:  # type: ignore[no-untyped-def]
    audit.record(sessions, "a" * 300, "b" * 80, None, "c" * 5000)
    [event] = _events(sessions)
    assert (len(event.actor), len(event.action), len(event.detail or "")) == (100, 50, 2000)


def test_a_view_is_recorded_once_per_period(sessions) -> None:  # type: ignore[no-untyped-def]
    t0 = utcnow()
    assert audit.record_view(sessions, "admin", STUDY, now=t0)
    assert not audit.record_view(sessions, "admin", STUDY, now=t0 + timedelta(seconds=3))  # a page refresh
    assert audit.record_view(sessions, "other", STUDY, now=t0 + timedelta(seconds=3))  # another user
    assert audit.record_view(sessions, "admin", f"{STUDY}.9", now=t0 + timedelta(seconds=3))  # another study
    assert audit.record_view(sessions, "admin", STUDY, now=t0 + timedelta(seconds=audit.VIEW_REPEAT_S + 1))
    assert [e.action for e in _events(sessions)] == [audit.VIEWED] * 4


def test_list_filters_newest_first(sessions) -> None:  # type: ignore[no-untyped-def]
    t0 = utcnow() - timedelta(hours=1)
    with sessions() as session, session.begin():
        for minute, (actor, action, study) in enumerate([
            ("dicom:CT1", audit.RECEIVED, STUDY), ("mednode", audit.SENT, STUDY),
            ("admin", audit.VIEWED, STUDY), ("admin", "retry", "9.9"),
        ]):
            audit.add(session, actor, action, study, at=t0 + timedelta(minutes=minute))
    with sessions() as session:
        rows, total = audit.list_events(session)
        assert total == 4 and [r.action for r in rows] == ["retry", audit.VIEWED, audit.SENT, audit.RECEIVED]
        rows, total = audit.list_events(session, audit.AuditFilter(study_uid=STUDY), limit=2)
        assert total == 3 and [r.action for r in rows] == [audit.VIEWED, audit.SENT]
        rows, _ = audit.list_events(session, audit.AuditFilter(actor="admin", action="retry"))
        assert [r.study_instance_uid for r in rows] == ["9.9"]
        rows, _ = audit.list_events(session, audit.AuditFilter(since=t0 + timedelta(minutes=1),
                                                                until=t0 + timedelta(minutes=3)))
        assert [r.action for r in rows] == [audit.VIEWED, audit.SENT]
        assert audit.actions_seen(session) == sorted([audit.RECEIVED, audit.SENT, audit.VIEWED, "retry"])


def test_completion_records_the_received_study_without_patient_data(
    sessions, settings_for: Callable[..., Settings], index: IndexFn
) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(quiet_period_s=1)
    t0 = utcnow() - timedelta(minutes=5)
    for number in (1, 2):
        index(STUDY, SERIES, number, now=t0, calling="CT_SCANNER", PatientName="Canary^Auditfield",
              PatientID="AUDIT-CANARY-1", AccessionNumber="AUDIT-ACC-1", PatientBirthDate="19010101")
    complete_due_studies(sessions, settings, now=t0 + timedelta(seconds=2))
    [event] = _events(sessions)
    assert (event.actor, event.action, event.study_instance_uid) == ("dicom:CT_SCANNER", audit.RECEIVED, STUDY)
    assert event.detail == "version 1: 2 instance(s) in 1 series"
    for canary in ("Canary", "Auditfield", "AUDIT-CANARY-1", "AUDIT-ACC-1", "19010101"):
        assert canary not in f"{event.actor} {event.detail}"


# -- the API -------------------------------------------------------------------------------------
@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[TestClient, sessionmaker[Session]]]:
    from node.celery_app import configure_celery
    from node.web.app import create_app

    settings = WebSettings(data_dir=tmp_path / "var", broker_url="memory://")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    context.configure(settings)
    ctx = context.current()
    upgrade(ctx.engine)
    configure_celery(settings)
    with TestClient(create_app(settings)) as test_client:
        yield test_client, ctx.sessions
    ctx.close()


def test_audit_api_needs_a_login(client) -> None:  # type: ignore[no-untyped-def]
    test_client, sessions = client
    audit.record(sessions, "admin", "retry", STUDY, "job 1")
    assert test_client.get("/api/v1/audit").status_code == 401
    assert test_client.get("/api/v1/audit", headers={"Authorization": "Bearer wrong"}).status_code == 401
    answer = test_client.get("/api/v1/audit", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["total"] == 1
    assert body["items"][0] | {"at": None, "id": None} == {
        "id": None, "at": None, "actor": "admin", "action": "retry", "study_instance_uid": STUDY, "detail": "job 1"}
    assert test_client.get("/api/v1/audit", auth=ADMIN, params={"action": "sent"}).json()["total"] == 0


def test_audit_api_is_a_read_for_a_browser_session_without_csrf(client) -> None:  # type: ignore[no-untyped-def]
    from tests.unit.web.conftest import csrf_of

    test_client, _ = client
    token = csrf_of(test_client.get("/login").text)
    done = test_client.post("/login", data={"username": ADMIN[0], "password": ADMIN[1], "csrf_token": token,
                                             "next": "/queue"}, follow_redirects=False)
    assert done.status_code == 303
    assert test_client.get("/api/v1/audit").status_code == 200


def _login(test_client: TestClient) -> None:
    from tests.unit.web.conftest import csrf_of

    token = csrf_of(test_client.get("/login").text)
    done = test_client.post("/login", data={"username": ADMIN[0], "password": ADMIN[1], "csrf_token": token,
                                             "next": "/queue"}, follow_redirects=False)
    assert done.status_code == 303, done.text


def test_audit_page_is_for_administrators(client) -> None:  # type: ignore[no-untyped-def]
    test_client, sessions = client
    audit.record(sessions, "admin", "cancel", STUDY, "job 7")
    anonymous = test_client.get("/audit", follow_redirects=False)
    assert anonymous.status_code == 303 and anonymous.headers["location"] == "/login?next=%2Faudit"
    assert 'href="/audit"' not in test_client.get("/queue").text
    _login(test_client)
    page = test_client.get("/audit")
    assert page.status_code == 200
    assert "job 7" in page.text and STUDY in page.text and 'href="/audit"' in page.text
    assert "job 7" not in test_client.get("/audit", params={"action": "retry"}).text


def test_viewing_patient_fields_is_audited_page_and_api(client, index: IndexFn) -> None:  # type: ignore[no-untyped-def]
    test_client, sessions = client
    index(STUDY, SERIES, 1, PatientName="Canary^Viewfield", PatientID="VIEW-CANARY-2")
    assert test_client.get(f"/studies/{STUDY}").status_code == 200  # anonymous: no patient fields
    assert test_client.get(f"/api/v1/studies/{STUDY}").status_code == 200
    assert _events(sessions) == []
    _login(test_client)
    for _ in range(3):  # the page refreshing itself
        page = test_client.get(f"/studies/{STUDY}")
        assert page.status_code == 200 and "Canary^Viewfield" in page.text
    assert test_client.get(f"/api/v1/studies/{STUDY}", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    events = _events(sessions)
    assert [(e.actor, e.action, e.study_instance_uid, e.detail) for e in events] == [
        (ADMIN[0], audit.VIEWED, STUDY, "dashboard: study and results"),
        ("token", audit.VIEWED, STUDY, "api (token): study and results")]
