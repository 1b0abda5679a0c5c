"""A real Orthanc PACS with its DICOMweb plugin, started on loopback for the peer tests.

Each :class:`Orthanc` is a private ``Orthanc`` process with its own configuration, storage and
index in a temporary folder and its own free HTTP and DICOM ports, so that it never depends on
or collides with the Debian package's system service (port 8042/4242), nor with another test.

Orthanc 1.10 has no bind-address option: it listens on every interface, and
``"RemoteAccessAllowed": false`` makes it refuse HTTP clients other than loopback. Only the
DICOMweb plugin is loaded (never ``orthanc-gdcm``, which crashes Orthanc 1.10 while
transcoding).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, Self

import httpx

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from types import TracebackType

#: Application entity title of every test Orthanc.
AET: Final = "ORTHANC"
#: Seconds to wait for ``GET /system`` to answer after the start.
START_TIMEOUT: Final = 30.0
#: Seconds to wait for the process to exit after SIGTERM before killing it.
STOP_TIMEOUT: Final = 10.0
#: Where Debian installs the DICOMweb plugin (package ``orthanc-dicomweb``).
_DICOMWEB_PLUGIN_PATTERNS: Final = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
    "/usr/lib/x86_64-linux-gnu/orthanc/plugins/libOrthancDicomWeb.so*",
)
# Starts retried with new ports if the first ones were taken in between.
_START_ATTEMPTS: Final = 3
_LOG_TAIL_LINES: Final = 40


class OrthancError(RuntimeError):
    """Orthanc could not be started, or misbehaved."""


class OrthancFactory(Protocol):
    """The ``orthanc_factory`` fixture: starts an Orthanc that the fixture will stop."""

    def __call__(
        self,
        *,
        overrides: Mapping[str, Any] | None = None,
        users: Mapping[str, str] | None = None,
    ) -> Orthanc: ...


def orthanc_binary() -> Path:
    """Return the ``Orthanc`` executable (``/usr/sbin`` is not always on ``PATH``).

    Returns
    -------
    pathlib.Path
        The executable.

    Raises
    ------
    OrthancError
        If Orthanc is not installed (``scripts/install`` installs it).
    """
    found = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise OrthancError("Orthanc is not installed: run scripts/install (apt package orthanc)")
    return Path(found)


def dicomweb_plugin() -> Path:
    """Return the shared library of the DICOMweb plugin.

    Returns
    -------
    pathlib.Path
        The plugin's ``.so``.

    Raises
    ------
    OrthancError
        If the plugin is not installed (apt package ``orthanc-dicomweb``).
    """
    for pattern in _DICOMWEB_PLUGIN_PATTERNS:
        matches = sorted(glob.glob(pattern))
        if matches:
            return Path(matches[0])
    raise OrthancError(
        "the Orthanc DICOMweb plugin is not installed: run scripts/install "
        "(apt package orthanc-dicomweb)"
    )


def free_ports(count: int) -> list[int]:
    """Return `count` distinct TCP ports that are free on 127.0.0.1 right now.

    Parameters
    ----------
    count : int
        Number of ports.

    Returns
    -------
    list of int
        The ports; another process may take them before they are used.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return `base` updated with `overrides`, merging nested objects key by key."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def make_config(
    folder: Path,
    *,
    http_port: int,
    dicom_port: int,
    overrides: Mapping[str, Any] | None = None,
    users: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Return the Orthanc configuration of a test instance.

    Parameters
    ----------
    folder : pathlib.Path
        The instance's folder: storage and index go in it.
    http_port, dicom_port : int
        The ports to listen on.
    overrides : mapping, optional
        Options replacing the defaults; nested objects (e.g. ``"DicomWeb"``) are merged key
        by key.
    users : mapping of str to str, optional
        User names and passwords: if given, HTTP basic authentication is enabled with them.

    Returns
    -------
    dict
        The configuration, to be written as JSON.
    """
    config: dict[str, Any] = {
        "Name": "imgindex-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "StorageCompression": False,
        "Plugins": [str(dicomweb_plugin())],
        "ConcurrentJobs": 2,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "HttpDescribeErrors": True,
        "HttpCompressionEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": AET,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomModalities": {},
        "OrthancPeers": {},
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": dict(users or {}),
        "SslEnabled": False,
        "StableAge": 1,
        "LimitFindResults": 0,
        "LimitFindInstances": 0,
        "SaveJobs": False,
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": True,
            "WadoRoot": "/wado",
            "Ssl": False,
            "StudiesMetadata": "Full",
            "SeriesMetadata": "Full",
        },
    }
    return _merge(config, overrides or {})


class Orthanc:
    """A running test Orthanc; also a context manager that stops it.

    Start one with :func:`start_orthanc`.

    Attributes
    ----------
    url : str
        Root of the REST API, ``http://127.0.0.1:PORT``.
    dicomweb_url : str
        Root of DICOMweb, ``url + "/dicom-web"``.
    http_port, dicom_port : int
        The HTTP and DICOM ports.
    aet : str
        Orthanc's application entity title.
    folder : pathlib.Path
        The instance's folder (configuration, storage, index and log).
    config_path, log_path : pathlib.Path
        The JSON configuration and the log (Orthanc's stdout and stderr).
    config : dict
        The configuration Orthanc was started with.
    auth : tuple of (str, str) or None
        Credentials of the first registered user, used by the helper methods.
    start_seconds : float
        Time from the launch until ``GET /system`` answered.
    """

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        *,
        folder: Path,
        config: dict[str, Any],
        start_seconds: float,
    ) -> None:
        self._process = process
        self.folder = folder
        self.config = config
        self.config_path = folder / "orthanc.json"
        self.log_path = folder / "orthanc.log"
        self.http_port: int = config["HttpPort"]
        self.dicom_port: int = config["DicomPort"]
        self.aet: str = config["DicomAet"]
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = self.url + "/" + str(config["DicomWeb"]["Root"]).strip("/")
        users: dict[str, str] = config.get("RegisteredUsers") or {}
        self.auth: tuple[str, str] | None = (
            next(iter(users.items())) if users and config.get("AuthenticationEnabled") else None
        )
        self.start_seconds = start_seconds

    def __repr__(self) -> str:
        return f"Orthanc(url={self.url!r}, dicom_port={self.dicom_port}, pid={self.pid})"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        """The process id."""
        return self._process.pid

    @property
    def running(self) -> bool:
        """Whether the process has not exited."""
        return self._process.poll() is None

    def client(self, **kwargs: Any) -> httpx.Client:
        """Return a new HTTP client on :attr:`url`, with :attr:`auth`; the caller closes it.

        Parameters
        ----------
        **kwargs
            Passed to :class:`httpx.Client` (e.g. ``timeout``).

        Returns
        -------
        httpx.Client
            The client.
        """
        kwargs.setdefault("timeout", 30.0)
        if self.auth is not None:
            kwargs.setdefault("auth", self.auth)
        return httpx.Client(base_url=self.url, **kwargs)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """Return the last `lines` lines of the log.

        Parameters
        ----------
        lines : int
            How many lines.

        Returns
        -------
        str
            The lines, or a note if there is no log.
        """
        return _tail(self.log_path, lines)

    def upload(self, paths: Iterable[Path]) -> int:
        """Store files through ``POST /instances``.

        Parameters
        ----------
        paths : iterable of pathlib.Path
            DICOM files.

        Returns
        -------
        int
            Files posted (stored, or already stored).

        Raises
        ------
        httpx.HTTPStatusError
            If Orthanc refuses a file.
        """
        count = 0
        with self.client() as http:
            for path in paths:
                response = http.post(
                    "/instances",
                    content=path.read_bytes(),
                    headers={"Content-Type": "application/dicom"},
                )
                response.raise_for_status()
                count += 1
        return count

    def get_json(self, path: str, **params: Any) -> Any:
        """Return the JSON answer of ``GET path`` on the REST API.

        Parameters
        ----------
        path : str
            Path under :attr:`url`, e.g. ``"/statistics"``.
        **params
            Query parameters.

        Returns
        -------
        Any
            The decoded answer.
        """
        with self.client() as http:
            response = http.get(path, params=params)
            response.raise_for_status()
            return response.json()

    def statistics(self) -> dict[str, Any]:
        """Return ``GET /statistics`` (``CountPatients``, ``CountInstances``...)."""
        answer: dict[str, Any] = self.get_json("/statistics")
        return answer

    def instance_count(self) -> int:
        """Return the number of stored instances."""
        return int(self.statistics()["CountInstances"])

    def study_uids(self) -> set[str]:
        """Return the StudyInstanceUIDs of the stored studies."""
        studies: list[dict[str, Any]] = self.get_json("/studies", expand="")
        return {study["MainDicomTags"]["StudyInstanceUID"] for study in studies}

    def stop(self) -> None:
        """Stop Orthanc: SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT` s. Idempotent."""
        _terminate(self._process)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"(no log: {error})"
    return "\n".join(text.splitlines()[-lines:])


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


def _launch(
    folder: Path, config: dict[str, Any], timeout: float
) -> tuple[subprocess.Popen[bytes], float]:
    """Start Orthanc on `config` and wait for ``GET /system``; return it and the wait."""
    config_path = folder / "orthanc.json"
    log_path = folder / "orthanc.log"
    config_path.write_text(json.dumps(config, indent=2))
    url = f"http://127.0.0.1:{config['HttpPort']}/system"
    users: dict[str, str] = config.get("RegisteredUsers") or {}
    auth = next(iter(users.items())) if users and config.get("AuthenticationEnabled") else None
    began = time.perf_counter()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(orthanc_binary()), str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=folder,
            env={**os.environ, "LC_ALL": "C.UTF-8"},
        )
    try:
        with httpx.Client(timeout=2.0, auth=auth) as http:
            while True:
                if process.poll() is not None:
                    raise OrthancError(
                        f"Orthanc exited with status {process.returncode} while starting "
                        f"(config {config_path}); log tail:\n{_tail(log_path, _LOG_TAIL_LINES)}"
                    )
                try:
                    response = http.get(url)
                except httpx.TransportError:
                    pass
                else:
                    if response.status_code == 200:
                        return process, time.perf_counter() - began
                if time.perf_counter() - began > timeout:
                    raise OrthancError(
                        f"Orthanc did not answer {url} within {timeout:.0f} s "
                        f"(config {config_path}); log tail:\n{_tail(log_path, _LOG_TAIL_LINES)}"
                    )
                time.sleep(0.05)
    except BaseException:
        _terminate(process)
        raise


def start_orthanc(
    tmp_path: Path,
    overrides: Mapping[str, Any] | None = None,
    users: Mapping[str, str] | None = None,
    *,
    timeout: float = START_TIMEOUT,
) -> Orthanc:
    """Start a private Orthanc with the DICOMweb plugin on free loopback ports.

    Parameters
    ----------
    tmp_path : pathlib.Path
        A folder in which a new ``orthanc-*`` folder holds the configuration, storage, index
        and log.
    overrides : mapping, optional
        Configuration options replacing the defaults of :func:`make_config`, e.g.
        ``{"LimitFindResults": 2}``; nested objects are merged key by key. Setting
        ``"HttpPort"`` or ``"DicomPort"`` disables the retry on taken ports.
    users : mapping of str to str, optional
        User names and passwords: if given, ``"AuthenticationEnabled"`` is true and only
        they may use the HTTP API (basic authentication).
    timeout : float
        Seconds to wait for ``GET /system`` to answer.

    Returns
    -------
    Orthanc
        The running server; stop it with :meth:`Orthanc.stop` (or use it as a context
        manager).

    Raises
    ------
    OrthancError
        If Orthanc is not installed, exits while starting or does not answer in time; the
        message ends with the tail of its log.
    """
    folder = Path(tempfile.mkdtemp(prefix="orthanc-", dir=tmp_path))
    fixed_ports = bool(overrides) and any(
        key in (overrides or {}) for key in ("HttpPort", "DicomPort")
    )
    attempts = 1 if fixed_ports else _START_ATTEMPTS
    for attempt in range(1, attempts + 1):
        http_port, dicom_port = free_ports(2)
        config = make_config(
            folder, http_port=http_port, dicom_port=dicom_port, overrides=overrides, users=users
        )
        try:
            process, seconds = _launch(folder, config, timeout)
        except OrthancError:
            # Another process may have taken a port between free_ports and the bind.
            if attempt == attempts or "port" not in _tail(folder / "orthanc.log", 5).lower():
                raise
            continue
        return Orthanc(process, folder=folder, config=config, start_seconds=seconds)
    raise AssertionError("unreachable")  # pragma: no cover
