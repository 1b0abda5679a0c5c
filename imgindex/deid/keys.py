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

from pydicom.datadict import dictionary_VR, keyword_dict

from imgindex.deid.dataset import ID_KEYWORDS, NAME_KEYWORDS
from imgindex.deid.profile import Identity, Profile, ProfileOptions, clean_text

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
#: Date cohort labels (``entry_date``): shifted by the patient's offset, as DICOM dates are.
_DATE_LABEL = re.compile(r"[a-z0-9_]+_date")
_DA: Final = re.compile(r"\d{8}")
_ISO_DATE: Final = re.compile(r"\d{4}-\d{2}-\d{2}")
_TIME: Final = re.compile(r"\d{2}(?::?\d{2}(?::?\d{2}(?:\.\d{1,6})?)?)?")
_KEY_BYTES: Final = 32
_TOKEN_HEX: Final = 24
#: The range of per-patient date shifts, in days: always into the past, never zero, so a
#: shifted date can never be the original one.
SHIFT_DAYS: Final = (-3650, -366)


class Deidentifier:
    """The secret key, the profile options, and what they make of identifying values.

    Parameters
    ----------
    key : bytes
        The secret (at least 16 bytes). Keep it: the same key gives the same pseudonyms and
        the same date shifts.
    options : ProfileOptions, optional
        The PS3.15 options in force (default: all of them, see :class:`ProfileOptions`).
    enabled : bool
        ``False`` (``imgindex export --no-deid``) writes identifying values as they are:
        for checking the checker, and for exports that stay inside the hospital.
    """

    def __init__(
        self, key: bytes, options: ProfileOptions | None = None, *, enabled: bool = True
    ) -> None:
        if len(key) < 16:
            raise ValueError("a de-identification key needs at least 16 bytes")
        self._key = key
        self.options = options or ProfileOptions()
        self.enabled = enabled

    def __repr__(self) -> str:
        return f"Deidentifier(key=<secret>, options={self.options}, enabled={self.enabled})"

    @property
    def profile(self) -> Profile:
        """PS3.15 Table E.1-1 resolved for :attr:`options`."""
        return Profile.default(self.options)

    @property
    def key(self) -> bytes:
        """The secret (to hand to worker processes; never print or log it)."""
        return self._key

    @classmethod
    def for_root(
        cls,
        root: str | os.PathLike[str],
        options: ProfileOptions | None = None,
        *,
        enabled: bool = True,
    ) -> Deidentifier:
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
        return cls(read_key_file(path), options, enabled=enabled)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        options: ProfileOptions | None = None,
        *,
        enabled: bool = True,
    ) -> Deidentifier:
        """The key in ``path`` (``--deid-key-file``): see :func:`read_key_file`."""
        return cls(read_key_file(path), options, enabled=enabled)

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
        """What of ``attributes`` may leave, as JSON-ready values.

        - imgindex's own safe names (:data:`SAFE_ATTRIBUTES`) as they are;
        - identifiers (:data:`PSEUDONYMIZED`) as keyed pseudonyms;
        - numeric cohort labels as they are, date labels (``*_date``) shifted;
        - DICOM attributes by the profile: kept (``K``, or not in the table), UIDs replaced
          (``U``), dates shifted and descriptions cleaned (``C``), the rest dropped;
        - anything else dropped.

        With ``pseudonymized=True`` the attributes have been through this gate already (an
        exported array's, passed on to the manifest) and are only filtered, not changed
        again. A disabled Deidentifier returns everything as it is.
        """
        if not self.enabled:
            return {name: _jsonable(value) for name, value in attributes.items()}
        profile = self.profile
        patient_id = attributes.get("PatientID")
        identity: Identity | None = None
        out: dict[str, Any] = {}
        for name, value in attributes.items():
            if name in SAFE_ATTRIBUTES:
                out[name] = _jsonable(value)
            elif name in PSEUDONYMIZED:
                if value is None or pseudonymized:
                    out[name] = value
                elif PSEUDONYMIZED[name] == "uid":
                    out[name] = self.uid(str(value))
                else:
                    out[name] = self.token(name, value)
            elif _LABEL.fullmatch(name):
                if _is_number(value):
                    out[name] = value
            elif _DATE_LABEL.fullmatch(name):
                if pseudonymized and isinstance(value, str) and _ISO_DATE.fullmatch(value):
                    out[name] = value
                elif isinstance(value, dt.date) and patient_id is not None:
                    out[name] = _jsonable(self.shift_date(value, patient_id))
            elif not _is_keyword(name):
                continue
            elif pseudonymized or value is None:
                out[name] = _jsonable(value)
            else:
                action = profile.keyword_action(name)
                if action is None and _is_date_keyword(name):
                    action = "C" if self.options.modified_dates else "X"
                if action in (None, "K"):
                    out[name] = _jsonable(value)
                elif action == "U":
                    out[name] = self.uid(str(value))
                elif action == "C":
                    if identity is None:
                        identity = attribute_identity(attributes)
                    cleaned = self._clean(value, patient_id, identity)
                    if cleaned is not None:
                        out[name] = cleaned
        return out

    def _clean(self, value: Any, patient_id: object, identity: Identity) -> Any:
        """A ``C`` attribute's value: dates and date-times shifted, text cleaned, times
        kept, anything else dropped (``None``)."""
        if isinstance(value, dt.datetime | dt.date):
            return _jsonable(self.shift_date(value, patient_id))
        if isinstance(value, list | tuple):
            cleaned = [self._clean(v, patient_id, identity) for v in value]
            kept = [v for v in cleaned if v is not None]
            return kept or None
        if isinstance(value, str):
            if _DA.fullmatch(value):
                day = dt.date(int(value[:4]), int(value[4:6]), int(value[6:8]))
                return self.shift_date(day, patient_id).isoformat()
            if _ISO_DATE.fullmatch(value):
                return self.shift_date(dt.date.fromisoformat(value), patient_id).isoformat()
            if _TIME.fullmatch(value):
                return value
            return clean_text(value, identity) or None
        return None


def attribute_identity(attributes: Mapping[str, Any]) -> Identity:
    """The names and IDs among export attributes (a series' index attributes), for cleaning
    its descriptions."""
    return Identity.of(
        [attributes.get(k) for k in NAME_KEYWORDS], [attributes.get(k) for k in ID_KEYWORDS]
    )


def _is_keyword(name: str) -> bool:
    return keyword_dict.get(name) is not None


def _is_date_keyword(name: str) -> bool:
    tag = keyword_dict.get(name)
    return tag is not None and dictionary_VR(tag) in ("DA", "DT")


def _jsonable(value: Any) -> Any:
    """Dates as ISO strings, tuples as lists; everything else as it is."""
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


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
