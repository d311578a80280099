"""The instance store writes atomically, refuses unsafe paths and keeps its free-space watermark."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from storage import store as store_module
from storage.errors import InvalidUIDError, StorageError, StorageFullError
from storage.store import (
    LEGACY_PARTIAL_AGE_S,
    NETWORK_FILESYSTEMS,
    PARTIAL_SUFFIX,
    InstanceStore,
    check_uid,
    mount_type,
    partial_writer,
)


def _partials(root: Path) -> list[Path]:
    return sorted(root.rglob(f"*{PARTIAL_SUFFIX}"))


def test_write_is_complete_and_leaves_no_partial(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "store")
    relative = store.result_path(3, "1.2.3.4.5")
    data = [b"DICM" * 1000, b"more", b""]
    stored = store.write(relative, data)

    assert relative == "results/3/1.2.3.4.5.dcm"
    assert stored.relative_path == relative
    assert stored.size_bytes == sum(len(p) for p in data)
    assert stored.sha256 == hashlib.sha256(b"".join(data)).hexdigest()
    assert store.read(relative) == b"".join(data)
    assert (tmp_path / "store" / relative).is_file()
    assert _partials(tmp_path) == []


def test_write_replaces_an_existing_file_atomically(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    relative = store.result_path(1, "1.2.3.4")
    first = store.write(relative, b"first version")
    second = store.write(relative, b"second, longer version")

    assert store.read(relative) == b"second, longer version"
    assert first.sha256 != second.sha256
    assert [p.name for p in (tmp_path / "results/1").iterdir()] == ["1.2.3.4.dcm"]


def test_failed_write_removes_its_temporary_file(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    relative = store.result_path(1, "1.2.3.4")
    (tmp_path / relative).mkdir(parents=True)  # a directory where the file should go: rename fails

    with pytest.raises(OSError):
        store.write(relative, b"data")
    assert _partials(tmp_path) == []
    assert (tmp_path / relative).is_dir()


def test_disk_full_during_write_is_storage_full_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = InstanceStore(tmp_path)
    relative = store.result_path(1, "1.2.3.4")

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "_sync_data", no_space)
    with pytest.raises(StorageFullError):
        store.write(relative, b"data")
    monkeypatch.undo()
    assert _partials(tmp_path) == []
    assert not (tmp_path / relative).exists()


def test_watermark_above_free_space_refuses_the_write(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    store = InstanceStore(tmp_path, min_free_bytes=free + 1024**4)
    relative = store.result_path(1, "1.2.3.4")

    with pytest.raises(StorageFullError, match="watermark") as raised:
        store.write(relative, b"x" * 10)
    assert isinstance(raised.value, StorageError) and isinstance(raised.value, OSError)
    assert not (tmp_path / "results").exists()
    assert _partials(tmp_path) == []


def test_watermark_below_free_space_allows_the_write(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path, min_free_bytes=1024)
    stored = store.write(store.result_path(1, "1.2.3.4"), b"x")
    assert stored.size_bytes == 1


@pytest.mark.parametrize(
    "uid",
    ["", "../1.2", "1.2/3", "1.2.3.", ".1.2", "1..2", "1.2.a", "1.2 ", "/etc/passwd", "1" * 65, "1.2\x00"],
)
def test_check_uid_refuses_what_is_not_a_uid(uid: str) -> None:
    with pytest.raises(InvalidUIDError):
        check_uid(uid)


def test_check_uid_accepts_a_64_character_uid() -> None:
    uid = "1." + "2" * 62
    assert check_uid(uid) == uid


def test_instance_and_result_paths_refuse_bad_uids(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    digest = hashlib.sha256(b"x").hexdigest()
    with pytest.raises(InvalidUIDError):
        store.instance_path("..", "1.2", "1.2.3", digest)
    with pytest.raises(InvalidUIDError):
        store.instance_path("1.2", "1.2/../../x", "1.2.3", digest)
    with pytest.raises(InvalidUIDError):
        store.instance_path("1.2", "1.2.3", "", digest)
    with pytest.raises(ValueError):
        store.instance_path("1.2", "1.2.3", "1.2.3.4", "../" + digest[3:])
    with pytest.raises(InvalidUIDError):
        store.write_instance("1.2", "1.2.3", "../../etc", b"data")
    assert not (tmp_path / "instances").exists()
    with pytest.raises(InvalidUIDError):
        store.result_path(7, "../../1.2")
    assert store.result_path(7, "1.2.3") == "results/7/1.2.3.dcm"


@pytest.mark.parametrize("relative", ["../outside.dcm", "instances/../../outside.dcm", "/tmp/outside.dcm"])
def test_paths_that_leave_the_store_are_refused(tmp_path: Path, relative: str) -> None:
    store = InstanceStore(tmp_path / "store")
    with pytest.raises(InvalidUIDError):
        store.write(relative, b"data")
    with pytest.raises(InvalidUIDError):
        store.read(relative)
    assert not (tmp_path / "outside.dcm").exists()


def test_symlink_out_of_the_store_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    store = InstanceStore(tmp_path / "store")
    os.symlink(outside, tmp_path / "store" / "escape")
    with pytest.raises(InvalidUIDError):
        store.write("escape/file.dcm", b"data")
    assert list(outside.iterdir()) == []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_remove_partials_removes_only_what_this_hosts_dead_writers_left(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    kept = store.write(store.result_path(1, "1.2.3.4"), b"complete")
    series_dir = tmp_path / "instances/1.2/1.2.3"
    series_dir.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = _dead_pid()
    host = store.host

    def partial(directory: Path, writer_host: str, pid: int) -> Path:
        path = directory / f".1.2.3.4.0123456789abcdef.dcm~{writer_host}~{pid}~abc{PARTIAL_SUFFIX}"
        path.write_bytes(b"half")
        assert partial_writer(path.name) == store_module.PartialWriter(writer_host, pid)
        return path

    try:
        removed = [
            partial(series_dir, host, dead),  # this host's writer died mid-write
            partial(tmp_path / "results/1", host, os.getpid()),  # a predecessor with this very pid
        ]
        stays = [
            partial(series_dir, "other-host.example.org", dead),  # another host's: its own to clean
            partial(series_dir, "other-host.example.org", live.pid),
            partial(series_dir, host, live.pid),  # another running listener of this host
        ]
        legacy_fresh = series_dir / f".1.2.3.5.dcm.abc{PARTIAL_SUFFIX}"  # before hosts were named
        legacy_old = tmp_path / "results/1" / f".1.2.9.dcm.def{PARTIAL_SUFFIX}"
        for path in (legacy_fresh, legacy_old):
            path.write_bytes(b"half")
        long_ago = time.time() - LEGACY_PARTIAL_AGE_S - 60
        os.utime(legacy_old, (long_ago, long_ago))

        assert store.remove_partials() == 3
        assert _partials(tmp_path) == sorted([*stays, legacy_fresh])
        assert not any(p.exists() for p in removed)
        assert store.read(kept.relative_path) == b"complete"
        assert store.remove_partials() == 0
    finally:
        live.kill()
        live.wait()


def test_a_crashed_instance_write_leaves_a_partial_naming_its_host_and_process(tmp_path: Path) -> None:
    # the writer is killed (SIGKILL) once the bytes are written, before the file gets its name
    crash = textwrap.dedent(f"""
        import os, signal
        from storage.store import InstanceStore
        os.link = lambda *_: os.kill(os.getpid(), signal.SIGKILL)
        InstanceStore({str(tmp_path)!r}).write_instance("1.2", "1.2.3", "1.2.3.4", b"instance")
    """)
    child = subprocess.run([sys.executable, "-c", crash], check=False)
    assert child.returncode == -signal.SIGKILL

    [left] = _partials(tmp_path)
    writer = partial_writer(left.name)
    assert writer is not None and writer.host == socket.gethostname() and writer.pid > 0
    assert left.parent == tmp_path / "instances/1.2/1.2.3" and left.read_bytes() == b"instance"
    assert list((tmp_path / "instances/1.2/1.2.3").glob("*.dcm")) == []  # no whole-looking file
    # another host starting on the same store leaves it; this host removes it
    assert InstanceStore(tmp_path, host="other-host").remove_partials() == 0
    assert InstanceStore(tmp_path).remove_partials() == 1
    assert _partials(tmp_path) == []


def test_delete_removes_a_stored_file(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    relative = store.write(store.result_path(1, "1.2.3.4"), b"x").relative_path
    store.delete(relative)
    assert not (tmp_path / relative).exists()
    store.delete(relative)  # deleting twice is harmless


# -- received instances: content-addressed, written once ------------------------------------------
def test_write_instance_names_the_file_by_uids_and_digest(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    data = b"DICM instance bytes"
    stored = store.write_instance("1.2", "1.2.3", "1.2.3.4", data)

    digest = hashlib.sha256(data).hexdigest()
    assert stored.relative_path == f"instances/1.2/1.2.3/1.2.3.4.{digest[:16]}.dcm"
    assert stored.relative_path == store.instance_path("1.2", "1.2.3", "1.2.3.4", digest)
    assert (stored.size_bytes, stored.sha256) == (len(data), digest)
    assert store.read(stored.relative_path) == data
    assert store.name_matches_content(stored.relative_path, data)
    assert not store.name_matches_content(stored.relative_path, data + b"!")
    assert _partials(tmp_path) == []


def test_identical_resend_writes_nothing_and_other_bytes_get_another_file(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    first = store.write_instance("1.2", "1.2.3", "1.2.3.4", b"version one")
    path = tmp_path / first.relative_path
    before = path.stat()

    again = store.write_instance("1.2", "1.2.3", "1.2.3.4", b"version one")
    other = store.write_instance("1.2", "1.2.3", "1.2.3.4", b"version two")

    assert again == first
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert other.relative_path != first.relative_path
    assert store.read(first.relative_path) == b"version one"  # the index decides which one counts
    assert store.read(other.relative_path) == b"version two"


def test_interrupted_instance_write_is_redone(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    data = b"the whole instance"
    relative = store.instance_path("1.2", "1.2.3", "1.2.3.4", hashlib.sha256(data).hexdigest())
    (tmp_path / relative).parent.mkdir(parents=True)
    (tmp_path / relative).write_bytes(data[:5])  # what a crash mid-write leaves

    store.write_instance("1.2", "1.2.3", "1.2.3.4", data)

    assert store.read(relative) == data


def test_write_instance_keeps_the_watermark(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path, min_free_bytes=shutil.disk_usage(tmp_path).free + 1024**4)
    with pytest.raises(StorageFullError):
        store.write_instance("1.2", "1.2.3", "1.2.3.4", b"data")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_disk_full_during_instance_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = InstanceStore(tmp_path)

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "_sync_data", no_space)
    with pytest.raises(StorageFullError):
        store.write_instance("1.2", "1.2.3", "1.2.3.4", b"data")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


# -- pending instance writes: durable at finish(), gone on abort() --------------------------------
def test_pending_instance_is_removed_when_aborted_before_finish(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    pending = store.begin_instance("1.2", "1.2.3", "1.2.3.4", b"bytes of an instance")
    assert pending.target.exists()  # written, waiting for the caller's index statements

    pending.abort()
    pending.abort()  # idempotent

    assert not pending.target.exists()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_finished_pending_instance_survives_abort(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    pending = store.begin_instance("1.2", "1.2.3", "1.2.3.4", b"bytes of an instance")

    stored = pending.finish()
    pending.abort()  # what the caller's ``finally`` does

    assert store.read(stored.relative_path) == b"bytes of an instance"


def test_aborting_an_identical_resend_keeps_the_existing_file(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    first = store.write_instance("1.2", "1.2.3", "1.2.3.4", b"version one")

    again = store.begin_instance("1.2", "1.2.3", "1.2.3.4", b"version one")
    again.abort()  # e.g. the index was unavailable for the re-send

    assert store.read(first.relative_path) == b"version one"


def test_a_write_in_progress_on_another_host_is_never_touched(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    data = b"the whole instance"
    target = tmp_path / store.instance_path("1.2", "1.2.3", "1.2.3.4", hashlib.sha256(data).hexdigest())
    target.parent.mkdir(parents=True)
    elsewhere = InstanceStore(tmp_path, host="other-host").partial_path(target)
    elsewhere.write_bytes(data[:5])  # the other host has written 5 bytes so far

    stored = store.write_instance("1.2", "1.2.3", "1.2.3.4", data)

    assert store.read(stored.relative_path) == data
    assert elsewhere.read_bytes() == data[:5]
    assert store.remove_partials() == 0 and elsewhere.exists()


def test_same_bytes_written_at_once_share_one_file_and_neither_removes_it(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    other_process = InstanceStore(tmp_path, host="other-host")
    data = b"the whole instance"
    writer = store.begin_instance("1.2", "1.2.3", "1.2.3.4", data)
    racer = other_process.begin_instance("1.2", "1.2.3", "1.2.3.4", data)  # finds the whole file

    assert racer.finish() == writer.stored
    racer.abort()
    assert writer.target.read_bytes() == data  # the racer never removes what another write created
    writer.finish()
    writer.abort()
    assert writer.target.read_bytes() == data
    assert _partials(tmp_path) == []


def _slow_sync(seen: dict[str, object]) -> Callable[[int], None]:
    def sync(fd: int) -> None:
        seen["thread"] = threading.current_thread().name
        time.sleep(0.2)
        os.fstat(fd)  # raises if the descriptor was closed under the sync
        seen["fd_open_until_synced"] = True
        os.fdatasync(fd)

    return sync


def test_the_sync_runs_beside_the_caller_and_finish_waits_for_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = InstanceStore(tmp_path)
    seen: dict[str, object] = {}
    monkeypatch.setattr(store_module, "_sync_data", _slow_sync(seen))
    pending = store.begin_instance("1.2", "1.2.3", "1.2.3.4", b"data")
    assert "fd_open_until_synced" not in seen  # begin_instance did not wait for the disk
    pending.finish()
    assert seen["fd_open_until_synced"] is True
    assert str(seen["thread"]).startswith("store-sync")
    assert pending.target.read_bytes() == b"data"


def test_abort_waits_for_a_running_sync_before_closing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = InstanceStore(tmp_path)
    seen: dict[str, object] = {}
    monkeypatch.setattr(store_module, "_sync_data", _slow_sync(seen))
    pending = store.begin_instance("1.2", "1.2.3", "1.2.3.4", b"data")
    pending.abort()  # e.g. the index statements failed
    assert seen.get("fd_open_until_synced") is True
    assert not pending.target.exists()


def test_disk_full_at_sync_removes_the_pending_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = InstanceStore(tmp_path)

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "_sync_data", no_space)  # the sync starts in begin_instance
    pending = store.begin_instance("1.2", "1.2.3", "1.2.3.4", b"data")
    with pytest.raises(StorageFullError):
        pending.finish()
    assert not pending.target.exists()


def test_no_inode_left_is_storage_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = InstanceStore(tmp_path)
    real_open = os.open

    def no_inode(path: object, flags: int, *args: object) -> int:
        if str(path).endswith(PARTIAL_SUFFIX) and flags & os.O_CREAT:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_inode)
    with pytest.raises(StorageFullError):
        store.write_instance("1.2", "1.2.3", "1.2.3.4", b"data")


def test_the_second_of_two_writers_of_the_same_bytes_takes_the_first_ones_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = InstanceStore(tmp_path)
    data = b"the whole instance"
    real_link = os.link
    first: list[InstanceStore] = []

    def another_writer_links_first(source: object, target: object) -> None:
        # another host's write of the same bytes gets the name between this one's check and link
        if not first:
            first.append(InstanceStore(tmp_path, host="other-host"))
            monkeypatch.setattr(os, "link", real_link)
            first[0].write_instance("1.2", "1.2.3", "1.2.3.4", data)
            os.utime(target, (1, 1))  # marks the other host's file
        real_link(source, target)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", another_writer_links_first)
    stored = store.write_instance("1.2", "1.2.3", "1.2.3.4", data)

    path = tmp_path / stored.relative_path
    assert path.read_bytes() == data and path.stat().st_mtime == 1  # the first file, untouched
    assert _partials(tmp_path) == []


def test_a_synced_instance_is_removed_on_abort_until_it_is_finished(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "store")
    uids = ("1.2.3", "1.2.3.4")
    dropped = store.begin_instance(*uids, "1.2.3.4.1", b"row failed")
    assert dropped.sync().size_bytes == len(b"row failed")
    dropped.abort()  # its row failed before committing: the synced file goes
    assert not store.absolute(dropped.stored.relative_path).exists()

    kept = store.begin_instance(*uids, "1.2.3.4.2", b"row committed")
    kept.sync()
    assert kept.finish() == kept.stored  # already synced: kept without another sync
    kept.abort()
    assert store.read(kept.stored.relative_path) == b"row committed"


def test_a_new_instance_files_partial_name_marks_its_sync_until_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row may name the file before its sync returns (PostgreSQL, node.ingest): until then the
    partial name stays linked to it, the mark start-up repair reads after a power loss."""
    store = InstanceStore(tmp_path)
    release = threading.Event()
    sync_data = store_module._sync_data
    monkeypatch.setattr(store_module, "_sync_data", lambda fd: (release.wait(5), sync_data(fd)))

    pending = store.begin_instance("1.2", "1.2.3", "1.2.3.4", [b"DICM", b"x" * 1000])
    [marker] = _partials(tmp_path)
    assert pending.syncing_in_background
    assert marker.stat().st_ino == pending.target.stat().st_ino  # the same file, two names
    release.set()
    pending.finish()
    pending.abort()
    assert _partials(tmp_path) == [] and pending.target.exists()


def test_a_failed_sync_removes_the_file_and_its_mark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = InstanceStore(tmp_path)

    def failing(_fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store_module, "_sync_data", failing)
    pending = store.begin_instance("1.2", "1.2.3", "1.2.3.4", b"DICM")
    with pytest.raises(OSError):
        pending.finish()
    pending.abort()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_a_torn_file_replaced_or_one_already_there_is_not_synced_in_the_background(tmp_path: Path) -> None:
    """No mark, no row before the sync: the caller syncs first (node.ingest)."""
    store = InstanceStore(tmp_path)
    store.write_instance("1.2", "1.2.3", "1.2.3.4", b"DICM" * 10)
    again = store.begin_instance("1.2", "1.2.3", "1.2.3.4", b"DICM" * 10)  # an identical re-send
    assert not again.syncing_in_background
    again.finish()
    target = again.target
    target.write_bytes(b"DI")  # what a power loss left: the wrong size
    replacing = store.begin_instance("1.2", "1.2.3", "1.2.3.4", b"DICM" * 10)
    assert not replacing.syncing_in_background
    replacing.finish()
    assert target.read_bytes() == b"DICM" * 10 and _partials(tmp_path) == []


def test_unconfirmed_instances_lists_only_this_hosts_dead_writers_marks(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    series_dir = tmp_path / "instances/1.2/1.2.3"
    series_dir.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = _dead_pid()

    def marked(name: str, writer_host: str, pid: int, *, link: bool = True) -> Path:
        marker = series_dir / f".{name}~{writer_host}~{pid}~abc{PARTIAL_SUFFIX}"
        marker.write_bytes(b"bytes")
        if link:
            os.link(marker, series_dir / name)
        return marker

    try:
        written = marked("1.2.3.4.0123456789abcdef.dcm", store.host, dead)
        missing = marked("1.2.3.5.0123456789abcdef.dcm", store.host, dead, link=False)
        other = marked("1.2.3.6.0123456789abcdef.dcm", store.host, dead, link=False)
        (series_dir / "1.2.3.6.0123456789abcdef.dcm").write_bytes(b"bytes")  # another writer's file
        marked("1.2.3.7.0123456789abcdef.dcm", store.host, live.pid)  # a running listener's
        marked("1.2.3.8.0123456789abcdef.dcm", "other-host.example.org", dead)  # another host's

        found = {(u.relative_path, u.marker, u.state) for u in store.unconfirmed_instances()}
    finally:
        live.kill()
        live.wait()
    base = "instances/1.2/1.2.3/"
    assert found == {
        (base + "1.2.3.4.0123456789abcdef.dcm", written, "written"),
        (base + "1.2.3.5.0123456789abcdef.dcm", missing, "missing"),
        (base + "1.2.3.6.0123456789abcdef.dcm", other, "another"),
    }


def test_the_mount_holding_a_path_names_its_file_system_type() -> None:
    mounts = ("/dev/vda1 / ext4 rw,relatime 0 0\n"
              "server:/export /srv/store nfs4 rw,relatime,vers=4.2 0 0\n"
              "tmpfs /srv/store/tmp\\040dir tmpfs rw 0 0\n")
    assert mount_type(Path("/srv/store/1.2.3/4.dcm"), mounts) == "nfs4"
    assert mount_type(Path("/srv/store"), mounts) == "nfs4"
    assert mount_type(Path("/srv/storeroom/x"), mounts) == "ext4"  # a prefix of the name is no parent
    assert mount_type(Path("/srv/store/tmp dir/x"), mounts) == "tmpfs"
    assert mount_type(Path("/var/lib/mednode"), mounts) == "ext4"
    assert "nfs4" in NETWORK_FILESYSTEMS and "ext4" not in NETWORK_FILESYSTEMS


def _resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (util-linux ``fincore``)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


@pytest.mark.skipif(shutil.which("fincore") is None, reason="util-linux fincore is not installed")
def test_prefetch_brings_a_series_back_into_the_page_cache(tmp_path: Path) -> None:
    """Received instances leave the page cache once synced; a job's prefetch reads them back in
    the background before it parses them."""
    store = InstanceStore(tmp_path)
    stored = [store.write_instance("1.2.3", "1.2.3.4", f"1.2.3.4.{n}", os.urandom(1 << 20)) for n in range(1, 4)]
    paths = [store.absolute(s.relative_path) for s in stored]
    for path in paths:  # as begin_instance leaves them
        fd = os.open(path, os.O_RDONLY)
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    assert sum(_resident_bytes(p) for p in paths) < 1 << 20

    store.prefetch([s.relative_path for s in stored] + ["instances/1.2.3/1.2.3.4/gone.dcm"])

    deadline = time.monotonic() + 10
    while sum(_resident_bytes(p) for p in paths) < 3 << 20:
        assert time.monotonic() < deadline, [_resident_bytes(p) for p in paths]
        time.sleep(0.05)
