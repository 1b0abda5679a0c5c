"""Data requests (issue 9): submit, review, export de-identified, every step audited.

The world: the planted patient of the de-identification tests (two CT studies, every kind of
identifying value) and a second patient with one CT, both with a myocardial infarction in
the EMR a few days before; the cohort takes their CT series within 30 days of it (3 series,
2 persons). Each test works on its own copy of the catalog, so that request numbers, export
stores and the transfers ledger do not meet.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

import polars as pl
import pytest
from _deid_helpers import PLANTED, write_planted
from _export_helpers import index_folder, write_series

from imgindex.cohort import Cohort, read_selection
from imgindex.emr.importer import import_emr
from imgindex.export import read_manifest
from imgindex.index import Index
from imgindex.testing import make_series
from imgindex.testing.factory import Patient, make_study_info
from imgindex.web.accounts import Accounts, AuditEntry, User
from imgindex.web.requests import (
    STATUSES,
    ExportRequest,
    ExportRunner,
    RequestError,
    Requests,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

COHORT = """\
name: mi-ct
codesets:
  mi: {concepts: [4329847]}
entry: {domain: condition, codeset: mi, dates: {from: 2023-09-25, to: 2023-10-10}}
imaging: {modality: CT, after: [0, 30]}
"""
#: Nobody had an infarction in 2020: the cohort selects nothing.
EMPTY_COHORT = COHORT.replace("2023-09-25", "2020-01-01").replace("2023-10-10", "2020-12-31")
PURPOSE = "Train a segmentation model of the coronary arteries on post-MI CT."
SECOND_PATIENT = Patient(
    PatientID="RQ-SECOND-42",
    PatientName="Second^Patient",
    PatientBirthDate="19550203",
    PatientSex="M",
    SpecificCharacterSet=None,
)
PASSWORD = "a long enough password"
RUN_TIMEOUT_S = 180
MORE_SERIES = 24


def _emr(folder: Path) -> Path:
    folder.mkdir(parents=True)
    pl.DataFrame(
        {
            "person_id": [880017, 880018],
            "gender_concept_id": [8532, 8507],
            "year_of_birth": [1961, 1955],
            "month_of_birth": [4, 2],
            "day_of_birth": [17, 3],
            "race_concept_id": [0, 0],
            "ethnicity_concept_id": [0, 0],
            "person_source_value": [PLANTED["PatientID"], SECOND_PATIENT.PatientID],
        }
    ).write_parquet(folder / "person.parquet")
    pl.DataFrame(
        {
            "condition_occurrence_id": [6600001, 6600002],
            "person_id": [880017, 880018],
            "condition_concept_id": [4329847, 4329847],
            "condition_start_date": [dt.date(2023, 10, 1), dt.date(2023, 10, 4)],
            "condition_type_concept_id": [32817, 32817],
            "condition_source_value": ["I21.4", "I21.0"],
        }
    ).write_parquet(folder / "condition_occurrence.parquet")
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A catalog root: 3 CT series of 2 patients indexed, and their EMR imported."""
    base = tmp_path_factory.mktemp("requests-world")
    root = base / "root"
    write_planted(base / "planted", root)
    study = make_study_info(9300, SECOND_PATIENT, study_date="20231005")
    write_series(base / "second", make_series(9300, "CT", 3, 16, 16, patient=SECOND_PATIENT,
                                              study=study))  # fmt: skip
    index_folder(base / "second", root)
    import_emr(_emr(base / "emr"), root)
    return root


@pytest.fixture(scope="module")
def big_world(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``world`` and :data:`MORE_SERIES` more CT series of the second patient: more than an
    export admits at once (its queues hold about 15), so that one stopped early has series
    it never began."""
    base = tmp_path_factory.mktemp("requests-big-world")
    root = shutil.copytree(world, base / "root")
    study = make_study_info(9300, SECOND_PATIENT, study_date="20231005")
    for seed in range(9400, 9400 + MORE_SERIES):
        datasets = make_series(seed, "CT", 2, 8, 8, patient=SECOND_PATIENT, study=study)
        write_series(base / "more", datasets)
    index_folder(base / "more", root)
    return root


@pytest.fixture
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A copy of ``world`` for one test (of ``big_world`` when parametrized indirectly with
    ``"big"``)."""
    big = getattr(request, "param", None) == "big"
    source: Path = request.getfixturevalue("big_world" if big else "world")
    return shutil.copytree(source, tmp_path / "root")


@pytest.fixture
def accounts(root: Path) -> Accounts:
    accounts = Accounts(root)
    for name, role in (("ann", "researcher"), ("bob", "researcher"), ("rita", "reviewer"),
                       ("rex", "reviewer"), ("otto", "operator")):  # fmt: skip
        accounts.add_user(name, role, PASSWORD)
    return accounts


@pytest.fixture
def requests(root: Path, accounts: Accounts) -> Requests:
    return Requests(root, accounts)


@pytest.fixture
def runners(root: Path, requests: Requests) -> Iterator[list[ExportRunner]]:
    """Runners made by a test (``runners.append``), stopped at its end whatever happens."""
    made: list[ExportRunner] = []
    yield made
    for runner in made:
        runner.stop(timeout=60)


ANN = User("ann", "researcher")
BOB = User("bob", "researcher")
RITA = User("rita", "reviewer")
REX = User("rex", "reviewer")
OTTO = User("otto", "operator")


def _cohort(text: str = COHORT) -> Cohort:
    return Cohort.from_yaml_text(text)


def _trail(accounts: Accounts, request: ExportRequest) -> list[AuditEntry]:
    """The request's audit rows, oldest first."""
    return [e for e in reversed(accounts.audit_trail(1000)) if e.target == f"request/{request.id}"]


def _approved(requests: Requests, **kwargs: bool) -> ExportRequest:
    request = requests.submit(ANN, _cohort(), PURPOSE, **kwargs)
    return requests.review(request.id, RITA, approve=True, comment="fine")


def _runner(
    root: Path, requests: Requests, runners: list[ExportRunner], poll_s: float = 0.5
) -> ExportRunner:
    runner = ExportRunner(root, requests, workers=1, poll_s=poll_s)
    runners.append(runner)
    return runner


# -- submit -----------------------------------------------------------------------------------


def test_submit_keeps_the_selection_and_audits_it(
    root: Path, accounts: Accounts, requests: Requests
) -> None:
    request = requests.submit(ANN, _cohort(), f"  {PURPOSE}\n\n  ", with_emr=False)

    assert request.id == 1
    assert request.status == "submitted"
    assert request.requester == "ann"
    assert request.purpose == PURPOSE  # as written, stripped
    assert request.cohort_name == "mi-ct"
    assert (request.persons, request.series) == (2, 3)
    assert request.with_emr is False
    assert request.reviewer is request.review_comment is request.reviewed_at is None
    assert request.export_path is None
    assert request.outcome == {}
    assert set(request.versions) >= {"index.series", "emr.person", "emr.condition_occurrence"}
    assert request.versions["index.series"] == Index(root).table("series").version()
    assert request.folder == root.resolve() / "web" / "requests" / "1"

    table, info = read_selection(request.selection_path)
    assert table.num_rows == 3
    assert set(table.column("PatientID").to_pylist()) == {
        PLANTED["PatientID"],
        SECOND_PATIENT.PatientID,
    }
    assert info["sha256"] == request.cohort_sha256
    assert info["versions"] == request.versions
    assert request.cohort_path.read_text(encoding="utf-8") == request.cohort_yaml
    assert Cohort.from_yaml_text(request.cohort_yaml).sha256() == request.cohort_sha256
    assert [p.name for p in (root / "web" / "requests").iterdir()] == ["1"]  # no staging left
    assert requests.get(1) == request
    assert requests.get(2) is None

    (entry,) = _trail(accounts, request)
    assert (entry.user, entry.action, entry.target) == ("ann", "request_submitted", "request/1")
    assert entry.detail == {
        "cohort": "mi-ct",
        "sha256": request.cohort_sha256,
        "persons": 2,
        "series": 3,
        "purpose": PURPOSE,
        "with_emr": False,
    }
    assert entry.index_version is not None
    assert json.loads(entry.index_version) == request.versions


@pytest.mark.parametrize("user", [RITA, OTTO], ids=["reviewer", "operator"])
def test_only_researchers_submit(requests: Requests, user: User) -> None:
    with pytest.raises(RequestError, match=f"only researchers .* {user.name} is a {user.role}"):
        requests.submit(user, _cohort(), PURPOSE)
    assert requests.visible_to(RITA) == []


@pytest.mark.parametrize("purpose", ["", "   ", "for a study", "a  b  c  d  e  f  g  h  i"])
def test_submit_needs_a_purpose_of_20_characters(requests: Requests, purpose: str) -> None:
    with pytest.raises(RequestError, match="at least 20 characters"):
        requests.submit(ANN, _cohort(), purpose)
    assert requests.visible_to(RITA) == []


def test_submit_refuses_an_empty_selection(root: Path, requests: Requests) -> None:
    with pytest.raises(RequestError, match="selects no series") as caught:
        requests.submit(ANN, _cohort(EMPTY_COHORT), PURPOSE)
    assert "entry event: 0" in str(caught.value)
    assert requests.visible_to(RITA) == []
    assert not (root / "web" / "requests").exists()


def test_submit_refuses_a_cohort_that_cannot_run(root: Path, requests: Requests) -> None:
    shutil.rmtree(root / "emr" / "condition_occurrence")
    with pytest.raises(RequestError, match=r"cannot run: .*condition_occurrence"):
        requests.submit(ANN, _cohort(), PURPOSE)
    assert requests.visible_to(OTTO) == []


def test_visible_to_each_role(requests: Requests) -> None:
    first = requests.submit(ANN, _cohort(), PURPOSE)
    second = requests.submit(BOB, _cohort(), PURPOSE)
    third = requests.submit(ANN, _cohort(), PURPOSE)

    assert [r.id for r in requests.visible_to(ANN)] == [third.id, first.id]
    assert [r.id for r in requests.visible_to(BOB)] == [second.id]
    assert [r.id for r in requests.visible_to(RITA)] == [third.id, second.id, first.id]
    assert [r.id for r in requests.visible_to(OTTO)] == [third.id, second.id, first.id]
    assert requests.visible_to(User("eve", "auditor")) == []


# -- review -----------------------------------------------------------------------------------


def test_review_rules(accounts: Accounts, requests: Requests) -> None:
    request = requests.submit(ANN, _cohort(), PURPOSE)

    for user in (BOB, OTTO):
        with pytest.raises(RequestError, match="only reviewers"):
            requests.review(request.id, user, approve=True, comment="")
    with pytest.raises(RequestError, match="a comment is required"):
        requests.review(request.id, RITA, approve=False, comment="  \n ")
    # ann became a reviewer: she still may not review her own request.
    with pytest.raises(RequestError, match="is yours"):
        requests.review(request.id, User("ann", "reviewer"), approve=True, comment="")
    with pytest.raises(RequestError, match="no request 99"):
        requests.review(99, RITA, approve=True, comment="")
    assert requests.get(request.id) == request  # nothing changed

    approved = requests.review(request.id, RITA, approve=True, comment="  within the protocol ")
    assert approved.status == "approved"
    assert (approved.reviewer, approved.review_comment) == ("rita", "within the protocol")
    assert approved.reviewed_at is not None
    assert approved.reviewed_at >= approved.created_at
    with pytest.raises(RequestError, match="is approved by rita"):
        requests.review(request.id, REX, approve=True, comment="")
    with pytest.raises(RequestError, match="is approved by rita"):
        requests.review(request.id, REX, approve=False, comment="no")

    other = requests.submit(BOB, _cohort(), PURPOSE)
    rejected = requests.review(other.id, REX, approve=False, comment="purpose too vague")
    assert (rejected.status, rejected.review_comment) == ("rejected", "purpose too vague")
    with pytest.raises(RequestError, match="is rejected by rex"):
        requests.review(other.id, RITA, approve=True, comment="")

    actions = [(e.user, e.action, e.detail["comment"]) for e in _trail(accounts, request)[1:]]
    assert actions == [("rita", "request_approved", "within the protocol")]
    (entry,) = _trail(accounts, other)[1:]
    assert (entry.user, entry.action, entry.detail["comment"]) == (
        "rex",
        "request_rejected",
        "purpose too vague",
    )
    assert entry.index_version is not None
    assert json.loads(entry.index_version) == other.versions


def test_concurrent_reviews_only_one_wins(accounts: Accounts, requests: Requests) -> None:
    request = requests.submit(ANN, _cohort(), PURPOSE)
    attempts = [(RITA, True), (REX, True), (RITA, False), (REX, False)] * 3
    barrier = threading.Barrier(len(attempts))
    won: list[tuple[str, bool]] = []
    refused: list[str] = []

    def review(user: User, approve: bool) -> None:
        barrier.wait()
        try:
            requests.review(request.id, user, approve=approve, comment="decided")
        except RequestError as exc:
            refused.append(str(exc))
        else:
            won.append((user.name, approve))

    threads = [threading.Thread(target=review, args=attempt) for attempt in attempts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert len(won) == 1
    assert len(refused) == len(attempts) - 1
    assert all("only a submitted request can be reviewed" in text for text in refused)
    name, approve = won[0]
    final = requests.get(request.id)
    assert final is not None
    assert (final.reviewer, final.status) == (name, "approved" if approve else "rejected")
    reviews = [e for e in _trail(accounts, request) if e.action != "request_submitted"]
    assert [(e.user, e.action) for e in reviews] == [(name, f"request_{final.status}")]


# -- claiming ---------------------------------------------------------------------------------


def _dead_pid() -> int:
    """The process ID of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    assert child.wait(timeout=60) == 0
    return child.pid


def test_only_approved_requests_are_claimed(
    root: Path, accounts: Accounts, requests: Requests
) -> None:
    submitted = requests.submit(ANN, _cohort(), PURPOSE)
    rejected = requests.submit(BOB, _cohort(), PURPOSE)
    requests.review(rejected.id, RITA, approve=False, comment="no consent for this use")
    assert requests.claim_next() is None
    assert requests.pending() == 0

    approved = requests.review(submitted.id, REX, approve=True, comment="")
    claimed = requests.claim_next()
    assert claimed is not None
    assert (claimed.id, claimed.status) == (approved.id, "exporting")
    assert claimed.export_path == str(root.resolve() / "exports" / "request-1.zarr")
    assert requests.pending() == 1
    # Exported here and now: neither this Requests nor another one takes it again.
    assert requests.claim_next() is None
    assert Requests(root, accounts).claim_next() is None

    # A server that stopped releases it; the next claim resumes it.
    requests.release(claimed.id, "test")
    again = Requests(root, accounts).claim_next()
    assert again is not None
    assert again.id == claimed.id

    # A killed server (its process gone) leaves it to be resumed too.
    con = sqlite3.connect(accounts.path)
    with con:
        con.execute(
            "UPDATE requests SET claimed_by = ? WHERE id = ?",
            (f"{socket.gethostname()}:{_dead_pid()}", claimed.id),
        )
    con.close()
    resumed = requests.claim_next()
    assert resumed is not None
    assert resumed.id == claimed.id

    finished = requests.finish(claimed.id, ok=False, outcome={"message": "test"})
    assert (finished.status, finished.outcome) == ("failed", {"message": "test"})
    with pytest.raises(RequestError, match="is failed, not exporting"):
        requests.finish(claimed.id, ok=True, outcome={})
    assert requests.get(rejected.id) == requests.visible_to(BOB)[0]
    assert requests.visible_to(BOB)[0].status == "rejected"
    assert requests.pending() == 0

    started = [
        e.detail["resumed"] for e in _trail(accounts, claimed) if e.action == "export_started"
    ]
    assert started == [False, True, True]
    assert {e.action for e in _trail(accounts, rejected)} == {
        "request_submitted",
        "request_rejected",
    }


def test_the_export_command_is_deidentified(root: Path, requests: Requests) -> None:
    runner = ExportRunner(root, requests, workers=1)
    _approved(requests)
    request = requests.claim_next()
    assert request is not None
    command = runner.command(request)
    assert command == [
        sys.executable, "-m", "imgindex", "export", str(request.selection_path),
        "--root", str(root.resolve()), "--out", str(root.resolve() / "exports" / "request-1.zarr"),
        "--no-progress", "--with-emr", "--workers", "1",
    ]  # fmt: skip
    assert "--no-deid" not in command
    requests.finish(request.id, ok=False, outcome={})


def test_a_first_export_moves_an_earlier_store_of_its_name_aside(
    root: Path, accounts: Accounts, requests: Requests
) -> None:
    # An earlier app database's request 1 left its store: request 1 now must not resume it.
    earlier = root / "exports" / "request-1.zarr"
    earlier.mkdir(parents=True)
    (earlier / "zarr.json").write_text("{}", encoding="utf-8")
    _approved(requests)
    request = requests.claim_next()
    assert request is not None
    assert not earlier.exists()
    (aside,) = (root / "exports").glob("request-1.zarr.old-*")
    assert (aside / "zarr.json").read_text(encoding="utf-8") == "{}"
    started = _trail(accounts, request)[-1]
    assert started.action == "export_started"
    assert started.detail["moved_aside"] == str(aside.resolve())
    requests.finish(request.id, ok=False, outcome={})


# -- the runner -------------------------------------------------------------------------------


def _export_texts(out: Path) -> str:
    """The values of every Parquet file of an export, as one text."""
    return "\n".join(
        str(pl.read_parquet(path).to_dicts()) for path in sorted(out.rglob("*.parquet"))
    )


def test_the_runner_exports_an_approved_request_deidentified(
    root: Path, accounts: Accounts, requests: Requests, runners: list[ExportRunner]
) -> None:
    rejected = requests.submit(BOB, _cohort(), PURPOSE)
    requests.review(rejected.id, RITA, approve=False, comment="duplicate of request 2")
    request = requests.submit(ANN, _cohort(), PURPOSE)
    runner = _runner(root, requests, runners, poll_s=600)  # only wake() makes it look again
    runner.start()
    assert runner.wait_idle(10)
    assert runner.is_running
    assert [r.status for r in requests.visible_to(OTTO)] == ["submitted", "rejected"]
    assert not (root / "exports").exists()

    requests.review(request.id, RITA, approve=True, comment="fine")
    runner.wake()
    assert runner.wait_idle(RUN_TIMEOUT_S)
    done = requests.get(request.id)
    assert done is not None
    assert done.status == "exported", done.outcome
    outcome = done.outcome
    assert (outcome["exit_code"], outcome["complete"], outcome["failed"]) == (0, 3, 0)
    assert (outcome["skipped"], outcome["selected"]) == (0, 3)
    assert outcome["bytes_in"] > 0
    assert outcome["bytes_out"] > 0
    assert outcome["message"].startswith("3 of 3 series exported, de-identified")
    assert done.finished_at is not None
    assert done.export_path == str(root.resolve() / "exports" / "request-2.zarr")
    # Only the approved request was exported.
    assert requests.get(rejected.id) == requests.visible_to(BOB)[0]
    assert requests.visible_to(BOB)[0].export_path is None
    assert sorted(p.name for p in (root / "exports").iterdir()) == ["request-2.zarr"]

    out = root / "exports" / "request-2.zarr"
    manifest = read_manifest(out)
    assert manifest.height == 3
    texts = _export_texts(out)
    for value in (PLANTED["PatientID"], SECOND_PATIENT.PatientID, PLANTED["AccessionNumber"]):
        assert value not in texts
    assert (out / "emr" / "person.parquet").is_file()
    assert (root / "secrets" / "deid.key").is_file()  # the root's key, made by the export
    check = subprocess.run(
        [sys.executable, "-m", "imgindex", "deid-check", str(out), "--root", str(root), "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout) == []

    # The transfers ledger, which the operations page reads, has the export's series.
    ledger = Index(root).transfers.filter(pl.col("export") == done.export_path).collect()
    assert sorted(ledger["outcome"].to_list()) == ["complete"] * 3
    assert "3 series selected" in done.log_path.read_text(encoding="utf-8")

    trail = _trail(accounts, done)
    assert [(e.user, e.action) for e in trail] == [
        ("ann", "request_submitted"),
        ("rita", "request_approved"),
        ("imgindex", "export_started"),
        ("imgindex", "export_finished"),
    ]
    assert trail[3].detail["status"] == "exported"
    assert trail[3].detail["complete"] == 3
    assert {e.index_version for e in trail} == {json.dumps(done.versions)}
    runner.stop()
    assert not runner.is_running


def test_a_failed_export_says_why_and_an_operator_sends_it_again(
    root: Path, accounts: Accounts, requests: Requests, runners: list[ExportRunner]
) -> None:
    request = _approved(requests, with_emr=False)
    good = request.selection_path.read_bytes()
    request.selection_path.write_bytes(b"not parquet at all")
    runner = _runner(root, requests, runners)
    runner.start()

    assert runner.wait_idle(RUN_TIMEOUT_S)
    done = requests.get(request.id)
    assert done is not None
    assert done.status == "failed"
    assert done.outcome["exit_code"] == 1
    assert (done.outcome["complete"], done.outcome["failed"]) == (0, 0)
    message = done.outcome["message"]
    assert message.startswith("the export failed (exit code 1); the end of ")
    assert "imgindex export: error:" in message
    assert str(request.selection_path) in message
    finished = _trail(accounts, done)[-1]
    assert (finished.action, finished.detail["status"]) == ("export_finished", "failed")

    # What failed it is repaired; an operator, and only an operator, sends it again.
    request.selection_path.write_bytes(good)
    for user in (ANN, RITA):
        with pytest.raises(RequestError, match="only operators"):
            requests.retry(request.id, user)
    retried = requests.retry(request.id, OTTO)
    assert (retried.status, retried.outcome, retried.finished_at) == ("exporting", {}, None)
    with pytest.raises(RequestError, match="only a failed request"):
        requests.retry(request.id, OTTO)
    runner.wake()
    assert runner.wait_idle(RUN_TIMEOUT_S)
    again = requests.get(request.id)
    assert again is not None
    assert again.status == "exported", again.outcome
    assert (again.outcome["complete"], again.outcome["failed"]) == (3, 0)
    actions = [e.action for e in _trail(accounts, again)]
    assert actions[-4:] == [
        "export_finished",
        "export_retried",
        "export_started",
        "export_finished",
    ]
    assert _trail(accounts, again)[-3].user == "otto"


@pytest.mark.parametrize("root", ["big"], indirect=True)
def test_a_stopped_runner_leaves_the_export_to_resume(
    root: Path, accounts: Accounts, requests: Requests, runners: list[ExportRunner]
) -> None:
    total = 3 + MORE_SERIES
    request = _approved(requests)
    assert request.series == total
    first = _runner(root, requests, runners)
    first.start()
    store = root / "exports" / "request-1.zarr" / "zarr.json"
    deadline = time.monotonic() + 60
    while not store.exists():  # the export has begun: its store is made, its workers start
        assert time.monotonic() < deadline, "the export did not start"
        time.sleep(0.02)
    first.stop()

    stopped = requests.get(request.id)
    assert stopped is not None
    assert (stopped.status, stopped.child_pid, stopped.finished_at) == ("exporting", None, None)
    assert stopped.outcome == {}
    assert not first.wait_idle(0.5)  # still to do
    ledger = Index(root).transfers.filter(pl.col("export") == stopped.export_path).collect()
    assert 0 < ledger.height < total  # stopped after some series, before others began
    assert set(ledger["outcome"]) == {"complete"}

    second = _runner(root, requests, runners)
    second.start()
    assert second.wait_idle(RUN_TIMEOUT_S)
    done = requests.get(request.id)
    assert done is not None
    assert done.status == "exported", done.outcome
    assert (done.outcome["complete"], done.outcome["failed"]) == (total, 0)
    assert read_manifest(done.export_path or "").height == total
    trail = _trail(accounts, done)
    assert [e.action for e in trail] == [
        "request_submitted",
        "request_approved",
        "export_started",
        "export_stopped",
        "export_started",
        "export_finished",
    ]
    assert [e.detail.get("resumed") for e in trail if e.action == "export_started"] == [
        False,
        True,
    ]
    # SIGINT stopped the export cleanly (exit status 130: "run the same command again").
    assert trail[3].detail["reason"] == "the server stopped (export exit code 130)"
    log = done.log_path.read_text(encoding="utf-8")
    assert log.count("--- ") == 2  # two attempts, one log
    assert "stopped before the end: run the same command again to resume" in log
    resumed = f"{total - ledger.height} exported now, {ledger.height} already complete"
    assert resumed in log


def test_statuses_are_the_documented_ones() -> None:
    assert STATUSES == (
        "submitted",
        "approved",
        "rejected",
        "withdrawn",
        "exporting",
        "exported",
        "failed",
    )


def test_a_researcher_withdraws_a_request_before_its_export_begins(
    root: Path, accounts: Accounts, requests: Requests, runners: list[ExportRunner]
) -> None:
    submitted = requests.submit(ANN, _cohort(), PURPOSE)
    for other in (BOB, RITA, OTTO):
        with pytest.raises(RequestError, match="only the researcher who submitted"):
            requests.withdraw(submitted.id, other)
    assert requests.withdraw(submitted.id, ANN).status == "withdrawn"
    with pytest.raises(RequestError, match="is withdrawn"):
        requests.review(submitted.id, RITA, approve=True, comment="too late")
    approved = _approved(requests)
    assert requests.withdraw(approved.id, ANN).status == "withdrawn"
    runner = _runner(root, requests, runners)
    runner.start()
    assert runner.wait_idle(RUN_TIMEOUT_S)  # nothing to export: both withdrawn
    assert requests.claim_next() is None
    assert not (root / "exports" / f"request-{approved.id}.zarr").exists()
    exported = _approved(requests)
    runner.wake()
    assert runner.wait_idle(RUN_TIMEOUT_S)
    with pytest.raises(RequestError, match="is exported: only a request not yet exporting"):
        requests.withdraw(exported.id, ANN)
    actions = [e.action for e in _trail(accounts, approved)]
    assert actions == ["request_submitted", "request_approved", "request_withdrawn"]


def test_status_counts_the_requests_by_status(
    root: Path, accounts: Accounts, requests: Requests
) -> None:
    from imgindex.status import collect_status

    assert collect_status(root).requests == {}  # the app's database has no request yet
    first = requests.submit(ANN, _cohort(), PURPOSE)
    second = requests.submit(BOB, _cohort(), PURPOSE)
    requests.submit(ANN, _cohort(), PURPOSE)
    requests.review(first.id, RITA, approve=True, comment="fine")
    requests.review(second.id, RITA, approve=False, comment="no purpose given")
    status = collect_status(root)
    assert status.requests == {"submitted": 1, "approved": 1, "rejected": 1}
    assert "export requests (imgindex serve): 1 submitted, 1 approved, 1 rejected" in (
        status.describe()
    )
    assert status.to_dict()["requests"] == {"submitted": 1, "approved": 1, "rejected": 1}
