"""Run ``imgindex listen`` and its DICOM peers (DCMTK, pynetdicom) from the listener's tests.

Everything binds and talks to 127.0.0.1 only. Every wait is bounded by a timeout and every
loop by a count, so that a listener that hangs fails a test instead of the run.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pydicom
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config

from imgindex.index import Index
from storage.errors import TableNotFoundError

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Collection, Iterable, Iterator, Sequence

    from pydicom.dataset import Dataset

#: Repository root.
REPO = Path(__file__).resolve().parents[2]
#: The ``imgindex`` command of the project's virtual environment.
IMGINDEX = REPO / ".venv" / "bin" / "imgindex"
#: Loopback: the only address the tests use.
HOST = "127.0.0.1"
#: Seconds any single wait may take before the test fails.
TIMEOUT = 30.0
#: The line the listener writes to stderr once it accepts connections.
READY = re.compile(r"listening on [\d.]+:(\d+)")
#: C-STORE statuses (PS3.4 B.2.3, PS3.7 C).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210

_STORESCU_FILE = re.compile(r"^I: Sending file: (.+)$")
_STORESCU_STATUS = re.compile(r"^D: DIMSE Status\s*: 0x([0-9a-fA-F]{4})")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bound, read, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@functools.cache
def dcmtk(tool: str) -> str:
    """The path of DCMTK's ``tool`` (``storescu``, ``echoscu``): the first on PATH whose
    ``--version`` says DCMTK. pynetdicom installs Python tools of the same names into the
    venv's ``bin``, which ``scripts/test`` puts first on PATH."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder, tool)
        if not os.access(candidate, os.X_OK):
            continue
        version = subprocess.run(
            [str(candidate), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
        if "dcmtk" in (version.stdout + version.stderr).lower():
            return str(candidate)
    raise AssertionError(f"DCMTK's {tool} is not installed: scripts/install installs it")


def dcmtk_env() -> dict[str, str]:
    """The environment of DCMTK commands: ours plus ``TCP_NODELAY=1``.

    DCMTK 3.6.7 leaves Nagle's algorithm on unless told, and each C-STORE then waits 40-90 ms
    for the delayed ACK.
    """
    return {**os.environ, "TCP_NODELAY": "1"}


#: Run as ``python -c LIMIT_AND_EXEC LIMIT COMMAND...``: make writes past LIMIT bytes of any
#: file fail with EFBIG (RLIMIT_FSIZE, SIGXFSZ ignored so the write fails instead of killing
#: the process), then exec COMMAND. Both survive exec; unlike ``preexec_fn`` this runs no
#: Python between fork and exec of a process that has threads.
LIMIT_AND_EXEC = (
    "import os, resource, signal, sys; "
    "limit = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


@dataclass
class Listener:
    """A running ``imgindex listen``: its process, port and what it wrote to stderr.

    A thread drains stderr for the whole life of the process, so the pipe never fills; the
    lines are kept for failure messages.
    """

    root: Path
    proc: subprocess.Popen[str]
    port: int = 0
    lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    def stderr(self, last: int = 60) -> str:
        """The last `last` lines the listener wrote to stderr, for assertion messages."""
        return "".join(self.lines[-last:])

    def wait(self, timeout: float = TIMEOUT) -> int:
        """Wait for the process to exit; its exit status."""
        status = self.proc.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout=timeout)
        return status

    def stop(self, sig: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        """Send `sig` and wait for the exit; the exit status (killed if it does not exit)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"listener did not exit within {timeout} s of signal {sig}:\n{self.stderr()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL the process (if it still runs) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.wait(TIMEOUT)


def start_listener(
    root: Path,
    *args: str,
    env: dict[str, str] | None = None,
    file_size_limit: int | None = None,
    timeout: float = TIMEOUT,
) -> Listener:
    """Start ``imgindex listen --root ROOT --port 0 ARGS`` and wait for its ready line.

    Parameters
    ----------
    root : Path
        The catalog root.
    *args : str
        More options (``--port 0`` is added unless ``--port`` is given).
    env : dict, optional
        The environment (default: ours).
    file_size_limit : int, optional
        Make the listener's writes past this many bytes of a file fail with EFBIG, as on a
        full disk (see :data:`LIMIT_AND_EXEC`).
    timeout : float
        Seconds to wait for ``listening on HOST:PORT``.

    Returns
    -------
    Listener
        The running listener, ``port`` read from the ready line.

    Raises
    ------
    AssertionError
        If the listener exits or says nothing within `timeout`; it is killed first.
    """
    command = [str(IMGINDEX), "listen", "--root", str(root), *args]
    if "--port" not in args:
        command += ["--port", "0"]
    if file_size_limit is not None:
        command = [sys.executable, "-c", LIMIT_AND_EXEC, str(file_size_limit), *command]
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env=env,
    )
    listener = Listener(root, proc)
    ready: queue.Queue[int] = queue.Queue()

    def drain() -> None:
        assert proc.stderr is not None
        with proc.stderr:
            for line in proc.stderr:
                listener.lines.append(line)
                match = READY.search(line)
                if match and not listener.port:
                    ready.put(int(match.group(1)))
        ready.put(0)  # EOF: the process is gone

    listener._reader = threading.Thread(target=drain, name=f"listener-{proc.pid}", daemon=True)
    listener._reader.start()
    try:
        port = ready.get(timeout=timeout)
    except queue.Empty:
        port = 0
    if not port:
        listener.kill()
        raise AssertionError(
            f"listener not ready within {timeout} s (status {proc.returncode}): "
            f"{' '.join(command)}\n{listener.stderr()}"
        )
    listener.port = port
    return listener


class Listeners:
    """Listeners a test started; :meth:`close` kills those still running."""

    def __init__(self) -> None:
        self.started: list[Listener] = []

    def start(
        self,
        root: Path,
        *args: str,
        env: dict[str, str] | None = None,
        file_size_limit: int | None = None,
    ) -> Listener:
        """:func:`start_listener`, remembered for :meth:`close`."""
        listener = start_listener(root, *args, env=env, file_size_limit=file_size_limit)
        self.started.append(listener)
        return listener

    def close(self) -> None:
        """Kill every listener still running."""
        for listener in self.started:
            listener.kill()


# --- The index -----------------------------------------------------------------------------


def read_table(root: Path, name: str) -> pl.DataFrame:
    """Table `name` of the index under `root`, empty if not written yet."""
    index = Index(root)
    try:
        return index.scan(name).collect()
    except (TableNotFoundError, FileNotFoundError):
        return pl.DataFrame(index.empty(name))


def wait_for_table(
    root: Path,
    name: str,
    done: Callable[[pl.DataFrame], bool],
    *,
    listener: Listener | None = None,
    timeout: float = TIMEOUT,
    what: str = "",
) -> pl.DataFrame:
    """Poll table `name` until ``done(frame)``; the frame.

    Raises
    ------
    AssertionError
        After `timeout` seconds, with what the table holds and the listener's stderr.
    """
    deadline = time.monotonic() + timeout
    frame = read_table(root, name)
    for _ in range(int(timeout / 0.1) + 1):
        if done(frame):
            return frame
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
        frame = read_table(root, name)
    if done(frame):
        return frame
    log = listener.stderr() if listener is not None else ""
    raise AssertionError(
        f"{name}: {what or 'condition'} not met within {timeout} s; the table has "
        f"{frame.height} rows\n{frame.head(20)}\n{log}"
    )


def wait_for_uids(
    root: Path,
    uids: Iterable[str],
    *,
    listener: Listener | None = None,
    timeout: float = TIMEOUT,
) -> pl.DataFrame:
    """Wait until ``instances`` holds every SOPInstanceUID of `uids`; the table."""
    wanted = set(uids)

    def done(frame: pl.DataFrame) -> bool:
        return wanted <= set(frame["SOPInstanceUID"].to_list())

    return wait_for_table(
        root, "instances", done, listener=listener, timeout=timeout, what=f"{len(wanted)} UIDs"
    )


def wait_for_rejects(
    root: Path,
    needs: Sequence[tuple[Collection[str], int]],
    *,
    listener: Listener | None = None,
    timeout: float = TIMEOUT,
) -> pl.DataFrame:
    """Wait until ``rejects`` holds, for each (reasons, n) of `needs`, n rows of those reasons.

    Returns
    -------
    polars.DataFrame
        The table.
    """

    def done(frame: pl.DataFrame) -> bool:
        return all(
            frame.filter(pl.col("reason").is_in(sorted(reasons))).height >= n
            for reasons, n in needs
        )

    what = ", ".join(f"{n} rows of reason {'/'.join(sorted(r))}" for r, n in needs)
    return wait_for_table(root, "rejects", done, listener=listener, timeout=timeout, what=what)


def duplicated(frame: pl.DataFrame, column: str = "SOPInstanceUID") -> list[Any]:
    """Values of `column` found in more than one row."""
    counts = frame.group_by(column).len()
    return sorted(counts.filter(pl.col("len") > 1)[column].to_list())


def location_path(location: str) -> Path:
    """The local path of a ``file://`` URI."""
    parsed = urllib.parse.urlparse(location)
    assert parsed.scheme == "file", location
    return Path(urllib.parse.unquote(parsed.path))


# --- DICOM files ---------------------------------------------------------------------------

_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN"})
_LONG_VRS |= {b"UR", b"UT", b"UV"}


def dataset_offset(data: bytes) -> int:
    """Where the data set starts in a DICOM Part 10 file: after preamble, ``DICM`` and meta.

    The file meta is explicit VR little endian (PS3.10 7.1); this walks its elements rather
    than trusting (0002,0000), which some files lack.
    """
    assert data[128:132] == b"DICM", "not a DICOM Part 10 file"
    offset = 132
    for _ in range(1000):
        if offset + 8 > len(data):
            return offset
        group, _element = struct.unpack_from("<HH", data, offset)
        if group != 0x0002:
            return offset
        vr = data[offset + 4 : offset + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", data, offset + 8)
            offset += 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, offset + 6)
            offset += 8 + length
    raise AssertionError("more than 1000 file meta elements")


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of the Part 10 file `path` (what follows its file meta)."""
    data = path.read_bytes()
    return data[dataset_offset(data) :]


def quiet_dcmread(path: Path | str, **kwargs: Any) -> Dataset:
    """:func:`pydicom.dcmread` with its warnings about odd files silenced.

    Only those of reading: pydicom converts (and validates) most values when they are first
    accessed, so read odd values with :func:`uid_of` rather than from the result.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, **kwargs)


def uid_of(path: Path, keyword: str = "SOPInstanceUID") -> str:
    """The value of UID `keyword` in the data set of `path` ("" if absent), however invalid."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom validates values when it converts them
        return str(pydicom.dcmread(path, stop_before_pixels=True).get(keyword) or "")


def meta_of(path: Path) -> tuple[str, str, str]:
    """(MediaStorageSOPClassUID, MediaStorageSOPInstanceUID, TransferSyntaxUID) of `path`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = read_file_meta_info(path)
    return (
        str(meta.get("MediaStorageSOPClassUID", "")),
        str(meta.get("MediaStorageSOPInstanceUID", "")),
        str(meta.get("TransferSyntaxUID", "")),
    )


# --- DCMTK ---------------------------------------------------------------------------------


def run_echoscu(port: int, *, aet: str = "ECHOSCU", timeout: float = TIMEOUT) -> str | None:
    """C-ECHO with ``echoscu``; None on success, else its output."""
    proc = subprocess.run(
        [dcmtk("echoscu"), "-to", "10", "-ta", "10", "-aet", aet, HOST, str(port)],
        capture_output=True,
        text=True,
        errors="replace",
        env=dcmtk_env(),
        timeout=timeout,
        check=False,
    )
    return None if proc.returncode == 0 else f"status {proc.returncode}: {proc.stderr}"


def storescu_config(files: Iterable[Path], path: Path) -> Path:
    """Write a ``storescu -xf`` configuration proposing each file's own transfer syntax.

    Without it storescu proposes the uncompressed transfer syntaxes (explicit VR little
    endian first) and converts every file to the one accepted, or fails for compressed files
    it cannot decode; with ``-R`` plus one of ``-xs``/``-xv``/``-xr``... it proposes one
    compressed syntax at a time. Here every (SOP Class, transfer syntax) pair of the files is
    a presentation context of its own, so the SCP accepting them all means every file is sent
    in the transfer syntax it is stored in: storescu logs ``Converting transfer syntax: X ->
    X``. DCMTK accepts raw UIDs in the file, so SOP Classes it does not know are fine too.

    Returns
    -------
    Path
        `path`; use with ``-xf PATH Send``.
    """
    pairs: set[tuple[str, str]] = set()
    for file in files:
        sop_class, _, syntax = meta_of(file)
        dataset_class = str(quiet_dcmread(file, stop_before_pixels=True).get("SOPClassUID", ""))
        pairs |= {(c, syntax) for c in (sop_class, dataset_class) if c}
    syntaxes = sorted({syntax for _, syntax in pairs})
    assert len(pairs) <= 128, "DCMTK proposes at most 128 presentation contexts"
    lines = ["[[TransferSyntaxes]]"]
    for number, syntax in enumerate(syntaxes):
        lines += [f"[Syntax{number}]", f"TransferSyntax1 = {syntax}"]
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    for number, (sop_class, syntax) in enumerate(sorted(pairs), start=1):
        lines.append(f"PresentationContext{number} = {sop_class}\\Syntax{syntaxes.index(syntax)}")
    lines += ["[[Profiles]]", "[Send]", "PresentationContexts = Contexts"]
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return path


@dataclass
class StorescuResult:
    """What a ``storescu`` run did: its exit status, a status per file sent, its log."""

    returncode: int
    statuses: dict[str, int]
    log: str

    def failures(self) -> dict[str, int]:
        """Files whose C-STORE status is not success."""
        return {name: status for name, status in self.statuses.items() if status != SUCCESS}


def storescu_command(
    port: int, files: Sequence[Path], *, workdir: Path, aet: str = "STORESCU"
) -> list[str]:
    """``storescu`` sending `files` over one association, each in its own transfer syntax.

    ``-nh``: go on after a failed C-STORE; ``-d``: log each response status (see
    :class:`StorescuLog`); ``-xf``: the presentation contexts of :func:`storescu_config`.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config = storescu_config(files, workdir / f"storescu-{aet}.cfg")
    return [
        dcmtk("storescu"),
        "-d",
        "-nh",
        "-to",
        "10",
        "-ta",
        "10",
        "-aet",
        aet,
        "-xf",
        str(config),
        "Send",
        HOST,
        str(port),
        *map(str, files),
    ]


class StorescuLog:
    """The C-STORE status of each file, read from ``storescu -d`` output line by line."""

    def __init__(self) -> None:
        self.statuses: dict[str, int] = {}
        self.acked: list[str] = []
        self._current: str | None = None

    def feed(self, line: str) -> None:
        """Read one line of the log."""
        if match := _STORESCU_FILE.match(line):
            self._current = match.group(1).rstrip()
        elif (match := _STORESCU_STATUS.match(line)) and self._current is not None:
            status = int(match.group(1), 16)
            self.statuses[self._current] = status
            if status == SUCCESS:
                self.acked.append(self._current)
            self._current = None


def run_storescu(
    port: int,
    files: Sequence[Path],
    *,
    workdir: Path,
    aet: str = "STORESCU",
    timeout: float = 60.0,
) -> StorescuResult:
    """Run :func:`storescu_command`; its exit status and the status of each file sent."""
    proc = subprocess.run(
        storescu_command(port, files, workdir=workdir, aet=aet),
        capture_output=True,
        text=True,
        errors="replace",
        env=dcmtk_env(),
        timeout=timeout,
        check=False,
    )
    log = StorescuLog()
    for line in proc.stderr.splitlines():
        log.feed(line)
    return StorescuResult(proc.returncode, log.statuses, proc.stderr)


def storescu_errors(result: StorescuResult) -> str:
    """The error and conversion lines of a storescu log (for assertion messages)."""
    keep = ("E: ", "F: ", "W: ", "I: Converting")
    return "\n".join(line for line in result.log.splitlines() if line.startswith(keep))


# --- pynetdicom ----------------------------------------------------------------------------


def nodelay(
    create_socket: Callable[[Any, Any], socket.socket],
) -> Callable[[Any, Any], socket.socket]:
    """Wrap ``AssociationSocket._create_socket`` so that pynetdicom's sockets set TCP_NODELAY.

    pynetdicom writes a C-STORE as two P-DATA PDUs (command, data set); with Nagle's algorithm
    on, the second waits for the peer's delayed ACK and each C-STORE takes 40-90 ms.
    """

    def create(self: Any, address: Any) -> socket.socket:
        sock = create_socket(self, address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    return create


def shutdown_socket(self: Any) -> None:
    """A replacement for ``AssociationSocket._shutdown_socket`` that always closes.

    pynetdicom 3.0.4 calls ``shutdown()`` then ``close()`` in one ``try``: when the peer has
    gone (killed, or closed on a failed TLS handshake) ``shutdown()`` raises ENOTCONN, the
    socket is never closed and leaks (a ResourceWarning, an error under
    ``filterwarnings=error``); pynetdicom PR #999 (issue #979) closes it regardless.
    """
    sock = self.socket
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def scu(
    contexts: Iterable[tuple[str, str]], *, aet: str = "PYNETDICOM", acse_timeout: float = 10
) -> AE:
    """A pynetdicom SCU proposing one presentation context per (SOP Class, syntax) pair."""
    ae = AE(ae_title=aet)
    ae.acse_timeout = acse_timeout
    ae.dimse_timeout = TIMEOUT
    ae.network_timeout = TIMEOUT
    ae.connection_timeout = 10
    for sop_class, syntax in sorted(set(contexts)):
        ae.add_requested_context(sop_class, syntax)
    return ae


def status_of(response: Dataset) -> int | None:
    """The Status of a C-STORE/C-ECHO response; None if the peer sent none (abort, timeout)."""
    value = response.get("Status")
    return None if value is None else int(value)


@contextlib.contextmanager
def raw_sending() -> Iterator[None]:
    """Within: ``send_c_store(path)`` sends the file's data set bytes as they are.

    pynetdicom's ``STORE_SEND_CHUNKED_DATASET`` sends what follows the file meta, in the
    transfer syntax of the meta, without decoding it: the way to send broken data sets.
    """
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


#: How often a sender sends again after a response pynetdicom lost.
LOST_RESPONSE_RETRIES = 3


def store_each(
    port: int,
    items: Sequence[Path | Dataset],
    contexts: Iterable[tuple[str, str]],
    *,
    aet: str = "PYNETDICOM",
    tls_args: tuple[ssl.SSLContext, str] | None = None,
    dimse_timeout: float = TIMEOUT,
    raw: bool = False,
) -> list[int | None]:
    """C-STORE each item (a file, or a data set) in order, over one association, or over a
    new one after a response pynetdicom lost; their statuses (None: no response came).

    pynetdicom's requestor can hand a response to its reactor thread instead of the waiting
    ``send_c_store`` (pynetdicom issue #875, under load): the listener answered, the client
    lost it, waited out ``dimse_timeout`` and aborted. The item is sent again, as a modality
    would. ``raw``: send files' data set bytes unchanged (:func:`raw_sending`).
    """
    contexts = list(contexts)
    statuses: list[int | None] = []
    for _ in range(LOST_RESPONSE_RETRIES + 1):
        ae = scu(contexts, aet=aet)
        ae.dimse_timeout = dimse_timeout
        assoc = ae.associate(HOST, port, tls_args=tls_args)
        assert assoc.is_established, f"association from {aet} not established"
        lost = False
        try:
            with raw_sending() if raw else contextlib.nullcontext():
                while len(statuses) < len(items):
                    started = time.monotonic()
                    status = status_of(assoc.send_c_store(items[len(statuses)]))
                    if status is None and time.monotonic() - started >= 0.9 * dimse_timeout:
                        lost = True
                        break
                    statuses.append(status)
        finally:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()
        if not lost:
            break
    return statuses + [None] * (len(items) - len(statuses))


def send_files(
    port: int,
    files: Sequence[Path],
    *,
    aet: str = "PYNETDICOM",
    tls_args: tuple[ssl.SSLContext, str] | None = None,
) -> dict[Path, int | None]:
    """Send each file's data set bytes unchanged (:func:`store_each`).

    Returns
    -------
    dict
        File to C-STORE status (None if no response came).
    """
    contexts = [(meta_of(f)[0], meta_of(f)[2]) for f in files]
    statuses = store_each(port, files, contexts, aet=aet, tls_args=tls_args, raw=True)
    return dict(zip(files, statuses, strict=True))
