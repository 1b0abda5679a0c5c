"""The PostgreSQL peer: a private server on loopback, what ADBC reads from it, and
``imgindex emr import postgresql://...`` against it.

Besides checking the fixture, these tests pin what PostgreSQL 15 and the ADBC driver give the
EMR import: ``numeric`` arrives as an opaque extension type over text, ``timestamptz`` as UTC.
"""

from __future__ import annotations

import datetime as dt
import os
import pwd
import socket
from pathlib import Path

import adbc_driver_postgresql.dbapi as pg
import polars as pl
import pyarrow as pa
import pytest

import peers.postgres as postgres_module
from imgindex.cli import main
from imgindex.emr import Emr, import_emr
from imgindex.errors import EmrError
from peers.postgres import SYSTEM_USER, Postgres, PostgresError, free_port, start_postgres

pytestmark = pytest.mark.peers

CDM_SCRIPT = """
CREATE SCHEMA cdm;
CREATE TABLE cdm."PERSON" (
    person_id integer NOT NULL, gender_concept_id integer NOT NULL,
    year_of_birth integer NOT NULL, race_concept_id integer NOT NULL,
    ethnicity_concept_id integer NOT NULL, person_source_value varchar(50) NULL);
INSERT INTO cdm."PERSON" VALUES (1, 8507, 1950, 0, 0, 'PAT1'), (2, 8532, 1961, 0, 0, 'PAT2');
CREATE TABLE cdm.condition_occurrence (
    condition_occurrence_id integer NOT NULL, person_id integer NOT NULL,
    condition_concept_id integer NOT NULL, condition_start_date date NOT NULL,
    condition_start_datetime timestamptz NULL, condition_type_concept_id integer NOT NULL);
INSERT INTO cdm.condition_occurrence VALUES
    (11, 2, 4329847, '2023-10-02', '2023-10-02 12:00:00+02', 32817),
    (10, 1, 4329847, '2023-10-01', NULL, 32817);
CREATE TABLE public.unrelated (x integer);
"""


@pytest.fixture(scope="module")
def cdm_postgres(postgres: Postgres) -> Postgres:
    """The module's server with a tiny CDM in schema ``cdm``."""
    postgres.psql(CDM_SCRIPT)
    return postgres


def _owner(pid: int) -> int:
    """The real uid of process ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for process {pid}")


def test_start_and_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The first port offered is taken by the time the server binds it: the start retries.
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    offered = iter([taken.getsockname()[1], free_port()])
    monkeypatch.setattr(postgres_module, "free_port", lambda: next(offered))
    try:
        server = start_postgres(tmp_path)
    finally:
        taken.close()
    assert next(offered, None) is None
    try:
        assert "already in use" in server.log_tail(200)
        assert server.running
        print(f"PostgreSQL accepted connections {server.start_seconds:.2f} s after its start")
        assert server.url == f"postgresql://imgindex@127.0.0.1:{server.port}/imgindex"
        assert server.psql("SELECT current_user, current_database()").strip() == (
            "imgindex|imgindex"
        )
        assert server.psql("SHOW listen_addresses").strip() == "127.0.0.1"
        assert server.psql("SHOW fsync").strip() == "off"
        hba = server.psql("SELECT type, address FROM pg_hba_file_rules ORDER BY line_number")
        assert hba.split() == ["local|", "host|127.0.0.1"]
        if os.geteuid() == 0:
            # PostgreSQL refuses root: the fixture runs it as the postgres system user.
            assert _owner(server.pid) == pwd.getpwnam(SYSTEM_USER).pw_uid
        assert server.folder.exists()
    finally:
        server.stop()
    assert not Path(f"/proc/{server.pid}").exists()
    assert not server.folder.exists()
    server.stop()  # idempotent
    assert server.log_path.exists()
    assert "database system is shut down" in server.log_tail()


def test_psql_errors_are_reported(postgres: Postgres) -> None:
    with pytest.raises(PostgresError, match=r"psql failed with status 3: .*nope"):
        postgres.psql("SELECT * FROM nope")


def test_adbc_reads_arrow(postgres: Postgres) -> None:
    with pg.connect(postgres.url) as con, con.cursor() as cursor:
        cursor.execute(
            "SELECT 2::integer AS i, 1.25::numeric(6,2) AS n, DATE '2023-10-01' AS d, "
            "TIMESTAMP '2023-10-01 10:11:12.5' AS t, "
            "TIMESTAMPTZ '2023-10-01 12:00:00+02' AS tz, 'x'::varchar(5) AS s"
        )
        table = cursor.fetch_arrow_table()
    assert table.schema.field("i").type == pa.int32()
    # numeric keeps its digits as text inside an extension type; the import reads the text.
    numeric = table.schema.field("n").type
    assert isinstance(numeric, pa.BaseExtensionType)
    assert numeric.storage_type == pa.string()
    assert table.column("n").chunk(0).storage.to_pylist() == ["1.25"]
    assert table.schema.field("d").type == pa.date32()
    assert table.schema.field("t").type == pa.timestamp("us")
    assert table.schema.field("tz").type == pa.timestamp("us", tz="UTC")
    assert table.column("tz").to_pylist() == [dt.datetime(2023, 10, 1, 10, 0, tzinfo=dt.UTC)]
    assert table.schema.field("s").type == pa.string()


def test_emr_import_from_postgres(
    cdm_postgres: Postgres, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    status = main(["emr", "import", cdm_postgres.url, "--schema", "cdm", "--root", str(root)])

    assert status == 0
    out = capsys.readouterr().out
    assert f"source       {cdm_postgres.url} (PostgreSQL, schema cdm)" in out
    assert "not in the source, skipped: visit_occurrence, procedure_occurrence" in out
    emr = Emr(root)
    conditions = emr.scan("condition_occurrence").collect()
    # Sorted by date; the timestamptz is stored in UTC, without a zone.
    assert conditions["condition_occurrence_id"].to_list() == [10, 11]
    assert conditions["condition_start_datetime"].to_list() == [
        None,
        dt.datetime(2023, 10, 2, 10, 0),
    ]
    assert conditions.schema["person_id"] == pl.Int64
    assert emr.links().collect().sort("person_id")["PatientID"].to_list() == ["PAT1", "PAT2"]


def test_wrong_schema_and_unreachable_server(
    cdm_postgres: Postgres, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["emr", "import", cdm_postgres.url, "--root", str(tmp_path)])
    assert status == 1
    # Without --schema: public, which has no CDM table.
    assert capsys.readouterr().err.splitlines() == [
        (
            f"imgindex emr: error: person: no person table in {cdm_postgres.url} (PostgreSQL, "
            "schema public) (found: unrelated); the person table is required"
        )
    ]

    status = main(["emr", "import", cdm_postgres.url, "--schema", "nope", "--root", str(tmp_path)])
    assert status == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("imgindex emr: error: no schema 'nope' in ")
    assert line.endswith("its schemas: cdm, public")

    # A password never shows in messages.
    closed = f"postgresql://imgindex:s3cret@127.0.0.1:{free_port()}/imgindex"
    with pytest.raises(EmrError) as caught:
        import_emr(closed, tmp_path, schema="cdm")
    message = str(caught.value)
    assert message.startswith("cannot connect to postgresql://imgindex:***@127.0.0.1:")
    assert "s3cret" not in message
