"""Hand-built EMR + index worlds and an independent DuckDB reference for cohorts.

The reference below is a literal translation of ``docs/cohorts.md`` into DuckDB SQL over the
Parquet files of the Delta tables (``storage.Table(...).files()``). It does not import
:mod:`imgindex.cohort`: the engine is checked against it, and it is checked against results
worked out by hand (``tests/imgindex/test_cohort_reference.py``).

Each rule of the doc is one SQL statement, kept plain on purpose:

* events: rows of the domain's table whose concept (``concepts`` + descendants - ``exclude``)
  or source code (no case, no dots, trailing ``*`` = prefix) is in the code set;
* entry: ``first`` = the person's first event ever, kept when inside ``dates``;
  ``first_in_range`` = the first event inside ``dates``; ``all`` = every distinct day inside;
* windows: ``d = event_date - entry_date``; ``after``/``days`` a ≤ d ≤ b, ``before`` -b ≤ d ≤ -a;
* a criterion holds when ``at_least ≤ count ≤ at_most`` (counts per entry event);
* a series goes to the earliest kept entry event whose imaging window contains it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
import yaml

from imgindex.index import Index
from storage import Table

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence
    from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Concepts used by the hand-built worlds (ids as in OMOP where one exists, made up otherwise).

MI = 4329847  # myocardial infarction (ancestor)
AMI = 312327  # acute myocardial infarction, child of MI
SUB_AMI = 4000002  # made up: child of AMI, grandchild of MI
OLD_MI = 4000001  # made up: child of MI
OTHER_CONDITION = 4000003  # made up: unrelated to MI
HEART_FAILURE = 316139
CABG = 4336464
PCI = 4216130
CORONARY = 4000100  # made up: parent of CABG and PCI
ASPIRIN = 1112807
TROPONIN = 3033745
DEATH = 4306655
ER_VISIT = 9203
FEMALE = 8532
MALE = 8507
UNKNOWN_GENDER = 8551

#: (ancestor, descendant, levels) rows, self rows included as in the OMOP vocabularies.
ANCESTRY = [
    (MI, AMI, 1),
    (MI, SUB_AMI, 2),
    (AMI, SUB_AMI, 1),
    (MI, OLD_MI, 1),
    (CORONARY, CABG, 1),
    (CORONARY, PCI, 1),
]
CONCEPTS = {
    MI: ("Myocardial infarction", "Condition"),
    AMI: ("Acute myocardial infarction", "Condition"),
    SUB_AMI: ("Acute MI, subtype", "Condition"),
    OLD_MI: ("Old myocardial infarction", "Condition"),
    OTHER_CONDITION: ("Something else", "Condition"),
    HEART_FAILURE: ("Heart failure", "Condition"),
    CABG: ("Coronary artery bypass graft", "Procedure"),
    PCI: ("Percutaneous coronary intervention", "Procedure"),
    CORONARY: ("Coronary procedure", "Procedure"),
    ASPIRIN: ("Aspirin", "Drug"),
    TROPONIN: ("Troponin I", "Measurement"),
    DEATH: ("Death", "Observation"),
    ER_VISIT: ("Emergency Room Visit", "Visit"),
    FEMALE: ("FEMALE", "Gender"),
    MALE: ("MALE", "Gender"),
    UNKNOWN_GENDER: ("UNKNOWN", "Gender"),
}

# ---------------------------------------------------------------------------------------------
# OMOP CDM v5.4 tables as the engine reads them (lowercase names, int64 ids, date32 dates).

_I = pa.int64()
_D = pa.date32()
_S = pa.string()
_F = pa.float64()

OMOP_SCHEMAS: dict[str, pa.Schema] = {
    "person": pa.schema(
        [
            ("person_id", _I),
            ("gender_concept_id", _I),
            ("year_of_birth", _I),
            ("month_of_birth", _I),
            ("day_of_birth", _I),
            ("race_concept_id", _I),
            ("ethnicity_concept_id", _I),
            ("person_source_value", _S),
            ("gender_source_value", _S),
        ]
    ),
    "visit_occurrence": pa.schema(
        [
            ("visit_occurrence_id", _I),
            ("person_id", _I),
            ("visit_concept_id", _I),
            ("visit_start_date", _D),
            ("visit_end_date", _D),
            ("visit_type_concept_id", _I),
            ("visit_source_value", _S),
        ]
    ),
    "condition_occurrence": pa.schema(
        [
            ("condition_occurrence_id", _I),
            ("person_id", _I),
            ("condition_concept_id", _I),
            ("condition_start_date", _D),
            ("condition_end_date", _D),
            ("condition_type_concept_id", _I),
            ("condition_source_value", _S),
        ]
    ),
    "procedure_occurrence": pa.schema(
        [
            ("procedure_occurrence_id", _I),
            ("person_id", _I),
            ("procedure_concept_id", _I),
            ("procedure_date", _D),
            ("procedure_type_concept_id", _I),
            ("procedure_source_value", _S),
        ]
    ),
    "drug_exposure": pa.schema(
        [
            ("drug_exposure_id", _I),
            ("person_id", _I),
            ("drug_concept_id", _I),
            ("drug_exposure_start_date", _D),
            ("drug_exposure_end_date", _D),
            ("drug_type_concept_id", _I),
            ("drug_source_value", _S),
        ]
    ),
    "measurement": pa.schema(
        [
            ("measurement_id", _I),
            ("person_id", _I),
            ("measurement_concept_id", _I),
            ("measurement_date", _D),
            ("measurement_type_concept_id", _I),
            ("value_as_number", _F),
            ("unit_concept_id", _I),
            ("measurement_source_value", _S),
        ]
    ),
    "observation": pa.schema(
        [
            ("observation_id", _I),
            ("person_id", _I),
            ("observation_concept_id", _I),
            ("observation_date", _D),
            ("observation_type_concept_id", _I),
            ("value_as_number", _F),
            ("observation_source_value", _S),
        ]
    ),
    "concept": pa.schema(
        [
            ("concept_id", _I),
            ("concept_name", _S),
            ("domain_id", _S),
            ("vocabulary_id", _S),
            ("concept_class_id", _S),
            ("standard_concept", _S),
            ("concept_code", _S),
            ("valid_start_date", _D),
            ("valid_end_date", _D),
            ("invalid_reason", _S),
        ]
    ),
    "concept_ancestor": pa.schema(
        [
            ("ancestor_concept_id", _I),
            ("descendant_concept_id", _I),
            ("min_levels_of_separation", _I),
            ("max_levels_of_separation", _I),
        ]
    ),
    "crosswalk": pa.schema([("PatientID", _S), ("person_id", _I)]),
}
EMR_KEYS = {
    "person": ["person_id"],
    "visit_occurrence": ["visit_occurrence_id"],
    "condition_occurrence": ["condition_occurrence_id"],
    "procedure_occurrence": ["procedure_occurrence_id"],
    "drug_exposure": ["drug_exposure_id"],
    "measurement": ["measurement_id"],
    "observation": ["observation_id"],
    "concept": ["concept_id"],
    "concept_ancestor": ["ancestor_concept_id", "descendant_concept_id"],
    "crosswalk": ["PatientID"],
}


@dataclasses.dataclass(frozen=True)
class Domain:
    """One row of the doc's domain table."""

    table: str
    concept: str
    source: str
    date: str


DOMAINS = {
    "condition": Domain(
        "condition_occurrence",
        "condition_concept_id",
        "condition_source_value",
        "condition_start_date",
    ),
    "procedure": Domain(
        "procedure_occurrence", "procedure_concept_id", "procedure_source_value", "procedure_date"
    ),
    "drug": Domain(
        "drug_exposure", "drug_concept_id", "drug_source_value", "drug_exposure_start_date"
    ),
    "measurement": Domain(
        "measurement", "measurement_concept_id", "measurement_source_value", "measurement_date"
    ),
    "observation": Domain(
        "observation", "observation_concept_id", "observation_source_value", "observation_date"
    ),
    "visit": Domain(
        "visit_occurrence", "visit_concept_id", "visit_source_value", "visit_start_date"
    ),
}
_ID_COLUMN = {d.table: EMR_KEYS[d.table][0] for d in DOMAINS.values()}


def day(text: str) -> dt.date:
    """``"2023-10-03"`` -> a date; ``"10-03"`` -> that day of 2023 (most fixtures live there)."""
    return dt.date.fromisoformat(text if len(text) > 5 else f"2023-{text}")


# ---------------------------------------------------------------------------------------------
# World builder


class World:
    """A small EMR and series index, built row by row, written under ``root`` by :meth:`write`.

    Every person gets ``person_source_value = f"P{person_id}"`` unless told otherwise, so the
    index PatientID of person 7 is ``"P7"``.
    """

    def __init__(self) -> None:
        self.rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.series_rows: list[dict[str, Any]] = []
        self.with_crosswalk = False
        for concept_id, (name, domain) in CONCEPTS.items():
            self.rows["concept"].append(
                {
                    "concept_id": concept_id,
                    "concept_name": name,
                    "domain_id": domain,
                    "vocabulary_id": "Test",
                    "concept_class_id": "Test",
                    "standard_concept": "S",
                    "concept_code": str(concept_id),
                    "valid_start_date": dt.date(1970, 1, 1),
                    "valid_end_date": dt.date(2099, 12, 31),
                }
            )
            self.rows["concept_ancestor"].append(
                {
                    "ancestor_concept_id": concept_id,
                    "descendant_concept_id": concept_id,
                    "min_levels_of_separation": 0,
                    "max_levels_of_separation": 0,
                }
            )
        for ancestor, descendant, levels in ANCESTRY:
            self.rows["concept_ancestor"].append(
                {
                    "ancestor_concept_id": ancestor,
                    "descendant_concept_id": descendant,
                    "min_levels_of_separation": levels,
                    "max_levels_of_separation": levels,
                }
            )

    # -- EMR ------------------------------------------------------------------------------------

    def person(
        self,
        person_id: int,
        *,
        source: str | None = "",
        year_of_birth: int | None = 1960,
        gender: int = MALE,
    ) -> None:
        """A person row; ``source=""`` means ``f"P{person_id}"``, None a null source value."""
        self.rows["person"].append(
            {
                "person_id": person_id,
                "gender_concept_id": gender,
                "year_of_birth": year_of_birth,
                "race_concept_id": 0,
                "ethnicity_concept_id": 0,
                "person_source_value": f"P{person_id}" if source == "" else source,
            }
        )

    def event(
        self,
        domain: str,
        person_id: int,
        date: str | dt.date,
        concept: int = 0,
        source: str | None = None,
        value: float | None = None,
    ) -> None:
        """One row of ``domain``'s table (``value`` for measurements)."""
        spec = DOMAINS[domain]
        rows = self.rows[spec.table]
        row: dict[str, Any] = {
            _ID_COLUMN[spec.table]: len(rows) + 1,
            "person_id": person_id,
            spec.concept: concept,
            spec.source: source,
            spec.date: day(date) if isinstance(date, str) else date,
        }
        if domain == "measurement":
            row["value_as_number"] = value
        rows.append(row)

    def crosswalk(self, patient_id: str, person_id: int) -> None:
        self.with_crosswalk = True
        self.rows["crosswalk"].append({"PatientID": patient_id, "person_id": person_id})

    # -- index ----------------------------------------------------------------------------------

    def series(
        self,
        patient_id: str,
        uid: str,
        *,
        study_date: str | None = None,
        series_date: str | None = None,
        acquisition_date: str | None = None,
        modality: str = "CT",
        body_part: str | None = "CHEST",
        description: str | None = "CT CHEST",
        instances: int = 30,
        study: str | None = None,
    ) -> None:
        """One series; ``imaging_date`` = StudyDate, else SeriesDate, else AcquisitionDate."""
        dates = [day(d) if d else None for d in (study_date, series_date, acquisition_date)]
        imaging_date = next((d for d in dates if d is not None), None)
        study_uid = study or f"study.{uid}"
        self.series_rows.append(
            {
                "SeriesInstanceUID": uid,
                "StudyInstanceUID": study_uid,
                "PatientID": patient_id,
                "AccessionNumber": f"ACC.{study_uid}",
                "StudyDate": dates[0],
                "SeriesDate": dates[1],
                "Modality": modality,
                "BodyPartExamined": body_part,
                "SeriesDescription": description,
                "imaging_date": imaging_date,
                "instance_count": instances,
                "frame_count": instances,
                "size_bytes": 1000 * instances,
            }
        )

    # -- writing --------------------------------------------------------------------------------

    def write(self, root: Path) -> Path:
        """Write the EMR tables under ``root/emr`` and the index under ``root/tables``."""
        for name, schema in OMOP_SCHEMAS.items():
            if name == "crosswalk" and not self.with_crosswalk:
                continue
            table = pa.Table.from_pylist(self.rows.get(name, []), schema=schema)
            Table(root / "emr" / name, EMR_KEYS[name]).overwrite(table)
        write_series(self.series_rows, root)
        return root


def series_schema(root: Path) -> pa.Schema:
    """The index's series schema, plus StudyDate and AccessionNumber when it lacks them."""
    schema = Index(root).empty("series").schema
    if "StudyDate" not in schema.names:
        schema = schema.append(pa.field("StudyDate", pa.date32()))
    if "AccessionNumber" not in schema.names:
        schema = schema.append(pa.field("AccessionNumber", pa.large_string()))
    return schema


def write_series(rows: Sequence[Mapping[str, Any]], root: Path) -> None:
    """The ``series`` table, and a ``studies`` table consistent with it."""
    schema = series_schema(root)
    table = pa.Table.from_pylist([dict(r) for r in rows], schema=schema)
    Table(root / "tables" / "series", ["SeriesInstanceUID"]).overwrite(table)
    studies: dict[str, dict[str, Any]] = {}
    for r in rows:
        s = studies.setdefault(
            r["StudyInstanceUID"],
            {
                "StudyInstanceUID": r["StudyInstanceUID"],
                "PatientID": r["PatientID"],
                "StudyDate": r.get("StudyDate"),
                "AccessionNumber": r.get("AccessionNumber"),
                "series_count": 0,
                "instance_count": 0,
                "size_bytes": 0,
            },
        )
        s["series_count"] += 1
        s["instance_count"] += r.get("instance_count") or 0
        s["size_bytes"] += r.get("size_bytes") or 0
    study_schema = Index(root).empty("studies").schema
    Table(root / "tables" / "studies", ["StudyInstanceUID"]).overwrite(
        pa.Table.from_pylist(list(studies.values()), schema=study_schema)
    )


# ---------------------------------------------------------------------------------------------
# The reference: the doc's rules as DuckDB SQL.

#: How the attrition step "linked to a PatientID" counts. The doc: "Persons with no linked
#: PatientID are counted in the attrition table ("linked to a PatientID")". Read literally, a
#: person is linked to the index when at least one index series has a PatientID that maps to
#: them (person_source_value, or the crosswalk). False: when they have any PatientID at all
#: (a non-null person_source_value, or a crosswalk row), whether or not the index has it.
LINKED_MEANS_IN_INDEX = False


@dataclasses.dataclass
class Reference:
    """What the doc says a cohort selects.

    ``rows``: one dict per selected series (person_id, PatientID, SeriesInstanceUID,
    entry_date, days_from_index, and ``<name>_count``/``<name>_days`` per inclusion and label
    criterion). ``attrition``: (step, persons, entry_events) in the doc's order.
    """

    rows: list[dict[str, Any]]
    attrition: list[tuple[str, int, int]]
    label_columns: list[str]
    demographics: bool

    def keys(self) -> set[tuple[Any, ...]]:
        return {
            (r["person_id"], r["SeriesInstanceUID"], r["entry_date"], r["days_from_index"])
            for r in self.rows
        }

    def by_series(self) -> dict[str, dict[str, Any]]:
        return {r["SeriesInstanceUID"]: r for r in self.rows}


def _q(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _date(value: Any) -> str:
    if isinstance(value, str):
        value = dt.date.fromisoformat(value)
    assert isinstance(value, dt.date), value
    return f"DATE '{value.isoformat()}'"


def _window(spec: Mapping[str, Any], d: str) -> str:
    """The SQL condition "``d`` (days from the entry) is inside the spec's window"."""
    keys = [k for k in ("after", "before", "days") if k in spec]
    assert len(keys) <= 1, f"more than one window in {spec}"
    if not keys:
        return "TRUE"
    a, b = spec[keys[0]]
    if keys[0] == "before":  # before: [a, b]  ->  -b <= d <= -a
        lo, hi = (None if b is None else -b), (None if a is None else -a)
    else:  # after / days: [a, b]  ->  a <= d <= b
        lo, hi = a, b
    parts = [f"{d} IS NOT NULL"]
    if lo is not None:
        parts.append(f"{d} >= {int(lo)}")
    if hi is not None:
        parts.append(f"{d} <= {int(hi)}")
    return " AND ".join(parts)


def load_codeset(name: str, cohort: Mapping[str, Any], base_dir: Path | None) -> dict[str, Any]:
    """The code set ``name``: inline under ``codesets:``, or ``codesets/<file>.yaml``."""
    defined = (cohort.get("codesets") or {}).get(name, name)
    if isinstance(defined, dict):
        return defined
    assert base_dir is not None, f"code set {name!r} needs a codesets/ folder"
    loaded = yaml.safe_load((base_dir / "codesets" / f"{defined}.yaml").read_text("utf-8"))
    assert isinstance(loaded, dict)
    return loaded


#: One in-memory DuckDB database per root, its views made once: the worlds do not change after
#: they are written. Each reference runs on its own cursor (temp tables are per cursor).
_DATABASES: dict[Path, tuple[duckdb.DuckDBPyConnection, frozenset[str]]] = {}


def _database(root: Path) -> tuple[duckdb.DuckDBPyConnection, frozenset[str]]:
    """The database with every Delta table under ``root`` as a view, and their names."""
    if root not in _DATABASES:
        con = duckdb.connect()
        con.execute("CREATE MACRO norm_code(x) AS upper(replace(x, '.', ''))")
        names = set()
        for name in [*OMOP_SCHEMAS, "series"]:
            path = root / ("tables" if name == "series" else "emr") / name
            table = Table(path, EMR_KEYS.get(name, ["SeriesInstanceUID"]))
            if not table.exists:
                continue
            names.add(name)
            files = table.files()
            if files:
                listed = ", ".join(_q(f) for f in files)
                con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet([{listed}])")
            else:  # an empty Delta table has no files: an empty table of its schema
                con.register("empty_rows", table.to_arrow())
                con.execute(f"CREATE TABLE {name} AS SELECT * FROM empty_rows")
                con.unregister("empty_rows")
        _DATABASES[root] = (con, frozenset(names))
    return _DATABASES[root]


class _Sql:
    """A cursor on the database of ``root`` (:func:`_database`)."""

    def __init__(self, root: Path) -> None:
        database, self.tables = _database(root)
        self.con = database.cursor()
        self._n = 0

    def run(self, sql: str) -> None:
        self.con.execute(sql)

    def rows(self, sql: str) -> list[dict[str, Any]]:
        cursor = self.con.execute(sql)
        names = [c[0] for c in cursor.description or []]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def scalar(self, sql: str) -> Any:
        row = self.con.execute(sql).fetchone()
        assert row is not None
        return row[0]

    def fresh(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def concept_set(self, ids: Iterable[int], descendants: bool) -> str:
        """SQL of the concept ids ``ids`` (and, with ``descendants``, all below them)."""
        listed = ", ".join(str(int(i)) for i in ids)
        if not listed:
            return "SELECT NULL::BIGINT AS concept_id WHERE FALSE"
        sql = f"SELECT unnest([{listed}]::BIGINT[]) AS concept_id"
        if descendants:
            sql += (
                " UNION SELECT descendant_concept_id FROM concept_ancestor"
                f" WHERE ancestor_concept_id IN ({listed})"
            )
        return sql

    def events(self, crit: Mapping[str, Any], codeset: Mapping[str, Any]) -> str:
        """A temp table (person_id, event_date) of the criterion's events; returns its name."""
        spec = DOMAINS[crit["domain"]]
        descendants = bool(codeset.get("descendants", False))
        concepts = self.fresh("concepts")
        self.run(
            f"CREATE TEMP TABLE {concepts} AS"
            f" ({self.concept_set(codeset.get('concepts') or [], descendants)})"
            f" EXCEPT ({self.concept_set(codeset.get('exclude') or [], descendants)})"
        )
        matches = [f"{spec.concept} IN (SELECT concept_id FROM {concepts})"]
        for code in codeset.get("source_codes") or []:
            code = str(code)
            if code.endswith("*"):
                matches.append(f"starts_with(norm_code({spec.source}), norm_code({_q(code[:-1])}))")
            else:
                matches.append(f"norm_code({spec.source}) = norm_code({_q(code)})")
        where = "(" + " OR ".join(f"coalesce({m}, FALSE)" for m in matches) + ")"
        value = crit.get("value")
        if value is not None:
            if value.get("min") is not None:
                where += f" AND value_as_number >= {float(value['min'])!r}"
            if value.get("max") is not None:
                where += f" AND value_as_number <= {float(value['max'])!r}"
        name = self.fresh("events")
        self.run(
            f"CREATE TEMP TABLE {name} AS SELECT person_id, {spec.date} AS event_date"
            f" FROM {spec.table} WHERE {where}"
        )
        return name

    def count(self, entries: str, events: str, crit: Mapping[str, Any]) -> str:
        """Per entry event: n (events in the window) and first_day (day of the first)."""
        d = "datediff('day', e.entry_date, v.event_date)"
        name = self.fresh("counts")
        self.run(
            f"CREATE TEMP TABLE {name} AS"
            f" SELECT e.person_id, e.entry_date, count(v.person_id) AS n, min({d}) AS first_day"
            f" FROM {entries} e LEFT JOIN {events} v"
            f"   ON v.person_id = e.person_id AND {_window(crit, d)}"
            f" GROUP BY e.person_id, e.entry_date"
        )
        return name


def _holds(crit: Mapping[str, Any]) -> str:
    """SQL condition on ``n`` for "the criterion holds": at_least <= n <= at_most."""
    at_most = crit.get("at_most")
    # Doc: at_least defaults to 1; its own example `{at_most: 0}` ("no CABG") needs 0 there,
    # so with at_most given the default is taken as 0 (see the report).
    at_least = crit.get("at_least", 1 if at_most is None else 0)
    cond = f"n >= {int(at_least)}"
    if at_most is not None:
        cond += f" AND n <= {int(at_most)}"
    return cond


def _glob_any(column: str, patterns: Sequence[str]) -> str:
    return " OR ".join(f"coalesce(lower({column}) GLOB lower({_q(p)}), FALSE)" for p in patterns)


def reference_select(
    cohort: Mapping[str, Any], root: Path, base_dir: Path | None = None
) -> Reference:
    """What ``docs/cohorts.md`` says ``select(cohort, root)`` returns."""
    sql = _Sql(root)
    attrition: list[tuple[str, int, int]] = []

    def step(name: str, table: str) -> None:
        persons = sql.scalar(f"SELECT count(DISTINCT person_id) FROM {table}")
        events = sql.scalar(
            f"SELECT count(*) FROM (SELECT DISTINCT person_id, entry_date FROM {table})"
        )
        attrition.append((name, int(persons), int(events)))

    # -- entry events ---------------------------------------------------------------------------
    entry = cohort["entry"]
    entry_events = sql.events(entry, load_codeset(entry["codeset"], cohort, base_dir))
    dates = entry.get("dates") or {}
    in_range = ["event_date IS NOT NULL"]
    if dates.get("from") is not None:
        in_range.append(f"event_date >= {_date(dates['from'])}")
    if dates.get("to") is not None:
        in_range.append(f"event_date <= {_date(dates['to'])}")
    inside = " AND ".join(in_range)
    occurrence = entry.get("occurrence", "first")
    if occurrence == "first":  # the first event ever, kept when it is inside the range
        sql.run(
            "CREATE TEMP TABLE entry0 AS SELECT person_id, entry_date FROM"
            f" (SELECT person_id, min(event_date) AS entry_date FROM {entry_events}"
            "   WHERE event_date IS NOT NULL GROUP BY person_id)"
            f" WHERE {inside.replace('event_date', 'entry_date')}"
        )
    elif occurrence == "first_in_range":
        sql.run(
            "CREATE TEMP TABLE entry0 AS SELECT person_id, min(event_date) AS entry_date"
            f" FROM {entry_events} WHERE {inside} GROUP BY person_id"
        )
    else:
        assert occurrence == "all", occurrence
        sql.run(
            "CREATE TEMP TABLE entry0 AS SELECT DISTINCT person_id, event_date AS entry_date"
            f" FROM {entry_events} WHERE {inside}"
        )
    step("entry event", "entry0")

    # -- demographics ---------------------------------------------------------------------------
    demo = cohort.get("demographics") or {}
    conditions = ["TRUE"]
    age = demo.get("age") or {}
    if age.get("min") is not None:
        conditions.append(f"year(e.entry_date) - p.year_of_birth >= {int(age['min'])}")
    if age.get("max") is not None:
        conditions.append(f"year(e.entry_date) - p.year_of_birth <= {int(age['max'])}")
    if demo.get("gender") is not None:
        ids = [{"female": FEMALE, "male": MALE}.get(g, g) for g in demo["gender"]]
        conditions.append(f"p.gender_concept_id IN ({', '.join(str(int(i)) for i in ids)})")
    if demo:
        sql.run(
            "CREATE TEMP TABLE kept0 AS SELECT e.person_id, e.entry_date FROM entry0 e"
            f" JOIN person p ON p.person_id = e.person_id WHERE {' AND '.join(conditions)}"
        )
    else:
        sql.run("CREATE TEMP TABLE kept0 AS SELECT * FROM entry0")
    step("demographics", "kept0")

    # -- inclusion, exclusion, labels (counted for every entry event) ------------------------------
    counts: dict[str, str] = {}
    for kind in ("inclusion", "exclusion", "labels"):
        for crit in cohort.get(kind) or []:
            events = sql.events(crit, load_codeset(crit["codeset"], cohort, base_dir))
            counts[f"{kind}:{crit['name']}"] = sql.count("entry0", events, crit)
    kept = "kept0"
    for kind, keep in (("inclusion", ""), ("exclusion", "NOT ")):
        for crit in cohort.get(kind) or []:
            name = sql.fresh("kept")
            counted = counts[f"{kind}:{crit['name']}"]
            sql.run(
                f"CREATE TEMP TABLE {name} AS SELECT k.person_id, k.entry_date FROM {kept} k"
                f" JOIN {counted} c"
                "   ON c.person_id = k.person_id AND c.entry_date = k.entry_date"
                f" WHERE {keep}({_holds(crit)})"
            )
            kept = name
            step(f"{kind}: {crit['name']}", kept)

    # -- linking: crosswalk if there is one, else person_source_value ------------------------------
    if "crosswalk" in sql.tables:
        sql.run("CREATE TEMP TABLE links AS SELECT DISTINCT PatientID, person_id FROM crosswalk")
    else:
        sql.run(
            "CREATE TEMP TABLE links AS SELECT DISTINCT person_source_value AS PatientID,"
            " person_id FROM person WHERE person_source_value IS NOT NULL"
        )
    sql.run(
        "CREATE TEMP TABLE person_series AS SELECT l.person_id, s.* FROM series s"
        " JOIN links l ON l.PatientID = s.PatientID"
    )
    linked_persons = "person_series" if LINKED_MEANS_IN_INDEX else "links"
    sql.run(
        f"CREATE TEMP TABLE linked AS SELECT * FROM {kept}"
        f" WHERE person_id IN (SELECT person_id FROM {linked_persons})"
    )
    step("linked to a PatientID", "linked")

    # -- imaging --------------------------------------------------------------------------------
    imaging = cohort.get("imaging") or {}
    filters = ["TRUE"]
    if imaging.get("modality") is not None:
        filters.append(f"Modality IN ({', '.join(_q(m) for m in imaging['modality'])})")
    if imaging.get("body_part") is not None:
        listed = ", ".join(_q(str(b).upper()) for b in imaging["body_part"])
        filters.append(f"upper(BodyPartExamined) IN ({listed})")
    if imaging.get("series_description") is not None:
        patterns = [str(p) for p in imaging["series_description"]]
        positive = [p for p in patterns if not p.startswith("!")]
        negative = [p[1:] for p in patterns if p.startswith("!")]
        filters.append(f"({_glob_any('SeriesDescription', positive)})" if positive else "FALSE")
        if negative:
            filters.append(f"NOT ({_glob_any('SeriesDescription', negative)})")
    if imaging.get("min_instances") is not None:
        filters.append(f"instance_count >= {int(imaging['min_instances'])}")
    sql.run(
        f"CREATE TEMP TABLE candidates AS SELECT * FROM person_series WHERE {' AND '.join(filters)}"
    )
    d = "datediff('day', k.entry_date, c.imaging_date)"
    sql.run(
        "CREATE TEMP TABLE pairs AS SELECT k.person_id, k.entry_date, c.SeriesInstanceUID"
        f" FROM linked k JOIN candidates c ON c.person_id = k.person_id AND {_window(imaging, d)}"
    )
    step("with matching imaging", "pairs")

    # -- the selection: each series once, for the earliest entry event whose window holds it ------
    sql.run(
        "CREATE TEMP TABLE chosen AS SELECT person_id, SeriesInstanceUID,"
        " min(entry_date) AS entry_date FROM pairs GROUP BY person_id, SeriesInstanceUID"
    )
    label_columns: list[str] = []
    joins, columns = [], []
    for kind in ("inclusion", "labels"):
        for i, crit in enumerate(cohort.get(kind) or []):
            alias = f"{kind[0]}{i}"
            name = crit["name"]
            label_columns += [f"{name}_count", f"{name}_days"]
            columns += [f"{alias}.n AS {name}_count", f"{alias}.first_day AS {name}_days"]
            joins.append(
                f" LEFT JOIN {counts[f'{kind}:{name}']} {alias}"
                f"   ON {alias}.person_id = x.person_id AND {alias}.entry_date = x.entry_date"
            )
    rows = sql.rows(
        "SELECT x.person_id, s.PatientID, x.SeriesInstanceUID, x.entry_date,"
        " datediff('day', x.entry_date, s.imaging_date) AS days_from_index"
        + "".join(f", {c}" for c in columns)
        + " FROM chosen x JOIN person_series s"
        "   ON s.person_id = x.person_id AND s.SeriesInstanceUID = x.SeriesInstanceUID"
        + "".join(joins)
        + " ORDER BY x.person_id, x.SeriesInstanceUID"
    )
    sql.run("CREATE TEMP TABLE selected AS SELECT * FROM chosen")
    step("series selected", "selected")
    sql.con.close()
    return Reference(
        rows=rows, attrition=attrition, label_columns=label_columns, demographics=bool(demo)
    )
