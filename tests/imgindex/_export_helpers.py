"""Series for export tests: written to disk, indexed, and the voxels pydicom reads from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from imgindex.crawl import index_files
from imgindex.schema import DEFAULT_ATTRIBUTES
from imgindex.testing import make_series, write_dataset

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from numpy.typing import NDArray
    from pydicom import Dataset


@dataclass(frozen=True)
class WrittenSeries:
    """One series on disk: its UID, files, transfer syntax and identifying values."""

    uid: str
    files: list[Path]
    transfer_syntax: str
    identifiers: dict[str, str]


#: (transfer syntax, modality, slices, size) of the series ``write_set`` writes.
SERIES_KINDS: tuple[tuple[str, str, int, int], ...] = (
    (ExplicitVRLittleEndian, "CT", 12, 48),
    (ImplicitVRLittleEndian, "MR", 9, 40),
    (RLELossless, "CT", 10, 40),
    (JPEG2000Lossless, "MR", 6, 64),
)


def write_series(
    folder: Path, datasets: Sequence[Dataset], *, name: str | None = None
) -> WrittenSeries:
    """Write ``datasets`` (one series) as ``folder/<name>/IM00001``..., in a shuffled order
    of file names so that file order is not slice order."""
    first = datasets[0]
    target = folder / (name or str(first.SeriesInstanceUID))
    target.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(len(datasets)).permutation(len(datasets))
    files = []
    for number, position in enumerate(order, start=1):
        path = target / f"IM{number:05d}"
        write_dataset(datasets[int(position)], path)
        files.append(path)
    identifiers = {
        "PatientName": str(first.PatientName),
        "PatientID": str(first.PatientID),
        "StudyInstanceUID": str(first.StudyInstanceUID),
        "SeriesInstanceUID": str(first.SeriesInstanceUID),
        "AccessionNumber": str(first.get("AccessionNumber", "")),
    }
    for i, ds in enumerate(datasets):
        identifiers[f"SOPInstanceUID{i}"] = str(ds.SOPInstanceUID)
    return WrittenSeries(
        str(first.SeriesInstanceUID),
        files,
        str(first.file_meta.TransferSyntaxUID),
        identifiers,
    )


def write_set(folder: Path, *, seed: int = 0) -> list[WrittenSeries]:
    """One series of each of :data:`SERIES_KINDS`."""
    return [
        write_series(
            folder,
            make_series(seed + i, modality, n, size, size, transfer_syntax=syntax),
        )
        for i, (syntax, modality, n, size) in enumerate(SERIES_KINDS)
    ]


def index_folder(folder: Path, root: Path) -> None:
    """Index ``folder`` into ``root`` (as ``imgindex index-files`` does)."""
    index_files([folder], root, attributes=DEFAULT_ATTRIBUTES)


def write_selection(path: Path, uids: Sequence[str]) -> Path:
    """A text selection: one SeriesInstanceUID per line."""
    path.write_text("".join(f"{uid}\n" for uid in uids), encoding="utf-8")
    return path


def reference_volume(files: Sequence[Path]) -> NDArray[Any]:
    """The series as pydicom decodes it, slices sorted along the normal."""
    datasets = [pydicom.dcmread(p) for p in files]
    first = datasets[0]
    cosines = np.array([float(v) for v in first.ImageOrientationPatient])
    normal = np.cross(cosines[:3], cosines[3:])
    datasets.sort(key=lambda ds: float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])))
    return np.stack([ds.pixel_array for ds in datasets])
