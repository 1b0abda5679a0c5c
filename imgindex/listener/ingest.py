"""From received bytes to a durable object and an index row: the listener's storage pipeline.

:meth:`Ingest.store` runs on the association's thread for each C-STORE:

1. put the file meta in front of the data set bytes (never re-encoded);
2. read the header from memory (:func:`imgindex.headers.read_header_bytes`); bytes that do
   not decode, or lack a required UID, are answered ``CANNOT_UNDERSTAND`` and kept under
   ``ROOT/quarantine/`` with a ``rejects`` row;
3. write the object to its final place under ``ROOT/objects/`` (no fsync), and append a
   small record (key, calling AE, time) to the write-ahead log;
4. wait for the group commit: one ``syncfs`` makes the objects and log records of every
   waiting association durable together; then answer success. Acknowledged means durable.

A flusher thread upserts the rows of acknowledged instances (kept in memory) in one commit
per table every ``flush_interval`` and then checkpoints the log. On start, what the log still
holds is replayed from the stored objects; upserts keyed by SOPInstanceUID make a replay
idempotent, so a crash at any point loses nothing acknowledged and duplicates nothing.

Objects are written once: the log carries keys, not bytes, so the disk sees each instance
once (a log of whole instances would write every byte twice).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from struct import Struct
from typing import TYPE_CHECKING, Any

from imgindex.extract import Extractor
from imgindex.index import IndexWriter
from imgindex.listener.dimse import Status, file_meta
from imgindex.schema import DEFAULT_ATTRIBUTES
from storage.errors import ObjectNotFoundError
from storage.objects import LocalObjectStore
from storage.wal import WriteAheadLog

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from imgindex.listener.metrics import ListenerMetrics
    from imgindex.schema import Attribute

__all__ = ["Ingest", "StoreResult", "object_key"]

logger = logging.getLogger(__name__)

#: A UID that may become a path component: digits and dots, at most 64 characters (PS3.5 9).
_SAFE_UID = re.compile(r"^[0-9][0-9.]{0,63}$")
#: Record payload header: received_at (µs since the epoch), length of the calling AE title.
_RECORD = Struct("<qH")


def object_key(study: str, series: str, sop_instance: str) -> str:
    """The object store key of an instance.

    ``<study>/<series>/<sop>.dcm`` when all three UIDs are safe as path components (digits
    and dots, at most 64 characters, no empty or ``.``-only part); otherwise
    ``_unsafe/<digest>.dcm``, so that no UID a sender chooses can name a path outside the
    store.
    """
    uids = (study, series, sop_instance)
    if all(_SAFE_UID.match(u) and ".." not in u and not u.endswith(".") for u in uids):
        return f"{study}/{series}/{sop_instance}.dcm"
    digest = hashlib.blake2b("\\".join(uids).encode(), digest_size=20).hexdigest()
    return f"_unsafe/{digest}.dcm"


@dataclass(frozen=True)
class StoreResult:
    """The answer to one C-STORE: its status and, on failure, a short reason."""

    status: Status
    reason: str | None = None
    message: str | None = None


@dataclass
class _Pending:
    """Acknowledged (durable in the log) but not yet in the object store and the index."""

    lsn: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    nbytes: int = 0


class Ingest:
    """The listener's storage pipeline for one catalog root.

    Parameters
    ----------
    root : str or Path
        The catalog root: ``objects/``, ``quarantine/``, ``wal/<name>/`` and the tables.
    attributes : sequence of Attribute
        The indexed attributes.
    sync : bool
        Acknowledge only after fsync (``True``), or once the bytes are in the log file
        (``False``: survives a killed process, not a power cut).
    flush_interval : float
        Seconds between index commits; rows become visible within about this long.
    max_pending_bytes : int
        Received bytes waiting for the flusher beyond which receivers wait (back-pressure).
    wal_name : str
        Sub-folder of ``ROOT/wal`` (one per receiving process).
    metrics : ListenerMetrics, optional
        Where to count.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        attributes: Sequence[Attribute] = DEFAULT_ATTRIBUTES,
        sync: bool = True,
        flush_interval: float = 1.0,
        max_pending_bytes: int = 1 << 30,
        wal_name: str = "listener-0",
        metrics: ListenerMetrics | None = None,
    ) -> None:
        self.root = Path(root).absolute()
        self.attributes = tuple(attributes)
        self.sync = sync
        self.flush_interval = flush_interval
        self.max_pending_bytes = max_pending_bytes
        self.metrics = metrics
        self.objects = LocalObjectStore(self.root / "objects")
        self.quarantine = LocalObjectStore(self.root / "quarantine")
        wal_dir = self.root / "wal" / wal_name
        wal_dir.mkdir(parents=True, exist_ok=True)
        same_fs = os.stat(wal_dir).st_dev == os.stat(self.objects.root).st_dev
        self.wal = WriteAheadLog(
            wal_dir, sync=sync, segment_bytes=4 << 20, syncer=self._syncer(same_fs)
        )
        self.writer = IndexWriter(self.root, self.attributes)
        self._extractors: dict[str, Extractor] = {}
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._pending = _Pending()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self._objects_prefix = self.objects.root.as_uri() + "/"
        self._flushed_lsn = 0

    def _syncer(self, same_fs: bool) -> Callable[[int], None]:
        def sync_objects_and_log(fd: int) -> None:
            # One syncfs covers the objects written since the last one, their folders, and
            # the log records naming them.
            self.objects.sync()
            if not same_fs:
                os.fdatasync(fd)

        return sync_objects_and_log

    # -- start and stop ---------------------------------------------------------------------

    def start(self) -> int:
        """Replay what the log holds from an earlier run, then start the flusher.

        Returns the number of records replayed.
        """
        replayed = self._replay()
        self._flusher = threading.Thread(target=self._run_flusher, name="flusher", daemon=True)
        self._flusher.start()
        return replayed

    def close(self) -> None:
        """Flush everything acknowledged, stop the flusher and close the log."""
        self._stop.set()
        self._wake.set()
        if self._flusher is not None:
            self._flusher.join()
        self._flush()
        # Everything is in the index now: leave an empty log, so the next start replays nothing.
        self.wal.rotate()
        self.wal.checkpoint(self._flushed_lsn)
        self.wal.close()

    @property
    def pending_bytes(self) -> int:
        """Bytes acknowledged but not yet in the object store and index."""
        return self._pending.nbytes

    # -- the receive path --------------------------------------------------------------------

    def store(
        self,
        calling_aet: str,
        sop_class: str,
        sop_instance: str,
        transfer_syntax: str,
        dataset: bytes,
    ) -> StoreResult:
        """Make one received instance durable and queue it for indexing; never raises."""
        received_at = dt.datetime.now(dt.UTC)
        try:
            data = file_meta(sop_class, sop_instance, transfer_syntax, calling_aet) + dataset
            extraction = self._extractor(calling_aet).extract_bytes(
                data, location="", indexed_at=received_at
            )
        except Exception as exc:  # a bug must not kill the association
            logger.exception("cannot parse an instance from %s", calling_aet)
            return StoreResult(Status.PROCESSING_FAILURE, "processing", f"{exc}")
        row = extraction.row
        if row is None:
            return self._reject(extraction.rejects, data, received_at)
        key = object_key(row["StudyInstanceUID"], row["SeriesInstanceUID"], row["SOPInstanceUID"])
        self._place(row, extraction.rejects, key)
        if row.get("SOPClassUID") and row["SOPClassUID"] != sop_class:
            logger.warning(
                "%s: SOPClassUID %s in the data set, %s in the C-STORE request",
                row["SOPInstanceUID"],
                row["SOPClassUID"],
                sop_class,
            )
        aet = calling_aet.encode()
        try:
            self.objects.put(key, data, sync=False)
            lsn = self.wal.append([_RECORD.pack(_micros(received_at), len(aet)), aet, key.encode()])
        except OSError as exc:
            return self._out_of_resources(exc)
        try:
            self.wal.wait_durable(lsn)
        except OSError as exc:
            self.wal.settle(lsn)
            return self._out_of_resources(exc)
        self._queue(lsn, len(data), [row], extraction.rejects)
        self.wal.settle(lsn)
        return StoreResult(Status.SUCCESS)

    def _out_of_resources(self, exc: OSError) -> StoreResult:
        logger.error("cannot make an instance durable (answering out of resources): %s", exc)
        return StoreResult(Status.OUT_OF_RESOURCES, "out_of_resources", str(exc))

    def _extractor(self, source: str) -> Extractor:
        extractor = self._extractors.get(source)
        if extractor is None:
            extractor = Extractor(self.attributes, source=source)
            self._extractors[source] = extractor
        return extractor

    def _place(self, row: dict[str, Any], rejects: list[dict[str, Any]], key: str) -> None:
        location = self._objects_prefix + key
        row["location"] = location
        for reject in rejects:
            reject["location"] = location

    def _reject(
        self, rejects: list[dict[str, Any]], data: bytes, received_at: dt.datetime
    ) -> StoreResult:
        first = rejects[0]
        digest = hashlib.blake2b(data, digest_size=20).hexdigest()
        key = f"{received_at:%Y%m%d}/{digest}.dcm"
        try:
            # Kept for whoever investigates; never acknowledged, so no fsync.
            self.quarantine.put(key, data, sync=False)
            location = self.quarantine.uri(key)
        except OSError as exc:
            logger.warning("cannot quarantine a rejected instance: %s", exc)
            location = "quarantine:not-written"
        for reject in rejects:
            reject["location"] = location
        with self._lock:
            self._pending.rejects.extend(rejects)
        logger.info("rejected an instance from %s: %s", first["source"], first["message"])
        return StoreResult(Status.CANNOT_UNDERSTAND, first["reason"], first["message"])

    def _queue(
        self, lsn: int, nbytes: int, rows: list[dict[str, Any]], rejects: list[dict[str, Any]]
    ) -> None:
        with self._drained:
            while self._pending.nbytes >= self.max_pending_bytes and not self._stop.is_set():
                self._wake.set()
                self._drained.wait(timeout=1.0)
            pending = self._pending
            pending.lsn = max(pending.lsn, lsn)
            pending.rows.extend(rows)
            pending.rejects.extend(rejects)
            pending.nbytes += nbytes
            if self.metrics is not None:
                self.metrics.pending_bytes.set(pending.nbytes)

    # -- the flusher -------------------------------------------------------------------------

    def _run_flusher(self) -> None:
        backoff = self.flush_interval
        while not self._stop.is_set():
            self._wake.wait(timeout=backoff)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._flush()
                backoff = self.flush_interval
            except Exception:
                # The batch stays in memory and its records in the log; try again, less often.
                backoff = min(30.0, backoff * 2)
                logger.exception("flush failed; retrying in %.0f s", backoff)

    def _flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, _Pending()
        if batch.rows or batch.rejects:
            try:
                self._write(batch.rows, batch.rejects)
            except BaseException:
                with self._drained:
                    self._pending = _merge(batch, self._pending)
                raise
        if batch.lsn:
            self._flushed_lsn = batch.lsn
            self.wal.rotate(min_bytes=1 << 20)
            self.wal.checkpoint(batch.lsn)
        with self._drained:
            self._drained.notify_all()
            if self.metrics is not None:
                self.metrics.pending_bytes.set(self._pending.nbytes)

    def _write(self, rows: list[dict[str, Any]], rejects: list[dict[str, Any]]) -> None:
        started = time.perf_counter()
        self.writer.write(rows, rejects)
        logger.debug(
            "indexed %d rows, %d rejects in %.2f s",
            len(rows),
            len(rejects),
            time.perf_counter() - started,
        )

    # -- replay ------------------------------------------------------------------------------

    def _replay(self, batch_rows: int = 5000) -> int:
        batch = _Pending()
        replayed = 0
        missing = 0
        for record in self.wal.replay():
            received_us, aet_length = _RECORD.unpack_from(record.payload)
            start = _RECORD.size
            aet = record.payload[start : start + aet_length].decode()
            key = record.payload[start + aet_length :].decode()
            batch.lsn = record.lsn
            try:
                data = self.objects.get(key)
            except ObjectNotFoundError:
                # Its group commit never returned (the object and the record are made
                # durable by the same sync), so it was never acknowledged.
                missing += 1
                continue
            received_at = dt.datetime.fromtimestamp(received_us / 1e6, dt.UTC)
            extraction = self._extractor(aet).extract_bytes(
                data, location="", indexed_at=received_at
            )
            if extraction.row is None:
                logger.error("stored object %s no longer parses: %s", key, extraction.rejects)
                continue
            self._place(extraction.row, extraction.rejects, key)
            batch.rows.append(extraction.row)
            batch.rejects.extend(extraction.rejects)
            replayed += 1
            if len(batch.rows) >= batch_rows:
                self._write(batch.rows, batch.rejects)
                batch = _Pending(lsn=batch.lsn)
        if batch.rows or batch.rejects:
            self._write(batch.rows, batch.rejects)
        if batch.lsn:
            self.wal.checkpoint(batch.lsn)
        if replayed or missing:
            logger.warning(
                "replayed %d instances from the write-ahead log in %s (%d records named "
                "objects a crash had cut before they were acknowledged)",
                replayed,
                self.wal.folder,
                missing,
            )
        return replayed


def _merge(first: _Pending, second: _Pending) -> _Pending:
    return _Pending(
        max(first.lsn, second.lsn),
        first.rows + second.rows,
        first.rejects + second.rejects,
        first.nbytes + second.nbytes,
    )


def _micros(when: dt.datetime) -> int:
    return int(when.timestamp() * 1_000_000)
