"""Synthetic CT phantom with analytic volumes, as valid DICOM CT Image Storage instances.

The phantom is an elliptic body cylinder of soft tissue (along the z axis, through every slice)
containing two ellipsoid lungs and a cylindrical spine, surrounded by air::

    from tests.phantom import PhantomGeometry, make_ct_phantom, phantom_truth, write_series

    geometry = PhantomGeometry(rows=224, columns=224, pixel_spacing_mm=(0.7, 0.7), slice_spacing_mm=2.5)
    datasets = make_ct_phantom(geometry=geometry, patient_name="CANARY^PATIENT")
    paths = write_series(datasets, tmp_path / "ct")
    truth = phantom_truth(geometry)          # analytic body/lungs/bone volumes and mean HU

Positions are in the DICOM patient coordinate system (LPS, mm), axial slices with
ImageOrientationPatient ``[1, 0, 0, 0, 1, 0]``, centred on x = y = 0 and on ``centre_z_mm``.
Each voxel takes the value of the structure containing its centre (no partial volume), so a
threshold anywhere between two structure values recovers the voxelised shapes exactly, and the
voxelised volumes differ from the analytic ones only by the discretisation of the boundaries
(well under 1 % for the default shapes at pixel sizes up to ~1.5 mm and slices up to ~7.5 mm).

Identity is deterministic: UIDs default to values derived from ``patient_id`` (``2.25.`` UUID-based,
PS3.5 B.2), so the same call builds byte-identical instances; pass explicit UIDs for distinct studies.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

AIR_HU = -1000


@dataclass(frozen=True)
class PhantomGeometry:
    """Image grid of the phantom.

    ``pixel_spacing_mm`` is DICOM PixelSpacing: (row spacing, column spacing).
    ``slice_thickness_mm`` defaults to the slice spacing (contiguous slices).
    """

    rows: int = 256
    columns: int = 256
    pixel_spacing_mm: tuple[float, float] = (1.2, 1.2)
    slice_spacing_mm: float = 5.0
    num_slices: int = 40
    slice_thickness_mm: float | None = None
    centre_z_mm: float = 0.0

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Spacing in array axis order (slice, row, column), as ``analyze_ct`` takes it."""
        return (self.slice_spacing_mm, self.pixel_spacing_mm[0], self.pixel_spacing_mm[1])

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (slices, rows, columns)."""
        return (self.num_slices, self.rows, self.columns)

    def first_position_mm(self) -> tuple[float, float, float]:
        """ImagePositionPatient of the first slice (centre of its top-left pixel)."""
        return (
            -(self.columns - 1) / 2 * self.pixel_spacing_mm[1],
            -(self.rows - 1) / 2 * self.pixel_spacing_mm[0],
            self.centre_z_mm - (self.num_slices - 1) / 2 * self.slice_spacing_mm,
        )


@dataclass(frozen=True)
class PhantomAnatomy:
    """Shapes (mm, LPS: +x patient left, +y posterior) and their CT numbers (HU)."""

    body_semi_axes_mm: tuple[float, float] = (140.0, 100.0)
    lung_semi_axes_mm: tuple[float, float, float] = (45.0, 55.0, 70.0)
    lung_centre_x_mm: float = 65.0  # lungs at x = -65 and x = +65
    lung_centre_y_mm: float = -10.0
    spine_radius_mm: float = 15.0
    spine_centre_y_mm: float = 65.0
    tissue_hu: int = 40
    lung_hu: int = -850
    bone_hu: int = 700

    def scaled(self, factor: float) -> PhantomAnatomy:
        """The same anatomy with every length multiplied by ``factor`` (HU unchanged)."""
        return replace(
            self,
            body_semi_axes_mm=(
                self.body_semi_axes_mm[0] * factor,
                self.body_semi_axes_mm[1] * factor,
            ),
            lung_semi_axes_mm=(
                self.lung_semi_axes_mm[0] * factor,
                self.lung_semi_axes_mm[1] * factor,
                self.lung_semi_axes_mm[2] * factor,
            ),
            lung_centre_x_mm=self.lung_centre_x_mm * factor,
            lung_centre_y_mm=self.lung_centre_y_mm * factor,
            spine_radius_mm=self.spine_radius_mm * factor,
            spine_centre_y_mm=self.spine_centre_y_mm * factor,
        )


@dataclass(frozen=True)
class PhantomTruth:
    """Analytic volumes (mL) and mean HU of the phantom's structures.

    ``body`` includes the lungs and the spine, like the analyzer's body mask.
    """

    body_ml: float
    lungs_ml: float
    bone_ml: float
    body_mean_hu: float
    lungs_mean_hu: float
    bone_mean_hu: float
    spacing_mm: tuple[float, float, float]


def phantom_truth(
    geometry: PhantomGeometry = PhantomGeometry(), anatomy: PhantomAnatomy = PhantomAnatomy()
) -> PhantomTruth:
    """Analytic volumes of ``anatomy`` on ``geometry`` (which fixes the body/spine length)."""
    _check_fits(geometry, anatomy)
    length_mm = geometry.num_slices * geometry.slice_spacing_mm
    ax, by = anatomy.body_semi_axes_mm
    la, lb, lc = anatomy.lung_semi_axes_mm
    body_ml = math.pi * ax * by * length_mm / 1000
    lungs_ml = 2 * 4 / 3 * math.pi * la * lb * lc / 1000
    bone_ml = math.pi * anatomy.spine_radius_mm**2 * length_mm / 1000
    tissue_ml = body_ml - lungs_ml - bone_ml
    body_mean_hu = (
        tissue_ml * anatomy.tissue_hu + lungs_ml * anatomy.lung_hu + bone_ml * anatomy.bone_hu
    ) / body_ml
    return PhantomTruth(
        body_ml=body_ml,
        lungs_ml=lungs_ml,
        bone_ml=bone_ml,
        body_mean_hu=body_mean_hu,
        lungs_mean_hu=float(anatomy.lung_hu),
        bone_mean_hu=float(anatomy.bone_hu),
        spacing_mm=geometry.spacing_mm,
    )


def make_ct_volume(
    geometry: PhantomGeometry = PhantomGeometry(),
    anatomy: PhantomAnatomy = PhantomAnatomy(),
    *,
    noise_hu_sd: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """The phantom in Hounsfield units, int16, shape (slices, rows, columns).

    ``noise_hu_sd`` adds Gaussian noise (seeded, so reproducible).
    """
    _check_fits(geometry, anatomy)
    x0, y0, z0 = geometry.first_position_mm()
    z = (z0 + np.arange(geometry.num_slices) * geometry.slice_spacing_mm)[:, None, None]
    y = (y0 + np.arange(geometry.rows) * geometry.pixel_spacing_mm[0])[None, :, None]
    x = (x0 + np.arange(geometry.columns) * geometry.pixel_spacing_mm[1])[None, None, :]

    hu = np.full(geometry.shape, AIR_HU, dtype=np.int16)
    ax, by = anatomy.body_semi_axes_mm
    body = (x / ax) ** 2 + (y / by) ** 2 <= 1.0
    hu[np.broadcast_to(body, hu.shape)] = anatomy.tissue_hu
    la, lb, lc = anatomy.lung_semi_axes_mm
    for centre_x in (-anatomy.lung_centre_x_mm, anatomy.lung_centre_x_mm):
        lung = (
            ((x - centre_x) / la) ** 2
            + ((y - anatomy.lung_centre_y_mm) / lb) ** 2
            + ((z - geometry.centre_z_mm) / lc) ** 2
        ) <= 1.0
        hu[lung] = anatomy.lung_hu
    spine = x**2 + (y - anatomy.spine_centre_y_mm) ** 2 <= anatomy.spine_radius_mm**2
    hu[np.broadcast_to(spine, hu.shape)] = anatomy.bone_hu
    if noise_hu_sd > 0:
        noise = np.random.default_rng(seed).normal(0.0, noise_hu_sd, size=hu.shape)
        hu = np.clip(np.rint(hu + noise), -1024, 3071).astype(np.int16)
    return hu


def make_ct_phantom(
    *,
    geometry: PhantomGeometry = PhantomGeometry(),
    anatomy: PhantomAnatomy = PhantomAnatomy(),
    patient_name: str = "Phantom^CT",
    patient_id: str = "MEDNODE-PHANTOM",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    accession_number: str = "",
    series_number: int = 1,
    pixel_representation: int = 0,
    rescale_slope: float = 1.0,
    rescale_intercept: float | None = None,
    noise_hu_sd: float = 0.0,
    seed: int = 0,
    hu: np.ndarray | None = None,
) -> list[Dataset]:
    """Build the phantom as one CT series (CT Image Storage, Explicit VR Little Endian).

    Parameters
    ----------
    pixel_representation
        0: unsigned stored values (``rescale_intercept`` defaults to -1024, air is stored as 24);
        1: signed stored values (``rescale_intercept`` defaults to 0, stored value = HU).
    rescale_slope, rescale_intercept
        HU = stored * slope + intercept (PS3.3 C.11.1.1.2); stored values must fit 16 bits.
    hu
        Pixels to store instead of the phantom's (shape ``geometry.shape``, HU), e.g. a phantom
        with an added lesion or an asymmetric test pattern; ``anatomy`` and noise are then ignored.

    Returns
    -------
    list of pydicom.Dataset
        One dataset per slice in ascending z, InstanceNumber 1..n, each with ``file_meta`` so it
        can be written with ``enforce_file_format=True`` or sent as is.

    Raises
    ------
    ValueError
        If the anatomy does not fit the grid or the stored values do not fit 16 bits.
    """
    if pixel_representation not in (0, 1):
        raise ValueError(
            f"pixel_representation must be 0 (unsigned) or 1 (signed), got {pixel_representation}"
        )
    if not rescale_slope > 0:
        raise ValueError(f"rescale_slope must be positive, got {rescale_slope}")
    intercept = (
        rescale_intercept
        if rescale_intercept is not None
        else (-1024.0 if pixel_representation == 0 else 0.0)
    )
    if hu is None:
        hu = make_ct_volume(geometry, anatomy, noise_hu_sd=noise_hu_sd, seed=seed)
    elif hu.shape != geometry.shape:
        raise ValueError(f"hu has shape {hu.shape}, the geometry {geometry.shape}")
    stored_float = np.rint((hu.astype(np.float64) - intercept) / rescale_slope)
    dtype = np.dtype(np.uint16 if pixel_representation == 0 else np.int16)
    limits = np.iinfo(dtype)
    if stored_float.min() < limits.min or stored_float.max() > limits.max:
        raise ValueError(
            f"stored values {stored_float.min():.0f}..{stored_float.max():.0f} do not fit {dtype}; "
            "change rescale_intercept/rescale_slope or pixel_representation"
        )
    stored = stored_float.astype(dtype)

    study_uid = study_instance_uid or _uid(patient_id, "study")
    series_uid = series_instance_uid or _uid(study_uid, "series", str(series_number))
    for_uid = frame_of_reference_uid or _uid(study_uid, "frame-of-reference")
    x0, y0, z0 = geometry.first_position_mm()
    thickness = geometry.slice_thickness_mm or geometry.slice_spacing_mm

    datasets = []
    for index in range(geometry.num_slices):
        sop_uid = _uid(series_uid, "instance", str(index))
        z = z0 + index * geometry.slice_spacing_mm

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "MEDNODE_PHANTOM"

        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = "20240102"
        ds.SeriesDate = "20240102"
        ds.AcquisitionDate = "20240102"
        ds.ContentDate = "20240102"
        ds.StudyTime = "093000"
        ds.SeriesTime = "093000"
        ds.AcquisitionTime = "093100"
        ds.ContentTime = "093100"
        ds.AccessionNumber = accession_number
        ds.Modality = "CT"
        ds.Manufacturer = "mednode"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Synthetic CT phantom"
        ds.SeriesDescription = "Phantom axial"
        ds.ManufacturerModelName = "ct-phantom"
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = _ds(thickness)
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(z)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(z)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = geometry.rows
        ds.Columns = geometry.columns
        ds.PixelSpacing = [_ds(geometry.pixel_spacing_mm[0]), _ds(geometry.pixel_spacing_mm[1])]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = pixel_representation
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleSlope = _ds(rescale_slope)
        ds.RescaleType = "HU"
        ds.add_new(0x7FE00010, "OW", stored[index].tobytes())
        datasets.append(ds)
    return datasets


def write_series(datasets: Sequence[Dataset], directory: Path) -> list[Path]:
    """Write each dataset as a DICOM Part 10 file ``directory/NNNN.dcm`` (by InstanceNumber)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for position, ds in enumerate(datasets, start=1):
        number = int(ds.get("InstanceNumber", position))
        path = directory / f"{number:04d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def hu_from_datasets(datasets: Sequence[Dataset]) -> np.ndarray:
    """HU volume (slices, rows, columns) of ``datasets`` sorted by ImagePositionPatient z.

    A reference decoder for tests of the phantom itself; product code reads series via ``dicom_io``.
    """
    ordered = sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
    return np.stack(
        [
            ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            for ds in ordered
        ]
    )


_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:mednode:tests:ct-phantom")


def _uid(*parts: str) -> str:
    """Deterministic ``2.25.`` UID (PS3.5 B.2) from a UUID5 of ``parts``."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(parts)).int}"


def _ds(value: float) -> str:
    """Format a number as a DICOM Decimal String (at most 16 characters)."""
    text = f"{value:.6g}"
    if len(text) > 16:
        raise ValueError(f"{value} cannot be written as a 16-character Decimal String")
    return text


def _check_fits(geometry: PhantomGeometry, anatomy: PhantomAnatomy) -> None:
    """Raise ValueError unless every structure lies inside its container with a margin."""
    if geometry.num_slices < 1 or geometry.rows < 1 or geometry.columns < 1:
        raise ValueError(f"the grid must not be empty: {geometry.shape}")
    if geometry.slice_spacing_mm <= 0 or min(geometry.pixel_spacing_mm) <= 0:
        raise ValueError(f"spacings must be positive: {geometry.spacing_mm}")
    ax, by = anatomy.body_semi_axes_mm
    half_width = (geometry.columns - 1) / 2 * geometry.pixel_spacing_mm[1]
    half_height = (geometry.rows - 1) / 2 * geometry.pixel_spacing_mm[0]
    if (
        ax + 2 * geometry.pixel_spacing_mm[1] > half_width
        or by + 2 * geometry.pixel_spacing_mm[0] > half_height
    ):
        raise ValueError(
            f"body semi-axes {anatomy.body_semi_axes_mm} mm need a field of view wider than "
            f"{2 * half_width:.1f} x {2 * half_height:.1f} mm (keep 2 pixels of air around it)"
        )
    la, lb, lc = anatomy.lung_semi_axes_mm
    half_length = (geometry.num_slices - 1) / 2 * geometry.slice_spacing_mm
    if lc + geometry.slice_spacing_mm > half_length:
        raise ValueError(
            f"lungs ({2 * lc:.0f} mm long) do not fit with a slice of margin in the "
            f"{2 * half_length:.0f} mm between the first and last slice; add slices"
        )
    if anatomy.lung_centre_x_mm <= la:
        raise ValueError("the lungs overlap: lung_centre_x_mm must exceed the lung x semi-axis")
    angles = np.linspace(0.0, 2 * np.pi, 720, endpoint=False)
    lung_x = anatomy.lung_centre_x_mm + la * np.cos(angles)
    lung_y = anatomy.lung_centre_y_mm + lb * np.sin(angles)
    if ((lung_x / ax) ** 2 + (lung_y / by) ** 2).max() >= 0.95:
        raise ValueError("the lungs reach the body surface: make them smaller or the body larger")
    spine_x = anatomy.spine_radius_mm * np.cos(angles)
    spine_y = anatomy.spine_centre_y_mm + anatomy.spine_radius_mm * np.sin(angles)
    if ((spine_x / ax) ** 2 + (spine_y / by) ** 2).max() >= 0.95:
        raise ValueError("the spine reaches the body surface")
    if (
        ((np.abs(spine_x) - anatomy.lung_centre_x_mm) / la) ** 2
        + ((spine_y - anatomy.lung_centre_y_mm) / lb) ** 2
    ).min() <= 1.0:
        raise ValueError("the spine touches a lung")
