"""A second version of a generalist model's SRs (report, answers, labels) names, slot by slot, the
SR of the previous version it replaces, and says "v2"; read back from bytes, 0 dciodvfy errors."""

from __future__ import annotations

import shutil
from io import BytesIO
from pathlib import Path

import highdicom as hd
import pytest

from dicom_io.equipment import AlgorithmInfo
from dicom_io.uids import derived_uid
from dicom_io.validation import run_dciodvfy
from dicom_io.volume import read_dataset
from inference.results import AnswerResult, LabelResult, ReportResult
from inference.tasks import TaskSpec
from node import jobs
from node.vlm_stage import SourceFrame, write_outputs
from tests.shared_data import SHARED_DICOM

DX = SHARED_DICOM / "xr" / "highdicom_dx_thorax.dcm"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
MODEL = AlgorithmInfo(name="tiny-vlm", version="0", family="medgemma")

pytestmark = pytest.mark.skipif(not DX.exists(), reason=f"sample {DX} is missing")


def _results() -> list:  # type: ignore[type-arg]
    return [
        ReportResult(task=TaskSpec(kind="report"), raw_text="", image_indices=(0,), language="en",
                     findings="No acute finding.", impression="Normal chest."),
        AnswerResult(task=TaskSpec(kind="vqa", questions=("Effusion?",)), raw_text="", image_indices=(0,),
                     question="Effusion?", answer="No.", language="en"),
        LabelResult(task=TaskSpec(kind="classify", labels=("pneumothorax",)), raw_text="", image_indices=(0,),
                    label="pneumothorax", state="absent", probability=0.1),
    ]


def _previous(study_uid: str, key: str, *slots: tuple[str, ...]) -> tuple[jobs.PreviousResult, ...]:
    return tuple(
        jobs.PreviousResult(study_version=1, job_id=1, kind=slot[0], sop_class_uid=SR_CLASS,
                            sop_instance_uid=derived_uid(key, *slot, "instance"),
                            series_instance_uid=derived_uid(key, *slot, "series"), path=f"results/1/{n}.dcm",
                            delivered_to=("PACS@127.0.0.1:104",))
        for n, slot in enumerate(slots)
    )


def test_each_vlm_sr_names_the_sr_of_its_slot(tmp_path: Path) -> None:
    source = read_dataset(DX)
    sources = [SourceFrame(source, None)]
    study_uid = str(source.StudyInstanceUID)
    v1_key, v2_key = f"{study_uid}/1/cxr", f"{study_uid}/2/cxr"
    previous = _previous(study_uid, v1_key, ("report", "0"), ("vqa", "en"), ("regions",))
    amendment = jobs.Amendment(version=2, previous_version=1, previous_key=v1_key, study_instance_uid=study_uid,
                               previous_results=previous)

    first = write_outputs(_results(), sources, job_key=v1_key, algorithm=MODEL)
    assert {o.kind: o.dataset.SeriesDescription for o in first} == {
        "report": "mednode report", "vqa": "mednode report", "regions": "mednode findings"}
    # the UIDs the v1 objects really got are the ones the amendment derives for their slots
    assert {str(o.dataset.SOPInstanceUID) for o in first} == {p.sop_instance_uid for p in previous}

    second = write_outputs(_results(), sources, job_key=v2_key, algorithm=MODEL, amendment=amendment)
    expected_description = {"report": "mednode report v2", "vqa": "mednode report v2", "regions": "mednode findings v2"}
    v1_by_kind = {o.kind: o.dataset for o in first}
    for output in second:
        buffer = BytesIO()
        output.dataset.save_as(buffer, enforce_file_format=True)
        back = hd.sr.srread(BytesIO(buffer.getvalue()))
        assert back.SeriesDescription == expected_description[output.kind]
        old = v1_by_kind[output.kind]
        [study] = back.PredecessorDocumentsSequence
        [series] = study.ReferencedSeriesSequence
        [sop] = series.ReferencedSOPSequence
        assert (series.SeriesInstanceUID, sop.ReferencedSOPInstanceUID) == (old.SeriesInstanceUID, old.SOPInstanceUID)
        if shutil.which("dciodvfy"):
            path = tmp_path / f"{output.kind}.dcm"
            path.write_bytes(buffer.getvalue())
            assert run_dciodvfy(path).errors == []
