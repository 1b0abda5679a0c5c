"""The OMOP Common Data Model v5.4 tables imgindex imports: columns, types, keys.

Column names, order and ``required`` come from the CDM's DDL and field-level specification
(OHDSI/CommonDataModel, ``inst/ddl/5.4/postgresql/OMOPCDM_postgresql_5.4_ddl.sql``: a
required field is ``NOT NULL``). Types are the CDM's, made canonical for Arrow:

========================  =================  ===========================================
CDM type                  Arrow type         columns
========================  =================  ===========================================
``integer``               ``int64``          ``*_id``, ``*_concept_id``, ``year_of_birth``,
                                             ``refills``, ``days_supply``, ...
``NUMERIC``               ``float64``        ``value_as_number``, ``range_low``,
                                             ``range_high``, ``quantity``
``date``                  ``date32``         ``*_date``
``TIMESTAMP``             ``timestamp[us]``  ``*_datetime`` (no time zone, as in the CDM)
``varchar``, ``TEXT``     ``string``         the rest (also ``domain_id``, ``vocabulary_id``
                                             and ``concept_class_id``, which are codes)
========================  =================  ===========================================

``quantity`` is ``float64`` in every table, although ``procedure_occurrence.quantity`` is an
``integer`` in the CDM: one type for one name.

CDM v5.3 sources differ in these tables only by :data:`V53_RENAMED` (v5.4 renamed four
``visit_occurrence`` columns) and by columns v5.4 added (``procedure_end_date``,
``measurement_event_id``, ...), which an import adds as nulls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

import pyarrow as pa

__all__ = [
    "ARROW_TYPES",
    "CDM_TABLES",
    "CROSSWALK",
    "EVENT_DATE_COLUMNS",
    "TABLE_SPECS",
    "V53_RENAMED",
    "V54_ADDED",
    "Column",
    "Kind",
    "TableSpec",
]

#: The kinds of values a column holds; :data:`ARROW_TYPES` gives each one's Arrow type.
Kind = Literal["int", "float", "date", "datetime", "string"]

ARROW_TYPES: Final[dict[Kind, pa.DataType]] = {
    "int": pa.int64(),
    "float": pa.float64(),
    "date": pa.date32(),
    "datetime": pa.timestamp("us"),
    "string": pa.string(),
}


@dataclass(frozen=True)
class Column:
    """One column of a CDM table.

    Attributes
    ----------
    name : str
        The CDM's (lower-case) name.
    kind : Kind
        What it holds; its Arrow type is ``ARROW_TYPES[kind]``.
    required : bool
        Whether the CDM marks it required (``NOT NULL``): an import fails without it.
    """

    name: str
    kind: Kind
    required: bool = False

    @property
    def arrow_type(self) -> pa.DataType:
        """The column's Arrow type."""
        return ARROW_TYPES[self.kind]


@dataclass(frozen=True)
class TableSpec:
    """One CDM table as imgindex stores it.

    Attributes
    ----------
    name : str
        The CDM's (lower-case) table name, also the folder under ``ROOT/emr``.
    columns : tuple of Column
        Every v5.4 column, in the CDM's order.
    key : tuple of str
        The columns that identify a row (the CDM's primary key).
    date_column : str or None
        For event tables, the date the rows are sorted by (then by ``person_id``).
    """

    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    date_column: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The column names, in order."""
        return tuple(c.name for c in self.columns)

    @property
    def required(self) -> tuple[str, ...]:
        """The names of the required columns."""
        return tuple(c.name for c in self.columns if c.required)

    @property
    def sort_by(self) -> tuple[str, ...]:
        """The order rows are written in: date then person for events, else the key."""
        if self.date_column is not None:
            return (self.date_column, "person_id")
        return self.key

    @property
    def arrow_schema(self) -> pa.Schema:
        """The table's Arrow schema (every column nullable)."""
        return pa.schema([pa.field(c.name, c.arrow_type) for c in self.columns])

    def column(self, name: str) -> Column:
        """The column ``name``."""
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(f"{self.name} has no column {name!r}")


def _columns(text: str) -> tuple[Column, ...]:
    """Columns from lines of ``name kind [R]`` (R: required), as the DDL lists them."""
    columns = []
    for line in text.strip().splitlines():
        name, kind, *flag = line.split()
        assert kind in ARROW_TYPES, (name, kind)
        columns.append(Column(name, kind, required=flag == ["R"]))
    return tuple(columns)


_PERSON = _columns("""
person_id int R
gender_concept_id int R
year_of_birth int R
month_of_birth int
day_of_birth int
birth_datetime datetime
race_concept_id int R
ethnicity_concept_id int R
location_id int
provider_id int
care_site_id int
person_source_value string
gender_source_value string
gender_source_concept_id int
race_source_value string
race_source_concept_id int
ethnicity_source_value string
ethnicity_source_concept_id int
""")

_VISIT_OCCURRENCE = _columns("""
visit_occurrence_id int R
person_id int R
visit_concept_id int R
visit_start_date date R
visit_start_datetime datetime
visit_end_date date R
visit_end_datetime datetime
visit_type_concept_id int R
provider_id int
care_site_id int
visit_source_value string
visit_source_concept_id int
admitted_from_concept_id int
admitted_from_source_value string
discharged_to_concept_id int
discharged_to_source_value string
preceding_visit_occurrence_id int
""")

_CONDITION_OCCURRENCE = _columns("""
condition_occurrence_id int R
person_id int R
condition_concept_id int R
condition_start_date date R
condition_start_datetime datetime
condition_end_date date
condition_end_datetime datetime
condition_type_concept_id int R
condition_status_concept_id int
stop_reason string
provider_id int
visit_occurrence_id int
visit_detail_id int
condition_source_value string
condition_source_concept_id int
condition_status_source_value string
""")

_DRUG_EXPOSURE = _columns("""
drug_exposure_id int R
person_id int R
drug_concept_id int R
drug_exposure_start_date date R
drug_exposure_start_datetime datetime
drug_exposure_end_date date R
drug_exposure_end_datetime datetime
verbatim_end_date date
drug_type_concept_id int R
stop_reason string
refills int
quantity float
days_supply int
sig string
route_concept_id int
lot_number string
provider_id int
visit_occurrence_id int
visit_detail_id int
drug_source_value string
drug_source_concept_id int
route_source_value string
dose_unit_source_value string
""")

_PROCEDURE_OCCURRENCE = _columns("""
procedure_occurrence_id int R
person_id int R
procedure_concept_id int R
procedure_date date R
procedure_datetime datetime
procedure_end_date date
procedure_end_datetime datetime
procedure_type_concept_id int R
modifier_concept_id int
quantity float
provider_id int
visit_occurrence_id int
visit_detail_id int
procedure_source_value string
procedure_source_concept_id int
modifier_source_value string
""")

_MEASUREMENT = _columns("""
measurement_id int R
person_id int R
measurement_concept_id int R
measurement_date date R
measurement_datetime datetime
measurement_time string
measurement_type_concept_id int R
operator_concept_id int
value_as_number float
value_as_concept_id int
unit_concept_id int
range_low float
range_high float
provider_id int
visit_occurrence_id int
visit_detail_id int
measurement_source_value string
measurement_source_concept_id int
unit_source_value string
unit_source_concept_id int
value_source_value string
measurement_event_id int
meas_event_field_concept_id int
""")

_OBSERVATION = _columns("""
observation_id int R
person_id int R
observation_concept_id int R
observation_date date R
observation_datetime datetime
observation_type_concept_id int R
value_as_number float
value_as_string string
value_as_concept_id int
qualifier_concept_id int
unit_concept_id int
provider_id int
visit_occurrence_id int
visit_detail_id int
observation_source_value string
observation_source_concept_id int
unit_source_value string
qualifier_source_value string
value_source_value string
observation_event_id int
obs_event_field_concept_id int
""")

_CONCEPT = _columns("""
concept_id int R
concept_name string R
domain_id string R
vocabulary_id string R
concept_class_id string R
standard_concept string
concept_code string R
valid_start_date date R
valid_end_date date R
invalid_reason string
""")

_CONCEPT_ANCESTOR = _columns("""
ancestor_concept_id int R
descendant_concept_id int R
min_levels_of_separation int R
max_levels_of_separation int R
""")

#: Every table imgindex imports, by name, in the order an import reads them.
TABLE_SPECS: Final[dict[str, TableSpec]] = {
    spec.name: spec
    for spec in (
        TableSpec("person", _PERSON, ("person_id",)),
        TableSpec(
            "visit_occurrence", _VISIT_OCCURRENCE, ("visit_occurrence_id",), "visit_start_date"
        ),
        TableSpec(
            "condition_occurrence",
            _CONDITION_OCCURRENCE,
            ("condition_occurrence_id",),
            "condition_start_date",
        ),
        TableSpec(
            "procedure_occurrence",
            _PROCEDURE_OCCURRENCE,
            ("procedure_occurrence_id",),
            "procedure_date",
        ),
        TableSpec(
            "drug_exposure", _DRUG_EXPOSURE, ("drug_exposure_id",), "drug_exposure_start_date"
        ),
        TableSpec("measurement", _MEASUREMENT, ("measurement_id",), "measurement_date"),
        TableSpec("observation", _OBSERVATION, ("observation_id",), "observation_date"),
        TableSpec("concept", _CONCEPT, ("concept_id",)),
        TableSpec(
            "concept_ancestor", _CONCEPT_ANCESTOR, ("ancestor_concept_id", "descendant_concept_id")
        ),
    )
}

#: The CDM tables imgindex imports, in order.
CDM_TABLES: Final[tuple[str, ...]] = tuple(TABLE_SPECS)

#: The main date of each event table: rows are sorted by it, then by ``person_id``.
EVENT_DATE_COLUMNS: Final[dict[str, str]] = {
    spec.name: spec.date_column for spec in TABLE_SPECS.values() if spec.date_column is not None
}

#: The user's map from DICOM PatientID to person_id (``--crosswalk FILE``).
CROSSWALK: Final = TableSpec(
    "crosswalk",
    (Column("PatientID", "string", required=True), Column("person_id", "int", required=True)),
    ("PatientID", "person_id"),
)

#: Columns CDM v5.4 renamed, per table: v5.3 name -> v5.4 name.
V53_RENAMED: Final[dict[str, dict[str, str]]] = {
    "visit_occurrence": {
        "admitting_source_concept_id": "admitted_from_concept_id",
        "admitting_source_value": "admitted_from_source_value",
        "discharge_to_concept_id": "discharged_to_concept_id",
        "discharge_to_source_value": "discharged_to_source_value",
    },
}

#: Columns CDM v5.4 added to these tables (absent from v5.3 sources).
V54_ADDED: Final[dict[str, tuple[str, ...]]] = {
    "procedure_occurrence": ("procedure_end_date", "procedure_end_datetime"),
    "measurement": (
        "unit_source_concept_id",
        "measurement_event_id",
        "meas_event_field_concept_id",
    ),
    "observation": ("value_source_value", "observation_event_id", "obs_event_field_concept_id"),
}
