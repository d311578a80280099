"""A data set built in memory (a SEG, an SR) encoded to the bytes of a DICOM file.

pydicom's ``dcmwrite`` corrects ambiguous VRs (``US or SS``, ``OB or OW``) in each data set it
writes whose original encoding differs from the file's, and a data set built in memory has none:
so it runs ``correct_ambiguous_vr`` on the top data set, which walks every nested item, and then
again on each item as it writes it, which walks that item's subtree again. For a SEG's per-frame
functional groups (600 items of 4–5 nested sequences for a 300-slice CT) that is ~17,800 walks
of ~5,400 data sets, about a quarter of the encoding time. :func:`encode_dataset` corrects the
VRs once, as the first walk does, and then marks each data set built in memory as already in the
file's encoding, so that the writer's per-item walks, which would find nothing left to correct,
are skipped. The bytes are the same (the unit tests compare them with ``save_as``'s).
"""

from __future__ import annotations

from io import BytesIO

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.uid import ExplicitVRLittleEndian


def encode_dataset(dataset: Dataset) -> bytes:
    """``dataset`` as the bytes of a DICOM file (``save_as(..., enforce_file_format=True)``).

    ``dataset`` is meant to be written and dropped: its ambiguous VRs are resolved and its
    original encoding is set (as pydicom's writer itself leaves a data set it corrected). A data
    set in any transfer syntax other than Explicit VR Little Endian is written by ``save_as`` as
    it is.
    """
    buffer = BytesIO()
    meta = getattr(dataset, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID") == ExplicitVRLittleEndian:
        correct_ambiguous_vr(dataset, True)
        _mark_explicit_little(dataset)
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _mark_explicit_little(dataset: Dataset) -> None:
    """Mark ``dataset`` and its nested items, where built in memory, as encoded in Explicit VR
    Little Endian with their own character set (what the writer compares before correcting).

    A data set read from a file keeps its own original encoding (the writer then treats it as
    it did before), and so does one holding raw (undecoded) elements, which the writer decodes
    only on the correcting path.
    """
    stack = [dataset]
    while stack:
        current = stack.pop()
        if current.original_encoding == (None, None) and not any(
            isinstance(element, RawDataElement) for element in current._dict.values()
        ):
            current.set_original_encoding(False, True, current._character_set)
        for element in current._dict.values():
            if not isinstance(element, RawDataElement) and element.VR == "SQ":
                stack.extend(element.value)
