"""Fetch a series' instances from where the index says they are, as stored.

* ``file://`` locations (the listener's store, indexed folders) are checked here, and the
  kernel is asked to read them ahead (``posix_fadvise(WILLNEED)``); the convert worker reads
  them itself, so their bytes cross no process boundary.
* ``http(s)://.../studies/S/series/X/instances/I`` locations (crawled DICOMweb servers,
  Orthanc included) are fetched with one WADO-RS retrieve of the series asking for
  ``transfer-syntax=*`` (as stored: the server never transcodes); instances the answer lacks
  are asked for one by one.

An instance that cannot be fetched is listed in :attr:`Fetched.missing` with the reason; the
series then fails as incomplete. Transient network faults raise, so that the transfer engine
retries the whole fetch.
"""

from __future__ import annotations

import io
import os
import stat
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote, urlsplit

import pydicom

from dicomweb.errors import DicomWebError

if TYPE_CHECKING:
    from dicomweb.client import DicomWebClient
    from imgindex.export.plan import Instance, SeriesJob

__all__ = ["FetchOptions", "Fetched", "fetch_series", "is_transient"]

_INSTANCES: Final = "/instances/"
_STUDIES: Final = "/studies/"
#: DICOMweb error reasons worth another try (the client has retried them already).
_TRANSIENT_REASONS: Final = frozenset({"timeout", "truncated", "connection"})


@dataclass(frozen=True)
class FetchOptions:
    """How to reach DICOMweb servers: credentials as ``--auth`` text, and requests at once."""

    auth: str | None = None
    concurrency: int = 4
    timeout_s: float = 60.0


@dataclass
class Fetched:
    """A series' instances: ``sources`` (SOPInstanceUID, a file path or the Part 10 bytes),
    in the job's order, and what could not be fetched."""

    job: SeriesJob
    sources: list[tuple[str, str | bytes]] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)

    @property
    def bytes_in(self) -> int:
        """Bytes fetched (file sizes as the index has them)."""
        sizes = {i.sop_instance_uid: i.size_bytes for i in self.job.instances}
        return sum(len(s) if isinstance(s, bytes) else sizes.get(u, 0) for u, s in self.sources)


def is_transient(exc: BaseException) -> bool:
    """Whether the transfer engine should fetch again after ``exc``."""
    if isinstance(exc, DicomWebError):
        return exc.reason in _TRANSIENT_REASONS or (exc.status or 0) >= 500
    return isinstance(exc, (ConnectionError, TimeoutError))


class _Clients:
    """One DICOMweb client per base URL, per process (made on first use)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[tuple[str, str | None], DicomWebClient] = {}

    def get(self, base: str, options: FetchOptions) -> DicomWebClient:
        from dicomweb.client import DicomWebClient, parse_auth

        key = (base, options.auth)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                auth = parse_auth(options.auth) if options.auth else None
                client = DicomWebClient(
                    base, auth=auth, concurrency=options.concurrency, timeout=options.timeout_s
                )
                self._clients[key] = client
            return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()


_CLIENTS = _Clients()


def close_clients() -> None:
    """Close this process's DICOMweb clients (end of an export)."""
    _CLIENTS.close()


def fetch_series(job: SeriesJob, options: FetchOptions) -> Fetched:
    """Fetch ``job``'s instances (see the module docstring)."""
    fetched: dict[str, str | bytes] = {}
    missing: dict[str, str] = {}
    web: dict[tuple[str, str, str], list[Instance]] = {}
    for inst in job.instances:
        scheme = urlsplit(inst.location).scheme.lower()
        if scheme == "file":
            path = _file_path(inst.location)
            if _read_ahead(path):
                fetched[inst.sop_instance_uid] = path
            else:
                missing[inst.sop_instance_uid] = f"file not found: {path}"
        elif scheme in ("http", "https") and _STUDIES in inst.location:
            base, _, rest = inst.location.partition(_STUDIES)
            parts = rest.split("/")
            if len(parts) < 5 or parts[1] != "series" or parts[3] != "instances":
                missing[inst.sop_instance_uid] = f"not a WADO-RS instance URL: {inst.location}"
                continue
            web.setdefault((base, parts[0], parts[2]), []).append(inst)
        elif not inst.location:
            missing[inst.sop_instance_uid] = "the index has no location for it"
        else:
            missing[inst.sop_instance_uid] = f"unsupported location: {inst.location}"
    for (base, study_uid, series_uid), wanted in web.items():
        _fetch_web(base, study_uid, series_uid, wanted, options, fetched, missing)
    result = Fetched(job)
    for inst in job.instances:
        uid = inst.sop_instance_uid
        if uid in fetched:
            result.sources.append((uid, fetched[uid]))
        else:
            result.missing.append((uid, missing.get(uid, "not fetched")))
    return result


def _read_ahead(path: str) -> bool:
    """Whether ``path`` is a readable file; if so, ask the kernel to start reading it into the
    page cache, so that the convert worker finds it there (reading overlaps converting)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return False
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_WILLNEED)
        return True
    finally:
        os.close(descriptor)


def _file_path(location: str) -> str:
    parts = urlsplit(location)
    return unquote(parts.path)


def _sop_of(data: bytes) -> str | None:
    try:
        ds = pydicom.dcmread(
            io.BytesIO(data), stop_before_pixels=True, specific_tags=["SOPInstanceUID"]
        )
    except Exception:  # noqa: BLE001 (any parse failure: the part is not one we asked for)
        return None
    value = ds.get("SOPInstanceUID")
    return None if value is None else str(value)


def _fetch_web(
    base: str,
    study_uid: str,
    series_uid: str,
    wanted: list[Instance],
    options: FetchOptions,
    fetched: dict[str, str | bytes],
    missing: dict[str, str],
) -> None:
    client = _CLIENTS.get(base, options)
    expected = {i.sop_instance_uid for i in wanted}
    if len(wanted) > 1:
        try:
            for part in client.retrieve_series(study_uid, series_uid, transfer_syntax="*"):
                uid = _sop_of(part.body)
                if uid in expected:
                    fetched[uid] = part.body
        except DicomWebError as exc:
            if is_transient(exc):
                raise  # the engine fetches again
            # Otherwise ask for the instances one by one: their answers say what is wrong.
    for inst in wanted:
        uid = inst.sop_instance_uid
        if uid in fetched:
            continue
        try:
            fetched[uid] = client.retrieve_instance(study_uid, series_uid, uid, transfer_syntax="*")
        except DicomWebError as exc:
            if is_transient(exc):
                raise
            missing[uid] = (
                exc.message if exc.status is None else f"HTTP {exc.status}: {exc.message}"
            )
