"""The imported EMR: one Delta table per CDM table under ``ROOT/emr``, read as LazyFrames."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Final

import polars as pl

from imgindex.emr.omop import CDM_TABLES, CROSSWALK, TABLE_SPECS
from imgindex.errors import EmrError
from storage import Table

if TYPE_CHECKING:
    import os

    from imgindex.emr.omop import TableSpec

__all__ = ["EMR_TABLES", "ROW_GROUP_ROWS", "Emr"]

#: Every table an EMR may hold: the CDM tables, then the crosswalk.
EMR_TABLES: Final[tuple[str, ...]] = (*CDM_TABLES, CROSSWALK.name)
#: Rows per Parquet row group. Small enough that a date filter on a sorted event table skips
#: most row groups from their statistics; large enough that the statistics stay few.
ROW_GROUP_ROWS: Final = 65_536


def spec_of(name: str) -> TableSpec:
    """The spec of EMR table ``name``."""
    if name == CROSSWALK.name:
        return CROSSWALK
    try:
        return TABLE_SPECS[name]
    except KeyError:
        raise EmrError(f"no EMR table {name!r}; the tables are {', '.join(EMR_TABLES)}") from None


class Emr:
    """The EMR imported under ``root`` (``ROOT/emr/<table>``).

    Parameters
    ----------
    root : str or path-like
        The catalog root (the same as the index's).

    Attributes
    ----------
    root : pathlib.Path
        The catalog root.
    path : pathlib.Path
        ``root / "emr"``.

    Examples
    --------
    >>> emr = Emr("imgindex-data")  # doctest: +SKIP
    >>> emr.scan("condition_occurrence").filter(pl.col("condition_concept_id") == 4329847)
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.path = self.root / "emr"

    def __repr__(self) -> str:
        return f"Emr({str(self.root)!r})"

    def table(self, name: str) -> Table:
        """The storage table of ``name`` (one of :data:`EMR_TABLES`).

        Raises
        ------
        EmrError
            If ``name`` is not an EMR table.
        """
        return Table(self.path / name, spec_of(name).key)

    def has(self, name: str) -> bool:
        """Whether table ``name`` has been imported."""
        return self.table(name).exists

    def scan(self, name: str) -> pl.LazyFrame:
        """Table ``name`` as a polars LazyFrame.

        Raises
        ------
        EmrError
            If ``name`` is not an EMR table or has not been imported.
        """
        table = self.table(name)
        if not table.exists:
            raise EmrError(
                f"no EMR table {name!r} under {self.path}: import one with imgindex emr import"
            )
        return table.scan()

    def versions(self) -> dict[str, int | None]:
        """The current version of every EMR table (None for one not imported)."""
        return {name: self.table(name).version() for name in EMR_TABLES}

    def links(self) -> pl.LazyFrame:
        """DICOM PatientID to person_id: the crosswalk if one was imported, else every person
        with a ``person_source_value`` (as PatientID, without surrounding blanks).

        Returns
        -------
        polars.LazyFrame
            Columns ``PatientID`` (str) and ``person_id`` (int64).

        Raises
        ------
        EmrError
            If neither a crosswalk nor the person table has been imported.
        """
        if self.has(CROSSWALK.name):
            return self.scan(CROSSWALK.name).select("PatientID", "person_id")
        if not self.has("person"):
            raise EmrError(
                f"no EMR under {self.path} to link to: import one with imgindex emr import"
            )
        return (
            self.scan("person")
            .select(
                pl.col("person_source_value").str.strip_chars().alias("PatientID"),
                pl.col("person_id"),
            )
            .filter(pl.col("PatientID").is_not_null() & (pl.col("PatientID") != ""))
        )
