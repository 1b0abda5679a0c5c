"""Convert one fetched series into Zarr arrays: decode, assemble, de-identify, write.

This runs in the export's worker processes (or Dask workers), so everything it takes and
returns pickles, and nothing large travels back: the arrays are written here.

A series is written only when every instance the index expects was fetched; the arrays
appear in the store atomically (:meth:`storage.ArrayStore.write`), so a killed export never
leaves one that looks complete. Data problems (a missing slice, an undecodable frame) are
returned as a ``failed`` :class:`Converted` with the reason; only faults worth retrying raise.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from imgindex.deid import Deidentifier, ProfileOptions
from imgindex.export.volume import VolumeError, assemble, decode_instance
from storage import ArrayStore
from storage.arrays import DEFAULT_COMPRESSOR

if TYPE_CHECKING:
    from imgindex.export.fetch import Fetched
    from imgindex.export.volume import Frame, Volume

__all__ = [
    "ConvertOptions",
    "Converted",
    "array_key",
    "convert_series",
    "incomplete_fetch",
    "write_series",
]

#: Version of the array attributes' layout (docs/export.md).
EXPORT_FORMAT: Final = 1
_SHOWN_MISSING: Final = 3


@dataclass(frozen=True)
class ConvertOptions:
    """How to write a series: where, in which format (``zarr`` arrays or ``dicom`` files),
    compressed and chunked how, de-identified with which key and options."""

    store: str
    deid_key: bytes = field(repr=False)
    format: str = "zarr"
    deid_options: ProfileOptions = field(default_factory=ProfileOptions)
    deid_enabled: bool = True
    compressor: str = DEFAULT_COMPRESSOR
    chunks: tuple[int, ...] | None = None
    shard_bytes: int = 256 * 2**20
    split: bool = False
    cohort_sha256: str | None = None
    index_version: int | None = None

    def deidentifier(self) -> Deidentifier:
        """The export's :class:`~imgindex.deid.Deidentifier`, made again in a worker."""
        return Deidentifier(self.deid_key, self.deid_options, enabled=self.deid_enabled)


@dataclass
class Converted:
    """What became of one series (a row of the ``transfers`` ledger)."""

    series_uid: str
    outcome: str
    reason: str | None = None
    message: str | None = None
    arrays: list[str] = field(default_factory=list)
    expected: int = 0
    fetched: int = 0
    written: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


def array_key(deid: Deidentifier, series_uid: str) -> str:
    """The array key of a series: its pseudonymous source id."""
    return deid.token("SeriesInstanceUID", series_uid)


_STORES: dict[str, ArrayStore] = {}
_STORES_LOCK = threading.Lock()


def _store(path: str) -> ArrayStore:
    with _STORES_LOCK:
        store = _STORES.get(path)
        if store is None:
            store = _STORES[path] = ArrayStore(path)
        return store


def write_series(fetched: Fetched, options: ConvertOptions) -> Converted:
    """The export's write stage: :func:`convert_series` for Zarr, or
    :func:`imgindex.export.dicom.write_dicom_series` for ``--format dicom``."""
    if options.format == "dicom":
        from imgindex.export.dicom import write_dicom_series

        return write_dicom_series(fetched, options)
    return convert_series(fetched, options)


def incomplete_fetch(result: Converted, fetched: Fetched) -> Converted:
    """``result`` failed as ``incomplete_fetch``, naming the first instances missing."""
    shown = "; ".join(f"{uid}: {why}" for uid, why in fetched.missing[:_SHOWN_MISSING])
    more = len(fetched.missing) - _SHOWN_MISSING
    result.reason = "incomplete_fetch"
    result.message = (
        f"{len(fetched.missing)} of {result.expected} instances could not be fetched "
        f"({shown}{f'; and {more} more' if more > 0 else ''})"
    )
    return result


def convert_series(fetched: Fetched, options: ConvertOptions) -> Converted:
    """Decode, assemble and write ``fetched`` (see the module docstring)."""
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
    frames: list[Frame] = []
    no_pixels = 0
    for position, (uid, source) in enumerate(fetched.sources):
        try:
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
        except OSError as exc:
            result.fetched -= 1
            result.reason = "incomplete_fetch"
            result.message = f"instance {uid} cannot be read: {exc}"
            return result
        try:
            frames.extend(decode_instance(data))
        except VolumeError as exc:
            if exc.reason == "no_pixel_data":
                no_pixels += 1
                continue
            result.reason = exc.reason
            result.message = f"instance {position + 1} of {result.expected} ({uid}): {exc}"
            return result
        del data
    if no_pixels:
        if no_pixels == len(fetched.sources):
            result.outcome = "skipped"
            result.reason = "no_pixel_data"
            result.message = "no instance of the series has pixel data (not an image series)"
        else:
            result.reason = "no_pixel_data"
            result.message = f"{no_pixels} of {result.expected} instances have no pixel data"
        return result
    try:
        volumes = assemble(frames, split=options.split)
    except VolumeError as exc:
        result.reason = exc.reason
        result.message = str(exc)
        return result
    del frames
    return _write(volumes, fetched, options, result)


def _write(
    volumes: list[Volume],
    fetched: Fetched,
    options: ConvertOptions,
    result: Converted,
) -> Converted:
    job = fetched.job
    series_uid = job.series_uid
    deid = options.deidentifier()
    store = _store(options.store)
    base_key = array_key(deid, series_uid)
    written: set[str] = set()
    for number, volume in enumerate(volumes, start=1):
        key = base_key if len(volumes) == 1 else f"{base_key}-{number}"
        attributes = deid.attributes(
            {
                **job.attributes,
                **job.labels,
                "PatientID": job.patient_id,
                "StudyInstanceUID": job.study_uid,
                "SeriesInstanceUID": series_uid,
                "spacing": _plain(volume.spacing),
                "origin": _plain(volume.origin),
                "direction": _plain(volume.direction),
                "geometry": volume.geometry,
                "PhotometricInterpretation": volume.photometric,
                "PixelSpacing": _plain(volume.pixel_spacing),
                "RescaleSlope": volume.rescale_slope,
                "RescaleIntercept": volume.rescale_intercept,
                "instances": volume.instances,
                "slices": int(volume.pixels.shape[0]),
                "stack": number if len(volumes) > 1 else None,
                "cohort_sha256": options.cohort_sha256,
                "index_version": options.index_version,
                "export_format": EXPORT_FORMAT,
            }
        )
        info = store.write(
            key,
            volume.pixels,
            chunks=options.chunks,
            shard_bytes=options.shard_bytes,
            compressor=options.compressor,
            attributes=attributes,
        )
        result.arrays.append(key)
        result.bytes_out += info.stored_bytes
        written.update(volume.sop_instance_uids)
    result.written = len(written)
    if result.written != result.expected or result.fetched != result.expected:
        for key in result.arrays:
            store.delete(key)
        result.reason = "incomplete_write"
        result.message = (
            f"expected {result.expected} instances, fetched {result.fetched}, "
            f"wrote {result.written}: the arrays were removed"
        )
        result.arrays = []
        result.bytes_out = 0
        return result
    result.outcome = "complete"
    return result


def _plain(value: Any) -> Any:
    """Tuples (and nested tuples) as lists, for JSON attributes."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value
