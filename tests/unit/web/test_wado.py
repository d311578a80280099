"""WADO-RS (PS3.18 10.4) in-process on SQLite and PostgreSQL: instances as stored and re-encoded,
metadata with bulk data by reference, frames as stored and decoded, who may retrieve, and the
errors a client gets; and the pure parts (Accept negotiation, frame lists)."""

from __future__ import annotations

from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import get_frame
from pydicom.pixels import pack_bits, pixel_array
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from sqlalchemy import select

from node.web.stow import parse_multipart_related
from node.web.wado import (
    NotAcceptableError,
    Part,
    WadoRequestError,
    multipart,
    negotiate,
    parse_frames,
    wants_json,
)
from storage.models import AuditEvent
from tests.unit.web.conftest import CANARY_NAME, TOKEN, WebNode

AUTH = {"Authorization": f"Bearer {TOKEN}"}
AS_STORED = {**AUTH, "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
FRAMES_AS_STORED = {**AUTH, "Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
SEG = "1.2.840.10008.5.1.4.1.1.66.4"


# -- pure parts -----------------------------------------------------------------------------------
def test_accept_headers_name_the_transfer_syntaxes_a_client_takes() -> None:
    dicom = "application/dicom"
    assert negotiate(None, dicom).syntaxes == {ExplicitVRLittleEndian}  # PS3.18 8.7.3.5: the default
    assert negotiate("*/*", dicom).syntaxes == {ExplicitVRLittleEndian}
    assert negotiate('multipart/related; type="application/dicom"; transfer-syntax=*', dicom).any_syntax
    wanted = negotiate(f'multipart/related; type="application/dicom"; transfer-syntax={JPEG2000Lossless}, '
                       f'multipart/related; type=application/dicom; transfer-syntax={ImplicitVRLittleEndian}; q=0.5',
                       dicom)
    assert wanted.syntaxes == {JPEG2000Lossless, ImplicitVRLittleEndian} and not wanted.takes_default
    # a range the client refuses (q=0) or of another part type counts for nothing
    with pytest.raises(NotAcceptableError):
        negotiate('multipart/related; type="application/dicom"; q=0', dicom)
    with pytest.raises(NotAcceptableError, match="transfer-syntax"):
        negotiate('multipart/related; type="image/jpeg", application/dicom+json', dicom)
    assert negotiate('multipart/related; type="application/octet-stream"', "application/octet-stream").takes_default
    # frames in an image media type: the transfer syntaxes it stands for (PS3.18 Table 8.7.3-2)
    jp2 = negotiate('multipart/related; type="image/jp2"', "application/octet-stream")
    assert jp2.takes(JPEG2000Lossless) and not jp2.takes_default
    assert negotiate('multipart/related; type="*/*"', "application/octet-stream").takes_default  # dicomweb-client


def test_metadata_is_json_only() -> None:
    wants_json(None)
    wants_json("application/dicom+json, */*;q=0.1")
    with pytest.raises(NotAcceptableError):
        wants_json('multipart/related; type="application/dicom+xml"')


@pytest.mark.parametrize(("text", "frames"), [("1", [1]), ("2,5,3", [2, 5, 3])])
def test_frame_lists(text: str, frames: list[int]) -> None:
    assert parse_frames(text) == frames


@pytest.mark.parametrize("text", ["0", "", "1,,2", "a", "-1", "1.5"])
def test_frame_lists_that_name_no_frame(text: str) -> None:
    with pytest.raises(WadoRequestError):
        parse_frames(text)


def test_a_multipart_answer_is_what_a_stow_parser_reads_back(tmp_path: Path) -> None:
    stored = tmp_path / "x.dcm"
    stored.write_bytes(b"\r\n--not-a-boundary\r\n" * 100_000)  # streamed in several chunks
    body = b"".join(multipart([Part("application/dicom", b"first"), Part("application/dicom", stored)], "b9"))
    parts = parse_multipart_related('multipart/related; type="application/dicom"; boundary=b9', body)
    assert [p.data for p in parts] == [b"first", stored.read_bytes()]


# -- through the node -----------------------------------------------------------------------------
def _parts(answer) -> list[tuple[str, bytes]]:  # type: ignore[no-untyped-def]
    assert answer.status_code == 200, answer.text
    # the STOW-RS parser reads application/dicom parts only: the same framing for octet-stream ones
    content_type = answer.headers["content-type"].replace('"application/octet-stream"', '"application/dicom"')
    return [(p.content_type, p.data) for p in parse_multipart_related(content_type, answer.content)] if (
        "boundary=" in content_type) else []


def _part_types(answer) -> list[str]:  # type: ignore[no-untyped-def]
    """Each part's whole Content-Type (parse_multipart_related keeps only the media type)."""
    return [line.decode().split(":", 1)[1].strip() for line in answer.content.split(b"\r\n")
            if line.lower().startswith(b"content-type:")]


def test_a_processed_study_is_retrieved_whole_results_included(processed: tuple[WebNode, str, int],
                                                                ct_files: list[Path]) -> None:
    node, study_uid, _ = processed
    url = f"/dicom-web/studies/{study_uid}"
    assert node.client.get(url).status_code == 401  # whole objects carry the identity: a login
    as_stored = node.client.get(url, headers=AS_STORED)
    objects = [pydicom.dcmread(BytesIO(data)) for _, data in _parts(as_stored)]
    assert [o.Modality for o in objects] == ["CT", "CT", "CT", "SEG", "SR"]
    assert objects[0].PatientName == CANARY_NAME
    originals = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in ct_files}
    for ct in objects[:3]:
        assert ct.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian  # as received
        assert ct.PixelData == originals[ct.SOPInstanceUID].PixelData
    assert _part_types(as_stored)[:3] == [f"application/dicom; transfer-syntax={ImplicitVRLittleEndian}"] * 3

    # no transfer syntax named: Explicit VR Little Endian, the same instances
    default = [pydicom.dcmread(BytesIO(data)) for _, data in _parts(node.client.get(url, headers=AUTH))]
    assert [o.SOPInstanceUID for o in default] == [o.SOPInstanceUID for o in objects]
    assert {str(o.file_meta.TransferSyntaxUID) for o in default} == {ExplicitVRLittleEndian}
    assert all(np.array_equal(a.pixel_array, b.pixel_array) for a, b in zip(default[:4], objects[:4], strict=True))

    series = objects[3].SeriesInstanceUID
    [seg] = _parts(node.client.get(f"{url}/series/{series}", headers=AS_STORED))
    one = _parts(node.client.get(f"{url}/series/{series}/instances/{objects[3].SOPInstanceUID}", headers=AS_STORED))
    assert one == [seg]
    with node.ctx.sessions() as session:
        rows = session.scalars(select(AuditEvent.detail).where(AuditEvent.action == "downloaded")).all()
    assert any("WADO-RS study, 5 instance(s)" in r for r in rows) and any("WADO-RS instance" in r for r in rows)


def test_metadata_gives_pixel_data_by_reference_and_the_reference_gives_it(
        processed: tuple[WebNode, str, int]) -> None:
    node, study_uid, _ = processed
    answer = node.client.get(f"/dicom-web/studies/{study_uid}/metadata", headers=AUTH)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/dicom+json")
    metadata = answer.json()
    assert len(metadata) == 5
    ct = metadata[0]
    assert ct["00100010"]["Value"][0]["Alphabetic"] == CANARY_NAME and "00020010" not in ct
    uri = ct["7FE00010"]["BulkDataURI"]
    assert "InlineBinary" not in ct["7FE00010"]
    sop = ct["00080018"]["Value"][0]
    assert uri.endswith(f"/instances/{sop}/bulkdata/7FE00010")
    [(content_type, pixels)] = _parts(node.client.get(uri.removeprefix("http://testserver"), headers=AUTH))
    stored = _stored(node, study_uid, sop)
    assert content_type == "application/octet-stream" and pixels == stored.PixelData
    seg = next(m for m in metadata if m["00080016"]["Value"] == [SEG])
    assert seg["00620002"]["Value"][0]["00620005"]["vr"] == "LO"  # sequences nested in full
    # a viewer loads a SEG by its pixel data's BulkDataURI: one part, the frames' bits end to end
    seg_uri = seg["7FE00010"]["BulkDataURI"].removeprefix("http://testserver")
    [(_, seg_pixels)] = _parts(node.client.get(seg_uri, headers=AUTH))
    assert seg_pixels == _stored(node, study_uid, seg["00080018"]["Value"][0]).PixelData
    series_level = node.client.get(f"/dicom-web/studies/{study_uid}/series/{ct['0020000E']['Value'][0]}/metadata",
                                   headers=AUTH).json()
    assert len(series_level) == 3
    refused = node.client.get(f"/dicom-web/studies/{study_uid}/metadata",
                              headers={**AUTH, "Accept": 'multipart/related; type="application/dicom+xml"'})
    assert refused.status_code == 406


def _stored(node: WebNode, study_uid: str, sop_uid: str) -> pydicom.Dataset:
    from storage.models import Instance, Result

    with node.ctx.sessions() as session:
        path = session.scalar(select(Instance.path).where(Instance.sop_instance_uid == sop_uid)) or session.scalar(
            select(Result.path).where(Result.sop_instance_uid == sop_uid))
    assert path is not None
    return pydicom.dcmread(node.ctx.store.absolute(path))


def test_frames_of_a_ct_and_of_a_binary_seg(processed: tuple[WebNode, str, int]) -> None:
    node, study_uid, _ = processed
    metadata = node.client.get(f"/dicom-web/studies/{study_uid}/metadata", headers=AUTH).json()
    ct = metadata[0]
    seg = next(m for m in metadata if m["00080016"]["Value"] == [SEG])

    def frames(instance: dict, text: str, headers: dict[str, str] = AUTH):  # type: ignore[no-untyped-def]
        base = (f"/dicom-web/studies/{study_uid}/series/{instance['0020000E']['Value'][0]}"
                f"/instances/{instance['00080018']['Value'][0]}")
        return node.client.get(f"{base}/frames/{text}", headers=headers)

    stored_ct = _stored(node, study_uid, ct["00080018"]["Value"][0])
    [(_, pixels)] = _parts(frames(ct, "1"))
    assert pixels == stored_ct.PixelData
    stored_seg = _stored(node, study_uid, seg["00080018"]["Value"][0])
    count = int(stored_seg.NumberOfFrames)
    answer = frames(seg, ",".join(str(n) for n in range(count, 0, -1)))
    expected = [pack_bits(pixel_array(stored_seg, index=i)) for i in range(count - 1, -1, -1)]
    assert [data for _, data in _parts(answer)] == expected  # each 1-bit frame packed on its own
    assert frames(ct, "2").status_code == 404  # a CT image has one frame
    assert frames(ct, "0").status_code == 400
    refused = frames(ct, "1", {**AUTH, "Accept": 'multipart/related; type="image/jpeg"'})
    assert refused.status_code == 406 and "octet-stream" in refused.text


def test_compressed_objects_as_stored_or_decoded(web_node_factory: Callable[..., WebNode],
                                                 shared_dicom: Path) -> None:
    node = web_node_factory()
    j2k = shared_dicom / "compressed" / "CT1_J2KR.dcm"
    us = shared_dicom / "compressed" / "US_multiframe_jpeg_baseline_nobot.dcm"
    originals = {}
    for path in (j2k, us):
        node.ingest([path])
        originals[path.name] = pydicom.dcmread(path)
    j2k_ds, us_ds = originals[j2k.name], originals[us.name]

    def url(ds: pydicom.Dataset, tail: str = "") -> str:
        return f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}{tail}"

    [(_, as_stored)] = _parts(node.client.get(url(j2k_ds), headers=AS_STORED))
    as_stored_ds = pydicom.dcmread(BytesIO(as_stored))
    assert as_stored_ds.file_meta.TransferSyntaxUID == JPEG2000Lossless and as_stored_ds.PixelData == j2k_ds.PixelData
    [(_, decoded)] = _parts(node.client.get(url(j2k_ds), headers=AUTH))
    decoded_ds = pydicom.dcmread(BytesIO(decoded))
    assert decoded_ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert decoded_ds.SOPInstanceUID == j2k_ds.SOPInstanceUID
    assert np.array_equal(decoded_ds.pixel_array, j2k_ds.pixel_array)  # lossless: the same pixels
    named = {**AUTH, "Accept": f'multipart/related; type="application/dicom"; transfer-syntax={JPEG2000Lossless}'}
    assert pydicom.dcmread(BytesIO(_parts(node.client.get(url(j2k_ds), headers=named))[0][1])).PixelData == j2k_ds.PixelData
    refused = node.client.get(url(us_ds), headers=named)  # JPEG baseline, and the default not taken
    assert refused.status_code == 406 and "transfer-syntax=*" in refused.text

    # frames of an 8-frame JPEG ultrasound: as stored, or decoded (RGB, as pydicom decodes it)
    stored_frames = _parts(node.client.get(url(us_ds, "/frames/2,5"), headers=FRAMES_AS_STORED))
    assert [data for _, data in stored_frames] == [get_frame(us_ds.PixelData, i, number_of_frames=8) for i in (1, 4)]
    assert all(t == "application/octet-stream" for t, _ in stored_frames)
    jpeg = {**AUTH, "Accept": 'multipart/related; type="image/jpeg"'}
    assert _parts(node.client.get(url(us_ds, "/frames/2"), headers=jpeg))[0][1] == stored_frames[0][1]
    assert node.client.get(url(j2k_ds, "/frames/1"), headers=jpeg).status_code == 406  # JPEG 2000, not JPEG
    [(_, raw)] = _parts(node.client.get(url(us_ds, "/frames/3"), headers=AUTH))
    assert raw == pixel_array(us_ds, index=2).tobytes()
    assert node.client.get(url(us_ds, "/frames/9"), headers=AUTH).status_code == 404

    # its pixel data by BulkDataURI: the frames as stored, or every frame decoded in one part
    bulk = url(us_ds, "/bulkdata/7FE00010")
    assert [d for _, d in _parts(node.client.get(bulk, headers=FRAMES_AS_STORED))] == [
        get_frame(us_ds.PixelData, i, number_of_frames=8) for i in range(8)]
    [(_, all_frames)] = _parts(node.client.get(bulk, headers=AUTH))
    assert all_frames == pixel_array(us_ds).tobytes()


def test_requests_for_what_is_not_there(processed: tuple[WebNode, str, int]) -> None:
    node, study_uid, _ = processed
    missing = node.client.get("/dicom-web/studies/1.2.3.4.5", headers=AUTH)
    assert missing.status_code == 404 and "1.2.3.4.5" in missing.text
    assert node.client.get("/dicom-web/studies/not-a-uid/metadata", headers=AUTH).status_code == 400
    assert node.client.get(f"/dicom-web/studies/{study_uid}/series/1.2.3/metadata", headers=AUTH).status_code == 404
    metadata = node.client.get(f"/dicom-web/studies/{study_uid}/metadata", headers=AUTH).json()
    base = metadata[0]["7FE00010"]["BulkDataURI"].removeprefix("http://testserver").rsplit("/", 1)[0]
    assert node.client.get(f"{base}/7FE0", headers=AUTH).status_code == 400
    assert node.client.get(f"{base}/00280010", headers=AUTH).status_code == 404  # Rows: not binary
