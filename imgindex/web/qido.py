"""QIDO-RS over the index (PS3.18 10.6): DICOMweb clients search what imgindex has indexed.

:func:`qido_app` is a Starlette application with the six search resources::

    GET /studies                                   GET /series
    GET /studies/{study}/series                    GET /instances
    GET /studies/{study}/instances
    GET /studies/{study}/series/{series}/instances

Studies are searched in the ``studies`` table, series in ``series`` (joined with the study
attributes of ``studies``), instances in ``instances``. The index only holds its columns, so
only those can be matched or returned; an attribute it does not hold is a 400 naming it.

Query parameters (PS3.18 8.3.4):

- ``{attribute}={value}``, the attribute by keyword (``PatientID``) or tag (``00100020``).
  Matching follows PS3.4 C.2.2.2: single value; a comma-separated list of UIDs (UI) or of
  code strings (CS); ``*`` and ``?`` wildcards for text (PN case-insensitively); ranges
  ``a-b``, ``a-``, ``-b`` for dates (DA) and times (TM); an empty value or ``*`` matches
  everything. A multi-valued attribute (``ModalitiesInStudy``) matches if any value does.
- ``limit`` (default 100, at most 10,000) and ``offset``; a ``Warning`` header says when more
  results can be requested.
- ``includefield``: keywords or tags, comma-separated or repeated, or ``all``. Attributes the
  index does not hold are left out, and a ``Warning`` header names them.
- ``fuzzymatching=false`` (``true`` is a 400: not supported).

The response is ``application/dicom+json`` (PS3.18 F.2): the default return attributes of
PS3.18 Table 10.6.3-3 to -5 that the index holds, the matching keys and the included fields;
204 No Content when nothing matches. The matching is plain functions: :func:`parse_query`
reads the parameters, :func:`search` runs them as a lazy polars query and
:func:`to_dicom_json` writes the page.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import polars as pl
from pydicom.datadict import dictionary_VR, keyword_dict, keyword_for_tag
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from imgindex.index import Index

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from pathlib import Path

    from starlette.requests import Request

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "Column",
    "Page",
    "Query",
    "QueryError",
    "Resource",
    "dicom_columns",
    "level_frame",
    "match_expr",
    "parse_query",
    "qido_app",
    "search",
    "to_dicom_json",
]

Level = Literal["study", "series", "instance"]

#: Results per response without ``limit``, and the most with it (PS3.18 8.3.4.4).
DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000
MEDIA_TYPE = "application/dicom+json"
_ACCEPTED = ("application/dicom+json", "application/json", "application/*", "*/*")
_WARN_CAPPED = (
    '299 imgindex "The number of results exceeded the maximum supported by the server. '
    'Additional results can be requested."'
)
_WARN_MORE = '299 imgindex "There are more results: request them with offset."'

#: Default return attributes per level (PS3.18 Tables 10.6.3-3, -4, -5), as far as an index
#: can hold them (no RetrieveURL, InstanceAvailability, TimezoneOffsetFromUTC).
STUDY_DEFAULTS = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_DEFAULTS = (
    "Modality",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
)
INSTANCE_DEFAULTS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
)

#: imgindex's count columns under their DICOM keywords.
_RENAMES: dict[str, dict[str, str]] = {
    "studies": {
        "series_count": "NumberOfStudyRelatedSeries",
        "instance_count": "NumberOfStudyRelatedInstances",
    },
    "series": {"instance_count": "NumberOfSeriesRelatedInstances"},
    "instances": {},
}
#: The order results come in (stable, so that offset pages cover everything once).
_ORDER: dict[Level, tuple[str, ...]] = {
    "study": ("StudyInstanceUID",),
    "series": ("StudyInstanceUID", "SeriesNumber", "SeriesInstanceUID"),
    "instance": ("StudyInstanceUID", "SeriesInstanceUID", "InstanceNumber", "SOPInstanceUID"),
}
#: VRs that cannot be columns (sequences, bulk data).
_NOT_COLUMNS = frozenset({"SQ", "OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_INT_VRS = frozenset({"IS", "SS", "US", "SL", "UL", "SV", "UV"})
_FLOAT_VRS = frozenset({"DS", "FL", "FD"})
#: Characters the Rust regex engine (polars) treats as special.
_REGEX_SPECIAL = frozenset("\\.+*?()|[]{}^$#&-~")


class QueryError(ValueError):
    """A query the server cannot answer: the message says why (the 400 response's body)."""


@dataclass(frozen=True)
class Column:
    """A DICOM attribute the searched table holds as a column."""

    keyword: str
    tag: int
    vr: str
    multi: bool

    @property
    def key(self) -> str:
        """The attribute's key in DICOM JSON: eight hex digits."""
        return f"{self.tag:08X}"


@dataclass(frozen=True)
class Resource:
    """One QIDO-RS search resource: its level and the UIDs its path fixes."""

    level: Level
    study: str | None = None
    series: str | None = None

    @property
    def defaults(self) -> tuple[str, ...]:
        """Default return attributes: the level's, and those of the levels above it that the
        path does not fix (PS3.18 10.6.3.3), plus the UIDs of the levels above."""
        above: tuple[str, ...]
        if self.level == "study":
            return STUDY_DEFAULTS
        if self.level == "series":
            above = STUDY_DEFAULTS if self.study is None else ("StudyInstanceUID",)
            return (*above, *SERIES_DEFAULTS)
        if self.series is not None:
            above = ("StudyInstanceUID", "SeriesInstanceUID")
        elif self.study is not None:
            above = ("StudyInstanceUID", *SERIES_DEFAULTS)
        else:
            above = (*STUDY_DEFAULTS, *SERIES_DEFAULTS)
        return (*above, *INSTANCE_DEFAULTS)


@dataclass
class Query:
    """A parsed QIDO-RS query: matching keys, returned attributes, paging, warnings."""

    filters: list[tuple[Column, str]] = field(default_factory=list)
    include: list[Column] = field(default_factory=list)
    include_all: bool = False
    limit: int = DEFAULT_LIMIT
    #: Whether ``limit`` asked for more than :data:`MAX_LIMIT`.
    capped: bool = False
    offset: int = 0
    warnings: list[str] = field(default_factory=list)


def _column_for(keyword: str, dtype: pl.DataType) -> Column | None:
    tag = keyword_dict.get(keyword)
    if tag is None or tag >> 16 == 0x0002:  # file meta (TransferSyntaxUID) is not a search key
        return None
    vr = dictionary_VR(tag).split(" or ")[0]
    if vr in _NOT_COLUMNS:
        return None
    return Column(keyword, tag, vr, isinstance(dtype, pl.List))


def dicom_columns(frame: pl.LazyFrame) -> dict[str, Column]:
    """The columns of ``frame`` that are DICOM attributes (not file meta), by keyword."""
    columns = {}
    for name, dtype in frame.collect_schema().items():
        column = _column_for(name, dtype)
        if column is not None:
            columns[name] = column
    return columns


def _dicom_only(frame: pl.LazyFrame, renames: Mapping[str, str]) -> pl.LazyFrame:
    names = frame.collect_schema().names()
    frame = frame.rename({k: v for k, v in renames.items() if k in names})
    return frame.select(list(dicom_columns(frame)))


def level_frame(index: Index, level: Level) -> pl.LazyFrame:
    """The table searched at ``level``, with DICOM keyword columns only (lazy).

    Series carry the study attributes of their study (a left join on StudyInstanceUID), so
    ``/series?StudyDate=...`` works; counts are renamed to NumberOfStudyRelatedSeries,
    NumberOfStudyRelatedInstances and NumberOfSeriesRelatedInstances.
    """
    if level == "instance":
        return _dicom_only(index.instances, _RENAMES["instances"])
    studies = _dicom_only(index.studies, _RENAMES["studies"])
    if level == "study":
        return studies
    series = _dicom_only(index.series, _RENAMES["series"])
    have = set(series.collect_schema().names())
    extra = [c for c in studies.collect_schema().names() if c not in have]
    if not extra:
        return series
    return series.join(
        studies.select("StudyInstanceUID", *extra), on="StudyInstanceUID", how="left"
    )


def _resolve(name: str) -> str:
    """The keyword of an attribute given by keyword or tag; QueryError if it is neither."""
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        keyword = keyword_for_tag(int(name, 16))
        if not keyword:
            raise QueryError(f"unknown attribute {name!r}: no such tag in the DICOM dictionary")
        return keyword
    if "." in name:
        raise QueryError(
            f"attribute {name!r}: sequence paths are not supported; the index holds no sequences"
        )
    if name not in keyword_dict:
        raise QueryError(
            f"unknown attribute {name!r}: not a DICOM keyword (PS3.6) or tag "
            "(eight hex digits); check its spelling, e.g. 'PatientID' or '00100020'"
        )
    return name


def _int_param(name: str, value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise QueryError(f"{name} must be an integer, not {value!r}") from None
    if number < minimum:
        raise QueryError(f"{name} must be at least {minimum}, not {number}")
    return number


def parse_query(
    params: Iterable[tuple[str, str]], columns: Mapping[str, Column], level: Level = "study"
) -> Query:
    """Read QIDO-RS query parameters (PS3.18 8.3.4) against the columns of ``level``'s table.

    Parameters
    ----------
    params : iterable of (str, str)
        The query's parameters in order, repeats included (``request.query_params
        .multi_items()``).
    columns : mapping of str to Column
        The attributes the searched table holds, by keyword (:func:`dicom_columns`).
    level : {"study", "series", "instance"}
        For messages.

    Returns
    -------
    Query

    Raises
    ------
    QueryError
        For an unknown attribute, an attribute the index does not hold at ``level``, an
        attribute matched twice, a value that does not parse, a bad ``limit`` or ``offset``,
        or ``fuzzymatching=true``.
    """
    query = Query()
    seen: set[str] = set()
    ignored: list[str] = []
    for name, value in params:
        if name == "limit":
            asked = _int_param("limit", value, 1)
            query.limit, query.capped = min(asked, MAX_LIMIT), asked > MAX_LIMIT
        elif name == "offset":
            query.offset = _int_param("offset", value, 0)
        elif name == "fuzzymatching":
            if value.lower() == "true":
                raise QueryError("fuzzymatching=true is not supported; use fuzzymatching=false")
            if value.lower() != "false":
                raise QueryError(f"fuzzymatching must be true or false, not {value!r}")
        elif name == "includefield":
            for item in (v.strip() for v in value.split(",")):
                if not item:
                    continue
                if item == "all":
                    query.include_all = True
                    continue
                keyword = _resolve(item)
                if keyword in columns:
                    query.include.append(columns[keyword])
                else:
                    ignored.append(keyword)
        else:
            keyword = _resolve(name)
            if keyword not in columns:
                raise QueryError(
                    f"{keyword} is not held by the index at the {level} level; it can match "
                    f"on: {', '.join(sorted(columns))}"
                )
            if keyword in seen:
                raise QueryError(f"{keyword} is given more than once")
            seen.add(keyword)
            column = columns[keyword]
            match_expr(column, value)  # a value that does not parse fails here, not later
            query.filters.append((column, value))
    if ignored:
        query.warnings.append(
            f'299 imgindex "includefield: the index does not hold {", ".join(ignored)}"'
        )
    return query


# -- matching (PS3.4 C.2.2.2) ---------------------------------------------------------------


def _regex(pattern: str, *, ignore_case: bool) -> str:
    parts = []
    for char in pattern:
        if char == "*":
            parts.append(".*")
        elif char == "?":
            parts.append(".")
        elif char in _REGEX_SPECIAL:
            parts.append("\\" + char)
        else:
            parts.append(char)
    return ("(?si)" if ignore_case else "(?s)") + "^" + "".join(parts) + "$"


def _date(text: str) -> dt.date:
    try:
        return dt.datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        raise QueryError(f"{text!r} is not a date YYYYMMDD") from None


def _time(text: str, *, upper: bool) -> str:
    """A TM query value as the index writes times (``HH:MM:SS[.ffffff]``); an upper bound of a
    partial time (``10``, ``1030``) runs to the end of that hour or minute."""
    whole, _, fraction = text.replace(":", "").partition(".")
    if not whole.isdigit() or len(whole) not in (2, 4, 6) or (fraction and not fraction.isdigit()):
        raise QueryError(f"{text!r} is not a time HHMMSS.FFFFFF")
    fill = "595959" if upper else "000000"
    whole = whole + fill[len(whole) :]
    hh, mm, ss = whole[:2], whole[2:4], whole[4:6]
    if int(hh) > 23 or int(mm) > 59 or int(ss) > 60:
        raise QueryError(f"{text!r} is not a time HHMMSS.FFFFFF")
    if upper:
        return f"{hh}:{mm}:{ss}." + fraction[:6].ljust(6, "9")
    return f"{hh}:{mm}:{ss}" + (f".{fraction[:6].ljust(6, '0')}" if fraction else "")


def _range(value: str) -> tuple[str, str] | None:
    if "-" not in value:
        return None
    low, _, high = value.partition("-")
    if not low and not high:
        raise QueryError(f"{value!r} is not a range: give at least one end")
    return low, high


def _predicate(target: pl.Expr, column: Column, value: str) -> pl.Expr:
    """Whether one value ``target`` of ``column`` matches the query ``value``."""
    vr = column.vr
    if vr == "DA":
        bounds = _range(value)
        if bounds is None:
            return target == _date(value)
        low, high = bounds
        expr = pl.lit(value=True)
        if low:
            expr = expr & (target >= _date(low))
        if high:
            expr = expr & (target <= _date(high))
        return expr
    if vr == "TM":
        low, high = _range(value) or (value, value)
        expr = pl.lit(value=True)
        if low:
            expr = expr & (target >= _time(low, upper=False))
        if high:
            expr = expr & (target <= _time(high, upper=True))
        return expr
    if vr == "DT":
        raise QueryError(f"{column.keyword}: matching date-times (DT) is not supported")
    if vr in _INT_VRS:
        try:
            return target == int(value)
        except ValueError:
            raise QueryError(f"{column.keyword}: {value!r} is not an integer") from None
    if vr in _FLOAT_VRS:
        try:
            number = float(value)
        except ValueError:
            raise QueryError(f"{column.keyword}: {value!r} is not a number") from None
        if not math.isfinite(number):
            raise QueryError(f"{column.keyword}: {value!r} is not a finite number")
        return target == number
    if vr in ("UI", "CS") and "," in value:
        return target.is_in([v.strip() for v in value.split(",") if v.strip()])
    if vr != "UI" and ("*" in value or "?" in value):
        return target.str.contains(_regex(value, ignore_case=vr == "PN"))
    if vr == "PN":
        return target.str.to_lowercase() == value.lower()
    return target == value


def match_expr(column: Column, value: str) -> pl.Expr | None:
    """A polars filter for ``column`` matching ``value`` (None: universal match).

    Raises
    ------
    QueryError
        If ``value`` does not parse for the column's VR.
    """
    if value in ("", "*"):
        return None
    if column.multi:
        return (
            pl.col(column.keyword)
            .list.eval(_predicate(pl.element(), column, value))
            .list.any()
            .fill_null(value=False)
        )
    return _predicate(pl.col(column.keyword), column, value)


@dataclass(frozen=True)
class Page:
    """One response's worth of matches."""

    #: The matches (at most ``limit`` rows), only the returned attributes.
    frame: pl.DataFrame
    #: The returned attributes, by keyword.
    columns: dict[str, Column]
    #: Whether more matches follow this page.
    more: bool
    #: ``Warning`` header values (RFC 9111 5.5 form, as PS3.18 8.3.4.4 uses).
    warnings: list[str]


def search(index: Index, resource: Resource, params: Iterable[tuple[str, str]]) -> Page:
    """Run one QIDO-RS search over the index: filter, sort, page and project lazily.

    Parameters
    ----------
    index : Index
        The index searched.
    resource : Resource
        The level searched and the UIDs its path fixes.
    params : iterable of (str, str)
        The query parameters (see :func:`parse_query`).

    Raises
    ------
    QueryError
        As :func:`parse_query`.
    """
    frame = level_frame(index, resource.level)
    columns = dicom_columns(frame)
    fixed = [("StudyInstanceUID", resource.study), ("SeriesInstanceUID", resource.series)]
    query = parse_query(params, columns, resource.level)
    exprs = [pl.col(k) == v for k, v in fixed if v is not None]
    exprs += [e for c, v in query.filters if (e := match_expr(c, v)) is not None]
    if query.include_all:
        returned = list(columns)
    else:
        wanted = [
            *resource.defaults,
            *(c.keyword for c, _ in query.filters),
            *(c.keyword for c in query.include),
        ]
        returned = [k for k in dict.fromkeys(wanted) if k in columns]
    returned.sort(key=lambda k: columns[k].tag)
    order = [k for k in _ORDER[resource.level] if k in columns]
    plan = frame.filter(*exprs) if exprs else frame
    page = (
        plan.sort(order, nulls_last=True)
        .slice(query.offset, query.limit + 1)
        .select(returned)
        .collect()
    )
    more = page.height > query.limit
    warnings = list(query.warnings)
    if more:
        warnings.append(_WARN_CAPPED if query.capped else _WARN_MORE)
    return Page(page.head(query.limit), {k: columns[k] for k in returned}, more, warnings)


# -- DICOM JSON (PS3.18 F.2) -----------------------------------------------------------------


def _json_value(column: Column, value: Any) -> Any:
    vr = column.vr
    if vr == "PN":
        groups = str(value).split("=")
        names = ("Alphabetic", "Ideographic", "Phonetic")
        return {n: g for n, g in zip(names, groups, strict=False) if g}
    if vr == "DA" and isinstance(value, dt.date):
        return value.strftime("%Y%m%d")
    if vr == "TM":
        return str(value).replace(":", "")
    if vr == "DT" and isinstance(value, dt.datetime):
        return value.strftime("%Y%m%d%H%M%S.%f") + ("+0000" if value.tzinfo else "")
    if vr in _INT_VRS:
        return int(value)
    if vr in _FLOAT_VRS:
        number = float(value)
        return number if math.isfinite(number) else None
    return str(value)


def _element(column: Column, value: Any) -> dict[str, Any]:
    values = value if column.multi and value is not None else [value]
    encoded = [_json_value(column, v) for v in values if v is not None]
    encoded = [v for v in encoded if v is not None and v != {}]
    if not encoded:
        return {"vr": column.vr}
    return {"vr": column.vr, "Value": encoded}


def to_dicom_json(frame: pl.DataFrame, columns: Mapping[str, Column]) -> list[dict[str, Any]]:
    """The rows of ``frame`` as DICOM JSON objects (PS3.18 F.2), keys in tag order.

    An attribute without a value is written with its ``vr`` and no ``Value`` (zero length).
    """
    ordered = sorted(
        (c for c in columns.values() if c.keyword in frame.columns), key=lambda c: c.tag
    )
    return [
        {c.key: _element(c, row[c.keyword]) for c in ordered} for row in frame.iter_rows(named=True)
    ]


# -- the application -------------------------------------------------------------------------


def _acceptable(accept: str | None) -> bool:
    if not accept:
        return True
    media = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    return any(m in _ACCEPTED for m in media)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"status": status, "error": message}, status_code=status)


def _respond(index: Index, resource: Resource, request: Request) -> Response:
    try:
        page = search(index, resource, request.query_params.multi_items())
    except QueryError as exc:
        return _error(400, str(exc))
    headers = {"Warning": ", ".join(page.warnings)} if page.warnings else None
    if page.frame.height == 0:
        return Response(status_code=204, headers=headers)
    rows = to_dicom_json(page.frame, page.columns)
    body = json.dumps(rows, ensure_ascii=False, separators=(",", ":"))
    return Response(body.encode("utf-8"), media_type=MEDIA_TYPE, headers=headers)


def qido_app(root: str | Path, *, debug: bool = False) -> Starlette:
    """A Starlette application answering QIDO-RS searches over the index under ``root``.

    Each request reads the tables' current versions, so it sees what was indexed since the
    application started.

    Parameters
    ----------
    root : str or Path
        The catalog root (``ROOT/tables``).
    debug : bool
        Starlette's debug mode (tracebacks in 500 responses).

    Examples
    --------
    >>> import uvicorn  # doctest: +SKIP
    >>> uvicorn.run(qido_app("imgindex-data"), host="127.0.0.1", port=8042)  # doctest: +SKIP
    """
    index = Index(root)

    def endpoint(level: Level) -> Any:
        async def handle(request: Request) -> Response:
            if not _acceptable(request.headers.get("accept")):
                return _error(406, f"QIDO-RS here answers {MEDIA_TYPE} only")
            resource = Resource(
                level, request.path_params.get("study"), request.path_params.get("series")
            )
            return await run_in_threadpool(_respond, index, resource, request)

        return handle

    routes = [
        Route("/studies", endpoint("study"), methods=["GET"]),
        Route("/series", endpoint("series"), methods=["GET"]),
        Route("/instances", endpoint("instance"), methods=["GET"]),
        Route("/studies/{study}/series", endpoint("series"), methods=["GET"]),
        Route("/studies/{study}/instances", endpoint("instance"), methods=["GET"]),
        Route("/studies/{study}/series/{series}/instances", endpoint("instance"), methods=["GET"]),
    ]
    return Starlette(debug=debug, routes=routes)
