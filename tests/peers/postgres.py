"""A real PostgreSQL server started on loopback for the peer tests.

Each :class:`Postgres` is a private cluster made by ``initdb`` in a fresh temporary folder and
run by its own ``postgres`` process on a free port of 127.0.0.1, never the Debian package's
system service. Clients authenticate with ``trust`` on loopback only (``pg_hba.conf`` has no
other line), and durability is off (``fsync``, ``synchronous_commit``, ``full_page_writes``):
the data lives as long as one test module.

PostgreSQL refuses to run as root. When the tests run as root (CI does), ``initdb`` and
``postgres`` run as the ``postgres`` system user instead, in a folder under the system's
temporary folder chowned to it: ``tmp_path`` may sit under folders that user cannot enter.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Self

if TYPE_CHECKING:
    from types import TracebackType

#: Where Debian installs the server binaries (package ``postgresql-15``, or another major).
_BINDIR_PATTERN: Final = "/usr/lib/postgresql/*/bin"
#: Superuser role made by ``initdb`` and the database the tests use.
USER: Final = "imgindex"
DATABASE: Final = "imgindex"
#: The system user that runs the server when the tests run as root.
SYSTEM_USER: Final = "postgres"
#: Seconds to wait for the server to accept connections after the start.
START_TIMEOUT: Final = 30.0
#: Seconds to wait for the process to exit after SIGINT (fast shutdown) before killing it.
STOP_TIMEOUT: Final = 10.0
#: Seconds allowed for ``initdb`` and for one ``psql`` call.
COMMAND_TIMEOUT: Final = 60.0
# Starts retried on a new port when the first one was taken in between.
_START_ATTEMPTS: Final = 3
_LOG_TAIL_LINES: Final = 40
_PORT_TAKEN = re.compile(
    r"could not bind|address already in use|could not create any TCP/IP", re.IGNORECASE
)


class PostgresError(RuntimeError):
    """PostgreSQL could not be set up, started, or did not do what a test asked."""


def postgres_bindir() -> Path:
    """Return the folder of ``initdb``, ``postgres``, ``pg_isready`` and ``psql``.

    Returns
    -------
    pathlib.Path
        The newest installed major version's ``bin`` folder.

    Raises
    ------
    PostgresError
        If PostgreSQL is not installed (``scripts/install`` installs it).
    """
    found = [Path(p) for p in glob.glob(_BINDIR_PATTERN) if (Path(p) / "postgres").exists()]
    if not found:
        raise PostgresError(
            "PostgreSQL is not installed: run scripts/install (apt package postgresql)"
        )
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"(no log: {error})"
    return "\n".join(text.splitlines()[-lines:])


def _as_server_user() -> dict[str, Any]:
    """Popen arguments that run a child as the ``postgres`` user when we are root."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise PostgresError(
            f"running as root, and there is no {SYSTEM_USER!r} user to run PostgreSQL as "
            "(the postgresql package creates it)"
        ) from None
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


class Postgres:
    """A running test PostgreSQL; also a context manager that stops it.

    Start one with :func:`start_postgres`.

    Attributes
    ----------
    url : str
        ``postgresql://imgindex@127.0.0.1:PORT/imgindex``.
    port : int
        The TCP port on 127.0.0.1.
    folder : pathlib.Path
        The cluster's folder (``data``, ``socket``); removed by :meth:`stop`.
    log_path : pathlib.Path
        The server's log (its stdout and stderr).
    start_seconds : float
        Time from the launch until the server accepted connections (without ``initdb``).
    """

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        *,
        port: int,
        folder: Path,
        log_path: Path,
        start_seconds: float,
    ) -> None:
        self._process = process
        self.port = port
        self.folder = folder
        self.log_path = log_path
        self.start_seconds = start_seconds
        self.url = f"postgresql://{USER}@127.0.0.1:{port}/{DATABASE}"

    def __repr__(self) -> str:
        return f"Postgres(url={self.url!r}, pid={self.pid})"

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
        """The process id of the postmaster."""
        return self._process.pid

    @property
    def running(self) -> bool:
        """Whether the postmaster has not exited."""
        return self._process.poll() is None

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """Return the last `lines` lines of the server's log."""
        return _tail(self.log_path, lines)

    def psql(self, sql: str, *, database: str = DATABASE) -> str:
        """Run SQL (one or more statements, or psql meta-commands) with ``psql``.

        Parameters
        ----------
        sql : str
            The script, fed on stdin; ``\\copy`` reads files as the calling user.
        database : str
            The database to connect to.

        Returns
        -------
        str
            What psql printed (unaligned, tuples only).

        Raises
        ------
        PostgresError
            If psql fails; the message holds its stderr.
        """
        return _psql(self.port, sql, database=database)

    def stop(self) -> None:
        """Stop the server (SIGINT, then SIGKILL after :data:`STOP_TIMEOUT` s) and remove its
        folder. Idempotent."""
        _terminate(self._process)
        shutil.rmtree(self.folder, ignore_errors=True)


def _psql(port: int, sql: str, *, database: str = DATABASE) -> str:
    command = [
        str(postgres_bindir() / "psql"),
        "-X",
        "-q",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-U",
        USER,
        "-d",
        database,
    ]
    result = subprocess.run(
        command,
        input=sql.encode(),
        capture_output=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
        env={**os.environ, "PGCONNECT_TIMEOUT": "10", "LC_ALL": "C.UTF-8"},
    )
    if result.returncode != 0:
        raise PostgresError(
            f"psql failed with status {result.returncode}: "
            f"{result.stderr.decode(errors='replace').strip()}"
        )
    return result.stdout.decode(errors="replace")


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        # SIGINT is PostgreSQL's "fast shutdown": roll back and close the sessions, then exit.
        process.send_signal(signal.SIGINT)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


def _initdb(folder: Path, log_path: Path) -> Path:
    """Make a cluster in ``folder/data`` with ``trust`` on loopback only; return its path."""
    data = folder / "data"
    as_user = _as_server_user()
    if as_user:
        os.chown(folder, as_user["user"], as_user["group"])
    folder.chmod(0o700)
    with log_path.open("ab") as log:
        result = subprocess.run(
            [
                str(postgres_bindir() / "initdb"),
                "-D",
                str(data),
                "-U",
                USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
                "--no-instructions",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=folder,
            timeout=COMMAND_TIMEOUT,
            check=False,
            env={**os.environ, "LC_ALL": "C.UTF-8"},
            **as_user,
        )
    if result.returncode != 0:
        raise PostgresError(
            f"initdb failed with status {result.returncode}; log tail:\n{_tail(log_path)}"
        )
    # Loopback TCP and the private socket only, no password: nothing else may connect.
    (data / "pg_hba.conf").write_text(
        "local all all trust\nhost all all 127.0.0.1/32 trust\n", encoding="utf-8"
    )
    return data


def _launch(
    data: Path, socket_dir: Path, log_path: Path, port: int, timeout: float
) -> tuple[subprocess.Popen[bytes], float]:
    """Start the postmaster on ``port`` and wait until it accepts connections."""
    bindir = postgres_bindir()
    began = time.perf_counter()
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                str(bindir / "postgres"),
                "-D",
                str(data),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-k",
                str(socket_dir),
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=20",
                "-c",
                "shared_buffers=32MB",
                "-c",
                "logging_collector=off",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=data.parent,
            env={**os.environ, "LC_ALL": "C.UTF-8"},
            **_as_server_user(),
        )
    try:
        while True:
            if process.poll() is not None:
                raise PostgresError(
                    f"postgres exited with status {process.returncode} while starting on port "
                    f"{port}; log tail:\n{_tail(log_path)}"
                )
            ready = subprocess.run(
                [
                    str(bindir / "pg_isready"),
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-U",
                    USER,
                    "-d",
                    "postgres",
                    "-t",
                    "2",
                ],
                capture_output=True,
                timeout=10,
                check=False,
            )
            if ready.returncode == 0:
                return process, time.perf_counter() - began
            if time.perf_counter() - began > timeout:
                raise PostgresError(
                    f"postgres did not accept connections on 127.0.0.1:{port} within "
                    f"{timeout:.0f} s; log tail:\n{_tail(log_path)}"
                )
            time.sleep(0.05)
    except BaseException:
        _terminate(process)
        raise


def start_postgres(tmp_path: Path, *, timeout: float = START_TIMEOUT) -> Postgres:
    """Start a private PostgreSQL on a free loopback port, with an empty database.

    Parameters
    ----------
    tmp_path : pathlib.Path
        Folder for the server's log (``postgres-*.log``). The cluster itself goes in a new
        folder under the system's temporary folder (see the module's docstring).
    timeout : float
        Seconds to wait for the server to accept connections.

    Returns
    -------
    Postgres
        The running server, with database :data:`DATABASE` owned by superuser :data:`USER`;
        stop it with :meth:`Postgres.stop` (or use it as a context manager).

    Raises
    ------
    PostgresError
        If PostgreSQL is not installed, ``initdb`` fails, or the server exits while starting
        or does not accept connections in time; the message ends with the tail of its log.
    """
    tmp_path.mkdir(parents=True, exist_ok=True)
    log_fd, log_name = tempfile.mkstemp(prefix="postgres-", suffix=".log", dir=tmp_path)
    os.close(log_fd)
    log_path = Path(log_name)
    folder = Path(tempfile.mkdtemp(prefix="imgindex-pg-"))
    try:
        data = _initdb(folder, log_path)
        socket_dir = folder / "socket"
        socket_dir.mkdir()
        as_user = _as_server_user()
        if as_user:
            os.chown(socket_dir, as_user["user"], as_user["group"])
        for attempt in range(1, _START_ATTEMPTS + 1):
            port = free_port()
            mark = log_path.stat().st_size
            try:
                process, seconds = _launch(data, socket_dir, log_path, port, timeout)
            except PostgresError:
                # Another process may have taken the port between free_port and the bind.
                with log_path.open("rb") as log:
                    log.seek(mark)
                    since = log.read().decode(errors="replace")
                if attempt == _START_ATTEMPTS or not _PORT_TAKEN.search(since):
                    raise
                continue
            server = Postgres(
                process, port=port, folder=folder, log_path=log_path, start_seconds=seconds
            )
            try:
                server.psql(f"CREATE DATABASE {DATABASE}", database="postgres")
            except BaseException:
                server.stop()
                raise
            return server
        raise AssertionError("unreachable")  # pragma: no cover
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(folder)
        raise
