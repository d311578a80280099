"""The instance store writes atomically, refuses unsafe paths and keeps its free-space watermark."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from storage import store as store_module
from storage.errors import InvalidUIDError, StorageError, StorageFullError
from storage.store import PARTIAL_SUFFIX, InstanceStore, check_uid


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


def test_remove_partials_deletes_only_temporary_files(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    kept = store.write(store.result_path(1, "1.2.3.4"), b"complete")
    series_dir = tmp_path / "results/1"
    crashed = [
        series_dir / f".1.2.3.5.dcm.abc{PARTIAL_SUFFIX}",
        tmp_path / "results" / "3" / f".1.2.9.dcm.def{PARTIAL_SUFFIX}",
    ]
    for path in crashed:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")

    assert store.remove_partials() == 2
    assert _partials(tmp_path) == []
    assert store.read(kept.relative_path) == b"complete"
    assert store.remove_partials() == 0


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


def test_same_bytes_still_being_written_elsewhere_are_not_acknowledged(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    data = b"the whole instance"
    writer = store.begin_instance("1.2", "1.2.3", "1.2.3.4", data)
    os.truncate(writer.target, 5)  # the other association has written 5 bytes so far

    racer = store.begin_instance("1.2", "1.2.3", "1.2.3.4", data)
    with pytest.raises(StorageError, match="being written by another association"):
        racer.finish()
    racer.abort()

    assert writer.target.exists()  # the racer never removes what another write created
    writer.abort()


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
        if str(path).endswith(".dcm") and flags & os.O_CREAT:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_inode)
    with pytest.raises(StorageFullError):
        store.write_instance("1.2", "1.2.3", "1.2.3.4", b"data")
