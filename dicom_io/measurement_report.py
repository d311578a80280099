"""TID 1500 Measurement Report of structure volumes measured on a SEG."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicom_io.codes import (
    ATTENUATION_COEFFICIENT,
    HOUNSFIELD_UNIT,
    MEAN,
    MILLILITER,
    VOLUME,
    procedure_for_modality,
)
from dicom_io.equipment import AlgorithmInfo
from dicom_io.seg import ihe_coding_scheme
from dicom_io.source_header import character_set_of
from dicom_io.sr_common import (
    InstanceReference,
    device_observation_context,
    image_library_sources,
    mednode_sr,
    sr_algorithm_id,
    structure_for,
    versioned_description,
)
from dicom_io.uids import derived_uid
from dicom_io.volume import Volume

logger = logging.getLogger(__name__)

#: Above this many source images a segment is referenced by its source series.
MAX_LISTED_SOURCE_IMAGES = 32
_SEGMENTATION_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")


@dataclass(frozen=True)
class StructureMeasurement:
    """Measurements of one segmented structure.

    Attributes
    ----------
    label
        A :data:`dicom_io.codes.STRUCTURES` key (e.g. ``"lungs"``).
    segment_number
        Number of the structure's segment in the SEG.
    volume_ml
        Volume in millilitres.
    mean_hu
        Mean attenuation in HU; NaN leaves it out (e.g. for MR).
    """

    label: str
    segment_number: int
    volume_ml: float
    mean_hu: float


def referenced_segment(segmentation: Dataset, segment_number: int) -> hd.sr.ReferencedSegment:
    """Reference one segment of a SEG, with the source images of its frames (and, for a
    multi-frame source, the numbers of those frames: PS3.3 C.18.3 Referenced Frame Number).

    ``hd.sr.ReferencedSegment.from_segmentation`` fails on a single-segment SEG in
    highdicom 0.28 (its segment identification sits in the shared functional groups),
    hence the reference is built here from the functional groups.

    Raises
    ------
    ValueError
        If ``segmentation`` is not a SEG or has no segment ``segment_number``.
    """
    if segmentation.SOPClassUID not in _SEGMENTATION_SOP_CLASSES:
        raise ValueError(f"instance {segmentation.SOPInstanceUID} is not a Segmentation.")
    shared = segmentation.SharedFunctionalGroupsSequence[0]
    # UID → SOP Class UID; the highdicom items are made only if they are listed (making 600 of
    # them for a 300-slice SEG took ~0.35 s, to be dropped for the source series)
    source_images: dict[str, str] = {}
    # UID → the frames referenced of a multi-frame source (an enhanced CT/MR)
    source_frames: dict[str, set[int]] = {}
    for item in segmentation.PerFrameFunctionalGroupsSequence:
        # A single-segment SEG carries the segment identification in the shared groups.
        identification = item.get("SegmentIdentificationSequence") or shared.get(
            "SegmentIdentificationSequence"
        )
        if int(identification[0].ReferencedSegmentNumber) != segment_number:
            continue
        for derivation in item.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                uid = str(source.ReferencedSOPInstanceUID)
                if uid not in source_images:
                    source_images[uid] = str(source.ReferencedSOPClassUID)
                if source.get("ReferencedFrameNumber") is not None:
                    numbers = source.ReferencedFrameNumber
                    source_frames.setdefault(uid, set()).update(
                        int(n) for n in (numbers if isinstance(numbers, MultiValue) else [numbers]))
    if source_images and len(source_images) <= MAX_LISTED_SOURCE_IMAGES:
        return hd.sr.ReferencedSegment(
            sop_class_uid=str(segmentation.SOPClassUID),
            sop_instance_uid=str(segmentation.SOPInstanceUID),
            segment_number=segment_number,
            source_images=[
                hd.sr.SourceImageForSegmentation(
                    referenced_sop_class_uid=sop_class_uid, referenced_sop_instance_uid=uid,
                    referenced_frame_numbers=sorted(source_frames[uid]) if uid in source_frames else None)
                for uid, sop_class_uid in source_images.items()
            ],
        )
    if not source_images:
        numbers = [int(s.SegmentNumber) for s in segmentation.SegmentSequence]
        if segment_number not in numbers:
            raise ValueError(
                f"segment {segment_number} is not in SEG {segmentation.SOPInstanceUID} "
                f"(segments {numbers})."
            )
    # An empty segment has no frame, hence no source image; a segment over many slices is
    # referenced by its source series (TID 1411 row 15) instead of hundreds of image items,
    # which would make the SR slow to build and to read (the SEG lists its frames' sources).
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(segmentation.SOPClassUID),
        sop_instance_uid=str(segmentation.SOPInstanceUID),
        segment_number=segment_number,
        source_series=hd.sr.SourceSeriesForSegmentation(
            str(segmentation.ReferencedSeriesSequence[0].SeriesInstanceUID)
        ),
    )


def build_volume_report(
    volume: Volume,
    segmentation: hd.seg.Segmentation,
    measurements: Sequence[StructureMeasurement],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    algorithm: AlgorithmInfo,
    previous_versions: Sequence[InstanceReference] = (),
    version: int | None = None,
) -> hd.sr.ComprehensiveSR:
    """Build a TID 1500 report with one volumetric group per measured structure.

    Each group (TID 1411) has a Tracking Identifier and UID, the structure as
    finding type and finding site, a reference to its SEG segment and the source
    images of that segment, Volume (mL) and, when finite, the mean attenuation (HU).
    The observer is the algorithm as a device; Verification Flag is UNVERIFIED.
    ``previous_versions`` (the SRs this one replaces) go to the Predecessor Documents
    Sequence and ``version`` (``None`` for a first version) to the Series Description.

    Raises
    ------
    ValueError
        If ``measurements`` is empty, a label is not a known structure, a segment
        number is absent from ``segmentation``, or the SEG is not of ``volume``'s study.
    """
    if not measurements:
        raise ValueError("build_volume_report needs at least one measurement.")
    source = volume.datasets[0]
    if segmentation.StudyInstanceUID != source.StudyInstanceUID:
        raise ValueError("the SEG belongs to another study than the volume.")
    algorithm_id = sr_algorithm_id(algorithm)
    groups = []
    referenced_uids: set[str] = set()
    for measurement in measurements:
        structure = structure_for(measurement.label)
        items = [hd.sr.Measurement(name=VOLUME, value=measurement.volume_ml, unit=MILLILITER)]
        if math.isfinite(measurement.mean_hu):
            items.append(
                hd.sr.Measurement(
                    name=ATTENUATION_COEFFICIENT,
                    value=measurement.mean_hu,
                    unit=HOUNSFIELD_UNIT,
                    derivation=MEAN,
                )
            )
        segment_reference = referenced_segment(segmentation, measurement.segment_number)
        referenced_uids.update(
            str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for item in segment_reference[1:]
            if "ReferencedSOPSequence" in item
        )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derived_uid(sop_instance_uid, "group", measurement.label),
                    identifier=structure.label,
                ),
                referenced_segment=segment_reference,
                finding_type=structure.type,
                finding_sites=[hd.sr.FindingSite(anatomic_location=structure.type)],
                algorithm_id=algorithm_id,
                measurements=items,
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=device_observation_context(algorithm),
        procedure_reported=procedure_for_modality(volume.modality),
        imaging_measurements=groups,
        # TID 1601 image library: only the images the groups refer to (a CT may have 1000s).
        referenced_images=image_library_sources(
            ds for ds in volume.datasets if str(ds.SOPInstanceUID) in referenced_uids
        ),
    )
    sr = mednode_sr(
        evidence=[*volume.datasets, segmentation],
        content=report,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        series_number=series_number,
        series_description=versioned_description("mednode measurements", version),
        previous_versions=previous_versions,
        algorithm=algorithm,
        specific_character_set=character_set_of(source),
        coding_schemes=[ihe_coding_scheme()],
    )
    logger.info(
        "built measurement SR %s for SEG %s: %d group(s)",
        sop_instance_uid,
        segmentation.SOPInstanceUID,
        len(groups),
    )
    return sr
