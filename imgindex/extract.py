"""Header extraction: one DICOM file to one typed ``instances`` row (and its rejects).

Reads headers only (:func:`imgindex.headers.read_header`), never pixel data. Each attribute
of the schema (:mod:`imgindex.schema`) is converted from its raw bytes to the column's type.
A value that does not parse (a date ``20231301``, a DS ``abc``) becomes null and a
``rejects`` row with ``level='value'``; a file that cannot be indexed at all becomes a
``rejects`` row with ``level='file'`` and the reason.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from pydicom.charset import convert_encodings, python_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.multival import MultiValue
from pydicom.values import convert_value

from imgindex.errors import DicomReadError
from imgindex.headers import Header, read_header, read_header_bytes
from imgindex.schema import DEFAULT_ATTRIBUTES, UID_KEYWORDS, Attribute, instance_schema

if TYPE_CHECKING:
    import os
    from collections.abc import Callable, Sequence

__all__ = [
    "REJECT_REASONS",
    "ExtractedBatch",
    "Extraction",
    "Extractor",
    "extract_files",
    "reject_id",
    "reject_row",
]

logger = logging.getLogger(__name__)

#: Why a file or a value was rejected.
REJECT_REASONS: dict[str, str] = {
    "unreadable": "the operating system refused to open or read the file",
    "empty": "the file has no bytes",
    "no_preamble": "no 128-byte preamble and 'DICM' prefix (PS3.10 7.1); index with --force",
    "not_dicom": "the file is not DICOM",
    "truncated": "the file ends inside an element (header or pixel data)",
    "malformed": "the file's structure does not follow PS3.5",
    "missing_uid": "SOPInstanceUID, SeriesInstanceUID or StudyInstanceUID is missing or empty",
    "dicomdir": "a media directory (DICOMDIR), not an instance; its files are indexed themselves",
    "bad_value": "a value does not parse for its VR; the column is null",
    "no_pixel_data": "image attributes (Rows, Columns) but no Pixel Data: possibly cut short",
}

_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_DEFAULT_CHARSETS = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
_BINARY = {
    "US": "H",
    "SS": "h",
    "UL": "L",
    "SL": "l",
    "UV": "Q",
    "SV": "q",
    "FL": "f",
    "FD": "d",
}


class BadValueError(ValueError):
    """A value does not parse for its VR."""


@dataclass
class Extraction:
    """The outcome of extracting one file: a row, or a file-level reject, and value rejects."""

    row: dict[str, Any] | None
    rejects: list[dict[str, Any]] = field(default_factory=list)
    size_bytes: int = 0


def reject_id(location: str, level: str, reason: str, keyword: str | None) -> str:
    """The key of a ``rejects`` row: what was refused where. Recompute it when a row's
    ``location`` changes, or rows of different files collide."""
    key = f"{location}|{level}|{reason}|{keyword or ''}"
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def reject_row(
    *,
    location: str,
    level: str,
    reason: str,
    message: str,
    source: str,
    indexed_at: dt.datetime,
    sop_instance_uid: str | None = None,
    keyword: str | None = None,
    tag: str | None = None,
    value: str | None = None,
    size_bytes: int | None = None,
) -> dict[str, Any]:
    """A ``rejects`` row; its ``reject_id`` is stable, so indexing again updates it."""
    return {
        "reject_id": reject_id(location, level, reason, keyword),
        "level": level,
        "reason": reason,
        "location": location,
        "source": source,
        "SOPInstanceUID": sop_instance_uid,
        "keyword": keyword,
        "tag": tag,
        "value": value,
        "message": message,
        "size_bytes": size_bytes,
        "indexed_at": indexed_at,
    }


@dataclass
class ExtractedBatch:
    """Rows of many files as one Arrow table, their rejects, and the bytes scanned."""

    table: pa.Table
    rejects: list[dict[str, Any]]
    bytes_scanned: int


def extract_files(extractor: Extractor, paths: Sequence[str]) -> ExtractedBatch:
    """Extract ``paths`` into one batch; never raises for a bad file.

    A module-level function of this light module, so worker processes that run it import
    pydicom and pyarrow but none of the table machinery.
    """
    now = dt.datetime.now(dt.UTC)
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    scanned = 0
    for path in paths:
        try:
            result = extractor.extract_file(path, indexed_at=now)
        except Exception as exc:  # a bug must not stop the run: the file is recorded
            logger.exception("unexpected error indexing %s", path)
            result = Extraction(
                None,
                [
                    reject_row(
                        location=Path(path).absolute().as_uri(),
                        level="file",
                        reason="malformed",
                        message=f"{type(exc).__name__}: {exc}",
                        source=extractor.source,
                        indexed_at=now,
                    )
                ],
            )
        scanned += result.size_bytes
        if result.row is not None:
            rows.append(result.row)
        rejects.extend(result.rejects)
    return ExtractedBatch(pa.Table.from_pylist(rows, extractor.schema), rejects, scanned)


class Extractor:
    """Turns DICOM files into ``instances`` rows.

    Parameters
    ----------
    attributes : sequence of Attribute
        The columns to fill (default :data:`imgindex.schema.DEFAULT_ATTRIBUTES`).
    source : str
        Written to the ``source`` column (where the instance came from).
    force : bool
        Also read files without the PS3.10 preamble.
    """

    def __init__(
        self,
        attributes: Sequence[Attribute] = DEFAULT_ATTRIBUTES,
        *,
        source: str,
        force: bool = False,
    ) -> None:
        self.attributes = tuple(attributes)
        self.source = source
        self.force = force
        self._tags = frozenset(a.tag for a in self.attributes)
        self._by_tag = {a.tag: a for a in self.attributes}
        self.schema = instance_schema(self.attributes)
        self._charset_tag = next(
            a.tag for a in self.attributes if a.keyword == "SpecificCharacterSet"
        )

    def extract_file(
        self,
        path: str | os.PathLike[str],
        *,
        location: str | None = None,
        indexed_at: dt.datetime | None = None,
    ) -> Extraction:
        """Extract the row for the file at ``path``; never raises for bad input.

        ``location`` defaults to the file's ``file://`` URI.
        """
        now = indexed_at or dt.datetime.now(dt.UTC)
        location = location or Path(path).absolute().as_uri()
        try:
            header = read_header(path, self._tags, force=self.force)
        except DicomReadError as exc:
            try:
                size = Path(path).stat().st_size
            except OSError:
                size = None
            return self._file_reject(exc, location, size, now)
        return self._extract(header, location, now)

    def extract_bytes(
        self, data: bytes, *, location: str, indexed_at: dt.datetime | None = None
    ) -> Extraction:
        """Extract the row of a whole Part 10 file held in memory; never raises for bad input.

        ``location`` is where the bytes are (or will be) stored.
        """
        now = indexed_at or dt.datetime.now(dt.UTC)
        try:
            header = read_header_bytes(data, self._tags, force=self.force)
        except DicomReadError as exc:
            return self._file_reject(exc, location, len(data), now)
        return self._extract(header, location, now)

    def _file_reject(
        self, exc: DicomReadError, location: str, size: int | None, now: dt.datetime
    ) -> Extraction:
        return Extraction(
            None,
            [
                reject_row(
                    location=location,
                    level="file",
                    reason=exc.reason,
                    message=str(exc),
                    source=self.source,
                    indexed_at=now,
                    size_bytes=size,
                )
            ],
            size or 0,
        )

    def _extract(self, header: Header, location: str, now: dt.datetime) -> Extraction:
        rejects: list[dict[str, Any]] = []
        row: dict[str, Any] = {}
        charset = self._charset(header.elements)
        for tag, elem in header.elements.items():
            attr = self._by_tag.get(tag)
            if attr is None:
                continue
            try:
                row[attr.keyword] = _convert(attr, elem, charset, header.little_endian)
            except (BadValueError, ValueError, struct.error, LookupError) as exc:
                raw = elem.value
                text = raw.decode("latin-1", "replace") if isinstance(raw, bytes) else str(raw)
                rejects.append(
                    reject_row(
                        location=location,
                        level="value",
                        reason="bad_value",
                        message=f"{attr.keyword} {attr.tag_text} ({attr.vr}): {exc}",
                        source=self.source,
                        indexed_at=now,
                        keyword=attr.keyword,
                        tag=attr.tag_text,
                        value=text[:64],
                        size_bytes=header.size_bytes,
                    )
                )
                row[attr.keyword] = None

        missing = [k for k in UID_KEYWORDS if not row.get(k)]
        if missing:
            is_dicomdir = header.media_sop_class == _DICOMDIR_SOP_CLASS
            reason = "dicomdir" if is_dicomdir else "missing_uid"
            message = (
                REJECT_REASONS["dicomdir"]
                if is_dicomdir
                else "missing or empty: " + ", ".join(missing)
            )
            file_reject = reject_row(
                location=location,
                level="file",
                reason=reason,
                message=message,
                source=self.source,
                indexed_at=now,
                sop_instance_uid=row.get("SOPInstanceUID"),
                size_bytes=header.size_bytes,
            )
            return Extraction(None, [file_reject], header.size_bytes)

        if not header.has_pixel_data and row.get("Rows") and row.get("Columns"):
            rejects.append(
                reject_row(
                    location=location,
                    level="value",
                    reason="no_pixel_data",
                    message=REJECT_REASONS["no_pixel_data"],
                    source=self.source,
                    indexed_at=now,
                    sop_instance_uid=row["SOPInstanceUID"],
                    keyword="PixelData",
                    tag="(7FE0,0010)",
                    size_bytes=header.size_bytes,
                )
            )
        for reject in rejects:
            reject["SOPInstanceUID"] = row["SOPInstanceUID"]
        row["TransferSyntaxUID"] = header.transfer_syntax
        row["source"] = self.source
        row["location"] = location
        row["size_bytes"] = header.size_bytes
        row["indexed_at"] = now
        return Extraction(row, rejects, header.size_bytes)

    def _charset(self, elements: dict[int, RawDataElement | DataElement]) -> _Charset | None:
        elem = elements.get(self._charset_tag)
        if elem is None:
            return None
        value = elem.value
        if isinstance(value, bytes):
            names = [v.strip() for v in value.decode("ascii", "replace").split("\\")]
        elif isinstance(value, str):
            names = [value]
        else:
            names = [str(v) for v in value] if value else []
        if all(n in _DEFAULT_CHARSETS for n in names):
            return None
        # One character set without code extensions decodes as a plain codec (PS3.5 6.1.2.5).
        codec = python_encoding.get(names[0]) if len(names) == 1 else None
        if codec is not None and names[0].startswith("ISO 2022"):
            codec = None
        return _Charset(names, codec)


@dataclass(frozen=True)
class _Charset:
    names: list[str]
    codec: str | None


def _convert(
    attr: Attribute,
    elem: RawDataElement | DataElement,
    charset: _Charset | None,
    little_endian: bool,
) -> Any:
    """Convert one element to the Python value of its column (None when empty)."""
    vr = elem.VR if elem.VR and elem.VR != "UN" else attr.vr
    if isinstance(elem, DataElement):
        values = _from_pydicom(elem.value)
    else:
        raw = elem.value or b""
        if vr in _BINARY:
            fmt = _BINARY[vr]
            count = len(raw) // struct.calcsize(fmt)
            order = "<" if little_endian else ">"
            values = list(
                struct.unpack(f"{order}{count}{fmt}", raw[: count * struct.calcsize(fmt)])
            )
        elif charset is not None and vr in _TEXT_VRS and charset.codec is None:
            # ISO 2022 code extensions: pydicom switches character sets at escapes.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom falls back to a default charset
                # convert_value takes Python codecs, not the DICOM terms of (0008,0005).
                encodings = convert_encodings(charset.names)
                values = _from_pydicom(convert_value(vr, elem, encodings))
        else:
            codec = charset.codec if charset is not None and vr in _TEXT_VRS else "latin-1"
            text = raw.decode(codec or "latin-1", "replace").rstrip("\x00 ").lstrip(" ")
            if not text:
                return None
            if not attr.multi:
                # The common case, kept off the list path: one value, parsed once.
                if attr.vr not in _TEXT_VRS and "\\" in text:
                    text = text.split("\\", 1)[0].strip(" \x00")
                    if not text:
                        return None
                return _parser(attr.vr)(text)
            values = text.split("\\")
    parsed = [_parse(attr.vr, v) for v in values]
    parsed = [p for p in parsed if p is not None] if attr.multi else parsed
    if attr.multi:
        return parsed or None
    return parsed[0] if parsed else None


def _from_pydicom(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def _parse(vr: str, value: Any) -> Any:
    """Parse one value (text or number) for the column type of ``vr``."""
    if isinstance(value, str):
        value = value.strip(" \x00")
        if value == "":
            return None
    return _parser(vr)(value)


def _parser(vr: str) -> Callable[[Any], Any]:
    return _PARSERS.get(vr, _parse_text)


def _parse_text(value: Any) -> str:
    return str(value)


def _parse_person_name(value: Any) -> str | None:
    # Trailing empty component groups ('Wang^XiaoDong=王^小東=') say nothing (PS3.5 6.2.1);
    # pydicom drops them, so names read through either path compare equal.
    return str(value).rstrip("=") or None


def _parse_int(value: Any) -> int:
    if isinstance(value, int):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        number = _parse_float(value)
        if not number.is_integer():
            raise BadValueError(f"{value!r} is not an integer") from None
        return int(number)


def _parse_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise BadValueError(f"{value!r} is not a number") from None


def _parse_date(value: Any) -> dt.date:
    if isinstance(value, dt.date):
        return value
    text = str(value)
    if len(text) == 10 and text[4] == "." and text[7] == ".":  # ACR-NEMA 300 form
        text = text.replace(".", "")
    if len(text) != 8 or not text.isdigit():
        raise BadValueError(f"{value!r} is not a date YYYYMMDD")
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError as exc:
        raise BadValueError(f"{value!r} is not a date: {exc}") from None


def _parse_time(value: Any) -> str:
    if isinstance(value, dt.time):
        return value.isoformat()
    text = str(value)
    if ":" in text:  # ACR-NEMA 300 form HH:MM:SS
        text = text.replace(":", "")
    whole, _, fraction = text.partition(".")
    if not whole.isdigit() or len(whole) not in (2, 4, 6) or (fraction and not fraction.isdigit()):
        raise BadValueError(f"{value!r} is not a time HHMMSS.FFFFFF")
    try:
        hour = int(whole[:2])
        minute = int(whole[2:4] or 0)
        second = min(int(whole[4:6] or 0), 59)  # PS3.5 allows 60 for a leap second
        micro = int((fraction + "000000")[:6]) if fraction else 0
        return dt.time(hour, minute, second, micro).isoformat()
    except ValueError as exc:
        raise BadValueError(f"{value!r} is not a time: {exc}") from None


def _parse_datetime(value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=dt.UTC)
    text = str(value)
    for sign in "+-":
        if sign in text[4:]:
            text = text[: 4 + text[4:].index(sign)]
    whole, _, fraction = text.partition(".")
    if not whole.isdigit() or len(whole) not in (4, 6, 8, 10, 12, 14):
        raise BadValueError(f"{value!r} is not a date-time YYYYMMDDHHMMSS.FFFFFF")
    parts = [int(whole[i : i + 2]) for i in range(4, len(whole), 2)]
    month, day, hour, minute, second = (*parts, *([1, 1, 0, 0, 0][len(parts) :]))
    micro = int((fraction + "000000")[:6]) if fraction.isdigit() else 0
    try:
        return dt.datetime(
            int(whole[:4]), month, day, hour, minute, min(second, 59), micro, tzinfo=dt.UTC
        )
    except ValueError as exc:
        raise BadValueError(f"{value!r} is not a date-time: {exc}") from None


#: Parser per VR (text VRs not listed stay text).
_PARSERS: dict[str, Callable[[Any], Any]] = {
    "DA": _parse_date,
    "TM": _parse_time,
    "DT": _parse_datetime,
    "PN": _parse_person_name,
    **dict.fromkeys(("IS", "SS", "US", "SL", "UL", "SV", "UV"), _parse_int),
    **dict.fromkeys(("DS", "FL", "FD"), _parse_float),
}
