"""The spine, end to end with real peers: PACS (Orthanc) → mednode → CT analyzer → SEG + SR →
back into the same study in Orthanc. Embedded default and production configuration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_io.codes import STRUCTURES
from dicom_io.measurement_report import ATTENUATION_COEFFICIENT, VOLUME
from dicom_io.volume import load_volume
from inference.builtin.ct_analyzer import analyze_ct
from tests.deidentified import HASHED_BIRTH_DATE, LONG_ACCESSION, variant
from tests.integration.conftest import MednodeFactory, MednodeNode
from tests.integration.e2e import (
    assert_valid,
    measurement_groups,
    poll,
    source_sop_uids,
    wait_for_results,
)
from tests.peers import Orthanc, storescu
from tests.phantom import PhantomGeometry, make_ct_phantom, phantom_truth, write_series

CANARY = "Canary^Zebediah7Q"
CANARY_ID = "CANARY-PID-93731"


def _orthanc_with_node(orthanc_factory, mednode_factory: MednodeFactory, **node_kwargs) -> tuple[Orthanc, MednodeNode]:  # type: ignore[no-untyped-def]
    orthanc = orthanc_factory()
    node = mednode_factory(destination=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", **node_kwargs)
    orthanc.add_modality("mednode", node.ae_title, node.dicom_port)
    return orthanc, node


def _push_from_orthanc(orthanc: Orthanc, files: list[Path]) -> str:
    """Upload ``files`` to Orthanc and have Orthanc C-STORE the study to mednode."""
    answers = [orthanc.upload(f) for f in files]
    study_id = answers[0]["ParentStudy"]
    orthanc.store_to_modality("mednode", study_id)
    return study_id


def _check_ct_results(tmp_path: Path, orthanc: Orthanc, node: MednodeNode, source_files: list[Path]) -> None:
    sources = [pydicom.dcmread(f) for f in source_files]
    study_uid = sources[0].StudyInstanceUID
    returned = wait_for_results(orthanc, study_uid)

    # results are in the source study: Orthanc still holds exactly one study
    assert [s["MainDicomTags"]["StudyInstanceUID"] for s in orthanc.studies()] == [study_uid]
    assert returned.seg.StudyInstanceUID == study_uid == returned.sr.StudyInstanceUID
    assert returned.seg.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert returned.sr.VerificationFlag == "UNVERIFIED"
    assert_valid(tmp_path, "seg", returned.seg_bytes)
    assert_valid(tmp_path, "sr", returned.sr_bytes)

    # what mednode computed, recomputed here from the same source files
    volume = load_volume(sources)
    expected = analyze_ct(volume.pixels, volume.spacing_mm)
    found = [s for s in expected.structures if not s.is_empty]
    seg = returned.seg
    labels = [seg.get_segment_description(n).segment_label for n in seg.get_segment_numbers()]
    assert labels == [STRUCTURES[s.label].label for s in found]

    # every SEG frame references a source instance of the series, and the masks land on the
    # right slices: the SEG volume rebuilt on the source order equals the analyzer's masks
    source_uids = [ds.SOPInstanceUID for ds in volume.datasets]
    assert set(source_sop_uids(seg)) <= set(source_uids)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=source_uids, combine_segments=False)
    assert pixels.shape[0] == len(source_uids)
    for index, structure in enumerate(found):
        np.testing.assert_array_equal(pixels[..., index].astype(bool), structure.mask, err_msg=structure.label)

    groups = measurement_groups(returned.sr)
    for structure in found:
        group = groups[STRUCTURES[structure.label].label]
        assert group[VOLUME.meaning] == pytest.approx(structure.volume_ml, rel=1e-3)
        assert group[ATTENUATION_COEFFICIENT.meaning] == pytest.approx(structure.mean_hu, abs=0.01)

    # the node's own bookkeeping agrees: one job delivered, two objects sent
    counts = poll(lambda: (c := node.status())["jobs"]["delivered"] == 1 and c, 30, what="job delivered")
    assert counts["instances"] == len(source_files)
    assert counts["deliveries"]["delivered"] == 2


def test_orthanc_pushes_ct_and_receives_seg_and_sr(tmp_path, orthanc_factory, mednode_factory, shared_dicom):
    """Embedded default: SQLite, embedded broker, worker started by ``mednode serve``."""
    files = sorted((shared_dicom / "ct" / "dcmqi_ct3slice").glob("*.dcm"))
    orthanc, node = _orthanc_with_node(orthanc_factory, mednode_factory)
    _push_from_orthanc(orthanc, files)
    _check_ct_results(tmp_path, orthanc, node, files)

    status = node.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    counts = json.loads(status.stdout)
    assert counts["instances"] == 3
    assert counts["studies"]["routed"] == 1
    assert counts["jobs"]["delivered"] == 1


def test_production_config_postgres_rabbitmq_separate_worker(
    tmp_path, orthanc_factory, mednode_factory, shared_dicom, postgres_url, rabbitmq_url
):
    """The same flow with PostgreSQL, RabbitMQ and a separate ``mednode worker`` process."""
    files = sorted((shared_dicom / "ct" / "dcmqi_ct3slice").glob("*.dcm"))
    orthanc, node = _orthanc_with_node(
        orthanc_factory, mednode_factory,
        database_url=postgres_url, broker_url=rabbitmq_url, separate_worker=True,
    )
    _push_from_orthanc(orthanc, files)
    _check_ct_results(tmp_path, orthanc, node, files)
    worker_log = node.processes[1].log_text()
    assert "mednode.run_job" in worker_log and "amqp://" in worker_log


def test_storescu_phantom_volumes_and_no_patient_data_in_logs(tmp_path, orthanc_factory, mednode_factory, dcmtk):
    """dcmtk storescu sends a synthetic CT phantom whose PatientName is a canary: the SR in
    Orthanc reports the phantom's analytic volumes within 2 %, and the canary never reaches a log."""
    geometry = PhantomGeometry(rows=192, columns=192, pixel_spacing_mm=(1.6, 1.6), slice_spacing_mm=5.0, num_slices=36)
    truth = phantom_truth(geometry)
    datasets = make_ct_phantom(geometry=geometry, patient_name=CANARY, patient_id=CANARY_ID)
    files = write_series(datasets, tmp_path / "phantom")
    orthanc, node = _orthanc_with_node(orthanc_factory, mednode_factory)

    sent = storescu("127.0.0.1", node.dicom_port, files, called=node.ae_title)
    assert sent.all_ok, sent.describe()
    returned = wait_for_results(orthanc, datasets[0].StudyInstanceUID)
    assert_valid(tmp_path, "seg", returned.seg_bytes)
    assert_valid(tmp_path, "sr", returned.sr_bytes)
    groups = measurement_groups(returned.sr)
    assert groups[STRUCTURES["lungs"].label][VOLUME.meaning] == pytest.approx(truth.lungs_ml, rel=0.02)
    assert groups[STRUCTURES["body"].label][VOLUME.meaning] == pytest.approx(truth.body_ml, rel=0.02)
    assert groups[STRUCTURES["bone"].label][VOLUME.meaning] == pytest.approx(truth.bone_ml, rel=0.02)
    assert returned.sr.PatientName == CANARY  # the canary really went through the pipeline

    poll(lambda: node.status()["jobs"]["delivered"] == 1, 30, what="job delivered")
    logs = node.logs()
    assert "job 1" in logs and datasets[0].StudyInstanceUID in logs  # logs are there, by UID
    for secret in (CANARY, "Zebediah7Q", CANARY_ID):
        assert secret not in logs, f"patient data {secret!r} found in the node's logs"


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_deidentified_ct_gets_its_seg_and_sr(tmp_path, orthanc_factory, mednode_factory, shared_dicom, dcmtk,
                                             request, database):
    """A de-identified CT — a hash in Patient's Birth Date, a 56-character Accession Number, no
    Study ID — is stored (on PostgreSQL too, whose columns are as wide as the VRs) and still gets
    its SEG and SR: those attributes empty in both, dciodvfy 0 errors, one warning in the node's
    log naming them, and neither value in any log."""
    sources = sorted((shared_dicom / "ct" / "dcmqi_ct3slice").glob("*.dcm"))
    files = []
    for index, path in enumerate(sources):
        changed = variant(pydicom.dcmread(path), "hashed")
        files.append(tmp_path / f"deid{index}.dcm")
        changed.save_as(files[-1], enforce_file_format=True)
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    extra = {"database_url": request.getfixturevalue("postgres_url")} if database == "postgres" else {}
    orthanc, node = _orthanc_with_node(orthanc_factory, mednode_factory, **extra)

    sent = storescu("127.0.0.1", node.dicom_port, files, called=node.ae_title)
    assert sent.all_ok, sent.describe()
    returned = wait_for_results(orthanc, study_uid)
    assert_valid(tmp_path, "seg", returned.seg_bytes)
    assert_valid(tmp_path, "sr", returned.sr_bytes)
    for result in (returned.seg, returned.sr):
        for keyword in ("PatientBirthDate", "AccessionNumber", "StudyID"):
            assert keyword in result and result[keyword].value in (None, ""), keyword
        assert result.StudyInstanceUID == study_uid

    poll(lambda: node.status()["jobs"]["delivered"] == 1, 30, what="job delivered")
    logs = node.logs()
    [warning] = [line for line in logs.splitlines() if "left empty in the results" in line]
    assert "WARNING" in warning and "job 1" in warning
    for keyword in ("PatientBirthDate", "AccessionNumber", "StudyID"):
        assert keyword in warning
    for secret in (HASHED_BIRTH_DATE, LONG_ACCESSION, HASHED_BIRTH_DATE[:16]):
        assert secret not in logs, "a de-identified value reached the node's logs"


def test_enhanced_ct_gets_the_seg_and_sr_of_its_classic_series(tmp_path, orthanc_factory, mednode_factory):
    """Orthanc pushes one Legacy Converted Enhanced CT instance (a phantom series converted by
    highdicom): the SEG and SR in Orthanc are valid, reference the enhanced instance's frames, and
    report what the analyzer measures on the classic series."""
    import highdicom as hd

    geometry = PhantomGeometry(rows=96, columns=96, pixel_spacing_mm=(3.2, 3.2), slice_spacing_mm=10.0, num_slices=18)
    classic = make_ct_phantom(geometry=geometry, noise_hu_sd=10.0, seed=7)
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        classic, series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(), instance_number=1)
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    orthanc, _node = _orthanc_with_node(orthanc_factory, mednode_factory)

    _push_from_orthanc(orthanc, [path])  # dcmtk's storescu proposes no Legacy Converted Enhanced CT
    returned = wait_for_results(orthanc, enhanced.StudyInstanceUID)
    assert_valid(tmp_path, "seg", returned.seg_bytes)
    assert_valid(tmp_path, "sr", returned.sr_bytes)
    assert set(source_sop_uids(returned.seg)) == {enhanced.SOPInstanceUID}
    volume = load_volume(classic)
    expected = [s for s in analyze_ct(volume.pixels, volume.spacing_mm).structures if not s.is_empty]
    groups = measurement_groups(returned.sr)
    for structure in expected:
        group = groups[STRUCTURES[structure.label].label]
        assert group[VOLUME.meaning] == pytest.approx(structure.volume_ml, rel=1e-3)
        assert group[ATTENUATION_COEFFICIENT.meaning] == pytest.approx(structure.mean_hu, abs=0.01)
    # the masks land on the frames at their positions: the SEG read back by source frame
    frames = list(range(1, geometry.num_slices + 1))
    by_frame = returned.seg.get_pixels_by_source_frame(
        source_sop_instance_uid=enhanced.SOPInstanceUID, source_frame_numbers=frames, combine_segments=False)
    enhanced_volume = load_volume([pydicom.dcmread(path)])
    slice_of = {frame: index for index, (_, frame) in enumerate(enhanced_volume.source_frames)}
    for index, structure in enumerate(expected):
        np.testing.assert_array_equal(by_frame[..., index].astype(bool),
                                      structure.mask[[slice_of[f] for f in frames]], err_msg=structure.label)
