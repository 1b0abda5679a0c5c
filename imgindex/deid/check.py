"""Scan an export for identifying values of the catalog's patients (``imgindex deid-check``).

An export (a Zarr store with ``manifest.parquet``, EMR Parquet files, a de-identified DICOM
tree, or any mix of them) is checked against the catalog it came from: the index and, if one
was imported, the EMR. Five kinds of finding:

``name``
    a patient's or referring physician's name, an institution or a station name in an
    attribute that holds names (PN, ``InstitutionName``, ``StationName``);
``id``
    a PatientID, OtherPatientIDs, AccessionNumber or StudyID of the index, a
    ``person_source_value`` of the EMR, or a raw ``person_id`` (in a ``person_id`` field);
``uid``
    a Study, Series, SOP Instance or Frame of Reference UID that is in the index;
``date``
    a date of a record linked to a patient that equals one of that patient's original dates
    (the index's study, series, acquisition, content and birth dates; the EMR's event dates
    and birth date): a date that was not shifted;
``text``
    a name or an ID inside other text (descriptions, private elements, file names).

Names match case-insensitively after Unicode NFKC normalisation, with accents stripped, as
whole words. Records (one DICOM file, one JSON file, one Parquet row) are linked to patients by
a raw PatientID or ``person_id``, or, with the de-identification key, by their pseudonyms.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple

import polars as pl

from imgindex.deid.keys import Deidentifier
from imgindex.deid.profile import fold
from imgindex.emr.omop import TABLE_SPECS
from imgindex.emr.tables import Emr
from imgindex.errors import ConfigError, EmrError
from imgindex.index import Index

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

__all__ = ["FINDING_KINDS", "CheckReport", "Finding", "check_export", "mask"]

Kind = Literal["name", "id", "uid", "date", "text"]
#: The kinds of finding, in the order reports list them.
FINDING_KINDS: Final[tuple[Kind, ...]] = ("name", "id", "uid", "date", "text")

#: Index columns whose values are IDs, and how a finding describes them.
_ID_COLUMNS: Final = {
    "PatientID": "PatientID of an index patient",
    "OtherPatientIDs": "OtherPatientIDs of an index patient",
    "AccessionNumber": "AccessionNumber in the index",
    "StudyID": "StudyID in the index",
}
#: Index columns whose whole values are names of places (matched as a whole, not by word).
_PLACE_COLUMNS: Final = ("InstitutionName", "StationName", "InstitutionalDepartmentName")
#: Index columns holding UIDs an export must not carry.
_UID_COLUMNS: Final = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
)
#: Index date columns: a patient's original dates.
_DATE_COLUMNS: Final = (
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "PatientBirthDate",
)
#: Name components too common as words to search for on their own.
_PARTICLES: Final = frozenset(
    [
        "van",
        "von",
        "der",
        "den",
        "del",
        "dem",
        "des",
        "das",
        "dos",
        "della",
        "dello",
        "zum",
        "zur",
        "ter",
        "ten",
        "bin",
        "ibn",
        "mac",
        "herr",
        "frau",
        "prof",
        "med",
        "phd",
        "mrs",
        "miss",
    ]
)
_MIN_NAME = 3
_MIN_ID_IN_TEXT = 4
_MAX_TERM_WORDS = 8
_TEXT_VRS: Final = frozenset({"AE", "CS", "LO", "LT", "SH", "ST", "UC", "UT", "UR"})
#: VRs of the DICOM elements read (the others are numbers, times or pixel data).
_READ_VRS: Final = _TEXT_VRS | {"PN", "UI", "DA", "DT", "SQ", "UN", "OB"}
_WORD = re.compile(r"[^\W_]+")
_UID = re.compile(r"\d+(?:\.\d+)+")
_UID_IN_TEXT = re.compile(r"(?<![\d.])\d+(?:\.\d+)+(?![\d.])")
_DATE_IN_TEXT = re.compile(
    r"(?<![\d.])(?:(\d{4})-(\d{2})-(\d{2})|(\d{4})(\d{2})(\d{2})|(\d{2})\.(\d{2})\.(\d{4}))"
    r"(?![\d.])"
)
_SECTION = re.compile(r"[\^= ]+")
_MAX_PARQUET_CELL = 4096


def mask(value: str) -> str:
    """``value`` for display: the first character of each word kept, the rest ``*``.

    Examples
    --------
    >>> mask("Schröder-Løvås^Zoë")
    'S*******-L****^Z**'
    """
    return _WORD.sub(lambda m: m.group()[0] + "*" * (len(m.group()) - 1), value)


@dataclass(frozen=True)
class Finding:
    """One identifying value found in an export.

    Attributes
    ----------
    path : str
        The file (or folder, for a file or folder name), relative to the export.
    location : str
        Where in it: an attribute keyword, ``(gggg,eeee)`` for a private or unknown element,
        ``Sequence[0].Keyword`` inside a sequence, a JSON key or Parquet column, or
        ``(path)`` for the file or folder name itself.
    kind : str
        One of :data:`FINDING_KINDS`.
    detail : str
        What it matched, e.g. ``PatientName of an index patient``.
    matched : str
        The value found, unmasked (not shown by ``repr``).
    """

    path: str
    location: str
    kind: Kind
    detail: str
    matched: str = field(repr=False)

    @property
    def value(self) -> str:
        """The value found, masked with :func:`mask`."""
        return mask(self.matched)

    def to_dict(self, *, show_values: bool = False) -> dict[str, str]:
        """The finding as a JSON-ready mapping (``value`` masked unless ``show_values``)."""
        return {
            "path": self.path,
            "location": self.location,
            "kind": self.kind,
            "detail": self.detail,
            "value": self.matched if show_values else self.value,
        }


@dataclass
class CheckReport:
    """What :func:`check_export` scanned and found.

    Attributes
    ----------
    path : pathlib.Path
        The export scanned.
    findings : list of Finding
        Everything found, sorted by path, location and kind.
    files : dict of str to int
        Files scanned per kind (``dicom``, ``json``, ``parquet``), and ``skipped`` (chunk
        files, other files) and ``unreadable``.
    records : dict of str to int
        Records scanned per kind: ``dicom`` files, ``json`` files, ``parquet`` rows.
    linked_patients : int
        Index patients at least one record was linked to.
    not_run : list of str
        Checks that could not run, or ran with a reduced scope, and why.
    errors : list of str
        Files that could not be read, and why.
    """

    path: Path
    findings: list[Finding] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)
    records: dict[str, int] = field(default_factory=dict)
    linked_patients: int = 0
    not_run: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether nothing identifying was found."""
        return not self.findings

    def counts(self) -> dict[str, int]:
        """Findings per kind, every kind of :data:`FINDING_KINDS` listed."""
        out: dict[str, int] = dict.fromkeys(FINDING_KINDS, 0)
        for finding in self.findings:
            out[finding.kind] += 1
        return out


class _Source(NamedTuple):
    """Where a reference value comes from: a label for findings, the patient (if any)."""

    label: str
    pid: str | None
    short: bool = False


@dataclass
class _Text:
    """What one text value holds (computed once per distinct value)."""

    exact_ids: list[_Source] = field(default_factory=list)
    ids: list[tuple[str, list[_Source]]] = field(default_factory=list)
    names: list[tuple[str, list[_Source]]] = field(default_factory=list)
    uids: list[str] = field(default_factory=list)
    dates: list[tuple[str, dt.date]] = field(default_factory=list)
    links: frozenset[str] = frozenset()


#: Names are compared as :func:`imgindex.deid.profile.fold` makes them, as cleaning does.
_fold = fold


def _words(text: str) -> tuple[str, list[tuple[str, int, int]]]:
    """``text`` NFKC-normalised, and its folded words with their spans in it."""
    normal = unicodedata.normalize("NFKC", text)
    return normal, [(_fold(m.group()), m.start(), m.end()) for m in _WORD.finditer(normal)]


def _term(text: str) -> tuple[str, ...]:
    return tuple(word for word, _, _ in _words(text)[1])


def _exact(text: str) -> str:
    return unicodedata.normalize("NFKC", text).strip().casefold()


def _date(year: str, month: str, day: str) -> dt.date | None:
    try:
        value = dt.date(int(year), int(month), int(day))
    except ValueError:
        return None
    return value if 1800 <= value.year <= 2200 else None


def _dates_in(text: str) -> list[tuple[str, dt.date]]:
    out = []
    for m in _DATE_IN_TEXT.finditer(text):
        g = m.groups()
        found = _date(*g[0:3]) if g[0] else _date(*g[3:6]) if g[3] else _date(g[8], g[7], g[6])
        if found is not None:
            out.append((m.group(), found))
    return out


class _Reference:
    """The catalog's identifying values, indexed for lookup."""

    def __init__(self, root: Path, deid: Deidentifier | None) -> None:
        self.root = root
        self.index = Index(root)
        self.columns = set(self.index.instances.collect_schema().names())
        self.deid = deid
        self.names: dict[tuple[str, ...], list[_Source]] = defaultdict(list)
        self.exact_ids: dict[str, list[_Source]] = defaultdict(list)
        self.id_terms: dict[tuple[str, ...], list[_Source]] = defaultdict(list)
        self.person_ids: dict[int, list[str | None]] = {}
        self.raw_pids: dict[str, frozenset[str]] = {}
        self.tokens: dict[str, frozenset[str]] = {}
        self.patients: set[str] = set()
        self.emr_notes: list[str] = []
        self.has_emr = False
        self._load_index()
        self._load_emr()
        self._load_tokens()

    # -- loading -------------------------------------------------------------------------

    def _pn_columns(self) -> list[str]:
        from pydicom.datadict import dictionary_VR, tag_for_keyword

        out = []
        for name in sorted(self.columns):
            tag = tag_for_keyword(name)
            if tag is not None and dictionary_VR(tag) == "PN":
                out.append(name)
        return out

    def _load_index(self) -> None:
        pn = self._pn_columns()
        ids = [c for c in _ID_COLUMNS if c in self.columns]
        places = [c for c in _PLACE_COLUMNS if c in self.columns]
        if "PatientID" not in self.columns:
            return
        frame = (
            self.index.instances.select(list(dict.fromkeys(["PatientID", *pn, *ids, *places])))
            .unique()
            .collect()
        )
        self.patients = {p for p in frame["PatientID"].drop_nulls().unique().to_list() if p}
        for column in (*pn, *ids, *places):
            pairs = frame.select(pl.col("PatientID").alias("_pid"), pl.col(column))
            if isinstance(pairs.schema[column], pl.List):
                pairs = pairs.explode(column)
            pairs = pairs.drop_nulls().unique()
            for pid, value in pairs.iter_rows():
                text = str(value)
                if not text.strip():
                    continue
                if column in pn:
                    label = (
                        f"{column} of an index patient"
                        if column == "PatientName"
                        else f"{column} of an index patient's study"
                    )
                    self._add_name(text, _Source(label, pid))
                elif column in places:
                    term = _term(text)
                    if term and len(text.strip()) >= _MIN_NAME:
                        self._add_unique(self.names, term, _Source(f"{column} in the index", None))
                else:
                    self._add_id(text, _Source(_ID_COLUMNS[column], pid))
        for pid in self.patients:
            self.raw_pids[_exact(pid)] = frozenset({pid})

    def _add_name(self, text: str, source: _Source) -> None:
        for component in _SECTION.split(unicodedata.normalize("NFKC", text)):
            component = component.strip()
            if len(component) < _MIN_NAME:
                continue
            term = _term(component)
            if not term or (len(term) == 1 and term[0] in _PARTICLES):
                continue
            self._add_unique(self.names, term, source)
            if len(term) > 1:
                for word in term:
                    if len(word) >= _MIN_NAME and word not in _PARTICLES:
                        self._add_unique(self.names, (word,), source)

    def _add_id(self, text: str, source: _Source) -> None:
        text = text.strip()
        short = len(text) < _MIN_ID_IN_TEXT
        self._add_unique(self.exact_ids, _exact(text), source._replace(short=short))
        if not short:
            term = _term(text)
            if term:
                self._add_unique(self.id_terms, term, source)

    @staticmethod
    def _add_unique(table: dict[Any, list[_Source]], key: Any, source: _Source) -> None:
        sources = table[key]
        if source not in sources and len(sources) < 1000:
            sources.append(source)

    def _load_emr(self) -> None:
        emr = Emr(self.root)
        if not emr.has("person"):
            self.emr_notes.append(
                "EMR: none imported at the root; person_id, person_source_value and EMR "
                "dates were not checked"
            )
            return
        self.has_emr = True
        self.emr = emr
        try:
            links = emr.links().collect()
        except EmrError:
            links = pl.DataFrame(schema={"PatientID": pl.String, "person_id": pl.Int64})
        by_person: dict[int, list[str | None]] = defaultdict(list)
        for pid, person in links.iter_rows():
            by_person[int(person)].append(pid)
            self.raw_pids.setdefault(_exact(pid), frozenset())
            self.raw_pids[_exact(pid)] = self.raw_pids[_exact(pid)] | {pid}
        persons = emr.scan("person").select("person_id", "person_source_value").collect()
        for person, source_value in persons.iter_rows():
            pids = by_person.get(int(person), [])
            self.person_ids[int(person)] = list(pids) or [None]
            if source_value is not None and str(source_value).strip():
                for pid in pids or [None]:
                    self._add_id(str(source_value), _Source("person_source_value in the EMR", pid))
        self.links = links

    def _load_tokens(self) -> None:
        if self.deid is None:
            return
        tokens: dict[str, set[str]] = defaultdict(set)
        for pid in self.patients | {p for ps in self.raw_pids.values() for p in ps}:
            tokens[self.deid.token("PatientID", pid)].add(pid)
        for person, pids in self.person_ids.items():
            known = {p for p in pids if p is not None}
            if known:
                tokens[self.deid.token("person_id", person)].update(known)
        self.tokens = {token: frozenset(pids) for token, pids in tokens.items()}

    # -- lookups -------------------------------------------------------------------------

    def text(self, text: str) -> _Text:
        """What ``text`` holds of the reference."""
        out = _Text()
        stripped = text.strip()
        if not stripped:
            return out
        exact = _exact(stripped)
        out.exact_ids = list(self.exact_ids.get(exact, ()))
        links = set(self.raw_pids.get(exact, ()))
        links |= self.tokens.get(stripped.lower(), frozenset())
        out.links = frozenset(links)
        if _UID.fullmatch(stripped):
            out.uids.append(stripped)
            return out
        out.uids = _UID_IN_TEXT.findall(text)
        out.dates = _dates_in(text)
        normal, words = _words(text)
        out.names = _spans(normal, words, self.names)
        if not out.exact_ids:
            out.ids = _spans(normal, words, self.id_terms)
        return out

    def person(self, value: object) -> list[str | None] | None:
        """The PatientIDs of a raw ``person_id`` (None if it is none)."""
        try:
            number = int(str(value).strip())
        except ValueError:
            return None
        return self.person_ids.get(number)


def _spans(
    normal: str, words: list[tuple[str, int, int]], table: dict[tuple[str, ...], list[_Source]]
) -> list[tuple[str, list[_Source]]]:
    """Greedy longest matches of ``table``'s terms in ``words``; adjacent matches merged."""
    if not table:
        return []
    matches: list[tuple[int, int, list[_Source]]] = []
    i, n = 0, len(words)
    while i < n:
        for length in range(min(_MAX_TERM_WORDS, n - i), 0, -1):
            key = tuple(w for w, _, _ in words[i : i + length])
            sources = table.get(key)
            if sources:
                if matches and matches[-1][1] == i:
                    start, _, before = matches[-1]
                    merged = before + [s for s in sources if s not in before]
                    matches[-1] = (start, i + length, merged)
                else:
                    matches.append((i, i + length, list(sources)))
                i += length
                break
        else:
            i += 1
    return [(normal[words[a][1] : words[b - 1][2]], sources) for a, b, sources in matches]


@dataclass
class _Pending:
    """A name finding waiting for the scope (which patients the export links to)."""

    path: str
    location: str
    kind: Kind
    matched: str
    sources: list[_Source]


class _Scan:
    """One pass over an export: findings now, UIDs and dates resolved set-wise at the end."""

    def __init__(self, export: Path, reference: _Reference, report: CheckReport) -> None:
        self.export = export
        self.ref = reference
        self.report = report
        self.cache: dict[str, _Text] = {}
        self.findings: dict[tuple[str, str, str, str], Finding] = {}
        self.pending: list[_Pending] = []
        self.uids: list[tuple[str, str, str]] = []
        self.dates: list[tuple[int, str, str, str, dt.date]] = []
        self.record_links: list[tuple[int, str]] = []
        self.date_frames: list[pl.DataFrame] = []
        self.link_frames: list[pl.DataFrame] = []
        self.records = 0
        self.folder_links: dict[str, frozenset[str]] = {}

    # -- values --------------------------------------------------------------------------

    def analyse(self, text: str) -> _Text:
        found = self.cache.get(text)
        if found is None:
            found = self.ref.text(text)
            if len(self.cache) > 200_000:
                self.cache.clear()
            self.cache[text] = found
        return found

    def add(self, path: str, location: str, kind: Kind, detail: str, matched: str) -> None:
        key = (path, location, kind, matched)
        if key not in self.findings:
            self.findings[key] = Finding(path, location, kind, detail, matched)

    def text_value(
        self,
        path: str,
        location: str,
        text: str,
        *,
        name_field: bool,
        links: set[str],
        record: int | None,
        dates: bool = True,
    ) -> None:
        """Check one text value of a record; its links and dates go to ``links``/``record``."""
        found = self.analyse(text)
        links |= found.links
        field_name = _last(location)
        exact = [s for s in found.exact_ids if not s.short or s.label.startswith(field_name)]
        if exact:
            self.add(path, location, "id", _detail(exact), text.strip())
        for matched, sources in found.ids:
            self.add(path, location, "text", _detail(sources), matched)
        for matched, sources in found.names:
            kind: Kind = "name" if name_field else "text"
            self.pending.append(_Pending(path, location, kind, matched, sources))
        for uid in found.uids:
            self.uids.append((path, location, uid))
        if dates and record is not None:
            for raw, day in found.dates:
                self.dates.append((record, path, location, raw, day))

    def person_value(self, path: str, location: str, value: object, links: set[str]) -> None:
        """A value in a field named ``person_id``: a raw person_id is a finding and a link."""
        pids = self.ref.person(value)
        if pids is None:
            return
        self.add(path, location, "id", "person_id of an EMR person (not pseudonymized)", str(value))
        links.update(p for p in pids if p is not None)

    def new_record(self, path: str) -> tuple[int, set[str]]:
        number = self.records
        self.records += 1
        return number, set(self.folder_links.get(str(Path(path).parent), frozenset()))

    def close_record(self, number: int, links: set[str]) -> None:
        self.record_links.extend((number, pid) for pid in links)

    # -- files ---------------------------------------------------------------------------

    def run(self) -> None:
        others: list[Path] = []
        for path in self.walk():
            if path.name.endswith(".parquet") or _is_json(path.name):
                self.scan_file(path)
            else:
                others.append(path)
        for path, elements in _read_all(others):
            relative = (
                path.relative_to(self.export).as_posix() if path != self.export else path.name
            )
            if isinstance(elements, str):
                self.count("unreadable")
                self.report.errors.append(f"{relative}: {elements}")
            elif elements is None:
                self.count("skipped")
            else:
                self.count("dicom")
                self.dicom(relative, path, elements)

    def count(self, kind: str) -> None:
        self.report.files[kind] = self.report.files.get(kind, 0) + 1

    def scan_file(self, path: Path) -> None:
        relative = path.relative_to(self.export).as_posix() if path != self.export else path.name
        try:
            if path.name.endswith(".parquet"):
                self.parquet(path, relative)
                kind = "parquet"
            else:
                self.json_file(path, relative)
                kind = "json"
        except Exception as exc:  # noqa: BLE001 - an unreadable file is reported, not fatal
            self.report.errors.append(f"{relative}: {type(exc).__name__}: {exc}")
            kind = "unreadable"
        self.count(kind)

    def walk(self) -> Iterator[Path]:
        if self.export.is_file():
            yield self.export
            return
        for folder, dirs, files in os.walk(self.export):
            here = Path(folder)
            dirs.sort()
            if "zarr.json" in files and "c" in dirs:
                dirs.remove("c")  # chunks and shards: pixel data
                self.report.files["skipped"] = self.report.files.get("skipped", 0) + 1
            if here != self.export:
                self.folder(here)
            for name in sorted(files):
                yield here / name

    def folder(self, here: Path) -> None:
        """A folder's name: checked once; its links (a patient token) apply to the files in it."""
        relative = here.relative_to(self.export).as_posix()
        parent = str(here.parent.relative_to(self.export)) if here.parent != self.export else "."
        links = set(self.folder_links.get(parent, frozenset()))
        self.text_value(
            relative, "(path)", here.name, name_field=False, links=links, record=None, dates=False
        )
        self.folder_links[str(Path(relative))] = frozenset(links)

    def json_file(self, path: Path, relative: str) -> None:
        data = json.loads(path.read_text(encoding="utf-8"))
        number, links = self.new_record(relative)
        self.file_name(relative, path, links)
        values: list[tuple[str, Any]] = []
        _flatten(data, "", values)
        for location, value in values:
            self.plain_value(relative, location, value, links, number)
        self.close_record(number, links)
        self.report.records["json"] = self.report.records.get("json", 0) + 1

    def file_name(self, relative: str, path: Path, links: set[str]) -> None:
        stem = path.name.removesuffix(".dcm")
        if stem not in ("zarr.json", "manifest.parquet"):
            self.text_value(
                relative, "(path)", stem, name_field=False, links=links, record=None, dates=False
            )

    def plain_value(
        self, path: str, location: str, value: Any, links: set[str], record: int
    ) -> None:
        """A JSON value or a Parquet cell."""
        key = _last(location)
        if key == "person_id":
            self.person_value(path, location, value, links)
        if isinstance(value, str):
            self.text_value(
                path, location, value, name_field=_is_name_field(key), links=links, record=record
            )
        elif isinstance(value, dt.date):
            day = value.date() if isinstance(value, dt.datetime) else value
            self.dates.append((record, path, location, value.isoformat(), day))
        elif isinstance(value, int) and not isinstance(value, bool) and key in _ID_COLUMNS:
            self.text_value(path, location, str(value), name_field=False, links=links, record=None)

    # -- DICOM ---------------------------------------------------------------------------

    def dicom(self, relative: str, path: Path, elements: list[_Element]) -> None:
        number, links = self.new_record(relative)
        self.file_name(relative, path, links)
        for location, vr, value in elements:
            if vr == "PN" or vr in _TEXT_VRS:
                name_field = vr == "PN" or _last(location) in _PLACE_COLUMNS
                self.text_value(
                    relative, location, value, name_field=name_field, links=links, record=number
                )
            elif vr == "UI":
                self.uids.append((relative, location, value))
            elif vr in ("DA", "DT"):
                day = _date(value[0:4], value[4:6], value[6:8]) if len(value) >= 8 else None
                if day is not None:
                    self.dates.append((number, relative, location, value, day))
            else:  # a private element of unknown VR, decoded as text
                self.text_value(
                    relative, location, value, name_field=False, links=links, record=number
                )
        self.close_record(number, links)
        self.report.records["dicom"] = self.report.records.get("dicom", 0) + 1

    # -- Parquet -------------------------------------------------------------------------

    def parquet(self, path: Path, relative: str) -> None:
        frame = pl.read_parquet(path)
        base = self.records
        self.records += frame.height
        self.report.records["parquet"] = self.report.records.get("parquet", 0) + frame.height
        if frame.height == 0:
            return
        self.file_name(relative, path, set())
        rows = pl.int_range(0, pl.len(), dtype=pl.Int64).alias("_row") + base
        folder = self.folder_links.get(str(Path(relative).parent), frozenset())
        if folder:
            self.link_frames.append(
                frame.select(rows.alias("record")).join(
                    pl.DataFrame({"pid": sorted(folder)}), how="cross"
                )
            )
        for column, dtype in frame.schema.items():
            values = frame.select(rows.alias("record"), pl.col(column).alias("value"))
            self.parquet_column(relative, column, dtype, values)

    def parquet_column(
        self, path: str, column: str, dtype: pl.DataType, values: pl.DataFrame
    ) -> None:
        if isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.String):
            values = values.explode("value")
            dtype = pl.String()
        if isinstance(dtype, pl.Datetime):
            values = values.with_columns(pl.col("value").dt.date())
            dtype = pl.Date()
        if isinstance(dtype, pl.Date):
            self.date_frames.append(
                values.drop_nulls().select(
                    "record",
                    pl.lit(path).alias("path"),
                    pl.lit(column).alias("location"),
                    pl.col("value").cast(pl.String).alias("text"),
                    pl.col("value").alias("date"),
                )
            )
            return
        key = _last(column)
        if dtype.is_integer() and (key == "person_id" or key in _ID_COLUMNS):
            values = values.with_columns(pl.col("value").cast(pl.String))
            dtype = pl.String()
        if not isinstance(dtype, pl.String):
            return
        distinct = values.get_column("value").drop_nulls().unique().to_list()
        link_rows: list[tuple[str, str]] = []
        date_rows: list[tuple[str, str, dt.date]] = []
        for value in distinct:
            if len(value) > _MAX_PARQUET_CELL:
                value = value[:_MAX_PARQUET_CELL]
            links: set[str] = set()
            if key == "person_id":
                self.person_value(path, column, value, links)
            self.text_value(
                path, column, value, name_field=_is_name_field(key), links=links, record=None
            )
            link_rows.extend((value, pid) for pid in links)
            date_rows.extend((value, raw, day) for raw, day in self.analyse(value).dates)
        if link_rows:
            mapping = pl.DataFrame(link_rows, schema=["value", "pid"], orient="row")
            self.link_frames.append(values.join(mapping, on="value").select("record", "pid"))
        if date_rows:
            mapping = pl.DataFrame(
                date_rows,
                schema={"value": pl.String, "text": pl.String, "date": pl.Date},
                orient="row",
            )
            self.date_frames.append(
                values.join(mapping, on="value").select(
                    "record",
                    pl.lit(path).alias("path"),
                    pl.lit(column).alias("location"),
                    "text",
                    "date",
                )
            )

    # -- set-wise checks -----------------------------------------------------------------

    def linked(self) -> tuple[pl.DataFrame, set[str]]:
        frames = [
            pl.DataFrame(
                self.record_links, schema={"record": pl.Int64, "pid": pl.String}, orient="row"
            ),
            *(
                f.select(pl.col("record").cast(pl.Int64), pl.col("pid").cast(pl.String))
                for f in self.link_frames
            ),
        ]
        links = pl.concat(frames).unique()
        pids = set(links.get_column("pid").to_list()) & self.ref.patients
        emr_pids = set(links.get_column("pid").to_list())
        return links, pids | emr_pids

    def finish(self) -> None:
        links, pids = self.linked()
        self.report.linked_patients = len(pids & self.ref.patients)
        self.resolve_names(pids)
        self.resolve_uids()
        self.resolve_dates(links, pids)
        self.report.findings = sorted(
            self.findings.values(),
            key=lambda f: (f.path, FINDING_KINDS.index(f.kind), f.location, f.matched),
        )

    def resolve_names(self, pids: set[str]) -> None:
        everyone = not pids
        if everyone and self.pending:
            self.report.not_run.append(
                "names: no record could be linked to an index patient, so the names of every "
                f"index patient ({len(self.ref.patients)}) were searched"
            )
        for pending in self.pending:
            kept = [s for s in pending.sources if everyone or s.pid is None or s.pid in pids]
            if kept:
                self.add(
                    pending.path, pending.location, pending.kind, _detail(kept), pending.matched
                )

    def resolve_uids(self) -> None:
        if not self.uids:
            return
        columns = [c for c in _UID_COLUMNS if c in self.ref.columns]
        candidates = pl.DataFrame(
            self.uids, schema=["path", "location", "uid"], orient="row"
        ).unique()
        wanted = candidates.select("uid").unique()
        hits = (
            self.ref.index.instances.select(columns)
            .unpivot(variable_name="column", value_name="uid")
            .join(wanted.lazy(), on="uid", how="semi")
            .unique()
            .collect()
        )
        joined = (
            candidates.join(hits, on="uid")
            .group_by("path", "location", "uid")
            .agg(pl.col("column").unique().sort())
        )
        for path, location, uid, found in joined.iter_rows():
            detail = " and ".join(found) + " in the index"
            self.add(path, location, "uid", detail, uid)

    def resolve_dates(self, links: pl.DataFrame, pids: set[str]) -> None:
        frames = [
            pl.DataFrame(
                self.dates,
                schema={
                    "record": pl.Int64,
                    "path": pl.String,
                    "location": pl.String,
                    "text": pl.String,
                    "date": pl.Date,
                },
                orient="row",
            ),
            *(f.with_columns(pl.col("record").cast(pl.Int64)) for f in self.date_frames),
        ]
        dates = pl.concat(frames, how="vertical_relaxed")
        if dates.is_empty():
            return
        unlinked = dates.join(links, on="record", how="anti").get_column("record").n_unique()
        if unlinked:
            reason = (
                "and no key to map pseudonyms back"
                if self.ref.deid is None
                else "by a raw or pseudonymized PatientID or person_id"
            )
            self.report.not_run.append(
                f"dates: {unlinked} record(s) holding dates could not be linked to a patient "
                f"({reason}); their dates were not checked"
            )
        if not pids:
            return
        originals = _patient_dates(self.ref, pids)
        if originals.is_empty():
            return
        hits = (
            dates.join(links, on="record")
            .join(originals, on=["pid", "date"])
            .group_by("path", "location", "text", "pid")
            .agg(pl.col("source").unique().sort(), pl.col("record").n_unique().alias("records"))
        )
        known: dict[str, set[dt.date]] = defaultdict(set)
        if self.ref.deid is not None:
            for pid, day in originals.select("pid", "date").iter_rows():
                known[pid].add(day)
        for path, location, text, pid, sources, records in hits.iter_rows():
            if self.ref.deid is not None:
                day = _first_date(text)
                if day is not None:
                    back = day - dt.timedelta(days=self.ref.deid.shift_days(pid))
                    if back in known[pid]:
                        continue  # a shifted date that happens to equal another original
            sources = sorted(sources, key=_date_rank)
            listed = ", ".join(sources[:2]) + (
                f" (+{len(sources) - 2})" if len(sources) > 2 else ""
            )
            more = f", in {records} records" if records > 1 else ""
            detail = f"not shifted: the linked patient's {listed}{more}"
            self.add(path, location, "date", detail, text)


def _date_rank(source: str) -> tuple[int, str]:
    for rank, column in enumerate(_DATE_COLUMNS):
        if source == f"index {column}":
            return rank, source
    return len(_DATE_COLUMNS), source


#: One DICOM element value: location, VR, the value as text.
_Element = tuple[str, str, str]
#: Files read in one process before the scan uses a pool of them.
_POOL_FROM = 400


def _is_json(name: str) -> bool:
    return name.endswith(".json") or name in (".zattrs", ".zgroup", ".zarray")


def _read_all(paths: list[Path]) -> Iterator[tuple[Path, list[_Element] | str | None]]:
    """:func:`read_dicom` of every path, in order; in worker processes when there are many."""
    if len(paths) < _POOL_FROM:
        for path in paths:
            yield path, read_dicom(path)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = min(8, len(os.sched_getaffinity(0)))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        yield from zip(paths, pool.map(read_dicom, paths, chunksize=64), strict=True)


def read_dicom(path: Path) -> list[_Element] | str | None:
    """The text, PN, UID, date and private values of a DICOM file (None if it is not one, the
    error's text if it cannot be read)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
        if head[128:132] != b"DICM":
            return None
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out: list[_Element] = []
        if ds.file_meta is not None:
            _elements(ds.file_meta, "", out)
        _elements(ds, "", out)
    except Exception as exc:  # noqa: BLE001 - reported as unreadable
        return f"{type(exc).__name__}: {exc}"
    return out


def _elements(ds: Any, prefix: str, out: list[_Element]) -> None:
    for raw in ds.elements():
        # Convert only the elements that can hold text, UIDs or dates: converting every
        # numeric value is most of the time pydicom takes.
        if (raw.VR or _dictionary_vr(raw.tag)) not in _READ_VRS:
            continue
        elem = ds[raw.tag]
        tag = elem.tag
        location = prefix + (elem.keyword or f"({tag.group:04X},{tag.element:04X})")
        vr = elem.VR
        if vr == "SQ":
            for i, item in enumerate(elem.value or ()):
                _elements(item, f"{location}[{i}].", out)
            continue
        for value in _values(elem.value):
            if value is None or value == "":
                continue
            if vr == "PN" or vr in _TEXT_VRS:
                out.append((location, vr, str(value)))
            elif vr == "UI":
                out.append((location, vr, str(value).strip("\0 ")))
            elif vr in ("DA", "DT"):
                out.append((location, vr, str(value).strip()))
            elif vr in ("UN", "OB") and tag.is_private and isinstance(value, bytes):
                text = _decode(value)
                if text:
                    out.append((location, "UN", text))


def _first_date(text: str) -> dt.date | None:
    found = _dates_in(text)
    if found:
        return found[0][1]
    if len(text) >= 10 and text[4] == "-":
        return _date(text[0:4], text[5:7], text[8:10])
    if len(text) >= 8 and text[:8].isdigit():
        return _date(text[0:4], text[4:6], text[6:8])
    return None


def _patient_dates(ref: _Reference, pids: set[str]) -> pl.DataFrame:
    """``pid``, ``date``, ``source``: the original dates of the patients ``pids``."""
    schema = {"pid": pl.String, "date": pl.Date, "source": pl.String}
    frames = [pl.DataFrame(schema=schema)]
    wanted = sorted(pids)
    columns = [c for c in _DATE_COLUMNS if c in ref.columns]
    if columns and "PatientID" in ref.columns:
        frames.append(
            ref.index.instances.filter(pl.col("PatientID").is_in(wanted))
            .select(pl.col("PatientID").alias("pid"), *[pl.col(c).cast(pl.Date) for c in columns])
            .unpivot(index="pid", variable_name="source", value_name="date")
            .drop_nulls()
            .unique()
            .select("pid", "date", ("index " + pl.col("source")).alias("source"))
            .collect()
        )
    if ref.has_emr:
        links = ref.links.filter(pl.col("PatientID").is_in(wanted)).rename({"PatientID": "pid"})
        persons = links.get_column("person_id").unique().to_list()
        for name, spec in TABLE_SPECS.items():
            if not ref.emr.has(name) or "person_id" not in spec.names:
                continue
            dated = [c.name for c in spec.columns if c.kind in ("date", "datetime")]
            if not dated:
                continue
            rows = (
                ref.emr.scan(name)
                .filter(pl.col("person_id").is_in(persons))
                .select("person_id", *[pl.col(c).cast(pl.Date) for c in dated])
                .unpivot(index="person_id", variable_name="source", value_name="date")
                .drop_nulls()
                .unique()
                .collect()
            )
            frames.append(
                rows.join(links, on="person_id").select(
                    "pid", "date", (f"EMR {name}." + pl.col("source")).alias("source")
                )
            )
        birth = (
            ref.emr.scan("person")
            .filter(pl.col("person_id").is_in(persons))
            .select(
                "person_id",
                pl.date(
                    pl.col("year_of_birth"),
                    pl.col("month_of_birth"),
                    pl.col("day_of_birth"),
                ).alias("date"),
            )
            .drop_nulls()
            .collect()
        )
        frames.append(
            birth.join(links, on="person_id").select(
                "pid", "date", pl.lit("EMR person birth date").alias("source")
            )
        )
    return pl.concat(frames, how="vertical_relaxed").unique()


def _values(value: Any) -> Iterable[Any]:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)
    return [value]


def _decode(raw: bytes) -> str:
    if len(raw) > _MAX_PARQUET_CELL:
        return ""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    text = text.strip("\0 ")
    printable = sum(c.isprintable() for c in text)
    return text if text and printable >= 0.9 * len(text) else ""


def _flatten(data: Any, location: str, out: list[tuple[str, Any]]) -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            if not location and key == "attributes":
                _flatten(value, "", out)
            else:
                _flatten(value, f"{location}.{key}" if location else str(key), out)
    elif isinstance(data, list):
        for item in data:
            _flatten(item, location, out)
    elif data is not None:
        out.append((location, data))


def _last(location: str) -> str:
    return re.split(r"[.\]]", location)[-1]


def _dictionary_vr(tag: int) -> str:
    from pydicom.datadict import dictionary_VR

    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


@functools.cache
def _is_name_field(key: str) -> bool:
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    if key in _PLACE_COLUMNS:
        return True
    tag = tag_for_keyword(key)
    return tag is not None and dictionary_VR(tag) == "PN"


def _detail(sources: list[_Source]) -> str:
    return "; ".join(dict.fromkeys(s.label for s in sources))


def check_export(
    path: str | os.PathLike[str],
    root: str | os.PathLike[str],
    *,
    deid: Deidentifier | None = None,
) -> CheckReport:
    """Scan the export at ``path`` for identifying values of the catalog at ``root``.

    Parameters
    ----------
    path : str or path-like
        The export: a folder (a Zarr store, a DICOM tree, EMR Parquet files, ...) scanned
        recursively, or one file. Zarr chunk and shard files (``c/`` folders) are skipped.
    root : str or path-like
        The catalog the export came from: its index and, if imported, its EMR are the
        reference.
    deid : Deidentifier, optional
        The key the export was pseudonymized with, to link pseudonymized records to their
        patients (for the date check). Default: the catalog's key
        (``ROOT/secrets/deid.key``) if it exists; without one, only records with a raw
        PatientID or person_id are linked.

    Returns
    -------
    CheckReport
        The findings, what was scanned, and the checks that could not run.

    Raises
    ------
    ConfigError
        If ``path`` does not exist or there is no index at ``root``.

    Examples
    --------
    >>> report = check_export("EXPORT.zarr", "imgindex-data")  # doctest: +SKIP
    >>> report.counts()  # doctest: +SKIP
    {'name': 0, 'id': 0, 'uid': 0, 'date': 0, 'text': 0}
    """
    export = Path(path)
    root = Path(root)
    if not export.exists():
        raise ConfigError(f"{export}: no such file or folder")
    if not Index(root).table("instances").exists:
        raise ConfigError(f"no index at {root} (index files first, or pass --root)")
    report = CheckReport(export)
    if deid is None and (root / "secrets" / "deid.key").is_file():
        deid = Deidentifier.for_root(root)
    if deid is None:
        report.not_run.append(
            "pseudonyms: no de-identification key (no ROOT/secrets/deid.key, no "
            "--deid-key-file), so pseudonymized records were not linked to patients"
        )
    reference = _Reference(root, deid)
    report.not_run.extend(reference.emr_notes)
    scan = _Scan(export, reference, report)
    scan.run()
    scan.finish()
    return report
