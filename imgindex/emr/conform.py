"""Make a table as a source gave it into a canonical CDM table, or say exactly what is wrong.

What :func:`conform_table` does, in order:

1. Column names are made lower case (sources write ``PERSON_ID``, ``Person_Id``...).
2. CDM v5.3 names are renamed to v5.4 (:data:`imgindex.emr.omop.V53_RENAMED`).
3. A required column that is missing fails the import (:class:`EmrError` naming table and
   column); columns the CDM does not have are dropped, with a note.
4. Each column is cast to its canonical type, strictly: a value that cannot be read (a date
   ``2023-13-45``, a person_id ``abc``, an id ``1.5``) fails the import with the table, the
   column, the value and the row. Nothing becomes null silently.
5. Optional columns the source lacks are added as typed nulls: every table has every v5.4
   column, in the CDM's order.
6. Key columns, ``person_id`` and an event table's date may not be empty; other required
   columns that are empty somewhere get a note.

Values read from text: integers may carry a zero fraction (``12.0``, as some exports write
them); dates are ``YYYY-MM-DD`` or ``YYYYMMDD`` (OHDSI Athena's vocabulary files), or a
datetime whose date is taken; datetimes are ``YYYY-MM-DD HH:MM[:SS[.ffffff]]`` (or with ``T``),
a date (midnight), or with a UTC offset (``Z``, ``+02:00``), converted to UTC. Values with an
offset from typed sources (``timestamptz``) are converted to UTC too: the CDM's datetimes have
no time zone. Text is kept as it is, but empty or blank numbers and dates are nulls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import polars as pl

from imgindex.emr.omop import V53_RENAMED
from imgindex.errors import EmrError

if TYPE_CHECKING:
    from collections.abc import Callable

    from imgindex.emr.omop import Kind, TableSpec

__all__ = ["RawTable", "conform_table"]

#: How each kind is described in messages.
_DESCRIBED: Final[dict[str, str]] = {
    "int": "an integer",
    "float": "a number",
    "date": "a date (YYYY-MM-DD or YYYYMMDD)",
    "datetime": "a datetime (YYYY-MM-DD HH:MM:SS)",
    "string": "text",
}
_DATE_FORMATS: Final = ("%Y-%m-%d", "%Y%m%d", "%Y/%m/%d")
# Without fractions first: polars parses that spelling several times faster.
_DATETIME_FORMATS: Final = (
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d",
    "%Y%m%d %H:%M:%S%.f",
    "%Y%m%d",
    "%Y/%m/%d %H:%M:%S%.f",
    "%Y/%m/%d",
)
_ZONED_FORMAT: Final = "%Y-%m-%d %H:%M:%S%.f%#z"
#: Values shown in a message about bad values.
_SHOWN_CHARS: Final = 60


@dataclass(frozen=True)
class RawTable:
    """A table as a source gave it.

    Attributes
    ----------
    name : str
        The CDM table it is (lower case).
    where : str
        Where it came from, for messages (a file path, ``schema.table in DB``).
    frame : polars.DataFrame
        Its rows, with the source's column names and types.
    row_label : callable or None
        Describes row ``i`` (0-based) for messages, e.g. ``"row 3 (line 4)"``; None for
        sources whose rows have no order (databases): rows are named by their key.
    """

    name: str
    where: str
    frame: pl.DataFrame
    row_label: Callable[[int], str] | None = None


@dataclass(frozen=True)
class Conformed:
    """A canonical table and what conforming it changed."""

    frame: pl.DataFrame
    renamed: dict[str, str]
    added: tuple[str, ...]
    dropped: tuple[str, ...]
    notes: tuple[str, ...]


def conform_table(raw: RawTable, spec: TableSpec) -> Conformed:
    """Return ``raw`` as the canonical table ``spec``.

    Parameters
    ----------
    raw : RawTable
        The table as read.
    spec : TableSpec
        What it must become.

    Returns
    -------
    Conformed
        The table (every column of ``spec``, in order, with canonical types) and notes.

    Raises
    ------
    EmrError
        If a required column is missing, two columns have one name, a value cannot be read as
        its column's type, or a key, ``person_id`` or event date is empty.
    """
    frame = _canonical_names(raw, spec)
    renamed: dict[str, str] = {}
    notes: list[str] = []
    for old, new in V53_RENAMED.get(spec.name, {}).items():
        if old not in frame.columns:
            continue
        if new in frame.columns:
            notes.append(f"{spec.name}: has both {old} (CDM v5.3) and {new} (v5.4); {old} ignored")
            frame = frame.drop(old)
        else:
            frame = frame.rename({old: new})
            renamed[old] = new
    missing = [name for name in spec.required if name not in frame.columns]
    if missing:
        columns = ", ".join(f"{spec.name}.{name}" for name in missing)
        plural = "s" if len(missing) > 1 else ""
        raise EmrError(f"{columns}: required column{plural} missing in {raw.where}")
    dropped = tuple(name for name in frame.columns if name not in spec.names)
    if dropped:
        notes.append(f"{spec.name}: columns not in the CDM dropped: {', '.join(dropped)}")
    added = tuple(name for name in spec.names if name not in frame.columns)
    label = raw.row_label or _key_label(frame, spec)
    out: list[pl.Series] = []
    for column in spec.columns:
        if column.name in frame.columns:
            source = frame.get_column(column.name)
            series = _cast(source, column.kind, spec.name, raw.where, label)
        else:
            series = pl.repeat(None, frame.height, dtype=_DTYPES[column.kind], eager=True)
        out.append(series.alias(column.name))
    result = pl.DataFrame(out)
    notes.extend(_check_values(result, spec, raw.where, label))
    return Conformed(result, renamed, added, dropped, tuple(notes))


_DTYPES: Final[dict[Kind, pl.DataType]] = {
    "int": pl.Int64(),
    "float": pl.Float64(),
    "date": pl.Date(),
    "datetime": pl.Datetime("us"),
    "string": pl.String(),
}


def _canonical_names(raw: RawTable, spec: TableSpec) -> pl.DataFrame:
    """The frame with its columns named as ``spec`` names them (``PatientID``), or lower case."""
    spelled = {name.lower(): name for name in spec.names}
    seen: dict[str, str] = {}
    for name in raw.frame.columns:
        lowered = name.strip().lstrip("\ufeff").strip('"').lower()
        lowered = spelled.get(lowered, lowered)
        if lowered in seen:
            raise EmrError(
                f"{spec.name}.{lowered}: two columns ({seen[lowered]!r} and {name!r}) in "
                f"{raw.where} have this name when case is ignored"
            )
        seen[lowered] = name
    return raw.frame.rename({original: lowered for lowered, original in seen.items()})


def _key_label(frame: pl.DataFrame, spec: TableSpec) -> Callable[[int], str]:
    keys = [k for k in spec.key if k in frame.columns]

    def label(i: int) -> str:
        if not keys:
            return f"row {i + 1}"
        values = ", ".join(f"{k} {frame.get_column(k)[i]!r}" for k in keys)
        return f"the row with {values}"

    return label


def _cast(
    source: pl.Series, kind: Kind, table: str, where: str, label: Callable[[int], str]
) -> pl.Series:
    """Cast ``source`` to ``kind``; raise :class:`EmrError` on the first value that fails."""
    result, readable = _convert(source, kind)
    bad = source.is_not_null() & result.is_null()
    if readable is not None:
        bad = bad | ~readable
    if source.dtype == pl.String and bad.any():
        # Blank text in a column of numbers or dates is an empty value, not a bad one.
        bad = bad & (source.str.strip_chars() != "")
    if bad.any():
        positions = bad.arg_true()
        first = int(positions[0])
        value = str(source[first])
        if len(value) > _SHOWN_CHARS:
            value = value[:_SHOWN_CHARS] + "..."
        count = len(positions)
        more = f"; {count:,} values of the column cannot be read" if count > 1 else ""
        raise EmrError(
            f"{table}.{source.name}: {value!r} in {label(first)} of {where} is not "
            f"{_DESCRIBED[kind]}{more}"
        )
    return result


def _convert(source: pl.Series, kind: Kind) -> tuple[pl.Series, pl.Series | None]:
    """``source`` as ``kind`` (null where unreadable), and a mask of readable values when
    nulls alone do not show every failure."""
    dtype = source.dtype
    if kind == "string":
        return (source if dtype == pl.String else source.cast(pl.String)), None
    if dtype == pl.String:
        return _parse(source, kind), None
    if isinstance(dtype, pl.Decimal) and kind == "int":
        return _parse(source.cast(pl.String), kind), None
    if kind == "int":
        if dtype.is_float():
            integral = source.is_null() | (source.is_finite() & (source == source.floor()))
            return source.cast(pl.Int64, strict=False), integral.fill_null(True)
        return source.cast(pl.Int64, strict=False), None
    if kind == "float":
        return source.cast(pl.Float64, strict=False), None
    if kind == "date":
        if isinstance(dtype, pl.Datetime):
            return _naive_utc(source).dt.date(), None
        if dtype.is_integer():
            return _parse(source.cast(pl.String), kind), None
        return source.cast(pl.Date, strict=False), None
    # datetime
    if isinstance(dtype, pl.Datetime):
        return _naive_utc(source).cast(pl.Datetime("us")), None
    if dtype.is_integer():
        return _parse(source.cast(pl.String), kind), None
    return source.cast(pl.Datetime("us"), strict=False), None


def _naive_utc(source: pl.Series) -> pl.Series:
    dtype = source.dtype
    assert isinstance(dtype, pl.Datetime)
    if dtype.time_zone is None:
        return source
    return source.dt.convert_time_zone("UTC").dt.replace_time_zone(None)


def _parse(text: pl.Series, kind: Kind) -> pl.Series:
    """Parse text as ``kind``; null where it does not parse.

    The common spelling is tried on the whole column first; the others (blanks around a
    value, ``12.0`` for an integer, other date formats) only on what is left, so that a
    clean column of millions of values costs one pass.
    """
    result = _parse_trimmed(text, kind)
    if _unparsed(text, result):
        result = result.fill_null(_parse_trimmed(text.str.strip_chars(), kind))
    return result


def _parse_trimmed(text: pl.Series, kind: Kind) -> pl.Series:
    if kind == "int":
        result = text.cast(pl.Int64, strict=False)
        if _unparsed(text, result):
            fraction = text.str.replace(r"\.0*$", "").cast(pl.Int64, strict=False)
            result = result.fill_null(fraction)
        return result
    if kind == "float":
        return text.cast(pl.Float64, strict=False)
    if kind == "date":
        result = _first_format(text, pl.Date(), _DATE_FORMATS)
        if _unparsed(text, result):
            # A datetime in a date column: its date.
            result = result.fill_null(_parse_trimmed(text, "datetime").dt.date())
        return result
    result = _first_format(text, pl.Datetime("us"), _DATETIME_FORMATS)
    if _unparsed(text, result):
        zoned = (
            text.str.replace("T", " ", literal=True)
            .str.replace(r"Z$", "+00:00")
            .str.strptime(pl.Datetime("us", "UTC"), _ZONED_FORMAT, strict=False, exact=True)
        )
        result = result.fill_null(zoned.dt.replace_time_zone(None))
    return result


def _first_format(
    text: pl.Series, dtype: pl.Date | pl.Datetime, formats: tuple[str, ...]
) -> pl.Series:
    """Each value parsed with the first of ``formats`` that reads it."""
    result = text.str.strptime(dtype, formats[0], strict=False, exact=True)
    for fmt in formats[1:]:
        if not _unparsed(text, result):
            break
        result = result.fill_null(text.str.strptime(dtype, fmt, strict=False, exact=True))
    return result


def _unparsed(text: pl.Series, result: pl.Series) -> bool:
    return result.null_count() > text.null_count()


def _check_values(
    frame: pl.DataFrame, spec: TableSpec, where: str, label: Callable[[int], str]
) -> list[str]:
    """Fail on empty keys, person_id or event date; note other gaps and repeated keys."""
    notes: list[str] = []
    never_empty = dict.fromkeys(
        [*spec.key, *(["person_id"] if "person_id" in spec.names else []), spec.date_column]
    )
    for name in spec.required:
        nulls = frame.get_column(name).null_count()
        if not nulls:
            continue
        if name in never_empty:
            first = int(frame.get_column(name).is_null().arg_true()[0])
            raise EmrError(
                f"{spec.name}.{name}: empty in {label(first)} of {where} ({nulls:,} rows "
                "have no value); every row needs one"
            )
        notes.append(
            f"{spec.name}.{name}: {nulls:,} rows have no value although the CDM requires one"
        )
    if frame.height:
        repeated = frame.height - frame.select(pl.struct(list(spec.key)).n_unique()).item()
        if repeated:
            notes.append(
                f"{spec.name}: {repeated:,} rows repeat the {', '.join(spec.key)} of another row"
            )
    return notes
