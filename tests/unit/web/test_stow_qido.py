"""STOW-RS request parsing and answers, QIDO-RS query parsing: pure functions (PS3.18 10.5, 10.6)."""

from __future__ import annotations

import pytest

from node.web.qido import (
    IdentityQueryError,
    QidoRequestError,
    matches_text,
    parse_query,
    result_modality,
)
from node.web.stow import (
    Part,
    StowEntry,
    StowRequestError,
    UnsupportedMediaTypeError,
    parse_multipart_related,
    stow_response,
)

CT = "1.2.840.10008.5.1.4.1.1.2"


def test_multipart_related_parts_with_and_without_their_own_headers() -> None:
    body = (b"preamble\r\n--b1\r\nContent-Type: application/dicom\r\nContent-Length: 3\r\n\r\nAB\r\nC"
            b"\r\n--b1\r\n\r\nXYZ\r\n--b1\r\nContent-Type: application/json; charset=utf-8\r\n\r\n{}"
            b"\r\n--b1--\r\nepilogue")
    parts = parse_multipart_related('multipart/related; type="application/dicom"; boundary="b1"', body)
    assert parts == [Part("application/dicom", b"AB\r\nC"), Part("application/dicom", b"XYZ"),
                     Part("application/json", b"{}")]


@pytest.mark.parametrize(("content_type", "error"), [
    ("application/dicom", UnsupportedMediaTypeError),
    (None, UnsupportedMediaTypeError),
    ('multipart/related; type="application/dicom+json"; boundary=b1', UnsupportedMediaTypeError),
    ('multipart/related; type="application/dicom"', StowRequestError),
])
def test_requests_that_are_not_multipart_related_dicom(content_type: str | None, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_multipart_related(content_type, b"--b1\r\n\r\nx\r\n--b1--")


@pytest.mark.parametrize("body", [b"no boundary here", b"--b1\r\nContent-Type: application/dicom\r\n\r\nx",
                                  b"--b1\r\nContent-Type: application/dicom\r\nx\r\n--b1--"])
def test_bodies_that_are_not_delimited(body: bytes) -> None:
    with pytest.raises(StowRequestError):
        parse_multipart_related("multipart/related; boundary=b1", body)


def test_the_http_status_and_sequences_of_a_stow_response() -> None:
    good = StowEntry(CT, "1.1", "9.9")
    bad = StowEntry(CT, "1.2", None, 0xC000)
    code, response = stow_response([good])
    assert code == 200 and "FailedSOPSequence" not in response
    assert response.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == "1.1"
    code, response = stow_response([good, bad], "http://node/dicom-web/studies/9.9")
    assert code == 202 and response.RetrieveURL == "http://node/dicom-web/studies/9.9"
    assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in response.FailedSOPSequence] == [("1.2", 0xC000)]
    code, response = stow_response([bad])
    assert code == 409 and "ReferencedSOPSequence" not in response
    as_json = response.to_json_dict()
    assert as_json["00081198"]["Value"][0]["00081197"] == {"vr": "US", "Value": [0xC000]}


def test_qido_parameters_by_keyword_or_tag_with_limit_and_offset() -> None:
    query = parse_query("study", [("00100020", "P*"), ("StudyDate", "20240101-"), ("limit", "5"),
                                  ("offset", "10"), ("includefield", "all"), ("StudyTime", "1200"),
                                  ("ReferringPhysicianName", "")], identity=True)
    assert query.filters == {"PatientID": "P*", "StudyDate": "20240101-"}
    assert (query.limit, query.offset) == (5, 10)
    assert query.ignored == ("StudyTime",)
    scoped = parse_query("instance", [("SOPInstanceUID", "1.2,1.3")], identity=False, study_uid="9.9", series_uid="9.9.1")
    assert scoped.filters == {"SOPInstanceUID": "1.2,1.3", "StudyInstanceUID": "9.9", "SeriesInstanceUID": "9.9.1"}


@pytest.mark.parametrize("params", [[("NotAnAttribute", "x")], [("limit", "0")], [("limit", "100000")],
                                    [("offset", "-1")], [("StudyDate", "2024")], [("StudyDate", "-")],
                                    [("SeriesNumber", "one")]])
def test_malformed_qido_parameters_are_a_bad_request(params: list[tuple[str, str]]) -> None:
    with pytest.raises(QidoRequestError):
        parse_query("series", params, identity=True)


def test_matching_on_patient_identity_needs_a_login() -> None:
    for key in ("PatientID", "PatientName", "AccessionNumber"):
        with pytest.raises(IdentityQueryError):
            parse_query("study", [(key, "x")], identity=False)
    assert parse_query("study", [("StudyDate", "20240101")], identity=False).filters == {"StudyDate": "20240101"}


def test_wildcards_and_result_modalities() -> None:
    assert matches_text("CHEST PA", "chest*", fold=True) and matches_text("AB", "A?")
    assert not matches_text("AB", "A") and not matches_text(None, "*")
    assert matches_text("a.b", "a.b") and not matches_text("axb", "a.b")
    assert result_modality("1.2.840.10008.5.1.4.1.1.66.4") == "SEG"
    assert result_modality("1.2.840.10008.5.1.4.1.1.88.33") == "SR"
    assert result_modality("1.2.840.10008.5.1.4.1.1.88.59") == "KO"
