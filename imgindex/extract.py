"""Header extraction: one DICOM file to one typed ``instances`` row (and its rejects).

Reads headers only (:func:`imgindex.headers.read_header`), never pixel data. Each attribute
of the schema (:mod:`imgindex.schema`) is converted from its raw bytes to the column's type.
A value that does not parse (a date ``20231301``, a DS ``abc``) becomes null and a
``rejects`` row with ``level='value'``; a file that cannot be indexed at all becomes a
``rejects`` row with ``level='file'`` and the reason.

:meth:`Extractor.extract_json` makes the same row from a DICOM JSON dataset (PS3.18 Annex F),
as WADO-RS metadata and QIDO-RS responses carry it, without building a pydicom Dataset.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import logging
import reprlib
import struct
import warnings
from collections.abc import Mapping
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
    "malformed_json": "a DICOM JSON dataset (PS3.18 Annex F) that breaks the model",
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


#: DICOM JSON keys (PS3.18 F.2.2): the value array and the two forms of bulk data.
_JSON_VALUE = "Value"
_JSON_BULK_KEYS = ("InlineBinary", "BulkDataURI")
#: TransferSyntaxUID (0002,0010) and, from QIDO-RS, AvailableTransferSyntaxUID (0008,3002).
_JSON_TRANSFER_SYNTAX_KEYS = ("00020010", "00083002")
_JSON_MEDIA_SOP_CLASS_KEY = "00020002"
#: PS3.18 F.2.2: the component groups of a person name, in the order of PS3.5 6.2.1.
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
_INT_VRS = frozenset({"IS", "SS", "US", "SL", "UL", "SV", "UV"})
_FLOAT_VRS = frozenset({"DS", "FL", "FD"})
#: The fast paths of extract_json: one value of a single-valued column (a string, a float, an
#: int; other: through the column's parser) and lists of a multi-valued one (floats, strings)
#: as they are in the JSON; see _json_kind.
_KIND_TEXT, _KIND_FLOAT, _KIND_INT, _KIND_OTHER = "text", "float", "int", "other"
_KIND_TEXTS, _KIND_FLOATS, _KIND_LIST = "texts", "floats", "list"
_STR_TYPE, _FLOAT_TYPE = frozenset({str}), frozenset({float})
#: Distinct DA, TM or DT texts remembered per column by extract_json.
_JSON_MEMO_SIZE = 4096
#: The int64 column range (pyarrow refuses larger Python ints).
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


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
        # DICOM JSON keys are tags as eight upper-case hex digits (PS3.18 F.2.1.1): computed
        # once, with each column's parser, so extract_json is a loop of dict look-ups.
        self._json_plan = tuple(
            (a, a.keyword, f"{a.tag:08X}", _json_kind(a), _json_parser(a.vr))
            for a in self.attributes
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

    def extract_json(
        self,
        obj: Mapping[str, Any],
        *,
        location: str,
        indexed_at: dt.datetime | None = None,
        size_bytes: int | None = None,
        transfer_syntax: str | None = None,
    ) -> Extraction:
        """Extract the row of one DICOM JSON dataset (PS3.18 Annex F); never raises for bad input.

        The row equals what :meth:`extract_file` gives for the same instance, but only the
        schema's attributes are converted, straight from the JSON values, with no pydicom
        Dataset in between. Numbers parse whether sent as JSON numbers (PS3.18 F.2.3) or as
        strings; a plain value is read with the dictionary VR whatever the element's ``vr``
        says (a server may send ``UN`` for a tag it does not know). Bulk data (InlineBinary,
        BulkDataURI) in a column, or an element that breaks the model, is a ``bad_value``.

        Parameters
        ----------
        obj : mapping
            One dataset of a WADO-RS metadata or QIDO-RS response, keyed by tags written as
            eight hex digits (``"0020000D"``).
        location : str
            Where the instance is, e.g. its WADO-RS URL.
        indexed_at : datetime, optional
            Written to ``indexed_at``; defaults to now.
        size_bytes : int, optional
            The instance's size if known (metadata does not tell it).
        transfer_syntax : str, optional
            TransferSyntaxUID when ``obj`` has neither (0002,0010) TransferSyntaxUID nor
            (0008,3002) AvailableTransferSyntaxUID, which QIDO-RS may return.

        Returns
        -------
        Extraction
            The row and its ``bad_value`` rejects; or no row and a file-level reject:
            ``missing_uid``, or ``malformed_json`` when ``obj`` is not a JSON object.
        """
        now = indexed_at or dt.datetime.now(dt.UTC)
        parsed_json: object = obj  # the type is the contract; a server's JSON may break it
        if type(parsed_json) is not dict and not isinstance(parsed_json, Mapping):
            reject = reject_row(
                location=location,
                level="file",
                reason="malformed_json",
                message=(
                    f"the dataset is a JSON {_json_type(parsed_json)}, not an object (PS3.18 F.2)"
                ),
                source=self.source,
                indexed_at=now,
                size_bytes=size_bytes,
            )
            return Extraction(None, [reject], size_bytes or 0)
        rejects: list[dict[str, Any]] = []
        row: dict[str, Any] = {}
        get = obj.get
        for attr, keyword, key, kind, parse in self._json_plan:
            elem = get(key)
            if elem is None and key not in obj:
                continue
            try:
                values = elem.get(_JSON_VALUE) if type(elem) is dict else None
                if type(values) is list and len(values) == 1:
                    # One value, the common case, inline for single-valued columns: this
                    # loop runs for every attribute of every instance of a crawl.
                    value = values[0]
                    if kind is _KIND_TEXT and type(value) is str and value.isascii():
                        row[keyword] = value.strip(" \x00") or None
                        continue
                    if (kind is _KIND_FLOAT and type(value) is float) or (
                        kind is _KIND_INT
                        and type(value) is int
                        and _INT64_MIN <= value <= _INT64_MAX
                    ):
                        row[keyword] = value
                        continue
                    if kind is _KIND_OTHER and value is not None:
                        row[keyword] = parse(value)
                        continue
                row[keyword] = _convert_json(attr, kind, elem, parse)
            except (ValueError, TypeError, ArithmeticError) as exc:
                rejects.append(
                    reject_row(
                        location=location,
                        level="value",
                        reason="bad_value",
                        message=f"{keyword} {attr.tag_text} ({attr.vr}): {exc}",
                        source=self.source,
                        indexed_at=now,
                        keyword=keyword,
                        tag=attr.tag_text,
                        value=_json_value_text(elem, attr.vr),
                        size_bytes=size_bytes,
                    )
                )
                row[keyword] = None

        missing = [k for k in UID_KEYWORDS if not row.get(k)]
        if missing:
            is_dicomdir = _json_first_text(obj, _JSON_MEDIA_SOP_CLASS_KEY) == _DICOMDIR_SOP_CLASS
            file_reject = reject_row(
                location=location,
                level="file",
                reason="dicomdir" if is_dicomdir else "missing_uid",
                message=(
                    REJECT_REASONS["dicomdir"]
                    if is_dicomdir
                    else "missing or empty: " + ", ".join(missing)
                ),
                source=self.source,
                indexed_at=now,
                sop_instance_uid=row.get("SOPInstanceUID"),
                size_bytes=size_bytes,
            )
            return Extraction(None, [file_reject], size_bytes or 0)

        # Metadata carries no pixel data, so there is no no_pixel_data check here.
        for reject in rejects:
            reject["SOPInstanceUID"] = row["SOPInstanceUID"]
        row["TransferSyntaxUID"] = (
            _json_first_text(obj, _JSON_TRANSFER_SYNTAX_KEYS[0])
            or _json_first_text(obj, _JSON_TRANSFER_SYNTAX_KEYS[1])
            or transfer_syntax
        )
        row["source"] = self.source
        row["location"] = location
        row["size_bytes"] = size_bytes
        row["indexed_at"] = now
        return Extraction(row, rejects, size_bytes or 0)

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


#: Renders broken JSON for a reject's ``value``, however large or deep.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 64, 64


def _convert_json(attr: Attribute, kind: str, elem: Any, parse: Callable[[Any], Any]) -> Any:
    """Convert one DICOM JSON element (PS3.18 F.2.2) to its column's value (None when empty).

    Raises
    ------
    BadValueError
        If a value does not parse, the element is bulk data or breaks the model.
    """
    if type(elem) is not dict and not isinstance(elem, Mapping):
        raise BadValueError(f"the element is a JSON {_json_type(elem)}, not an object")
    values = elem.get(_JSON_VALUE)
    if values is None:
        for key in _JSON_BULK_KEYS:
            if key in elem:
                raise BadValueError(f"the element is bulk data ({key}), not a value")
        return None
    if type(values) is not list:
        raise BadValueError(f"'Value' is a JSON {_json_type(values)}, not an array")
    if attr.multi:
        # Lists of floats or strings as the JSON holds them, the common cases, without a call
        # per value; null stands for an empty value (PS3.18 F.2.5), dropped as extract_file
        # drops empty ones.
        value_types = set(map(type, values))
        if kind is _KIND_FLOATS and value_types == _FLOAT_TYPE:
            return values[:]
        if kind is _KIND_TEXTS and value_types == _STR_TYPE:
            texts = [text for v in values if (text := v.strip(" \x00"))]
            if not all(map(str.isascii, texts)):
                texts = [_unicode(text) for text in texts]
            return texts or None
        parsed = []
        for value in values:
            if value is not None and (one := parse(value)) is not None:
                parsed.append(one)
        return parsed or None
    if not values:
        return None
    if len(values) > 1 and attr.vr in _TEXT_VRS:
        # extract_file keeps a text value whole, backslashes included (PS3.5 6.2: VM 1).
        return parse("\\".join(_json_item_text(v, attr.vr) for v in values))
    first = values[0]
    return None if first is None else parse(first)


def _json_kind(attr: Attribute) -> str:
    """Which fast path of :meth:`Extractor.extract_json` a column may take."""
    is_text = _parser(attr.vr) is _parse_text
    if attr.multi:
        return _KIND_FLOATS if attr.vr in _FLOAT_VRS else _KIND_TEXTS if is_text else _KIND_LIST
    if attr.vr in _INT_VRS:
        return _KIND_INT
    if attr.vr in _FLOAT_VRS:
        return _KIND_FLOAT
    return _KIND_TEXT if is_text else _KIND_OTHER


def _json_parser(vr: str) -> Callable[[Any], Any]:
    """Parser of one DICOM JSON value (a number, string or person-name object) for ``vr``.

    Module-level functions (and partials of them), so that an Extractor pickles for worker
    processes.
    """
    if vr in _INT_VRS:
        return _parse_json_int
    if vr in _FLOAT_VRS:
        return _parse_json_float
    if vr == "PN":
        return _parse_json_person_name
    parser = _parser(vr)
    if parser is _parse_text:
        return _parse_json_text
    # Dates and times repeat across the instances of a study: parse each text once.
    return functools.partial(_parse_json_memo, parser, {})


def _parse_json_text(value: Any) -> str | None:
    text = (value if type(value) is str else _json_scalar_text(value)).strip(" \x00")
    return _unicode(text) if text else None


def _parse_json_memo(parser: Callable[[str], Any], memo: dict[str, Any], value: Any) -> Any:
    """``parser(value)``, remembered in ``memo``, as dates and times repeat within a study.

    The results are immutable (dates, datetimes, strings); values that do not parse are not
    kept.
    """
    text = (value if type(value) is str else _json_scalar_text(value)).strip(" \x00")
    if not text:
        return None
    parsed = memo.get(text)
    if parsed is None:
        if len(memo) >= _JSON_MEMO_SIZE:
            memo.clear()
        parsed = memo[text] = parser(text)
    return parsed


def _parse_json_int(value: Any) -> int | None:
    if isinstance(value, str):
        text = value.strip(" \x00")
        if not text:
            return None
        number = _parse_int(text)
    elif not _is_json_number(value):
        raise BadValueError(f"a JSON {_json_type(value)} is not a number")
    elif isinstance(value, float) and not value.is_integer():
        raise BadValueError(f"{value!r} is not an integer")
    else:
        number = int(value)
    if not _INT64_MIN <= number <= _INT64_MAX:
        raise BadValueError(f"{_excerpt(value)} is out of the int64 range")
    return number


def _parse_json_float(value: Any) -> float | None:
    if isinstance(value, str):
        text = value.strip(" \x00")
        return _parse_float(text) if text else None
    if not _is_json_number(value):
        raise BadValueError(f"a JSON {_json_type(value)} is not a number")
    return float(value)


def _is_json_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _parse_json_person_name(value: Any) -> str | None:
    is_object = type(value) is dict or (type(value) is not str and isinstance(value, Mapping))
    text = _person_name_text(value) if is_object else value
    if not isinstance(text, str):
        raise BadValueError(f"a JSON {_json_type(value)} is not a person name")
    return _parse_person_name(_unicode(text.strip(" \x00")))


def _person_name_text(value: Mapping[str, Any]) -> str:
    """A PS3.18 F.2.2 person name object as PS3.5 6.2.1 text: ``Alphabetic=Ideographic=...``."""
    if len(value) == 1 and type(alphabetic := value.get("Alphabetic")) is str:
        return alphabetic.rstrip("=")  # the common case: a name in one group
    groups = [value.get(group) for group in _PN_GROUPS]
    if not all(g is None or isinstance(g, str) for g in groups):
        raise BadValueError("a person name group is not a JSON string")
    # Trailing empty groups say nothing (PS3.5 6.2.1); extract_file drops them too.
    return "=".join(g or "" for g in groups).rstrip("=")


def _unicode(text: str) -> str:
    """``text``, if it is Unicode that UTF-8 (and Arrow) can hold.

    JSON escapes ``\\ud800`` to ``\\udfff`` decode to lone surrogates, which are not.
    """
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise BadValueError(
                f"{text[:64]!r} holds a lone surrogate (a JSON \\uD800-\\uDFFF escape)"
            ) from None
    return text


def _excerpt(value: Any) -> str:
    """A short repr of a JSON value for a message, however large or deep the value."""
    try:
        return _REPR.repr(value)
    except ValueError:  # an int of more digits than int.__repr__ prints (sys.int_info)
        return f"a JSON {_json_type(value)}"


def _json_scalar_text(value: Any) -> str:
    """A JSON string, or a number as text, for VRs whose values are strings; nothing else."""
    if isinstance(value, str) or _is_json_number(value):
        return str(value)
    raise BadValueError(f"a JSON {_json_type(value)} is not a string")


def _json_item_text(value: Any, vr: str) -> str:
    """One value as DICOM text: empty for null, a person name object (PS3.18 F.2.2) for PN."""
    if value is None:
        return ""
    if vr == "PN" and isinstance(value, Mapping):
        return _person_name_text(value)
    return _json_scalar_text(value)


def _json_type(value: Any) -> str:
    """The JSON name of ``value``'s type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _json_value_text(elem: Any, vr: str) -> str:
    """An element's value as a reject's ``value``: 64 characters, values joined by backslashes."""
    text = _json_values_text(elem, vr)[:64]
    # Lone surrogates (JSON \uD800 escapes) shown as escapes: the rejects table is UTF-8.
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode()


def _json_values_text(elem: Any, vr: str) -> str:
    if isinstance(elem, Mapping):
        values = elem.get(_JSON_VALUE)
        if values is None:
            for key in _JSON_BULK_KEYS:
                if isinstance(elem.get(key), str):
                    return str(elem[key])
        else:
            if isinstance(values, list):
                with contextlib.suppress(ValueError):  # a nested value, an int too long to print
                    return "\\".join(_json_item_text(v, vr) for v in values[:64])
            return _excerpt(values)
    return _excerpt(elem)


def _json_first_text(obj: Mapping[str, Any], key: str) -> str | None:
    """The first value of a text element of ``obj``, if it is a non-empty string."""
    elem = obj.get(key)
    if elem is None:
        return None
    values = elem.get(_JSON_VALUE) if isinstance(elem, Mapping) else None
    if isinstance(values, list) and values and isinstance(values[0], str) and values[0].isascii():
        return values[0].strip(" \x00") or None
    return None


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
        number = value
    else:
        try:
            number = int(value)
        except (TypeError, ValueError):
            as_float = _parse_float(value)
            if not as_float.is_integer():
                raise BadValueError(f"{value!r} is not an integer") from None
            number = int(as_float)
    # The columns are int64: a larger value (an over-long IS, a UV) would fail the batch.
    if not _INT64_MIN <= number <= _INT64_MAX:
        raise BadValueError(f"{str(value)[:32]!r} is out of the int64 range")
    return number


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
