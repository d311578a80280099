"""Where the shared sample DICOM lives (see its MANIFEST.tsv).

``MEDNODE_SHARED_DICOM`` wins; otherwise ``../shared/dicom`` beside the checkout, then the
workplace's standard location ``/work/shared/dicom`` (a clone made elsewhere still finds it).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _find() -> Path:
    override = os.environ.get("MEDNODE_SHARED_DICOM")
    if override:
        return Path(override)
    for candidate in (REPO_ROOT.parent / "shared" / "dicom", Path("/work/shared/dicom")):
        if (candidate / "MANIFEST.tsv").is_file():
            return candidate
    return REPO_ROOT.parent / "shared" / "dicom"


SHARED_DICOM = _find()
