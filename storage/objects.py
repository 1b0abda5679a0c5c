"""Object stores: bytes under keys. The local folder store is the default.

A key is a relative POSIX path of safe components (letters, digits, ``.``, ``_``, ``-``;
no ``.`` or ``..`` component), so no key can name a file outside the store. Writes are
atomic: a reader sees the old object or the new one, never a part. With ``sync=True`` a
write returns only after the bytes and the directory entry are on stable storage
(write to a temporary name, fsync, rename, fsync the folder), which is what "acknowledged
means durable" needs.
"""

from __future__ import annotations

import ctypes
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from storage.errors import ObjectNotFoundError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = ["LocalObjectStore", "ObjectStore", "validate_key"]

_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
#: Longest key accepted; well under PATH_MAX with any sensible root.
MAX_KEY_LENGTH = 1024


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe object key.

    Raises
    ------
    ValueError
        If ``key`` is empty, too long, absolute, or has a component that is empty, ``.``,
        ``..`` or holds characters other than letters, digits, ``.``, ``_`` and ``-``.
    """
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"object key must be 1 to {MAX_KEY_LENGTH} characters, got {len(key)}")
    parts = key.split("/")
    bad = [p for p in parts if not _COMPONENT.fullmatch(p) or p in (".", "..")]
    if bad:
        raise ValueError(
            f"unsafe object key {key!r}: component(s) {bad} must be letters, digits, '.', '_' "
            "or '-', not start with '.' or '-', and not be empty"
        )
    return key


class ObjectStore(Protocol):
    """What imgindex needs of a store of bytes."""

    def put(self, key: str, data: bytes, *, sync: bool = True) -> None:
        """Store ``data`` under ``key`` atomically (durably if ``sync``)."""

    def get(self, key: str) -> bytes:
        """The bytes under ``key``; :class:`ObjectNotFoundError` if none."""

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    def delete(self, key: str) -> None:
        """Remove the object under ``key`` (no error if there is none)."""

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        """Keys under ``prefix``, in sorted order."""

    def uri(self, key: str) -> str:
        """A URI that locates the object, e.g. ``file:///...``."""

    def sync(self) -> None:
        """Make every write so far durable, those made with ``sync=False`` too."""


class LocalObjectStore:
    """Objects as files under a folder.

    Parameters
    ----------
    root : str or Path
        The folder (created if missing).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self.root)!r})"

    def path(self, key: str) -> Path:
        """The file that holds ``key``."""
        return self.root / validate_key(key)

    def put(self, key: str, data: bytes, *, sync: bool = True) -> None:
        """Write ``data`` to a temporary file beside the target, then rename it into place."""
        target = self.path(key)
        folder = target.parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if sync:
            _fsync_dir(folder)

    def put_stream(self, key: str, stream: BinaryIO, *, sync: bool = True) -> None:
        """Like :meth:`put`, copying from a readable stream in 1 MiB blocks."""
        target = self.path(key)
        folder = target.parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as out:
                while block := stream.read(1 << 20):
                    out.write(block)
                if sync:
                    out.flush()
                    os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if sync:
            _fsync_dir(folder)

    def get(self, key: str) -> bytes:
        """The bytes stored under ``key``."""
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"no object {key!r} in {self.root}") from exc

    def exists(self, key: str) -> bool:
        """Whether ``key`` is stored."""
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        """Remove ``key`` if stored."""
        self.path(key).unlink(missing_ok=True)

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        """Stored keys starting with ``prefix``, sorted; temporary files are not keys."""
        keys = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if name.startswith("."):
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        yield from sorted(keys)

    def uri(self, key: str) -> str:
        """``file://`` URI of ``key``."""
        return self.path(key).as_uri()

    def sync(self) -> None:
        """Make every write so far durable, also those made with ``sync=False``.

        One ``syncfs(2)`` of the store's file system on Linux (many files cost one call), else
        ``os.sync()``. Writers batch unsynced puts and call this once per batch.
        """
        if _SYNCFS is None:
            os.sync()
            return
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _SYNCFS(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs {self.root}: {os.strerror(err)}")
        finally:
            os.close(fd)


def _syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn: Callable[[int], int] = libc.syncfs
    except (OSError, AttributeError):
        return None
    return fn


_SYNCFS = _syncfs()


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX: fsync the directory)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
