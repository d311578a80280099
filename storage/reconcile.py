"""Repair at start after a crash or power loss: index rows and instance files agree again.

The listener answers Success only once an instance's file is synced and its index row committed.
What an interruption can leave, and what is done here, at start, before the listener opens:

- a whole file without a row (a crash after the sync, before the commit; a power loss that rolled
  back the last SQLite commits): the peer may never send it again, so the file itself is the
  record and is indexed (:func:`reindex_orphans`);
- a row whose file is missing or torn (on PostgreSQL the row of a new instance commits while its
  file's sync runs, :class:`node.ingest.Ingestor`; a power loss before the sync returned): the
  instance was never acknowledged, the peer sends it again, and the row goes
  (:func:`remove_lost_instances`, run first).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_io.errors import InvalidInstanceError
from dicom_io.header import parse_header
from storage.index import IndexOutcome, LateSeriesCheck, index_instance
from storage.models import Instance
from storage.store import InstanceStore, StoredFile, UnconfirmedInstance

log = logging.getLogger(__name__)

#: Series directories changed this long before the newest indexed instance are checked too.
MARGIN = timedelta(minutes=10)


def _mtime_ns(store: InstanceStore, relative: str) -> int:
    try:
        return store.absolute(relative).stat().st_mtime_ns
    except FileNotFoundError:
        return -1


def _delete_rows_naming(sessions: sessionmaker[Session], relative: str, instance_pk: int | None = None) -> int:
    """Delete the instance rows that name ``relative`` (only row ``instance_pk``, if given, and
    only while it still names that file: a re-send may have pointed it at new bytes meanwhile)."""
    statement = delete(Instance).where(Instance.path == relative)
    if instance_pk is not None:
        statement = statement.where(Instance.id == instance_pk)
    with sessions() as session, session.begin():
        result = session.execute(statement.execution_options(synchronize_session=False, preserve_rowcount=True))
        return int(getattr(result, "rowcount", 0))


def _settle(store: InstanceStore, sessions: sessionmaker[Session], unconfirmed: UnconfirmedInstance) -> int:
    """Keep an unconfirmed file that is whole; else remove it and the rows naming it. Return the
    rows removed.

    A file whose name is lost but whose partial name holds its whole bytes gets its name back
    (the sync may have returned, and Success been answered, with the new name not yet durable):
    only bytes that are not whole, under either name, cost the row.
    """
    relative, removed = unconfirmed.relative_path, 0
    if unconfirmed.state == "written":
        if not store.name_matches_content(relative, store.read(relative)):
            log.warning("removing %s and its index row: a power loss tore it before its sync returned "
                        "(never acknowledged)", relative)
            removed = _delete_rows_naming(sessions, relative)
            store.delete(relative)
    elif unconfirmed.state == "missing":
        if store.name_matches_content(relative, unconfirmed.marker.read_bytes()):
            try:
                os.link(unconfirmed.marker, store.absolute(relative))
                log.warning("restored the name of %s from its partial name (a power loss lost the name)", relative)
            except FileExistsError:
                pass  # written again meanwhile: that file is whole and its own
        else:
            removed = _delete_rows_naming(sessions, relative)
            if removed:
                log.warning("removed the index row of %s: a power loss lost the file before its sync "
                            "returned (never acknowledged)", relative)
    unconfirmed.marker.unlink(missing_ok=True)
    return removed


def _being_written(store: InstanceStore, relative: str) -> bool:
    """Whether a writer still holds the file: linked to its partial name too, or gone (removed by
    that writer since the store was listed)."""
    try:
        return store.absolute(relative).stat().st_nlink > 1
    except FileNotFoundError:
        return True


def remove_lost_instances(store: InstanceStore, sessions: sessionmaker[Session],
                          partials: Iterable[Path] | None = None) -> int:
    """Delete the index rows whose instance files a power loss lost or tore; return how many.

    Such a row was committed while its file's sync ran and the listener never answered Success
    for it (it waits for both): the peer sends the instance again. Two checks, cheap enough for
    every start:

    - this host's files whose sync was never seen to return
      (:meth:`storage.store.InstanceStore.unconfirmed_instances`, at most one per association
      that was receiving) are read whole and checked against the digest in their name: a torn
      one goes with its rows, a whole one stays (a crash of the process alone leaves its files
      whole: they were in the page cache);
    - rows received up to :data:`MARGIN` before the newest whose file does not exist go: a row
      is committed only once its file has its name, on every host sharing the store, and a
      file is removed only after its row, so only a power loss leaves a row without a file (the
      file's name and partial name both lost, so nothing marks it). It runs only where the
      store is on a local file system (:meth:`~storage.store.InstanceStore.on_network_filesystem`):
      on a network one other hosts' newest files may not be visible here yet, and its server
      commits a new name before it answers anyway. The delete names the path it found missing,
      so a row pointed at new bytes meanwhile stays. A row whose series directory is missing
      too stays: that is a store not mounted or not the one the index was written against, not
      a power loss (new directories are synced before their first file is written).

    Run it before :meth:`~storage.store.InstanceStore.remove_partials`, which would remove the
    marks, and before :func:`reindex_orphans`. ``partials``: the store's partial files, as
    :meth:`~storage.store.InstanceStore.partial_files` listed them for both (listed here when None).
    """
    removed = sum(_settle(store, sessions, unconfirmed) for unconfirmed in store.unconfirmed_instances(partials))
    if store.on_network_filesystem():
        # other hosts write there, and this host may not see their newest files yet (a cached
        # lookup): a missing file is no proof of a power loss here. An NFS server commits a new
        # name before it answers, so a file cannot lose both names on it anyway.
        return removed
    with sessions() as session:
        newest = session.scalar(select(func.max(Instance.received_at)))
        if newest is None:
            return removed
        recent = session.execute(
            select(Instance.id, Instance.path).where(Instance.received_at >= newest - MARGIN)
        ).all()
    root = store.root
    for instance_pk, relative in recent:
        path = root / relative
        # its series directory was synced before any file went in (begin_instance): where it is
        # missing too, the store is not what the index was written against (not mounted, say)
        if not path.exists() and path.parent.is_dir():
            gone = _delete_rows_naming(sessions, relative, instance_pk)
            if gone:
                log.warning("removed the index row of %s: its file is missing (a power loss before its "
                            "sync returned; never acknowledged)", relative)
            removed += gone
    return removed


def reindex_orphans(
    store: InstanceStore, sessions: sessionmaker[Session], late_series_check: LateSeriesCheck | None = None
) -> int:
    """Index every instance file without a row; return how many were indexed.

    A file still linked to a partial name (more than one link) is left alone: run after
    :func:`remove_lost_instances` and :meth:`~storage.store.InstanceStore.remove_partials`, which
    settle this host's marks, such a name is another host's (or a live process's) whose sync has
    not returned — that writer is storing the instance now, may yet refuse it and remove the
    file, and settles it itself (on a shared store, start-up repair touches only what its own
    host left).

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
        if relative in known or _being_written(store, relative):
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
