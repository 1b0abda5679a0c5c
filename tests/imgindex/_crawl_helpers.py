"""Helpers of the crawler tests: generated studies on disk, and index contents."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from imgindex.index import Index
from imgindex.testing import make_patient, make_series, make_study_info, write_dataset

if TYPE_CHECKING:
    from pathlib import Path

#: Columns that differ by how an instance was indexed, not by its header.
HOW_INDEXED = ("location", "source", "size_bytes", "indexed_at", "TransferSyntaxUID")


def write_studies(
    folder: Path,
    *,
    seed: int,
    studies: int,
    series_per_study: int = 2,
    instances_per_series: int = 3,
    dates: list[str] | None = None,
) -> list[Path]:
    """Write ``studies`` small CT studies (16x16 pixels) as files; returns them."""
    paths: list[Path] = []
    for s in range(studies):
        study_seed = seed * 1000 + s
        date = dates[s % len(dates)] if dates else f"202310{1 + s % 28:02d}"
        # One patient and one set of study attributes for all series of the study, as a
        # PACS keys studies by patient too (Orthanc splits a UID shared by two patients).
        patient = make_patient(study_seed)
        study = make_study_info(study_seed, patient, study_date=date)
        for k in range(series_per_study):
            series = make_series(
                study_seed * 10 + k,
                "CT",
                instances_per_series,
                16,
                16,
                patient=patient,
                study=study,
                series_number=k + 1,
            )
            for i, ds in enumerate(series):
                path = folder / f"st{s:03d}" / f"se{k}" / f"im{i:03d}.dcm"
                path.parent.mkdir(parents=True, exist_ok=True)
                write_dataset(ds, path)
                paths.append(path)
    return paths


def instance_rows(root: Path) -> list[dict[str, Any]]:
    """Every ``instances`` row."""
    return Index(root).instances.collect().to_dicts()


def sop_uids(root: Path) -> list[str]:
    """The SOPInstanceUIDs of the index, sorted, repeats kept (so duplicates show)."""
    return sorted(r["SOPInstanceUID"] for r in instance_rows(root))


def duplicates(values: list[str]) -> list[str]:
    """Values that occur more than once."""
    return [v for v, n in Counter(values).items() if n > 1]


def crawl_state(root: Path) -> list[dict[str, Any]]:
    """Every ``crawl_state`` row."""
    return Index(root).crawl_state.collect().to_dicts()
