"""Reproducible DICOM UIDs.

Outputs must be reproducible (a redelivered job re-sends identical instances), so
UIDs are derived from stable names with UUID5 and written in the ``2.25`` root
(PS3.5 B.2: a UUID written as one decimal integer below ``2.25``).
"""

from __future__ import annotations

import uuid

#: Namespace of every UID mednode derives; never change it, or all UIDs change.
MEDNODE_NAMESPACE = uuid.UUID("5f0c6a2e-9a0b-5d7c-8f3e-6d656e6f6465")


def derived_uid(*parts: str) -> str:
    """Return a DICOM UID that depends only on ``parts``.

    Parameters
    ----------
    *parts
        Stable names, e.g. ``(job_id, "seg")``; joined with ``/``.

    Returns
    -------
    str
        ``2.25.<decimal UUID5>``: at most 44 characters, valid for VR UI.

    Raises
    ------
    ValueError
        If no part is given (every output would get the same UID).
    """
    if not parts:
        raise ValueError("derived_uid needs at least one part, e.g. derived_uid(job_id, 'seg').")
    value = uuid.uuid5(MEDNODE_NAMESPACE, "/".join(parts))
    return f"2.25.{value.int}"
