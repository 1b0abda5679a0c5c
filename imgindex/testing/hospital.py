"""Write a seeded, hospital-export-like tree of DICOM files of a chosen total size.

The tree looks like what a PACS export or a CD-ROM burner writes::

    out_dir/
      PAT000000/                          PatientID
        20170412_A4829101274/             StudyDate_AccessionNumber
          1_CT/IM00001 ... IM00042        SeriesNumber_Modality / instances
          2_CT/IM00001.dcm ...            (about one series in five uses ".dcm")
          503_OT/IM00001                  a multi-frame Secondary Capture
          903_OT/IM00001 IM00002          RGB Secondary Captures
      PAT000001/
        ...

Most bytes are uncompressed CT and MR slices of ``ct_size`` x ``ct_size``; a small,
tunable share of series is RLE Lossless or JPEG 2000 Lossless, whose encoding is
slower. The whole tree is planned first (cheaply, without pixels) from the seed
and the target size, then the series are written, in parallel with ``workers > 1``;
each series depends only on its plan, so the bytes do not depend on `workers`.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from pydicom.uid import ExplicitVRLittleEndian

from imgindex.testing.factory import (
    iter_planned_series,
    iter_series,
    make_patient,
    plan_patient_studies,
    write_dataset,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from concurrent.futures import Future

    from imgindex.testing.factory import SeriesPlan

logger = logging.getLogger(__name__)

#: Patient seeds are ``seed * PATIENTS_PER_SEED + index``, so the hospitals of
#: different seeds never share a PatientID.
PATIENTS_PER_SEED: Final = 1_000_000
#: Default share of series written with a compressed transfer syntax.
DEFAULT_COMPRESSED_FRACTION: Final = 0.1
# Rough header size of a CT/MR instance, for choosing series lengths.
_HEADER_BYTES: Final = 3_300
# Series lengths grow with the target, so that small trees still hold several
# patients and large ones have realistic series (up to 300 slices).
_SERIES_PER_TARGET: Final = 40
_MAX_SLICES: Final = 300
_MIN_SLICES: Final = 4


class _Progress(Protocol):
    """The part of a tqdm progress bar that the writer uses."""

    def update(self, n: int) -> object: ...

    def close(self) -> None: ...


@dataclass
class HospitalSummary:
    """What :func:`write_hospital` wrote.

    Attributes
    ----------
    out_dir : pathlib.Path
        Root of the tree.
    files : int
        Files written (one per instance).
    bytes : int
        Their total size.
    patients, studies, series, instances : int
        Distinct PatientIDs, StudyInstanceUIDs, SeriesInstanceUIDs and
        SOPInstanceUIDs written.
    instances_per_modality : dict of str to int
        Instances per Modality (``"CT"``, ``"MR"``, ``"OT"``).
    instances_per_transfer_syntax : dict of str to int
        Instances per Transfer Syntax UID.
    """

    out_dir: Path
    files: int = 0
    bytes: int = 0
    patients: int = 0
    studies: int = 0
    series: int = 0
    instances: int = 0
    instances_per_modality: dict[str, int] = field(default_factory=dict)
    instances_per_transfer_syntax: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _SeriesTask:
    plan: SeriesPlan
    directory: Path
    suffix: str


@dataclass(frozen=True)
class _SeriesResult:
    files: int
    bytes: int


def _series_task(out_dir: Path, plan: SeriesPlan) -> _SeriesTask:
    study = plan.study
    directory = (
        out_dir
        / plan.patient.PatientID
        / f"{study.StudyDate}_{study.AccessionNumber}"
        / f"{plan.series_number}_{plan.modality}"
    )
    # Plan seeds are uniform hashes, so this picks about one series in five.
    suffix = ".dcm" if plan.seed % 5 == 0 else ""
    return _SeriesTask(plan=plan, directory=directory, suffix=suffix)


def _write_series(task: _SeriesTask) -> _SeriesResult:
    """Write one planned series; runs in a worker process when ``workers > 1``."""
    task.directory.mkdir(parents=True, exist_ok=True)
    files = size = 0
    for number, ds in enumerate(iter_planned_series(task.plan), start=1):
        path = task.directory / f"IM{number:05d}{task.suffix}"
        write_dataset(ds, path)
        files += 1
        size += path.stat().st_size
    return _SeriesResult(files=files, bytes=size)


def _slice_range(target_bytes: int, ct_size: int) -> tuple[int, int]:
    slice_bytes = ct_size * ct_size * 2 + _HEADER_BYTES
    high = min(max(target_bytes // (slice_bytes * _SERIES_PER_TARGET), _MIN_SLICES), _MAX_SLICES)
    return max(2, high // 5), high


def _iter_patient_plans(
    seed: int,
    first_patient: int,
    *,
    ct_size: int,
    slices: tuple[int, int],
    compressed_fraction: float,
) -> Iterator[tuple[int, list[SeriesPlan]]]:
    """Yield ``(patient index, series plans)`` for patients from `first_patient` on."""
    for index in range(first_patient, PATIENTS_PER_SEED):
        patient_seed = seed * PATIENTS_PER_SEED + index
        patient = make_patient(patient_seed)
        studies = plan_patient_studies(
            patient_seed,
            patient,
            size=ct_size,
            slices=slices,
            compressed_fraction=compressed_fraction,
        )
        yield index, [series for study in studies for series in study.series]
    raise ValueError(f"a hospital holds at most {PATIENTS_PER_SEED} patients per seed")


def _plan_batch(
    seed: int,
    first_patient: int,
    need: int,
    *,
    ct_size: int,
    slices: tuple[int, int],
    compressed_fraction: float,
) -> tuple[list[SeriesPlan], int]:
    """Plan series worth about `need` bytes; return them and the next patient index.

    The last series is shortened so that the estimate just reaches `need`, and the
    rest of that patient's series are dropped, as in an export that was stopped.
    """
    batch: list[SeriesPlan] = []
    estimate = 0
    next_patient = first_patient
    for index, plans in _iter_patient_plans(
        seed,
        first_patient,
        ct_size=ct_size,
        slices=slices,
        compressed_fraction=compressed_fraction,
    ):
        next_patient = index + 1
        for plan in plans:
            kept = plan
            size = plan.estimated_bytes()
            if estimate + size > need and plan.kind == "image":
                per_instance = size / plan.n_instances
                fitting = max(1, math.ceil((need - estimate) / per_instance))
                kept = replace(plan, n_instances=min(fitting, plan.n_instances))
                size = kept.estimated_bytes()
            batch.append(kept)
            estimate += size
            if estimate >= need:
                return batch, next_patient
    return batch, next_patient


def _run_tasks(
    tasks: list[_SeriesTask], pool: ProcessPoolExecutor | None, progress: _Progress | None
) -> list[_SeriesResult]:
    # Largest first, so that workers finish together.
    order = sorted(range(len(tasks)), key=lambda i: -tasks[i].plan.estimated_bytes())
    results: dict[int, _SeriesResult] = {}
    if pool is None:
        for i in order:
            results[i] = _write_series(tasks[i])
            if progress is not None:
                progress.update(results[i].bytes)
    else:
        futures: dict[Future[_SeriesResult], int] = {
            pool.submit(_write_series, tasks[i]): i for i in order
        }
        for future in as_completed(futures):
            result = results[futures[future]] = future.result()
            if progress is not None:
                progress.update(result.bytes)
    return [results[i] for i in range(len(tasks))]


def write_hospital(
    out_dir: str | Path,
    *,
    seed: int = 0,
    target_bytes: int,
    ct_size: int = 512,
    workers: int = 1,
    progress: bool = False,
    compressed_fraction: float = DEFAULT_COMPRESSED_FRACTION,
) -> HospitalSummary:
    """Write patients into `out_dir` until the files total at least `target_bytes`.

    Parameters
    ----------
    out_dir : str or pathlib.Path
        Root of the tree (see the module docstring); created if missing, and
        must be empty.
    seed : int
        Fixes the whole tree: the same seed, size and options give
        byte-identical files, whatever `workers` is.
    target_bytes : int
        Total size to reach; the files exceed it by about one instance at most.
    ct_size : int
        Rows and columns of CT and MR slices (multi-frame frames are half).
    workers : int
        Processes writing series in parallel; 1 writes in this process.
    progress : bool
        Show a progress bar (tqdm) on stderr.
    compressed_fraction : float
        Share of series written RLE Lossless (70 %) or JPEG 2000 Lossless (30 %,
        at most 24 slices each), between 0 and 1.

    Returns
    -------
    HospitalSummary
        Counts of what was written.

    Raises
    ------
    ValueError
        If `target_bytes`, `ct_size`, `workers`, `seed` or `compressed_fraction`
        is out of range.
    FileExistsError
        If `out_dir` exists and is not empty.
    """
    if target_bytes < 1 or ct_size < 1 or workers < 1 or seed < 0:
        raise ValueError(
            "target_bytes, ct_size and workers must be positive and seed non-negative, not "
            f"{target_bytes}, {ct_size}, {workers}, {seed}"
        )
    if not 0.0 <= compressed_fraction <= 1.0:
        raise ValueError(f"compressed_fraction must be in [0, 1], not {compressed_fraction}")
    root = Path(out_dir)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; write the hospital to a new directory")
    root.mkdir(parents=True, exist_ok=True)
    slices = _slice_range(target_bytes, ct_size)
    summary = HospitalSummary(out_dir=root)
    modalities: Counter[str] = Counter()
    syntaxes: Counter[str] = Counter()
    patients: set[str] = set()
    studies: set[str] = set()
    bar: _Progress | None = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=target_bytes, unit="B", unit_scale=True, desc="hospital")
    pool = (
        ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        if workers > 1
        else None
    )
    next_patient = 0
    try:
        # Estimates are rough, so top up in rounds until the real total is reached;
        # each round depends only on the bytes of the rounds before it.
        while summary.bytes < target_bytes:
            plans, next_patient = _plan_batch(
                seed,
                next_patient,
                target_bytes - summary.bytes,
                ct_size=ct_size,
                slices=slices,
                compressed_fraction=compressed_fraction,
            )
            tasks = [_series_task(root, plan) for plan in plans]
            logger.debug(
                "writing %d series in round ending at patient %d", len(tasks), next_patient
            )
            for task, result in zip(tasks, _run_tasks(tasks, pool, bar), strict=True):
                summary.files += result.files
                summary.bytes += result.bytes
                summary.series += 1
                summary.instances += task.plan.instance_count
                modalities[task.plan.modality] += task.plan.instance_count
                syntaxes[task.plan.transfer_syntax] += task.plan.instance_count
                patients.add(task.plan.patient.PatientID)
                studies.add(task.plan.study.StudyInstanceUID)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()
    summary.patients = len(patients)
    summary.studies = len(studies)
    summary.instances_per_modality = dict(sorted(modalities.items()))
    summary.instances_per_transfer_syntax = dict(sorted(syntaxes.items()))
    return summary


def write_ct_series(
    out_dir: str | Path, *, seed: int, n_slices: int, size: int = 512
) -> list[Path]:
    """Write one uncompressed CT series of `n_slices` slices as ``IM00001``...

    For benchmarks that need many slices of one size and nothing else.

    Parameters
    ----------
    out_dir : str or pathlib.Path
        Directory of the files; created if missing.
    seed : int
        Fixes the series.
    n_slices : int
        Number of slices.
    size : int
        Rows and columns.

    Returns
    -------
    list of pathlib.Path
        The files, in InstanceNumber order.
    """
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for number, ds in enumerate(
        iter_series(seed, "CT", n_slices, size, size, transfer_syntax=ExplicitVRLittleEndian),
        start=1,
    ):
        path = directory / f"IM{number:05d}"
        write_dataset(ds, path)
        paths.append(path)
    return paths
