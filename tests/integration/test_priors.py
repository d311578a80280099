"""Prior-aware rules through a real node, with a real Orthanc as the PACS holding the priors.

Orthanc holds the patient's earlier chest radiographs (one inside two years with a report SR,
one older) and answers mednode's C-FIND and C-GET; a second Orthanc receives the results. The
node runs a tiny random Gemma 3 (family medgemma) through the product's loader: its text is
random, but what it was given (the prompt layout the job records) and what the SR says it
compared (Comparison section, Pertinent Other Evidence) are checked. Then: a patient without
priors, a PACS that does not answer (paused: bounded wait, then the job goes on), and a rule that
retries until the PACS answers again.
"""

from __future__ import annotations

import os
import signal
from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.integration.conftest import MednodeFactory, MednodeNode
from tests.integration.e2e import assert_valid, poll
from tests.models import build_tiny_gemma3
from tests.peers import Orthanc, storescu

TOKEN = "priors-test-token-7741"
PRIOR_TEXT = "Mild cardiomegaly, stable. No effusion. PRIORCANARY"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"))


def radiograph(source: Path, out: Path, *, patient_id: str, study_date: str, description: str) -> Dataset:
    """A copy of a chest DX as a new study of ``patient_id`` on ``study_date``."""
    ds = pydicom.dcmread(source)
    ds.PatientID = patient_id
    ds.PatientName = "Prior^Canary"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.StudyDescription = description
    ds.AccessionNumber = ""
    ds.save_as(out, enforce_file_format=True)
    return ds


def prior_report(image: Dataset, out: Path) -> Dataset:
    """A radiologist's report of ``image``'s study as a Comprehensive SR (not written by mednode)."""
    findings = hd.sr.ContainerContentItem(name=hd.sr.CodedConcept("59776-5", "LN", "Findings"),
                                          relationship_type="CONTAINS")
    findings.ContentSequence = hd.sr.ContentSequence([hd.sr.TextContentItem(
        name=hd.sr.CodedConcept("121071", "DCM", "Finding"), value=PRIOR_TEXT, relationship_type="CONTAINS")])
    root = hd.sr.ContainerContentItem(name=hd.sr.CodedConcept("18748-4", "LN", "Diagnostic Imaging Report"))
    root.ContentSequence = hd.sr.ContentSequence([findings])
    sr = hd.sr.ComprehensiveSR(evidence=[image], content=root, series_instance_uid=generate_uid(), series_number=50,
                               sop_instance_uid=generate_uid(), instance_number=1, manufacturer="Hospital RIS",
                               is_complete=True, is_final=True)
    sr.save_as(out, enforce_file_format=True)
    return sr


def config(tmp_path: Path, model_dir: Path, pacs: Orthanc, results: Orthanc) -> Path:
    priors = {"count": 1, "same_modality": True, "same_body_part": True, "max_age_days": 730, "source": "pacs",
              "timeout_s": 3}
    tasks = [{"report": {"language": "en"}}]
    data = {
        "destinations": {"pacs": f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}",
                         "results": f"{results.aet}@127.0.0.1:{results.dicom_port}"},
        "models": {"vlm": {"path": str(model_dir), "family": "medgemma", "max_new_tokens": 8, "device": "cpu"}},
        "rules": [
            {"name": "xray-retry", "match": {"modality": ["DX"], "study_description": "RETRY.*"}, "tasks": tasks,
             "destinations": ["results"], "priors": {**priors, "on_unavailable": "retry"}},
            {"name": "xray-priors", "match": {"modality": ["DX"]}, "tasks": tasks, "destinations": ["results"],
             "priors": {**priors, "on_unavailable": "continue"}},
        ],
    }
    path = tmp_path / "mednode.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def job_of(node: MednodeNode, study_uid: str) -> dict[str, Any] | None:
    rows = httpx.get(f"{node.web_url}/api/v1/jobs", params={"study": study_uid},
                     headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
    return rows[0] if len(rows) == 1 else None


def finished_job(node: MednodeNode, study_uid: str, timeout_s: float = 240) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = job_of(node, study_uid)
        return job if job and job["state"] in ("succeeded", "delivered", "failed") else None
    job = poll(done, timeout_s, interval_s=0.5, what=f"job of {study_uid}")
    assert job["state"] != "failed", job
    return job


def report_sr(results: Orthanc, study_uid: str) -> pydicom.Dataset:
    rows = results.wait_for(lambda: [r for r in results.study_instances(study_uid) if r.get("SOPClassUID") == SR_CLASS],
                            timeout_s=120, interval_s=0.5, what="the report SR")
    return pydicom.dcmread(BytesIO(results.instance_file(rows[0]["ID"])))


def comparison_text(sr: Dataset) -> str:
    section = next(i for i in sr.ContentSequence if i.ValueType == "CONTAINER"
                   and i.ConceptNameCodeSequence[0].CodeValue == "18834-2")
    return str(section.ContentSequence[0].TextValue)


def test_prior_study_from_the_pacs_goes_into_the_prompt_and_the_sr(
    tmp_path: Path, tiny_gemma: Path, orthanc_factory, mednode_factory: MednodeFactory, shared_dicom: Path
) -> None:
    pacs, results = orthanc_factory(), orthanc_factory(aet="RESULTS")
    node = mednode_factory(config=config(tmp_path, tiny_gemma, pacs, results), quiet_period_s=1.0,
                           extra_env={"MEDNODE_WEB_API_TOKENS": f'["{TOKEN}"]', "MEDNODE_JOB_RETRY_BACKOFF_S": "1",
                                      "MEDNODE_JOB_MAX_ATTEMPTS": "5"})
    pacs.add_modality("mednode", node.ae_title, node.dicom_port)  # C-FIND/C-GET need a known AE
    source = shared_dicom / "xr" / "highdicom_dx_thorax.dcm"
    (tmp_path / "pacs").mkdir()
    prior = radiograph(source, tmp_path / "pacs" / "prior.dcm", patient_id="PAT-P1", study_date="20240115",
                       description="CHEST")
    prior_sr = prior_report(prior, tmp_path / "pacs" / "prior_sr.dcm")
    radiograph(source, tmp_path / "pacs" / "old.dcm", patient_id="PAT-P1", study_date="20200301",
                     description="CHEST")
    for name in ("prior.dcm", "prior_sr.dcm", "old.dcm"):
        pacs.upload(tmp_path / "pacs" / name)

    # 1. the patient's prior (2024-01-15, with a report) is compared; the older one is too old
    current = radiograph(source, tmp_path / "current.dcm", patient_id="PAT-P1", study_date="20250610",
                         description="CHEST")
    storescu("127.0.0.1", node.dicom_port, [tmp_path / "current.dcm"], called=node.ae_title)
    job = finished_job(node, current.StudyInstanceUID)
    summary = next(r["summary"] for r in job["results"] if r["kind"] == "report")
    compared = summary["comparison"]
    assert compared["prior_study_instance_uid"] == prior.StudyInstanceUID
    assert compared["prior_study_date"] == "2024-01-15"
    assert compared["prior_images"] == [prior.SOPInstanceUID]
    assert compared["prior_report"] is True
    prompt = compared["prompt"]
    assert prompt[:4] == ["text:Prior study (2024-01-15):", "image:prior", "text:Current study:", "image:current"]
    assert PRIOR_TEXT in prompt[4] and "Write the radiology report" in prompt[4], prompt
    sr = report_sr(results, current.StudyInstanceUID)
    assert comparison_text(sr) == "Compared with the prior study of 2024-01-15 (DX)."
    other = sr.PertinentOtherEvidenceSequence
    assert [o.StudyInstanceUID for o in other] == [prior.StudyInstanceUID]
    assert other[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == prior.SOPInstanceUID
    assert sr.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID == current.StudyInstanceUID
    buffer = BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    assert_valid(tmp_path, "report-with-prior", buffer.getvalue())
    # the retrieved copies were never indexed as studies, and are gone once the job ended
    assert job_of(node, prior.StudyInstanceUID) is None and job_of(node, prior_sr.StudyInstanceUID) is None
    assert not any((node.data_dir / "var" / "store" / "priors").glob("*/*.dcm"))

    # 2. a patient without priors: the rule goes on, the SR says so
    alone = radiograph(source, tmp_path / "alone.dcm", patient_id="PAT-P2", study_date="20250610",
                       description="CHEST")
    storescu("127.0.0.1", node.dicom_port, [tmp_path / "alone.dcm"], called=node.ae_title)
    finished_job(node, alone.StudyInstanceUID)
    assert comparison_text(report_sr(results, alone.StudyInstanceUID)) == "No prior study available."

    # 3. the PACS does not answer (paused): bounded wait (timeout_s 3), then on without a prior
    assert pacs.process is not None and pacs.process.pid is not None
    os.kill(pacs.process.pid, signal.SIGSTOP)
    try:
        hung = radiograph(source, tmp_path / "hung.dcm", patient_id="PAT-P1", study_date="20250611",
                          description="CHEST")
        storescu("127.0.0.1", node.dicom_port, [tmp_path / "hung.dcm"], called=node.ae_title)
        job = finished_job(node, hung.StudyInstanceUID, timeout_s=120)
        assert job["attempts"] == 1
        assert comparison_text(report_sr(results, hung.StudyInstanceUID)) == \
            "No prior study available (the PACS ORTHANC did not answer)."

        # 4. a rule that retries: the job waits for the PACS and compares once it answers again
        retry = radiograph(source, tmp_path / "retry.dcm", patient_id="PAT-P1", study_date="20250612",
                           description="RETRY CHEST")
        storescu("127.0.0.1", node.dicom_port, [tmp_path / "retry.dcm"], called=node.ae_title)
        poll(lambda: (job_of(node, retry.StudyInstanceUID) or {}).get("attempts", 0) >= 2, 120, interval_s=0.5,
             what="a second attempt of the retrying job")
    finally:
        os.kill(pacs.process.pid, signal.SIGCONT)
    job = finished_job(node, retry.StudyInstanceUID, timeout_s=120)
    assert job["attempts"] >= 2
    assert comparison_text(report_sr(results, retry.StudyInstanceUID)) == \
        "Compared with the prior study of 2024-01-15 (DX)."
    assert "Prior^Canary" not in node.logs() and "PAT-P1" not in node.logs() and "PRIORCANARY" not in node.logs()
