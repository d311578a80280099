"""The audit trail: who received, sent, viewed or changed what, by study UID — never by patient.

One :class:`~storage.models.AuditEvent` row per event, written in the same transaction as the
change it records where there is one (:func:`add`), else on its own (:func:`record`):

========== ================================================= ==========================================
action     when                                              actor
========== ================================================= ==========================================
received   a study became complete (each version)            ``dicom:<calling AE title>``
sent       one result object reached one destination         ``mednode``
viewed     someone saw a study's patient-derived fields      the user (``token`` for API tokens;
           (study page or API, study list, results' text)    ``anonymous`` on an open loopback node)
viewed     key-image PNGs of a job were drawn for someone    the same
images
downloaded a result's DICOM file was downloaded              the same
sent to    a job's de-identified input left for a remote model   ``mednode``
model      server (counts, masked/left out, the server)
stored     instances were stored by STOW-RS (per study; the      the user (``token``; ``anonymous`` on
           count refused, if any, in a row of its own)           an open loopback node)
login      failed logins locked an address or user name out  ``web:<client address>``
locked
retry …    manual actions (:mod:`node.web.actions`)          the user
========== ================================================= ==========================================

Views are grouped (:func:`record_view`): one row per actor, action, study and ``detail`` within
:data:`VIEW_REPEAT_S`, so a page that refreshes itself, or loads six key images of one job, writes
one row. Downloads are never grouped: each is a copy of patient data leaving the node.

``detail`` says what happened in terms of jobs, UIDs, counts and destinations. It never holds
PatientName, PatientID, BirthDate, AccessionNumber or free text taken from a data set: callers
build it from identifiers only.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from storage.models import AuditEvent, utcnow

RECEIVED = "received"
SENT = "sent"
VIEWED = "viewed"
VIEWED_IMAGES = "viewed images"
DOWNLOADED = "downloaded"
#: a job's de-identified images and prompts left for a remote model server (``models.vlm.remote``)
SENT_TO_MODEL = "sent to model"
STORED = "stored"
LOGIN_LOCKED = "login locked"
#: The actor of what the node does by itself (deliveries).
SYSTEM_ACTOR = "mednode"
#: A user who keeps a study open (the page refreshes itself) is recorded once per this period.
VIEW_REPEAT_S = 600.0

_ACTOR_LEN = 100
_ACTION_LEN = 50
_DETAIL_LEN = 2000


def dicom_actor(calling_ae_title: str | None) -> str:
    """The actor of what a DICOM peer did: ``dicom:<calling AE title>``."""
    return f"dicom:{(calling_ae_title or '?').strip() or '?'}"


def _event(actor: str, action: str, study_uid: str | None, detail: str | None,
           at: datetime | None) -> AuditEvent:
    if not actor or not action:
        raise ValueError("an audit event needs an actor and an action")
    return AuditEvent(
        at=at or utcnow(),
        actor=actor[:_ACTOR_LEN],
        action=action[:_ACTION_LEN],
        study_instance_uid=study_uid,
        detail=detail[:_DETAIL_LEN] if detail is not None else None,
    )


def add(session: Session, actor: str, action: str, study_uid: str | None = None,
        detail: str | None = None, *, at: datetime | None = None) -> AuditEvent:
    """Add an event to ``session``: it commits (or rolls back) with the change it records.

    Raises
    ------
    ValueError
        If ``actor`` or ``action`` is empty.
    """
    event = _event(actor, action, study_uid, detail, at)
    session.add(event)
    return event


def record(sessions: sessionmaker[Session], actor: str, action: str, study_uid: str | None = None,
           detail: str | None = None) -> None:
    """Write one event in its own transaction.

    Raises
    ------
    ValueError
        If ``actor`` or ``action`` is empty.
    """
    with sessions() as session, session.begin():
        add(session, actor, action, study_uid, detail)


_VIEW_LOCK = threading.Lock()


def record_view(sessions: sessionmaker[Session], actor: str, study_uid: str | None, detail: str | None = None,
                *, action: str = VIEWED, repeat_s: float = VIEW_REPEAT_S, now: datetime | None = None) -> bool:
    """Record that ``actor`` saw patient-derived content, unless the same was recorded within ``repeat_s``.

    "The same" is the same actor, ``action``, study and ``detail``. A study page refreshes
    itself every few seconds while its jobs run, and a browser fetches a job's key images in
    parallel: one row per look, not per request. Returns whether a row was written.
    """
    now = now or utcnow()
    study_match = (AuditEvent.study_instance_uid.is_(None) if study_uid is None
                   else AuditEvent.study_instance_uid == study_uid)
    detail_match = (AuditEvent.detail.is_(None) if detail is None
                    else AuditEvent.detail == detail[:_DETAIL_LEN])
    # one process serves the web: the lock keeps parallel image requests from each writing a row
    with _VIEW_LOCK, sessions() as session, session.begin():
        recent = session.scalar(
            select(AuditEvent.id).where(
                AuditEvent.action == action[:_ACTION_LEN],
                AuditEvent.actor == actor[:_ACTOR_LEN],
                study_match,
                detail_match,
                AuditEvent.at >= now - timedelta(seconds=repeat_s),
            ).limit(1)
        )
        if recent is not None:
            return False
        add(session, actor, action, study_uid, detail, at=now)
    return True


@dataclass(frozen=True)
class AuditFilter:
    """Which events to list (all conditions must hold; None means any)."""

    action: str | None = None
    actor: str | None = None
    study_uid: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def list_events(session: Session, flt: AuditFilter | None = None, *, limit: int = 100,
                offset: int = 0) -> tuple[list[AuditEvent], int]:
    """Events matching ``flt``, newest first, and how many match in all."""
    flt = flt or AuditFilter()
    conditions = []
    if flt.action:
        conditions.append(AuditEvent.action == flt.action)
    if flt.actor:
        conditions.append(AuditEvent.actor == flt.actor)
    if flt.study_uid:
        conditions.append(AuditEvent.study_instance_uid == flt.study_uid)
    if flt.since is not None:
        conditions.append(AuditEvent.at >= flt.since)
    if flt.until is not None:
        conditions.append(AuditEvent.at < flt.until)
    total = session.scalar(select(func.count(AuditEvent.id)).where(*conditions)) or 0
    rows = session.scalars(
        select(AuditEvent).where(*conditions)
        .order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit).offset(offset)
    ).all()
    return list(rows), total


def actions_seen(session: Session) -> list[str]:
    """The distinct actions recorded so far (for a filter menu)."""
    return sorted(session.scalars(select(AuditEvent.action).distinct()).all())
