"""De-identification: nothing identifying leaves imgindex, and images and EMR rows stay linkable.

- :class:`Deidentifier` holds the secret key and the profile options: keyed pseudonyms for
  PatientID and UIDs, a per-patient date shift derived from the same key, and
  :meth:`Deidentifier.attributes`, the gate every exported attribute passes.
- :class:`Profile` is the DICOM PS3.15 Annex E Basic Application Level Confidentiality
  Profile (the table ``ps3_15_e1_1.csv``: an action per tag) resolved for
  :class:`ProfileOptions`; :func:`deidentify_dataset` applies it to a whole DICOM instance.

See ``docs/deid.md``.
"""

from imgindex.deid.dataset import deidentify_dataset
from imgindex.deid.keys import (
    PSEUDONYMIZED,
    SAFE_ATTRIBUTES,
    SHIFT_DAYS,
    Deidentifier,
    read_key_file,
)
from imgindex.deid.profile import Identity, Profile, ProfileOptions, clean_text

__all__ = [
    "PSEUDONYMIZED",
    "SAFE_ATTRIBUTES",
    "SHIFT_DAYS",
    "Deidentifier",
    "Identity",
    "Profile",
    "ProfileOptions",
    "clean_text",
    "deidentify_dataset",
    "read_key_file",
]
