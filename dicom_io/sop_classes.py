"""Kinds of SOP Class a receiver treats differently: derived objects as opposed to images."""

from __future__ import annotations

#: Structured Reports, Key Object Selection and Mammography CAD included (PS3.4 B.5, the ``88.`` arc)
_SR_ARC = "1.2.840.10008.5.1.4.1.1.88."
#: Grayscale, Color, Pseudo-Color, Blending, XA/XRF, Volumetric… Presentation States (``11.`` arc)
_PRESENTATION_STATE_ARC = "1.2.840.10008.5.1.4.1.1.11."
_DERIVED_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation
    "1.2.840.10008.5.1.4.1.1.66.5",  # Surface Segmentation
    "1.2.840.10008.5.1.4.1.1.66.1",  # Spatial Registration
    "1.2.840.10008.5.1.4.1.1.66.3",  # Deformable Spatial Registration
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
    "1.2.840.10008.5.1.4.1.1.104.2",  # Encapsulated CDA
})


def is_derived_object(sop_class_uid: str) -> bool:
    """Whether instances of ``sop_class_uid`` are derived objects (reports, key object
    selections, presentation states, segmentations, registrations, structure sets, documents)
    rather than images a model reads.

    A receiver looks such an instance up before indexing it (is it a result it wrote itself?),
    which it does not do for every image of a series.
    """
    return (
        sop_class_uid.startswith((_SR_ARC, _PRESENTATION_STATE_ARC))
        or sop_class_uid in _DERIVED_SOP_CLASSES
    )
