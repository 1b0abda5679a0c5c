"""Where OMOP CDM tables come from: a folder of files, a DuckDB database, or PostgreSQL.

Each source lists the CDM tables it has and reads one at a time into a polars DataFrame with
the source's own column names and types; :mod:`imgindex.emr.conform` makes them canonical.

- **Folder**: one file per table, named as OHDSI names them, in any case:
  ``CONDITION_OCCURRENCE.csv``, ``condition_occurrence.parquet``, ``concept.csv.gz``, or a
  sub-folder ``measurement/`` of Parquet files. CSV is read as text (types come later); the
  delimiter is sniffed from the header, so OHDSI Athena's vocabulary files, which are
  tab-separated *without* quoting, are read as they are.
- **DuckDB**: a database file, opened read-only; tables of one schema (default ``main``).
- **PostgreSQL**: a ``postgresql://`` URL, read through ADBC straight into Arrow (no rows go
  through Python); tables of one schema (default ``public``).
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit, urlunsplit

import polars as pl
import pyarrow as pa

from imgindex.emr.conform import RawTable
from imgindex.errors import EmrError

if TYPE_CHECKING:
    import os
    from collections.abc import Iterable
    from types import TracebackType
    from typing import Self

__all__ = ["Source", "open_source", "read_crosswalk_file", "redact_url"]

logger = logging.getLogger(__name__)

#: File name endings a folder's tables may have (compared in lower case).
_CSV_SUFFIXES: Final = (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".txt.gz")
_PARQUET_SUFFIXES: Final = (".parquet", ".pq")
#: DuckDB's database files carry this at byte 8.
_DUCKDB_MAGIC: Final = b"DUCK"
_POSTGRES_SCHEMES: Final = ("postgresql://", "postgres://")
#: Tables a source is asked for besides the ones imported: ``cdm_source`` names the version.
CDM_SOURCE: Final = "cdm_source"


def redact_url(url: str) -> str:
    """``url`` without its password (``postgresql://user:***@host/db``)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


class Source:
    """A place CDM tables are read from; a context manager that closes it.

    Attributes
    ----------
    kind : str
        ``"folder"``, ``"duckdb"`` or ``"postgresql"``.
    description : str
        What it is, for people (a path, a URL without password, with the schema).
    """

    kind: str = ""
    description: str = ""

    def tables(self) -> dict[str, str]:
        """The tables it has: lower-case name to where it is (for messages)."""
        raise NotImplementedError

    def read(self, name: str) -> RawTable:
        """Read table ``name`` (a key of :meth:`tables`) whole.

        Raises
        ------
        EmrError
            If the table cannot be read.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release the connection, if any."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_source(source: str | os.PathLike[str], schema: str | None = None) -> Source:
    """Open SOURCE: a folder, a DuckDB database file or a ``postgresql://`` URL.

    Parameters
    ----------
    source : str or path-like
        Where the tables are.
    schema : str, optional
        For databases, the schema holding the CDM tables (default ``main`` for DuckDB,
        ``public`` for PostgreSQL). Not allowed for a folder.

    Returns
    -------
    Source
        The opened source; close it (or use it as a context manager).

    Raises
    ------
    EmrError
        If SOURCE is none of these, cannot be opened, or has no such schema.
    """
    text = str(source)
    if text.startswith(_POSTGRES_SCHEMES):
        return _PostgresSource(text, schema or "public")
    path = Path(source)
    if path.is_dir():
        if schema is not None:
            raise EmrError(f"--schema is for databases; {path} is a folder of files")
        return _FolderSource(path)
    if path.is_file():
        with path.open("rb") as file:
            head = file.read(16)
        if head[8:12] == _DUCKDB_MAGIC:
            return _DuckDBSource(path, schema or "main")
        raise EmrError(
            f"{path} is a file but not a DuckDB database: give a folder of CSV/Parquet files, "
            "a DuckDB file, or a postgresql:// URL"
        )
    raise EmrError(
        f"no such folder or file: {text} (SOURCE is a folder of CSV/Parquet files, a DuckDB "
        "file, or a postgresql://USER@HOST:PORT/DB URL)"
    )


def _table_name(path: Path) -> tuple[str, str] | None:
    """``(table, "csv"|"parquet")`` for a file or folder named like a table, else None."""
    lowered = path.name.lower()
    if path.is_dir():
        if any(p.suffix.lower() in _PARQUET_SUFFIXES for p in path.iterdir() if p.is_file()):
            return lowered, "parquet"
        return None
    for suffix in _CSV_SUFFIXES:
        if lowered.endswith(suffix):
            return lowered[: -len(suffix)], "csv"
    for suffix in _PARQUET_SUFFIXES:
        if lowered.endswith(suffix):
            return lowered[: -len(suffix)], "parquet"
    return None


def _sniff_separator(path: Path) -> str:
    """Tab, comma, semicolon or pipe: the one the header line holds most of."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as file:
            header = file.readline(1 << 20)
    except (OSError, EOFError) as exc:
        raise EmrError(f"cannot read {path}: {exc}") from exc
    counts = {sep: header.count(sep.encode()) for sep in ("\t", ",", ";", "|")}
    best = max(counts, key=lambda sep: counts[sep])
    return best if counts[best] else ","


def _csv_row_label(i: int) -> str:
    # The header is line 1; a quoted value holding a line break shifts lines, not rows.
    return f"row {i + 1} (line {i + 2})"


def _parquet_row_label(i: int) -> str:
    return f"row {i + 1}"


class _FolderSource(Source):
    kind = "folder"

    def __init__(self, folder: Path) -> None:
        folder = folder.resolve()
        self.folder = folder
        self.description = str(folder)
        self._files: dict[str, tuple[Path, str]] = {}
        for path in sorted(folder.iterdir()):
            found = _table_name(path)
            if found is None:
                continue
            name, fmt = found
            if name in self._files:
                raise EmrError(
                    f"{name}: two files in {folder} hold this table ({self._files[name][0].name} "
                    f"and {path.name}); keep one"
                )
            self._files[name] = (path, fmt)

    def tables(self) -> dict[str, str]:
        return {name: str(path) for name, (path, _) in self._files.items()}

    def read(self, name: str) -> RawTable:
        path, fmt = self._files[name]
        try:
            if fmt == "parquet":
                files = (
                    sorted(p for p in path.iterdir() if p.suffix.lower() in _PARQUET_SUFFIXES)
                    if path.is_dir()
                    else [path]
                )
                frame = pl.read_parquet([str(p) for p in files])
                return RawTable(name, str(path), frame, _parquet_row_label)
            separator = _sniff_separator(path)
            frame = pl.read_csv(
                path,
                separator=separator,
                infer_schema=False,
                # Athena's tab-separated files do not quote: a `"` in a name is a character.
                quote_char=None if separator == "\t" else '"',
                encoding="utf8",
            )
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise EmrError(f"{name}: cannot read {path}: {_first_line(exc)}") from exc
        return RawTable(name, str(path), frame, _csv_row_label)


class _DuckDBSource(Source):
    kind = "duckdb"

    def __init__(self, path: Path, schema: str) -> None:
        import duckdb

        path = path.resolve()
        self.path = path
        self.schema = schema
        self.description = f"{path} (DuckDB, schema {schema})"
        self._closed = False
        try:
            self._con = duckdb.connect(str(path), read_only=True)
        except duckdb.Error as exc:
            raise EmrError(f"cannot open the DuckDB database {path}: {_first_line(exc)}") from exc
        try:
            (self._catalog,) = self._con.execute("SELECT current_database()").fetchone() or ("",)
            rows = self._con.execute(
                "SELECT table_schema, table_name FROM information_schema.tables "
                "WHERE table_catalog = current_database()"
            ).fetchall()
        except duckdb.Error as exc:
            self.close()
            raise EmrError(f"cannot list the tables of {path}: {_first_line(exc)}") from exc
        self._tables = _tables_of_schema(rows, schema, self.description)

    def tables(self) -> dict[str, str]:
        return {
            name: f"{self.schema}.{actual} in {self.path}" for name, actual in self._tables.items()
        }

    def read(self, name: str) -> RawTable:
        import duckdb

        actual = self._tables[name]
        where = f"{self.schema}.{actual} in {self.path}"
        try:
            table = self._con.sql(
                # Qualified by the catalog: in a file cdm.duckdb, "cdm" is a catalog too.
                f"SELECT * FROM {_quote(self._catalog)}.{_quote(self.schema)}.{_quote(actual)}"
            ).to_arrow_table()
        except duckdb.Error as exc:
            raise EmrError(f"{name}: cannot read {where}: {_first_line(exc)}") from exc
        return RawTable(name, where, _frame(table))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._con.close()


class _PostgresSource(Source):
    kind = "postgresql"

    def __init__(self, url: str, schema: str) -> None:
        import adbc_driver_postgresql.dbapi as pg

        self.url = url
        self.schema = schema
        self._shown = redact_url(url)
        self.description = f"{self._shown} (PostgreSQL, schema {schema})"
        self._closed = False
        try:
            self._con = pg.connect(url)
        except pg.Error as exc:
            raise EmrError(f"cannot connect to {self._shown}: {self._message(exc)}") from exc
        try:
            with self._con.cursor() as cursor:
                cursor.execute(
                    "SELECT table_schema, table_name FROM information_schema.tables "
                    "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
                )
                listing = cursor.fetch_arrow_table()
        except pg.Error as exc:
            self.close()
            raise EmrError(
                f"cannot list the tables of {self._shown}: {self._message(exc)}"
            ) from exc
        rows = zip(listing.column(0).to_pylist(), listing.column(1).to_pylist(), strict=True)
        try:
            self._tables = _tables_of_schema(rows, schema, self.description)
        except EmrError:
            self.close()
            raise

    def _message(self, exc: BaseException) -> str:
        message = _first_line(exc)
        password = urlsplit(self.url).password
        return message.replace(password, "***") if password else message

    def tables(self) -> dict[str, str]:
        return {
            name: f"{self.schema}.{actual} in {self._shown}"
            for name, actual in self._tables.items()
        }

    def read(self, name: str) -> RawTable:
        import adbc_driver_postgresql.dbapi as pg

        actual = self._tables[name]
        where = f"{self.schema}.{actual} in {self._shown}"
        try:
            with self._con.cursor() as cursor:
                cursor.execute(f"SELECT * FROM {_quote(self.schema)}.{_quote(actual)}")
                table = cursor.fetch_arrow_table()
        except pg.Error as exc:
            raise EmrError(f"{name}: cannot read {where}: {self._message(exc)}") from exc
        return RawTable(name, where, _frame(table))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._con.close()


def _tables_of_schema(
    rows: Iterable[tuple[str, str]], schema: str, description: str
) -> dict[str, str]:
    """Lower-case table name to actual name, for the tables of ``schema``."""
    schemas: set[str] = set()
    tables: dict[str, str] = {}
    for table_schema, table_name in rows:
        schemas.add(table_schema)
        if table_schema == schema:
            tables[table_name.lower()] = table_name
    if schema not in schemas:
        known = ", ".join(sorted(schemas)) or "none"
        raise EmrError(f"no schema {schema!r} in {description}; its schemas: {known}")
    return tables


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _frame(table: pa.Table) -> pl.DataFrame:
    """A polars frame of an Arrow table whose extension types (PostgreSQL's ``numeric``
    arrives as an opaque extension over text) are replaced by their storage."""
    columns = []
    for column in table.columns:
        if isinstance(column.type, pa.BaseExtensionType):
            storage = column.type.storage_type
            column = pa.chunked_array([chunk.storage for chunk in column.chunks], storage)
        columns.append(column)
    plain = pa.table(columns, names=table.column_names)
    frame = pl.from_arrow(plain)
    assert isinstance(frame, pl.DataFrame)
    return frame


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_crosswalk_file(path: str | os.PathLike[str]) -> RawTable:
    """Read a crosswalk file (CSV or Parquet, columns PatientID and person_id in any case).

    Raises
    ------
    EmrError
        If the file is missing or cannot be read.
    """
    file = Path(path)
    if not file.is_file():
        raise EmrError(f"crosswalk: no such file: {file}")
    found = _table_name(file)
    fmt = found[1] if found else "csv"
    try:
        if fmt == "parquet":
            frame = pl.read_parquet(file)
            return RawTable("crosswalk", str(file), frame, _parquet_row_label)
        separator = _sniff_separator(file)
        frame = pl.read_csv(
            file,
            separator=separator,
            infer_schema=False,
            quote_char=None if separator == "\t" else '"',
        )
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise EmrError(f"crosswalk: cannot read {file}: {_first_line(exc)}") from exc
    return RawTable("crosswalk", str(file), frame, _csv_row_label)
