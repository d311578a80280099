"""IHE IOCM rejection note: a Key Object Selection Document that withdraws superseded results.

When late images change a study, mednode writes a new version of its results; the objects of the
earlier version stay in the PACS unless something withdraws them. IHE Radiology IOCM (Imaging
Object Change Management, RAD TF-3 "Rejection Note Stored") does that with a KOS whose document
title says why the referenced instances are rejected. A PACS that supports IOCM hides them; one
that does not simply stores the note.

Document title: (113001, DCM, "Rejected for Quality Reasons"). IOCM distinguishes:

- *Rejected for Quality Reasons*: the instances are not to be used for diagnosis, are hidden from
  normal display, and stay retrievable for quality control. An analysis of an incomplete study is
  exactly that: superseded, not dangerous, and worth keeping for audit.
- *Rejected for Patient Safety Reasons* (113037): the instances must never be shown again, e.g.
  wrong patient or wrong laterality. Overstated here: nothing in the old results is about another
  patient, and a PACS may purge them.
- *Incorrect Modality Worklist Entry* (113038) and *Data Retention Policy Expired* (113039):
  other use cases (wrong order, deletion by retention policy).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset

from dicom_io.uids import derived_uid

logger = logging.getLogger(__name__)

#: CID 7011 "Rejected for Quality Reasons", the IOCM document title mednode writes.
REJECTED_FOR_QUALITY_REASONS = hd.sr.CodedConcept("113001", "DCM", "Rejected for Quality Reasons")
#: Name of the device that selects the rejected objects (the node, not a model).
NODE_DEVICE_NAME = "mednode"


def build_rejection_note(
    rejected: Sequence[Dataset],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    series_description: str = "mednode rejection note",
    description: str | None = None,
    manufacturer: str = "mednode",
) -> hd.ko.KeyObjectSelectionDocument:
    """Build an IOCM rejection note (KOS, TID 2010) referencing every object in ``rejected``.

    Parameters
    ----------
    rejected
        The superseded objects as stored (headers suffice), all of one study; the first one's
        patient and study attributes are copied, as for any object of the study.
    series_instance_uid, sop_instance_uid, series_number
        Identity of the note (derive them from the job for reproducibility).
    series_description
        Series Description of the note's series.
    description
        Key Object Description (DCM 113012) text, e.g. why the objects were rejected.
    manufacturer
        Manufacturer of the node writing the note.

    Returns
    -------
    highdicom.ko.KeyObjectSelectionDocument
        Title (113001, DCM, "Rejected for Quality Reasons"), the node as device observer, one
        content item per rejected object, each listed in the Current Requested Procedure
        Evidence Sequence.

    Raises
    ------
    ValueError
        If ``rejected`` is empty, lists an instance twice, or spans studies (IOCM: a rejection
        note references the instances of one study).
    """
    objects = list(rejected)
    if not objects:
        raise ValueError("a rejection note needs at least one rejected object.")
    uids = [str(ds.SOPInstanceUID) for ds in objects]
    if len(set(uids)) != len(uids):
        raise ValueError("a rejected object is listed twice.")
    studies = {str(ds.StudyInstanceUID) for ds in objects}
    if len(studies) != 1:
        raise ValueError(f"the rejected objects span {len(studies)} studies; a rejection note covers one.")
    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("device", NODE_DEVICE_NAME),
            name=NODE_DEVICE_NAME,
            manufacturer_name=manufacturer,
        ),
    )
    content = hd.ko.KeyObjectSelection(
        document_title=REJECTED_FOR_QUALITY_REASONS,
        referenced_objects=objects,
        observer_device_context=observer,
        description=description,
    )
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=objects,
        content=content,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=manufacturer,
        series_description=series_description[:64],
        specific_character_set=_character_set(objects[0]),
    )
    logger.info("built rejection note %s for %d object(s)", sop_instance_uid, len(objects))
    return note


def _character_set(ds: Dataset) -> str | list[str] | None:
    value = ds.get("SpecificCharacterSet")
    if value is None or value == "" or (isinstance(value, list) and not any(value)):
        return None
    return value  # type: ignore[no-any-return]
