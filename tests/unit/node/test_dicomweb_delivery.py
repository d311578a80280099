"""Reading STOW-RS answers (PS3.18 10.5.3) and configuring DICOMweb destinations."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset

from node.config import ConfigError, DicomWebDestination, load_settings, parse_destination
from node.delivery import Outcome
from node.dicomweb_delivery import http_refusal, instance_status, request_outcome

SOP = "1.2.3.4"
PATH = Path("x.dcm")


def _response(failed: dict[str, int] | None = None, referenced: dict[str, int | None] | None = None) -> Dataset:
    ds = Dataset()
    items = []
    for uid, reason in (failed or {}).items():
        item = Dataset()
        item.ReferencedSOPInstanceUID = uid
        item.FailureReason = reason
        items.append(item)
    if items:
        ds.FailedSOPSequence = items
    refs = []
    for uid, warning in (referenced or {}).items():
        item = Dataset()
        item.ReferencedSOPInstanceUID = uid
        if warning is not None:
            item.WarningReason = warning
        refs.append(item)
    if refs:
        ds.ReferencedSOPSequence = refs
    return ds


@pytest.mark.parametrize(("http_status", "outcome"), [
    (200, Outcome.SUCCESS), (202, Outcome.SUCCESS), (409, Outcome.SUCCESS),  # per-instance answers
    (500, Outcome.TRANSIENT), (502, Outcome.TRANSIENT), (503, Outcome.TRANSIENT), (408, Outcome.TRANSIENT),
    (429, Outcome.TRANSIENT),
    (400, Outcome.PERMANENT), (401, Outcome.PERMANENT), (403, Outcome.PERMANENT), (404, Outcome.PERMANENT),
    (413, Outcome.PERMANENT), (415, Outcome.PERMANENT),
])
def test_the_http_status_of_a_whole_request(http_status: int, outcome: Outcome) -> None:
    assert request_outcome(http_status) is outcome


def test_an_http_refusal_says_what_to_check() -> None:
    assert http_refusal(401) == "HTTP 401 Unauthorized (check the destination's dicomweb auth, token or username/password)"
    assert "service root" in http_refusal(404)
    assert http_refusal(415) == "HTTP 415 Unsupported Media Type"


def test_a_failure_reason_is_read_as_a_c_store_status() -> None:
    refused = instance_status(_response(failed={SOP: 0xC000}), PATH, SOP, 409)
    assert refused.outcome is Outcome.PERMANENT and not refused.ok
    assert refused.describe() == "status 0xC000 (cannot understand): HTTP 409, STOW-RS Failure Reason"
    busy = instance_status(_response(failed={SOP: 0xA700}), PATH, SOP, 409)
    assert busy.outcome is Outcome.TRANSIENT
    mismatch = instance_status(_response(failed={SOP: 0xA900}, referenced={"9.9": None}), PATH, SOP, 202)
    assert mismatch.outcome is Outcome.PERMANENT and "0xA900" in mismatch.describe()


def test_a_referenced_instance_is_stored_and_a_warning_reason_is_a_warning() -> None:
    assert instance_status(_response(referenced={SOP: None}), PATH, SOP, 200).outcome is Outcome.SUCCESS
    warned = instance_status(_response(referenced={SOP: 0xB000}), PATH, SOP, 202)
    assert warned.outcome is Outcome.WARNING and warned.ok


def test_an_instance_the_answer_does_not_name() -> None:
    assert instance_status(None, PATH, SOP, 200).ok  # 200 with an empty body: all stored
    lost = instance_status(_response(failed={"9.9": 0xC000}), PATH, SOP, 409)
    assert lost.outcome is Outcome.PERMANENT and "does not name this instance" in lost.describe()


def test_dicomweb_destinations_in_the_configuration(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "mednode.yaml"
    config.write_text("""
destinations:
  archive: {dicomweb: {url: "https://pacs.example.org/dicom-web/", auth: basic, username: mednode}}
  cloud: {dicomweb: {url: "https://cloud.example.org/v1/dicomweb", auth: bearer, token: t0k3n}}
  pacs: PACS@10.0.0.1:104
rules:
  - {name: ct, tasks: [ct_analysis], destinations: [archive, cloud, pacs, "http://inline.example.org/dw"]}
""")
    monkeypatch.setenv("MEDNODE_DESTINATIONS__ARCHIVE__DICOMWEB__PASSWORD", "from-env")
    settings = load_settings(config)
    archive = settings.destinations["archive"]
    assert isinstance(archive, DicomWebDestination)
    assert str(archive) == "https://pacs.example.org/dicom-web"  # what deliveries store
    assert archive.dicomweb.password is not None and archive.dicomweb.password.get_secret_value() == "from-env"
    assert "from-env" not in repr(settings.destinations)
    assert settings.find_destination("https://pacs.example.org/dicom-web") == archive
    refs = [str(settings.resolve_destination(r)) for r in settings.rules[0].destinations]  # type: ignore[index]
    assert refs == ["https://pacs.example.org/dicom-web", "https://cloud.example.org/v1/dicomweb",
                    "PACS@10.0.0.1:104", "http://inline.example.org/dw"]
    assert isinstance(parse_destination("https://x.example.org/dw"), DicomWebDestination)


@pytest.mark.parametrize(("dicomweb", "message"), [
    ({"url": "https://u:p@pacs/dw"}, "should match pattern"),  # credentials never in the URL
    ({"url": "ftp://pacs/dw"}, "should match pattern"),
    ({"url": "https://pacs/dw", "auth": "basic", "username": "u"}, "username/password: auth is basic"),
    ({"url": "https://pacs/dw", "auth": "bearer"}, "token: auth is bearer"),
    ({"url": "https://pacs/dw", "auth": "digest"}, "auth"),
])
def test_invalid_dicomweb_destinations_name_the_key(dicomweb: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match="destinations.archive.dicomweb") as raised:
        load_settings(destinations={"archive": {"dicomweb": dicomweb}})
    assert message in str(raised.value)


def test_the_destinations_page_lists_a_dicomweb_archive_without_its_secret() -> None:
    from node.web.system import destinations_out

    settings = load_settings(destinations={"archive": {"dicomweb": {
        "url": "https://pacs.example.org/dicom-web", "auth": "bearer", "token": "sekret-token"}}},
        rules=[{"name": "ct", "tasks": ["ct_analysis"], "destinations": ["archive"]}])
    [out] = destinations_out(settings)
    assert (out.name, out.kind, out.url, out.auth, out.tls, out.used_by) == \
        ("archive", "dicomweb", "https://pacs.example.org/dicom-web", "bearer", True, ["ct"])
    assert "sekret-token" not in out.model_dump_json()
