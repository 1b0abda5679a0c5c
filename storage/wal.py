"""A write-ahead log of byte records, with group commit.

Writers :meth:`~WriteAheadLog.append` a record and then :meth:`~WriteAheadLog.wait_durable`
for it. One of the waiting threads calls ``fdatasync`` for everything appended so far while
the others wait for it, so concurrent writers share the cost of one sync (group commit).
Records are never rewritten: a log is a folder of numbered segment files, and a segment is
deleted once :meth:`~WriteAheadLog.checkpoint` says all its records are safe elsewhere.

On disk a record is a 24-byte header (magic, payload length, sequence number, CRC-32 of the
payload) followed by the payload. :func:`read_segment` stops at the first record that is
short or fails its check: that is the tail a crash cut, which was never acknowledged
because its sync had not returned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from struct import Struct
from typing import TYPE_CHECKING

from storage.errors import StorageError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

__all__ = ["Record", "WriteAheadLog", "list_segments", "read_segment", "scan_segment"]

logger = logging.getLogger(__name__)

_HEADER = Struct("<4sIQQ")
_MAGIC = b"IWL1"
_SEGMENT = re.compile(r"^(\d{12})\.wal$")


@dataclass(frozen=True)
class Record:
    """One record read back from a log: its sequence number and payload."""

    lsn: int
    payload: bytes


def _segment_name(number: int) -> str:
    return f"{number:012d}.wal"


def read_segment(path: str | os.PathLike[str]) -> Iterator[Record]:
    """The intact records of one segment file, in order, up to the first damaged one."""
    records, end = scan_segment(path)
    size = Path(path).stat().st_size
    if end != size:
        logger.warning(
            "%s: %d bytes after the last intact record (a write cut short)", path, size - end
        )
    yield from records


def scan_segment(path: str | os.PathLike[str], offset: int = 0) -> tuple[list[Record], int]:
    """The intact records from byte ``offset`` of a segment, and the offset after the last.

    For a reader that follows a log another process is appending to: call again from the
    returned offset. A record still being written is not intact yet; it is read next time.
    """
    with open(path, "rb") as fp:
        fp.seek(offset)
        data = fp.read()
    records = []
    pos = 0
    while pos + _HEADER.size <= len(data):
        magic, length, lsn, crc = _HEADER.unpack_from(data, pos)
        start = pos + _HEADER.size
        end = start + length
        if magic != _MAGIC or end > len(data):
            break
        payload = data[start:end]
        if zlib.crc32(payload) != crc:
            break
        records.append(Record(lsn, payload))
        pos = end
    return records, offset + pos


def list_segments(folder: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """The segment files of a log folder, oldest first (empty if there is no folder)."""
    found = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    for entry in entries:
        match = _SEGMENT.match(entry.name)
        if match:
            found.append((int(match.group(1)), Path(entry.path)))
    return sorted(found)


class WriteAheadLog:
    """Append-only, segmented, group-committed log in a folder.

    Parameters
    ----------
    folder : str or Path
        Where the segments live (created if missing). One log per folder and process.
    sync : bool
        ``False`` skips ``fdatasync``: records then survive a killed process (they are in
        the OS page cache) but not a power cut or OS crash.
    segment_bytes : int
        A segment is closed and a new one started once it holds this many bytes.
    syncer : callable, optional
        What a group commit calls instead of ``fdatasync(segment)``, given the segment's file
        descriptor: e.g. one ``syncfs`` that also makes files the records point to durable.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        sync: bool = True,
        segment_bytes: int = 64 << 20,
        syncer: Callable[[int], None] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.sync = sync
        self._syncer = syncer or os.fdatasync
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._synced = threading.Condition(self._lock)
        self._syncing = False
        self._fd = -1
        self._size = 0
        existing = self.segments()
        self._number = (existing[-1][0] + 1) if existing else 1
        #: The highest lsn of each segment that holds records, by segment number.
        self._last_lsn: dict[int, int] = {}
        for number, path in existing:
            last = _last_lsn(path)
            if last is not None:
                self._last_lsn[number] = last
        self._next_lsn = max(self._last_lsn.values(), default=0) + 1
        self._appended_lsn = self._next_lsn - 1
        self._durable_lsn = self._appended_lsn
        #: Appended records their writer has not yet settled; checkpoints stop before them.
        self._outstanding: set[int] = set()
        self._open_segment()

    def __repr__(self) -> str:
        return f"WriteAheadLog({str(self.folder)!r}, sync={self.sync})"

    def segments(self) -> list[tuple[int, Path]]:
        """The segment files in the folder, oldest first."""
        return list_segments(self.folder)

    def replay(self) -> Iterator[Record]:
        """Every intact record of every segment that existed before this log was opened."""
        for number, path in self.segments():
            if number < self._number:
                yield from read_segment(path)

    def append(self, chunks: Sequence[bytes]) -> int:
        """Append one record made of ``chunks``; returns its sequence number (lsn).

        The record is durable only once :meth:`wait_durable` returns for it. On an ``OSError``
        (disk full, say) nothing of the record stays in the log, and the error is raised.
        """
        length = sum(len(c) for c in chunks)
        crc = 0
        for chunk in chunks:
            crc = zlib.crc32(chunk, crc)
        with self._lock:
            if self._fd < 0:
                self._open_segment()
            lsn = self._next_lsn
            header = _HEADER.pack(_MAGIC, length, lsn, crc)
            try:
                _write_all(self._fd, [header, *chunks])
            except OSError:
                self._undo_partial_write()
                raise
            self._next_lsn = lsn + 1
            self._appended_lsn = lsn
            self._outstanding.add(lsn)
            self._size += _HEADER.size + length
            self._last_lsn[self._number] = lsn
            if self._size >= self.segment_bytes:
                self._rotate()
            return lsn

    def wait_durable(self, lsn: int) -> None:
        """Return once the record ``lsn`` (and every one before it) is on disk.

        Raises the ``OSError`` of a failed sync; the records it covered are then not durable.
        """
        if not self.sync:
            return
        with self._synced:
            while self._durable_lsn < lsn:
                if self._syncing:
                    self._synced.wait()
                    continue
                # Lead a group commit: sync everything appended so far.
                self._syncing = True
                target, fd = self._appended_lsn, self._fd
                self._lock.release()
                synced = False
                try:
                    if fd >= 0:
                        self._syncer(fd)
                    synced = True
                finally:
                    self._lock.acquire()
                    if synced:
                        self._durable_lsn = max(self._durable_lsn, target)
                    self._syncing = False
                    self._synced.notify_all()

    def settle(self, lsn: int) -> None:
        """Say the writer of record ``lsn`` is done with it: it is queued for its final home,
        or it failed. Until then no checkpoint passes it, even if later records are done."""
        with self._lock:
            self._outstanding.discard(lsn)

    def checkpoint(self, lsn: int) -> int:
        """Say every settled record up to ``lsn`` is safe elsewhere; delete the segments that
        held only such records. Returns how many segments were deleted."""
        with self._lock:
            if self._outstanding:
                lsn = min(lsn, min(self._outstanding) - 1)
            done = [n for n, last in self._last_lsn.items() if last <= lsn and n != self._number]
            for number in done:
                del self._last_lsn[number]
        for number in done:
            (self.folder / _segment_name(number)).unlink(missing_ok=True)
        # Segments left from earlier runs that held no intact record at all.
        for number, path in self.segments():
            if number < self._number and number not in self._last_lsn:
                path.unlink(missing_ok=True)
        if done:
            _fsync_dir(self.folder)
        return len(done)

    def rotate(self, min_bytes: int = 1) -> None:
        """Close the current segment if it holds ``min_bytes`` or more, so that a checkpoint
        can delete it."""
        with self._lock:
            if self._fd >= 0 and self._size >= max(1, min_bytes):
                self._rotate()

    def close(self) -> None:
        """Sync and close the current segment."""
        with self._lock:
            if self._fd >= 0:
                if self.sync:
                    self._syncer(self._fd)
                os.close(self._fd)
                self._fd = -1

    # Under self._lock from here on.

    def _open_segment(self) -> None:
        path = self.folder / _segment_name(self._number)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self._size = os.fstat(self._fd).st_size
        if self.sync:
            _fsync_dir(self.folder)

    def _rotate(self) -> None:
        # Everything in the old segment becomes durable before its successor takes records,
        # so a later group commit (which syncs only the new segment) covers all before it.
        # A group commit may be syncing this segment's fd without the lock: let it finish.
        while self._syncing:
            self._synced.wait()
        if self.sync:
            self._syncer(self._fd)
            self._durable_lsn = self._appended_lsn
        os.close(self._fd)
        self._fd = -1
        self._number += 1
        self._size = 0
        try:
            self._open_segment()
        except OSError:
            logger.exception("cannot start WAL segment %d; will retry on next append", self._number)
            self._fd = -1

    def _undo_partial_write(self) -> None:
        while self._syncing:
            self._synced.wait()
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            # Cannot cut the partial record off: leave this segment (replay stops at the
            # damage, and nothing after it is in this segment) and start the next.
            logger.exception("cannot truncate WAL segment %d after a failed write", self._number)
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
            self._number += 1
            self._size = 0


def _last_lsn(path: Path) -> int | None:
    last = None
    for record in read_segment(path):
        last = record.lsn
    return last


def _write_all(fd: int, chunks: Sequence[bytes]) -> None:
    views = [memoryview(c) for c in chunks if len(c)]
    while views:
        written = os.writev(fd, views)
        if written == 0:
            raise StorageError("writev wrote nothing")
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
