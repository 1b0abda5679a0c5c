"""A seeded synthetic hospital: an OMOP CDM v5.4 EMR and the index ``series`` table that links to it.

:func:`generate_world` builds, with numpy and pyarrow only (no loop over rows), the EMR tables
``person``, ``visit_occurrence``, ``condition_occurrence``, ``procedure_occurrence``,
``drug_exposure``, ``measurement``, ``observation``, ``concept`` and ``concept_ancestor``, and
the index's ``series`` table for the same patients. A million persons with ten million series
and two million condition and procedure rows take well under a minute.

Tables follow the import contract of :mod:`imgindex.emr`: canonical lowercase v5.4 column
names; ids, concept ids and ``year_of_birth`` ``int64``, ``*_date`` ``date32``,
``*_datetime`` ``timestamp[us]``, ``value_as_number``, ``quantity``, ``range_low`` and
``range_high`` ``float64``; the CDM's other integers (``month_of_birth``, ``refills``,
``days_supply``...) ``int64``; everything else ``string``. Event tables come sorted by their date
column, then ``person_id``.

The world holds one planted question with a non-trivial answer, the MI/CAD question of
issue 5 (:data:`MI_CAD_CT`): a cluster of myocardial infarctions diagnosed between 2023-10-01
and 2023-10-10, a coronary procedure 7 to 14 days later for most of them, and CT series around
those dates. Its edges are planted on purpose: diagnoses on the first and last day of the range
and one day outside it, procedures on days 6, 7, 14 and 15, series on days -1, 0, 30 and 31,
earlier and later infarctions of the same person, infarctions coded only by concept or only by
ICD-10 source code (with and without the dot), series without StudyDate or with no date at all,
persons without imaging and index patients without an EMR person. :attr:`World.planted` lists
the planted persons with what was planted for each.

:func:`reference_duckdb` and :func:`reference_polars` answer a :class:`CohortQuestion` by hand
over the Parquet files of the written tables; ``scripts/bench_cohort.py`` times them against
:mod:`imgindex.cohort`, and the tests check that they agree.

Concept ids are those of the OMOP standardized vocabularies. :data:`CONCEPTS` marks the few
that could not be checked against public OHDSI material (``verified=False``); they are used
consistently here, so cohorts over generated data work, but do not copy them into a real study.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydicom.uid import PYDICOM_ROOT_UID

from imgindex.index import Index
from imgindex.schema import DEFAULT_ATTRIBUTES
from storage import Table

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

    import polars as pl
    from numpy.typing import NDArray

    from imgindex.schema import Attribute

__all__ = [
    "CONCEPTS",
    "CONDITION_CODES",
    "CORONARY_PROCEDURES",
    "MI_CAD_CT",
    "OMOP_DATE_COLUMNS",
    "OMOP_KEYS",
    "OMOP_SCHEMAS",
    "OMOP_TABLES",
    "PROCEDURE_CODES",
    "CohortQuestion",
    "Concept",
    "SeriesOrder",
    "SourceCode",
    "World",
    "concept_ancestor_table",
    "concept_table",
    "generate_world",
    "reference_duckdb",
    "reference_polars",
    "write_omop_csv",
    "write_omop_tables",
    "write_series_index",
    "write_world",
]

logger = logging.getLogger(__name__)

SeriesOrder = Literal["date", "random", "as_is"]

# -- the vocabulary ---------------------------------------------------------------------------

# Standard concepts (OMOP vocabularies; SNOMED code in the comment).
MYOCARDIAL_INFARCTION: Final = 4329847  # 22298006
ACUTE_MI: Final = 312327  # 57054005
ACUTE_MI_ANTERIOR: Final = 434376  # 54329005
ACUTE_MI_INFERIOR: Final = 438170  # 73795002
STEMI: Final = 4296653  # 401303003
NSTEMI: Final = 4270024  # 401314000
SUBSEQUENT_MI: Final = 4108217
SUBSEQUENT_MI_ANTERIOR: Final = 4108677
SUBSEQUENT_MI_INFERIOR: Final = 4108218
ISCHEMIC_HEART_DISEASE: Final = 4185932  # 414545008
CORONARY_ARTERIOSCLEROSIS: Final = 317576  # 53741008
CEREBROVASCULAR_ACCIDENT: Final = 381316  # 230690007
CEREBRAL_INFARCTION: Final = 443454  # 432504007
PULMONARY_NODULE: Final = 4197224  # 427359005, unverified id
HYPERTENSIVE_DISORDER: Final = 316866  # 38341003
ESSENTIAL_HYPERTENSION: Final = 320128  # 59621000
DIABETES_MELLITUS: Final = 201820  # 73211009
TYPE_2_DIABETES: Final = 201826  # 44054006
ATRIAL_FIBRILLATION: Final = 313217  # 49436004
PNEUMONIA: Final = 255848  # 233604007
ASTHMA: Final = 317009  # 195967001
OSTEOARTHRITIS: Final = 80180  # 396275006
ACUTE_BRONCHITIS: Final = 260139  # 10509002
CHRONIC_SINUSITIS: Final = 257012  # 40055000

PCI: Final = 4216130  # 415070008 Percutaneous coronary intervention
PTCA: Final = 4184832  # unverified name
CORONARY_STENT: Final = 4304209  # unverified name
CABG: Final = 4336464  # 232717009 Coronary artery bypass graft
CORONARY_ANGIOGRAPHY: Final = 4324124  # 33367005, unverified id
CHEST_XRAY: Final = 4163872  # 399208008
ECG: Final = 4163951  # 29303009
APPENDECTOMY: Final = 4198190  # 80146002
LAPAROSCOPIC_CHOLECYSTECTOMY: Final = 4163971  # 45595009
INTUBATION: Final = 4202832  # 52765003
EEG: Final = 4181917  # 54550000
CATHETER_ABLATION_HEART: Final = 4057420  # 18286008
CARDIOVERSION: Final = 4078793  # 180325003

VISIT_INPATIENT: Final = 9201
VISIT_OUTPATIENT: Final = 9202
VISIT_EMERGENCY: Final = 9203
GENDER_MALE: Final = 8507
GENDER_FEMALE: Final = 8532
#: Type concept "EHR" (the record came from an electronic health record).
TYPE_EHR: Final = 32817
STATUS_PRIMARY_DIAGNOSIS: Final = 32902
STATUS_SECONDARY_DIAGNOSIS: Final = 32908

#: The coronary procedures of the MI/CAD question (with descendants).
CORONARY_PROCEDURES: Final = (PCI, CABG, CORONARY_ANGIOGRAPHY)


@dataclass(frozen=True)
class Concept:
    """One row of the ``concept`` table.

    Attributes
    ----------
    concept_id, concept_name, domain_id, vocabulary_id, concept_class_id, concept_code
        As in the CDM.
    standard : bool
        Whether the concept is standard (``standard_concept = 'S'``).
    verified : bool
        Whether the id and name were checked against public OHDSI material (Eunomia's
        vocabulary, OHDSI study code); False for ids recalled but not confirmed.
    """

    concept_id: int
    concept_name: str
    domain_id: str
    vocabulary_id: str
    concept_class_id: str
    concept_code: str
    standard: bool = True
    verified: bool = True


# The vocabulary as an Athena extract would list it: concept_id | concept_name | domain_id |
# vocabulary_id | concept_class_id | concept_code | flags ("N": not standard, "?": id or name
# not confirmed in public OHDSI material: Eunomia's vocabulary, OHDSI study code).
_VOCABULARY: Final = """
0|No matching concept|Metadata|None|Undefined|No matching concept|N
4185932|Ischemic heart disease|Condition|SNOMED|Clinical Finding|414545008|?
4329847|Myocardial infarction|Condition|SNOMED|Clinical Finding|22298006|
312327|Acute myocardial infarction|Condition|SNOMED|Clinical Finding|57054005|
434376|Acute myocardial infarction of anterior wall|Condition|SNOMED|Clinical Finding|54329005|
438170|Acute myocardial infarction of inferior wall|Condition|SNOMED|Clinical Finding|73795002|
4296653|Acute ST segment elevation myocardial infarction|Condition|SNOMED|Clinical Finding|401303003|
4270024|Acute non-ST segment elevation myocardial infarction|Condition|SNOMED|Clinical Finding|401314000|
4108217|Subsequent myocardial infarction|Condition|SNOMED|Clinical Finding|194856005|?
4108677|Subsequent myocardial infarction of anterior wall|Condition|SNOMED|Clinical Finding|194857001|?
4108218|Subsequent myocardial infarction of inferior wall|Condition|SNOMED|Clinical Finding|194858006|?
317576|Coronary arteriosclerosis|Condition|SNOMED|Clinical Finding|53741008|
381316|Cerebrovascular accident|Condition|SNOMED|Clinical Finding|230690007|
443454|Cerebral infarction|Condition|SNOMED|Clinical Finding|432504007|
4197224|Solitary nodule of lung|Condition|SNOMED|Clinical Finding|427359005|?
316866|Hypertensive disorder|Condition|SNOMED|Clinical Finding|38341003|?
320128|Essential hypertension|Condition|SNOMED|Clinical Finding|59621000|
201820|Diabetes mellitus|Condition|SNOMED|Clinical Finding|73211009|
201826|Type 2 diabetes mellitus|Condition|SNOMED|Clinical Finding|44054006|
313217|Atrial fibrillation|Condition|SNOMED|Clinical Finding|49436004|
255848|Pneumonia|Condition|SNOMED|Clinical Finding|233604007|
317009|Asthma|Condition|SNOMED|Clinical Finding|195967001|
80180|Osteoarthritis|Condition|SNOMED|Clinical Finding|396275006|
260139|Acute bronchitis|Condition|SNOMED|Clinical Finding|10509002|
257012|Chronic sinusitis|Condition|SNOMED|Clinical Finding|40055000|
4216130|Percutaneous coronary intervention|Procedure|SNOMED|Procedure|415070008|
4184832|Percutaneous transluminal coronary angioplasty|Procedure|SNOMED|Procedure|11101003|?
4304209|Insertion of coronary artery stent|Procedure|SNOMED|Procedure|36969009|?
4336464|Coronary artery bypass graft|Procedure|SNOMED|Procedure|232717009|
4324124|Coronary arteriography|Procedure|SNOMED|Procedure|33367005|?
4163872|Plain chest X-ray|Procedure|SNOMED|Procedure|399208008|
4163951|Electrocardiographic procedure|Procedure|SNOMED|Procedure|29303009|
4198190|Appendectomy|Procedure|SNOMED|Procedure|80146002|
4163971|Laparoscopic cholecystectomy|Procedure|SNOMED|Procedure|45595009|
4202832|Intubation|Procedure|SNOMED|Procedure|52765003|
4181917|Electroencephalogram|Procedure|SNOMED|Procedure|54550000|
4057420|Catheter ablation of tissue of heart|Procedure|SNOMED|Procedure|18286008|
4078793|Direct current cardioversion|Procedure|SNOMED|Procedure|180325003|
4163874|History of myocardial infarction|Observation|SNOMED|Context-dependent|399211009|
4324181|History of cardiac arrest|Observation|SNOMED|Context-dependent|429007001|
4323208|History of appendectomy|Observation|SNOMED|Context-dependent|428251008|
4240902|Allergy to peanuts|Observation|SNOMED|Clinical Finding|91935009|
4048169|Allergy to house dust mite|Observation|SNOMED|Clinical Finding|232350006|
1112807|Aspirin|Drug|RxNorm|Ingredient|1191|
1322184|clopidogrel|Drug|RxNorm|Ingredient|32968|
1545958|atorvastatin|Drug|RxNorm|Ingredient|83367|
1361711|Nitroglycerin|Drug|RxNorm|Ingredient|4917|
1310149|Warfarin|Drug|RxNorm|Ingredient|11289|
1332418|Amlodipine|Drug|RxNorm|Ingredient|17767|
1177480|Ibuprofen|Drug|RxNorm|Ingredient|5640|
1125315|Acetaminophen|Drug|RxNorm|Ingredient|161|
3000963|Hemoglobin|Measurement|LOINC|Lab Test|718-7|
3016723|Creatinine serum/plasma|Measurement|LOINC|Lab Test|2160-0|
3004501|Glucose lab|Measurement|LOINC|Lab Test|2345-7|
3023103|Potassium serum/plasma|Measurement|LOINC|Lab Test|2823-3|
3019550|Sodium serum/plasma|Measurement|LOINC|Lab Test|2951-2|
8713|gram per deciliter|Unit|UCUM|Unit|g/dL|?
8840|milligram per deciliter|Unit|UCUM|Unit|mg/dL|?
8753|millimole per liter|Unit|UCUM|Unit|mmol/L|?
9201|Inpatient Visit|Visit|Visit|Visit|IP|
9202|Outpatient Visit|Visit|Visit|Visit|OP|
9203|Emergency Room Visit|Visit|Visit|Visit|ER|
8507|MALE|Gender|Gender|Gender|M|
8532|FEMALE|Gender|Gender|Gender|F|
8527|White|Race|Race|Race|5|?
8516|Black or African American|Race|Race|Race|3|?
8515|Asian|Race|Race|Race|2|?
38003563|Hispanic or Latino|Ethnicity|Ethnicity|Ethnicity|Hispanic|?
38003564|Not Hispanic or Latino|Ethnicity|Ethnicity|Ethnicity|Not Hispanic|?
32817|EHR|Type Concept|Type Concept|Type Concept|OMOP4976890|
32902|Primary diagnosis|Condition Status|Condition Status|Condition Status|OMOP4976972|
32908|Secondary diagnosis|Condition Status|Condition Status|Condition Status|OMOP4976978|
1569127|ST elevation (STEMI) myocardial infarction of anterior wall|Condition|ICD10CM|3-char nonbill code|I21.0|N
35207684|ST elevation (STEMI) myocardial infarction of unspecified site|Condition|ICD10CM|4-char billing code|I21.3|N
35207685|Non-ST elevation (NSTEMI) myocardial infarction|Condition|ICD10CM|4-char billing code|I21.4|N
44825429|Subendocardial infarction, initial episode of care|Condition|ICD9CM|5-dig billing code|410.71|N
"""


def _parse_vocabulary(text: str) -> tuple[Concept, ...]:
    concepts = []
    for line in text.strip().splitlines():
        cid, name, domain, vocabulary, klass, code, flags = line.split("|")
        concepts.append(
            Concept(
                int(cid),
                name,
                domain,
                vocabulary,
                klass,
                code,
                standard="N" not in flags,
                verified="?" not in flags,
            )
        )
    return tuple(concepts)


#: Every concept the world uses: standard SNOMED, RxNorm, LOINC, Visit, Gender, Race,
#: Ethnicity, Unit and Type concepts, and non-standard ICD-10-CM / ICD-9-CM source concepts.
CONCEPTS: Final[tuple[Concept, ...]] = _parse_vocabulary(_VOCABULARY)

#: Is-a edges among :data:`CONCEPTS` as (parent, child); :func:`concept_ancestor_table` closes
#: them transitively.
IS_A: Final[tuple[tuple[int, int], ...]] = (
    (ISCHEMIC_HEART_DISEASE, MYOCARDIAL_INFARCTION),
    (ISCHEMIC_HEART_DISEASE, CORONARY_ARTERIOSCLEROSIS),
    (MYOCARDIAL_INFARCTION, ACUTE_MI),
    (MYOCARDIAL_INFARCTION, SUBSEQUENT_MI),
    (ACUTE_MI, ACUTE_MI_ANTERIOR),
    (ACUTE_MI, ACUTE_MI_INFERIOR),
    (ACUTE_MI, STEMI),
    (ACUTE_MI, NSTEMI),
    (SUBSEQUENT_MI, SUBSEQUENT_MI_ANTERIOR),
    (SUBSEQUENT_MI, SUBSEQUENT_MI_INFERIOR),
    (CEREBROVASCULAR_ACCIDENT, CEREBRAL_INFARCTION),
    (HYPERTENSIVE_DISORDER, ESSENTIAL_HYPERTENSION),
    (DIABETES_MELLITUS, TYPE_2_DIABETES),
    (PCI, PTCA),
    (PCI, CORONARY_STENT),
)


@dataclass(frozen=True)
class SourceCode:
    """A source code as a site records it, and the standard concept it maps to.

    Attributes
    ----------
    source_value : str
        What lands in ``*_source_value`` (ICD-10-CM, ICD-9-CM, CPT-4, ICD-10-PCS, a local code).
    concept_id : int
        The standard concept (0 when the site's mapping has none).
    source_concept_id : int
        The source code's own concept (0 when not in :data:`CONCEPTS`).
    weight : float
        Relative frequency among generated background rows (0: planted only).
    """

    source_value: str
    concept_id: int
    source_concept_id: int = 0
    weight: float = 0.0


#: Condition codes: ICD-10-CM mostly; a few mapped only by concept (ICD-9-CM 410.71) or only by
#: source value (unmapped I21.4, KCD-style ``I214`` without the dot).
CONDITION_CODES: Final[tuple[SourceCode, ...]] = (
    SourceCode("I10", ESSENTIAL_HYPERTENSION, weight=14),
    SourceCode("E11.9", TYPE_2_DIABETES, weight=9),
    SourceCode("I25.10", CORONARY_ARTERIOSCLEROSIS, weight=5),
    SourceCode("I48.91", ATRIAL_FIBRILLATION, weight=3),
    SourceCode("J18.9", PNEUMONIA, weight=4),
    SourceCode("J45.909", ASTHMA, weight=3),
    SourceCode("M19.90", OSTEOARTHRITIS, weight=4),
    SourceCode("J20.9", ACUTE_BRONCHITIS, weight=4),
    SourceCode("J32.9", CHRONIC_SINUSITIS, weight=3),
    SourceCode("I63.9", CEREBRAL_INFARCTION, weight=1.5),
    SourceCode("R91.1", PULMONARY_NODULE, weight=2),
    SourceCode("I21.0", ACUTE_MI_ANTERIOR, 1569127, weight=0.1),
    SourceCode("I21.09", ACUTE_MI_ANTERIOR, weight=0.15),
    SourceCode("I21.19", ACUTE_MI_INFERIOR, weight=0.15),
    SourceCode("I21.3", STEMI, 35207684, weight=0.3),
    SourceCode("I21.4", NSTEMI, 35207685, weight=0.4),
    SourceCode("I21.9", ACUTE_MI, weight=0.5),
    SourceCode("I21.9", MYOCARDIAL_INFARCTION, weight=0.05),
    SourceCode("I22.1", SUBSEQUENT_MI_INFERIOR, weight=0.05),
    SourceCode("I22.9", SUBSEQUENT_MI, weight=0.05),
    SourceCode("I21.4", 0, weight=0.02),
    SourceCode("I214", 0, weight=0.01),
    SourceCode("410.71", NSTEMI, 44825429, weight=0.01),
)

#: Procedure codes: CPT-4 and ICD-10-PCS source values mapped to SNOMED concepts.
PROCEDURE_CODES: Final[tuple[SourceCode, ...]] = (
    SourceCode("71046", CHEST_XRAY, weight=10),
    SourceCode("93000", ECG, weight=12),
    SourceCode("44970", APPENDECTOMY, weight=1),
    SourceCode("47562", LAPAROSCOPIC_CHOLECYSTECTOMY, weight=1),
    SourceCode("31500", INTUBATION, weight=1),
    SourceCode("95816", EEG, weight=1),
    SourceCode("93656", CATHETER_ABLATION_HEART, weight=0.4),
    SourceCode("92960", CARDIOVERSION, weight=0.4),
    SourceCode("92941", PCI, weight=0.1),
    SourceCode("92920", PTCA, weight=0.2),
    SourceCode("92928", CORONARY_STENT, weight=0.4),
    SourceCode("027034Z", CORONARY_STENT, weight=0.1),
    SourceCode("33533", CABG, weight=0.2),
    SourceCode("021009W", CABG, weight=0.05),
    SourceCode("93458", CORONARY_ANGIOGRAPHY, weight=0.5),
)

# Indices into CONDITION_CODES / PROCEDURE_CODES used by the planted cluster.
_MI_CODES: Final = tuple(
    i
    for i, c in enumerate(CONDITION_CODES)
    if c.source_value.startswith(("I21", "I22")) and c.concept_id != 0
)
_MI_SOURCE_ONLY: Final = tuple(i for i, c in enumerate(CONDITION_CODES) if c.concept_id == 0)
_MI_CONCEPT_ONLY: Final = tuple(
    i for i, c in enumerate(CONDITION_CODES) if c.source_value == "410.71"
)
_CORONARY_CODES: Final = tuple(
    i
    for i, c in enumerate(PROCEDURE_CODES)
    if c.concept_id in (PCI, PTCA, CORONARY_STENT, CABG, CORONARY_ANGIOGRAPHY)
)
_ANGIOGRAPHY_CODE: Final = next(
    i for i, c in enumerate(PROCEDURE_CODES) if c.concept_id == CORONARY_ANGIOGRAPHY
)
_NON_CORONARY_CARDIAC: Final = tuple(
    i
    for i, c in enumerate(PROCEDURE_CODES)
    if c.concept_id in (CATHETER_ABLATION_HEART, CARDIOVERSION, ECG, APPENDECTOMY)
)

_DRUGS: Final = (  # (concept_id, RxNorm code, weight)
    (1112807, "1191", 6),
    (1322184, "32968", 2),
    (1545958, "83367", 5),
    (1361711, "4917", 1),
    (1310149, "11289", 1),
    (1332418, "17767", 4),
    (1177480, "5640", 4),
    (1125315, "161", 6),
)
_MEASUREMENTS: Final = (  # (concept_id, LOINC, unit concept, unit, mean, sd, low, high, weight)
    (3000963, "718-7", 8713, "g/dL", 13.5, 1.6, 12.0, 17.5, 3),
    (3016723, "2160-0", 8840, "mg/dL", 1.0, 0.3, 0.6, 1.3, 3),
    (3004501, "2345-7", 8840, "mg/dL", 105.0, 25.0, 70.0, 99.0, 3),
    (3023103, "2823-3", 8753, "mmol/L", 4.2, 0.4, 3.5, 5.1, 2),
    (3019550, "2951-2", 8753, "mmol/L", 139.0, 3.0, 136.0, 145.0, 2),
)
_OBSERVATIONS: Final = (  # (concept_id, SNOMED code, weight)
    (4163874, "399211009", 1),
    (4324181, "429007001", 0.3),
    (4323208, "428251008", 1),
    (4240902, "91935009", 1),
    (4048169, "232350006", 1),
)
_RACES: Final = ((8527, "White", 6), (8516, "Black", 2), (8515, "Asian", 1.5), (0, "Other", 0.5))
_ETHNICITIES: Final = ((38003564, "Not Hispanic", 8.5), (38003563, "Hispanic", 1.5))


def concept_table() -> pa.Table:
    """The ``concept`` table of :data:`CONCEPTS`, sorted by ``concept_id``."""
    rows = sorted(CONCEPTS, key=lambda c: c.concept_id)
    start = dt.date(1970, 1, 1)
    end = dt.date(2099, 12, 31)
    return pa.table(
        {
            "concept_id": pa.array([c.concept_id for c in rows], pa.int64()),
            "concept_name": [c.concept_name for c in rows],
            "domain_id": [c.domain_id for c in rows],
            "vocabulary_id": [c.vocabulary_id for c in rows],
            "concept_class_id": [c.concept_class_id for c in rows],
            "standard_concept": ["S" if c.standard and c.concept_id else None for c in rows],
            "concept_code": [c.concept_code for c in rows],
            "valid_start_date": pa.array([start] * len(rows), pa.date32()),
            "valid_end_date": pa.array([end] * len(rows), pa.date32()),
            "invalid_reason": pa.nulls(len(rows), pa.string()),
        },
        schema=OMOP_SCHEMAS["concept"],
    )


def concept_ancestor_table() -> pa.Table:
    """The ``concept_ancestor`` table: :data:`IS_A` closed transitively, plus one row with
    0 levels of separation for every standard concept, as the OMOP vocabulary has."""
    children: dict[int, list[int]] = {}
    for parent, child in IS_A:
        children.setdefault(parent, []).append(child)
    levels: dict[tuple[int, int], tuple[int, int]] = {}
    for concept in CONCEPTS:
        if not (concept.standard and concept.concept_id):
            continue
        # Walk down from each concept (the hierarchy is small): min and max depth per descendant.
        frontier = [(concept.concept_id, 0)]
        while frontier:
            node, depth = frontier.pop()
            low, high = levels.get((concept.concept_id, node), (depth, depth))
            levels[(concept.concept_id, node)] = (min(low, depth), max(high, depth))
            frontier.extend((child, depth + 1) for child in children.get(node, ()))
    keys = sorted(levels)
    return pa.table(
        {
            "ancestor_concept_id": pa.array([k[0] for k in keys], pa.int64()),
            "descendant_concept_id": pa.array([k[1] for k in keys], pa.int64()),
            "min_levels_of_separation": pa.array([levels[k][0] for k in keys], pa.int64()),
            "max_levels_of_separation": pa.array([levels[k][1] for k in keys], pa.int64()),
        },
        schema=OMOP_SCHEMAS["concept_ancestor"],
    )


# -- the table contract -----------------------------------------------------------------------

_I = pa.int64()
_F = pa.float64()
_S = pa.string()
_D = pa.date32()
_T = pa.timestamp("us")


#: Columns of the CDM typed otherwise than their name says (the contract's rules, in
#: :func:`_column_type`): CDM integers, CDM floats, and vocabulary ids that are text.
_INTEGER_COLUMNS: Final = frozenset(
    {
        "year_of_birth",
        "month_of_birth",
        "day_of_birth",
        "refills",
        "days_supply",
        "min_levels_of_separation",
        "max_levels_of_separation",
    }
)
_FLOAT_COLUMNS: Final = frozenset({"value_as_number", "quantity", "range_low", "range_high"})
_TEXT_ID_COLUMNS: Final = frozenset({"domain_id", "vocabulary_id", "concept_class_id"})


def _column_type(name: str) -> pa.DataType:
    """The contract's type of CDM column ``name``."""
    if name.endswith("_date"):
        return _D
    if name.endswith("_datetime"):
        return _T
    if name in _FLOAT_COLUMNS:
        return _F
    if name in _INTEGER_COLUMNS or (name.endswith("_id") and name not in _TEXT_ID_COLUMNS):
        return _I
    return _S


def _schema(columns: str) -> pa.Schema:
    return pa.schema([pa.field(name, _column_type(name)) for name in columns.split()])


#: Arrow schema of each OMOP CDM v5.4 table the EMR holds (every v5.4 column, in CDM order).
OMOP_SCHEMAS: Final[dict[str, pa.Schema]] = {
    "person": _schema(
        """person_id gender_concept_id year_of_birth month_of_birth day_of_birth
        birth_datetime race_concept_id ethnicity_concept_id location_id provider_id
        care_site_id person_source_value gender_source_value gender_source_concept_id
        race_source_value race_source_concept_id ethnicity_source_value
        ethnicity_source_concept_id"""
    ),
    "visit_occurrence": _schema(
        """visit_occurrence_id person_id visit_concept_id visit_start_date
        visit_start_datetime visit_end_date visit_end_datetime visit_type_concept_id
        provider_id care_site_id visit_source_value visit_source_concept_id
        admitted_from_concept_id admitted_from_source_value discharged_to_concept_id
        discharged_to_source_value preceding_visit_occurrence_id"""
    ),
    "condition_occurrence": _schema(
        """condition_occurrence_id person_id condition_concept_id condition_start_date
        condition_start_datetime condition_end_date condition_end_datetime
        condition_type_concept_id condition_status_concept_id stop_reason provider_id
        visit_occurrence_id visit_detail_id condition_source_value
        condition_source_concept_id condition_status_source_value"""
    ),
    "procedure_occurrence": _schema(
        """procedure_occurrence_id person_id procedure_concept_id procedure_date
        procedure_datetime procedure_end_date procedure_end_datetime
        procedure_type_concept_id modifier_concept_id quantity provider_id
        visit_occurrence_id visit_detail_id procedure_source_value
        procedure_source_concept_id modifier_source_value"""
    ),
    "drug_exposure": _schema(
        """drug_exposure_id person_id drug_concept_id drug_exposure_start_date
        drug_exposure_start_datetime drug_exposure_end_date drug_exposure_end_datetime
        verbatim_end_date drug_type_concept_id stop_reason refills quantity days_supply sig
        route_concept_id lot_number provider_id visit_occurrence_id visit_detail_id
        drug_source_value drug_source_concept_id route_source_value dose_unit_source_value"""
    ),
    "measurement": _schema(
        """measurement_id person_id measurement_concept_id measurement_date
        measurement_datetime measurement_time measurement_type_concept_id
        operator_concept_id value_as_number value_as_concept_id unit_concept_id range_low
        range_high provider_id visit_occurrence_id visit_detail_id measurement_source_value
        measurement_source_concept_id unit_source_value unit_source_concept_id
        value_source_value measurement_event_id meas_event_field_concept_id"""
    ),
    "observation": _schema(
        """observation_id person_id observation_concept_id observation_date
        observation_datetime observation_type_concept_id value_as_number value_as_string
        value_as_concept_id qualifier_concept_id unit_concept_id provider_id
        visit_occurrence_id visit_detail_id observation_source_value
        observation_source_concept_id unit_source_value qualifier_source_value
        value_source_value observation_event_id obs_event_field_concept_id"""
    ),
    "concept": _schema(
        """concept_id concept_name domain_id vocabulary_id concept_class_id standard_concept
        concept_code valid_start_date valid_end_date invalid_reason"""
    ),
    "concept_ancestor": _schema(
        """ancestor_concept_id descendant_concept_id min_levels_of_separation
        max_levels_of_separation"""
    ),
}

#: The tables, in the order :func:`write_omop_tables` writes them.
OMOP_TABLES: Final = tuple(OMOP_SCHEMAS)
#: Each event table's date column (its sort key, then ``person_id``).
OMOP_DATE_COLUMNS: Final[dict[str, str]] = {
    "visit_occurrence": "visit_start_date",
    "condition_occurrence": "condition_start_date",
    "procedure_occurrence": "procedure_date",
    "drug_exposure": "drug_exposure_start_date",
    "measurement": "measurement_date",
    "observation": "observation_date",
}
#: Primary key of each table (the sort key of the tables without a date column).
OMOP_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "person": ("person_id",),
    "visit_occurrence": ("visit_occurrence_id",),
    "condition_occurrence": ("condition_occurrence_id",),
    "procedure_occurrence": ("procedure_occurrence_id",),
    "drug_exposure": ("drug_exposure_id",),
    "measurement": ("measurement_id",),
    "observation": ("observation_id",),
    "concept": ("concept_id",),
    "concept_ancestor": ("ancestor_concept_id", "descendant_concept_id"),
}
#: OHDSI's file name of each table in a CSV export.
_CSV_NAMES: Final = {name: f"{name.upper()}.csv" for name in OMOP_SCHEMAS}
#: Parquet row group size of the written tables (rows).
ROW_GROUP_ROWS: Final = 100_000
#: Rows reordered at a time while the series table is written.
_WRITE_SLICE_ROWS: Final = 1_000_000


# -- the question -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CohortQuestion:
    """An MI/CAD-shaped question: entry event, one procedure criterion, imaging.

    "Persons whose first entry event ever (a condition in ``entry_concepts`` or their
    descendants, or whose ``condition_source_value`` starts with one of
    ``entry_source_prefixes``, compared without case and dots) falls between ``entry_from``
    and ``entry_to``; who had a procedure in ``procedure_concepts`` (with descendants)
    ``procedure_days[0]`` to ``procedure_days[1]`` days after it; their series of
    ``modality`` whose imaging date is ``imaging_days[0]`` to ``imaging_days[1]`` days after
    it." Both ends of every range are inclusive; persons link to series through
    ``person_source_value`` = ``PatientID``.
    """

    entry_concepts: tuple[int, ...] = (MYOCARDIAL_INFARCTION,)
    entry_source_prefixes: tuple[str, ...] = ("I21", "I22")
    entry_from: dt.date = dt.date(2023, 10, 1)
    entry_to: dt.date = dt.date(2023, 10, 10)
    procedure_concepts: tuple[int, ...] = CORONARY_PROCEDURES
    procedure_days: tuple[int, int] = (7, 14)
    modality: str = "CT"
    imaging_days: tuple[int, int] = (0, 30)
    name: str = "mi-cad-ct"

    def to_yaml(self) -> str:
        """The question as an :mod:`imgindex.cohort` YAML file (``docs/cohorts.md``)."""
        prefixes = ", ".join(f"{p}*" for p in self.entry_source_prefixes)
        return (
            f"name: {self.name}\n"
            "description: >-\n"
            f"  First condition from the entry code set between {self.entry_from} and "
            f"{self.entry_to},\n"
            f"  a procedure {self.procedure_days[0]} to {self.procedure_days[1]} days later; "
            f"{self.modality} series {self.imaging_days[0]} to {self.imaging_days[1]} days "
            "after it.\n"
            "codesets:\n"
            "  entry_codes:\n"
            f"    concepts: [{', '.join(map(str, self.entry_concepts))}]\n"
            "    descendants: true\n"
            f"    source_codes: [{prefixes}]\n"
            "  procedure_codes:\n"
            f"    concepts: [{', '.join(map(str, self.procedure_concepts))}]\n"
            "    descendants: true\n"
            "entry:\n"
            "  domain: condition\n"
            "  codeset: entry_codes\n"
            f"  dates: {{from: {self.entry_from}, to: {self.entry_to}}}\n"
            "  occurrence: first\n"
            "inclusion:\n"
            "  - name: procedure\n"
            "    domain: procedure\n"
            "    codeset: procedure_codes\n"
            f"    after: [{self.procedure_days[0]}, {self.procedure_days[1]}]\n"
            "imaging:\n"
            f"  modality: [{self.modality}]\n"
            f"  after: [{self.imaging_days[0]}, {self.imaging_days[1]}]\n"
        )


#: The question of issue 5: MI diagnosed 2023-10-01..10, a coronary procedure 7 to 14 days
#: later; the CT series of the 30 days after the diagnosis.
MI_CAD_CT: Final = CohortQuestion()

#: Columns of a reference answer: one row per series.
ANSWER_SCHEMA: Final = pa.schema(
    [
        ("person_id", _I),
        ("PatientID", _S),
        ("SeriesInstanceUID", _S),
        ("entry_date", _D),
        ("days_from_index", _I),
    ]
)

# -- generation -------------------------------------------------------------------------------

_EPOCH: Final = dt.date(1970, 1, 1)
_US_PER_DAY: Final = 86_400_000_000
_US_PER_HOUR: Final = 3_600_000_000
#: The planted cluster's entry range (the question's); generated whatever ``start``/``end``.
_CLUSTER_FROM: Final = dt.date(2023, 10, 1)
_CLUSTER_DAYS: Final = 10
#: Every generated UID starts with this (pydicom's root, PS3.5 Annex B; "77" for this module).
_UID_ROOT: Final = f"{PYDICOM_ROOT_UID}77."
_INDEXED_AT: Final = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

# Series descriptions per modality: (modality, SeriesDescription, BodyPartExamined,
# fewest instances, most instances, weight).
_SERIES_KINDS: Final[tuple[tuple[str, str, str | None, int, int, float], ...]] = (
    ("CT", "Topogram 0.6 T20f", "CHEST", 1, 2, 2),
    ("CT", "CT CHEST W/O CONTRAST", "CHEST", 60, 400, 4),
    ("CT", "CT CHEST W CONTRAST 1.25MM", "CHEST", 150, 600, 3),
    ("CT", "Thorax 3.0 B31f", "CHEST", 80, 250, 2),
    ("CT", "HRCT CHEST LUNG 1.0", "CHEST", 200, 600, 1),
    ("CT", "CTPA", "CHEST", 150, 500, 1),
    ("CT", "CTA CORONARY 0.75 Bv40 75%", "HEART", 200, 600, 2),
    ("CT", "Cardiac Calcium Score 3.0", "HEART", 30, 80, 2),
    ("CT", "CT HEART W CONTRAST", "HEART", 100, 400, 1),
    ("CT", "Dose Report", None, 1, 1, 1),
    ("CT", "CT ABDOMEN PELVIS W CONTRAST", "ABDOMEN", 150, 500, 3),
    ("CT", "CT HEAD W/O CONTRAST", "HEAD", 30, 200, 3),
    ("CT", "Head 5.0 H30s", "HEAD", 25, 60, 1),
    ("MR", "t1_mprage_sag", "BRAIN", 160, 192, 2),
    ("MR", "t2_tse_tra", "BRAIN", 20, 40, 2),
    ("MR", "ax DWI", "BRAIN", 20, 60, 1),
    ("MR", "CINE SAX", "HEART", 100, 300, 1),
    ("MR", "LGE PSIR", "HEART", 10, 20, 1),
    ("MR", "sag PD fs", "KNEE", 20, 40, 1),
    ("MR", "T2 SAG", "LSPINE", 12, 20, 1),
    ("CR", "CHEST PA", "CHEST", 1, 1, 3),
    ("CR", "CHEST LAT", "CHEST", 1, 1, 2),
    ("DX", "Chest AP portable", "CHEST", 1, 1, 2),
    ("DX", "KNEE 2 VIEWS", "KNEE", 1, 2, 1),
    ("US", "ABDOMEN", "ABDOMEN", 10, 60, 2),
    ("US", "Echo TTE", "HEART", 20, 120, 1),
    ("XA", "LCA RAO CAUD", "HEART", 30, 120, 2),
    ("XA", "RCA LAO", "HEART", 30, 120, 1),
    ("MG", "L CC", "BREAST", 1, 1, 1),
    ("MG", "R MLO", "BREAST", 1, 1, 1),
    ("PT", "PET WB AC", "WHOLEBODY", 200, 500, 1),
    ("NM", "MPI STRESS", "HEART", 1, 4, 1),
)
# Share of studies per modality (background).
_MODALITY_SHARE: Final = {
    "CT": 0.33,
    "MR": 0.17,
    "CR": 0.17,
    "DX": 0.08,
    "US": 0.1,
    "XA": 0.04,
    "MG": 0.06,
    "PT": 0.03,
    "NM": 0.02,
}
_MODALITIES: Final = tuple(_MODALITY_SHARE)
_BYTES_PER_INSTANCE: Final = {
    "CT": 525_000,
    "MR": 140_000,
    "CR": 9_000_000,
    "DX": 8_000_000,
    "US": 600_000,
    "XA": 1_100_000,
    "MG": 20_000_000,
    "PT": 65_000,
    "NM": 300_000,
}
# Series date variants: StudyDate = SeriesDate = day; SeriesDate the next day (imaging_date
# is still StudyDate); no StudyDate (imaging_date from SeriesDate); neither (imaging_date from
# AcquisitionDate); no date at all (imaging_date null).
_DATE_VARIANTS: Final = (0.93, 0.02, 0.03, 0.015, 0.005)
_PLANTED_DATE_VARIANTS: Final = (0.8, 0.05, 0.07, 0.06, 0.02)


@dataclass(frozen=True)
class World:
    """A generated EMR and the index series of the same patients.

    Attributes
    ----------
    omop : dict of str to pyarrow.Table
        The EMR tables, by name (:data:`OMOP_TABLES`), in the import contract's shape.
    series : pyarrow.Table
        The index ``series`` table: ``Index(root).empty("series")``'s schema, plus
        ``StudyDate`` and ``AccessionNumber`` when that schema lacks them.
    planted : pyarrow.Table
        One row per person of the planted MI cluster: ``person_id``, ``PatientID``,
        ``mi_date``, ``mi_source_value``, ``mi_concept_id``, ``earlier_mi`` (a first MI before
        the range), ``later_mi``, ``procedure_days`` (days from ``mi_date`` to the planted
        procedure, null if none), ``procedure_concept_id``, ``has_imaging``.
    seed : int
        The seed it was generated from.
    parameters : dict
        The sizes and fractions it was generated with (defaults resolved).
    """

    omop: dict[str, pa.Table]
    series: pa.Table
    planted: pa.Table
    seed: int
    parameters: dict[str, object] = field(default_factory=dict)


def _days(day: dt.date) -> int:
    return (day - _EPOCH).days


def _exact_choice(rng: np.random.Generator, n: int, weights: Sequence[float]) -> NDArray[np.int64]:
    """``n`` category indices in shuffled order, with each category's count its share of ``n``
    rounded down, at least one of every category with a positive weight when ``n`` allows."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    if n < int((w > 0).sum()):
        return rng.choice(len(w), size=n, p=w).astype(np.int64)
    counts = np.floor(w * n).astype(np.int64)
    counts[(w > 0) & (counts == 0)] = 1
    counts[int(np.argmax(counts))] += n - int(counts.sum())
    out = np.repeat(np.arange(len(w), dtype=np.int64), counts)
    rng.shuffle(out)
    return out


def _pick(kind: NDArray[np.int64], choices: Sequence[int | NDArray[np.int64]]) -> NDArray[np.int64]:
    """``choices[kind[i]]`` for each row ``i``: a scalar choice stands for every row, an array
    choice gives row ``i`` its ``i``-th value (numpy's ``choose``, typed)."""
    stacked = np.stack([np.broadcast_to(np.asarray(c, np.int64), kind.shape) for c in choices])
    picked: NDArray[np.int64] = stacked[kind, np.arange(len(kind))]
    return picked


def _choice(rng: np.random.Generator, n: int, weights: Sequence[float]) -> NDArray[np.int64]:
    w = np.asarray(weights, dtype=np.float64)
    return rng.choice(len(w), size=n, p=w / w.sum()).astype(np.int64)


def _strings(values: Sequence[str | None], index: NDArray[np.int64]) -> pa.Array:
    """``values[index]`` as a string array, without a Python loop over ``index``."""
    return pc.take(pa.array(list(values), _S), pa.array(index))


def _numbered(prefix: str, numbers: NDArray[np.int64], width: int = 0) -> pa.Array:
    """``prefix`` followed by each number (left-padded with zeros to ``width``)."""
    text = pc.cast(pa.array(numbers), _S)
    if width:
        text = pc.utf8_lpad(text, width=width, padding="0")
    return pc.binary_join_element_wise(prefix, text, "")


def _date_array(days: NDArray[np.int64], mask: NDArray[np.bool_] | None = None) -> pa.Array:
    return pa.array(days.astype(np.int32), _D, mask=mask)


def _timestamp_array(
    days: NDArray[np.int64], hours: NDArray[np.int64], mask: NDArray[np.bool_] | None = None
) -> pa.Array:
    return pa.array(days * _US_PER_DAY + hours * _US_PER_HOUR, _T, mask=mask)


def _int_array(values: NDArray[np.int64], mask: NDArray[np.bool_] | None = None) -> pa.Array:
    return pa.array(values.astype(np.int64), _I, mask=mask)


def _build(name: str, n: int, columns: Mapping[str, pa.Array]) -> pa.Table:
    """Table ``name`` with ``columns``, every other column of its schema null."""
    schema = OMOP_SCHEMAS[name]
    arrays = [
        columns[f.name].cast(f.type) if f.name in columns else pa.nulls(n, f.type) for f in schema
    ]
    unknown = set(columns) - set(schema.names)
    if unknown:
        raise ValueError(f"no column(s) {sorted(unknown)} in OMOP table {name}")
    return pa.Table.from_arrays(arrays, schema=schema)


def _order(dates: NDArray[np.int64], persons: NDArray[np.int64]) -> NDArray[np.int64]:
    """Row order by date, then person (numpy's lexsort sorts by the last key first)."""
    return np.lexsort((persons, dates)).astype(np.int64)


@dataclass
class _Events:
    """Rows of one event table as numpy arrays (codes as indices), before sorting."""

    person: list[NDArray[np.int64]] = field(default_factory=list)
    day: list[NDArray[np.int64]] = field(default_factory=list)
    code: list[NDArray[np.int64]] = field(default_factory=list)
    visit: list[NDArray[np.int64]] = field(default_factory=list)

    def add(
        self,
        person: NDArray[np.int64],
        day: NDArray[np.int64],
        code: NDArray[np.int64],
        visit: NDArray[np.int64] | None = None,
    ) -> None:
        self.person.append(person.astype(np.int64))
        self.day.append(day.astype(np.int64))
        self.code.append(code.astype(np.int64))
        self.visit.append(
            np.zeros(len(person), np.int64) if visit is None else visit.astype(np.int64)
        )

    def arrays(
        self,
    ) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
        """(person_id, day, code index, visit id or 0), sorted by day then person."""
        person = np.concatenate(self.person)
        day = np.concatenate(self.day)
        order = _order(day, person)
        return (
            person[order],
            day[order],
            np.concatenate(self.code)[order],
            np.concatenate(self.visit)[order],
        )


def generate_world(
    persons: int,
    *,
    seed: int,
    series_per_person: float = 10,
    conditions: int | None = None,
    procedures: int | None = None,
    visits: int | None = None,
    drugs: int | None = None,
    measurements: int | None = None,
    observations: int | None = None,
    start: dt.date = dt.date(2015, 1, 1),
    end: dt.date = dt.date(2025, 12, 31),
    linked_fraction: float = 0.95,
    imaging_fraction: float = 0.9,
    mi_cluster: int | None = None,
    attributes: Sequence[Attribute] = DEFAULT_ATTRIBUTES,
) -> World:
    """Generate an OMOP EMR and index series for ``persons`` patients.

    Every patient has a PatientID (``PAT`` and 8 digits). A share ``linked_fraction`` of them
    is an EMR person (``person_id`` = patient number + 1, ``person_source_value`` =
    PatientID); the others exist only in the index. A share ``imaging_fraction`` of the EMR
    persons has series; the others exist only in the EMR.

    Parameters
    ----------
    persons : int
        Patients.
    seed : int
        Everything is a function of the seed and the sizes.
    series_per_person : float
        Series per patient on average (the total is ``round(persons * series_per_person)``).
    conditions, procedures : int, optional
        Rows of ``condition_occurrence`` and ``procedure_occurrence``, planted rows included
        (default ``2 * persons``; more if the planted rows alone exceed it).
    visits, drugs, measurements, observations : int, optional
        Rows of the other event tables (default ``conditions // 2``, ``// 4``, ``// 4``,
        ``// 20``).
    start, end : datetime.date
        Background events and studies fall between these days, inclusive. The planted cluster
        is in October and November 2023 whatever they are.
    linked_fraction, imaging_fraction : float
        See above.
    mi_cluster : int, optional
        Persons in the planted MI cluster (default ``max(60, persons // 200)``).
    attributes : sequence of Attribute
        Index attributes (they define the ``series`` schema).

    Returns
    -------
    World
        The tables.

    Raises
    ------
    ValueError
        If a size or fraction is out of range.
    """
    if persons < 1:
        raise ValueError(f"persons must be at least 1, not {persons}")
    if not (0 < linked_fraction <= 1 and 0 < imaging_fraction <= 1):
        raise ValueError("linked_fraction and imaging_fraction must be in (0, 1]")
    if end < start:
        raise ValueError(f"end ({end}) is before start ({start})")
    if series_per_person < 0:
        raise ValueError(f"series_per_person must not be negative, not {series_per_person}")
    conditions = 2 * persons if conditions is None else conditions
    procedures = 2 * persons if procedures is None else procedures
    visits = conditions // 2 if visits is None else visits
    drugs = conditions // 4 if drugs is None else drugs
    measurements = conditions // 4 if measurements is None else measurements
    observations = conditions // 20 if observations is None else observations
    sizes = {"conditions": conditions, "procedures": procedures, "visits": visits}
    sizes.update(drugs=drugs, measurements=measurements, observations=observations)
    negative = [name for name, size in sizes.items() if size < 0]
    if negative:
        raise ValueError(f"{', '.join(negative)} must not be negative")
    rng = np.random.default_rng([seed, 5])
    first_day, last_day = _days(start), _days(end)

    # -- patients: who is in the EMR, who has imaging ---------------------------------------
    number = np.arange(persons, dtype=np.int64)
    linked = rng.random(persons) < linked_fraction
    linked[0] = True  # at least one EMR person
    has_imaging = (rng.random(persons) < imaging_fraction) | ~linked
    has_imaging[0] = True  # at least one patient with series
    patient_ids = _numbered("PAT", number, 8)
    male = rng.random(persons) < 0.5
    birth_year = rng.integers(1930, 2006, persons)
    birth_month = rng.integers(1, 13, persons)
    birth_dom = rng.integers(1, 29, persons)
    birth_day = (
        (
            ((birth_year - 1970) * 12 + birth_month - 1)
            .astype("datetime64[M]")
            .astype("datetime64[D]")
        ).astype(np.int64)
        + birth_dom
        - 1
    )
    emr = np.flatnonzero(linked)
    n_cluster = min(len(emr), max(60, persons // 200) if mi_cluster is None else mi_cluster)

    # -- the planted cluster ----------------------------------------------------------------
    cluster = np.sort(rng.choice(emr, size=n_cluster, replace=False)).astype(np.int64)
    cluster_pid = cluster + 1
    entry_kind = _exact_choice(rng, n_cluster, (0.1, 0.1, 0.74, 0.03, 0.03))
    inside = rng.integers(1, _CLUSTER_DAYS - 1, n_cluster)
    entry_offset = _pick(entry_kind, (0, _CLUSTER_DAYS - 1, inside, -1, _CLUSTER_DAYS))
    mi_day = _days(_CLUSTER_FROM) + entry_offset
    coding = _exact_choice(rng, n_cluster, (0.8, 0.08, 0.04, 0.08))
    coded = _pick(
        coding,
        (
            np.asarray(_MI_CODES)[rng.integers(0, len(_MI_CODES), n_cluster)],
            np.full(n_cluster, _MI_SOURCE_ONLY[0]),
            np.full(n_cluster, _MI_SOURCE_ONLY[-1]),
            np.full(n_cluster, _MI_CONCEPT_ONLY[0]),
        ),
    )
    earlier = _exact_choice(rng, n_cluster, (0.9, 0.1)) == 1
    later = _exact_choice(rng, n_cluster, (0.9, 0.1)) == 1
    # Procedure after the MI: days 7 and 14 (edges in), 6 and 15 (edges out), 8..13, none, far
    # (outside the window), or a non-coronary procedure inside the window.
    proc_kind = _exact_choice(rng, n_cluster, (0.12, 0.12, 0.06, 0.06, 0.34, 0.15, 0.05, 0.1))
    far = np.asarray((-3, 2, 30))[rng.integers(0, 3, n_cluster)]
    proc_offset = _pick(
        proc_kind,
        (7, 14, 6, 15, rng.integers(8, 14, n_cluster), 0, far, rng.integers(7, 15, n_cluster)),
    )
    has_proc = proc_kind != 5
    proc_code = np.where(
        proc_kind == 7,
        np.asarray(_NON_CORONARY_CARDIAC)[rng.integers(0, len(_NON_CORONARY_CARDIAC), n_cluster)],
        np.asarray(_CORONARY_CODES)[rng.integers(0, len(_CORONARY_CODES), n_cluster)],
    )
    # A diagnostic angiography on the day of the MI or the next (outside the 7-14 window).
    early_angio = rng.random(n_cluster) < 0.2

    cond = _Events()
    proc = _Events()
    vis = _Events()
    # Planted visits: an inpatient stay (or an ER visit) starting on the MI day.
    visit_kind = np.where(rng.random(n_cluster) < 0.85, 0, 2)  # 0 IP, 2 ER (index in _VISITS)
    planted_visit = np.arange(1, n_cluster + 1, dtype=np.int64)  # renumbered after sorting
    vis.add(cluster_pid, mi_day, visit_kind, planted_visit)
    cond.add(cluster_pid, mi_day, coded, planted_visit)
    m = int(earlier.sum())
    cond.add(
        cluster_pid[earlier],
        rng.integers(_days(dt.date(2016, 1, 1)), _days(dt.date(2023, 9, 20)), m),
        np.asarray(_MI_CODES)[rng.integers(0, len(_MI_CODES), m)],
    )
    m = int(later.sum())
    cond.add(
        cluster_pid[later],
        rng.integers(_days(dt.date(2024, 1, 1)), _days(dt.date(2025, 6, 30)), m),
        np.asarray(_MI_CODES)[rng.integers(0, len(_MI_CODES), m)],
    )
    proc.add(cluster_pid[has_proc], (mi_day + proc_offset)[has_proc], proc_code[has_proc])
    m = int(early_angio.sum())
    proc.add(
        cluster_pid[early_angio],
        mi_day[early_angio] + rng.integers(0, 2, m),
        np.full(m, _ANGIOGRAPHY_CODE),
    )

    # -- background events -----------------------------------------------------------------
    def background(events: _Events, total: int, codes: Sequence[float]) -> None:
        n = max(total - sum(len(p) for p in events.person), 0)
        events.add(
            emr[rng.integers(0, len(emr), n)] + 1,
            rng.integers(first_day, last_day + 1, n),
            _choice(rng, n, codes),
        )

    background(cond, conditions, [c.weight for c in CONDITION_CODES])
    background(proc, procedures, [c.weight for c in PROCEDURE_CODES])
    background(vis, visits, (0.15, 0.7, 0.15))
    omop = {
        "person": _person_table(
            emr, patient_ids, male, birth_year, birth_month, birth_dom, birth_day, rng
        ),
        "concept": concept_table(),
        "concept_ancestor": concept_ancestor_table(),
    }
    visit_table, visit_ids = _visit_table(vis, n_cluster, rng)
    omop["visit_occurrence"] = visit_table
    omop["condition_occurrence"] = _condition_table(cond, visit_ids, rng)
    omop["procedure_occurrence"] = _procedure_table(proc, rng)
    drug = _Events()
    drug.add(cluster_pid, mi_day, np.zeros(n_cluster, np.int64))  # aspirin on the MI day
    background(drug, drugs, [d[2] for d in _DRUGS])
    omop["drug_exposure"] = _drug_table(drug, rng)
    meas = _Events()
    background(meas, measurements, [x[8] for x in _MEASUREMENTS])
    omop["measurement"] = _measurement_table(meas, rng)
    obs = _Events()
    background(obs, observations, [x[2] for x in _OBSERVATIONS])
    omop["observation"] = _observation_table(obs)

    # -- index series ----------------------------------------------------------------------
    planted_imaging = has_imaging[cluster]
    series = _series_table(
        rng,
        total=round(persons * series_per_person),
        imaging=np.flatnonzero(has_imaging).astype(np.int64),
        patient_ids=patient_ids,
        male=male,
        birth_day=birth_day,
        first_day=first_day,
        last_day=last_day,
        planted_owner=cluster[planted_imaging],
        planted_day=mi_day[planted_imaging],
        seed=seed,
        attributes=attributes,
    )
    planted = pa.table(
        {
            "person_id": pa.array(cluster_pid, _I),
            "PatientID": pc.take(patient_ids, pa.array(cluster)),
            "mi_date": _date_array(mi_day),
            "mi_source_value": _strings([c.source_value for c in CONDITION_CODES], coded),
            "mi_concept_id": pa.array(
                np.asarray([c.concept_id for c in CONDITION_CODES])[coded], _I
            ),
            "earlier_mi": pa.array(earlier),
            "later_mi": pa.array(later),
            "procedure_days": _int_array(proc_offset, ~has_proc),
            "procedure_concept_id": _int_array(
                np.asarray([c.concept_id for c in PROCEDURE_CODES])[proc_code], ~has_proc
            ),
            "has_imaging": pa.array(planted_imaging),
        }
    )
    parameters: dict[str, object] = {
        "persons": persons,
        "series_per_person": series_per_person,
        "conditions": conditions,
        "procedures": procedures,
        "visits": visits,
        "drugs": drugs,
        "measurements": measurements,
        "observations": observations,
        "start": start.isoformat(),
        "end": end.isoformat(),
        "linked_fraction": linked_fraction,
        "imaging_fraction": imaging_fraction,
        "mi_cluster": n_cluster,
    }
    return World(omop=omop, series=series, planted=planted, seed=seed, parameters=parameters)


def _person_table(
    emr: NDArray[np.int64],
    patient_ids: pa.Array,
    male: NDArray[np.bool_],
    birth_year: NDArray[np.int64],
    birth_month: NDArray[np.int64],
    birth_dom: NDArray[np.int64],
    birth_day: NDArray[np.int64],
    rng: np.random.Generator,
) -> pa.Table:
    n = len(emr)
    race = _choice(rng, n, [r[2] for r in _RACES])
    ethnicity = _choice(rng, n, [e[2] for e in _ETHNICITIES])
    return _build(
        "person",
        n,
        {
            "person_id": _int_array(emr + 1),
            "gender_concept_id": _int_array(np.where(male[emr], GENDER_MALE, GENDER_FEMALE)),
            "year_of_birth": _int_array(birth_year[emr]),
            "month_of_birth": _int_array(birth_month[emr]),
            "day_of_birth": _int_array(birth_dom[emr]),
            "birth_datetime": _timestamp_array(birth_day[emr], np.zeros(n, np.int64)),
            "race_concept_id": _int_array(np.asarray([r[0] for r in _RACES])[race]),
            "ethnicity_concept_id": _int_array(np.asarray([e[0] for e in _ETHNICITIES])[ethnicity]),
            "person_source_value": pc.take(patient_ids, pa.array(emr)),
            "gender_source_value": _strings(["F", "M"], male[emr].astype(np.int64)),
            "gender_source_concept_id": _int_array(np.zeros(n, np.int64)),
            "race_source_value": _strings([r[1] for r in _RACES], race),
            "race_source_concept_id": _int_array(np.zeros(n, np.int64)),
            "ethnicity_source_value": _strings([e[1] for e in _ETHNICITIES], ethnicity),
            "ethnicity_source_concept_id": _int_array(np.zeros(n, np.int64)),
        },
    )


_VISITS: Final = ((VISIT_INPATIENT, "IP"), (VISIT_OUTPATIENT, "OP"), (VISIT_EMERGENCY, "ER"))


def _visit_table(
    events: _Events, planted: int, rng: np.random.Generator
) -> tuple[pa.Table, NDArray[np.int64]]:
    """The visits, and for planted visit ``k`` (1-based) its ``visit_occurrence_id`` at
    index ``k``."""
    person, day, kind, planted_key = events.arrays()
    n = len(person)
    ids = np.arange(1, n + 1, dtype=np.int64)
    visit_ids = np.zeros(planted + 1, np.int64)
    is_planted = planted_key > 0
    visit_ids[planted_key[is_planted]] = ids[is_planted]
    length = np.where(
        kind == 0, rng.integers(1, 15, n), np.where(kind == 2, rng.integers(0, 2, n), 0)
    )
    start_hour = rng.integers(7, 20, n)
    end_hour = np.minimum(start_hour + rng.integers(1, 5, n), 23)
    table = _build(
        "visit_occurrence",
        n,
        {
            "visit_occurrence_id": _int_array(ids),
            "person_id": _int_array(person),
            "visit_concept_id": _int_array(np.asarray([v[0] for v in _VISITS])[kind]),
            "visit_start_date": _date_array(day),
            "visit_start_datetime": _timestamp_array(day, start_hour),
            "visit_end_date": _date_array(day + length),
            "visit_end_datetime": _timestamp_array(day + length, end_hour),
            "visit_type_concept_id": _int_array(np.full(n, TYPE_EHR)),
            "visit_source_value": _strings([v[1] for v in _VISITS], kind),
            "visit_source_concept_id": _int_array(np.zeros(n, np.int64)),
        },
    )
    return table, visit_ids


def _condition_table(
    events: _Events, visit_ids: NDArray[np.int64], rng: np.random.Generator
) -> pa.Table:
    person, day, code, visit = events.arrays()
    n = len(person)
    ended = rng.random(n) < 0.3
    end_day = day + rng.integers(0, 61, n)
    primary = rng.random(n) < 0.6
    return _build(
        "condition_occurrence",
        n,
        {
            "condition_occurrence_id": _int_array(np.arange(1, n + 1, dtype=np.int64)),
            "person_id": _int_array(person),
            "condition_concept_id": _int_array(
                np.asarray([c.concept_id for c in CONDITION_CODES])[code]
            ),
            "condition_start_date": _date_array(day),
            "condition_start_datetime": _timestamp_array(day, rng.integers(0, 24, n)),
            "condition_end_date": _date_array(end_day, ~ended),
            "condition_end_datetime": _timestamp_array(end_day, np.zeros(n, np.int64), ~ended),
            "condition_type_concept_id": _int_array(np.full(n, TYPE_EHR)),
            "condition_status_concept_id": _int_array(
                np.where(primary, STATUS_PRIMARY_DIAGNOSIS, STATUS_SECONDARY_DIAGNOSIS)
            ),
            "visit_occurrence_id": _int_array(visit_ids[visit], visit == 0),
            "condition_source_value": _strings([c.source_value for c in CONDITION_CODES], code),
            "condition_source_concept_id": _int_array(
                np.asarray([c.source_concept_id for c in CONDITION_CODES])[code]
            ),
            "condition_status_source_value": _strings(
                ["secondary", "primary"], primary.astype(np.int64)
            ),
        },
    )


def _procedure_table(events: _Events, rng: np.random.Generator) -> pa.Table:
    person, day, code, _ = events.arrays()
    n = len(person)
    return _build(
        "procedure_occurrence",
        n,
        {
            "procedure_occurrence_id": _int_array(np.arange(1, n + 1, dtype=np.int64)),
            "person_id": _int_array(person),
            "procedure_concept_id": _int_array(
                np.asarray([c.concept_id for c in PROCEDURE_CODES])[code]
            ),
            "procedure_date": _date_array(day),
            "procedure_datetime": _timestamp_array(day, rng.integers(6, 22, n)),
            "procedure_type_concept_id": _int_array(np.full(n, TYPE_EHR)),
            "quantity": pa.array(np.ones(n), _F),
            "procedure_source_value": _strings([c.source_value for c in PROCEDURE_CODES], code),
            "procedure_source_concept_id": _int_array(np.zeros(n, np.int64)),
        },
    )


def _drug_table(events: _Events, rng: np.random.Generator) -> pa.Table:
    person, day, code, _ = events.arrays()
    n = len(person)
    supply = np.asarray((1, 7, 30, 90))[rng.integers(0, 4, n)]
    end_day = day + supply - 1
    return _build(
        "drug_exposure",
        n,
        {
            "drug_exposure_id": _int_array(np.arange(1, n + 1, dtype=np.int64)),
            "person_id": _int_array(person),
            "drug_concept_id": _int_array(np.asarray([d[0] for d in _DRUGS])[code]),
            "drug_exposure_start_date": _date_array(day),
            "drug_exposure_start_datetime": _timestamp_array(day, np.full(n, 9)),
            "drug_exposure_end_date": _date_array(end_day),
            "drug_exposure_end_datetime": _timestamp_array(end_day, np.full(n, 9)),
            "drug_type_concept_id": _int_array(np.full(n, TYPE_EHR)),
            "refills": _int_array(rng.integers(0, 4, n)),
            "quantity": pa.array(supply.astype(np.float64), _F),
            "days_supply": _int_array(supply),
            "route_concept_id": _int_array(np.zeros(n, np.int64)),
            "drug_source_value": _strings([d[1] for d in _DRUGS], code),
            "drug_source_concept_id": _int_array(np.zeros(n, np.int64)),
            "route_source_value": _strings(["oral"], np.zeros(n, np.int64)),
        },
    )


def _measurement_table(events: _Events, rng: np.random.Generator) -> pa.Table:
    person, day, code, _ = events.arrays()
    n = len(person)
    spec = np.asarray([x[4:8] for x in _MEASUREMENTS], dtype=np.float64)
    value = np.round(spec[code, 0] + spec[code, 1] * rng.standard_normal(n), 2)
    hour = rng.integers(6, 22, n)
    return _build(
        "measurement",
        n,
        {
            "measurement_id": _int_array(np.arange(1, n + 1, dtype=np.int64)),
            "person_id": _int_array(person),
            "measurement_concept_id": _int_array(np.asarray([x[0] for x in _MEASUREMENTS])[code]),
            "measurement_date": _date_array(day),
            "measurement_datetime": _timestamp_array(day, hour),
            "measurement_time": pc.binary_join_element_wise(
                pc.utf8_lpad(pc.cast(pa.array(hour), _S), width=2, padding="0"), ":00", ""
            ),
            "measurement_type_concept_id": _int_array(np.full(n, TYPE_EHR)),
            "value_as_number": pa.array(value, _F),
            "unit_concept_id": _int_array(np.asarray([x[2] for x in _MEASUREMENTS])[code]),
            "range_low": pa.array(spec[code, 2], _F),
            "range_high": pa.array(spec[code, 3], _F),
            "measurement_source_value": _strings([x[1] for x in _MEASUREMENTS], code),
            "measurement_source_concept_id": _int_array(np.zeros(n, np.int64)),
            "unit_source_value": _strings([x[3] for x in _MEASUREMENTS], code),
            "value_source_value": pc.cast(pa.array(value), _S),
        },
    )


def _observation_table(events: _Events) -> pa.Table:
    person, day, code, _ = events.arrays()
    n = len(person)
    return _build(
        "observation",
        n,
        {
            "observation_id": _int_array(np.arange(1, n + 1, dtype=np.int64)),
            "person_id": _int_array(person),
            "observation_concept_id": _int_array(np.asarray([x[0] for x in _OBSERVATIONS])[code]),
            "observation_date": _date_array(day),
            "observation_datetime": _timestamp_array(day, np.zeros(n, np.int64)),
            "observation_type_concept_id": _int_array(np.full(n, TYPE_EHR)),
            "observation_source_value": _strings([x[1] for x in _OBSERVATIONS], code),
            "observation_source_concept_id": _int_array(np.zeros(n, np.int64)),
        },
    )


def _series_schema(attributes: Sequence[Attribute]) -> pa.Schema:
    """The index's ``series`` schema, with the study-level columns the cohort engine reads."""
    schema = Index(Path("."), attributes).empty("series").schema
    for name, kind in (("imaging_date", _D), ("StudyDate", _D), ("AccessionNumber", _S)):
        if name not in schema.names:
            schema = schema.append(pa.field(name, kind))
    return schema


def _pick_kinds(
    rng: np.random.Generator, modality: NDArray[np.int64], weights: NDArray[np.float64]
) -> NDArray[np.int64]:
    """A row of :data:`_SERIES_KINDS` for each series, among those of its modality."""
    kind_modality = np.asarray([_MODALITIES.index(k[0]) for k in _SERIES_KINDS])
    out = np.zeros(len(modality), np.int64)
    for m in range(len(_MODALITIES)):  # a loop over modalities, not rows
        rows = np.flatnonzero((kind_modality == m) & (weights > 0))
        where = np.flatnonzero(modality == m)
        if len(where) == 0 or len(rows) == 0:
            continue
        w = weights[rows] / weights[rows].sum()
        out[where] = rows[rng.choice(len(rows), size=len(where), p=w)]
    return out


def _series_table(
    rng: np.random.Generator,
    *,
    total: int,
    imaging: NDArray[np.int64],
    patient_ids: pa.Array,
    male: NDArray[np.bool_],
    birth_day: NDArray[np.int64],
    first_day: int,
    last_day: int,
    planted_owner: NDArray[np.int64],
    planted_day: NDArray[np.int64],
    seed: int,
    attributes: Sequence[Attribute],
) -> pa.Table:
    kind_weight = np.asarray([k[5] for k in _SERIES_KINDS], dtype=np.float64)
    # Planted: 1 to 5 series per cluster person around the MI day.
    per = 1 + _exact_choice(rng, len(planted_owner), (0.3, 0.3, 0.2, 0.1, 0.1))
    p_owner = np.repeat(planted_owner, per)
    p_mi = np.repeat(planted_day, per)
    np_ = len(p_owner)
    offset_kind = _exact_choice(rng, np_, (0.12, 0.12, 0.06, 0.06, 0.44, 0.2))
    far = np.where(rng.random(np_) < 0.5, rng.integers(-200, -1, np_), rng.integers(32, 400, np_))
    p_day = p_mi + _pick(offset_kind, (0, 30, -1, 31, rng.integers(1, 30, np_), far))
    p_modality = np.asarray([_MODALITIES.index(m) for m in ("CT", "MR", "XA")])[
        _exact_choice(rng, np_, (0.8, 0.1, 0.1))
    ]
    chest_or_heart = np.asarray(
        [
            w if k[2] in ("CHEST", "HEART") else 0.0
            for k, w in zip(_SERIES_KINDS, kind_weight, strict=True)
        ]
    )
    p_kind = _pick_kinds(rng, p_modality, chest_or_heart)
    p_variant = _exact_choice(rng, np_, _PLANTED_DATE_VARIANTS)

    # Background: the rest, spread over the patients with imaging, grouped into studies.
    nb = max(total - np_, 0)
    counts = rng.multinomial(nb, np.full(len(imaging), 1 / len(imaging)))
    b_owner = np.repeat(imaging, counts)
    first = np.ones(nb, np.bool_)
    first[1:] = b_owner[1:] != b_owner[:-1]
    new_study = first | (rng.random(nb) < 0.4)
    b_study = np.cumsum(new_study) - 1
    n_studies = int(b_study[-1]) + 1 if nb else 0
    study_start = np.flatnonzero(new_study)
    b_number = np.arange(nb) - study_start[b_study] + 1
    study_modality = _choice(rng, n_studies, list(_MODALITY_SHARE.values()))
    b_modality = study_modality[b_study]
    b_kind = _pick_kinds(rng, b_modality, kind_weight)
    b_day = rng.integers(first_day, last_day + 1, n_studies)[b_study]
    b_variant = _choice(rng, nb, _DATE_VARIANTS)

    owner = np.concatenate([b_owner, p_owner])
    study = np.concatenate([b_study, n_studies + np.arange(np_)])
    number = np.concatenate([b_number, np.ones(np_, np.int64)])
    modality = np.concatenate([b_modality, p_modality])
    kind = np.concatenate([b_kind, p_kind])
    day = np.concatenate([b_day, p_day])
    variant = np.concatenate([b_variant, p_variant])
    n = len(owner)

    lo = np.asarray([k[3] for k in _SERIES_KINDS])[kind]
    hi = np.asarray([k[4] for k in _SERIES_KINDS])[kind]
    instances = lo + (rng.random(n) * (hi - lo + 1)).astype(np.int64)
    body_part: list[str | None] = [k[2] for k in _SERIES_KINDS]
    no_body_part = rng.random(n) < 0.04
    study_date_null = variant >= 2
    series_date_null = variant >= 3
    series_day = day + (variant == 1)
    uid = f"{_UID_ROOT}{seed}."
    bytes_per = np.asarray([_BYTES_PER_INSTANCE[m] for m in _MODALITIES])[modality]
    columns: dict[str, pa.Array] = {
        "SeriesInstanceUID": _numbered(f"{uid}2.", np.arange(1, n + 1, dtype=np.int64)),
        "StudyInstanceUID": _numbered(f"{uid}1.", study + 1),
        "PatientID": pc.take(patient_ids, pa.array(owner)),
        "PatientBirthDate": _date_array(birth_day[owner]),
        "PatientSex": _strings(["F", "M"], male[owner].astype(np.int64)),
        "SeriesNumber": _int_array(number),
        "SeriesDate": _date_array(series_day, series_date_null),
        "Modality": _strings(list(_MODALITIES), modality),
        "SeriesDescription": _strings([k[1] for k in _SERIES_KINDS], kind),
        "BodyPartExamined": pc.if_else(
            pa.array(no_body_part), pa.nulls(n, _S), _strings(body_part, kind)
        ),
        "imaging_date": _date_array(day, variant == 4),
        "instance_count": _int_array(instances),
        "frame_count": _int_array(instances),
        "size_bytes": _int_array(instances * bytes_per),
        "indexed_at": pa.array(np.full(n, int(_INDEXED_AT.timestamp() * 1e6)), _T).cast(
            pa.timestamp("us", tz="UTC")
        ),
        "StudyDate": _date_array(day, study_date_null),
        "AccessionNumber": _numbered("A", study + 1, 10),
    }
    schema = _series_schema(attributes)
    # Columns nothing fills share one all-null array per type: at ten million rows the
    # offsets of a dozen separate null string columns would take a gigabyte.
    nulls: dict[pa.DataType, pa.Array] = {}
    arrays = [
        columns[f.name].cast(f.type)
        if f.name in columns
        else nulls.setdefault(f.type, pa.nulls(n, f.type))
        for f in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


# -- writing ----------------------------------------------------------------------------------


def _sorted(name: str, table: pa.Table) -> pa.Table:
    """``table`` in the contract's order (date then person_id, or the key)."""
    keys = [OMOP_DATE_COLUMNS[name], "person_id"] if name in OMOP_DATE_COLUMNS else OMOP_KEYS[name]
    if table.num_rows < 2:
        return table
    indices = pc.sort_indices(table, sort_keys=[(k, "ascending") for k in keys])
    if pc.all(pc.equal(indices, pa.array(np.arange(table.num_rows)))).as_py():
        return table
    return table.take(indices)


def write_omop_tables(
    tables: Mapping[str, pa.Table],
    root: str | Path,
    *,
    row_group_rows: int = ROW_GROUP_ROWS,
) -> dict[str, Path]:
    """Write EMR tables as Delta tables at ``ROOT/emr/<name>``, in the contract's order.

    Row groups of ``row_group_rows`` rows, as ``imgindex emr import`` writes them.

    Parameters
    ----------
    tables : mapping of str to pyarrow.Table
        Tables by OMOP name (e.g. ``World.omop``).
    root : str or Path
        The catalog root.
    row_group_rows : int
        Rows per Parquet row group.

    Returns
    -------
    dict of str to Path
        Where each table went.

    Raises
    ------
    ValueError
        If a name is not an OMOP table :data:`OMOP_SCHEMAS` knows.
    """
    out: dict[str, Path] = {}
    for name, table in tables.items():
        if name not in OMOP_SCHEMAS:
            raise ValueError(f"{name!r} is not an OMOP table; expected one of {OMOP_TABLES}")
        path = Path(root) / "emr" / name
        Table(path, OMOP_KEYS[name]).overwrite(_sorted(name, table), row_group_rows=row_group_rows)
        out[name] = path
    return out


def write_series_index(
    series: pa.Table,
    root: str | Path,
    *,
    order: SeriesOrder = "date",
    seed: int = 0,
    row_group_rows: int = ROW_GROUP_ROWS,
) -> Path:
    """Write ``series`` as the index's ``series`` table (``ROOT/tables/series``).

    Parameters
    ----------
    series : pyarrow.Table
        Rows (``World.series``); ``imgindex.index.Index(root).series`` reads them back.
    root : str or Path
        The catalog root.
    order : {"date", "random", "as_is"}
        Row order: by ``imaging_date`` (nulls last; an index filled as studies arrive is close
        to this), shuffled with ``seed``, or as given.
    seed : int
        Seed of the ``"random"`` order.
    row_group_rows : int
        Rows per Parquet row group.

    Returns
    -------
    Path
        The table's folder.
    """
    if order == "date":
        days = series.column("imaging_date").cast(pa.int32()).fill_null(np.iinfo(np.int32).max)
        indices = np.argsort(days.to_numpy(), kind="stable")
    elif order == "random":
        indices = np.random.default_rng(seed).permutation(series.num_rows)
    elif order == "as_is":
        indices = np.arange(series.num_rows)
    else:
        raise ValueError(f"order must be 'date', 'random' or 'as_is', not {order!r}")

    def batches() -> Iterator[pa.RecordBatch]:
        # Reordered a slice at a time: a reordered copy of ten million rows would double the
        # memory the table takes.
        for first in range(0, series.num_rows, _WRITE_SLICE_ROWS):
            part = series.take(pa.array(indices[first : first + _WRITE_SLICE_ROWS]))
            yield from part.combine_chunks().to_batches()

    path = Path(root) / "tables" / "series"
    Table(path, ["SeriesInstanceUID"]).overwrite(
        pa.RecordBatchReader.from_batches(series.schema, batches()), row_group_rows=row_group_rows
    )
    return path


def write_world(world: World, root: str | Path, *, order: SeriesOrder = "date") -> None:
    """Write a world's EMR tables and series under ``root``."""
    write_omop_tables(world.omop, root)
    write_series_index(world.series, root, order=order, seed=world.seed)


def write_omop_csv(tables: Mapping[str, pa.Table], folder: str | Path) -> dict[str, Path]:
    """Write EMR tables as CSV files with OHDSI's names (``CONDITION_OCCURRENCE.csv``...).

    Column names stay lowercase, dates are ``YYYY-MM-DD``, datetimes ``YYYY-MM-DD HH:MM:SS``,
    nulls are empty fields and strings are quoted, as OHDSI exports are.

    Returns
    -------
    dict of str to Path
        Where each table went.
    """
    from pyarrow import csv

    out_dir = Path(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    options = csv.WriteOptions(quoting_style="needed")
    for name, table in tables.items():
        path = out_dir / _CSV_NAMES.get(name, f"{name.upper()}.csv")
        for i, f in enumerate(table.schema):
            if pa.types.is_timestamp(f.type):
                seconds = table.column(i).cast(pa.timestamp("s"))
                text = pc.strftime(seconds, format="%Y-%m-%d %H:%M:%S")
                table = table.set_column(i, f.name, text)
        csv.write_csv(table, path, options)
        out[name] = path
    return out


# -- reference answers ------------------------------------------------------------------------


def _files(root: Path, *parts: str) -> list[str]:
    from deltalake import DeltaTable

    return list(DeltaTable(str(root.joinpath(*parts))).file_uris())


def _sql_list(files: Sequence[str]) -> str:
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


def _bounds(question: CohortQuestion) -> tuple[dt.date, dt.date, dt.date, dt.date]:
    """The widest procedure and imaging date ranges any entry event can reach."""
    day = dt.timedelta(days=1)
    return (
        question.entry_from + question.procedure_days[0] * day,
        question.entry_to + question.procedure_days[1] * day,
        question.entry_from + question.imaging_days[0] * day,
        question.entry_to + question.imaging_days[1] * day,
    )


def reference_duckdb(root: str | Path, question: CohortQuestion = MI_CAD_CT) -> pa.Table:
    """Answer ``question`` with hand-written DuckDB SQL over the tables' Parquet files.

    Reads the current files of ``ROOT/emr/{concept_ancestor, condition_occurrence,
    procedure_occurrence, person}`` and ``ROOT/tables/series``.

    Returns
    -------
    pyarrow.Table
        One row per series: ``person_id``, ``PatientID``, ``SeriesInstanceUID``,
        ``entry_date``, ``days_from_index``, sorted by person and series.
    """
    import duckdb

    root = Path(root)
    proc_from, proc_to, img_from, img_to = _bounds(question)
    prefixes = " OR ".join(
        f"upper(replace(condition_source_value, '.', '')) LIKE '{p.upper()}%'"
        for p in question.entry_source_prefixes
    )
    entry_ids = ", ".join(map(str, question.entry_concepts))
    proc_ids = ", ".join(map(str, question.procedure_concepts))
    query = f"""
    WITH
    entry_concepts AS (
        SELECT descendant_concept_id AS concept_id
        FROM read_parquet({_sql_list(_files(root, "emr", "concept_ancestor"))})
        WHERE ancestor_concept_id IN ({entry_ids})
        UNION SELECT unnest([{entry_ids}])
    ),
    procedure_concepts AS (
        SELECT descendant_concept_id AS concept_id
        FROM read_parquet({_sql_list(_files(root, "emr", "concept_ancestor"))})
        WHERE ancestor_concept_id IN ({proc_ids})
        UNION SELECT unnest([{proc_ids}])
    ),
    first_entry AS (
        SELECT person_id, min(condition_start_date) AS entry_date
        FROM read_parquet({_sql_list(_files(root, "emr", "condition_occurrence"))})
        WHERE condition_concept_id IN (SELECT concept_id FROM entry_concepts) OR {prefixes}
        GROUP BY person_id
        HAVING min(condition_start_date) BETWEEN DATE '{question.entry_from}'
            AND DATE '{question.entry_to}'
    ),
    kept AS (
        SELECT DISTINCT e.person_id, e.entry_date
        FROM first_entry e
        JOIN read_parquet({_sql_list(_files(root, "emr", "procedure_occurrence"))}) p
            ON p.person_id = e.person_id
        WHERE p.procedure_date BETWEEN DATE '{proc_from}' AND DATE '{proc_to}'
            AND p.procedure_concept_id IN (SELECT concept_id FROM procedure_concepts)
            AND p.procedure_date BETWEEN e.entry_date + {question.procedure_days[0]}
                AND e.entry_date + {question.procedure_days[1]}
    ),
    linked AS (
        SELECT k.person_id, k.entry_date, p.person_source_value AS PatientID
        FROM kept k
        JOIN read_parquet({_sql_list(_files(root, "emr", "person"))}) p
            ON p.person_id = k.person_id
    ),
    images AS (
        SELECT PatientID, SeriesInstanceUID, imaging_date
        FROM read_parquet({_sql_list(_files(root, "tables", "series"))})
        WHERE Modality = '{question.modality}'
            AND imaging_date BETWEEN DATE '{img_from}' AND DATE '{img_to}'
    )
    SELECT l.person_id, l.PatientID, i.SeriesInstanceUID, l.entry_date,
        CAST(i.imaging_date - l.entry_date AS BIGINT) AS days_from_index
    FROM linked l
    JOIN images i ON i.PatientID = l.PatientID
    WHERE i.imaging_date BETWEEN l.entry_date + {question.imaging_days[0]}
        AND l.entry_date + {question.imaging_days[1]}
    ORDER BY l.person_id, i.SeriesInstanceUID
    """
    con = duckdb.connect()
    try:
        result = con.sql(query).to_arrow_table()
    finally:
        con.close()
    return result.cast(ANSWER_SCHEMA)


def reference_polars(root: str | Path, question: CohortQuestion = MI_CAD_CT) -> pa.Table:
    """Answer ``question`` with a hand-written polars lazy query over the same Parquet files.

    The concept sets are expanded first (a few rows), every scan is filtered before it is
    joined, and the index is narrowed to the dates any entry event can reach.

    Returns
    -------
    pyarrow.Table
        As :func:`reference_duckdb`.
    """
    import polars as pl

    root = Path(root)
    proc_from, proc_to, img_from, img_to = _bounds(question)

    def scan(*parts: str) -> pl.LazyFrame:
        return pl.scan_parquet(_files(root, *parts))

    ancestors = scan("emr", "concept_ancestor")
    expanded = (
        ancestors.filter(
            pl.col("ancestor_concept_id").is_in(
                [*question.entry_concepts, *question.procedure_concepts]
            )
        )
        .select("ancestor_concept_id", "descendant_concept_id")
        .collect()
    )

    def concept_set(ids: Sequence[int]) -> list[int]:
        found = expanded.filter(pl.col("ancestor_concept_id").is_in(list(ids)))
        return sorted({*ids, *found["descendant_concept_id"].to_list()})

    entry_ids = concept_set(question.entry_concepts)
    proc_ids = concept_set(question.procedure_concepts)
    source = pl.col("condition_source_value").str.replace_all(".", "", literal=True)
    source = source.str.to_uppercase()
    by_source = pl.lit(False)
    for prefix in question.entry_source_prefixes:
        by_source = by_source | source.str.starts_with(prefix.upper())
    first_entry = (
        scan("emr", "condition_occurrence")
        .select(
            "person_id", "condition_concept_id", "condition_source_value", "condition_start_date"
        )
        .filter(pl.col("condition_concept_id").is_in(entry_ids) | by_source.fill_null(False))
        .group_by("person_id")
        .agg(pl.col("condition_start_date").min().alias("entry_date"))
        .filter(pl.col("entry_date").is_between(question.entry_from, question.entry_to))
    )
    procedures = (
        scan("emr", "procedure_occurrence")
        .select("person_id", "procedure_concept_id", "procedure_date")
        .filter(
            pl.col("procedure_date").is_between(proc_from, proc_to)
            & pl.col("procedure_concept_id").is_in(proc_ids)
        )
    )
    low, high = question.procedure_days
    kept = (
        first_entry.join(procedures, on="person_id")
        .filter(
            pl.col("procedure_date").is_between(
                pl.col("entry_date") + pl.duration(days=low),
                pl.col("entry_date") + pl.duration(days=high),
            )
        )
        .select("person_id", "entry_date")
        .unique()
    )
    linked = kept.join(
        scan("emr", "person").select("person_id", "person_source_value"), on="person_id"
    ).rename({"person_source_value": "PatientID"})
    images = (
        scan("tables", "series")
        .select("PatientID", "SeriesInstanceUID", "Modality", "imaging_date")
        .filter(
            (pl.col("Modality") == question.modality)
            & pl.col("imaging_date").is_between(img_from, img_to)
        )
        .drop("Modality")
    )
    low, high = question.imaging_days
    answer = (
        linked.join(images, on="PatientID")
        .with_columns(
            (pl.col("imaging_date") - pl.col("entry_date"))
            .dt.total_days()
            .cast(pl.Int64)
            .alias("days_from_index")
        )
        .filter(pl.col("days_from_index").is_between(low, high))
        .select("person_id", "PatientID", "SeriesInstanceUID", "entry_date", "days_from_index")
        .sort("person_id", "SeriesInstanceUID")
        .collect()
    )
    return answer.to_arrow().cast(ANSWER_SCHEMA)
