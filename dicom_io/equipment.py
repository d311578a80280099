"""The algorithm that made a result, as DICOM equipment (IHE AI Results profile)."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from dicom_io.uids import derived_uid

#: Manufacturer of every object mednode writes (General Equipment, Contributing Equipment)
MEDNODE_MANUFACTURER = "mednode"

#: Coding scheme of the IHE AIR purpose code; declare it in CodingSchemeIdentificationSequence.
IHE_CODING_SCHEME = "99IHE"


@dataclass(frozen=True)
class AlgorithmInfo:
    """Identity of the model/algorithm that produced a result.

    Parameters
    ----------
    name
        Model name, e.g. ``"mednode-ct-organs"`` (written as Manufacturer's Model Name
        and Algorithm Name).
    version
        Model version (Software Versions, Algorithm Version).
    family
        Free-text model family (e.g. ``"MedGemma"``); recorded as an algorithm
        parameter, since the coded Algorithm Family is always "Artificial Intelligence".
    manufacturer
        Who makes the algorithm.
    """

    name: str
    version: str
    family: str | None = None
    manufacturer: str = MEDNODE_MANUFACTURER

    @property
    def device_uid(self) -> str:
        """Reproducible Device UID of this name and version."""
        return derived_uid("device", self.name, self.version)


def contributing_equipment_item(algorithm: AlgorithmInfo) -> Dataset:
    """Build one Contributing Equipment Sequence item for ``algorithm``.

    IHE AIR (Rad TF-3 6.5.x) asks for purpose of reference (Newcode1, 99IHE,
    "Processing Algorithm"), Manufacturer, Manufacturer's Model Name, Software
    Versions and Device UID. highdicom's ``ContributingEquipment`` only accepts DCM
    purposes, hence a plain dataset.
    """
    purpose = Dataset()
    purpose.CodeValue = "Newcode1"
    purpose.CodingSchemeDesignator = IHE_CODING_SCHEME
    purpose.CodeMeaning = "Processing Algorithm"

    item = Dataset()
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    item.Manufacturer = algorithm.manufacturer
    item.ManufacturerModelName = algorithm.name
    # the model family (e.g. medgemma) says which adapter read the model's output: a second value
    item.SoftwareVersions = (
        [algorithm.version, f"family={algorithm.family}"] if algorithm.family else algorithm.version
    )
    item.DeviceUID = algorithm.device_uid
    return item


def add_contributing_equipment(ds: Dataset, algorithm: AlgorithmInfo) -> None:
    """Append the IHE AIR equipment item of ``algorithm`` to ``ds`` (in place)."""
    item = contributing_equipment_item(algorithm)
    if "ContributingEquipmentSequence" in ds:
        ds.ContributingEquipmentSequence.append(item)
    else:
        ds.ContributingEquipmentSequence = DicomSequence([item])


def names_mednode(manufacturer: str | None) -> bool:
    """Whether an instance's Manufacturer says mednode made it (see :class:`AlgorithmInfo`)."""
    return (manufacturer or "").strip().casefold() == MEDNODE_MANUFACTURER
