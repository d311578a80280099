"""The series a volume job reads, and the bytes it reserves of the volume budget: an enhanced
(multi-frame) instance counts all its frames, not one."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydicom import dcmread

from node.jobs import ClaimedJob
from node.pipeline import select_series
from storage.store import InstanceStore

ENHANCED_MR = "multiframe/emri_small.dcm"  # 64 × 64, 10 frames
LEGACY_ENHANCED_CT = "multiframe/dcmqi_legacy_converted_ct.dcm"  # 38 rows × 24 columns, 3 frames
CLASSIC_MR = "compressed/mr_series_j2k"  # 4 single-frame instances, 256 × 256


def _job(store: InstanceStore, shared_dicom: Path, series: dict[str, list[str]]) -> ClaimedJob:
    """A job whose series hold copies of the shared files (series UID -> shared paths)."""
    instance_paths: dict[str, list[str]] = {}
    for series_uid, sources in series.items():
        for number, source in enumerate(sources):
            relative = f"{series_uid}/{number}.dcm"
            store.absolute(relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shared_dicom / source, store.absolute(relative))
            instance_paths.setdefault(series_uid, []).append(relative)
    return ClaimedJob(id=1, study_instance_uid="1.2.3", study_version=1, rule_name="r", tasks=[],
                      series_uids=list(instance_paths), destinations=[], attempt=1,
                      instance_paths=instance_paths)


def test_multi_frame_instances_count_every_frame(tmp_path: Path, shared_dicom: Path) -> None:
    store = InstanceStore(tmp_path / "store")
    classic = sorted(str(p.relative_to(shared_dicom)) for p in (shared_dicom / CLASSIC_MR).glob("*.dcm"))
    job = _job(store, shared_dicom, {"enhanced": [ENHANCED_MR, ENHANCED_MR], "classic": classic,
                                     "ct": [LEGACY_ENHANCED_CT]})
    # the series with most frames wins, enhanced or classic (load_volume reads both): 20 frames
    # of two enhanced instances before 4 single-frame instances ...
    assert select_series(store, job.instance_paths, ("MR",)) == ("enhanced", 2 * 64 * 64 * 10 * 2)
    # ... and an enhanced one counts every frame of every instance
    assert select_series(store, job.instance_paths, ("CT",)) == ("ct", 38 * 24 * 3 * 2)
    enhanced_only = _job(store, shared_dicom, {"enhanced": [ENHANCED_MR, ENHANCED_MR]})
    assert select_series(store, enhanced_only.instance_paths, ("MR",)) == ("enhanced", 2 * 64 * 64 * 10 * 2)
    classic_only = _job(store, shared_dicom, {"classic": classic})
    assert select_series(store, classic_only.instance_paths, ("MR",)) == ("classic", 4 * 256 * 256 * 2)


def test_a_classic_series_with_more_frames_wins_over_an_enhanced_one(tmp_path: Path, shared_dicom: Path) -> None:
    store = InstanceStore(tmp_path / "store")
    head = sorted(str(p.relative_to(shared_dicom)) for p in (shared_dicom / "ct/pydicom_head_ct2").glob("*.dcm"))
    job = _job(store, shared_dicom, {"enhanced": [LEGACY_ENHANCED_CT], "classic": head})
    # 4 single-frame 16 × 16 slices against one instance of 3 frames: the frames decide, not the bytes
    assert select_series(store, job.instance_paths, ("CT",)) == ("classic", 4 * 16 * 16 * 2)


def test_an_enhanced_series_with_frames_at_one_position_goes_after_one_that_forms_a_volume(
    tmp_path: Path, shared_dicom: Path
) -> None:
    """A 4D enhanced series (phases, diffusion directions: several frames a position) is no volume
    for load_volume: a smaller series that is one goes first, and the 4D one only when alone."""
    store = InstanceStore(tmp_path / "store")
    four_d = tmp_path / "4d.dcm"
    ds = dcmread(shared_dicom / LEGACY_ENHANCED_CT)
    first = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
    for item in ds.PerFrameFunctionalGroupsSequence:  # every frame at the first frame's position
        item.PlanePositionSequence[0].ImagePositionPatient = list(first)
    ds.save_as(four_d)
    head = sorted(str(p.relative_to(shared_dicom)) for p in (shared_dicom / "ct/pydicom_head_ct2").glob("*.dcm"))[:2]
    job = _job(store, tmp_path, {"4d": ["4d.dcm"]})
    assert select_series(store, job.instance_paths, ("CT",)) == ("4d", 38 * 24 * 3 * 2)  # alone: load_volume says why
    both = _job(store, shared_dicom, {"classic": head})
    both.instance_paths.update(job.instance_paths)
    # 2 classic frames against 3 frames at one position: the classic series forms a volume
    assert select_series(store, both.instance_paths, ("CT",)) == ("classic", 2 * 16 * 16 * 2)
