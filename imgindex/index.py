"""The index: ``instances``, ``series``, ``studies`` and ``rejects`` under ``ROOT/tables``.

``instances`` is the source of truth, one row per SOPInstanceUID. ``series`` and ``studies``
are derived from it: after each batch, :class:`IndexWriter` recomputes the rows of the series
and studies that batch touched, and records in the commit which ``instances`` version they
were derived from. :meth:`Index.rebuild_derived` recomputes them whole.

Read with :class:`Index`: polars LazyFrames (``Index(root).series``) or DuckDB SQL
(``Index(root).sql("SELECT ...")``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from imgindex.schema import (
    CRAWL_STATE_SCHEMA,
    DEFAULT_ATTRIBUTES,
    REJECT_SCHEMA,
    TRANSFER_SCHEMA,
    Attribute,
    instance_schema,
)
from storage import Table

if TYPE_CHECKING:
    import os
    from collections.abc import Iterable, Sequence

__all__ = ["TABLE_NAMES", "Index", "IndexWriter"]

logger = logging.getLogger(__name__)

#: Tables an index holds, in the order people meet them.
TABLE_NAMES = ("instances", "series", "studies", "rejects", "crawl_state", "transfers")
_KEYS = {
    "instances": ("SOPInstanceUID",),
    "series": ("SeriesInstanceUID",),
    "studies": ("StudyInstanceUID",),
    "rejects": ("reject_id",),
    "crawl_state": ("source", "kind", "key"),
    "transfers": ("export", "SeriesInstanceUID"),
}
_DERIVED_FROM = "imgindex.instances_version"


def _table(root: Path, name: str) -> Table:
    return Table(root / "tables" / name, _KEYS[name])


def _keywords(level: str, attributes: Sequence[Attribute]) -> list[str]:
    return [a.keyword for a in attributes if a.level == level]


def _series_plan(instances: pl.LazyFrame, attributes: Sequence[Attribute]) -> pl.LazyFrame:
    names = set(instances.collect_schema().names())
    carried = [
        k
        for k in (
            [
                "StudyInstanceUID",
                *_keywords("patient", attributes),
                *_keywords("series", attributes),
            ]
        )
        if k in names and k != "SeriesInstanceUID"
    ]
    # Series-level attributes come from the first instance that has them, in InstanceNumber order.
    ordered = instances.sort(["InstanceNumber", "SOPInstanceUID"], nulls_last=True)
    return ordered.group_by("SeriesInstanceUID").agg(
        *[pl.col(k).drop_nulls().first() for k in dict.fromkeys(carried)],
        _imaging_date(names),
        pl.len().cast(pl.Int64).alias("instance_count"),
        pl.col("NumberOfFrames").fill_null(1).sum().cast(pl.Int64).alias("frame_count"),
        pl.col("size_bytes").sum().cast(pl.Int64).alias("size_bytes"),
        pl.col("SOPClassUID").drop_nulls().unique().sort().alias("sop_class_uids"),
        pl.col("indexed_at").max().alias("indexed_at"),
    )


#: Where ``imaging_date`` comes from, in order of preference.
IMAGING_DATE_SOURCES = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")


def _imaging_date(names: set[str]) -> pl.Expr:
    """The day a series was taken: StudyDate, else SeriesDate, else the earliest
    AcquisitionDate, else the earliest ContentDate of its instances (DICOM dates are local
    dates without a time zone, and so is this)."""
    parts = [
        pl.col(k).drop_nulls().first() if k in ("StudyDate", "SeriesDate") else pl.col(k).min()
        for k in IMAGING_DATE_SOURCES
        if k in names
    ]
    if not parts:
        return pl.lit(None, dtype=pl.Date).alias("imaging_date")
    return pl.coalesce(parts).cast(pl.Date).alias("imaging_date")


def _studies_plan(instances: pl.LazyFrame, attributes: Sequence[Attribute]) -> pl.LazyFrame:
    names = set(instances.collect_schema().names())
    carried = [
        k
        for k in (*_keywords("patient", attributes), *_keywords("study", attributes))
        if k in names and k != "StudyInstanceUID"
    ]
    ordered = instances.sort(["SeriesNumber", "InstanceNumber", "SOPInstanceUID"], nulls_last=True)
    return ordered.group_by("StudyInstanceUID").agg(
        *[pl.col(k).drop_nulls().first() for k in dict.fromkeys(carried)],
        pl.col("Modality").drop_nulls().unique().sort().alias("ModalitiesInStudy"),
        pl.col("SeriesInstanceUID").n_unique().cast(pl.Int64).alias("series_count"),
        pl.len().cast(pl.Int64).alias("instance_count"),
        pl.col("size_bytes").sum().cast(pl.Int64).alias("size_bytes"),
        pl.col("indexed_at").max().alias("indexed_at"),
    )


class Index:
    """Read access to the index under ``root`` (``ROOT/tables``).

    Parameters
    ----------
    root : str or Path
        The catalog root.
    attributes : sequence of Attribute
        Indexed attributes (for the schema of tables not yet written).

    Examples
    --------
    >>> index = Index("imgindex-data")  # doctest: +SKIP
    >>> index.series.filter(pl.col("Modality") == "CT").collect()  # doctest: +SKIP
    """

    def __init__(
        self, root: str | Path, attributes: Sequence[Attribute] = DEFAULT_ATTRIBUTES
    ) -> None:
        self.root = Path(root)
        self.attributes = tuple(attributes)

    def table(self, name: str) -> Table:
        """The storage table ``name`` (one of :data:`TABLE_NAMES`)."""
        if name not in _KEYS:
            raise ValueError(f"no table {name!r}; the index has {', '.join(TABLE_NAMES)}")
        return _table(self.root, name)

    def scan(self, name: str) -> pl.LazyFrame:
        """Table ``name`` as a LazyFrame (empty, with its schema, before anything is indexed)."""
        table = self.table(name)
        if table.exists:
            return table.scan()
        return pl.LazyFrame(self.empty(name))

    def empty(self, name: str) -> pa.Table:
        """An empty table with the schema ``name`` has before its first write."""
        if name == "rejects":
            return REJECT_SCHEMA.empty_table()
        if name == "crawl_state":
            return CRAWL_STATE_SCHEMA.empty_table()
        if name == "transfers":
            return TRANSFER_SCHEMA.empty_table()
        inst = instance_schema(self.attributes).empty_table()
        if name == "instances":
            return inst
        plan = _series_plan if name == "series" else _studies_plan
        return plan(pl.LazyFrame(inst), self.attributes).collect().to_arrow()

    @property
    def instances(self) -> pl.LazyFrame:
        """One row per SOPInstanceUID."""
        return self.scan("instances")

    @property
    def series(self) -> pl.LazyFrame:
        """One row per SeriesInstanceUID, with ``instance_count`` and ``size_bytes``."""
        return self.scan("series")

    @property
    def studies(self) -> pl.LazyFrame:
        """One row per StudyInstanceUID, with ``ModalitiesInStudy`` and counts."""
        return self.scan("studies")

    @property
    def rejects(self) -> pl.LazyFrame:
        """Files that could not be indexed and values that did not parse."""
        return self.scan("rejects")

    @property
    def crawl_state(self) -> pl.LazyFrame:
        """What crawls of DICOMweb servers and change feeds have done, per study and series."""
        return self.scan("crawl_state")

    @property
    def transfers(self) -> pl.LazyFrame:
        """The export ledger: one row per series per export store, with its outcome."""
        return self.scan("transfers")

    def versions(self) -> dict[str, int | None]:
        """Current version of each table (None for a table not yet written)."""
        return {name: self.table(name).version() for name in TABLE_NAMES}

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection with the index tables as views.

        Each view reads the Parquet files of the table's current Delta version with DuckDB's
        own reader (filters and projections pushed down; ``union_by_name`` for columns added
        later). A pyarrow dataset registered instead fails on string filters: pyarrow has no
        ``equal`` kernel for the (string, string_view) pair DuckDB's pushdown produces.
        """
        con = duckdb.connect()
        for name in TABLE_NAMES:
            table = self.table(name)
            files = table.files() if table.exists else []
            if not files:
                con.register(name, self.empty(name))
                continue
            listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
            con.execute(
                f"CREATE VIEW {name} AS SELECT * FROM read_parquet([{listed}], union_by_name = true)"
            )
        return con

    def sql(self, query: str) -> pa.Table:
        """Run DuckDB SQL over the index tables; the result as an Arrow table."""
        con = self.connect()
        try:
            return con.sql(query).to_arrow_table()
        finally:
            con.close()

    def optimize(self) -> dict[str, int]:
        """Lay the tables out for cohort queries: ``series`` sorted by ``imaging_date``.

        A cohort's imaging window becomes a date range on ``series``; sorted, its Parquet row
        groups have narrow date statistics and readers skip all but a few. Tables the
        listener or a crawl appended to in arrival order benefit most. Returns the new
        version of each table rewritten.
        """
        done: dict[str, int] = {}
        series = self.table("series")
        if series.exists and "imaging_date" in series.scan().collect_schema().names():
            done["series"] = series.optimize(["imaging_date"])
        return done

    def rebuild_derived(self) -> None:
        """Recompute ``series`` and ``studies`` whole from ``instances``."""
        writer = IndexWriter(self.root, self.attributes)
        writer.refresh_derived(None)


class IndexWriter:
    """Appends rows to the index in batches; each flush is a few atomic commits.

    Parameters
    ----------
    root : str or Path
        The catalog root.
    attributes : sequence of Attribute
        The indexed attributes (defines the ``instances`` schema).
    """

    def __init__(
        self, root: str | os.PathLike[str], attributes: Sequence[Attribute] = DEFAULT_ATTRIBUTES
    ) -> None:
        self.root = Path(root)
        self.attributes = tuple(attributes)
        self.schema = instance_schema(self.attributes)
        self._instances = _table(self.root, "instances")
        self._rejects = _table(self.root, "rejects")

    def write(
        self, rows: pa.Table | Iterable[dict[str, Any]], rejects: Iterable[dict[str, Any]]
    ) -> None:
        """Upsert instance rows and reject rows, then refresh the series and studies touched."""
        table = (
            rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows), self.schema)
        )
        reject_list = list(rejects)
        if reject_list:
            self._rejects.upsert(pa.Table.from_pylist(reject_list, REJECT_SCHEMA))
        if table.num_rows == 0:
            return
        self._instances.upsert(table)
        self.refresh_derived(table)

    def refresh_derived(self, batch: pa.Table | None) -> None:
        """Recompute the series and studies of ``batch`` (all of them if None)."""
        if not self._instances.exists:
            return
        version = self._instances.version()
        metadata = {_DERIVED_FROM: str(version)}
        instances = self._instances.scan()
        for name, key, plan in (
            ("series", "SeriesInstanceUID", _series_plan),
            ("studies", "StudyInstanceUID", _studies_plan),
        ):
            target = _table(self.root, name)
            if batch is None:
                # Whole rebuild: replace, so rows of keys no longer in instances go too.
                target.overwrite(
                    plan(instances, self.attributes).collect().to_arrow(), metadata=metadata
                )
                continue
            keys = pc.unique(batch[key]).to_pylist()
            subset = instances.filter(pl.col(key).is_in(keys))
            rows = plan(subset, self.attributes).collect().to_arrow()
            target.upsert(rows, metadata=metadata)
