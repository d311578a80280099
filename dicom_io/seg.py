"""DICOM Segmentation (SEG) of a volume's structure masks, written with highdicom."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TypedDict

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dicom_io.codes import ARTIFICIAL_INTELLIGENCE
from dicom_io.equipment import IHE_CODING_SCHEME, AlgorithmInfo, add_contributing_equipment
from dicom_io.packed_mask import PackedMask
from dicom_io.slice_stack import frame_plane, number_of_frames
from dicom_io.source_header import character_set_of, conform_copied_attributes
from dicom_io.sr_common import structure_for
from dicom_io.uids import derived_uid
from dicom_io.volume import Volume

logger = logging.getLogger(__name__)

#: Frames at a time in the overlap check.
_SLAB_FRAMES = 32
#: A plane and a source frame this close are at one position (highdicom's own tolerance).
_SAME_POSITION_MM = 1e-3


class _PackedStack:
    """The (frames, rows, columns, segments) boolean array highdicom takes, made one frame at a
    time from packed masks when highdicom reads that frame.

    The whole array would hold one byte a voxel and segment (786 MB for three segments of a
    1,000-slice 512² CT) for the length of the SEG build, the largest allocation of the CT job;
    a frame is 0.8 MB. highdicom 0.28 reads the array only through ``ndim``, ``shape``, ``dtype``
    and ``array[frame]``, apart from two checks :class:`_Segmentation` answers from the packed
    bits (empty frames, overlapping segments). Each frame is laid out segment by segment, so a
    segment's frame, which highdicom encodes, is contiguous.
    """

    ndim = 4
    dtype = np.dtype(np.bool_)

    def __init__(self, masks: list[PackedMask]) -> None:
        self.masks = masks
        self.shape = (*masks[0].shape, len(masks))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, frame: int) -> _PackedPlane:
        if not isinstance(frame, int | np.integer):
            raise TypeError(f"masks are read one frame at a time, got index {frame!r}")
        return _PackedPlane(self, int(frame))

    def nonempty_frames(self) -> list[int]:
        """Frames where any segment has a voxel, ascending."""
        frames = self.shape[0]
        present = np.zeros(frames, dtype=bool)
        for mask in self.masks:
            present |= mask.bits.reshape(frames, -1).any(axis=1)
        return [int(i) for i in np.flatnonzero(present)]

    def overlap(self) -> bool:
        """Whether some voxel is in more than one segment."""
        for first in range(len(self.masks)):
            for second in range(first + 1, len(self.masks)):
                a, b = self.masks[first].bits, self.masks[second].bits
                for start in range(0, self.shape[0], _SLAB_FRAMES):
                    if np.bitwise_and(a[start : start + _SLAB_FRAMES], b[start : start + _SLAB_FRAMES]).any():
                        return True
        return False


class _PackedPlane:
    """Frame ``frame`` of a :class:`_PackedStack`, (rows, columns, segments): highdicom 0.28 reads
    a frame once per segment and keeps only that segment's plane
    (:meth:`_Segmentation._get_segment_pixel_array`), which is then the only one unpacked."""

    ndim = 3
    dtype = np.dtype(np.bool_)

    def __init__(self, stack: _PackedStack, frame: int) -> None:
        self.stack = stack
        self.frame = frame
        self.shape = stack.shape[1:]

    def segment(self, index: int) -> np.ndarray:
        """Segment ``index``'s plane (0-based), one byte a pixel, 0 or 1."""
        bits = self.stack.masks[index].bits[self.frame]
        return np.unpackbits(bits, axis=-1, count=self.shape[1])

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        planes = np.stack([self.segment(i).view(np.bool_) for i in range(self.shape[2])], axis=-1)
        return planes if dtype is None else planes.astype(dtype)


class _Segmentation(hd.seg.Segmentation):
    """highdicom's Segmentation, built from a :class:`_PackedStack` of masks.

    It answers highdicom's two whole-array checks from the packed bits, with highdicom's own
    answers: whether the segments overlap (highdicom 0.28 sums the array over the segments axis
    into an int64 array of 8 bytes a voxel: 2.1 GB for a 1,000-slice 512² CT) and which frames
    are empty. It also references the source frames of an enhanced series of several instances
    (:meth:`_match_planes`). The version range of highdicom in setup.cfg pins the private methods
    this overrides; tests compare its SEG with highdicom's own built from the dense array.
    """

    @classmethod
    def _check_and_cast_pixel_array(  # type: ignore[override]
        cls,
        pixel_array: np.ndarray | hd.Volume | _PackedStack,
        segment_numbers: np.ndarray,
        segmentation_type: hd.seg.SegmentationTypeValues,
        dtype: type,
    ) -> tuple[np.ndarray | hd.Volume | _PackedStack, hd.seg.SegmentsOverlapValues]:
        if not isinstance(pixel_array, _PackedStack):
            return super()._check_and_cast_pixel_array(  # type: ignore[no-any-return]
                pixel_array, segment_numbers, segmentation_type, dtype
            )
        if segmentation_type != hd.seg.SegmentationTypeValues.BINARY:
            raise ValueError("packed masks make BINARY segmentations only")
        if pixel_array.shape[-1] != len(segment_numbers):
            raise ValueError(
                f"The number of segments in last dimension of the pixel array "
                f"({pixel_array.shape[-1]}) does not match the number of described segments "
                f"({len(segment_numbers)})."
            )
        overlap = pixel_array.overlap()
        return pixel_array, (hd.seg.SegmentsOverlapValues.YES if overlap else hd.seg.SegmentsOverlapValues.NO)

    @staticmethod
    def _get_segment_pixel_array(  # type: ignore[override]
        pixel_array: np.ndarray | _PackedPlane,
        segment_number: int,
        described_segment_numbers: np.ndarray,
        segmentation_type: hd.seg.SegmentationTypeValues,
        max_fractional_value: int,
        dtype: type,
    ) -> np.ndarray:
        if not isinstance(pixel_array, _PackedPlane):
            return hd.seg.Segmentation._get_segment_pixel_array(  # type: ignore[no-any-return]
                pixel_array, segment_number, described_segment_numbers, segmentation_type,
                max_fractional_value, dtype,
            )
        plane = pixel_array.segment(segment_number - 1)  # uint8, as highdicom casts a binary plane
        return plane if plane.dtype == np.dtype(dtype) else plane.astype(dtype)

    @staticmethod
    def _match_planes(  # type: ignore[override]
        source_plane_orientation: Sequence[float],
        plane_position_values: np.ndarray,
        source_images: Sequence[Dataset],
        all_but_positions_preserved: bool,
    ) -> tuple[list[list[Dataset]] | None, bool]:
        """highdicom's matching of the planes to the frames of one source image, also for a
        multi-frame source holding only some of the planes (an enhanced series of several
        instances: highdicom 0.28 references the frames of an instance only when it holds every
        plane). Each plane then gets the frame at its position, of whichever instance has it
        (highdicom adds up the items of ``source_images`` and ``further_source_images``)."""
        items, preserved = hd.seg.Segmentation._match_planes(
            source_plane_orientation, plane_position_values, source_images, all_but_positions_preserved
        )
        source = source_images[0]
        if (items is not None or len(source_images) != 1 or not all_but_positions_preserved
                or "PerFrameFunctionalGroupsSequence" not in source):
            return items, preserved
        positions = [frame_plane(source, f)[1] for f in range(number_of_frames(source))]
        if any(p is None for p in positions):
            return items, preserved
        distances = np.linalg.norm(
            np.asarray(plane_position_values, dtype=float)[:, None, :] - np.asarray(positions, dtype=float)[None],
            axis=-1,
        )
        nearest = distances.argmin(axis=1)
        matched = distances[np.arange(len(nearest)), nearest] < _SAME_POSITION_MM
        if not matched.any():
            return None, False
        # False: the planes are not all this image's, so highdicom keeps the positions given
        return [
            [hd.image._Image._get_derivation_source_image_item(source, int(frame) + 1, True)] if found else []
            for frame, found in zip(nearest, matched, strict=True)
        ], False

    @staticmethod
    def _get_nonempty_plane_indices(pixel_array: np.ndarray | _PackedStack) -> tuple[list[int], bool]:
        if not isinstance(pixel_array, _PackedStack):
            return hd.seg.Segmentation._get_nonempty_plane_indices(pixel_array)  # type: ignore[no-any-return]
        frames = pixel_array.nonempty_frames()
        if not frames:  # highdicom then keeps every frame (a SEG needs one)
            logger.warning("all segments are empty: the SEG keeps every frame")
            return list(range(pixel_array.shape[0])), True
        return frames, False


class _SourceArguments(TypedDict, total=False):
    source_images: Sequence[Dataset]
    further_source_images: Sequence[Dataset] | None
    plane_positions: Sequence[hd.PlanePositionSequence] | None
    plane_orientation: hd.PlaneOrientationSequence | None
    pixel_measures: hd.PixelMeasuresSequence | None


def _source_arguments(volume: Volume, sources: list[Dataset]) -> _SourceArguments:
    """highdicom's source arguments for the SEG of ``volume``, whose datasets are ``sources``.

    A single-frame series: its images, in the volume's order (highdicom takes each plane's
    position from its image). A multi-frame series: highdicom takes one multi-frame source image
    and, without plane positions, maps plane ``i`` to its frame ``i + 1``, which is not the volume's
    order when the frames are not stored along the normal; so the volume's planes are given with
    their frames' own positions and highdicom matches each to its source frame (Derivation Image
    Sequence with the Referenced Frame Number, PS3.3 C.7.6.16.2.6). The instances after the first
    of a series of several go to ``further_source_images``, matched frame by frame the same way.
    """
    if not volume.is_multi_frame:
        return {"source_images": sources}
    positions = []
    for index in range(volume.shape[0]):
        instance, frame_number = volume.source_frames[index]
        _, position = frame_plane(sources[instance], frame_number - 1)
        assert position is not None, "load_volume refuses frames without a position"
        positions.append(hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, position))
    return {
        "source_images": sources[:1],
        "further_source_images": sources[1:] or None,
        "plane_positions": positions,
        "plane_orientation": hd.PlaneOrientationSequence(hd.CoordinateSystemNames.PATIENT,
                                                         volume.image_orientation),
        "pixel_measures": hd.PixelMeasuresSequence(
            pixel_spacing=volume.spacing_mm[1:], slice_thickness=volume.spacing_mm[0],
            spacing_between_slices=volume.spacing_mm[0]),
    }


def algorithm_identification(algorithm: AlgorithmInfo) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification Sequence (PS3.3 C.8.20.2) of ``algorithm``."""
    parameters = {"family": algorithm.family} if algorithm.family else None
    return hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=ARTIFICIAL_INTELLIGENCE,
        version=algorithm.version,
        source=algorithm.manufacturer,
        parameters=parameters,
    )


def ihe_coding_scheme() -> hd.coding_schemes.CodingSchemeIdentificationItem:
    """Declaration of the 99IHE scheme used by the Contributing Equipment purpose code."""
    return hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=IHE_CODING_SCHEME, name="IHE Technical Frameworks"
    )


def build_segmentation(
    volume: Volume,
    masks: Mapping[str, np.ndarray | PackedMask],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    algorithm: AlgorithmInfo,
    series_description: str = "mednode segmentation",
) -> hd.seg.Segmentation:
    """Build a BINARY SEG with one segment per mask, on the source series' grid.

    Parameters
    ----------
    volume
        Source volume; its ``datasets`` are the source images, in ``pixels`` order.
    masks
        Key (a :data:`dicom_io.codes.STRUCTURES` key) to a boolean array, or a
        :class:`~dicom_io.packed_mask.PackedMask`, of the volume's shape (``volume.shape``: its
        pixels may be released already). Segment numbers follow the mapping order, starting at 1.
    series_instance_uid, sop_instance_uid, series_number
        Identity of the new instance (derive them from the job for reproducibility).
    algorithm
        The model that made the masks (segment Algorithm Identification, equipment).
    series_description
        Series Description of the new series.

    Returns
    -------
    highdicom.seg.Segmentation
        In the source study, Segment Algorithm Type AUTOMATIC, empty frames omitted
        (highdicom references each kept frame's source image and plane position, so
        the omission is consistent), with an IHE AIR Contributing Equipment item. A
        patient or study attribute missing or invalid in the sources is left empty
        (:func:`dicom_io.source_header.conform_copied_attributes`).

    Raises
    ------
    ValueError
        If ``masks`` is empty, a key is not a known structure, or a mask's shape
        differs from the volume's.
    """
    if not masks:
        raise ValueError("build_segmentation needs at least one mask.")
    for key, mask in masks.items():
        if tuple(mask.shape) != tuple(volume.shape):
            raise ValueError(
                f"mask {key!r} has shape {tuple(mask.shape)}, the volume {tuple(volume.shape)}: "
                "resample masks onto the source grid first."
            )
    # (frames, rows, columns, segments) as highdicom takes it, made a frame at a time from the
    # packed masks as highdicom encodes it: no array of one byte a voxel and segment
    pixel_array = _PackedStack(
        [mask if isinstance(mask, PackedMask) else PackedMask.from_array(np.asarray(mask, dtype=bool))
         for mask in masks.values()]
    )

    identification = algorithm_identification(algorithm)
    descriptions = []
    for number, key in enumerate(masks, start=1):
        structure = structure_for(key)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=structure.label,
                segmented_property_category=structure.category,
                segmented_property_type=structure.type,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=identification,
                tracking_uid=derived_uid(sop_instance_uid, "segment", key),
                tracking_id=structure.label,
            )
        )

    # patient and study attributes highdicom copies: a missing or invalid one is left empty
    sources = conform_copied_attributes(volume.datasets, purpose=f"SEG {sop_instance_uid}")
    seg = _Segmentation(
        **_source_arguments(volume, sources),
        pixel_array=pixel_array,  # type: ignore[arg-type]
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=algorithm.manufacturer,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        device_serial_number=algorithm.device_uid,
        series_description=series_description,
        content_label="SEGMENTATION",
        content_description=f"{algorithm.name} {algorithm.version}"[:64],
        omit_empty_frames=True,
        specific_character_set=character_set_of(sources[0]),
        coding_schemes=[ihe_coding_scheme()],
    )
    add_contributing_equipment(seg, algorithm)
    logger.info(
        "built SEG %s for series %s: %d segment(s), %d frame(s)",
        sop_instance_uid,
        volume.series_instance_uid,
        len(descriptions),
        int(seg.NumberOfFrames),
    )
    return seg
