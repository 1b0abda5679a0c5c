"""The ``imgindex`` command end to end: index-files, sql, demo, and DCMTK reading our files."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from imgindex.cli import build_parser, main
from imgindex.config import Settings
from imgindex.index import Index
from imgindex.testing import write_hospital, write_malformed_files

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tree")
    write_hospital(out / "good", seed=3, target_bytes=2_000_000, ct_size=32)
    write_malformed_files(out / "bad", seed=3)
    return out


def test_index_files_then_sql(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    assert main(["index-files", str(tree), "--root", str(root), "--workers", "2"]) == 0
    summary = capsys.readouterr().out
    assert "instances" in summary
    assert "rejected files" in summary

    assert (
        main(
            ["sql", "SELECT count(*) AS n FROM instances", "--root", str(root), "--format", "json"]
        )
        == 0
    )
    n = json.loads(capsys.readouterr().out)["n"]
    files = sum(1 for p in (tree / "good").rglob("*") if p.is_file())
    # Good files plus the bad ones that are still indexable (bad_date, odd_length, unknown_tags).
    assert n >= files

    query = "SELECT reason, location FROM rejects WHERE level = 'file' ORDER BY location"
    assert main(["sql", query, "--root", str(root), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    reasons = {Path(r["location"]).name: r["reason"] for r in rows}
    bad = {p.name for p in (tree / "bad").iterdir()}
    assert set(reasons) <= bad
    assert all(Path(r["location"]).parent.name == "bad" for r in rows)
    assert "truncated" in reasons.values()

    # A second run adds nothing.
    assert main(["index-files", str(tree), "--root", str(root)]) == 0
    capsys.readouterr()
    assert (
        main(
            ["sql", "SELECT count(*) AS n FROM instances", "--root", str(root), "--format", "json"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["n"] == n


def test_sql_lists_become_text_in_csv(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    assert main(["index-files", str(tree / "good"), "--root", str(root), "--workers", "1"]) == 0
    capsys.readouterr()
    query = "SELECT PixelSpacing FROM instances WHERE Modality = 'CT' LIMIT 1"
    assert main(["sql", query, "--root", str(root), "--format", "csv"]) == 0
    value = next(iter(csv.DictReader(io.StringIO(capsys.readouterr().out))))["PixelSpacing"]
    assert len([float(v) for v in value.split("\\")]) == 2


def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sql", "SELECT * FROM no_such_table", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("imgindex sql: error: query failed")
    assert "Traceback" not in err
    assert main(["index-files", str(tmp_path / "missing"), "--root", str(tmp_path)]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_sql_on_empty_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            ["sql", "SELECT count(*) AS n FROM series", "--root", str(tmp_path), "--format", "json"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out) == {"n": 0}


def test_every_subcommand_has_help() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {
        "index-files",
        "listen",
        "sql",
        "optimize",
        "status",
        "export",
        "deid-check",
        "demo",
    } <= set(
        sub.choices  # type: ignore[arg-type]
    )
    for name, command in sub.choices.items():  # type: ignore[union-attr]
        for action in command._actions:
            assert action.help, f"{name} {action.dest} has no help"


def test_every_setting_is_documented() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    for field in dataclasses.fields(Settings):
        assert f"`{field.name}`" in doc
        assert f"`IMGINDEX_{field.name.upper()}`" in doc


def test_every_default_attribute_is_documented() -> None:
    from imgindex.schema import DEFAULT_ATTRIBUTES

    doc = (REPO / "docs" / "index-tables.md").read_text(encoding="utf-8")
    assert [a.keyword for a in DEFAULT_ATTRIBUTES if f"`{a.keyword}`" not in doc] == []


def test_demo_runs_in_a_fresh_root(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    proc = subprocess.run(
        [str(REPO / ".venv" / "bin" / "imgindex"), "demo", "--root", str(root), "--size-mb", "5"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "per modality" in proc.stdout
    assert "CT" in proc.stdout
    assert "Where to go next" in proc.stdout
    assert (root / "tables" / "instances" / "_delta_log").is_dir()
    # The generated studies went through the listener: every one acknowledged, stored under
    # ROOT/objects, and indexed from there (the broken files are indexed from disk).
    match = re.search(r"(\d+) of (\d+) instances acknowledged", proc.stdout)
    assert match, proc.stdout
    assert match.group(1) == match.group(2)
    rows = Index(root).sql(
        "SELECT count(*) AS n FROM instances WHERE location LIKE '%/objects/%' "
        "AND source = 'IMGINDEX_SCU'"
    )
    assert rows.column("n").to_pylist() == [int(match.group(1))]
    # The synthetic EMR was imported and the example cohort ran end to end.
    from imgindex.cohort import read_selection

    assert "index patients link to an EMR person" in proc.stdout
    assert "inclusion: coronary_procedure" in proc.stdout
    selected = re.search(r"(\d+) series of (\d+) patients selected", proc.stdout)
    assert selected, proc.stdout
    table, info = read_selection(root / "selections" / "mi_cad_ct.parquet")
    assert table.num_rows == int(selected.group(1))
    assert info["cohort"]["name"] == "mi-cad-ct"
    assert set(table.column("Modality").to_pylist()) <= {"CT"}
    # ... and its series were exported, every one complete, with how to open them.
    assert "7. the cohort's series, de-identified" in proc.stdout
    assert f"{table.num_rows} exported now" in proc.stdout
    assert "0 failed" in proc.stdout
    manifest = pq.read_table(root / "exports" / "mi_cad_ct.zarr" / "manifest.parquet")
    assert manifest.num_rows == table.num_rows
    assert "zarr.open_array(" in proc.stdout
    # De-identified by default, with a demo key the demo made and said it made; the EMR rows
    # travel with the arrays.
    assert f"made a demo de-identification key: {root / 'secrets' / 'deid.key'}" in proc.stdout
    assert (root / "secrets" / "deid.key").is_file()
    assert "EMR rows of" in proc.stdout
    assert (root / "exports" / "mi_cad_ct.zarr" / "emr" / "person.parquet").is_file()
    # ... and checked: nothing identifying left.
    assert "8. anything identifying left in the export?" in proc.stdout
    assert "no findings" in proc.stdout


@pytest.mark.peers
def test_dcmtk_reads_every_generated_file(tree: Path) -> None:
    dcmdump = shutil.which("dcmdump")
    assert dcmdump, "DCMTK is not installed: scripts/install installs it"
    files = sorted(str(p) for p in (tree / "good").rglob("*") if p.is_file())
    proc = subprocess.run(
        [dcmdump, "-q", "-M", "+E", *files],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Names in ISO_IR 100 and ISO_IR 192 are printed as their raw bytes: count bytes, not text.
    assert proc.stdout.count(b"(0008,0018) UI") == len(files)
