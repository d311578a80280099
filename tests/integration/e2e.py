"""Shared steps of the end-to-end tests: push a study through mednode into Orthanc and check
what comes back."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset

from dicom_io.validation import run_dciodvfy
from tests.peers import Orthanc

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.22"}


@dataclass
class Returned:
    seg: hd.seg.Segmentation
    sr: hd.sr.ComprehensiveSR | hd.sr.Comprehensive3DSR
    seg_bytes: bytes
    sr_bytes: bytes


def wait_for_results(orthanc: Orthanc, study_uid: str, timeout_s: float = 180) -> Returned:
    """Wait until Orthanc holds a SEG and an SR in ``study_uid`` and read them back."""

    def found() -> dict[str, str] | None:
        kinds: dict[str, str] = {}
        for item in orthanc.study_instances(study_uid):
            sop_class = item.get("SOPClassUID")
            if sop_class == SEG_CLASS:
                kinds["seg"] = item["ID"]
            elif sop_class in SR_CLASSES:
                kinds["sr"] = item["ID"]
        return kinds if {"seg", "sr"} <= kinds.keys() else None

    ids = orthanc.wait_for(found, timeout_s=timeout_s, interval_s=0.5, what=f"SEG and SR in study {study_uid}")
    seg_bytes = orthanc.instance_file(ids["seg"])
    sr_bytes = orthanc.instance_file(ids["sr"])
    return Returned(
        seg=hd.seg.segread(BytesIO(seg_bytes)),
        sr=hd.sr.srread(BytesIO(sr_bytes)),
        seg_bytes=seg_bytes,
        sr_bytes=sr_bytes,
    )


def assert_valid(tmp_path: Path, name: str, data: bytes) -> None:
    """dciodvfy must report zero errors; its warnings are printed for the record."""
    path = tmp_path / f"{name}.dcm"
    path.write_bytes(data)
    report = run_dciodvfy(path)
    print(f"dciodvfy {name}: {len(report.warnings)} warning(s)")
    for warning in report.warnings:
        print(f"  {warning}")
    assert report.errors == [], f"dciodvfy errors in {name}: {report.errors}"


def measurement_groups(sr: hd.sr.ComprehensiveSR | hd.sr.Comprehensive3DSR) -> dict[str, dict[str, float]]:
    """Tracking identifier (the structure's label) → measurement name meaning → value."""
    out: dict[str, dict[str, float]] = {}
    for group in sr.content.get_volumetric_roi_measurement_groups():
        out[str(group.tracking_identifier)] = {
            m.name.meaning: float(m.value) for m in group.get_measurements()
        }
    return out


def poll(predicate, timeout_s: float, interval_s: float = 0.2, what: str = "condition",  # type: ignore[no-untyped-def]
         on_timeout: Callable[[], str] | None = None):
    """``predicate()``'s first truthy value within ``timeout_s``; on timeout a ``TimeoutError``
    naming ``what``, followed by ``on_timeout()`` (the state that tells why) when given."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    why = "" if on_timeout is None else f"; {on_timeout()}"
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}{why}")


def source_sop_uids(seg: hd.seg.Segmentation) -> list[str]:
    """SOP Instance UIDs of the source images each SEG frame references."""
    uids = []
    for frame in seg.PerFrameFunctionalGroupsSequence:
        derivation = frame.DerivationImageSequence[0]
        uids.append(derivation.SourceImageSequence[0].ReferencedSOPInstanceUID)
    return uids


def read(path: Path) -> Dataset:
    return pydicom.dcmread(path)
