"""A remote model server: nothing that may identify the patient leaves for it.

The server here is a closed loopback port: what is checked happens before the first request
(refusal, masking, redaction, the audit call), and the request itself then fails as a down server
does (the job retries).
"""

from __future__ import annotations

import copy
from datetime import date

import numpy as np
import pydicom
import pytest

from dicom_io.deidentify import REDACTED
from inference.errors import InvalidInputError, ModelServerUnavailableError
from inference.tasks import TaskSpec
from node.config import ConfigError, VLMSettings, load_settings
from node.vlm_stage import (
    PriorInput,
    context_for_remote,
    mask_filter,
    prepare_images,
    priors_for_remote,
    run_vlm_tasks,
    server_model,
)
from tests.peers.ports import free_port
from tests.shared_data import SHARED_DICOM

US_REGIONS = SHARED_DICOM / "compressed" / "US_multiframe_jpeg_baseline_nobot.dcm"
US_PLAIN = SHARED_DICOM / "encoding" / "ExplVR_BigEnd_US_RGB.dcm"
DX = SHARED_DICOM / "xr" / "highdicom_dx_thorax.dcm"

pytestmark = pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason="shared sample DICOM is missing")


def _settings(policy: str = "refuse") -> VLMSettings:
    return VLMSettings(server=f"http://127.0.0.1:{free_port()}", model="m", family="medgemma", remote=True,
                       burned_in_text=policy, server_timeout_s=2)  # type: ignore[arg-type]


def _series(path) -> dict[str, list[pydicom.Dataset]]:  # type: ignore[no-untyped-def]
    ds = pydicom.dcmread(path)
    return {str(ds.SeriesInstanceUID): [ds]}


def test_remote_needs_a_server() -> None:
    with pytest.raises(ConfigError, match="models.vlm.remote"):
        load_settings(models={"vlm": {"path": "/m", "family": "medgemma", "remote": True}})


def test_an_image_with_burned_in_text_is_refused_before_anything_is_sent() -> None:
    sent: list[str] = []
    with pytest.raises(InvalidInputError, match="not sent to the remote model server.*burned_in_text: mask"):
        run_vlm_tasks(_settings(), _series(US_REGIONS), [TaskSpec(kind="report")], job_key="j/1/r",
                      audit_send=sent.append)
    with pytest.raises(InvalidInputError, match="no ultrasound regions"):
        run_vlm_tasks(_settings("mask"), _series(US_PLAIN), [TaskSpec(kind="report")], job_key="j/1/r",
                      audit_send=sent.append)
    assert sent == []


def test_ultrasound_goes_masked_and_the_send_is_audited() -> None:
    settings = _settings("mask")
    series = _series(US_REGIONS)
    sent: list[str] = []
    with pytest.raises(ModelServerUnavailableError):
        run_vlm_tasks(settings, series, [TaskSpec(kind="report")], job_key="j/1/r", audit_send=sent.append)
    assert len(sent) == 1 and "1 image(s) (1 masked to ultrasound regions)" in sent[0]
    assert settings.server in sent[0] and "report" in sent[0]
    # the prepared image is darker: rows 0-15 and 232-239 of 240 (the scanner's text) are black
    uid = str(next(iter(series.values()))[0].SOPInstanceUID)
    vlm = server_model(settings)
    masked, _ = prepare_images(vlm, series, pixel_filter=mask_filter({uid}))
    plain, _ = prepare_images(vlm, series)
    top_masked, top_plain = np.asarray(masked[0].image), np.asarray(plain[0].image)
    assert not np.array_equal(top_masked, top_plain)
    assert int(top_masked.sum()) < int(top_plain.sum())


def test_prior_report_loses_identifiers_and_prior_images_with_text() -> None:
    current = pydicom.dcmread(DX, stop_before_pixels=True)
    current.PatientName, current.PatientID = "Canary^Alice", "PID-0042"
    prior_dx = copy.deepcopy(current)
    prior_dx.StudyInstanceUID = prior_dx.SOPInstanceUID = "1.2.3.4"
    prior_us = pydicom.dcmread(US_PLAIN, stop_before_pixels=True)
    report = "Alice Canary, PID-0042: stable since last year. Canary follow-up."
    priors = PriorInput((prior_dx, prior_us), date(2024, 1, 15), report)
    safe, dropped, removed = priors_for_remote(priors, {"s": [current]})
    assert safe.datasets == (prior_dx,) and dropped == 1
    assert safe.report == f"{REDACTED} {REDACTED}, {REDACTED}: stable since last year. {REDACTED} follow-up."
    assert removed == 4


def test_clinical_context_loses_identifiers_its_reader_does_not_know() -> None:
    current = pydicom.dcmread(DX, stop_before_pixels=True)
    current.AccessionNumber, current.ReferringPhysicianName = "ACC-77", "Finchley^Hortensia"
    specs = [TaskSpec(kind="report", clinical_context="Reason: follow-up ACC-77, ask Dr Finchley."),
             TaskSpec(kind="classify", labels=("effusion",))]
    safe, removed = context_for_remote(specs, {"s": [current]})
    assert safe[0].clinical_context == f"Reason: follow-up {REDACTED}, ask Dr {REDACTED}."
    assert removed == 2 and safe[1] == specs[1]
