"""Keyed pseudonyms and date shifts, and the gate every export attribute passes.

Export writes attributes to two places, the Zarr arrays' attributes and ``manifest.parquet``;
both call :meth:`Deidentifier.attributes` and write only what it returns. Until the full
PS3.15 Annex E profile lands (with dates shifted and descriptors cleaned), the gate lets
through only what identifies no one:

* geometry, sizes and pixel format (:data:`SAFE_ATTRIBUTES`);
* ``Modality`` and the rescale attributes;
* provenance: the cohort's hash and the index version read;
* numeric cohort labels (``*_count``, ``*_days``, ``days_from_index``);

and replaces identifiers with keyed pseudonyms (:data:`PSEUDONYMIZED`): ``PatientID`` and
``person_id`` by opaque tokens, UIDs by ``2.25.<integer>`` UIDs. Everything else (names,
dates, descriptions, accession numbers, institution) is dropped.

Pseudonyms are HMAC-SHA256 of the value under a secret key: stable for one key, so two exports
of the same patients line up, and unlinkable across keys. :meth:`Deidentifier.for_root`
keeps one key per catalog root, in ``ROOT/secrets/deid.key`` (created on first use, readable
by its owner only).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import os
import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["PSEUDONYMIZED", "SAFE_ATTRIBUTES", "SHIFT_DAYS", "Deidentifier", "read_key_file"]

#: Attributes that identify no one: geometry, sizes, pixel format, modality, rescale.
SAFE_ATTRIBUTES: Final = frozenset(
    {
        # imgindex's own array description
        "shape",
        "dtype",
        "spacing",
        "origin",
        "direction",
        "geometry",
        "instances",
        "slices",
        "stack",
        "nbytes",
        "stored_bytes",
        "chunks",
        "shards",
        "compressor",
        # provenance: the cohort's hash, the index version read, the layout's version
        "cohort_sha256",
        "index_version",
        "export_format",
        # DICOM
        "Modality",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "PlanarConfiguration",
        "PixelSpacing",
        "SliceThickness",
        "SpacingBetweenSlices",
        "ImageOrientationPatient",
        "RescaleSlope",
        "RescaleIntercept",
        "RescaleType",
    }
)

#: Identifiers replaced by keyed pseudonyms, and how: ``token`` (opaque hex) or ``uid``.
PSEUDONYMIZED: Final[Mapping[str, str]] = {
    "PatientID": "token",
    "person_id": "token",
    "StudyInstanceUID": "uid",
    "SeriesInstanceUID": "uid",
    "SOPInstanceUID": "uid",
    "FrameOfReferenceUID": "uid",
}

#: Numeric cohort labels a selection carries (docs/cohorts.md): counts and day intervals.
_LABEL = re.compile(r"(?:.+_count|.+_days|days_from_index)")
_KEY_BYTES: Final = 32
_TOKEN_HEX: Final = 24
#: The range of per-patient date shifts, in days: always into the past, never zero, so a
#: shifted date can never be the original one.
SHIFT_DAYS: Final = (-3650, -366)


class Deidentifier:
    """Keyed pseudonyms and the attribute gate.

    Parameters
    ----------
    key : bytes
        The secret (at least 16 bytes). Keep it: the same key gives the same pseudonyms.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("a de-identification key needs at least 16 bytes")
        self._key = key

    def __repr__(self) -> str:
        return "Deidentifier(key=<secret>)"

    @property
    def key(self) -> bytes:
        """The secret (to hand to worker processes; never print or log it)."""
        return self._key

    @classmethod
    def for_root(cls, root: str | os.PathLike[str]) -> Deidentifier:
        """The catalog's own key, ``ROOT/secrets/deid.key``, made on first use (mode 0600)."""
        path = Path(root) / "secrets" / "deid.key"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fresh = path.with_name(f".deid.key.{os.getpid()}")
            descriptor = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "wb") as out:
                out.write(secrets.token_bytes(_KEY_BYTES).hex().encode() + b"\n")
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(fresh, path)  # never replaces a key another process made first
            except FileExistsError:
                pass
            finally:
                fresh.unlink()
        return cls(read_key_file(path))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Deidentifier:
        """The key in ``path`` (``--deid-key-file``): see :func:`read_key_file`."""
        return cls(read_key_file(path))

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self._key, f"{kind}\0{value}".encode(), hashlib.sha256).digest()

    def token(self, kind: str, value: object) -> str:
        """An opaque, stable token for ``value`` (24 hex digits, 96 bits)."""
        return self._digest(kind, str(value)).hex()[:_TOKEN_HEX]

    def uid(self, value: str) -> str:
        """A UID for ``value`` under the ``2.25`` root (PS3.5 B.2): ``2.25.<128-bit int>``."""
        return "2.25." + str(int.from_bytes(self._digest("uid", value)[:16], "big"))

    def shift_days(self, patient_id: object) -> int:
        """The patient's date shift in days, within :data:`SHIFT_DAYS` (never zero).

        Derived from the key and the PatientID (stripped of surrounding spaces, as EMR links
        are), so every study and every EMR row of one patient moves by the same offset and
        the intervals between them are kept exactly.
        """
        low, high = SHIFT_DAYS
        draw = int.from_bytes(self._digest("date-shift", str(patient_id).strip())[:8], "big")
        return low + draw % (high - low + 1)

    def shift_date(self, value: dt.date, patient_id: object) -> dt.date:
        """``value`` moved by the patient's :meth:`shift_days` (datetimes keep their time)."""
        return value + dt.timedelta(days=self.shift_days(patient_id))

    def attributes(
        self, attributes: Mapping[str, Any], *, pseudonymized: bool = False
    ) -> dict[str, Any]:
        """What of ``attributes`` may leave: safe ones as they are, identifiers pseudonymized,
        numeric labels kept; everything else dropped.

        With ``pseudonymized=True`` the identifiers are taken to be pseudonyms already (the
        attributes of an exported array, passed on to the manifest) and kept as they are.
        """
        out: dict[str, Any] = {}
        for name, value in attributes.items():
            if name in SAFE_ATTRIBUTES:
                out[name] = value
            elif name in PSEUDONYMIZED:
                if value is None or pseudonymized:
                    out[name] = value
                elif PSEUDONYMIZED[name] == "uid":
                    out[name] = self.uid(str(value))
                else:
                    out[name] = self.token(name, value)
            elif _LABEL.fullmatch(name) and _is_number(value):
                out[name] = value
        return out


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    """A key from a file: 64 hex digits (as ``ROOT/secrets/deid.key`` holds), or otherwise
    the file's raw bytes (at least 16).

    Raises
    ------
    ConfigError
        If the file is missing, unreadable or too short.
    """
    from imgindex.errors import ConfigError

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the de-identification key: {exc}") from exc
    text = raw.strip()
    try:
        key = bytes.fromhex(text.decode("ascii")) if text else b""
    except (UnicodeDecodeError, ValueError):
        key = raw
    if len(key) < 16:
        raise ConfigError(
            f"{path}: a de-identification key needs at least 16 bytes (32 hex digits); "
            "make one with: python -c 'import secrets; print(secrets.token_hex(32))' > KEYFILE"
        )
    return key


def _is_number(value: object) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return True
    return isinstance(value, float) and not math.isnan(value)
