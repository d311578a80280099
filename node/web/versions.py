"""Result versions of a study side by side (v1 | v2 …) for the study page.

When late images change a processed study, each rule writes a new version of its results; the
page lines the versions of one rule up in columns, one row per output (SEG, SR, report, rejection
note…), so an administrator sees what replaced what and which deliveries were cancelled.
"""

from __future__ import annotations

from dataclasses import dataclass

from node.web.schemas import JobOut, ResultOut


@dataclass(frozen=True)
class VersionColumn:
    """One version of a rule's results: the job that wrote it."""

    study_version: int
    job_id: int
    state: str
    reason: str | None
    current: bool  #: the newest version with results


@dataclass(frozen=True)
class VersionRow:
    """One kind of output across versions: the objects of that kind each version wrote."""

    kind: str
    cells: list[list[ResultOut]]  #: one list per column, in column order


@dataclass(frozen=True)
class RuleVersions:
    rule_name: str
    columns: list[VersionColumn]
    rows: list[VersionRow]


def result_versions(jobs: list[JobOut]) -> list[RuleVersions]:
    """The rules of a study that wrote results for more than one study version, oldest first.

    On-demand jobs are left out: each asks its own question and amends nothing.
    """
    by_rule: dict[str, dict[int, JobOut]] = {}
    for job in jobs:
        if job.on_demand or not job.results:
            continue
        versions = by_rule.setdefault(job.rule_name, {})
        known = versions.get(job.study_version)
        if known is None or job.id > known.id:  # a re-run of the same version: its latest job
            versions[job.study_version] = job
    out = []
    for rule_name, versions in sorted(by_rule.items()):
        if len(versions) < 2:
            continue
        ordered = [versions[v] for v in sorted(versions)]
        columns = [
            VersionColumn(study_version=j.study_version, job_id=j.id, state=j.state, reason=j.reason,
                          current=index == len(ordered) - 1)
            for index, j in enumerate(ordered)
        ]
        kinds = list(dict.fromkeys(r.kind for j in ordered for r in j.results))
        rows = [VersionRow(kind, [[r for r in j.results if r.kind == kind] for j in ordered]) for kind in kinds]
        out.append(RuleVersions(rule_name, columns, rows))
    return out
