"""Whether an attribute value is a valid value of its VR (PS3.5 6.2), said without quoting it."""

from __future__ import annotations

import datetime

from pydicom.multival import MultiValue
from pydicom.valuerep import MAX_VALUE_LEN, VALIDATORS

#: VRs whose values highdicom and pydicom parse as dates.
_DATE_FORMATS = {"DA": "%Y%m%d"}


def value_problem(vr: str, value: object) -> str | None:
    """Why ``value`` is not a valid value of ``vr``, without quoting it; ``None`` if it is.

    pydicom's own validators (length, characters), and for a DA a real calendar date
    (``19801341`` passes pydicom's pattern but is no date).
    """
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    for item in values:
        if item is None or item == "":
            continue
        if vr in _DATE_FORMATS:
            try:
                datetime.datetime.strptime(str(item).strip(), _DATE_FORMATS[vr])
            except ValueError:
                return f"not a valid {vr}"
            continue
        validator = VALIDATORS.get(vr)
        if validator is None:
            continue
        try:  # pydicom does not validate a PersonName object, only its text
            valid, _ = validator(vr, str(item) if vr == "PN" else item)
        except (TypeError, ValueError):
            valid = False
        if not valid:
            length = len(str(item))
            limit = MAX_VALUE_LEN.get(vr)
            if limit is not None and length > limit:
                return f"{length} characters, {vr} allows {limit}"
            return f"not a valid {vr}"
    return None
