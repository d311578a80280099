"""The header check reads what the index needs and refuses truncated instances, whether it parses a
whole Part 10 stream or a C-STORE's data set with the File Meta the listener built for it."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    generate_uid,
)

from dicom_io.errors import InvalidInstanceError
from dicom_io.header import DEFER_BYTES, Part10Prefixes, parse_header, part10_prefix, read_received

from .conftest import requires_shared, sample, to_bytes

SAMPLES = [
    "ct/dcmqi_ct3slice/01.dcm",  # implicit VR, 512×512 native
    "ct/ge_spine_ct_GH1308.dcm",
    "compressed/CT1_J2KR.dcm",  # encapsulated, larger than DEFER_BYTES
    "compressed/CT1_RLE.dcm",
    "compressed/CT1_JLSL.dcm",
    "compressed/US_multiframe_jpeg_baseline_nobot.dcm",
    "compressed/image_dfl_deflated.dcm",
    "encoding/MR_small_bigendian.dcm",
    "charset/chrX1_utf8_chinese.dcm",
]


def split_part10(data: bytes) -> tuple[FileMetaDataset, bytes]:
    """The File Meta of a Part 10 stream and the data set bytes after it."""
    meta = pydicom.dcmread(BytesIO(data), stop_before_pixels=True).file_meta
    # preamble and DICM (132 bytes), the group length element (12), then the group it counts
    return meta, data[132 + 12 + int(meta.FileMetaInformationGroupLength):]


def received(data: bytes) -> tuple[bytes, str, bytes]:
    """A Part 10 stream as :func:`read_received` gets it: data set, transfer syntax, prefix."""
    meta, dataset = split_part10(data)
    return dataset, str(meta.TransferSyntaxUID), data[: len(data) - len(dataset)]


def big_ct(rows: int = 300) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT"
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.arange(rows * rows, dtype=np.int16).tobytes()
    return to_bytes(ds)


@requires_shared
@pytest.mark.parametrize("relative", SAMPLES)
def test_received_data_set_reads_as_the_whole_file_does(relative: str) -> None:
    data = sample(relative).read_bytes()

    from_file, _ = parse_header(data)
    from_network = read_received(*received(data)).header()

    assert from_network == from_file


def test_part10_prefix_and_data_set_make_the_file() -> None:
    data = big_ct()
    meta, dataset = split_part10(data)
    assert part10_prefix(meta) + dataset == data


@pytest.mark.parametrize("cut", [1, 4096, 100_000])
def test_native_pixel_data_cut_short_is_refused_by_both_paths(cut: int) -> None:
    data = big_ct()
    assert 300 * 300 * 2 > DEFER_BYTES  # the Pixel Data is deferred, not read
    dataset, syntax, prefix = received(data)

    with pytest.raises(InvalidInstanceError, match="truncated"):
        parse_header(data[:-cut])
    with pytest.raises(InvalidInstanceError, match="truncated"):
        read_received(dataset[:-cut], syntax, prefix).header()


@requires_shared
def test_encapsulated_pixel_data_cut_short_is_refused() -> None:
    dataset, syntax, prefix = received(sample("compressed/CT1_J2KR.dcm").read_bytes())
    with pytest.raises(InvalidInstanceError):
        read_received(dataset[: len(dataset) // 2], syntax, prefix).header()


def _meta(sop_class: str, sop_instance: str, syntax: str, version: str | None = "V1") -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = "1.2.3.4.5"
    if version:
        meta.ImplementationVersionName = version
    return meta


@pytest.mark.parametrize("version", ["V1", None])
def test_reused_prefixes_are_byte_for_byte_what_pydicom_writes(version: str | None) -> None:
    prefixes = Part10Prefixes("1.2.3.4.5", version)
    kinds = [(CTImageStorage, ExplicitVRLittleEndian), (MRImageStorage, ImplicitVRLittleEndian),
             (CTImageStorage, JPEG2000Lossless)]
    # every UID length from 1 to 64 (odd ones are padded), each kind, each seen twice
    uids = ["1", "12", *[generate_uid()[:n].rstrip(".") for n in range(3, 65)]]
    for sop_class, syntax in kinds:
        for uid in uids + uids:
            expected = part10_prefix(_meta(sop_class, uid, syntax, version))
            assert prefixes.prefix(sop_class, uid, syntax) == expected, (sop_class, uid, syntax)
    lengths = {len(uid) + len(uid) % 2 for uid in uids}
    assert len(prefixes._kinds) == len(kinds) * len(lengths)  # encoded once per kind


def test_a_prefix_and_the_received_data_set_make_the_file_pynetdicom_would_write() -> None:
    data = big_ct()
    meta, dataset = split_part10(data)
    prefixes = Part10Prefixes(str(meta.ImplementationClassUID), meta.get("ImplementationVersionName"))
    prefix = prefixes.prefix(str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                             str(meta.TransferSyntaxUID))
    assert prefix + dataset == data
    assert pydicom.dcmread(BytesIO(prefix + dataset)).SOPInstanceUID == meta.MediaStorageSOPInstanceUID


def test_deferred_pixel_data_is_not_read_into_the_data_set() -> None:
    header, ds = parse_header(big_ct())
    assert header.modality == "CT"
    assert ds.get_item(0x7FE00010, keep_deferred=True).value is None
