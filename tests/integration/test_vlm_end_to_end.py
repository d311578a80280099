"""The generalist model through the whole node: a chest radiograph and a CT series go from Orthanc
to mednode, the model (a tiny real-architecture checkpoint loaded by the product's loader) writes
report (en, zh), VQA, classification and grounding results as SRs, and they come back into the
same studies in Orthanc, valid, and saying exactly what the model said."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
import yaml

from dicom_io.volume import read_dataset
from inference.tasks import parse_tasks
from inference.vlm import clear_vlm_cache
from node.config import VLMSettings
from node.vlm_stage import run_vlm_tasks
from tests.integration.conftest import MednodeFactory
from tests.integration.e2e import assert_valid, poll
from tests.models import tiny_vlm_dirs  # noqa: F401  (session fixture)
from tests.peers import Orthanc
from tests.trained_models import tiny_grounding_model_dir  # noqa: F401  (session fixture)

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
TASKS = """
      - report: {language: en}
      - report: {language: zh}
      - vqa: {questions: ["Is there a pleural effusion?"]}
      - classify: {labels: [cardiomegaly, pneumothorax]}
      - ground: {phrases: [right lung, heart]}
"""


def _config(tmp_path: Path, model_dir: Path, family: str, max_new_tokens: int) -> Path:
    tasks = yaml.safe_load(TASKS)
    config = {
        "models": {"vlm": {"path": str(model_dir), "family": family, "max_new_tokens": max_new_tokens,
                           "slices_per_series": 3, "device": "cpu"}},
        "rules": [
            {"name": "xray-vlm", "match": {"modality": ["CR", "DX"]}, "tasks": tasks},
            {"name": "ct-vlm", "match": {"modality": ["CT"]}, "tasks": tasks},
        ],
    }
    path = tmp_path / "mednode.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _sr_texts(data: bytes) -> list[str]:
    """Every TEXT value in an SR, in document order."""
    out: list[str] = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if item.ValueType == "TEXT":
                out.append(item.TextValue)
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(pydicom.dcmread(BytesIO(data)).ContentSequence)
    return out


def _returned_srs(orthanc: Orthanc, study_uid: str, count: int) -> dict[str, bytes]:
    def found() -> list[dict] | None:
        rows = [r for r in orthanc.study_instances(study_uid) if r.get("SOPClassUID") == SR_CLASS]
        return rows if len(rows) >= count else None

    rows = orthanc.wait_for(found, timeout_s=300, interval_s=1.0, what=f"{count} SRs in study {study_uid}")
    return {r["SOPInstanceUID"]: orthanc.instance_file(r["ID"]) for r in rows}


@pytest.mark.parametrize("model", ["trained-medgemma", "qwen2_vl"])
def test_radiograph_and_ct_through_the_model(
    tmp_path, model, request, orthanc_factory, mednode_factory: MednodeFactory, shared_dicom
):
    """``trained-medgemma`` is a tiny Gemma 3 fine-tuned in the test session to ground "right lung"
    with a real box (so boxes travel the whole way); ``qwen2_vl`` has random weights (gibberish
    text, which must still make valid SRs)."""
    if model == "trained-medgemma":
        model_dir, family, max_new_tokens = request.getfixturevalue("tiny_grounding_model_dir"), "medgemma", 48
    else:
        model_dir, family, max_new_tokens = request.getfixturevalue("tiny_vlm_dirs")[model], model, 24
    orthanc = orthanc_factory()
    node = mednode_factory(
        destination=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
        config=_config(tmp_path, model_dir, family, max_new_tokens),
    )
    orthanc.add_modality("mednode", node.ae_title, node.dicom_port)
    studies = {
        "xray-vlm": [shared_dicom / "xr" / "RG1_J2KI_chest_PA.dcm"],
        "ct-vlm": sorted((shared_dicom / "ct" / "dcmqi_ct3slice").glob("*.dcm")),
    }
    for files in studies.values():
        answers = [orthanc.upload(f) for f in files]  # upload all, push the study of the first
        answer = answers[0]
        orthanc.store_to_modality("mednode", answer["ParentStudy"])

    settings = VLMSettings(path=model_dir, family=family, max_new_tokens=max_new_tokens,
                           slices_per_series=3, device="cpu")
    boxes_seen = 0
    clear_vlm_cache()
    for rule, files in studies.items():
        datasets = [read_dataset(f) for f in files]
        study_uid = datasets[0].StudyInstanceUID
        # what the backend itself produces for this job (same model, same images, greedy decoding,
        # same job key: study UID / version 1 / rule) — the SRs in the PACS must say exactly this
        expected = run_vlm_tasks(settings, {datasets[0].SeriesInstanceUID: datasets}, parse_tasks(yaml.safe_load(TASKS)), job_key=f"{study_uid}/1/{rule}")
        returned = _returned_srs(orthanc, study_uid, len(expected))

        # results in the source study: Orthanc holds one study per source study
        assert sum(s["MainDicomTags"]["StudyInstanceUID"] == study_uid for s in orthanc.studies()) == 1
        for output in expected:
            uid = output.dataset.SOPInstanceUID
            assert uid in returned, f"{output.kind} SR {uid} did not arrive"
            data = returned[uid]
            assert_valid(tmp_path, f"{rule}-{output.kind}", data)
            sr = hd.sr.srread(BytesIO(data))
            assert sr.StudyInstanceUID == study_uid
            assert sr.VerificationFlag == "UNVERIFIED"
            equipment = sr.ContributingEquipmentSequence[-1]
            assert family in str(equipment.get("SoftwareVersions", "")) + str(sr.ContentSequence)
            local = BytesIO()
            output.dataset.save_as(local, enforce_file_format=True)
            assert _sr_texts(data) == _sr_texts(local.getvalue()), f"{output.kind}: text differs"
            if output.kind == "report":
                assert output.summary["findings"] in _sr_texts(data)
                if any(ord(c) > 127 for t in _sr_texts(data) for c in t):
                    assert "ISO_IR 192" in str(sr.get("SpecificCharacterSet", ""))
            if output.kind == "regions":
                boxes = [
                    tuple(round(v, 2) for v in g.roi.value[[0, 2]].ravel())
                    for g in sr.content.get_planar_roi_measurement_groups()
                ]
                assert boxes == [
                    (b["box_xyxy"][0], b["box_xyxy"][1], b["box_xyxy"][2], b["box_xyxy"][3])
                    for b in output.summary["boxes"]
                ]
                labels = {lb["name"] for lb in output.summary["labels"]}
                assert labels == {"cardiomegaly", "pneumothorax"}
                boxes_seen += len(boxes)
                if model == "trained-medgemma" and rule == "xray-vlm":
                    sites = [site.value.meaning for g in sr.content.get_planar_roi_measurement_groups()
                             for site in g.finding_sites]
                    assert "right lung" in [s.lower() for s in sites], sites
    if model == "trained-medgemma":
        assert boxes_seen > 0, "the trained model's boxes did not reach the PACS"
    poll(lambda: node.status()["jobs"]["delivered"] == 2, 60, what="both jobs delivered")
