"""From received bytes to a durable log record, then to an object and an index row.

Two halves, which may run in different processes:

:class:`Receiver` runs on the association's thread for each C-STORE:

1. put the file meta in front of the data set bytes (never re-encoded);
2. read the header from memory (:func:`imgindex.headers.read_header_bytes`); bytes that do
   not decode, or lack a required UID, are answered ``CANNOT_UNDERSTAND``, kept under
   ``ROOT/quarantine/`` and logged as a ``rejects`` row;
3. append the whole file, its object key and the calling AE title to the write-ahead log
   ``ROOT/wal/<receiver>/``, and wait for the group commit: one ``fdatasync`` covers every
   association waiting at that moment. Then answer success: acknowledged means durable.

Instances of ``INLINE_LIMIT`` bytes or more are instead written to a staging object under
``ROOT/objects/_incoming/`` and the log holds its name; one ``syncfs`` makes both durable.
Without sync every instance goes into the log: appending to an open file is cheaper than
creating one, and the indexer writes the objects after the acknowledgement.

:class:`LogIndexer` follows the logs: in log order it writes each logged instance to its
object under ``ROOT/objects/`` (no fsync per file) or moves the staged one into place,
makes the batch durable with one ``syncfs``, upserts its rows (one commit per table), and
deletes log segments once they are wholly indexed. It does the same for whatever a crash left, so start-up recovery is the normal path; upserts
keyed by SOPInstanceUID make re-indexing a record harmless, so a crash at any point loses
nothing acknowledged and duplicates nothing.

Why the log holds whole files, writing every byte twice: a sequential append and one
``fdatasync`` per group is the cheapest durable write there is (about 0.2 ms for a small
instance here), while making each object file durable before answering costs a ``syncfs``
or three fsyncs (file, folder, log), 2-3 ms per instance measured. Why two halves: the index
commits (Arrow, Delta, polars) hold the GIL for long stretches, and a receiving thread that
must win the GIL back after every system call then waits out the switch interval; in a
process of its own the indexer costs receivers nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from struct import Struct
from typing import TYPE_CHECKING, Any

from imgindex.extract import Extractor, reject_id
from imgindex.index import IndexWriter
from imgindex.listener.dimse import Status, file_meta
from imgindex.schema import DEFAULT_ATTRIBUTES
from storage.objects import LocalObjectStore
from storage.wal import WriteAheadLog, list_segments, scan_segment

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence

    from imgindex.listener.metrics import ListenerMetrics
    from imgindex.schema import Attribute

__all__ = ["Ingest", "LogIndexer", "Receiver", "StoreResult", "object_key"]

logger = logging.getLogger(__name__)

#: A UID that may become a path component: digits and dots, at most 64 characters (PS3.5 9).
_SAFE_UID = re.compile(r"^[0-9][0-9.]{0,63}$")
#: Record payload header: kind, received_at (µs since the epoch), lengths of the calling AE
#: title and of the object key; then the title, the key and the whole Part 10 file.
_RECORD = Struct("<cqHH")
#: Record kinds: an instance with its bytes, an instance the receiver wrote to a staging
#: object (the record holds the object key, then the staging key), reject rows as JSON.
_INSTANCE, _REFERENCE, _REJECTS = b"I", b"F", b"R"
#: Where receivers stage large instances. Only the indexer moves them into place, in log
#: order, so an object and its row always come from the same receipt, even when one
#: SOPInstanceUID arrives twice, once inline and once staged.
STAGING = "_incoming"
#: Instances this large are written once, to their object, and made durable by ``syncfs``;
#: smaller ones go into the log whole, where one ``fdatasync`` costs far less.
INLINE_LIMIT = 256 * 1024


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


class _Extractors:
    """One :class:`Extractor` per source (calling AE title)."""

    def __init__(self, attributes: Sequence[Attribute]) -> None:
        self.attributes = tuple(attributes)
        self._by_source: dict[str, Extractor] = {}

    def __call__(self, source: str) -> Extractor:
        extractor = self._by_source.get(source)
        if extractor is None:
            extractor = Extractor(self.attributes, source=source)
            self._by_source[source] = extractor
        return extractor


class Receiver:
    """The receiving half: validates an instance and makes it durable in the log.

    Parameters
    ----------
    root : str or Path
        The catalog root.
    attributes : sequence of Attribute
        The indexed attributes (the header is parsed to validate it).
    sync : bool
        Acknowledge only after ``fdatasync`` (``True``), or once the bytes are in the log
        file (``False``: survives a killed process, not a power cut).
    wal_name : str
        Sub-folder of ``ROOT/wal``; one per receiving process.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        attributes: Sequence[Attribute] = DEFAULT_ATTRIBUTES,
        sync: bool = True,
        wal_name: str = "listener-0",
    ) -> None:
        self.root = Path(root).absolute()
        self.sync = sync
        self.wal_name = wal_name
        self.quarantine = LocalObjectStore(self.root / "quarantine")
        self.objects = LocalObjectStore(self.root / "objects")
        wal = self.root / "wal" / wal_name
        wal.mkdir(parents=True, exist_ok=True)
        self._same_fs = os.stat(wal).st_dev == os.stat(self.objects.root).st_dev
        self._unsynced_objects = False
        self.wal = WriteAheadLog(wal, sync=sync, segment_bytes=64 << 20, syncer=self._sync)
        self._extractors = _Extractors(attributes)

    def _sync(self, fd: int) -> None:
        """The group commit: ``fdatasync`` of the log, or one ``syncfs`` when objects were
        written since the last sync (it covers them, their folders and the log together)."""
        if self._unsynced_objects:
            self._unsynced_objects = False
            try:
                self.objects.sync()
            except OSError:
                self._unsynced_objects = True
                raise
            if self._same_fs:
                return
        os.fdatasync(fd)

    def close(self) -> None:
        """Close the log; its last segment is then complete, so the indexer can finish it."""
        self.wal.rotate()
        self.wal.close()

    def store(
        self,
        calling_aet: str,
        sop_class: str,
        sop_instance: str,
        transfer_syntax: str,
        dataset: bytes | Sequence[bytes | memoryview],
    ) -> StoreResult:
        """Make one received instance durable; never raises.

        ``dataset`` is the data set as received: bytes, or the fragments as they arrived
        (joined here, behind the file meta, in one copy).
        """
        received_at = dt.datetime.now(dt.UTC)
        try:
            meta = file_meta(sop_class, sop_instance, transfer_syntax, calling_aet)
            parts = [dataset] if isinstance(dataset, bytes) else dataset
            data = b"".join([meta, *parts])
            extraction = self._extractors(calling_aet).extract_bytes(
                data, location="", indexed_at=received_at
            )
        except Exception as exc:  # a bug must not kill the association
            logger.exception("cannot parse an instance from %s", calling_aet)
            return StoreResult(Status.PROCESSING_FAILURE, "processing", f"{exc}")
        row = extraction.row
        if row is None:
            return self._reject(extraction.rejects, data, received_at, sop_instance)
        key = object_key(row["StudyInstanceUID"], row["SeriesInstanceUID"], row["SOPInstanceUID"])
        if row.get("SOPClassUID") and row["SOPClassUID"] != sop_class:
            logger.warning(
                "%s: SOPClassUID %s in the data set, %s in the C-STORE request",
                row["SOPInstanceUID"],
                row["SOPClassUID"],
                sop_class,
            )
        aet = calling_aet.encode()
        kind = _INSTANCE if not self.sync or len(data) < INLINE_LIMIT else _REFERENCE
        header = _RECORD.pack(kind, _micros(received_at), len(aet), len(key))
        try:
            if kind == _INSTANCE:
                lsn = self.wal.append([header, aet, key.encode(), data])
            else:
                staged = f"{STAGING}/{self.wal_name}/{uuid.uuid4().hex}.dcm"
                # Flag before the append: the sync that covers the record sees the flag.
                self.objects.put(staged, data, sync=False)
                self._unsynced_objects = True
                lsn = self.wal.append([header, aet, key.encode(), staged.encode()])
        except OSError as exc:
            return _out_of_resources(exc)
        try:
            self.wal.wait_durable(lsn)
        except OSError as exc:
            return _out_of_resources(exc)
        finally:
            self.wal.settle(lsn)
        return StoreResult(Status.SUCCESS)

    def _reject(
        self,
        rejects: list[dict[str, Any]],
        data: bytes,
        received_at: dt.datetime,
        sop_instance: str,
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
            reject["reject_id"] = reject_id(
                location, reject["level"], reject["reason"], reject["keyword"]
            )
            reject["SOPInstanceUID"] = reject["SOPInstanceUID"] or sop_instance or None
        payload = json.dumps(rejects, default=str).encode()
        try:
            # Not acknowledged, so not waited for: the next group commit carries it.
            self.wal.settle(self.wal.append([_RECORD.pack(_REJECTS, 0, 0, 0), payload]))
        except OSError as exc:
            logger.warning("cannot log a reject: %s", exc)
        logger.info("rejected an instance from %s: %s", first["source"], first["message"])
        return StoreResult(Status.CANNOT_UNDERSTAND, first["reason"], first["message"])


class LogIndexer:
    """The indexing half: follows the logs under ``ROOT/wal`` and indexes what they hold.

    Parameters
    ----------
    root : str or Path
        The catalog root.
    attributes : sequence of Attribute
        The indexed attributes.
    sync : bool
        ``syncfs`` the objects of a batch before its log segments may be deleted.
    live : collection of str
        Log folders a receiver is appending to now: their newest segment may still grow.
        Every segment of other folders is complete.
    metrics : ListenerMetrics, optional
        Where to report the backlog.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        attributes: Sequence[Attribute] = DEFAULT_ATTRIBUTES,
        sync: bool = True,
        live: Collection[str] = (),
        metrics: ListenerMetrics | None = None,
    ) -> None:
        self.root = Path(root).absolute()
        self.sync = sync
        self.live = set(live)
        self.metrics = metrics
        self.objects = LocalObjectStore(self.root / "objects")
        self.writer = IndexWriter(self.root, attributes)
        self._extractors = _Extractors(attributes)
        self._offsets: dict[Path, int] = {}
        self._prefix = self.objects.root.as_uri() + "/"

    def _segments(self) -> list[tuple[Path, bool]]:
        """Every segment with whether it is complete, oldest first per folder."""
        found: list[tuple[Path, bool]] = []
        wal = self.root / "wal"
        if not wal.is_dir():
            return found
        for folder in sorted(p for p in wal.iterdir() if p.is_dir()):
            segments = list_segments(folder)
            for i, (_number, path) in enumerate(segments):
                complete = folder.name not in self.live or i < len(segments) - 1
                found.append((path, complete))
        return found

    def backlog_bytes(self) -> int:
        """Bytes logged but not yet indexed."""
        total = 0
        for path, _complete in self._segments():
            try:
                total += path.stat().st_size - self._offsets.get(path, 0)
            except FileNotFoundError:
                continue
        return total

    def run_once(self, max_bytes: int = 256 << 20) -> int:
        """Index what the logs hold now (up to about ``max_bytes``); returns the instances
        indexed. Safe to call again after a failure: nothing is deleted before its commit."""
        rows: list[dict[str, Any]] = []
        rejects: list[dict[str, Any]] = []
        done: list[Path] = []
        advanced: dict[Path, int] = {}
        budget = max_bytes
        objects = 0
        for path, complete in self._segments():
            if budget <= 0:
                break
            offset = self._offsets.get(path, 0)
            try:
                records, end = scan_segment(path, offset)
            except FileNotFoundError:
                continue
            for record in records:
                payload = record.payload
                kind, received_us, aet_length, key_length = _RECORD.unpack_from(payload)
                start = _RECORD.size
                if kind == _REJECTS:
                    rejects.extend(json.loads(payload[start:]))
                    continue
                aet = payload[start : start + aet_length].decode()
                start += aet_length
                key = payload[start : start + key_length].decode()
                received_at = dt.datetime.fromtimestamp(received_us / 1e6, dt.UTC)
                location = self._prefix + key
                if kind == _REFERENCE:
                    # The receiver staged the object and synced it before acknowledging.
                    stored = self.objects.path(key)
                    staged = payload[start + key_length :].decode()
                    if staged and self.objects.exists(staged):
                        os.replace(self.objects.path(staged), _parent_made(stored))
                        objects += 1
                    elif not stored.is_file():
                        # Cut by a crash before the sync, so never acknowledged. (A staged
                        # object that is gone was moved into place by an earlier pass.)
                        logger.warning("logged object %s is missing (never acknowledged)", key)
                        continue
                    extraction = self._extractors(aet).extract_file(
                        stored, location=location, indexed_at=received_at
                    )
                else:
                    data = payload[start + key_length :]
                    self.objects.put(key, data, sync=False)
                    objects += 1
                    budget -= len(data)
                    extraction = self._extractors(aet).extract_bytes(
                        data, location=location, indexed_at=received_at
                    )
                if extraction.row is None:  # the receiver parsed it: only if the code changed
                    logger.error("logged instance %s does not parse: %s", key, extraction.rejects)
                    continue
                rows.append(extraction.row)
                rejects.extend(extraction.rejects)
            advanced[path] = end
            if complete:
                done.append(path)
        if objects and self.sync:
            self.objects.sync()
        if rows or rejects:
            for reject in rejects:
                if isinstance(reject.get("indexed_at"), str):
                    reject["indexed_at"] = dt.datetime.fromisoformat(reject["indexed_at"])
            self.writer.write(rows, rejects)
        self._offsets.update(advanced)
        for path in done:
            if path in advanced:
                path.unlink(missing_ok=True)
                self._offsets.pop(path, None)
        if self.metrics is not None:
            self.metrics.pending_bytes.set(self.backlog_bytes())
        return len(rows)

    def run(self, stop: threading.Event, interval: float = 1.0) -> None:
        """Index every ``interval`` seconds until ``stop`` is set, then once more."""
        backoff = interval
        while not stop.wait(backoff):
            try:
                started = time.monotonic()
                n = self.run_once()
                backoff = interval
                if n:
                    logger.debug("indexed %d instances in %.2f s", n, time.monotonic() - started)
            except Exception:
                # Nothing was deleted: the same records are indexed on the next try.
                backoff = min(30.0, backoff * 2)
                logger.exception("indexing failed; retrying in %.0f s", backoff)

    def drain(self) -> int:
        """Index everything, every segment taken as complete (no receiver is running)."""
        self.live = set()
        total = 0
        while n := self.run_once():
            total += n
        # A last pass deletes segments that held nothing more.
        self.run_once()
        self._sweep_staging()
        return total

    def _sweep_staging(self) -> None:
        """Delete staged objects no log refers to any more: left by a receiver that died
        between staging and logging, so never acknowledged."""
        if self.backlog_bytes():
            return  # a segment that could not be indexed may still refer to them
        staging = self.objects.root / STAGING
        for stray in self.objects.iter_keys(STAGING + "/"):
            logger.warning("deleting %s: staged but never acknowledged", stray)
            self.objects.delete(stray)
        if staging.is_dir():
            for folder in [*sorted(staging.glob("*"), reverse=True), staging]:
                with contextlib.suppress(OSError):
                    folder.rmdir()


class Ingest:
    """Receiver and indexer in one process, the indexer on a thread: for tests, the demo and
    embedding. ``imgindex listen`` runs receivers in processes of their own.

    Parameters are those of :class:`Receiver` and :class:`LogIndexer`; ``flush_interval`` is
    the seconds between index commits.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        attributes: Sequence[Attribute] = DEFAULT_ATTRIBUTES,
        sync: bool = True,
        flush_interval: float = 1.0,
        wal_name: str = "listener-0",
        metrics: ListenerMetrics | None = None,
    ) -> None:
        self.root = root
        self.attributes = attributes
        self.sync = sync
        self.wal_name = wal_name
        self.indexer = LogIndexer(root, attributes=attributes, sync=sync, metrics=metrics)
        self.flush_interval = flush_interval
        self._receiver: Receiver | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Index what earlier runs left in the logs, then open this receiver's log and follow
        it on a thread; returns the number of instances recovered."""
        # Before the receiver opens its log: every segment there now is complete.
        recovered = self.indexer.drain()
        if recovered:
            logger.warning("recovered %d logged instances into the index", recovered)
        self._receiver = Receiver(
            self.root, attributes=self.attributes, sync=self.sync, wal_name=self.wal_name
        )
        self.indexer.live = {self.wal_name}
        self._thread = threading.Thread(
            target=self.indexer.run,
            args=(self._stop, self.flush_interval),
            name="indexer",
            daemon=True,  # what it has not indexed is in the log, for the next start
        )
        self._thread.start()
        return recovered

    def store(
        self,
        calling_aet: str,
        sop_class: str,
        sop_instance: str,
        transfer_syntax: str,
        dataset: bytes | Sequence[bytes | memoryview],
    ) -> StoreResult:
        """See :meth:`Receiver.store`."""
        if self._receiver is None:
            raise RuntimeError("Ingest.start() first")
        return self._receiver.store(calling_aet, sop_class, sop_instance, transfer_syntax, dataset)

    def close(self) -> None:
        """Close the log, index everything in it, stop."""
        if self._receiver is not None:
            self._receiver.close()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.indexer.drain()


def _parent_made(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _out_of_resources(exc: OSError) -> StoreResult:
    logger.error("cannot make an instance durable (answering out of resources): %s", exc)
    return StoreResult(Status.OUT_OF_RESOURCES, "out_of_resources", str(exc))


def _micros(when: dt.datetime) -> int:
    return int(when.timestamp() * 1_000_000)
