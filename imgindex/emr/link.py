"""How index patients (DICOM ``PatientID``) link to EMR persons, and which do not.

A person links to a PatientID through the crosswalk table when one was imported, else
through ``person.person_source_value`` (:meth:`imgindex.emr.Emr.links`). Only links to a
person the ``person`` table holds count. Index patients without a person are counted and
named, never dropped silently: a cohort cannot select them, and people should know.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import polars as pl

from imgindex.emr.omop import CROSSWALK
from imgindex.emr.tables import Emr

if TYPE_CHECKING:
    import os

    from imgindex.index import Index

__all__ = ["LinkReport", "link_report"]

#: Unlinked PatientIDs a report names.
EXAMPLES: Final = 5


@dataclass(frozen=True)
class LinkReport:
    """How the index's patients link to the EMR's persons.

    Attributes
    ----------
    index_patients : int
        Distinct PatientIDs in the index's ``series`` table.
    linked : int
        Those that link to a person of the EMR.
    unlinked : int
        Those that do not (``index_patients - linked``).
    unlinked_examples : tuple of str
        A few of them, in sorted order.
    emr_persons : int
        Persons in the EMR (its ``person`` table, else the crosswalk's persons).
    persons_without_images : int
        Persons no index PatientID links to.
    via : str
        ``"crosswalk"`` or ``"person_source_value"``.
    """

    index_patients: int
    linked: int
    unlinked: int
    unlinked_examples: tuple[str, ...]
    emr_persons: int
    persons_without_images: int
    via: str

    def describe(self) -> str:
        """The report in two lines, for people."""
        if self.index_patients == 0:
            first = "the index has no patients yet"
        else:
            first = (
                f"{self.linked:,} of {self.index_patients:,} index patients link to an EMR "
                f"person (through {self.via})"
            )
            if self.unlinked:
                shown = ", ".join(self.unlinked_examples)
                more = ", ..." if self.unlinked > len(self.unlinked_examples) else ""
                first += f"; {self.unlinked:,} do not, e.g. {shown}{more}"
        second = (
            f"{self.persons_without_images:,} of {self.emr_persons:,} EMR persons have no "
            "series in the index"
        )
        return f"{first}\n{second}"


def link_report(
    index: Index | str | os.PathLike[str],
    emr: Emr | str | os.PathLike[str],
    *,
    examples: int = EXAMPLES,
) -> LinkReport:
    """Count the index patients that link to an EMR person, and those that do not.

    Parameters
    ----------
    index : Index or str or path-like
        The index, or its catalog root.
    emr : Emr or str or path-like
        The EMR, or its catalog root.
    examples : int
        How many unlinked PatientIDs to name.

    Returns
    -------
    LinkReport
        The counts.

    Raises
    ------
    EmrError
        If the EMR has neither a person table nor a crosswalk.
    """
    from imgindex.index import Index

    if not isinstance(index, Index):
        index = Index(Path(index))
    if not isinstance(emr, Emr):
        emr = Emr(emr)
    via = "crosswalk" if emr.has(CROSSWALK.name) else "person_source_value"
    links = emr.links()
    if emr.has("person"):
        persons = emr.scan("person").select("person_id").unique()
        links = links.join(persons, on="person_id", how="semi")
    else:
        persons = links.select("person_id").unique()
    patients = index.series.select("PatientID").drop_nulls().unique()
    linked_ids = links.select("PatientID").unique()
    unlinked = patients.join(linked_ids, on="PatientID", how="anti")
    with_images = links.join(patients, on="PatientID", how="semi").select("person_id").unique()
    counts, shown = pl.collect_all(
        [
            pl.concat(
                [
                    patients.select(pl.len().alias("n")),
                    unlinked.select(pl.len().alias("n")),
                    persons.select(pl.len().alias("n")),
                    persons.join(with_images, on="person_id", how="anti").select(
                        pl.len().alias("n")
                    ),
                ]
            ),
            unlinked.sort("PatientID").head(examples),
        ]
    )
    n_patients, n_unlinked, n_persons, n_without = (int(v) for v in counts.get_column("n"))
    return LinkReport(
        index_patients=n_patients,
        linked=n_patients - n_unlinked,
        unlinked=n_unlinked,
        unlinked_examples=tuple(str(v) for v in shown.get_column("PatientID")),
        emr_persons=n_persons,
        persons_without_images=n_without,
        via=via,
    )
