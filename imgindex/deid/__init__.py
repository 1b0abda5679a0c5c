"""De-identification: nothing identifying leaves imgindex, and images and EMR rows stay linkable.

- :class:`Deidentifier` holds the secret key: keyed pseudonyms for PatientID and UIDs, and a
  per-patient date shift derived from the same key.
- :mod:`imgindex.deid.profile` applies the DICOM PS3.15 Annex E Basic Application Level
  Confidentiality Profile (a table of actions by tag, ``ps3_15_e1_1.csv``) with the options
  researchers need, to export attributes and to whole DICOM datasets.

See ``docs/deid.md``.
"""

from imgindex.deid.keys import (
    PSEUDONYMIZED,
    SAFE_ATTRIBUTES,
    SHIFT_DAYS,
    Deidentifier,
    read_key_file,
)

__all__ = ["PSEUDONYMIZED", "SAFE_ATTRIBUTES", "SHIFT_DAYS", "Deidentifier", "read_key_file"]
