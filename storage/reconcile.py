"""Re-index instance files the index does not know: the repair after a crash or power loss.

The listener syncs each instance file to disk before it answers Success, then commits its index
row. A crash between the two, or a power loss that rolls back the last SQLite commits, leaves a
whole file without a row: the peer may never send it again, so the file itself is the record and
is indexed here, at start, before the listener opens.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_io.errors import InvalidInstanceError
from dicom_io.header import parse_header
from storage.index import IndexOutcome, LateSeriesCheck, index_instance
from storage.models import Instance
from storage.store import InstanceStore, StoredFile

log = logging.getLogger(__name__)

#: Series directories changed this long before the newest indexed instance are checked too.
MARGIN = timedelta(minutes=10)


def _mtime_ns(store: InstanceStore, relative: str) -> int:
    try:
        return store.absolute(relative).stat().st_mtime_ns
    except FileNotFoundError:
        return -1


def reindex_orphans(
    store: InstanceStore, sessions: sessionmaker[Session], late_series_check: LateSeriesCheck | None = None
) -> int:
    """Index every instance file without a row; return how many were indexed.

    ``late_series_check`` is the listener's (:func:`storage.index.index_instance`): a late series
    found here reopens its complete study only if a rule would run on it, as it would have had
    it been indexed when it arrived.
    """
    with sessions() as session:
        newest = session.scalar(select(func.max(Instance.received_at)))
    since = (newest - MARGIN).timestamp() if newest is not None else None
    candidates = store.instance_files_changed_since(since)
    if not candidates:
        return 0
    with sessions() as session:
        known = set(session.scalars(select(Instance.path).where(Instance.path.in_(candidates))))
    repaired = 0
    for relative in candidates:
        if relative in known:
            continue
        data = store.read(relative)
        if not store.name_matches_content(relative, data):
            log.warning("removing %s: a power loss tore it (content does not match its name)", relative)
            store.delete(relative)
            continue
        try:
            header, _ = parse_header(data)
        except InvalidInstanceError as exc:
            log.error("unindexed file %s is not a valid instance (%s); left in place", relative, exc)
            continue
        with sessions() as session:
            current = session.scalar(
                select(Instance.path).where(Instance.sop_instance_uid == header.sop_instance_uid)
            )
        if current is not None and _mtime_ns(store, current) >= _mtime_ns(store, relative):
            # an older version whose delete was interrupted after a re-send replaced it
            log.warning("removing %s: an older version of the instance indexed as %s", relative, current)
            store.delete(relative)
            continue
        stored = StoredFile(relative, len(data), hashlib.sha256(data).hexdigest())
        with sessions() as session, session.begin():
            outcome, obsolete = index_instance(session, header, stored, calling_ae_title=None, called_ae_title=None,
                                               late_series_check=late_series_check)
        if obsolete is not None and (obsolete != relative or outcome is IndexOutcome.DUPLICATE):
            store.delete(obsolete)  # the file replaced, or this one: its study holds the instance already
        repaired += 1
    if repaired:
        log.warning("re-indexed %d instance file(s) written before an interruption", repaired)
    return repaired
