"""``imgindex export``: the selected series into one Zarr v3 store, complete or loudly not.

The work, per series, on :mod:`storage.transfer`:

1. **plan**: the selection's series and their instances from the index; series the
   ``transfers`` ledger records as complete for this store (and whose arrays are in place)
   are skipped, so a killed export rerun with the same arguments resumes.
2. **fetch** (threads): from where the index says each instance is
   (:mod:`imgindex.export.fetch`).
3. **convert** (processes): decode, assemble, de-identify, write
   (:mod:`imgindex.export.convert`).
4. **ledger** (this thread): one ``transfers`` row per series, committed every few seconds.

At the end ``manifest.parquet`` lists every array of the store with its shape, dtype, bytes
and the selection's labels, and the summary lists every series that is not complete.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from imgindex.deid import Deidentifier
from imgindex.errors import ConfigError
from imgindex.export.convert import EXPORT_FORMAT, Converted, ConvertOptions, write_series
from imgindex.export.dicom import DicomStore, series_key, write_dicom_manifest
from imgindex.export.fetch import FetchOptions, close_clients, fetch_series, is_transient
from imgindex.export.plan import Exclusion, SeriesJob, plan_series, read_selection_file
from imgindex.index import Index
from imgindex.schema import TRANSFER_SCHEMA
from storage import ArrayStore, Pipeline, Retry, Stage, TransferMetrics, Work, run_on_dask
from storage.arrays import DEFAULT_COMPRESSOR

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable, Sequence

    from prometheus_client import CollectorRegistry

    from imgindex.deid.emr import EmrExport
    from storage import Outcome, Progress, Table

__all__ = ["FORMATS", "ExportProgress", "ExportSummary", "export", "read_manifest"]

logger = logging.getLogger(__name__)

MANIFEST: Final = "manifest.parquet"
#: Output formats: one Zarr v3 store of arrays, or a folder of de-identified DICOM files.
FORMATS: Final = ("zarr", "dicom")
#: Where ``--with-emr`` writes the EMR rows, inside the output.
EMR_FOLDER: Final = "emr"
_LEDGER_EVERY_S: Final = 2.0
_LEDGER_EVERY_ROWS: Final = 256


@dataclass
class ExportSummary:
    """What an export did.

    Attributes
    ----------
    out : Path
        The Zarr store, or the DICOM folder.
    format : str
        ``zarr`` or ``dicom``.
    selected : int
        Series in the selection.
    complete, failed, skipped : int
        Series by outcome in this run (``skipped``: nothing to export, e.g. no pixel data).
    already : int
        Series complete in an earlier run, not exported again.
    failures : list of Converted
        Every series not complete in this run (failed or skipped), with the reason.
    arrays : int
        Arrays in the store, or series folders of a DICOM export (the manifest's rows).
    excluded : list of Exclusion
        Series with instances left out as possibly showing burned-in text.
    emr : EmrExport, optional
        What ``with_emr`` wrote.
    bytes_in, bytes_out : int
        DICOM bytes fetched, and bytes written to the store, in this run.
    seconds : float
        Wall time of this run.
    """

    out: Path
    format: str = "zarr"
    selected: int = 0
    complete: int = 0
    failed: int = 0
    skipped: int = 0
    already: int = 0
    failures: list[Converted] = field(default_factory=list)
    arrays: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    cancelled: bool = False
    excluded: list[Exclusion] = field(default_factory=list)
    emr: EmrExport | None = None

    @property
    def ok(self) -> bool:
        """Every selected series is complete (now or earlier) or had nothing to export."""
        return self.failed == 0 and not self.cancelled

    @property
    def mb_per_s(self) -> float:
        """DICOM megabytes (10^6) in per second."""
        return self.bytes_in / 1e6 / self.seconds if self.seconds else 0.0

    def describe(self) -> str:
        """The summary as people read it; every failure is listed."""
        lines = [
            (
                f"{self.selected} series selected: {self.complete} exported now, "
                f"{self.already} already complete, {self.failed} failed, {self.skipped} skipped"
            ),
            (
                f"{self.bytes_in / 1e6:,.1f} MB of DICOM in, {self.bytes_out / 1e6:,.1f} MB "
                f"written, in {self.seconds:.1f} s ({self.mb_per_s:,.1f} MB/s, "
                f"{self.mb_per_s * 86_400 / 1e6:.2f} TB/day)"
            ),
            f"{self.arrays} {'arrays' if self.format == 'zarr' else 'series folders'} in {self.out}",
        ]
        if self.excluded:
            lines.append(
                "left out as possibly showing burned-in text (--allow-burned-in to include them):"
            )
            lines.extend(
                f"  {e.series_uid}: {e.excluded} of {e.of} instances ({e.reason})"
                + ("" if e.excluded < e.of else ", so the whole series")
                for e in self.excluded
            )
        if self.emr is not None:
            tables = ", ".join(f"{name} {rows:,}" for name, rows in self.emr.tables.items())
            lines.append(
                f"EMR rows of {self.emr.persons} persons in {self.out / EMR_FOLDER}: {tables or 'none'}"
            )
            if self.emr.unlinked_person_ids:
                lines.append(
                    f"  {len(self.emr.unlinked_person_ids)} selected persons have no PatientID "
                    "link, so no date shift to share with images: their EMR rows were not written"
                )
        if self.cancelled:
            lines.append("stopped before the end: run the same command again to resume")
        if self.failures:
            lines.append("not exported:")
            lines.extend(
                f"  {f.series_uid}: {f.outcome} ({f.reason}) {f.message or ''} "
                f"[expected {f.expected}, fetched {f.fetched}, written {f.written}]"
                for f in self.failures
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class ExportProgress:
    """A progress snapshot in the units people watch: series, and DICOM bytes in.

    ``rate_now`` is over the last :data:`RATE_WINDOW_S` seconds; the ETA is the DICOM bytes
    left at the average rate.
    """

    done: int
    failed: int
    total: int
    bytes_in: int
    bytes_total: int
    rate_now: float
    rate_avg: float
    eta_s: float | None
    elapsed_s: float
    inflight_bytes: int


#: Seconds over which ``ExportProgress.rate_now`` is measured.
RATE_WINDOW_S: Final = 10.0


class _Rates:
    """DICOM bytes in over time, for the current and average rate."""

    def __init__(self, total: int, bytes_total: int) -> None:
        self.began = time.monotonic()
        self.samples: deque[tuple[float, int]] = deque([(self.began, 0)])
        self.total, self.bytes_total = total, bytes_total

    def snapshot(self, summary: ExportSummary, engine: Progress) -> ExportProgress:
        now = time.monotonic()
        done = summary.bytes_in
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] > RATE_WINDOW_S:
            self.samples.popleft()
        first_t, first_b = self.samples[0]
        elapsed = now - self.began
        rate_avg = done / elapsed if elapsed > 0 else 0.0
        left = max(0, self.bytes_total - done)
        return ExportProgress(
            done=summary.complete + summary.skipped,
            failed=summary.failed,
            total=self.total,
            bytes_in=done,
            bytes_total=self.bytes_total,
            rate_now=(done - first_b) / (now - first_t) if now > first_t else 0.0,
            rate_avg=rate_avg,
            eta_s=left / rate_avg if rate_avg > 0 else None,
            elapsed_s=elapsed,
            inflight_bytes=engine.inflight_bytes,
        )


class _Stopped(Exception):
    """Raised from a callback of a Dask run to stop it (``stop`` was set)."""


def _ledger(root: Path) -> Table:
    return Index(root).table("transfers")


def _done_before(root: Path, out: str, store: ArrayStore | DicomStore) -> set[str]:
    """Series this store holds complete from an earlier run (ledger and arrays agree)."""
    table = _ledger(root)
    if not table.exists:
        return set()
    rows = (
        table.scan()
        .filter((pl.col("export") == out) & (pl.col("outcome") == "complete"))
        .select("SeriesInstanceUID", "arrays")
        .collect()
    )
    present = set(store.keys())
    return {
        row["SeriesInstanceUID"]
        for row in rows.iter_rows(named=True)
        if row["arrays"] and all(key in present for key in row["arrays"])
    }


class _LedgerWriter:
    """Buffers ``transfers`` rows and commits them every few seconds (and at the end)."""

    def __init__(self, root: Path, out: str) -> None:
        self.table = _ledger(root)
        self.out = out
        self.rows: list[dict[str, Any]] = []
        self.last = time.monotonic()

    def add(self, converted: Converted, *, seconds: float, attempts: int) -> None:
        self.rows.append(
            {
                "export": self.out,
                "SeriesInstanceUID": converted.series_uid,
                "outcome": converted.outcome,
                "reason": converted.reason,
                "message": converted.message,
                "arrays": converted.arrays,
                "expected_instances": converted.expected,
                "fetched_instances": converted.fetched,
                "written_instances": converted.written,
                "bytes_in": converted.bytes_in,
                "bytes_out": converted.bytes_out,
                "seconds": seconds,
                "attempts": attempts,
                "finished_at": dt.datetime.now(dt.UTC),
            }
        )
        if len(self.rows) >= _LEDGER_EVERY_ROWS or time.monotonic() - self.last > _LEDGER_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.table.upsert(pa.Table.from_pylist(self.rows, schema=TRANSFER_SCHEMA))
            self.rows = []
        self.last = time.monotonic()


def _converted_of(outcome: Outcome) -> Converted:
    if outcome.ok:
        value = outcome.value
        assert isinstance(value, Converted)
        return value
    job = outcome.payload
    assert isinstance(job, SeriesJob)
    error = outcome.error
    reason = f"{outcome.stage}_error"
    if outcome.stage == "fetch" and error is not None and is_transient(error):
        reason = "fetch_failed"
    return Converted(
        job.series_uid,
        outcome="failed",
        reason=reason,
        message=f"{type(error).__name__}: {error}",
        expected=len(job.instances),
    )


def export(
    selection: str | Path,
    root: str | Path,
    out: str | Path,
    *,
    workers: int | None = None,
    fetch_threads: int = 4,
    max_inflight_mb: int = 1024,
    chunks: Sequence[int] | None = None,
    compressor: str = DEFAULT_COMPRESSOR,
    split_stacks: bool = False,
    scheduler: str | None = None,
    fetch: FetchOptions | None = None,
    deid: Deidentifier | None = None,
    format: str = "zarr",
    with_emr: bool = False,
    allow_burned_in: bool = False,
    registry: CollectorRegistry | None = None,
    on_progress: Callable[[ExportProgress], None] | None = None,
    stop: threading.Event | None = None,
    progress_interval_s: float = 0.5,
) -> ExportSummary:
    """Export the series of ``selection`` (see the module docstring and docs/export.md).

    Parameters
    ----------
    selection : str or Path
        A selection file (:func:`imgindex.export.plan.read_selection_file`).
    root : str or Path
        The catalog root (index tables, ledger, de-identification key).
    out : str or Path
        The Zarr store to write (made if missing; a rerun resumes it).
    workers : int, optional
        Convert processes (default: the CPU count).
    fetch_threads : int
        Fetch threads (and requests to a DICOMweb server at once).
    max_inflight_mb : int
        Megabytes (2^20) of series held in memory at once, fetched bytes and decoded pixels.
    chunks : sequence of int, optional
        Inner chunk shape (default: one slice).
    compressor : str
        One of :data:`storage.COMPRESSORS`.
    split_stacks : bool
        Write a series that is not one volume (mixed sizes or orientations) as one array per
        consistent stack instead of failing it.
    scheduler : str, optional
        A Dask distributed scheduler address (``tcp://HOST:PORT``): each series is one task.
    fetch : FetchOptions, optional
        DICOMweb credentials and timeouts.
    deid : Deidentifier, optional
        The key and profile options (default: the catalog's own key,
        :meth:`Deidentifier.for_root`, with every option).
    format : str
        ``zarr`` (arrays) or ``dicom`` (de-identified DICOM files), see :data:`FORMATS`.
    with_emr : bool
        Also write the selected persons' OMOP rows under ``OUT/emr`` with the same pseudonyms
        and date shifts (:func:`imgindex.deid.emr.export_emr`).
    allow_burned_in : bool
        Export instances that may show burned-in text too (by default they are left out
        and listed, see :func:`imgindex.export.plan.burned_in_reason`).
    registry : prometheus_client.CollectorRegistry, optional
        Where the transfer metrics go (``imgindex_export_*``).
    on_progress : callable, optional
        Called with :class:`ExportProgress` snapshots, from this thread.
    stop : threading.Event, optional
        Set it (e.g. from a signal handler) to finish the series in flight and stop; the
        summary then says ``cancelled`` and a rerun resumes.
    progress_interval_s : float
        Seconds between two calls of ``on_progress``.

    Raises
    ------
    ConfigError
        For a selection that cannot be read, or bad options.
    """
    began = time.perf_counter()
    root, out_path = Path(root), Path(out).resolve()
    if max_inflight_mb < 1:
        raise ConfigError(f"--max-inflight-mb must be at least 1, not {max_inflight_mb}")
    if format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
    workers = workers or os.cpu_count() or 1
    if workers < 1 or fetch_threads < 1:
        raise ConfigError("--workers and fetch threads must be at least 1")
    selection_file = read_selection_file(selection)
    index = Index(root)
    instances_version = index.table("instances").version()
    deid = deid or Deidentifier.for_root(root)
    jobs, not_in_index, exclusions = plan_series(
        index, selection_file, allow_burned_in=allow_burned_in
    )
    store: ArrayStore | DicomStore
    if format == "zarr":
        group_attributes = deid.attributes(
            {
                "export_format": EXPORT_FORMAT,
                "cohort_sha256": selection_file.cohort_sha256,
                "index_version": instances_version,
            }
        )
        store = ArrayStore(out_path, attributes=group_attributes)
    else:
        out_path.mkdir(parents=True, exist_ok=True)
        store = DicomStore(out_path)
    if removed := store.clean_partial():
        logger.info("removed %d partial series of an earlier run", removed)
    out_key = str(out_path)
    done = _done_before(root, out_key, store)
    # Largest first: the series converting alone at the end of the run is then a small one.
    todo = sorted(
        (job for job in jobs if job.series_uid not in done), key=lambda j: -j.memory_bytes
    )
    summary = ExportSummary(
        out=out_path,
        format=format,
        selected=len(selection_file.series),
        already=len(done),
        excluded=exclusions,
    )
    ledger = _LedgerWriter(root, out_key)
    for uid in not_in_index:
        missing = Converted(
            uid,
            outcome="failed",
            reason="not_in_index",
            message="the index has no instance of this series (index it, or check the selection)",
        )
        ledger.add(missing, seconds=0.0, attempts=0)
        summary.failures.append(missing)
        summary.failed += 1
    convert_options = ConvertOptions(
        store=str(out_path),
        deid_key=deid.key,
        format=format,
        deid_options=deid.options,
        deid_enabled=deid.enabled,
        compressor=compressor,
        chunks=tuple(chunks) if chunks else None,
        split=split_stacks,
        cohort_sha256=selection_file.cohort_sha256,
        index_version=instances_version,
    )
    fetch_options = fetch or FetchOptions(concurrency=fetch_threads)
    stages = [
        Stage(
            "fetch",
            functools.partial(fetch_series, options=fetch_options),
            workers=fetch_threads,
            retry=Retry(attempts=3, transient=is_transient),
        ),
        Stage(
            "convert",
            functools.partial(write_series, options=convert_options),
            workers=workers,
            processes=True,
        ),
    ]

    def on_outcome(outcome: Outcome) -> None:
        converted = _converted_of(outcome)
        ledger.add(
            converted,
            seconds=sum(outcome.seconds.values()),
            attempts=max(outcome.attempts.values(), default=0),
        )
        summary.bytes_in += converted.bytes_in
        summary.bytes_out += converted.bytes_out
        if converted.outcome == "complete":
            summary.complete += 1
        else:
            summary.failures.append(converted)
            if converted.outcome == "skipped":
                summary.skipped += 1
            else:
                summary.failed += 1
        _check_stop()

    def _check_stop() -> None:
        if stop is not None and stop.is_set():
            if scheduler:
                raise _Stopped  # run_on_dask cancels its tasks when a callback raises
            pipeline.cancel()

    work = (Work(job.series_uid, job.memory_bytes, job) for job in todo)
    metrics = TransferMetrics("imgindex_export", registry)
    budget = max_inflight_mb * 2**20
    total_bytes = sum(job.memory_bytes for job in todo)
    pipeline = Pipeline(stages, max_inflight_bytes=budget, metrics=metrics)

    rates = _Rates(len(todo), sum(job.size_bytes for job in todo))

    def progress(snapshot: Progress) -> None:
        _check_stop()
        if on_progress is not None:
            on_progress(rates.snapshot(summary, snapshot))

    try:
        if scheduler:
            run = run_on_dask(
                stages,
                work,
                scheduler=scheduler,
                max_inflight_bytes=budget,
                total=len(todo),
                total_bytes=total_bytes,
                metrics=metrics,
                on_outcome=on_outcome,
                on_progress=progress,
                progress_interval_s=progress_interval_s,
            )
        else:
            run = pipeline.run(
                work,
                total=len(todo),
                total_bytes=total_bytes,
                on_outcome=on_outcome,
                on_progress=progress,
                progress_interval_s=progress_interval_s,
            )
        summary.cancelled = run.cancelled
    except _Stopped:
        summary.cancelled = True
    finally:
        ledger.flush()
        close_clients()
    if isinstance(store, ArrayStore):
        summary.arrays = write_manifest(store, deid)
    else:
        labels = {
            series_key(deid, job.patient_id, job.study_uid or "", job.series_uid): job.labels
            for job in jobs
        }
        summary.arrays = write_dicom_manifest(out_path, deid, labels, MANIFEST)
    if with_emr and not summary.cancelled:
        summary.emr = _export_emr(root, out_path / EMR_FOLDER, jobs, deid)
    summary.seconds = time.perf_counter() - began
    return summary


def _export_emr(root: Path, out: Path, jobs: Sequence[SeriesJob], deid: Deidentifier) -> EmrExport:
    """The EMR rows of the export's persons: those the selection names (``person_id``) and
    those linked to its PatientIDs."""
    from imgindex.deid.emr import export_emr, persons_for
    from imgindex.emr import Emr

    emr = Emr(root)
    if not emr.has("person"):
        raise ConfigError(
            f"--with-emr: {root} has no EMR; import one first: imgindex emr import SOURCE --root {root}"
        )
    person_ids = {int(p) for job in jobs if (p := job.labels.get("person_id")) is not None}
    patient_ids = {job.patient_id for job in jobs if job.patient_id}
    persons = persons_for(emr, patient_ids=patient_ids, person_ids=person_ids)
    return export_emr(emr, persons, out, deid if deid.enabled else None, person_ids=person_ids)


def write_manifest(store: ArrayStore, deid: Deidentifier) -> int:
    """Write ``manifest.parquet``: one row per array of ``store``; returns the rows."""
    rows: list[dict[str, Any]] = []
    keys = store.keys()
    for key in keys:
        meta = json.loads((store.root / key / "zarr.json").read_text(encoding="utf-8"))
        shape = [int(n) for n in meta["shape"]]
        dtype = str(meta["data_type"])
        attributes = meta.get("attributes", {})
        row = {
            "key": key,
            "shape": shape,
            "dtype": dtype,
            "nbytes": _nbytes(shape, dtype),
            "stored_bytes": _stored_bytes(store.root / key),
        }
        row.update(deid.attributes(attributes, pseudonymized=True))
        for name in ("RescaleSlope", "RescaleIntercept"):
            # Per-slice values (a list) stay in the array's attributes; the column is scalar.
            if isinstance(row.get(name), list):
                row[name] = None
                row["rescale_per_slice"] = True
        rows.append(row)
    table = pa.Table.from_pylist(rows) if rows else pa.table({"key": pa.array([], pa.string())})
    staged = store.root / f".{MANIFEST}.{os.getpid()}"
    pq.write_table(table, staged)
    os.replace(staged, store.root / MANIFEST)
    return len(rows)


def read_manifest(out: str | Path) -> pl.DataFrame:
    """An export's ``manifest.parquet``."""
    return pl.read_parquet(Path(out) / MANIFEST)


def _nbytes(shape: Sequence[int], dtype: str) -> int:
    import numpy as np

    count = 1
    for n in shape:
        count *= n
    return count * np.dtype(dtype).itemsize


def _stored_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
