"""Instances put into a node's store and index as its listener would, without a DICOM association,
and the study completed: the start of a job for tests that drive the pipeline directly."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from dicom_io.header import parse_header
from node.completion import complete_due_studies
from node.context import NodeContext
from storage.index import index_instance


def receive_and_complete(ctx: NodeContext, instances: Iterable[bytes], now: datetime) -> int:
    """Store and index ``instances`` (Part 10 bytes) as received at ``now``, complete their study
    after its quiet period, and return the one job that routing made."""
    for data in instances:
        header, _ = parse_header(data)
        stored = ctx.store.write_instance(header.study_instance_uid, header.series_instance_uid,
                                          header.sop_instance_uid, data)
        with ctx.sessions() as session, session.begin():
            index_instance(session, header, stored, calling_ae_title="MODALITY", called_ae_title="MEDNODE",
                           now=now)
    [(job_id, _)] = complete_due_studies(ctx.sessions, ctx.settings, now=now + timedelta(seconds=5))
    return job_id
