"""SQLAlchemy models of the index: what was received, what was asked of the model, what was sent.

The database is the source of truth for every state in mednode; queues only carry ids. Patient
identifying attributes live in :class:`Patient` (and ``Study.accession_number``) only, so API schemas
can leave them out deliberately.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    """Return the current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class _UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, on every backend (SQLite drops tzinfo on its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the index: use storage.models.utcnow()")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None or value.tzinfo is not None:
            return value
        return value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: DateTime(timezone=True), dict[str, Any]: JSON, list[Any]: JSON}


class StudyState(str, enum.Enum):
    """Lifecycle of a study as seen by the completion checker and the router."""

    RECEIVING = "receiving"  #: instances arrive; not yet quiet for the quiet period
    ROUTED = "routed"  #: complete, and at least one rule made a job for this version
    NO_RULE = "no_rule"  #: complete, and no rule matched: recorded and visible, never dropped


class SeriesOrigin(str, enum.Enum):
    """Where a series came from, decided when its first instance arrives (``storage.index``)."""

    ACQUIRED = "acquired"  #: images (or anything else) from a modality or PACS: input for rules
    MEDNODE_RESULT = "mednode_result"  #: an object mednode wrote, returned by the PACS: never input
    DERIVED = "derived"  #: SR, KO, PR, SEG… of another node or a radiologist, after completion


class JobState(str, enum.Enum):
    """Explicit states of a job; transitions are made only by ``node.jobs``."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"  #: results written and stored; deliveries not started yet
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"  #: the study received more instances; a newer version replaces it


TERMINAL_JOB_STATES = frozenset(
    {JobState.DELIVERED, JobState.FAILED, JobState.CANCELLED, JobState.SUPERSEDED}
)


class DeliveryState(str, enum.Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    #: never sent: a newer version of the same study's results replaced it (reason in last_error)
    CANCELLED = "cancelled"


def _enum(cls: type[enum.Enum]) -> Enum:
    return Enum(cls, values_callable=lambda e: [m.value for m in e], native_enum=False, length=20)


class Patient(Base):
    __tablename__ = "patient"
    __table_args__ = (UniqueConstraint("patient_key", name="uq_patient_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    #: PatientID plus IssuerOfPatientID, the key a PACS uses; never logged
    patient_key: Mapped[str] = mapped_column(String(200))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_pk: Mapped[int | None] = mapped_column(ForeignKey("patient.id"))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[StudyState] = mapped_column(_enum(StudyState), default=StudyState.RECEIVING)
    #: incremented at each completion; a job belongs to exactly one version
    version: Mapped[int] = mapped_column(Integer, default=0)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    called_ae_title: Mapped[str | None] = mapped_column(String(16))
    first_received_at: Mapped[datetime] = mapped_column(_UTCDateTime(), default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(_UTCDateTime(), default=utcnow, index=True)
    completed_at: Mapped[datetime | None] = mapped_column(_UTCDateTime())
    route_reason: Mapped[str | None] = mapped_column(Text)
    #: when the study last became receiving (created, or reopened): the clock of a rule's
    #: ``completion.max_wait_s``; None on rows older than migration 0002 (then first_received_at)
    receiving_since: Mapped[datetime | None] = mapped_column(_UTCDateTime())
    #: why the study counted as complete at its last completion (quiet, max wait, forced)
    completion_reason: Mapped[str | None] = mapped_column(Text)

    patient: Mapped[Patient | None] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")
    jobs: Mapped[list[Job]] = relationship(back_populates="study", order_by="Job.id")

    __table_args__ = (Index("ix_study_state", "state"),)


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    series_description: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[int | None] = mapped_column(Integer)
    origin: Mapped[SeriesOrigin] = mapped_column(
        _enum(SeriesOrigin), default=SeriesOrigin.ACQUIRED, server_default=SeriesOrigin.ACQUIRED.value
    )
    #: set when the series' first instance arrived after its study was complete
    late_at: Mapped[datetime | None] = mapped_column(_UTCDateTime())
    #: why new instances of this series do not reopen (or keep receiving) its study; None: they do
    held_reason: Mapped[str | None] = mapped_column(Text)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    #: path relative to the store root
    path: Mapped[str] = mapped_column(String(400))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(_UTCDateTime(), default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    __tablename__ = "job"
    __table_args__ = (
        UniqueConstraint("study_pk", "study_version", "rule_name", name="uq_job_study_version_rule"),
        Index("ix_job_state", "state"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    study_version: Mapped[int] = mapped_column(Integer)
    rule_name: Mapped[str] = mapped_column(String(100))
    #: task specifications as data, e.g. ``[{"ct_analysis": {}}]``
    tasks: Mapped[list[Any]] = mapped_column(JSON)
    #: series the rule matched; the pipeline reads only these
    series_uids: Mapped[list[Any]] = mapped_column(JSON)
    #: ``AET@host:port`` strings
    destinations: Mapped[list[Any]] = mapped_column(JSON)
    priority: Mapped[int] = mapped_column(Integer, default=5)
    state: Mapped[JobState] = mapped_column(_enum(JobState), default=JobState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str | None] = mapped_column(Text)
    on_demand: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(_UTCDateTime(), default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(_UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(_UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(_UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(_UTCDateTime(), default=utcnow, onupdate=utcnow)
    #: the worker holding a running job renews this lease; an expired lease means it died
    lease_expires_at: Mapped[datetime | None] = mapped_column(_UTCDateTime())
    worker: Mapped[str | None] = mapped_column(String(200))
    #: seconds the worker spent per pipeline stage of its last run (``load``, ``model``, ``write``,
    #: ``store``), recorded with the results; None before (or without) a finished run
    stage_s: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    study: Mapped[Study] = relationship(back_populates="jobs")
    results: Mapped[list[Result]] = relationship(back_populates="job", order_by="Result.id")


class Result(Base):
    __tablename__ = "result"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_pk: Mapped[int] = mapped_column(ForeignKey("job.id"), index=True)
    #: ``seg``, ``sr`` ...
    kind: Mapped[str] = mapped_column(String(32))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    #: indexed: a returned result is recognised by its series too (``storage.index``)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(String(400))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    #: a JSON summary of what the object says (numbers, labels), for the dashboard and API
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(_UTCDateTime(), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="results")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="result")


class Delivery(Base):
    __tablename__ = "delivery"
    __table_args__ = (UniqueConstraint("result_pk", "destination", name="uq_delivery_result_dest"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    result_pk: Mapped[int] = mapped_column(ForeignKey("result.id"), index=True)
    destination: Mapped[str] = mapped_column(String(120))
    state: Mapped[DeliveryState] = mapped_column(
        _enum(DeliveryState), default=DeliveryState.PENDING, index=True
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(_UTCDateTime(), default=utcnow)
    last_attempt_at: Mapped[datetime | None] = mapped_column(_UTCDateTime())
    next_attempt_at: Mapped[datetime | None] = mapped_column(_UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(_UTCDateTime())

    result: Mapped[Result] = relationship(back_populates="deliveries")


class AuditEvent(Base):
    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(_UTCDateTime(), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(50))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)
