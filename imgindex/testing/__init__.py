"""Seeded DICOM generators shared by tests, benchmarks and the demo.

Like ``zarr.testing``, this ships as library code so that ``scripts/gen_dicom.py``
and the test suites use one generator. Everything is deterministic given the
seed: the same seed gives byte-identical files.

* :mod:`imgindex.testing.factory`: datasets (patients, studies, CT/MR series,
  multi-frame and Secondary Capture instances) and encoding helpers.
* :mod:`imgindex.testing.hospital`: a PACS-export-like tree of a chosen size.
* :mod:`imgindex.testing.malformed`: deliberately bad files.
* :mod:`imgindex.testing.omop`: a synthetic OMOP CDM EMR and the index series that link to
  it, with reference answers to the cohort benchmark's question.
"""

from imgindex.testing.factory import (
    COMPRESSED_TRANSFER_SYNTAXES,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    SUPPORTED_TRANSFER_SYNTAXES,
    Patient,
    SeriesPlan,
    Study,
    StudyPlan,
    dataset_to_bytes,
    iter_planned_series,
    iter_series,
    make_multiframe,
    make_patient,
    make_patient_studies,
    make_secondary_capture,
    make_series,
    make_study,
    make_study_info,
    plan_patient_studies,
    plan_study,
    write_and_read_dataset,
    write_dataset,
)
from imgindex.testing.hospital import HospitalSummary, write_ct_series, write_hospital
from imgindex.testing.malformed import MALFORMED_KINDS, write_malformed_files
from imgindex.testing.omop import (
    MI_CAD_CT,
    CohortQuestion,
    World,
    generate_world,
    reference_duckdb,
    reference_polars,
    write_omop_csv,
    write_omop_tables,
    write_series_index,
    write_world,
)

__all__ = [
    "COMPRESSED_TRANSFER_SYNTAXES",
    "MALFORMED_KINDS",
    "MI_CAD_CT",
    "PRIVATE_CREATOR",
    "PRIVATE_GROUP",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "CohortQuestion",
    "HospitalSummary",
    "Patient",
    "SeriesPlan",
    "Study",
    "StudyPlan",
    "World",
    "dataset_to_bytes",
    "generate_world",
    "iter_planned_series",
    "iter_series",
    "make_multiframe",
    "make_patient",
    "make_patient_studies",
    "make_secondary_capture",
    "make_series",
    "make_study",
    "make_study_info",
    "plan_patient_studies",
    "plan_study",
    "reference_duckdb",
    "reference_polars",
    "write_and_read_dataset",
    "write_ct_series",
    "write_dataset",
    "write_hospital",
    "write_malformed_files",
    "write_omop_csv",
    "write_omop_tables",
    "write_series_index",
    "write_world",
]
