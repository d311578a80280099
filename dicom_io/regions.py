"""TID 1500 report of image-anchored results from a generalist model (boxes, labels).

Boxes are written as closed 5-point POLYLINEs (SCOORD has no rectangle) in one
``PlanarROIMeasurementsAndQualitativeEvaluations`` group each, which OHIF draws as a
rectangle labelled with its finding site and NUM items.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dicom_io.codes import (
    ABSENT,
    COMMENT,
    NO_UNITS,
    PRESENT,
    PROBABILITY,
    UNCERTAIN,
    procedure_for_modality,
)
from dicom_io.equipment import AlgorithmInfo
from dicom_io.seg import ihe_coding_scheme
from dicom_io.sr_common import (
    InstanceReference,
    character_set_for_text,
    clean_text,
    coded_term,
    device_observation_context,
    image_library_sources,
    language_concept,
    mednode_coding_scheme,
    mednode_sr,
    sr_algorithm_id,
    versioned_description,
)
from dicom_io.uids import derived_uid

logger = logging.getLogger(__name__)

LabelState = Literal["present", "absent", "uncertain"]
_STATE_CODES = {"present": PRESENT, "absent": ABSENT, "uncertain": UNCERTAIN}


@dataclass(frozen=True)
class ImageRegion:
    """A box on one source image with what the model found there.

    Attributes
    ----------
    sop_instance_uid
        The source image the box is on.
    frame_number
        1-based frame of a multi-frame source; ``None`` (or 1) for single-frame.
    box_xyxy
        ``(x0, y0, x1, y1)`` in DICOM pixel coordinates, highdicom convention:
        ``(0, 0)`` is the top-left corner of the top-left pixel, x runs along a row
        (columns), y down the columns (rows); ``x0 < x1 <= Columns``, ``y0 < y1 <= Rows``.
    finding
        What was found (e.g. ``"nodule"``); coded in SNOMED CT when known.
    finding_site
        Where (e.g. ``"right lung"``), or ``None``.
    probability
        Model probability in [0, 1], or ``None``.
    text
        Free text tied to the region (a caption or grounded sentence), or ``None``.
    """

    sop_instance_uid: str
    frame_number: int | None
    box_xyxy: tuple[float, float, float, float]
    finding: str
    finding_site: str | None = None
    probability: float | None = None
    text: str | None = None


@dataclass(frozen=True)
class ImageLabel:
    """An image-level label (classification or yes/no answer)."""

    name: str
    state: LabelState
    probability: float | None = None


def _check_probability(value: float | None, what: str) -> None:
    if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{what} has probability {value}; it must lie in [0, 1].")


def _probability(value: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=PROBABILITY, value=float(value), unit=NO_UNITS)


def _frames_of(ds: Dataset) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def _region_group(
    index: int,
    region: ImageRegion,
    source: Dataset,
    sop_instance_uid: str,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    what = f"region {index} on {region.sop_instance_uid}"
    x0, y0, x1, y1 = (float(v) for v in region.box_xyxy)
    rows, columns = int(source.Rows), int(source.Columns)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"{what} has a non-finite box {region.box_xyxy}.")
    if not (0 <= x0 < x1 <= columns and 0 <= y0 < y1 <= rows):
        raise ValueError(
            f"{what} has box {region.box_xyxy} outside the {columns}x{rows} (columns x rows) "
            "image or with x0 >= x1 / y0 >= y1: clip boxes to the image first."
        )
    _check_probability(region.probability, what)
    frames = _frames_of(source)
    frame_number = region.frame_number
    if frames > 1:
        if frame_number is None or not 1 <= frame_number <= frames:
            raise ValueError(
                f"{what}: the source has {frames} frames; give frame_number 1..{frames}."
            )
        frame_numbers: list[int] | None = [frame_number]
    else:
        if frame_number not in (None, 1):
            raise ValueError(
                f"{what}: the source is single-frame, frame_number {frame_number} is invalid."
            )
        frame_numbers = None

    polyline = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=float)
    image_region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=polyline,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=str(source.SOPClassUID),
            referenced_sop_instance_uid=str(source.SOPInstanceUID),
            referenced_frame_numbers=frame_numbers,
        ),
    )
    finding_sites = (
        [hd.sr.FindingSite(anatomic_location=coded_term(region.finding_site))]
        if region.finding_site
        else None
    )
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(sop_instance_uid, "region", str(index)),
            identifier=f"Region {index}",
        ),
        referenced_region=image_region,
        finding_type=coded_term(region.finding),
        finding_sites=finding_sites,
        algorithm_id=algorithm_id,
        measurements=[_probability(region.probability)] if region.probability is not None else None,
    )
    if region.text and clean_text(region.text).strip():
        # A TEXT "Comment" in the group round-trips through srread and passes dciodvfy.
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=COMMENT,
                value=clean_text(region.text),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    return group


def _label_group(
    index: int,
    label: ImageLabel,
    sources: Sequence[Dataset],
    sop_instance_uid: str,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    if label.state not in _STATE_CODES:
        raise ValueError(
            f"label {label.name!r} has state {label.state!r}; use one of {sorted(_STATE_CODES)}."
        )
    _check_probability(label.probability, f"label {label.name!r}")
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(sop_instance_uid, "label", str(index)),
            identifier=f"Label {index}",
        ),
        algorithm_id=algorithm_id,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=coded_term(label.name), value=_STATE_CODES[label.state]
            )
        ],
        measurements=[_probability(label.probability)] if label.probability is not None else None,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources
        ],
    )


def viewer_geometry_problem(ds: Dataset) -> str | None:
    """Why viewers may fail to draw regions on ``ds`` (e.g. OHIF with Pixel Spacing ``0\\0``), or None."""
    spacing = ds.get("PixelSpacing")
    try:
        if spacing is not None and any(float(v) <= 0 for v in spacing):
            return (f"source image {ds.SOPInstanceUID} has Pixel Spacing {list(spacing)}: viewers such "
                    "as OHIF show it black and cannot place the boxes on it (the SR itself is valid)")
    except (TypeError, ValueError):
        return f"source image {ds.SOPInstanceUID} has an unreadable Pixel Spacing"
    return None


def build_region_report(
    source_datasets: Sequence[Dataset],
    regions: Sequence[ImageRegion],
    labels: Sequence[ImageLabel],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    algorithm: AlgorithmInfo,
    previous_versions: Sequence[InstanceReference] = (),
    version: int | None = None,
    language: str = "en",
) -> hd.sr.ComprehensiveSR:
    """Build a TID 1500 Comprehensive SR of regions and labels on the source images.

    Parameters
    ----------
    source_datasets
        The images the model saw (headers suffice), all of one study.
    regions
        One planar ROI group each: a closed POLYLINE box, finding type, finding site,
        Probability NUM when known and a TEXT Comment (DCM 121106) when given.
    labels
        One group each with a qualitative evaluation (name: Present/Absent/Uncertain)
        and a Probability NUM when known.
    series_instance_uid, sop_instance_uid, series_number
        Identity of the new instance.
    algorithm
        The model; it is the device observer and the algorithm of every group.
    language
        RFC 5646 tag of the free text (language content item). Non-ASCII text makes
        the object UTF-8 (``ISO_IR 192``).
    previous_versions
        The SRs this one replaces (same slot, earlier version of the study's results):
        written in the Predecessor Documents Sequence.
    version
        Result version shown in the Series Description (``"… v2"``); ``None`` for a first
        version, which keeps the plain description.

    Returns
    -------
    highdicom.sr.ComprehensiveSR
        Verification Flag UNVERIFIED, in the source study. The TID 1601 image library
        is left out when a source lacks what it needs (e.g. a CR without Imager Pixel
        Spacing).

    Raises
    ------
    ValueError
        If there are no sources, sources span studies, there is neither a region nor
        a label, a region names an image not among the sources, a box lies outside its
        image, a frame number is invalid, a probability lies outside [0, 1], or a label
        state is unknown.
    """
    sources = list(source_datasets)
    if not sources:
        raise ValueError("build_region_report needs at least one source dataset.")
    studies = {str(ds.StudyInstanceUID) for ds in sources}
    if len(studies) != 1:
        raise ValueError(f"sources span {len(studies)} studies; a report belongs to one study.")
    if not regions and not labels:
        raise ValueError("build_region_report needs at least one region or label.")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    for ds in sources:
        problem = viewer_geometry_problem(ds)
        if problem:
            logger.warning("%s", problem)  # UIDs and geometry only

    algorithm_id = sr_algorithm_id(algorithm)
    groups: list[
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    for index, region in enumerate(regions, start=1):
        source = by_uid.get(region.sop_instance_uid)
        if source is None:
            raise ValueError(
                f"region {index} is on {region.sop_instance_uid}, which is not among the sources."
            )
        groups.append(_region_group(index, region, source, sop_instance_uid, algorithm_id))
    for index, label in enumerate(labels, start=1):
        groups.append(_label_group(index, label, sources, sop_instance_uid, algorithm_id))

    report = hd.sr.MeasurementReport(
        observation_context=device_observation_context(algorithm),
        procedure_reported=procedure_for_modality(str(sources[0].get("Modality", ""))),
        imaging_measurements=groups,
        language_of_content_item_and_descendants=hd.sr.LanguageOfContentItemAndDescendants(
            language=language_concept(language)
        ),
        referenced_images=image_library_sources(sources),
    )
    texts = [
        text
        for region in regions
        for text in (region.finding, region.finding_site, region.text)
        if text
    ] + [label.name for label in labels]
    sr = mednode_sr(
        evidence=sources,
        content=report,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        series_number=series_number,
        series_description=versioned_description("mednode findings", version),
        previous_versions=previous_versions,
        algorithm=algorithm,
        specific_character_set=character_set_for_text(sources[0], texts),
        coding_schemes=[ihe_coding_scheme(), mednode_coding_scheme()],
    )
    logger.info(
        "built region SR %s: %d region(s), %d label(s)", sop_instance_uid, len(regions), len(labels)
    )
    return sr
