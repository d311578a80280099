"""The priors stage of a job: the rule's ``priors`` → the PACS → what the model and the SR get.

Runs before the model on a job whose rule has ``priors`` (:class:`node.config.RulePriors`). The
outcome is always a :class:`~node.vlm_stage.PriorInput`: the newest comparable prior (its images
and report), or none with the reason, so the SR can say "No prior study available". A PACS that
is down or slow makes the job go on without a prior (``on_unavailable: continue``) or raises
:class:`~node.prior_retrieval.PriorsUnavailableError` (``retry``), which the pipeline turns into a
retry; the last attempt goes on without the prior rather than fail the report.
"""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset

from node import jobs
from node.config import RulePriors
from node.context import NodeContext
from node.prior_retrieval import PriorsUnavailableError, fetch_priors
from node.priors import CurrentStudy, parse_da
from node.vlm_stage import PriorInput

log = logging.getLogger(__name__)


def rule_priors(ctx: NodeContext, job: jobs.ClaimedJob) -> RulePriors | None:
    """The ``priors`` settings of the job's rule (as configured now), None when it has none."""
    rule = next((r for r in ctx.settings.effective_rules if r.name == job.rule_name), None)
    return rule.priors if rule is not None else None


def current_study(series: dict[str, list[Dataset]]) -> CurrentStudy | None:
    """The current study's query keys, from its first image header; None without a Patient ID."""
    first = next((ds for datasets in series.values() for ds in datasets), None)
    if first is None or not str(first.get("PatientID", "") or "").strip():
        return None
    return CurrentStudy(
        study_instance_uid=str(first.StudyInstanceUID), patient_id=str(first.PatientID).strip(),
        study_date=parse_da(first.get("StudyDate")), modality=str(first.get("Modality", "") or "") or None,
        body_part_examined=str(first.get("BodyPartExamined", "") or "") or None,
    )


def job_priors(ctx: NodeContext, job: jobs.ClaimedJob, series: dict[str, list[Dataset]],
               rule: RulePriors) -> PriorInput:
    """Fetch the prior study the rule asks for into the job's priors area.

    Raises
    ------
    PriorsUnavailableError
        The PACS did not answer, the rule says ``retry`` and attempts are left.
    """
    current = current_study(series)
    if current is None:
        return PriorInput(reason="the study has no Patient ID to look for priors by")
    try:
        source = ctx.settings.resolve_destination(rule.source)
    except ValueError as exc:
        log.warning("job %d: priors not fetched: %s", job.id, exc)
        return PriorInput(reason="the prior-study source is not configured")
    classes = sorted({str(ds.SOPClassUID) for datasets in series.values() for ds in datasets})
    try:
        found = fetch_priors(current, rule, source, calling_ae_title=ctx.settings.ae_title, store=ctx.store,
                             area=ctx.store.prior_area(job.id), storage_classes=classes, log_key=f"job {job.id}")
    except PriorsUnavailableError as exc:
        if rule.on_unavailable == "retry" and job.attempt < ctx.settings.job_max_attempts:
            log.warning("job %d: priors unavailable, the job will retry: %s", job.id, exc)
            raise
        log.warning("job %d: priors unavailable, going on without: %s", job.id, exc)
        return PriorInput(reason=f"the PACS {source.ae_title} did not answer")
    if not found:
        return PriorInput()
    newest = found[0]
    return PriorInput(tuple(newest.images), newest.study.study_date, newest.report)
