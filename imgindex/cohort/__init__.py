"""Cohorts: select index series by EMR criteria with day windows (docs/cohorts.md).

:class:`Cohort` is the definition (YAML or Python); :func:`select` runs it over the index and
the imported OMOP tables and returns a :class:`Selection`, one row per series.
"""

from __future__ import annotations

from imgindex.cohort.engine import Selection, read_selection, select
from imgindex.cohort.model import (
    CodeSet,
    Cohort,
    Criterion,
    DateRange,
    Demographics,
    Entry,
    Imaging,
    ValueRange,
)

__all__ = [
    "CodeSet",
    "Cohort",
    "Criterion",
    "DateRange",
    "Demographics",
    "Entry",
    "Imaging",
    "Selection",
    "ValueRange",
    "read_selection",
    "select",
]
