"""``imgindex export --format dicom``: the selected series as de-identified DICOM files.

Each instance is read whole, de-identified by the PS3.15 profile
(:func:`imgindex.deid.deidentify_dataset`: pixel data untouched, the transfer syntax as
stored) and written as ``OUT/<patient pseudonym>/<study UID>/<series UID>/<SOP UID>.dcm``,
the UIDs being the pseudonymous ones.

A series appears whole or not at all: its files are written and fsynced under
``OUT/.partial/``, then the series folder is renamed into place. A series folder is complete
by its existence; :class:`DicomStore` is to these folders what :class:`storage.ArrayStore` is
to arrays.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
from pydicom.errors import InvalidDicomError

from imgindex.deid import deidentify_dataset

if TYPE_CHECKING:
    from collections.abc import Mapping

    from imgindex.deid import Deidentifier
    from imgindex.export.convert import Converted, ConvertOptions
    from imgindex.export.fetch import Fetched

__all__ = ["DicomStore", "series_key", "write_dicom_manifest", "write_dicom_series"]

_PARTIAL: Final = ".partial"
#: Header attributes of a written series that its manifest row carries (already
#: de-identified in the file; they pass the gate again as pseudonymized).
_MANIFEST_ATTRIBUTES: Final = (
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "StudyDate",
    "SeriesDate",
    "SeriesDescription",
    "BodyPartExamined",
    "PatientSex",
    "PatientAge",
    "Rows",
    "Columns",
)


def series_key(deid: Deidentifier, patient_id: str | None, study_uid: str, series_uid: str) -> str:
    """Where a series goes under the output folder: ``<patient>/<study>/<series>``, from the
    pseudonyms (the original values when de-identification is off)."""
    if not deid.enabled:
        return "/".join(_safe(v) for v in (patient_id or "unknown", study_uid, series_uid))
    return "/".join(
        (deid.token("PatientID", patient_id or ""), deid.uid(study_uid), deid.uid(series_uid))
    )


def _safe(value: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in ".-_" else "_" for c in value.strip())
    return cleaned.strip(".") or "_"


class DicomStore:
    """The series folders of a DICOM export: three levels under ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def keys(self) -> list[str]:
        """The complete series (their ``<patient>/<study>/<series>`` keys)."""
        if not self.root.is_dir():
            return []
        return sorted(
            str(p.relative_to(self.root))
            for p in self.root.glob("*/*/*")
            if p.is_dir()
            and not any(part.startswith(".") for part in p.relative_to(self.root).parts)
        )

    def exists(self, key: str) -> bool:
        return (self.root / key).is_dir()

    def delete(self, key: str) -> None:
        shutil.rmtree(self.root / key, ignore_errors=True)

    def clean_partial(self) -> int:
        """Remove what a killed run left under ``.partial``; returns the series removed."""
        partial = self.root / _PARTIAL
        if not partial.is_dir():
            return 0
        count = sum(1 for _ in partial.iterdir())
        shutil.rmtree(partial)
        return count

    def staging(self, name: str) -> Path:
        """A fresh folder under ``.partial`` to write a series in."""
        folder = self.root / _PARTIAL / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    def publish(self, staged: Path, key: str) -> None:
        """Move a staged series folder into place (replacing an older copy), durably."""
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.rename(staged, target)
        _fsync_dir(target.parent)


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_dicom_series(fetched: Fetched, options: ConvertOptions) -> Converted:
    """De-identify and write every instance of ``fetched`` (see the module docstring)."""
    from imgindex.export.convert import Converted, incomplete_fetch

    job = fetched.job
    result = Converted(
        job.series_uid,
        outcome="failed",
        expected=len(job.instances),
        fetched=len(fetched.sources),
        bytes_in=fetched.bytes_in,
    )
    if fetched.missing:
        return incomplete_fetch(result, fetched)
    deid = options.deidentifier()
    store = DicomStore(options.store)
    key = series_key(deid, job.patient_id, job.study_uid or "", job.series_uid)
    staged = store.staging(deid.token("SeriesInstanceUID", job.series_uid))
    written = 0
    try:
        for position, (uid, source) in enumerate(fetched.sources):
            try:
                ds = pydicom.dcmread(source if isinstance(source, str) else io.BytesIO(source))
            except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
                result.reason = "unreadable"
                result.message = f"instance {position + 1} of {result.expected} ({uid}): {exc}"
                return result
            deidentify_dataset(ds, deid)
            name = _safe(str(ds.get("SOPInstanceUID", uid))) + ".dcm"
            path = staged / name
            with path.open("wb") as out:
                ds.save_as(out, enforce_file_format=True)
                out.flush()
                os.fsync(out.fileno())
                result.bytes_out += out.tell()
            written += 1
        _fsync_dir(staged)
        result.written = written
        if result.written != result.expected or result.fetched != result.expected:
            result.reason = "incomplete_write"
            result.message = (
                f"expected {result.expected} instances, fetched {result.fetched}, "
                f"wrote {result.written}: the series was not published"
            )
            result.bytes_out = 0
            return result
        store.publish(staged, key)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    result.arrays = [key]
    result.outcome = "complete"
    return result


def write_dicom_manifest(
    root: Path, deid: Deidentifier, labels: Mapping[str, Mapping[str, Any]], manifest: str
) -> int:
    """Write ``manifest.parquet`` of a DICOM export: one row per series folder, from its
    first file's header (already de-identified) and the selection's labels (``labels``, by
    the series folder's key). Returns the rows."""
    store = DicomStore(root)
    rows: list[dict[str, Any]] = []
    keys = store.keys()
    for key in keys:
        files = sorted((root / key).glob("*.dcm"))
        row: dict[str, Any] = {"key": key, "instances": len(files)}
        if files:
            ds = pydicom.dcmread(files[0], stop_before_pixels=True)
            header = {k: _plain(ds.get(k)) for k in _MANIFEST_ATTRIBUTES if k in ds}
            row.update(deid.attributes(header, pseudonymized=True))
        row["stored_bytes"] = sum(p.stat().st_size for p in files)
        row.update(deid.attributes(dict(labels.get(key, {}))))
        rows.append(row)
    table = pa.Table.from_pylist(rows) if rows else pa.table({"key": pa.array([], pa.string())})
    staged = root / f".{manifest}.{os.getpid()}"
    pq.write_table(table, staged)
    os.replace(staged, root / manifest)
    return len(rows)


def _plain(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, pydicom.multival.MultiValue):
        return [_plain(v) for v in value]
    if isinstance(value, int | float):
        return value
    return str(value)
