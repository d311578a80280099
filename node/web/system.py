"""Rules dry run, destinations and C-ECHO, Celery workers: what the Rules and System pages show."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from node import dicomweb_delivery
from node.completion import study_facts
from node.config import AnyDestination, DicomWebDestination, Settings
from node.delivery import Timeouts, echo
from node.routing import SeriesFacts, StudyFacts, check_rule, route
from node.web.schemas import (
    DestinationOut,
    DryRunOut,
    EchoOut,
    RuleCheckOut,
    RuleOut,
    WorkerOut,
    WorkersOut,
)
from storage.models import Study

log = logging.getLogger(__name__)

#: How long the Workers page waits for workers to answer a broadcast.
INSPECT_TIMEOUT_S = 1.0
ECHO_TIMEOUTS = Timeouts(acse_s=5.0, dimse_s=5.0, network_s=5.0)


def rules_out(settings: Settings) -> list[RuleOut]:
    return [
        RuleOut(name=r.name, match=r.match.model_dump(exclude_none=True), tasks=list(r.tasks),
                priority=r.priority, destinations=list(r.destinations), quiet_period_s=r.quiet_period_s,
                continue_matching=r.continue_matching)
        for r in settings.effective_rules
    ]


def dry_run_facts(settings: Settings, facts: StudyFacts, source: str) -> DryRunOut:
    """Every rule checked against ``facts`` with reasons, and which ones routing would pick."""
    selected = [c.rule.name for c in route(facts, settings.effective_rules)]
    checks = []
    for rule in settings.effective_rules:
        check = check_rule(rule, facts)
        checks.append(RuleCheckOut(
            rule=rule.name, matched=check.matched, selected=rule.name in selected,
            series_uids=list(check.series_uids), reasons=list(check.reasons), tasks=list(rule.tasks),
            priority=rule.priority, destinations=list(rule.destinations),
        ))
    return DryRunOut(study_instance_uid=facts.study_instance_uid, source=source,  # type: ignore[arg-type]
                     checks=checks, selected=selected)


def dry_run_stored(session: Session, settings: Settings, study_uid: str) -> DryRunOut | None:
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None:
        return None
    return dry_run_facts(settings, study_facts(session, study), "stored")


def dry_run_upload(settings: Settings, data: bytes, calling_ae_title: str | None = None) -> DryRunOut:
    """Dry run on one uploaded DICOM file (nothing is stored).

    Raises
    ------
    ValueError
        If the bytes are not a DICOM instance mednode would accept.
    """
    from dicom_io.header import parse_header

    header, _ = parse_header(data)
    facts = StudyFacts(
        study_instance_uid=header.study_instance_uid, study_description=header.study_description,
        calling_ae_title=calling_ae_title, called_ae_title=settings.ae_title,
        series=(SeriesFacts(
            series_instance_uid=header.series_instance_uid, modality=header.modality,
            body_part_examined=header.body_part_examined, series_description=header.series_description,
            sop_class_uids=frozenset({header.sop_class_uid}), instance_count=1,
        ),),
    )
    return dry_run_facts(settings, facts, "upload")


def destinations(settings: Settings) -> dict[str, AnyDestination]:
    """Every destination a rule can send to, by name (``default``, named ones, inline ones)."""
    found: dict[str, AnyDestination] = {}
    if settings.destination is not None:
        found["default"] = settings.destination
    found.update(settings.destinations)
    for rule in settings.effective_rules:
        for ref in rule.destinations:
            if ref not in found:
                try:
                    found[ref] = settings.resolve_destination(ref, rule=rule.name)
                except ValueError as exc:
                    log.warning("rule %s: %s", rule.name, exc)
    return found


def destinations_out(settings: Settings) -> list[DestinationOut]:
    out = []
    for name, dest in destinations(settings).items():
        used_by = [r.name for r in settings.effective_rules if name in r.destinations]
        if isinstance(dest, DicomWebDestination):
            out.append(DestinationOut(name=name, kind="dicomweb", url=dest.dicomweb.url, used_by=used_by,
                                      auth=dest.dicomweb.auth, tls=dest.dicomweb.url.startswith("https:")))
            continue
        out.append(DestinationOut(name=name, ae_title=dest.ae_title, host=dest.host, port=dest.port,
                                  used_by=used_by, calling_ae_title=dest.calling_ae_title or settings.ae_title,
                                  tls=dest.tls is not None))
    return out


def echo_destination(settings: Settings, name: str) -> EchoOut | None:
    """C-ECHO one destination by name; None when no destination has that name."""
    dest = destinations(settings).get(name)
    if dest is None:
        return None
    try:
        if isinstance(dest, DicomWebDestination):
            result = dicomweb_delivery.echo(dest)
        else:
            result = echo(dest, calling_ae_title=settings.ae_title, timeouts=ECHO_TIMEOUTS)
    except (OSError, RuntimeError, ValueError) as exc:  # boundary: show why, don't raise
        return EchoOut(name=name, destination=str(dest), ok=False, status=None, latency_ms=0.0,
                       error=f"{type(exc).__name__}: {exc}")
    return EchoOut(name=name, destination=str(dest), ok=result.ok, status=result.status,
                   latency_ms=round(result.latency_s * 1000, 1), error=result.error)


def _gpu_mb(stats: dict[str, Any]) -> float | None:
    value = stats.get("gpu_memory_mb") if isinstance(stats, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def _number(info: dict[str, Any], key: str) -> float | None:
    value = info.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _reported_fields(info: dict[str, Any]) -> dict[str, Any]:
    """What a worker reports of itself (:func:`node.worker_status.process_info`): the queues it
    consumes, its model, device and GPU memory."""
    batch = info.get("batch_size")
    slots = info.get("urgent_slots")
    return {"queues": [str(q) for q in info.get("queues") or []],
            "model": info.get("model"), "device": info.get("device"),
            "batch_size": batch if isinstance(batch, int) else None,
            "urgent_slots": slots if isinstance(slots, int) else None,
            "gpu_memory_mb": _gpu_mb(info), "gpu_memory_reserved_mb": _number(info, "gpu_memory_reserved_mb")}


def workers_from_status_files(data_dir: Path) -> WorkersOut:
    """The embedded broker's workers, from the status files they write (no broadcast there)."""
    from node.worker_status import read_status_files

    workers = [
        WorkerOut(name=name, active=[], reserved=0,
                  concurrency=info.get("concurrency"), stats={"pid": info.get("pid"), "pool": info.get("pool")},
                  **_reported_fields(info))
        for name, info in sorted(read_status_files(data_dir).items())
    ]
    error = None if workers else (
        "no worker has written its status lately (the embedded broker's workers write "
        f"{data_dir / 'workers'} every few seconds). Running jobs below show which worker holds them.")
    return WorkersOut(ok=bool(workers), error=error, workers=workers)


def inspect_workers(settings: Settings | None = None, timeout_s: float = INSPECT_TIMEOUT_S) -> WorkersOut:
    """What the online Celery workers do and hold.

    On the embedded SQLite broker, from the status files its workers write
    (:mod:`node.worker_status`); on RabbitMQ or Redis, by broadcast (one per question, in parallel),
    the queues, model, device and GPU memory from the ``mednode_info`` remote-control command (the
    queues as the worker consumes them, its urgent slots' included: Celery's ``active_queues``
    lists only the main consumer's).
    """
    from node.celery_app import app

    if settings is not None and settings.broker.startswith("sqla+"):
        return workers_from_status_files(settings.data_dir)
    try:
        inspector = app.control.inspect(timeout=timeout_s)
        calls = {
            "ping": inspector.ping, "active": inspector.active, "reserved": inspector.reserved,
            "stats": inspector.stats,
            "info": lambda: _broadcast_info(app, timeout_s),
        }
        with ThreadPoolExecutor(max_workers=len(calls)) as executor:
            futures = {name: executor.submit(call) for name, call in calls.items()}
            answers = {name: (f.result() or {}) for name, f in futures.items()}
    except Exception as exc:  # noqa: BLE001 (boundary: the broker may not support broadcasts or be down)
        return WorkersOut(ok=False, error=f"{type(exc).__name__}: {exc}", workers=[])
    names = sorted(set(answers["ping"]) | set(answers["stats"]) | set(answers["active"]))
    workers = []
    for name in names:
        stats = answers["stats"].get(name) or {}
        info = answers["info"].get(name) or {}
        pool = stats.get("pool") or {}
        workers.append(WorkerOut(
            name=name,
            active=[{"id": t.get("id"), "name": t.get("name"), "args": t.get("args"),
                     "time_start": t.get("time_start")} for t in answers["active"].get(name) or []],
            reserved=len(answers["reserved"].get(name) or []),
            concurrency=pool.get("max-concurrency") if isinstance(pool, dict) else None,
            **_reported_fields(info if isinstance(info, dict) else {}),
            stats={k: stats[k] for k in ("pid", "uptime", "total") if k in stats},
        ))
    error = None if workers else (
        "no worker answered within "
        f"{timeout_s:g} s (workers on the embedded SQLite broker cannot answer broadcasts; "
        "with RabbitMQ or Redis they do). Running jobs below show which worker holds them.")
    return WorkersOut(ok=bool(workers), error=error, workers=workers)


def _broadcast_info(app: Any, timeout_s: float) -> dict[str, Any]:
    replies = app.control.broadcast("mednode_info", reply=True, timeout=timeout_s) or []
    merged: dict[str, Any] = {}
    for reply in replies:
        if isinstance(reply, dict):
            for name, value in reply.items():
                if isinstance(value, dict) and "error" not in value:
                    merged[name] = value
    return merged
