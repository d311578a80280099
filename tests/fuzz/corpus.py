"""A deterministic fuzz corpus for the C-STORE path, built from valid seeds.

Each :class:`Case` is what a peer would put on the wire: a presentation context (SOP Class and the
transfer syntax it declares) and data set bytes, plus the Part 10 form (File Meta + data set) that
:meth:`node.ingest.Ingestor.ingest` receives. Families:

* ``truncated``: a stream cut short (in the first element, mid header, mid Pixel Data);
* ``no-end-marker`` and other broken fragment sequences of encapsulated Pixel Data (pydicom may
  parse such a stream into an empty data set with only a warning);
* ``wrong-ts``: bytes encoded one way, declared another (Implicit/Explicit/Big Endian, native
  pixels declared compressed, compressed declared native);
* ``absurd``: Rows/Columns/NumberOfFrames/BitsAllocated/SamplesPerPixel out of any sense, huge
  element lengths, sequences nested hundreds deep;
* ``mutated``: seeded random byte flips in the header region of each seed;
* ``garbage``: random bytes.

``must_fail`` marks cases no correct node may answer Success to; the rest may be stored as sent.
"""

from __future__ import annotations

import copy
import random
import struct
import warnings
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from tests.phantom import PhantomGeometry, make_ct_phantom
from tests.shared_data import SHARED_DICOM

SEED_GEOMETRY = PhantomGeometry(rows=80, columns=80, pixel_spacing_mm=(4.0, 4.0), slice_spacing_mm=10.0,
                                num_slices=18)
ITEM = b"\xfe\xff\x00\xe0"
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


@dataclass(frozen=True)
class Case:
    name: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    dataset: bytes
    must_fail: bool = False

    def part10(self) -> bytes:
        """Preamble, File Meta declaring this case's transfer syntax, then the data set bytes."""
        return file_meta_bytes(self.sop_class_uid, self.sop_instance_uid, self.transfer_syntax_uid) + self.dataset

    def write(self, directory: Path) -> Path:
        path = directory / f"{self.name}.dcm"
        path.write_bytes(self.part10())
        return path


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax_uid
    holder = Dataset()
    holder.file_meta = meta
    buffer = BytesIO()
    holder.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def encode(ds: Dataset, transfer_syntax_uid: str) -> bytes:
    """The data set bytes of ``ds`` (no File Meta) in ``transfer_syntax_uid``."""
    ds = copy.copy(ds)  # a new File Meta on a shallow copy; the elements are not changed
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = transfer_syntax_uid
    buffer = BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    return data[len(file_meta_bytes(ds.SOPClassUID, ds.SOPInstanceUID, transfer_syntax_uid)):]


@dataclass(frozen=True)
class Seed:
    name: str
    dataset: Dataset
    transfer_syntax_uid: str

    @property
    def data(self) -> bytes:
        return encode(self.dataset, self.transfer_syntax_uid)

    def case(self, name: str, data: bytes, ts: str | None = None, must_fail: bool = False) -> Case:
        return Case(f"{self.name}-{name}", str(self.dataset.SOPClassUID), str(self.dataset.SOPInstanceUID),
                    ts or self.transfer_syntax_uid, data, must_fail)

    def with_values(self, **values: object) -> bytes:
        ds = copy.deepcopy(self.dataset)  # Dataset.copy() is shallow: it would change the seed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for keyword, value in values.items():
                if keyword == "NumberOfFrames":  # raw, so invalid IS text ('1A') is written as is
                    text = str(value).encode() + (b" " if len(str(value)) % 2 else b"")
                    ds[0x00280008] = RawDataElement(Tag(0x00280008), "IS", len(text), text, 0, False, True)
                else:
                    setattr(ds, keyword, value)
        return encode(ds, self.transfer_syntax_uid)


def seeds() -> list[Seed]:
    """A native CT slice (Explicit VR LE) and two encapsulated JPEG images."""
    ct = make_ct_phantom(geometry=SEED_GEOMETRY, patient_id="FUZZ")[SEED_GEOMETRY.num_slices // 2]
    out = [Seed("ct", ct, ExplicitVRLittleEndian)]
    for name in ("SC_rgb_jpeg_dcmtk.dcm", "JPGExtended_NM_12bit.dcm"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(SHARED_DICOM / "compressed" / name)
        out.append(Seed(name.split("_")[0].lower(), ds, str(ds.file_meta.TransferSyntaxUID)))
    return out


def _deep_sequence(depth: int) -> bytes:
    """(0040,0275) Request Attributes Sequence nested ``depth`` deep, undefined lengths, Explicit LE."""
    head = b"\x40\x00\x75\x02SQ\x00\x00\xff\xff\xff\xff" + ITEM + b"\xff\xff\xff\xff"
    tail = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + SEQUENCE_DELIMITER
    return head * depth + tail * depth


def corpus() -> list[Case]:
    """Every case, in a fixed order (the same bytes on every run)."""
    rng = random.Random(20240601)
    cases: list[Case] = []
    ct, sc, nm = seeds()
    native = ct.data

    # truncated streams
    pixel_at = native.index(b"\xe0\x7f\x10\x00")
    for cut in (0, 1, 7, 9, 100, pixel_at - 3, pixel_at + 6, pixel_at + 12 + 50, len(native) - 1):
        cases.append(ct.case(f"truncated-{cut}", native[:cut], must_fail=True))
    for seed in (sc, nm):
        data = seed.data
        cases.append(seed.case("truncated-half", data[: len(data) // 2], must_fail=True))
        # encapsulated Pixel Data missing its end marker (the Sequence Delimitation Item)
        assert data.endswith(SEQUENCE_DELIMITER)
        cases.append(seed.case("no-end-marker", data[: -len(SEQUENCE_DELIMITER)], must_fail=True))
        cases.append(seed.case("no-end-marker-4", data[:-4], must_fail=True))
        last_item = data.rindex(ITEM)
        huge = data[: last_item + 4] + struct.pack("<I", 0xFFFFFFF0) + data[last_item + 8:]
        cases.append(seed.case("fragment-length-huge", huge, must_fail=True))
        odd = data[: last_item + 4] + struct.pack("<I", 3) + data[last_item + 8:]
        cases.append(seed.case("fragment-length-short", odd))
        first_item = data.index(ITEM, data.index(b"\xe0\x7f\x10\x00"))
        cases.append(seed.case("no-fragments", data[: first_item] + ITEM + b"\x00" * 4 + SEQUENCE_DELIMITER,
                               must_fail=True))
        cases.append(seed.case("frames-beyond-fragments", seed.with_values(NumberOfFrames="1000"),
                               must_fail=True))
        # compressed bytes declared native
        cases.append(seed.case("declared-explicit", data, ExplicitVRLittleEndian))
        cases.append(seed.case("declared-implicit", data, ImplicitVRLittleEndian))

    # wrong transfer syntax declarations of native bytes
    for ts, label in ((ImplicitVRLittleEndian, "implicit"), (ExplicitVRBigEndian, "big-endian"),
                      (DeflatedExplicitVRLittleEndian, "deflated"), (JPEGBaseline8Bit, "jpeg")):
        cases.append(ct.case(f"declared-{label}", native, ts))
    cases.append(ct.case("implicit-declared-explicit", encode(ct.dataset, ImplicitVRLittleEndian)))

    # absurd image attributes
    for name, values in {
        "rows-columns-65535": {"Rows": 65535, "Columns": 65535},
        "rows-0": {"Rows": 0},
        "bits-allocated-0": {"BitsAllocated": 0},
        "samples-0": {"SamplesPerPixel": 0},
        "frames-2147483647": {"NumberOfFrames": "2147483647"},
        "frames-0": {"NumberOfFrames": "0"},
        "frames-minus-1": {"NumberOfFrames": "-1"},
        "frames-1A": {"NumberOfFrames": "1A"},
    }.items():
        cases.append(ct.case(f"absurd-{name}", ct.with_values(**values), must_fail=True))
    cases.append(ct.case("absurd-element-length", b"\x09\x00\x10\x00UN\x00\x00\xf0\xff\xff\xff" + b"x" * 16,
                         must_fail=True))
    cases.append(ct.case("absurd-deep-sequence", _deep_sequence(400) + native))
    cases.append(ct.case("bad-uid", ct.with_values(SOPInstanceUID="1.2.abc"), must_fail=True))
    cases.append(ct.case("path-traversal-uid", ct.with_values(StudyInstanceUID="../../../../etc"), must_fail=True))

    # seeded random byte flips in the header region
    for seed in (ct, sc, nm):
        data = seed.data
        header_end = min(len(data), data.index(b"\xe0\x7f\x10\x00") + 12)
        for index in range(12):
            mutated = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                mutated[rng.randrange(header_end)] = rng.randrange(256)
            cases.append(seed.case(f"mutated-{index}", bytes(mutated)))
    for index in range(4):
        cases.append(ct.case(f"garbage-{index}", rng.randbytes(rng.randint(1, 4000)), must_fail=True))
    return cases


def malformed_files() -> list[Path]:
    """The shared malformed samples (``../shared/dicom/malformed``)."""
    return sorted((SHARED_DICOM / "malformed").iterdir())


# -- sending on the network -----------------------------------------------------------------------------
def sendable(path: Path, directory: Path) -> Path:
    """``path`` itself if it has a File Meta with a transfer syntax, else its bytes behind a made-up
    one (CT Image Storage, Implicit VR LE), so the bytes reach the node without being parsed."""
    from pydicom.errors import InvalidDicomError
    from pynetdicom.dsutils import split_dataset

    try:
        meta, _ = split_dataset(path)
        if "TransferSyntaxUID" in meta:
            return path
    except InvalidDicomError:  # no preamble and no 'DICM'
        pass
    wrapped = directory / f"wrapped-{path.name}"
    wrapped.write_bytes(file_meta_bytes("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5.6.7", ImplicitVRLittleEndian)
                        + path.read_bytes())
    return wrapped


def send_raw(port: int, path: Path, called: str = "MEDNODE", timeout_s: float = 30) -> tuple[int, str]:
    """C-STORE the data set bytes of Part 10 file ``path`` unparsed, in its own association, on the
    presentation context its File Meta declares; return (status, error comment).

    Raises
    ------
    AssertionError
        If the association is refused or no C-STORE response comes back (a hang or a drop).
    """
    from pynetdicom import AE
    from pynetdicom import _config as pynetdicom_config
    from pynetdicom.dsutils import split_dataset

    meta, _ = split_dataset(path)
    ae = AE(ae_title="FUZZSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    chunked = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True  # stream the file's bytes, never re-encode
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        assert assoc.is_established, "the node refused the association"
        try:
            response = assoc.send_c_store(path)
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = chunked
    assert "Status" in response, "no response to C-STORE (the node hung or dropped the association)"
    return int(response.Status), str(response.get("ErrorComment", ""))


def echo(port: int, called: str = "MEDNODE") -> int:
    """C-ECHO status of the node at ``port`` (-1 when the association is refused)."""
    from pynetdicom import AE

    ae = AE(ae_title="FUZZSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return -1
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()
