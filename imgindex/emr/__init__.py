"""The EMR: OMOP CDM tables imported under ``ROOT/emr`` and linked to the index's patients.

- :func:`import_emr` reads a folder of CSV/Parquet files, a DuckDB file or PostgreSQL and
  stores each CDM table as a Delta table with canonical names and types.
- :class:`Emr` reads them back as polars LazyFrames; :meth:`Emr.links` maps DICOM PatientID
  to person_id.
- :func:`link_report` counts the index patients with and without an EMR person.

See ``docs/emr.md``.
"""

from imgindex.emr.importer import EmrImportSummary, import_emr
from imgindex.emr.link import LinkReport, link_report
from imgindex.emr.omop import CDM_TABLES, EVENT_DATE_COLUMNS, TABLE_SPECS
from imgindex.emr.tables import EMR_TABLES, Emr

__all__ = [
    "CDM_TABLES",
    "EMR_TABLES",
    "EVENT_DATE_COLUMNS",
    "TABLE_SPECS",
    "Emr",
    "EmrImportSummary",
    "LinkReport",
    "import_emr",
    "link_report",
]
