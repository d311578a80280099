"""Results sent by STOW-RS to a real Orthanc with its DICOMweb plugin and HTTP Basic authentication.

In-process: :func:`node.dicomweb_delivery.send_files` stores an SR, a wrong password is a permanent
refusal naming HTTP 401, and a closed port is transient. (Orthanc's DICOMweb plugin 1.7 answers 200
and names an instance its Lua filter refused as stored, so per-instance refusals are tested against
mednode's own STOW-RS endpoint in ``test_dicomweb_in``.) Node
level: ``mednode serve`` sends a CT study's SEG and SR to an archive that is down, retries, and
delivers once it is up; the same archive under a wrong password fails for good on its first
attempt once it answers.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from node.config import DicomWebDestination, DicomWebSettings
from node.delivery import Outcome, PermanentDeliveryError, TransientDeliveryError
from node.dicomweb_delivery import echo, send_files
from storage.models import DeliveryState, JobState
from tests.conftest import OrthancFactory
from tests.integration.conftest import MednodeFactory
from tests.integration.e2e import poll
from tests.integration.test_delivery_refusals import (  # noqa: F401
    _job_finished,
    _sessions,
    _snapshot,
    ct_files,
    sr_file,
)
from tests.peers import LOOPBACK, free_port, storescu

USERS = {"mednode": "right-password"}


def _archive(url: str, password: str = "right-password") -> DicomWebDestination:
    return DicomWebDestination(dicomweb=DicomWebSettings(url=url, auth="basic", username="mednode",
                                                         password=password, timeout_s=10))


def test_stow_rs_stores_an_sr_with_basic_auth(orthanc_factory: OrthancFactory, sr_file: Path) -> None:  # noqa: F811
    orthanc = orthanc_factory(users=USERS)
    [status] = send_files(_archive(orthanc.dicomweb_url), [sr_file])
    assert status.ok and status.outcome is Outcome.SUCCESS, status.describe()
    ds = pydicom.dcmread(sr_file, stop_before_pixels=True)
    [row] = orthanc.study_instances(str(ds.StudyInstanceUID))
    assert row["SOPInstanceUID"] == ds.SOPInstanceUID
    checked = echo(_archive(orthanc.dicomweb_url))
    assert checked.ok and checked.status == 200, checked


def test_a_wrong_password_is_a_permanent_refusal_naming_http_401(orthanc_factory: OrthancFactory,
                                                                 sr_file: Path) -> None:  # noqa: F811
    orthanc = orthanc_factory(users=USERS)
    with pytest.raises(PermanentDeliveryError, match="HTTP 401 Unauthorized") as raised:
        send_files(_archive(orthanc.dicomweb_url, "wrong"), [sr_file])
    assert "username/password" in str(raised.value)
    assert "wrong" not in str(raised.value)  # never the secret
    checked = echo(_archive(orthanc.dicomweb_url, "wrong"))
    assert not checked.ok and checked.status == 401


def test_an_archive_that_is_down_is_transient(sr_file: Path) -> None:  # noqa: F811
    with pytest.raises(TransientDeliveryError, match="cannot connect"):
        send_files(_archive(f"http://{LOOPBACK}:{free_port()}/dicom-web"), [sr_file])


def test_results_reach_an_archive_once_it_is_up_and_a_wrong_password_fails_at_once(
        mednode_factory: MednodeFactory, orthanc_factory: OrthancFactory, tmp_path: Path,
        ct_files: list[Path], sr_file: Path, dcmtk) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    orthanc = orthanc_factory(users=USERS, running=False)  # down until the node has retried
    good = orthanc.dicomweb_url
    bad = good.replace(LOOPBACK, "localhost")  # the same archive under another URL, wrong password
    config = tmp_path / "mednode.yaml"
    config.write_text(f"""
destinations:
  archive:
    dicomweb: {{url: "{good}/", auth: basic, username: mednode, timeout_s: 10}}
  wrong-password:
    dicomweb: {{url: "{bad}", auth: basic, username: mednode, password: wrong, timeout_s: 10}}
rules:
  - {{name: ct, match: {{modality: CT}}, tasks: [ct_analysis], destinations: [archive, wrong-password]}}
""")
    node = mednode_factory(config=config, quiet_period_s=1.0, extra_env={
        "MEDNODE_DELIVERY__RETRY_INITIAL_S": "1", "MEDNODE_DELIVERY__RETRY_MAX_S": "1",
        # a secret from the environment, merged into the YAML's destination
        "MEDNODE_DESTINATIONS__ARCHIVE__DICOMWEB__PASSWORD": USERS["mednode"]})
    sessions = _sessions(node)
    sent = storescu(LOOPBACK, node.dicom_port, ct_files, called=node.ae_title)
    assert sent.all_ok, sent.describe()

    def retried() -> bool:
        _, deliveries = _snapshot(sessions)
        return len(deliveries) == 4 and all(d.attempts >= 2 and d.state is DeliveryState.PENDING
                                            for d in deliveries)

    poll(retried, 120, 0.3, "every delivery retried while the archive is down")
    _, waiting = _snapshot(sessions)
    assert all(d.last_error and "cannot connect" in d.last_error for d in waiting), [d.last_error for d in waiting]
    orthanc.start()
    poll(lambda: _job_finished(sessions), 120, 0.3, "job finished")
    [job], deliveries = _snapshot(sessions)
    by_url: dict[str, list] = {}
    for d in deliveries:
        by_url.setdefault(d.destination, []).append(d)
    assert [d.state for d in by_url[good]] == [DeliveryState.DELIVERED] * 2, \
        [(d.state, d.last_error) for d in by_url[good]]
    wrong = by_url[bad]
    assert all(d.state is DeliveryState.FAILED for d in wrong), [(d.state, d.last_error) for d in wrong]
    assert all(d.last_error and d.last_error.startswith(f"refused by {bad}: ") and "HTTP 401" in d.last_error
               for d in wrong), [d.last_error for d in wrong]
    assert job.state is JobState.FAILED and job.reason is not None and f"refused by {bad}" in job.reason
    study_uid = str(pydicom.dcmread(ct_files[0], stop_before_pixels=True).StudyInstanceUID)
    stored = orthanc.study_instances(study_uid)
    assert sorted(row["Modality"] for row in stored) == ["SEG", "SR"]
    assert USERS["mednode"] not in node.logs()  # the secret never reaches a log
    # the command line knows DICOMweb destinations by name, with their credentials
    echoed = node.cli("echo", "archive", "--config", str(config))
    assert echoed.returncode == 0 and "success" in echoed.stdout, echoed.stdout + echoed.stderr
    refused = node.cli("echo", "wrong-password", "--config", str(config))
    assert refused.returncode == 1 and "HTTP 401" in refused.stderr, refused.stdout + refused.stderr
    sent_sr = node.cli("send", str(sr_file), "--to", "archive", "--config", str(config))
    assert sent_sr.returncode == 0, sent_sr.stdout + sent_sr.stderr
    sr_study = str(pydicom.dcmread(sr_file, stop_before_pixels=True).StudyInstanceUID)
    assert len(orthanc.study_instances(sr_study)) == 1
