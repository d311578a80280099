"""CT and MR volumes as the model was trained on them.

MedGemma 1.5 reads a CT as up to 85 slices, each rendered in three Hounsfield windows stacked as
RGB and labelled ``SLICE n`` in one user turn. The recipe is Google Health's notebook
``notebooks/high_dimensional_ct_hugging_face.ipynb`` in github.com/Google-Health/medgemma
(read at commit d89262cd89e1d281eddbecb21fa83584a508f46f; summarised in shared/notes/serving.md):

1. Sort the slices and, when there are more than 85, keep
   ``[s[int(round(i / 85 * (n - 1)))] for i in range(1, 86)]``. The notebook sorts by Instance
   Number; here the order is the position along the slice normal
   (:func:`dicom_io.slice_stack.stack_slices`), which is what Instance Number usually stands for.
2. Hounsfield units (rescale slope/intercept), then per channel ``clip(x, lo, hi)``,
   ``(x - lo) / (hi - lo) * 255``, round to ``uint8``: R -1024..1024, G -135..215, B 0..80.
3. One user turn: an instruction text first, then each slice image followed by the text
   ``SLICE n`` (1-based), then the question text last (it starts with two newlines). With the
   question first the model falls back to a chest-radiograph style report (medgemma issue #76).

Families without such a recipe keep their own multi-image convention: the images, then the
prompt; their CT slices are one soft-tissue window in grey, sampled with
:func:`inference.geometry.sample_slices` (first and last slice included).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset

from dicom_io.slice_stack import SliceRef, read_slice, stack_slices
from inference.errors import InvalidInputError
from inference.geometry import PreparedImage, sample_slices
from inference.vlm.comparison import ComparisonMode, PriorStudy, comparison_content

if TYPE_CHECKING:
    from inference.vlm.runtime import VLM

logger = logging.getLogger(__name__)

#: At most this many slices of one volume (MedGemma 1.5's training, the notebook's MAX_SLICE).
MEDGEMMA_MAX_SLICES = 85
#: The notebook's ``window_clips``: (low, high) HU of the R, G and B channels.
MEDGEMMA_CT_WINDOWS_HU: tuple[tuple[float, float], ...] = ((-1024.0, 1024.0), (-135.0, 215.0), (0.0, 80.0))
#: The text after each slice image.
SLICE_LABEL = "SLICE {number}"
#: The instruction before the slices: the notebook's, less its teaching persona and its
#: "from the center of the abdomen" (true of its example only).
INSTRUCTION = ("You are analyzing a contiguous block of {modality} slices. "
               "Please review the slices provided below carefully.")
#: How the question after the slices begins, per language (the notebook's query text opens with
#: two newlines and "Based on the visual evidence in the slices provided above, ").
QUESTION_LEAD = {"en": "\n\nBased on the visual evidence in the slices provided above, ",
                 "zh": "\n\n根据以上切片中的影像表现，"}
#: Soft-tissue window (centre, width) of CT slices for families without a CT recipe.
SOFT_TISSUE_WINDOW = (40.0, 400.0)


def recipe_sample(n_slices: int, max_slices: int = MEDGEMMA_MAX_SLICES) -> list[int]:
    """Indices of the slices the notebook keeps: all when ``n_slices <= max_slices``, else
    ``int(round(i / max_slices * (n_slices - 1)))`` for ``i`` in ``1..max_slices`` (the last slice
    is always kept, the first only when the rounding reaches it)."""
    if n_slices < 1:
        raise InvalidInputError("A series with no slices cannot be sampled.")
    if max_slices < 1:
        raise ValueError(f"Number of slices to sample must be >= 1, got {max_slices}.")
    if n_slices <= max_slices:
        return list(range(n_slices))
    return [round(i / max_slices * (n_slices - 1)) for i in range(1, max_slices + 1)]


def medgemma_ct_rgb(hu: np.ndarray) -> np.ndarray:
    """One CT slice in HU as the notebook's 8-bit RGB: one window per channel (R wide, G soft
    tissue, B brain), computed in float32 and rounded half to even like ``np.round``."""
    values = np.asarray(hu)
    if values.ndim != 2:
        raise InvalidInputError(f"A CT slice is a (rows, columns) array, got shape {values.shape}.")
    channels = []
    for low, high in MEDGEMMA_CT_WINDOWS_HU:
        channel = np.clip(values, low, high).astype(np.float32)
        channel -= np.float32(low)
        channel /= np.float32(high - low)
        channel *= np.float32(255.0)
        channels.append(np.round(channel, 0).astype(np.uint8))
    return np.stack(channels, axis=-1)


def volume_question(prompt: str, language: str) -> str:
    """The question after the slices: the notebook's lead, then ``prompt`` (its first letter
    lower-cased when it is an English sentence start such as "Write" or "Is")."""
    lead = QUESTION_LEAD.get(language)
    if lead is None:
        return "\n\n" + prompt
    if language == "en" and len(prompt) > 1 and prompt[0].isupper() and prompt[1].islower():
        prompt = prompt[0].lower() + prompt[1:]
    return lead + prompt


def user_content(images: Sequence[PreparedImage], prompt: str, *, slice_recipe: bool,
                 language: str, prior: PriorStudy | None = None,
                 comparison: ComparisonMode = "report") -> list[dict[str, object]]:
    """The content of the one user turn for ``images`` and ``prompt``.

    With ``slice_recipe`` and more than one volume slice among ``images``: the instruction, then
    each image (a slice followed by ``SLICE n``, n counting slices from 1), then the question.
    Otherwise the family's own convention: every image, then the prompt. With ``prior``, the
    prior study goes in as ``comparison`` says (:func:`inference.vlm.comparison.comparison_content`);
    a volume keeps its recipe and gets the prior's report as text.
    """
    slices = [img for img in images if img.volume_modality]
    if prior is not None:
        if not slice_recipe or len(slices) < 2:
            return comparison_content(images, prompt, prior, mode=comparison, language=language)
        prompt = str(comparison_content([], prompt, prior, mode="report", language=language)[-1]["text"])
    if not slice_recipe or len(slices) < 2:
        content: list[dict[str, object]] = [{"type": "image", "image": img.image} for img in images]
        content.append({"type": "text", "text": prompt})
        return content
    modalities = list(dict.fromkeys(str(img.volume_modality) for img in slices))
    content = [{"type": "text", "text": INSTRUCTION.format(modality=" and ".join(modalities))}]
    number = 0
    for img in images:
        content.append({"type": "image", "image": img.image})
        if img.volume_modality:
            number += 1
            content.append({"type": "text", "text": SLICE_LABEL.format(number=number)})
    content.append({"type": "text", "text": volume_question(prompt, language)})
    return content


def slice_window(ref: SliceRef) -> tuple[float, float] | None:
    """(centre, width) of a slice's own VOI window (a frame's Frame VOI LUT, else the top level)."""
    ds = ref.dataset
    source: Dataset = ds
    if ref.frame_index is not None:
        groups = ((ds.get("PerFrameFunctionalGroupsSequence"), ref.frame_index),
                  (ds.get("SharedFunctionalGroupsSequence"), 0))
        for group, index in groups:
            if group is not None and index < len(group) and group[index].get("FrameVOILUTSequence"):
                source = group[index].FrameVOILUTSequence[0]
                break
    center, width = source.get("WindowCenter"), source.get("WindowWidth")
    try:
        c = float(center[0] if isinstance(center, Sequence) and not isinstance(center, str) else center)
        w = float(width[0] if isinstance(width, Sequence) and not isinstance(width, str) else width)
    except (TypeError, ValueError):
        return None
    return (c, w) if w >= 1 else None


def prepare_volume(vlm: VLM, datasets: Sequence[Dataset], *, max_slices: int
                   ) -> list[tuple[PreparedImage, SliceRef]]:
    """Sample one CT/MR series and prepare each sampled slice for ``vlm``, decoding only those.

    The headers order the slices (:func:`dicom_io.slice_stack.stack_slices`, frames of enhanced
    multi-frame instances included), the family's sampling picks at most ``max_slices`` of them,
    and only then is each picked slice decoded, windowed and prepared, one at a time.

    Raises
    ------
    InvalidInputError
        If the series has no slice.
    dicom_io.errors.InvalidInstanceError
        If a picked slice cannot be decoded.
    """
    if not datasets:
        raise InvalidInputError("A volume needs at least one instance.")
    modality = str(datasets[0].get("Modality", "")).upper() or "CT"
    refs = stack_slices(datasets)
    recipe = vlm.family.slice_recipe
    picks = recipe_sample(len(refs), max_slices) if recipe else sample_slices(len(refs), max_slices)
    prepared: list[tuple[PreparedImage, SliceRef]] = []
    for index in picks:
        ref = refs[index]
        values = read_slice(ref)
        if modality == "CT" and recipe:
            image = vlm.prepare(medgemma_ct_rgb(values), photometric="RGB")
        elif modality == "CT":
            image = vlm.prepare(values, photometric="MONOCHROME2", window=SOFT_TISSUE_WINDOW)
        else:
            photometric = str(ref.dataset.get("PhotometricInterpretation", "MONOCHROME2"))
            image = vlm.prepare(values, photometric=photometric, window=slice_window(ref))
        prepared.append((replace(image, volume_modality=modality), ref))
    logger.debug("series %s: %d of %d slices prepared", datasets[0].get("SeriesInstanceUID", "?"),
                 len(prepared), len(refs))
    return prepared
