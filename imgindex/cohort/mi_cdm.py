"""A selection as OMOP Medical Imaging CDM (MI-CDM) ``image_occurrence`` rows.

One row per selected series (OHDSI ImageWG, "Medical Imaging Extension Conventions"):
``image_occurrence_id``, ``person_id``, ``procedure_occurrence_id``, ``visit_occurrence_id``,
``anatomic_site_concept_id``, ``wadors_uri``, ``local_path``, ``image_occurrence_date``,
``image_study_uid``, ``image_series_uid``, ``modality_concept_id``.

What imgindex cannot know is left null or 0 and documented in docs/cohorts.md: the
procedure and visit the imaging belongs to (MI-CDM wants the imaging procedure's
``procedure_occurrence`` row), and concepts the imported vocabulary does not hold.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

import polars as pl
import pyarrow as pa

if TYPE_CHECKING:
    from imgindex.cohort.engine import Selection

__all__ = ["IMAGE_OCCURRENCE_SCHEMA", "image_occurrence"]

IMAGE_OCCURRENCE_SCHEMA = pa.schema(
    [
        pa.field("image_occurrence_id", pa.int64(), nullable=False),
        pa.field("person_id", pa.int64()),
        pa.field("procedure_occurrence_id", pa.int64()),
        pa.field("visit_occurrence_id", pa.int64()),
        pa.field("anatomic_site_concept_id", pa.int64()),
        pa.field("wadors_uri", pa.string()),
        pa.field("local_path", pa.string()),
        pa.field("image_occurrence_date", pa.date32()),
        pa.field("image_study_uid", pa.string()),
        pa.field("image_series_uid", pa.string()),
        pa.field("modality_concept_id", pa.int64()),
    ]
)


def _stable_id(uid: str) -> int:
    """A positive 63-bit id from a SeriesInstanceUID, the same in every export."""
    return int.from_bytes(hashlib.sha256(uid.encode()).digest()[:8], "big") >> 1


def _where(location: str | None) -> tuple[str | None, str | None]:
    """(wadors_uri, local_path) of a series from one of its instances' locations."""
    if not location:
        return None, None
    parsed = urlparse(location)
    if parsed.scheme in ("http", "https"):
        head, sep, _ = location.partition("/instances/")
        return (head if sep else None), None
    if parsed.scheme == "file":
        return None, str(Path(unquote(parsed.path)).parent)
    return None, None


def image_occurrence(selection: Selection, root: str | Path) -> pa.Table:
    """The selection's series as MI-CDM ``image_occurrence`` rows.

    ``modality_concept_id`` and ``anatomic_site_concept_id`` come from the imported
    ``concept`` table (DICOM vocabulary, ``concept_code`` = Modality / BodyPartExamined) when
    it has them, else 0 (OMOP's "no matching concept").
    """
    root = Path(root)
    sel = pl.from_arrow(selection.table)
    assert isinstance(sel, pl.DataFrame)
    uids = sel["SeriesInstanceUID"].unique().implode()
    instances = root / "tables" / "instances"
    locations = pl.DataFrame(schema={"SeriesInstanceUID": pl.String, "location": pl.String})
    if (instances / "_delta_log").is_dir():
        locations = (
            pl.scan_delta(str(instances))
            .filter(pl.col("SeriesInstanceUID").is_in(uids))
            .group_by("SeriesInstanceUID")
            .agg(pl.col("location").drop_nulls().first())
            .collect()
        )
    codes = pl.DataFrame(schema={"concept_code": pl.String, "concept_id": pl.Int64})
    concept = root / "emr" / "concept"
    if (concept / "_delta_log").is_dir():
        codes = (
            pl.scan_delta(str(concept))
            .filter(pl.col("vocabulary_id") == "DICOM")
            .select(pl.col("concept_code").str.to_uppercase(), pl.col("concept_id").cast(pl.Int64))
            .unique("concept_code")
            .collect()
        )
    rows = sel.join(locations, on="SeriesInstanceUID", how="left")
    where = [_where(loc) for loc in rows["location"].to_list()]

    def concept_of(column: str) -> pl.Expr:
        mapping = dict(zip(codes["concept_code"], codes["concept_id"], strict=True))
        return (
            pl.col(column)
            .str.to_uppercase()
            .replace_strict(mapping, default=0, return_dtype=pl.Int64)
            .fill_null(0)
        )

    out = rows.select(
        pl.col("SeriesInstanceUID")
        .map_elements(_stable_id, return_dtype=pl.Int64)
        .alias("image_occurrence_id"),
        pl.col("person_id").cast(pl.Int64),
        pl.lit(None, dtype=pl.Int64).alias("procedure_occurrence_id"),
        pl.lit(None, dtype=pl.Int64).alias("visit_occurrence_id"),
        concept_of("BodyPartExamined").alias("anatomic_site_concept_id"),
        pl.Series("wadors_uri", [w[0] for w in where], dtype=pl.String),
        pl.Series("local_path", [w[1] for w in where], dtype=pl.String),
        pl.col("imaging_date").alias("image_occurrence_date"),
        pl.col("StudyInstanceUID").alias("image_study_uid"),
        pl.col("SeriesInstanceUID").alias("image_series_uid"),
        concept_of("Modality").alias("modality_concept_id"),
    )
    return out.to_arrow().cast(IMAGE_OCCURRENCE_SCHEMA)
