"""Data requests: a cohort submitted for export, reviewed, then exported de-identified.

The life of a request (:data:`STATUSES`)::

    submitted ──► approved ──► exporting ──► exported
        │   │         │          │  ▲
        │   └──► rejected        │  └── a stopped or killed server: resumed on the next start
        └─────────────┴──► withdrawn (by its researcher, before the export begins)
                                 └────► failed ──► exporting (an operator's retry)

- :meth:`Requests.submit` (researchers) runs the cohort at once and keeps what it selected,
  ``ROOT/web/requests/<id>/selection.parquet`` and ``cohort.yaml``, so the reviewer judges,
  and the export writes, exactly the series the researcher saw.
- :meth:`Requests.review` (reviewers, never their own request) approves or rejects, with a
  comment; only a ``submitted`` request can be reviewed, once.
- :class:`ExportRunner` exports approved requests one at a time, each in a subprocess
  (``python -m imgindex export``, de-identified with the root's key, never ``--no-deid``)
  writing ``ROOT/exports/request-<id>.zarr``; its output goes to
  ``ROOT/web/requests/<id>/export.log``.

Every step is appended to the audit trail (:meth:`Accounts.audit`) with the table versions
the selection read as its index version: ``request_submitted``, ``request_approved`` or
``request_rejected``, ``export_started``, ``export_stopped`` (a server stopping mid-export)
and ``export_finished``.

The requests live in the ``requests`` table of the app's SQLite file, beside the users and
the audit trail. Every status change is one conditional ``UPDATE`` whose row count says
whether it happened, so two reviewers approving at once, or two servers claiming the same
request, cannot both succeed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from imgindex.errors import CohortError, ImgindexError

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Iterator, Mapping

    from imgindex.cohort import Cohort
    from imgindex.web.accounts import Accounts, User

__all__ = ["STATUSES", "ExportRequest", "ExportRunner", "RequestError", "Requests"]

logger = logging.getLogger(__name__)

#: A request's statuses, in the order it goes through them.
STATUSES: Final = (
    "submitted",
    "approved",
    "rejected",
    "withdrawn",
    "exporting",
    "exported",
    "failed",
)
#: Characters of text a purpose needs at least (whitespace runs count as one), and at most.
MIN_PURPOSE: Final = 20
MAX_PURPOSE: Final = 5000
#: Characters a review comment may have.
MAX_COMMENT: Final = 5000
#: The audit trail's user for what the export runner does.
RUNNER_USER: Final = "imgindex"
#: Seconds between the runner's signs of life on the request it exports, and after which a
#: request ``exporting`` without one is taken as abandoned (a server on another host, or a
#: process ID used again).
HEARTBEAT_S: Final = 10.0
STALE_S: Final = 300.0
#: Lines of the export log kept in a failed request's outcome.
LOG_TAIL_LINES: Final = 15
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    requester TEXT NOT NULL,
    purpose TEXT NOT NULL,
    cohort_name TEXT NOT NULL,
    cohort_sha256 TEXT NOT NULL,
    cohort_yaml TEXT NOT NULL,
    with_emr INTEGER NOT NULL,
    status TEXT NOT NULL,
    persons INTEGER NOT NULL,
    series INTEGER NOT NULL,
    versions TEXT NOT NULL,
    created_at TEXT NOT NULL,
    reviewer TEXT,
    review_comment TEXT,
    reviewed_at TEXT,
    export_path TEXT,
    outcome TEXT NOT NULL DEFAULT '{}',
    finished_at TEXT,
    claimed_by TEXT,
    heartbeat_at REAL,
    child_pid INTEGER
);
CREATE INDEX IF NOT EXISTS requests_by_status ON requests (status, id);
"""
_COLUMNS: Final = (
    "id, requester, purpose, cohort_name, cohort_sha256, cohort_yaml, with_emr, status, "
    "persons, series, versions, created_at, reviewer, review_comment, reviewed_at, "
    "export_path, outcome, finished_at, child_pid"
)
#: Requests this process has claimed and not yet finished or released (by ID): another
#: ``Requests`` in the same process must not take them for abandoned.
_CLAIMED_HERE: set[int] = set()
_CLAIMED_LOCK = threading.Lock()


class RequestError(ImgindexError, ValueError):
    """A step on a request that is refused (wrong role, wrong status, missing purpose...);
    the message says why, for the person who tried."""


@dataclass(frozen=True)
class ExportRequest:
    """One data request, as stored.

    Attributes
    ----------
    id : int
        The request number.
    requester : str
        The researcher who submitted it.
    purpose : str
        What the data are for, in the requester's words.
    cohort_name, cohort_sha256, cohort_yaml : str
        The cohort (resolved: code sets inline) and its hash.
    with_emr : bool
        Whether the export carries the persons' OMOP rows.
    status : str
        One of :data:`STATUSES`.
    persons, series : int
        Distinct ``person_id`` and rows of the selection.
    versions : dict
        The table versions the selection read (the index version audited at every step).
    created_at : str
        When it was submitted (ISO 8601, UTC).
    reviewer, review_comment, reviewed_at : str or None
        The review, once there is one.
    export_path : str or None
        ``ROOT/exports/request-<id>.zarr`` (absolute), once the export started.
    outcome : dict
        After the export: ``exit_code``, ``complete``, ``failed``, ``skipped`` series (from
        the ``transfers`` ledger), ``bytes_in``, ``bytes_out``, ``seconds``, ``message``.
    finished_at : str or None
        When the export ended.
    child_pid : int or None
        The export process, while one runs.
    folder : Path
        ``ROOT/web/requests/<id>``: the selection, the cohort and the export log.
    """

    id: int
    requester: str
    purpose: str
    cohort_name: str
    cohort_sha256: str
    cohort_yaml: str
    with_emr: bool
    status: str
    persons: int
    series: int
    versions: dict[str, int]
    created_at: str
    reviewer: str | None
    review_comment: str | None
    reviewed_at: str | None
    export_path: str | None
    outcome: dict[str, Any]
    finished_at: str | None
    child_pid: int | None = None
    folder: Path = field(default=Path(), compare=False)

    @property
    def target(self) -> str:
        """The request as an audit target, ``request/<id>``."""
        return f"request/{self.id}"

    @property
    def selection_path(self) -> Path:
        """``ROOT/web/requests/<id>/selection.parquet``: the series to export."""
        return self.folder / "selection.parquet"

    @property
    def cohort_path(self) -> Path:
        """``ROOT/web/requests/<id>/cohort.yaml``: the cohort as submitted (resolved)."""
        return self.folder / "cohort.yaml"

    @property
    def log_path(self) -> Path:
        """``ROOT/web/requests/<id>/export.log``: the export's output, every attempt."""
        return self.folder / "export.log"


class Requests:
    """The data requests of the app serving ``root``, in the SQLite file of ``accounts``.

    Parameters
    ----------
    root : str or path-like
        The catalog root: the index, EMR, ``web/requests/`` and ``exports/``.
    accounts : Accounts
        The app's users and audit trail; the requests table is in the same file.
    """

    def __init__(self, root: str | os.PathLike[str], accounts: Accounts) -> None:
        # Resolved, as the export resolves its --out: the ledger names the export by it.
        self.root = Path(root).resolve()
        self.accounts = accounts
        self.path = accounts.path
        self.folder = self.root / "web" / "requests"
        self.exports = self.root / "exports"
        self._owner = f"{socket.gethostname()}:{os.getpid()}"

    def __repr__(self) -> str:
        return f"Requests({str(self.root)!r})"

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """A connection in one transaction, committed on success (as :class:`Accounts`)."""
        from imgindex.web.accounts import transaction

        with transaction(self.path, _SCHEMA) as con:
            yield con

    def export_path_of(self, request_id: int) -> Path:
        """Where request ``request_id`` is exported: ``ROOT/exports/request-<id>.zarr``."""
        return self.exports / f"request-{request_id}.zarr"

    # -- reading -------------------------------------------------------------------------

    def get(self, request_id: int) -> ExportRequest | None:
        """Request ``request_id``, if there is one."""
        with self._db() as con:
            row = con.execute(
                f"SELECT {_COLUMNS} FROM requests WHERE id = ?", (request_id,)
            ).fetchone()
        return self._request(row) if row else None

    def visible_to(self, user: User) -> list[ExportRequest]:
        """The requests ``user`` may see, newest first: a researcher their own, reviewers and
        operators all of them, other roles none."""
        params: tuple[str, ...]
        if user.role == "researcher":
            where, params = "WHERE requester = ?", (user.name,)
        elif user.role in ("reviewer", "operator"):
            where, params = "", ()
        else:
            return []
        with self._db() as con:
            rows = con.execute(
                f"SELECT {_COLUMNS} FROM requests {where} ORDER BY id DESC", params
            ).fetchall()
        return [self._request(row) for row in rows]

    def pending(self) -> int:
        """Requests approved or exporting: the export runner's work left."""
        with self._db() as con:
            (count,) = con.execute(
                "SELECT count(*) FROM requests WHERE status IN ('approved', 'exporting')"
            ).fetchone()
        return int(count)

    def _request(self, row: tuple[Any, ...]) -> ExportRequest:
        (
            request_id, requester, purpose, cohort_name, sha, cohort_yaml, with_emr, status,
            persons, series, versions, created_at, reviewer, comment, reviewed_at,
            export_path, outcome, finished_at, child_pid,
        ) = row  # fmt: skip
        return ExportRequest(
            id=request_id,
            requester=requester,
            purpose=purpose,
            cohort_name=cohort_name,
            cohort_sha256=sha,
            cohort_yaml=cohort_yaml,
            with_emr=bool(with_emr),
            status=status,
            persons=persons,
            series=series,
            versions=json.loads(versions),
            created_at=created_at,
            reviewer=reviewer,
            review_comment=comment,
            reviewed_at=reviewed_at,
            export_path=export_path,
            outcome=json.loads(outcome or "{}"),
            finished_at=finished_at,
            child_pid=child_pid,
            folder=self.folder / str(request_id),
        )

    def _require(self, request_id: int) -> ExportRequest:
        request = self.get(request_id)
        if request is None:
            raise RequestError(f"there is no request {request_id}")
        return request

    # -- researchers and reviewers -------------------------------------------------------

    def submit(
        self, user: User, cohort: Cohort, purpose: str, *, with_emr: bool = True
    ) -> ExportRequest:
        """Submit ``cohort`` for export: run it now and keep what it selected.

        Parameters
        ----------
        user : User
            The researcher asking.
        cohort : Cohort
            What to export.
        purpose : str
            What the data are for (at least :data:`MIN_PURPOSE` characters): the reviewer
            decides on it.
        with_emr : bool
            Export the persons' OMOP rows with the images.

        Returns
        -------
        ExportRequest
            The request, ``submitted``.

        Raises
        ------
        RequestError
            If ``user`` is not a researcher, the purpose is missing or too short, the cohort
            cannot run, or it selects no series.
        """
        from imgindex.cohort import select

        if user.role != "researcher":
            raise RequestError(
                f"only researchers submit export requests; {user.name} is a {user.role}"
            )
        text = purpose.strip()
        length = len(" ".join(text.split()))
        if length < MIN_PURPOSE:
            raise RequestError(
                f"say what the data are for, in at least {MIN_PURPOSE} characters: the "
                f"reviewer decides on it ({length} given)"
            )
        if length > MAX_PURPOSE:
            raise RequestError(f"the purpose has {length} characters; at most {MAX_PURPOSE}")
        try:
            selection = select(cohort, self.root)
        except CohortError as exc:
            raise RequestError(f"the cohort {cohort.name!r} cannot run: {exc}") from exc
        table = selection.table
        if table.num_rows == 0:
            steps = "; ".join(
                f"{step}: {persons}"
                for step, persons in zip(
                    selection.attrition.column("step").to_pylist(),
                    selection.attrition.column("persons").to_pylist(),
                    strict=True,
                )
            )
            raise RequestError(
                f"the cohort {cohort.name!r} selects no series, so there is nothing to export "
                f"(persons kept at each step: {steps or 'none'}); change it and submit again"
            )
        persons = len(set(table.column("person_id").to_pylist()))
        cohort_yaml = selection.cohort.to_yaml()
        # The selection names patients: ROOT/web and below are the server's alone.
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.folder.mkdir(exist_ok=True, mode=0o700)
        # Written under a temporary name first, so that a request never names missing files.
        staging = self.folder / f".new-{uuid.uuid4().hex}"
        try:
            selection.write(staging / "selection.parquet")
            (staging / "cohort.yaml").write_text(cohort_yaml, encoding="utf-8")
            with self._db() as con:
                cursor = con.execute(
                    "INSERT INTO requests (requester, purpose, cohort_name, cohort_sha256, "
                    "cohort_yaml, with_emr, status, persons, series, versions, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, 'submitted', ?, ?, ?, ?)",
                    (
                        user.name, text, selection.cohort.name, selection.sha256, cohort_yaml,
                        int(with_emr), persons, table.num_rows,
                        json.dumps(selection.versions, sort_keys=True), _now(),
                    ),
                )  # fmt: skip
                request_id = cursor.lastrowid
                assert request_id is not None
                target = self.folder / str(request_id)
                if target.exists():  # left by an earlier app database: keep it, aside
                    target.rename(target.with_name(f"{request_id}.old-{uuid.uuid4().hex[:8]}"))
                staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        request = self._require(request_id)
        self.accounts.audit(
            user.name,
            "request_submitted",
            request.target,
            {
                "cohort": request.cohort_name,
                "sha256": request.cohort_sha256,
                "persons": request.persons,
                "series": request.series,
                "purpose": request.purpose,
                "with_emr": request.with_emr,
            },
            index_version=request.versions,
        )
        logger.info("request %d submitted by %s", request_id, user.name)
        return request

    def withdraw(self, request_id: int, researcher: User) -> ExportRequest:
        """Withdraw a request (its researcher, before its export begins: ``submitted`` or
        ``approved``). Audits ``request_withdrawn``.

        Raises
        ------
        RequestError
            For another user, an unknown request, or one already exporting, exported,
            failed, rejected or withdrawn.
        """
        request = self._require(request_id)
        if researcher.name != request.requester:
            raise RequestError("only the researcher who submitted a request withdraws it")
        with self._db() as con:
            changed = con.execute(
                "UPDATE requests SET status = 'withdrawn', finished_at = ? "
                "WHERE id = ? AND status IN ('submitted', 'approved')",
                (_now(), request_id),
            ).rowcount
        if changed != 1:
            current = self._require(request_id)
            raise RequestError(
                f"request {request_id} is {current.status}: only a request not yet exporting "
                "is withdrawn"
            )
        self.accounts.audit(
            researcher.name,
            "request_withdrawn",
            request.target,
            {"was": request.status},
            index_version=request.versions,
        )
        return self._require(request_id)

    def review(
        self, request_id: int, reviewer: User, *, approve: bool, comment: str
    ) -> ExportRequest:
        """Approve or reject a submitted request.

        Parameters
        ----------
        request_id : int
            The request.
        reviewer : User
            A reviewer other than the requester.
        approve : bool
            Approve (the export starts) or reject.
        comment : str
            Why; required to reject.

        Returns
        -------
        ExportRequest
            The request, ``approved`` or ``rejected``.

        Raises
        ------
        RequestError
            If ``reviewer`` is not a reviewer or is the requester, the request does not exist
            or is not ``submitted`` (reviewed already), or a rejection has no comment.
        """
        if reviewer.role != "reviewer":
            raise RequestError(
                f"only reviewers approve or reject requests; {reviewer.name} is a {reviewer.role}"
            )
        comment = comment.strip()
        if not approve and not comment:
            raise RequestError("say why the request is rejected: a comment is required")
        if len(comment) > MAX_COMMENT:
            raise RequestError(f"the comment has {len(comment)} characters; at most {MAX_COMMENT}")
        request = self._require(request_id)
        if request.requester == reviewer.name:
            raise RequestError(f"request {request_id} is yours: another reviewer must review it")
        status = "approved" if approve else "rejected"
        with self._db() as con:
            changed = con.execute(
                "UPDATE requests SET status = ?, reviewer = ?, review_comment = ?, "
                "reviewed_at = ? WHERE id = ? AND status = 'submitted' AND requester <> ?",
                (status, reviewer.name, comment or None, _now(), request_id, reviewer.name),
            ).rowcount
        if changed != 1:
            now = self._require(request_id)
            by = f" by {now.reviewer}" if now.reviewer else ""
            raise RequestError(
                f"request {request_id} is {now.status}{by}: only a submitted request can be "
                "reviewed"
            )
        self.accounts.audit(
            reviewer.name,
            f"request_{status}",
            request.target,
            {"comment": comment, "cohort": request.cohort_name, "sha256": request.cohort_sha256},
            index_version=request.versions,
        )
        logger.info("request %d %s by %s", request_id, status, reviewer.name)
        return self._require(request_id)

    def retry(self, request_id: int, operator: User) -> ExportRequest:
        """Export a ``failed`` request again (operators, after fixing what failed it): it
        goes back to ``exporting``, unclaimed, so the runner resumes its export (series
        already complete are kept; the others are tried again). Audits ``export_retried``.

        Raises
        ------
        RequestError
            For a user who is not an operator, an unknown request, or one not ``failed``.
        """
        if operator.role != "operator":
            raise RequestError(
                f"only operators export a failed request again, not {operator.role}s"
            )
        request = self._require(request_id)
        with self._db() as con:
            changed = con.execute(
                "UPDATE requests SET status = 'exporting', claimed_by = NULL, child_pid = NULL, "
                "heartbeat_at = NULL, finished_at = NULL, outcome = '{}' "
                "WHERE id = ? AND status = 'failed'",
                (request_id,),
            ).rowcount
        if changed != 1:
            current = self._require(request_id)
            raise RequestError(
                f"request {request_id} is {current.status}: only a failed request is exported again"
            )
        self.accounts.audit(
            operator.name,
            "export_retried",
            request.target,
            {"previous": request.outcome.get("message", "")},
            index_version=request.versions,
        )
        logger.info("request %d sent to export again by %s", request_id, operator.name)
        return self._require(request_id)

    # -- the export runner ---------------------------------------------------------------

    def claim_next(self) -> ExportRequest | None:
        """Take the oldest request to export, and mark it ``exporting`` by this process.

        An ``approved`` request is taken, and so is one ``exporting`` that nobody exports
        any more (its server stopped, or was killed): its export resumes. One ``exporting``
        by a live server (this process included) is left alone. Audits ``export_started``.

        Returns
        -------
        ExportRequest or None
            The request, ``exporting`` with its ``export_path`` set; ``None`` if there is
            nothing to export. Its ``child_pid`` is the export process an abandoned request
            may have left running.
        """
        with self._db() as con:
            con.execute("BEGIN IMMEDIATE")  # pick and mark in one write transaction
            rows = con.execute(
                "SELECT id, status, claimed_by, heartbeat_at FROM requests "
                "WHERE status IN ('approved', 'exporting') ORDER BY id"
            ).fetchall()
            picked = next(
                (
                    (request_id, status)
                    for request_id, status, owner, beat in rows
                    if status == "approved" or _abandoned(request_id, owner, beat)
                ),
                None,
            )
            if picked is None:
                return None
            request_id, was = picked
            con.execute(
                "UPDATE requests SET status = 'exporting', claimed_by = ?, heartbeat_at = ?, "
                "export_path = ? WHERE id = ?",
                (self._owner, time.time(), str(self.export_path_of(request_id)), request_id),
            )
        with _CLAIMED_LOCK:
            _CLAIMED_HERE.add(request_id)
        request = self._require(request_id)
        detail: dict[str, Any] = {"export": request.export_path, "resumed": was == "exporting"}
        out = self.export_path_of(request_id)
        if was == "approved" and out.exists():
            # A first export finding a store: one of an earlier app database's request with
            # this number. Resuming it would mix two requests' series: keep it, aside.
            aside = out.with_name(f"{out.name}.old-{uuid.uuid4().hex[:8]}")
            out.rename(aside)
            logger.warning("request %d: moved an earlier %s to %s", request_id, out, aside)
            detail["moved_aside"] = str(aside)
        self.accounts.audit(
            RUNNER_USER, "export_started", request.target, detail, index_version=request.versions
        )
        return request

    def heartbeat(self, request_id: int, child_pid: int | None = None) -> None:
        """Note that this process still exports ``request_id`` (and its export process)."""
        with self._db() as con:
            if child_pid is None:
                con.execute(
                    "UPDATE requests SET heartbeat_at = ? WHERE id = ? AND claimed_by = ?",
                    (time.time(), request_id, self._owner),
                )
            else:
                con.execute(
                    "UPDATE requests SET heartbeat_at = ?, child_pid = ? "
                    "WHERE id = ? AND claimed_by = ?",
                    (time.time(), child_pid, request_id, self._owner),
                )

    def _unclaim(self, request_id: int, also_set: str, values: tuple[object, ...]) -> ExportRequest:
        """Let go of an ``exporting`` request (claimed by nobody, no child), setting
        ``also_set`` (``"column = ?, "`` ...) to ``values`` in the same update.

        Raises
        ------
        RequestError
            If the request is not ``exporting``.
        """
        with self._db() as con:
            changed = con.execute(
                f"UPDATE requests SET {also_set}claimed_by = NULL, child_pid = NULL "
                "WHERE id = ? AND status = 'exporting'",
                (*values, request_id),
            ).rowcount
        with _CLAIMED_LOCK:
            _CLAIMED_HERE.discard(request_id)
        request = self._require(request_id)
        if changed != 1:
            raise RequestError(f"request {request_id} is {request.status}, not exporting")
        return request

    def release(self, request_id: int, reason: str) -> ExportRequest:
        """Leave ``request_id`` ``exporting`` but claimed by nobody, so that the next
        :meth:`claim_next` resumes it (a server stopping mid-export). Audits
        ``export_stopped``.

        Raises
        ------
        RequestError
            If the request is not ``exporting``.
        """
        request = self._unclaim(request_id, "", ())
        self.accounts.audit(
            RUNNER_USER,
            "export_stopped",
            request.target,
            {"export": request.export_path, "reason": reason},
            index_version=request.versions,
        )
        return request

    def finish(self, request_id: int, *, ok: bool, outcome: Mapping[str, Any]) -> ExportRequest:
        """End an export: ``exported`` if ``ok``, else ``failed``, with its ``outcome``.
        Audits ``export_finished`` with the outcome.

        Raises
        ------
        RequestError
            If the request is not ``exporting``.
        """
        status = "exported" if ok else "failed"
        details = dict(outcome)
        request = self._unclaim(
            request_id,
            "status = ?, outcome = ?, finished_at = ?, ",
            (status, json.dumps(details, default=str, sort_keys=True), _now()),
        )
        self.accounts.audit(
            RUNNER_USER,
            "export_finished",
            request.target,
            {"status": status, "export": request.export_path, **details},
            index_version=request.versions,
        )
        logger.info("request %d %s", request_id, status)
        return request


def _abandoned(request_id: int, owner: str | None, beat: float | None) -> bool:
    """Whether an ``exporting`` request is exported by nobody any more."""
    if owner is None or beat is None or time.time() - beat > STALE_S:
        return True
    host, _, pid_text = owner.rpartition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False  # another host's server: only its silence (STALE_S) tells
    pid = int(pid_text)
    if pid == os.getpid():
        with _CLAIMED_LOCK:
            return request_id not in _CLAIMED_HERE
    return not _is_alive(pid)


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ExportRunner:
    """One background thread that exports approved requests, one at a time, in a subprocess.

    Parameters
    ----------
    root : str or path-like
        The catalog root (as given to ``requests``).
    requests : Requests
        The requests to export.
    workers : int, optional
        ``--workers`` of the export (default: one per CPU).
    poll_s : float
        Seconds between looks for approved requests when nothing :meth:`wake` s the runner
        (requests approved by another process).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        requests: Requests,
        *,
        workers: int | None = None,
        poll_s: float = 5.0,
    ) -> None:
        self.root = Path(root).resolve()
        self.requests = requests
        self.workers = workers
        self.poll_s = poll_s
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._busy = False

    def __repr__(self) -> str:
        return f"ExportRunner({str(self.root)!r}, workers={self.workers})"

    @property
    def is_running(self) -> bool:
        """Whether the runner's thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the thread (if it does not run); a request left ``exporting`` by a stopped
        or killed server is taken first, and its export resumes."""
        if self.is_running:
            return
        self._stopping.clear()
        self._wake.set()
        self._thread = threading.Thread(
            target=self._loop, name="imgindex-export-runner", daemon=True
        )
        self._thread.start()

    def wake(self) -> None:
        """Look for approved requests now (call after an approval)."""
        self._wake.set()

    def stop(self, timeout: float = 30) -> None:
        """Stop the thread: a running export gets SIGINT, finishes the series in flight and
        exits; its request stays ``exporting`` and resumes on the next :meth:`start`. An
        export still running after ``timeout`` seconds is killed (it resumes all the same)."""
        self._stopping.set()
        self._wake.set()
        self._signal_child(signal.SIGINT)
        thread = self._thread
        if thread is None:
            return
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("the export did not stop in %.0f s after SIGINT: killing it", timeout)
            self._signal_child(signal.SIGKILL)
            thread.join(10)
        self._thread = None

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is approved or exporting; whether that happened in
        ``timeout`` seconds (for tests and scripts)."""
        deadline = time.monotonic() + timeout
        while True:
            if not self._busy and self.requests.pending() == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def _signal_child(self, signum: signal.Signals) -> None:
        with self._lock:
            child = self._child
            if child is not None and child.poll() is None:
                child.send_signal(signum)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._busy = True
                request = self.requests.claim_next()
                if request is not None:
                    try:
                        self._export(request)
                    except Exception:
                        # Released, so that this process takes it again on its next look.
                        self.requests.release(request.id, "the export runner failed")
                        raise
                    continue
            except Exception:
                # The runner outlives a bad moment (a locked or full disk): look again later.
                logger.exception("the export runner failed; it looks again in %.0f s", self.poll_s)
            finally:
                self._busy = False
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def command(self, request: ExportRequest) -> list[str]:
        """The export command of ``request`` (de-identified: never ``--no-deid``)."""
        assert request.export_path is not None
        command = [
            sys.executable, "-m", "imgindex", "export", str(request.selection_path),
            "--root", str(self.root), "--out", request.export_path, "--no-progress",
        ]  # fmt: skip
        if request.with_emr:
            command.append("--with-emr")
        if self.workers is not None:
            command += ["--workers", str(self.workers)]
        return command

    def _export(self, request: ExportRequest) -> None:
        """Run the export of a claimed request to its end (or to :meth:`stop`)."""
        if request.child_pid is not None:
            _end_orphan(request.child_pid, request.export_path or "")
        if self._stopping.is_set():
            self.requests.release(request.id, "the server stopped before the export began")
            return
        command = self.command(request)
        request.folder.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        with request.log_path.open("ab") as log:
            log.write(f"--- {_now()}: {' '.join(command)}\n".encode())
            log.flush()
            try:
                # A session of its own: a Ctrl-C at the server's terminal reaches the child
                # only through stop(), which then leaves the request to resume.
                child = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.root,
                    start_new_session=True,
                )
            except OSError as exc:
                self.requests.finish(
                    request.id,
                    ok=False,
                    outcome={"exit_code": None, "message": f"cannot start the export: {exc}"},
                )
                return
            with self._lock:
                self._child = child
            if self._stopping.is_set():  # stop() came between the claim and the start
                self._signal_child(signal.SIGINT)
            try:
                self.requests.heartbeat(request.id, child.pid)
                while True:
                    try:
                        code = child.wait(timeout=HEARTBEAT_S)
                        break
                    except subprocess.TimeoutExpired:
                        self.requests.heartbeat(request.id)
            finally:
                if child.poll() is None:  # the runner itself failed: do not leave it behind
                    child.kill()
                child.wait()
                with self._lock:
                    self._child = None
        if self._stopping.is_set() and code != 0:
            self.requests.release(request.id, f"the server stopped (export exit code {code})")
            return
        outcome = _outcome(self.root, request, code, time.monotonic() - began)
        self.requests.finish(request.id, ok=code == 0, outcome=outcome)


def _outcome(root: Path, request: ExportRequest, code: int, seconds: float) -> dict[str, Any]:
    """The export's result: its exit code, and its series by outcome from the ledger."""
    import polars as pl
    import pyarrow.parquet as pq

    from imgindex.index import Index

    counts = {"complete": 0, "failed": 0, "skipped": 0}
    bytes_in = bytes_out = 0
    try:
        # The ledger names the store as the export resolved its --out; only this request's
        # series count (rows of an earlier store of the same name may be there too).
        store = str(Path(request.export_path or "").resolve())
        uids = pq.read_table(request.selection_path, columns=["SeriesInstanceUID"])
        rows = (
            Index(root)
            .transfers.filter(
                pl.col("export") == store,
                pl.col("SeriesInstanceUID").is_in(uids.column(0).to_pylist()),
            )
            .group_by("outcome")
            .agg(
                pl.len().alias("series"),
                pl.col("bytes_in").sum().alias("bytes_in"),
                pl.col("bytes_out").sum().alias("bytes_out"),
            )
            .collect()
        )
    except Exception as exc:  # the ledger unreadable: the exit code still says what happened
        logger.warning(
            "cannot read the transfers ledger for %s: %s", request.export_path, exc, exc_info=True
        )
        rows = None
    if rows is not None:
        for row in rows.iter_rows(named=True):
            counts[row["outcome"]] = counts.get(row["outcome"], 0) + row["series"]
            bytes_in += row["bytes_in"] or 0
            bytes_out += row["bytes_out"] or 0
    if code == 0:
        message = (
            f"{counts['complete']} of {request.series} series exported, de-identified, to "
            f"{request.export_path}"
            + (f" ({counts['skipped']} had nothing to export)" if counts["skipped"] else "")
        )
    else:
        why = (
            f"killed by {signal.Signals(-code).name}"
            if code < 0 and -code in signal.valid_signals()
            else f"exit code {code}"
        )
        message = f"the export failed ({why}); the end of {request.log_path}:\n" + _tail(
            request.log_path
        )
    return {
        "exit_code": code,
        **counts,
        "selected": request.series,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "seconds": round(seconds, 3),
        "message": message,
    }


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 64 * 1024))
            text = log.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(cannot read it: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _end_orphan(pid: int, export_path: str, timeout_s: float = 60.0) -> None:
    """Stop an export a killed server left running (if ``pid`` still is that export), so
    that the resumed export does not write the same store beside it."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return  # gone (or no /proc to tell: nothing known to stop)
    if export_path.encode() not in cmdline or b"export" not in cmdline:
        return  # the process ID now belongs to something else
    logger.warning("stopping export process %d left by an earlier server", pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + timeout_s
    while _is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _is_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
