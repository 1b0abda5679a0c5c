"""Index tables: Parquet files under a Delta Lake transaction log.

A :class:`Table` is one Delta table in a folder. Writes are atomic commits: readers see a
batch whole or not at all, and several processes (listener, crawler, ``index-files``) may
write at once; a commit that loses a race is retried against the new table version.
:meth:`Table.upsert` merges on the table's key, so writing the same row twice leaves one row.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError
from deltalake.exceptions import TableNotFoundError as _DeltaTableNotFoundError

from storage.errors import ConflictError, TableNotFoundError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    import polars as pl
    import pyarrow.dataset as pads

__all__ = ["Table"]

logger = logging.getLogger(__name__)

#: Attempts at one commit before :class:`ConflictError`; back-off doubles from 50 ms.
COMMIT_ATTEMPTS = 8
_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 2.0


class Table:
    """One Delta table with a primary key.

    Parameters
    ----------
    path : str or Path
        Folder of the table (created on first write).
    key : sequence of str
        Columns that identify a row; :meth:`upsert` merges on them.
    """

    def __init__(self, path: str | Path, key: Sequence[str]) -> None:
        if not key:
            raise ValueError("key must name at least one column")
        self.path = Path(path)
        self.key = tuple(key)

    def __repr__(self) -> str:
        return f"Table({str(self.path)!r}, key={self.key!r})"

    @property
    def exists(self) -> bool:
        """Whether anything was ever committed to the table."""
        return DeltaTable.is_deltatable(str(self.path))

    def _open(self) -> DeltaTable:
        try:
            return DeltaTable(str(self.path))
        except _DeltaTableNotFoundError as exc:
            raise TableNotFoundError(f"no table at {self.path}: nothing indexed yet") from exc

    def version(self) -> int | None:
        """Current version of the table, or None if it does not exist yet."""
        return self._open().version() if self.exists else None

    def commit_metadata(self) -> dict[str, Any]:
        """Custom metadata of the latest commit (empty if none or no table)."""
        if not self.exists:
            return {}
        history = self._open().history(1)
        return dict(history[0]) if history else {}

    def upsert(
        self,
        data: pa.Table,
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> int:
        """Insert rows, replacing any row with the same key.

        Rows of ``data`` sharing a key are reduced to the last one. Columns missing from the
        table are added (schema evolution), so users may index more attributes later.

        Parameters
        ----------
        data : pyarrow.Table
            Rows to write; must hold the key columns.
        metadata : mapping, optional
            Custom commit metadata (str to str), kept in the table history.

        Returns
        -------
        int
            The table version after the commit.

        Raises
        ------
        ConflictError
            If the commit conflicted with concurrent writers on every attempt.
        """
        missing = [k for k in self.key if k not in data.column_names]
        if missing:
            raise ValueError(f"rows for {self.path.name} lack key column(s) {missing}")
        if data.num_rows == 0:
            return self.version() or 0
        data = _last_per_key(data, self.key)
        props = CommitProperties(custom_metadata=dict(metadata or {}))

        def commit() -> int:
            if not self.exists:
                with _creation_lock(self.path):
                    if not self.exists:
                        write_deltalake(
                            str(self.path), data, mode="append", commit_properties=props
                        )
                        return self._open().version()
            table = self._open()
            predicate = " AND ".join(f"t.{_quote(k)} = s.{_quote(k)}" for k in self.key)
            (
                table.merge(
                    data,
                    predicate,
                    source_alias="s",
                    target_alias="t",
                    merge_schema=True,
                    commit_properties=props,
                )
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .execute()
            )
            return table.version()

        return self._with_retries(commit)

    def append(self, data: pa.Table, *, metadata: Mapping[str, str] | None = None) -> int:
        """Append rows without looking at keys (for tables whose rows are events)."""
        props = CommitProperties(custom_metadata=dict(metadata or {}))

        def commit() -> int:
            write_deltalake(
                str(self.path), data, mode="append", schema_mode="merge", commit_properties=props
            )
            return self._open().version()

        return self._with_retries(commit)

    def overwrite(
        self,
        data: pa.Table | pa.RecordBatchReader,
        *,
        metadata: Mapping[str, str] | None = None,
        row_group_rows: int | None = None,
    ) -> int:
        """Replace the table's rows (and schema) with ``data`` in one commit.

        ``row_group_rows`` caps the rows of each Parquet row group (delta-rs writes groups of
        about a million otherwise): rows written in a sorted order then carry narrow min/max
        statistics that readers skip row groups by. A ``RecordBatchReader`` is written as it
        streams (and cannot be retried after a conflict).
        """
        props = CommitProperties(custom_metadata=dict(metadata or {}))
        writer = WriterProperties(max_row_group_size=row_group_rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)

        def commit() -> int:
            write_deltalake(
                str(self.path),
                data,
                mode="overwrite",
                schema_mode="overwrite",
                writer_properties=writer,
                commit_properties=props,
            )
            return self._open().version()

        return self._with_retries(commit)

    def _with_retries(self, commit: Callable[[], int]) -> int:
        delay = _BACKOFF_FIRST_S
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            try:
                return commit()
            except (CommitFailedError, OSError) as exc:
                # delta-rs reports a lost race on version N as CommitFailedError, or as an
                # OSError when the log file of version N appeared under it.
                if not _is_conflict(exc) or attempt == COMMIT_ATTEMPTS:
                    if _is_conflict(exc):
                        raise ConflictError(
                            f"commit to {self.path} conflicted {attempt} times with concurrent "
                            "writers; try again"
                        ) from exc
                    raise
                logger.debug("commit to %s conflicted (attempt %d): %s", self.path, attempt, exc)
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, _BACKOFF_MAX_S)
        raise AssertionError("unreachable")  # pragma: no cover

    def to_arrow_dataset(self) -> pads.Dataset:
        """The table's current files as a pyarrow dataset (for DuckDB and pyarrow)."""
        return self._open().to_pyarrow_dataset()

    def files(self) -> list[str]:
        """Absolute paths (or URIs) of the Parquet files of the table's current version."""
        return list(self._open().file_uris())

    def to_arrow(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The whole table (or some columns) in memory."""
        return self._open().to_pyarrow_table(columns=list(columns) if columns else None)

    def scan(self) -> pl.LazyFrame:
        """The table as a polars LazyFrame."""
        import polars as pl

        if not self.exists:
            raise TableNotFoundError(f"no table at {self.path}: nothing indexed yet")
        return pl.scan_delta(str(self.path))

    def optimize(self, order_by: Sequence[str], *, row_group_rows: int = 100_000) -> int:
        """Rewrite the table's files in ``order_by`` order, in row groups of ``row_group_rows``.

        Readers then skip the row groups whose min/max statistics of the first ``order_by``
        column miss their filter. One commit (delta-rs z-order; with one column, a sort);
        older versions stay readable until :meth:`compact` vacuums them.

        Returns
        -------
        int
            The table version after the rewrite.
        """
        props = WriterProperties(max_row_group_size=row_group_rows)

        def commit() -> int:
            table = self._open()
            table.optimize.z_order(list(order_by), writer_properties=props)
            return self._open().version()

        return self._with_retries(commit)

    def compact(self) -> None:
        """Merge small files and drop files no longer referenced (keeps 7 days of history)."""
        table = self._open()
        table.optimize.compact()
        table.vacuum(retention_hours=7 * 24, dry_run=False, enforce_retention_duration=False)


@contextlib.contextmanager
def _creation_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside the table ``path`` while its first commit is made.

    delta-rs does not fail the loser of a race for version 0: it rebases the losing append
    onto the winner's commit, so two first writers would both insert their rows and duplicate
    keys. With the lock the second writer waits, finds the table, and merges.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _is_conflict(exc: BaseException) -> bool:
    if isinstance(exc, CommitFailedError):
        return True
    text = str(exc).lower()
    return "version" in text and ("already exists" in text or "conflict" in text)


def _quote(column: str) -> str:
    return f"`{column}`"


def _last_per_key(data: pa.Table, key: Sequence[str]) -> pa.Table:
    """Keep the last row for each key, in the original order."""
    index = pa.array(range(data.num_rows), pa.int64())
    with_index = data.append_column("__row", index)
    last = with_index.group_by(list(key), use_threads=False).aggregate([("__row", "max")])
    if last.num_rows == data.num_rows:
        return data
    keep = pc.sort_indices(last["__row_max"])
    return data.take(pc.take(last["__row_max"], keep))
