"""Fast reads of the Zarr v3 arrays :class:`storage.arrays.ArrayStore` writes, local or remote.

The read path of ``ArrayReader(store, key)[z0:z1, y0:y1, x0:x1]``:

1. ``key/zarr.json`` is read once, when the reader is made, and checked against the one
   layout ArrayStore writes: a regular grid, ``default`` chunk keys, either one codec
   ``sharding_indexed`` (index at the end, encoded ``bytes`` little-endian then
   ``crc32c``) around an inner chain, or the inner chain alone; the inner chain is
   ``bytes`` (little-endian) optionally followed by ``blosc`` or ``zstd``. Anything
   else (a transpose, big-endian, gzip, an index at the start, storage transformers...)
   raises :class:`~storage.errors.StorageError` naming the array and what is not
   supported, rather than risk wrong voxels.
2. The selection (ints and step-1 slices) is turned into the inner chunks it touches,
   grouped by shard.
3. For each shard the index (``16`` bytes per inner chunk plus a crc32c, at the end of
   the shard file) is read with one suffix read, its checksum verified, and kept in a
   bounded per-reader cache; the next reads of that shard skip this step.
4. The touched inner chunks of a shard are fetched with **one**
   :meth:`StoreReader.read_ranges` call; for uncompressed chunks only the span of bytes
   the selection needs (a patch reads its rows, not whole slices). Locally the file is
   mapped once (``local_io="mmap"``, the default: ranges are zero-copy views and a
   range with a destination is one copy into the output array, as ``numpy.memmap``
   does) or read with ``os.preadv`` on a cached descriptor, one system call per run of
   adjacent chunks, straight into the output (``local_io="pread"``). An uncompressed
   one-slice read is one ranged read into the array returned, no other copy. A raw shard
   whose index says its chunks lie back to back in C order (how ArrayStore writes them),
   in a mapped local store, is viewed as one numpy array of its mapping and a selection
   copied from it in one strided copy (per run of chunks for tiled chunks), as from a
   ``numpy.memmap``, with no per-chunk work (a :class:`StoreReader` subclass overriding
   ``read_ranges`` still sees every range). Remotely,
   ``obstore.get_ranges``, which coalesces near ranges into few requests.
5. Chunks are decoded with numcodecs (Blosc directly into the output when the chunk fills
   a contiguous part of it), and the needed part copied into the output. An empty chunk
   (offset and length both ``2**64 - 1``) reads as the fill value.

Handles (file descriptors, obstore clients) are opened on first use and re-opened in a
child process after a fork; a pickled reader carries only its :class:`StoreLocation` (and
an array's metadata), so readers travel to PyTorch ``DataLoader`` workers.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import mmap
import operator
import os
import re
import sys
import threading
import urllib.parse
import urllib.request
from array import array as _array
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Self, TypeVar, cast

import google_crc32c
import numpy as np
from numcodecs import Blosc, Zstd  # type: ignore[import-untyped]  # numcodecs ships no types

from storage.errors import ObjectNotFoundError, StorageError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    import numpy.typing as npt
    from obstore.store import ClientConfig, ObjectStore, RetryConfig, S3Config

__all__ = ["ArrayReader", "StoreLocation", "StoreReader", "open_location"]

#: An empty inner chunk in a shard index: offset and length both all ones.
_EMPTY = 2**64 - 1
_ZARR_JSON = "zarr.json"
#: Data types an array may have (those of :data:`storage.arrays.DTYPES`).
_DTYPES = ("int8", "int16", "int32", "uint8", "uint16", "uint32", "float32", "float64")
#: obstore's client options (``ClientConfig``); every other option is the store's config.
_CLIENT_OPTIONS = frozenset(
    {
        "allow_http",
        "allow_invalid_certificates",
        "connect_timeout",
        "default_content_type",
        "default_headers",
        "pool_idle_timeout",
        "pool_max_idle_per_host",
        "proxy_url",
        "proxy_ca_certificate",
        "proxy_excludes",
        "randomize_addresses",
        "read_timeout",
        "root_certificate",
        "timeout",
        "user_agent",
    }
)
#: Options of ours, mapped to obstore's ``RetryConfig`` (numbers as strings).
_RETRY_OPTIONS = frozenset({"max_retries", "retry_timeout"})
_REMOTE_SCHEMES = ("http", "https", "s3", "s3a")
#: Option names whose values never appear in a repr or a message.
_SECRET = re.compile(r"secret|token|password|credential|key", re.IGNORECASE)
#: preadv takes at most IOV_MAX (1024 on Linux) buffers.
_MAX_IOV = 512
_IS_BIG_ENDIAN = sys.byteorder == "big"

_T = TypeVar("_T")

# Bumped in a child after a fork: readers compare it to re-open their handles there.
_FORKS = [0]


def _after_fork() -> None:
    _FORKS[0] += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


# -- locations -----------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class StoreLocation:
    """Where an export is: a picklable URL and the options to reach it.

    Attributes
    ----------
    url : str
        An absolute local path, or ``http(s)://host[:port]/path`` or ``s3://bucket/prefix``
        (no trailing slash). Keys are relative to it.
    options : mapping of str to str
        obstore options: client options (``allow_http``, ``timeout``...), the store's
        config (S3: ``endpoint``, ``region``, ``access_key_id``, ``secret_access_key``,
        ``virtual_hosted_style_request``...), and ``max_retries`` / ``retry_timeout``
        (seconds). Values whose name looks secret are hidden from ``repr`` and messages.
    """

    url: str
    options: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", {str(k): str(v) for k, v in self.options.items()})

    def __hash__(self) -> int:
        return hash((self.url, tuple(sorted(self.options.items()))))

    def __repr__(self) -> str:
        shown = {k: "***" if _SECRET.search(k) else v for k, v in self.options.items()}
        return f"StoreLocation({_redact_url(self.url)!r}, options={shown!r})"

    @property
    def is_local(self) -> bool:
        """Whether the export is a local folder."""
        return not self.url.partition("://")[1]


def open_location(url: str | os.PathLike[str], **options: object) -> StoreLocation:
    """Describe the export at ``url``.

    Parameters
    ----------
    url : str or path
        A local path, ``file://`` URL, ``http(s)://`` URL or ``s3://bucket/prefix``.
    **options
        obstore options (see :class:`StoreLocation`); booleans become ``"true"`` or
        ``"false"``, other values ``str(value)``.

    Returns
    -------
    StoreLocation

    Raises
    ------
    StorageError
        If the scheme is not supported, or options are given for a local path.
    """
    values = {
        k: ("true" if v else "false") if isinstance(v, bool) else str(v) for k, v in options.items()
    }
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if len(scheme) <= 1 or scheme == "file":  # a path (or a Windows drive letter)
        if values:
            raise StorageError(f"a local path takes no options, got {sorted(values)}")
        path = urllib.request.url2pathname(parts.path) if scheme == "file" else url
        return StoreLocation(str(Path(path).absolute()), {})
    if scheme not in _REMOTE_SCHEMES:
        raise StorageError(
            f"unsupported URL scheme {scheme!r} in {_redact_url(url)}; "
            f"use a path, file://, {', '.join(s + '://' for s in _REMOTE_SCHEMES)}"
        )
    return StoreLocation(url.rstrip("/"), values)


def _redact_url(url: str) -> str:
    """``url`` without any ``user:password@`` part."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


@lru_cache(maxsize=8192)
def _checked_key(key: str) -> str:
    """``key`` if it is a relative key with no empty, ``.`` or ``..`` part."""
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts):
        raise StorageError(f"invalid key {key!r}: it must be relative, with no '', '.' or '..'")
    return key


@lru_cache(maxsize=65536)
def _local_path(root: str, key: str) -> str:
    return os.path.join(root, _checked_key(key))


# -- bytes ---------------------------------------------------------------------------------


class _FdCache:
    """Open file descriptors by path, least recently used closed beyond ``capacity``.

    An fd in use (between :meth:`acquire` and :meth:`release`) is never closed, so a
    thread never reads a number that meanwhile names another file.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, list[int]] = OrderedDict()  # path -> [fd, users]

    def acquire(self, path: str) -> int:
        with self._lock:
            entry = self._entries.get(path)
            if entry is not None:
                self._entries.move_to_end(path)
                entry[1] += 1
                return entry[0]
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        with self._lock:
            entry = self._entries.get(path)
            if entry is not None:  # another thread opened it meanwhile
                os.close(fd)
                entry[1] += 1
                return entry[0]
            self._entries[path] = [fd, 1]
            self._evict()
        return fd

    def release(self, path: str) -> None:
        with self._lock:
            entry = self._entries.get(path)
            if entry is not None:
                entry[1] -= 1
            self._evict()

    def _evict(self) -> None:
        excess = len(self._entries) - self._capacity
        if excess <= 0:
            return
        for path in [p for p, (_fd, users) in self._entries.items() if users == 0][:excess]:
            os.close(self._entries.pop(path)[0])

    def close(self) -> None:
        with self._lock:
            for fd, _users in self._entries.values():
                os.close(fd)
            self._entries.clear()

    def forget(self) -> None:
        """Drop every fd (in a forked child: they are copies; close them, lock or not)."""
        for fd, _users in self._entries.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._entries = OrderedDict()
        self._lock = threading.Lock()


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset``; returns the bytes read (fewer only at end of file)."""
    done = 0
    total = view.nbytes
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


class StoreReader:
    """Reads objects of one :class:`StoreLocation`: whole, by byte ranges, or a suffix.

    Nothing is opened until the first read. The reader pickles as its location only, and
    re-opens its handles in a child process after a fork, so it works in PyTorch
    ``DataLoader`` workers (fork or spawn). Safe for several threads.

    Parameters
    ----------
    location : StoreLocation
        Where the export is (see :func:`open_location`).
    max_open_files : int
        Local stores: file descriptors (and mappings) kept open, least recently used
        closed first.
    local_io : {"mmap", "pread"}
        Local stores: how ranges are read. ``"mmap"`` (default) maps each file read-only
        once and copies ranges out of the mapping (returned views are zero-copy), as fast
        as ``numpy.memmap`` and only the voxels a patch needs are touched; ``"pread"``
        reads each run of adjacent ranges with one ``os.preadv`` (no mapping; a file
        truncated in place under a mapping would raise SIGBUS, which ArrayStore, replacing
        arrays by rename, never does).
    """

    def __init__(
        self, location: StoreLocation, *, max_open_files: int = 128, local_io: str = "mmap"
    ) -> None:
        if local_io not in ("mmap", "pread"):
            raise ValueError(f"local_io must be 'mmap' or 'pread', got {local_io!r}")
        self.location = location
        self.max_open_files = max(1, int(max_open_files))
        self.local_io = local_io
        self._maps: OrderedDict[str, memoryview] = OrderedDict()
        self._local = location.url if location.is_local else None
        # ArrayReader may copy raw voxels straight from the mappings (:meth:`_mapping`):
        # local files, mmap, and read_ranges not overridden (a subclass that counts, logs or
        # caches reads sees every one).
        self._maps_files = (
            self._local is not None
            and local_io == "mmap"
            and type(self).read_ranges is StoreReader.read_ranges
        )
        self._forks = -1
        self._fds: _FdCache | None = None
        self._store: ObjectStore | None = None
        self._open_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {
            "location": self.location,
            "max_open_files": self.max_open_files,
            "local_io": self.local_io,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["location"],
            max_open_files=state["max_open_files"],
            local_io=state.get("local_io", "mmap"),
        )

    def __repr__(self) -> str:
        return f"StoreReader({self.location!r})"

    def close(self) -> None:
        """Close open files (they are re-opened by the next read)."""
        if self._fds is not None and self._forks == _FORKS[0]:
            self._fds.close()

    # -- public reads ----------------------------------------------------------------------

    def read_bytes(self, key: str) -> bytes:
        """The whole object ``key``.

        Raises
        ------
        ObjectNotFoundError
            If there is no such object (a :class:`StorageError`).
        StorageError
            If the store cannot be read; the cause is chained.
        """
        if self._local is not None:
            with self._fd(key) as fd:
                size = os.fstat(fd.fd).st_size
                data = os.pread(fd.fd, size, 0)
                while len(data) < size:  # pread returns less only on rare short reads
                    more = os.pread(fd.fd, size - len(data), len(data))
                    if not more:
                        break
                    data += more
                return data
        return bytes(self._remote("read", key, lambda s, p: _obstore().get(s, p).bytes()))

    def read_json(self, key: str) -> dict[str, Any]:
        """The JSON object stored under ``key``.

        Raises
        ------
        StorageError
            If it is missing, unreadable, not JSON, or not an object.
        """
        data = self.read_bytes(key)
        try:
            value = json.loads(data)
        except ValueError as exc:
            raise StorageError(f"{self._where(key)} is not JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise StorageError(f"{self._where(key)} is not a JSON object")
        return value

    def size(self, key: str) -> int:
        """Size in bytes of the object ``key``.

        Raises
        ------
        ObjectNotFoundError, StorageError
            As :meth:`read_bytes`.
        """
        if self._local is not None:
            with self._fd(key) as fd:
                return os.fstat(fd.fd).st_size
        meta = self._remote("stat", key, lambda s, p: _obstore().head(s, p))
        return int(meta["size"])

    def read_ranges(
        self,
        key: str,
        ranges: Sequence[tuple[int, int]],
        *,
        out: Sequence[memoryview | None] | None = None,
    ) -> list[bytes | memoryview]:
        """The bytes of ``key`` in each ``(start, length)`` range, in order.

        Locally, adjacent ranges are read with one ``os.preadv`` each; remotely, one
        ``obstore.get_ranges`` call fetches all (it coalesces near ranges).

        Parameters
        ----------
        key : str
            Object key.
        ranges : sequence of (int, int)
            ``(start, length)`` pairs.
        out : sequence of memoryview or None, optional
            Writable C-contiguous byte buffers, one per range (None where any buffer
            will do): a range is read into its buffer (locally with no copy) and that
            buffer returned in its place.

        Returns
        -------
        list of bytes or memoryview
            One buffer per range, of exactly its length.

        Raises
        ------
        ObjectNotFoundError
            If there is no such object.
        StorageError
            If a range runs past the end of the object, or the store cannot be read.
        """
        if not ranges:
            return []
        if out is not None and len(out) != len(ranges):
            raise ValueError(f"out has {len(out)} buffers for {len(ranges)} ranges")
        if self._local is not None:
            return self._read_ranges_local(key, ranges, out)
        starts = [int(s) for s, _n in ranges]
        lengths = [int(n) for _s, n in ranges]
        got = self._remote(
            "read ranges of",
            key,
            lambda s, p: _obstore().get_ranges(s, p, starts=starts, lengths=lengths),
        )
        result: list[bytes | memoryview] = []
        for i, blob in enumerate(got):
            view = memoryview(blob)
            if view.nbytes != lengths[i]:
                raise StorageError(
                    f"{self._where(key)} ends before byte {starts[i] + lengths[i]} "
                    f"(truncated or replaced)"
                )
            target = None if out is None else out[i]
            if target is not None:
                target[:] = view
                view = target
            result.append(view)
        return result

    def read_suffix(self, key: str, length: int) -> tuple[bytes | memoryview, int]:
        """The last ``length`` bytes of ``key`` (fewer if it is smaller) and its size.

        One system call or request: how :class:`ArrayReader` reads a shard index.

        Raises
        ------
        ObjectNotFoundError, StorageError
            As :meth:`read_bytes`.
        """
        if self._local is not None:
            with self._fd(key) as fd:
                size = os.fstat(fd.fd).st_size
                start = max(0, size - length)
                buffer = memoryview(bytearray(size - start))
                got = _pread_into(fd.fd, buffer, start)
                return buffer[:got], size

        def suffix(store: ObjectStore, path: str) -> tuple[bytes | memoryview, int]:
            result = _obstore().get(store, path, options={"range": {"suffix": length}})
            return memoryview(result.bytes()), int(result.meta["size"])

        return self._remote("read the end of", key, suffix)

    # -- internals -------------------------------------------------------------------------

    def _where(self, key: str) -> str:
        return f"{key!r} in {_redact_url(self.location.url)}"

    def _check_fork(self) -> None:
        if self._forks != _FORKS[0]:
            if self._fds is not None:
                self._fds.forget()
            self._fds = None
            self._store = None
            self._maps = OrderedDict()  # mappings survive a fork; fresh ones are cheap
            self._open_lock = threading.Lock()
            self._forks = _FORKS[0]

    def _fd(self, key: str) -> _OpenFd:
        self._check_fork()
        if self._fds is None:
            with self._open_lock:
                if self._fds is None:
                    self._fds = _FdCache(self.max_open_files)
        assert self._local is not None
        return _OpenFd(self, self._fds, _local_path(self._local, key), key)

    def _read_ranges_local(
        self,
        key: str,
        ranges: Sequence[tuple[int, int]],
        out: Sequence[memoryview | None] | None,
    ) -> list[bytes | memoryview]:
        if self.local_io == "mmap":
            return self._read_ranges_mmap(key, ranges, out)
        buffers: list[memoryview] = []
        for i, (_start, length) in enumerate(ranges):
            target = None if out is None else out[i]
            if target is None:
                target = np.empty(int(length), dtype=np.uint8).data
            elif target.nbytes != length:
                raise ValueError(f"out[{i}] has {target.nbytes} bytes for a range of {length}")
            buffers.append(target)
        with self._fd(key) as fd:
            i = 0
            while i < len(ranges):  # runs of adjacent ranges: one preadv each
                start = end = int(ranges[i][0])
                j = i
                while j < len(ranges) and int(ranges[j][0]) == end and j - i < _MAX_IOV:
                    end += int(ranges[j][1])
                    j += 1
                run = buffers[i:j]
                got = os.preadv(fd.fd, run, start) if end > start else 0
                if got < end - start:  # a short read: finish buffer by buffer
                    offset = start
                    for view in run:
                        have = min(max(got - (offset - start), 0), view.nbytes)
                        if have < view.nbytes and (
                            have + _pread_into(fd.fd, view[have:], offset + have) < view.nbytes
                        ):
                            raise StorageError(
                                f"{self._where(key)} ends before byte {offset + view.nbytes} "
                                "(truncated or replaced)"
                            )
                        offset += view.nbytes
                i = j
        return list(buffers)

    def _mapping(self, key: str) -> memoryview:
        """The whole file ``key`` mapped read-only (cached, least recently used dropped).

        Mappings are never closed explicitly: one evicted while a returned view still
        uses it stays valid until that view is gone.
        """
        self._check_fork()
        path = _local_path(self._local or "", key)
        with self._open_lock:
            view = self._maps.get(path)
            if view is not None:
                self._maps.move_to_end(path)
                return view
        with self._fd(key) as fd:
            size = os.fstat(fd.fd).st_size
            view = (
                memoryview(mmap.mmap(fd.fd, size, prot=mmap.PROT_READ)) if size else memoryview(b"")
            )
        with self._open_lock:
            self._maps[path] = view
            while len(self._maps) > self.max_open_files:
                self._maps.popitem(last=False)
        return view

    def _read_ranges_mmap(
        self,
        key: str,
        ranges: Sequence[tuple[int, int]],
        out: Sequence[memoryview | None] | None,
    ) -> list[bytes | memoryview]:
        data = self._mapping(key)
        result: list[bytes | memoryview] = []
        for i, (start, length) in enumerate(ranges):
            if start < 0 or length < 0 or start + length > data.nbytes:
                raise StorageError(
                    f"{self._where(key)} ends before byte {start + length} (truncated or replaced)"
                )
            view = data[start : start + length]
            target = None if out is None else out[i]
            if target is not None:
                if target.nbytes != length:
                    raise ValueError(f"out[{i}] has {target.nbytes} bytes for a range of {length}")
                target[:] = view
                view = target
            result.append(view)
        return result

    def _remote(self, what: str, key: str, call: Callable[[ObjectStore, str], _T]) -> _T:
        store = self._remote_store()
        try:
            return call(store, _checked_key(key))
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"no object {self._where(key)}") from exc
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(
                f"could not {what} {self._where(key)}: {type(exc).__name__}: "
                f"{self._scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else '')}"
            ) from exc

    def _scrub(self, message: str) -> str:
        for name, value in self.location.options.items():
            if value and _SECRET.search(name):
                message = message.replace(value, "***")
        return message

    def _remote_store(self) -> ObjectStore:
        self._check_fork()
        store = self._store
        if store is None:
            with self._open_lock:
                if self._store is None:
                    self._store = _open_remote(self.location, self._scrub)
                store = self._store
        return store


class _OpenFd:
    """``with reader._fd(key) as fd: fd.fd`` holds a cached descriptor while in use."""

    __slots__ = ("_cache", "_key", "_path", "_reader", "fd")

    def __init__(self, reader: StoreReader, cache: _FdCache, path: str, key: str) -> None:
        self._reader = reader
        self._cache = cache
        self._path = path
        self._key = key
        self.fd = -1

    def __enter__(self) -> Self:
        try:
            self.fd = self._cache.acquire(self._path)
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"no object {self._reader._where(self._key)}") from exc
        except OSError as exc:
            raise StorageError(f"could not open {self._reader._where(self._key)}: {exc}") from exc
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self._cache.release(self._path)
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise StorageError(f"could not read {self._reader._where(self._key)}: {exc}") from exc


def _obstore() -> Any:
    import obstore

    return obstore


def _open_remote(location: StoreLocation, scrub: Callable[[str], str]) -> ObjectStore:
    """The obstore client of a remote location."""
    from obstore.store import HTTPStore, S3Store

    config = dict(location.options)
    client = {k: config.pop(k) for k in list(config) if k in _CLIENT_OPTIONS}
    retry: dict[str, Any] = {}
    try:
        if "max_retries" in config:
            retry["max_retries"] = int(config.pop("max_retries"))
        if "retry_timeout" in config:
            from datetime import timedelta

            retry["retry_timeout"] = timedelta(seconds=float(config.pop("retry_timeout")))
    except ValueError as exc:
        raise StorageError(f"{location!r}: max_retries and retry_timeout must be numbers") from exc
    scheme = location.url.partition("://")[0].lower()
    try:
        if scheme in ("http", "https"):
            if config:
                raise StorageError(
                    f"{location!r}: an HTTP store takes only client options, not {sorted(config)}"
                )
            return HTTPStore.from_url(
                location.url,
                client_options=cast("ClientConfig", client),
                retry_config=cast("RetryConfig", retry) if retry else None,
            )
        return S3Store.from_url(
            location.url,
            config=cast("S3Config", config),
            client_options=cast("ClientConfig", client),
            retry_config=cast("RetryConfig", retry) if retry else None,
        )
    except StorageError:
        raise
    except Exception as exc:
        raise StorageError(
            f"could not open {location!r}: {type(exc).__name__}: {scrub(str(exc).strip())}"
        ) from exc


# -- arrays --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """What :class:`ArrayReader` needs of a ``zarr.json``."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fill_value: Any
    chunk_shape: tuple[int, ...]  # inner chunk: the unit decoded
    shard_shape: tuple[int, ...] | None
    compressor: str | None  # "blosc", "zstd" or None (raw)
    separator: str
    attributes: dict[str, Any]
    dimension_names: tuple[str | None, ...] | None


def _parse_layout(meta: Mapping[str, Any], name: str) -> _Layout:
    """Check ``meta`` describes the layout ArrayStore writes; StorageError otherwise."""

    def refuse(what: str) -> StorageError:
        return StorageError(f"array {name} is not readable here: unsupported {what}")

    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        raise refuse(
            f"node (zarr_format {meta.get('zarr_format')!r}, "
            f"node_type {meta.get('node_type')!r}); a Zarr v3 array is expected"
        )
    try:
        shape = tuple(int(n) for n in meta["shape"])
        data_type = meta["data_type"]
        grid = meta["chunk_grid"]
        keys = meta["chunk_key_encoding"]
        codecs = list(meta["codecs"])
    except (KeyError, TypeError, ValueError) as exc:
        raise refuse(f"metadata (missing or malformed {exc})") from exc
    if not isinstance(data_type, str) or data_type not in _DTYPES:
        raise refuse(f"data_type {data_type!r}")
    dtype = np.dtype(data_type).newbyteorder("<")
    if meta.get("storage_transformers"):
        raise refuse(f"storage_transformers {meta['storage_transformers']!r}")
    if not isinstance(grid, dict) or grid.get("name") != "regular":
        raise refuse(f"chunk_grid {grid!r}")
    outer = tuple(int(n) for n in grid.get("configuration", {}).get("chunk_shape", ()))
    separator = (keys.get("configuration") or {}).get("separator", "/")
    if not isinstance(keys, dict) or keys.get("name") != "default" or separator not in "/.":
        raise refuse(f"chunk_key_encoding {keys!r}")
    if len(outer) != len(shape) or not shape or min(outer, default=0) < 1 or min(shape) < 0:
        raise refuse(f"chunk shape {outer} for shape {shape}")

    shard_shape: tuple[int, ...] | None = None
    inner_shape = outer
    if len(codecs) == 1 and _codec_name(codecs[0]) == "sharding_indexed":
        config = codecs[0].get("configuration") or {}
        inner_shape = tuple(int(n) for n in config.get("chunk_shape", ()))
        if len(inner_shape) != len(shape) or min(inner_shape, default=0) < 1:
            raise refuse(f"inner chunk shape {inner_shape}")
        if any(o % i for o, i in zip(outer, inner_shape, strict=True)):
            raise refuse(f"shard shape {outer} not a multiple of inner chunks {inner_shape}")
        if config.get("index_location", "end") != "end":
            raise refuse(f"shard index_location {config.get('index_location')!r}")
        index_codecs = [_codec_name(c) for c in config.get("index_codecs", [])]
        if index_codecs != ["bytes", "crc32c"] or _endian(config["index_codecs"][0]) != "little":
            raise refuse(f"shard index_codecs {config.get('index_codecs')!r}")
        shard_shape = outer
        codecs = list(config.get("codecs") or [])
    names = [_codec_name(c) for c in codecs]
    if not names or names[0] != "bytes":
        raise refuse(f"codecs {names}: the first must be 'bytes'")
    if _endian(codecs[0]) not in ("little", None) or (
        _endian(codecs[0]) is None and dtype.itemsize > 1
    ):
        raise refuse(f"byte order {_endian(codecs[0])!r} of codec 'bytes'")
    compressor: str | None = None
    if len(names) == 2 and names[1] in ("blosc", "zstd"):
        compressor = names[1]
    elif len(names) != 1:
        raise refuse(f"codecs {names}: only 'bytes' then optionally 'blosc' or 'zstd'")

    fill = meta.get("fill_value", 0)
    try:
        fill_value = np.array(
            float(fill) if isinstance(fill, str) and dtype.kind == "f" else fill, dtype=dtype
        )[()]
    except (TypeError, ValueError, OverflowError) as exc:
        raise refuse(f"fill_value {fill!r}") from exc
    raw_names = meta.get("dimension_names")
    dims = tuple(raw_names) if isinstance(raw_names, list) else None
    attributes = meta.get("attributes") or {}
    return _Layout(
        shape=shape,
        dtype=dtype,
        fill_value=fill_value,
        chunk_shape=inner_shape,
        shard_shape=shard_shape,
        compressor=compressor,
        separator=separator,
        attributes=dict(attributes) if isinstance(attributes, dict) else {},
        dimension_names=dims,
    )


def _codec_name(codec: Any) -> str:
    if isinstance(codec, str):
        return codec
    if isinstance(codec, dict) and isinstance(codec.get("name"), str):
        return str(codec["name"])
    return repr(codec)


def _endian(codec: Any) -> str | None:
    if not isinstance(codec, dict):
        return None
    endian = (codec.get("configuration") or {}).get("endian")
    return None if endian is None else str(endian)


class ArrayReader:
    """Reads voxels of one array written by :class:`storage.arrays.ArrayStore`.

    ``reader[z]``, ``reader[z0:z1, y0:y1, x0:x1]``: basic indexing (ints and step-1
    slices, negative allowed, missing trailing dimensions taken whole, one ``...``).
    Only the inner chunks a selection touches are read: one ranged read per shard.

    Picklable (the store's location and the metadata) and fork-safe; safe for several
    threads.

    Parameters
    ----------
    store : StoreReader
        The export.
    key : str
        The array's key, e.g. ``"1.2.840.1/1.2.840.2"``.
    max_cached_indexes : int
        Shard indexes kept (16 bytes per inner chunk each).

    Attributes
    ----------
    shape : tuple of int
    dtype : numpy.dtype
        Little-endian.
    chunk_shape : tuple of int
        Inner chunk shape: the unit decoded (one slice for ArrayStore's default).
    shard_shape : tuple of int or None
        Shape of a shard (one object each), or None when each chunk is its own object.
    fill_value : numpy scalar
        Value of voxels in empty chunks.
    attributes : dict
        The array's attributes.
    dimension_names : tuple of str or None

    Raises
    ------
    ObjectNotFoundError
        If there is no array under ``key``.
    StorageError
        If the array's layout is not the one ArrayStore writes (the message names what).
    """

    def __init__(self, store: StoreReader, key: str, *, max_cached_indexes: int = 1024) -> None:
        self.store = store
        self.key = key.strip("/")
        try:
            meta = store.read_json(f"{self.key}/{_ZARR_JSON}" if self.key else _ZARR_JSON)
        except ObjectNotFoundError as exc:
            raise ObjectNotFoundError(
                f"no array {self.key!r} in {_redact_url(store.location.url)}"
            ) from exc
        self._setup(meta, max_cached_indexes)

    def _setup(self, meta: dict[str, Any], max_cached_indexes: int) -> None:
        self._meta = meta
        self.max_cached_indexes = max(1, int(max_cached_indexes))
        name = f"{self.key!r} in {_redact_url(self.store.location.url)}"
        self._name = name
        layout = _parse_layout(meta, name)
        self.shape = layout.shape
        self.dtype = layout.dtype
        self.fill_value = layout.fill_value
        self.chunk_shape = layout.chunk_shape
        self.shard_shape = layout.shard_shape
        self.attributes = layout.attributes
        self.dimension_names = layout.dimension_names
        self._separator = layout.separator
        self._compressor = layout.compressor
        self._decoder: Any = {"blosc": Blosc, "zstd": Zstd, None: lambda: None}[layout.compressor]()
        self._chunk_nbytes = math.prod(self.chunk_shape) * self.dtype.itemsize
        strides = [1] * len(self.chunk_shape)
        for d in range(len(strides) - 2, -1, -1):
            strides[d] = strides[d + 1] * self.chunk_shape[d + 1]
        self._chunk_strides = tuple(strides)
        self._chunk_byte_strides = tuple(s * self.dtype.itemsize for s in strides)
        # reader[z] on one-slice chunks: the fast path of _read_slice.
        self._slice_chunks = self.chunk_shape[0] == 1 and self.chunk_shape[1:] == self.shape[1:]
        self._prefix = f"{self.key}/c" if self.key else "c"
        if self.shard_shape is not None:
            per = tuple(s // c for s, c in zip(self.shard_shape, self.chunk_shape, strict=True))
            self._per_shard: tuple[int, ...] = per
            strides = [1] * len(per)
            for d in range(len(per) - 2, -1, -1):
                strides[d] = strides[d + 1] * per[d + 1]
            self._index_strides = tuple(strides)
            self._index_nbytes = 16 * math.prod(per) + 4
        self._forks = _FORKS[0]
        self._lock = threading.Lock()
        # shard -> its _ShardEntry (the index, and how to copy its raw voxels from a mapping)
        self._indexes: OrderedDict[tuple[int, ...], _ShardEntry] = OrderedDict()
        self._all_kept = [True] * len(self.shape)
        # Raw shards of a mapped local store are copied as numpy slices of their mapping.
        self._mapped = (
            self.shard_shape is not None and self._compressor is None and self.store._maps_files
        )
        self._grid = tuple(-(-n // c) for n, c in zip(self.shape, self.chunk_shape, strict=True))
        if self.shard_shape is not None:
            # A shard in C order is one array of shard_shape when no dimension has both
            # several chunks per shard and several voxels per chunk (ArrayStore's default:
            # one-slice chunks in shards of whole slices).
            self._plain = all(
                c == 1 or p == 1 for c, p in zip(self.chunk_shape, self._per_shard, strict=True)
            )
            self._shard_chunk_strides = tuple(st * self._chunk_nbytes for st in self._index_strides)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "key": self.key,
            "meta": self._meta,
            "max_cached_indexes": self.max_cached_indexes,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.store = state["store"]
        self.key = state["key"]
        self._setup(state["meta"], state["max_cached_indexes"])

    def __repr__(self) -> str:
        return (
            f"ArrayReader({self._name}, shape={self.shape}, dtype={self.dtype.name}, "
            f"chunks={self.chunk_shape}, shards={self.shard_shape})"
        )

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    def __getitem__(self, selection: Any) -> npt.NDArray[Any]:
        return self.read(selection)

    def read(self, selection: Any = ()) -> npt.NDArray[Any]:
        """The voxels at ``selection``, as a new writable C-contiguous array.

        Parameters
        ----------
        selection : int, slice or tuple of them
            Basic indexing: an int drops its dimension, a slice (step 1) keeps it.

        Returns
        -------
        numpy.ndarray
            Of :attr:`dtype`, shaped as numpy's basic indexing would.

        Raises
        ------
        IndexError
            If an int is out of range, a step is not 1, or an item is not an int/slice.
        StorageError
            If a chunk or shard is missing, corrupt (index checksum, sizes), or the
            store cannot be read.
        """
        if (
            self._slice_chunks
            and isinstance(selection, int | np.integer)
            and not isinstance(selection, bool)
        ):
            return self._read_slice(int(selection))
        starts, stops, keep = self._normalize(selection)
        out = np.empty([b - a for a, b in zip(starts, stops, strict=True)], dtype=self.dtype)
        final = tuple(n for n, k in zip(out.shape, keep, strict=True) if k)
        if out.size == 0:
            return out.reshape(final)
        chunks = self.chunk_shape
        first = [a // c for a, c in zip(starts, chunks, strict=True)]
        last = [(b - 1) // c for b, c in zip(stops, chunks, strict=True)]
        if self.shard_shape is None:
            for position in itertools.product(
                *(range(f, g + 1) for f, g in zip(first, last, strict=True))
            ):
                self._read_chunk_object(position, starts, stops, out)
        else:
            per = self._per_shard
            for shard in itertools.product(
                *(range(f // p, g // p + 1) for f, g, p in zip(first, last, per, strict=True))
            ):
                if self._mapped:
                    view = self._mapped_view(shard)
                    if view is not None:
                        self._copy_mapped(view, shard, starts, stops, out)
                        continue
                positions = itertools.product(
                    *(
                        range(max(f, s * p), min(g, s * p + p - 1) + 1)
                        for f, g, s, p in zip(first, last, shard, per, strict=True)
                    )
                )
                self._read_shard(shard, positions, starts, stops, out)
        return out.reshape(final)

    # -- selection -------------------------------------------------------------------------

    def _normalize(self, selection: Any) -> tuple[list[int], list[int], list[bool]]:
        if type(selection) is tuple and len(selection) == len(self.shape):  # a box: quickly
            starts: list[int] = []
            stops: list[int] = []
            for item, n in zip(selection, self.shape, strict=True):
                if type(item) is not slice:
                    break
                start, stop, step = item.indices(n)
                if step != 1:
                    break
                starts.append(start)
                stops.append(max(start, stop))
            else:
                return starts, stops, self._all_kept
        items = selection if isinstance(selection, tuple) else (selection,)
        if any(item is Ellipsis for item in items):
            at = next(i for i, item in enumerate(items) if item is Ellipsis)
            rest = items[at + 1 :]
            if any(item is Ellipsis for item in rest):
                raise IndexError("an index can only have a single ellipsis ('...')")
            fill = (slice(None),) * (len(self.shape) - len(items) + 1)
            items = (*items[:at], *fill, *rest)
        if len(items) > len(self.shape):
            raise IndexError(
                f"too many indices for array {self._name}: {len(items)} for {len(self.shape)} "
                "dimensions"
            )
        starts = []
        stops = []
        keep: list[bool] = []
        for dim, n in enumerate(self.shape):
            item = items[dim] if dim < len(items) else slice(None)
            if isinstance(item, slice):
                start, stop, step = item.indices(n)
                if step != 1:
                    raise IndexError(f"only step 1 is supported, got {item} on dimension {dim}")
                starts.append(start)
                stops.append(max(start, stop))
                keep.append(True)
                continue
            try:
                if isinstance(item, bool | np.bool_):
                    raise TypeError
                i = operator.index(item)
            except TypeError as exc:
                raise IndexError(
                    f"only ints and slices index an array here, got {type(item).__name__}"
                ) from exc
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of bounds for dimension {dim} of size {n}")
            i %= n
            starts.append(i)
            stops.append(i + 1)
            keep.append(False)
        return starts, stops, keep

    def _plan(self, position: Sequence[int], starts: Sequence[int], stops: Sequence[int]) -> _Plan:
        """Where the chunk at ``position`` meets the selection (see :class:`_Plan`)."""
        out_sl: list[slice] = []
        chunk_sl: list[slice] = []
        region: list[int] = []
        whole = True
        flat_lo = flat_hi = 0
        for p, c, a, b, st in zip(
            position, self.chunk_shape, starts, stops, self._chunk_strides, strict=True
        ):
            origin = p * c
            lo = max(a, origin) - origin
            hi = min(b, origin + c) - origin
            out_sl.append(slice(lo + origin - a, hi + origin - a))
            chunk_sl.append(slice(lo, hi))
            region.append(hi - lo)
            whole = whole and lo == 0 and hi == c
            flat_lo += lo * st
            flat_hi += (hi - 1) * st
        itemsize = self.dtype.itemsize
        span = (flat_hi - flat_lo + 1) * itemsize
        return _Plan(
            tuple(out_sl),
            tuple(chunk_sl),
            tuple(region),
            whole,
            flat_lo * itemsize,
            span,
            span == math.prod(region) * itemsize,
        )

    # -- shards ----------------------------------------------------------------------------

    def _shard_key(self, shard: Sequence[int]) -> str:
        sep = self._separator
        return self._prefix + sep + sep.join(map(str, shard))

    def _index(self, shard: tuple[int, ...], key: str) -> _array[int]:
        """The shard's index as ``[offset0, nbytes0, offset1, ...]``, checked and cached."""
        return self._shard_index(shard, key).index

    def _shard_index(self, shard: tuple[int, ...], key: str) -> _ShardEntry:
        """The shard's index (see :meth:`_index`) and, for raw chunks stored back to back in
        C order from one offset on (ArrayStore's layout), that offset."""
        if self._forks != _FORKS[0]:
            self._lock = threading.Lock()
            self._forks = _FORKS[0]
        with self._lock:
            entry = self._indexes.get(shard)
            if entry is not None:
                self._indexes.move_to_end(shard)
                return entry
        blob, size = self.store.read_suffix(key, self._index_nbytes)
        view = memoryview(blob).cast("B")
        if view.nbytes != self._index_nbytes:
            raise StorageError(
                f"shard {key!r} of array {self._name} is {size} bytes, smaller than its "
                f"index ({self._index_nbytes}): truncated or not a shard"
            )
        body = view[:-4]
        crc = int.from_bytes(view[-4:], "little")
        if google_crc32c.value(bytes(body)) != crc:
            raise StorageError(
                f"shard {key!r} of array {self._name} has a corrupt index (crc32c mismatch)"
            )
        index = _array("Q")
        index.frombytes(body)
        if _IS_BIG_ENDIAN:  # pragma: no cover - the index is little-endian
            index.byteswap()
        data_end = size - self._index_nbytes
        for i in range(0, len(index), 2):
            offset, nbytes = index[i], index[i + 1]
            if offset == _EMPTY and nbytes == _EMPTY:
                continue
            if offset == _EMPTY or nbytes == _EMPTY or offset + nbytes > data_end:
                raise StorageError(
                    f"shard {key!r} of array {self._name} has a corrupt index: chunk "
                    f"{i // 2} at ({offset}, {nbytes}) is outside its {data_end} data bytes"
                )
        entry = _ShardEntry(index, self._regular_base(shard, index))
        with self._lock:
            self._indexes[shard] = entry
            while len(self._indexes) > self.max_cached_indexes:
                self._indexes.popitem(last=False)
        return entry

    def _regular_base(self, shard: tuple[int, ...], index: _array[int]) -> int | None:
        """The first chunk's offset if every chunk inside the array is raw, present and at
        ``first + (its C-order number in the shard) * chunk bytes``: the shard is then one
        C-order array of ``per + chunk_shape`` in the file (:meth:`_mapped_view`)."""
        if self._compressor is not None or not index:
            return None
        pairs = np.frombuffer(index, dtype=np.uint64).reshape(-1, 2)
        local = np.indices(self._per_shard).reshape(len(self._per_shard), -1)
        inside = np.ones(local.shape[1], dtype=bool)
        for d, (s, p, g) in enumerate(zip(shard, self._per_shard, self._grid, strict=True)):
            inside &= local[d] + s * p < g
        if not inside[0]:
            return None
        base = int(pairs[0, 0])
        expected = base + np.arange(len(pairs), dtype=np.uint64) * np.uint64(self._chunk_nbytes)
        if not (pairs[inside, 1] == self._chunk_nbytes).all():
            return None
        if not (pairs[inside, 0] == expected[inside]).all():
            return None
        return base

    def _mapped_view(self, shard: tuple[int, ...]) -> npt.NDArray[Any] | None:
        """A regular raw shard as a numpy view of its mapping (cached with its index):
        shaped ``shard_shape`` (cut to the chunks inside the array) when the layout is plain,
        ``per + chunk_shape`` otherwise; None for a shard that is not regular."""
        key = self._shard_key(shard)
        entry = self._shard_index(shard, key)
        if entry.view is not None or entry.base is None:
            return entry.view
        per = self._per_shard
        chunks = self.chunk_shape
        inside = tuple(min(p, g - s * p) for s, p, g in zip(shard, per, self._grid, strict=True))
        try:
            view: npt.NDArray[Any] = np.ndarray(
                (*inside, *chunks),
                dtype=self.dtype,
                buffer=self.store._mapping(key),
                offset=entry.base,
                strides=(*self._shard_chunk_strides, *self._chunk_byte_strides),
            )
        except (TypeError, ValueError) as exc:  # the file is shorter than its index says
            raise StorageError(
                f"shard {key!r} of array {self._name} is shorter than its index says: "
                "truncated or replaced"
            ) from exc
        if self._plain:
            ndim = len(chunks)
            view = np.reshape(
                view.transpose([i for d in range(ndim) for i in (d, ndim + d)]),
                tuple(i * c for i, c in zip(inside, chunks, strict=True)),
                copy=False,
            )
        entry.view = view
        return view

    def _copy_mapped(
        self,
        view: npt.NDArray[Any],
        shard: tuple[int, ...],
        starts: Sequence[int],
        stops: Sequence[int],
        out: npt.NDArray[Any],
    ) -> None:
        """The selection's part of a regular raw shard, copied from its mapping as numpy
        copies from a ``memmap``, with no Python per chunk. A plain shard is sliced as it
        is; otherwise each dimension's run of chunks (a partial first chunk, whole ones, a
        partial last one: at most three) is copied in one strided assignment."""
        assert self.shard_shape is not None
        if self._plain:
            src: list[slice] = []
            dest: list[slice] = []
            for s, sh, a, b in zip(shard, self.shard_shape, starts, stops, strict=True):
                origin = s * sh
                lo = max(a, origin)
                hi = min(b, origin + sh)
                src.append(slice(lo - origin, hi - origin))
                dest.append(slice(lo - a, hi - a))
            np.copyto(out[tuple(dest)], view[tuple(src)])
            return
        # Per dimension, the runs: (first chunk, end chunk, first in chunk, end in chunk, at)
        # with ``at`` the position in ``out``.
        chunks = self.chunk_shape
        runs: list[list[tuple[int, int, int, int, int]]] = []
        for s, sh, c, a, b in zip(shard, self.shard_shape, chunks, starts, stops, strict=True):
            origin = s * sh
            lo = max(a, origin) - origin
            hi = min(b, origin + sh) - origin
            at = origin + lo - a
            p, q = lo // c, (hi - 1) // c
            if p == q:
                runs.append([(p, p + 1, lo - p * c, hi - p * c, at)])
                continue
            dim: list[tuple[int, int, int, int, int]] = []
            if lo % c:
                dim.append((p, p + 1, lo % c, c, at))
                at += c - lo % c
                p += 1
            end = q + 1 if hi % c == 0 else q
            if end > p:
                dim.append((p, end, 0, c, at))
                at += (end - p) * c
            if hi % c:
                dim.append((q, q + 1, 0, hi % c, at))
            runs.append(dim)
        ndim = len(chunks)
        order = [i for d in range(ndim) for i in (d, ndim + d)]
        for combo in itertools.product(*runs):
            part = view[
                tuple(slice(r[0], r[1]) for r in combo) + tuple(slice(r[2], r[3]) for r in combo)
            ].transpose(order)
            target = out[tuple(slice(r[4], r[4] + (r[1] - r[0]) * (r[3] - r[2])) for r in combo)]
            np.copyto(np.reshape(target, part.shape, copy=False), part)

    def _read_slice(self, z: int) -> npt.NDArray[Any]:
        """``reader[z]`` when a chunk is one whole slice: one ranged read into the result."""
        n = self.shape[0]
        if not -n <= z < n:
            raise IndexError(f"index {z} is out of bounds for dimension 0 of size {n}")
        z %= n
        out = np.empty(self.shape[1:], dtype=self.dtype)
        rest = (0,) * (len(self.shape) - 1)
        if self.shard_shape is None:
            key = self._shard_key((z, *rest))
            try:
                if self._compressor is None:
                    self.store.read_ranges(key, [(0, self._chunk_nbytes)], out=[out.data.cast("B")])
                else:
                    self._decode_into(self.store.read_bytes(key), out, key)
            except ObjectNotFoundError as exc:
                raise self._missing(key) from exc
            return out
        per = self._per_shard[0]
        shard = (z // per, *rest)
        key = self._shard_key(shard)
        index = self._index(shard, key)
        local = (z - shard[0] * per) * self._index_strides[0]
        offset, nbytes = index[2 * local], index[2 * local + 1]
        if offset == _EMPTY:
            out.fill(self.fill_value)
        elif self._compressor is None:
            self._check_raw(nbytes, z, key)
            self.store.read_ranges(key, [(offset, nbytes)], out=[out.data.cast("B")])
        else:
            (blob,) = self.store.read_ranges(key, [(offset, nbytes)])
            self._decode_into(blob, out, key)
        return out

    def _read_shard(
        self,
        shard: tuple[int, ...],
        positions: Iterable[tuple[int, ...]],
        starts: Sequence[int],
        stops: Sequence[int],
        out: npt.NDArray[Any],
    ) -> None:
        """The touched chunks of one shard, with one :meth:`StoreReader.read_ranges` call."""
        key = self._shard_key(shard)
        index = self._index(shard, key)
        per = self._per_shard
        strides = self._index_strides
        ranges: list[tuple[int, int]] = []
        targets: list[memoryview | None] = []
        plans: list[_Plan] = []
        for position in positions:
            local = sum(
                (p - s * k) * st for p, s, k, st in zip(position, shard, per, strides, strict=True)
            )
            offset, nbytes = index[2 * local], index[2 * local + 1]
            plan = self._plan(position, starts, stops)
            if offset == _EMPTY:
                out[plan.out_sl] = self.fill_value
                continue
            if self._compressor is None:
                self._check_raw(nbytes, position, key)
                ranges.append((offset + plan.first, plan.span))
                targets.append(self._target(out, plan))
            else:
                ranges.append((offset, nbytes))
                targets.append(None)
            plans.append(plan)
        if not ranges:
            return
        blobs = self.store.read_ranges(key, ranges, out=targets)
        for blob, target, plan in zip(blobs, targets, plans, strict=True):
            if target is None:
                self._place(blob, out, plan, key)

    def _read_chunk_object(
        self,
        position: tuple[int, ...],
        starts: Sequence[int],
        stops: Sequence[int],
        out: npt.NDArray[Any],
    ) -> None:
        """An unsharded chunk: its own object (raw: only the span the selection needs)."""
        key = self._shard_key(position)
        plan = self._plan(position, starts, stops)
        try:
            if self._compressor is None:
                target = self._target(out, plan)
                (blob,) = self.store.read_ranges(key, [(plan.first, plan.span)], out=[target])
                if target is not None:
                    return
            else:
                blob = self.store.read_bytes(key)
        except ObjectNotFoundError as exc:
            raise self._missing(key) from exc
        self._place(blob, out, plan, key)

    # -- decoding --------------------------------------------------------------------------

    def _target(self, out: npt.NDArray[Any], plan: _Plan) -> memoryview | None:
        """The bytes of ``out`` a raw span can be read into directly, if it is contiguous."""
        if not plan.contiguous:
            return None
        dest = out[plan.out_sl]
        return dest.data.cast("B") if dest.flags.c_contiguous else None

    def _check_raw(self, nbytes: int, position: object, key: str) -> None:
        if nbytes != self._chunk_nbytes:
            raise StorageError(
                f"chunk {position} of array {self._name} in shard {key!r} is {nbytes} bytes, "
                f"not {self._chunk_nbytes}: corrupt"
            )

    def _missing(self, key: str) -> StorageError:
        return StorageError(
            f"chunk {key!r} of array {self._name} is missing (ArrayStore writes every chunk: "
            "the export is incomplete or damaged)"
        )

    def _place(
        self, blob: bytes | memoryview, out: npt.NDArray[Any], plan: _Plan, key: str
    ) -> None:
        """Put the voxels of ``plan`` from a chunk's bytes (a raw span, or encoded) in ``out``."""
        if self._compressor is None:
            out[plan.out_sl] = np.ndarray(
                plan.region, dtype=self.dtype, buffer=blob, strides=self._chunk_byte_strides
            )
            return
        if plan.whole and self._compressor == "blosc":
            dest = out[plan.out_sl]
            if dest.flags.c_contiguous:
                self._decode_into(blob, dest, key)
                return
        out[plan.out_sl] = self._decode(blob, key)[plan.chunk_sl]

    def _decode(self, blob: bytes | memoryview, key: str) -> npt.NDArray[Any]:
        """One encoded chunk as an array of :attr:`chunk_shape`."""
        try:
            raw = self._decoder.decode(blob)
        except Exception as exc:
            raise StorageError(f"cannot decode a chunk of {self._name} in {key!r}") from exc
        data = np.frombuffer(raw, dtype=self.dtype)
        if data.nbytes != self._chunk_nbytes:
            raise StorageError(
                f"a chunk of array {self._name} in {key!r} decodes to {data.nbytes} bytes, "
                f"not {self._chunk_nbytes}: corrupt"
            )
        return data.reshape(self.chunk_shape)

    def _decode_into(self, blob: bytes | memoryview, dest: npt.NDArray[Any], key: str) -> None:
        """Decode a whole chunk into the C-contiguous ``dest`` (Blosc: with no copy)."""
        if self._compressor != "blosc":
            dest[...] = self._decode(blob, key).reshape(dest.shape)
            return
        header = memoryview(blob).cast("B")[:16]
        if header.nbytes < 16 or int.from_bytes(header[4:8], "little") != self._chunk_nbytes:
            raise StorageError(
                f"a chunk of array {self._name} in {key!r} does not decode to "
                f"{self._chunk_nbytes} bytes: corrupt"
            )
        try:
            self._decoder.decode(blob, out=dest)
        except Exception as exc:
            raise StorageError(f"cannot decode a chunk of {self._name} in {key!r}") from exc


@dataclass
class _ShardEntry:
    """A cached shard index, and how to copy the shard's raw voxels from its mapping."""

    index: _array[int]
    base: int | None  # offset of the first chunk of a regular raw shard, else None
    view: npt.NDArray[Any] | None = None  # the regular shard viewed in its mapping


class _Plan(NamedTuple):
    """Where one chunk meets a selection."""

    out_sl: tuple[slice, ...]  # in the output
    chunk_sl: tuple[slice, ...]  # in the chunk
    region: tuple[int, ...]  # shape of both
    whole: bool  # the selection covers the whole chunk
    first: int  # byte offset, in the decoded chunk, of the region's first voxel
    span: int  # bytes from there to the end of its last voxel
    contiguous: bool  # the region is exactly those bytes
