"""imgindex.index: instances as the source of truth, series and studies derived from them."""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow as pa
import pytest

from imgindex.extract import Extractor
from imgindex.index import TABLE_NAMES, Index, IndexWriter
from imgindex.schema import REJECT_SCHEMA, instance_schema
from imgindex.testing import make_patient, make_series, make_study_info, write_dataset

if TYPE_CHECKING:
    from pathlib import Path

NOW = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Instance rows of two studies: one with a CT and an MR series, one with a CT series."""
    folder = tmp_path_factory.mktemp("dicom")
    patient = make_patient(1)
    study = make_study_info(1, patient, modality="CT")
    datasets = [
        *make_series(1, "CT", 3, patient=patient, study=study, series_number=1),
        *make_series(2, "MR", 2, patient=patient, study=study, series_number=2),
        *make_series(3, "CT", 2),
    ]
    extractor = Extractor(source="test")
    out = []
    for number, ds in enumerate(datasets):
        path = folder / f"IM{number:03d}"
        write_dataset(ds, path)
        result = extractor.extract_file(path, indexed_at=NOW)
        assert result.row is not None
        assert result.rejects == []
        out.append(result.row)
    return out


def by_key(table: pa.Table, key: str) -> dict[str, dict[str, Any]]:
    return {r[key]: r for r in table.to_pylist()}


def snapshot(index: Index) -> dict[str, list[dict[str, Any]]]:
    """Every table's rows, in key order."""
    keys = {
        "instances": "SOPInstanceUID",
        "series": "SeriesInstanceUID",
        "studies": "StudyInstanceUID",
        "rejects": "reject_id",
    }
    return {name: index.scan(name).sort(key).collect().to_dicts() for name, key in keys.items()}


def expected_series(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row["SeriesInstanceUID"]].append(row)
    return {
        uid: {
            "instance_count": len(members),
            "frame_count": sum(r.get("NumberOfFrames") or 1 for r in members),
            "size_bytes": sum(r["size_bytes"] for r in members),
            "Modality": members[0]["Modality"],
            "StudyInstanceUID": members[0]["StudyInstanceUID"],
            "sop_class_uids": sorted({r["SOPClassUID"] for r in members}),
        }
        for uid, members in groups.items()
    }


def expected_studies(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row["StudyInstanceUID"]].append(row)
    return {
        uid: {
            "instance_count": len(members),
            "series_count": len({r["SeriesInstanceUID"] for r in members}),
            "size_bytes": sum(r["size_bytes"] for r in members),
            "ModalitiesInStudy": sorted({r["Modality"] for r in members}),
            "PatientID": members[0]["PatientID"],
        }
        for uid, members in groups.items()
    }


def assert_derived_match(index: Index, rows: list[dict[str, Any]]) -> None:
    series = by_key(index.series.collect().to_arrow(), "SeriesInstanceUID")
    want = expected_series(rows)
    assert set(series) == set(want)
    for uid, expected in want.items():
        assert {k: series[uid][k] for k in expected} == expected, uid
    studies = by_key(index.studies.collect().to_arrow(), "StudyInstanceUID")
    want = expected_studies(rows)
    assert set(studies) == set(want)
    for uid, expected in want.items():
        assert {k: studies[uid][k] for k in expected} == expected, uid
    # Counts add up across the levels.
    n = len(rows)
    assert sum(s["instance_count"] for s in series.values()) == n
    assert sum(s["instance_count"] for s in studies.values()) == n
    assert sum(s["series_count"] for s in studies.values()) == len(series)


def test_series_and_studies_follow_instances(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    writer = IndexWriter(tmp_path)
    # The first CT series arrives in two batches: its row is recomputed whole each time.
    writer.write(rows[:2], [])
    assert_derived_match(Index(tmp_path), rows[:2])
    writer.write(rows[2:], [])
    index = Index(tmp_path)
    assert_derived_match(index, rows)
    assert index.instances.select(pl.len()).collect().item() == len(rows) == 7
    studies = by_key(index.studies.collect().to_arrow(), "StudyInstanceUID")
    assert sorted(s["ModalitiesInStudy"] for s in studies.values()) == [["CT"], ["CT", "MR"]]


def test_writing_the_same_rows_again_changes_no_rows(
    tmp_path: Path, rows: list[dict[str, Any]]
) -> None:
    writer = IndexWriter(tmp_path)
    writer.write(rows, [])
    index = Index(tmp_path)
    before, versions = snapshot(index), index.versions()
    writer.write(rows, [])
    writer.write(pa.Table.from_pylist(rows[3:], instance_schema()), [])
    assert snapshot(index) == before
    assert {k: len(v) for k, v in before.items()} == {
        "instances": 7,
        "series": 3,
        "studies": 2,
        "rejects": 0,
    }
    after = index.versions()
    assert after["instances"] == (versions["instances"] or 0) + 2


def same_schema(got: pa.Schema, want: pa.Schema) -> bool:
    """Equal names and types; DuckDB names the UTC time zone of its results 'Etc/UTC'."""

    def normal(t: pa.DataType) -> pa.DataType:
        if pa.types.is_timestamp(t) and t.tz in ("UTC", "Etc/UTC"):
            return pa.timestamp(t.unit, tz="UTC")
        return t

    return got.names == want.names and all(
        normal(g.type) == normal(w.type) for g, w in zip(got, want, strict=True)
    )


def test_empty_root_has_empty_tables_with_their_schema(tmp_path: Path) -> None:
    index = Index(tmp_path / "nothing-yet")
    assert index.versions() == dict.fromkeys(TABLE_NAMES)
    for name in TABLE_NAMES:
        result = index.sql(f"SELECT count(*) AS n FROM {name}")
        assert result.to_pylist() == [{"n": 0}]
        assert index.scan(name).collect().height == 0
    assert same_schema(index.sql("SELECT * FROM instances").schema, instance_schema())
    assert same_schema(index.sql("SELECT * FROM rejects").schema, REJECT_SCHEMA)
    assert index.scan("instances").collect_schema().names() == instance_schema().names
    assert {"instance_count", "frame_count", "size_bytes", "Modality"} <= set(
        index.sql("SELECT * FROM series").schema.names
    )
    assert {"ModalitiesInStudy", "series_count", "instance_count"} <= set(
        index.sql("SELECT * FROM studies").schema.names
    )
    # A query joining the empty tables runs too.
    joined = index.sql(
        "SELECT st.StudyInstanceUID, count(*) AS n FROM studies st "
        "JOIN series se USING (StudyInstanceUID) GROUP BY ALL"
    )
    assert joined.num_rows == 0
    with pytest.raises(ValueError, match="no table 'patients'"):
        index.scan("patients")


def test_sql_and_scan_after_writes(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    # Two writes: the first creates the table, the second merges into it.
    IndexWriter(tmp_path).write(rows[: len(rows) // 2], [])
    IndexWriter(tmp_path).write(rows[len(rows) // 2 :], [])
    index = Index(tmp_path)
    result = index.sql(
        "SELECT se.Modality, count(*) AS n, any_value(se.instance_count) AS per_series "
        "FROM instances i JOIN series se USING (SeriesInstanceUID) "
        "GROUP BY ALL ORDER BY n DESC, se.Modality"
    )
    counts = Counter(r["Modality"] for r in rows)
    assert [(r["Modality"], r["n"]) for r in result.to_pylist()] == sorted(
        counts.items(), key=lambda kv: (-kv[1], kv[0])
    )
    for frame in (index.instances, index.series, index.studies, index.rejects):
        assert isinstance(frame, pl.LazyFrame)
    # Filters on text columns (pushed down to the Parquet reader); once broken by a
    # pyarrow dataset that had no (string, string_view) comparison.
    first = rows[0]["SOPInstanceUID"]
    where = index.sql(
        f"SELECT count(*) AS n FROM instances WHERE SOPInstanceUID = '{first}' "
        "AND Modality IN ('CT', 'MR', 'OT', 'SR')"
    )
    assert where.column("n").to_pylist() == [1]
    mr = index.instances.filter(pl.col("Modality") == "MR").select("SOPInstanceUID").collect()
    assert sorted(mr.to_series().to_list()) == sorted(
        r["SOPInstanceUID"] for r in rows if r["Modality"] == "MR"
    )
    assert index.instances.collect().schema["StudyDate"] == pl.Date
    # Written tables have the schema of the empty ones, so queries work before and after.
    empty = Index(tmp_path / "empty")
    for name in ("instances", "series", "studies"):
        query = f"SELECT * FROM {name}"
        assert index.sql(query).schema == empty.sql(query).schema, name


def test_rebuild_gives_the_incremental_rows(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    writer = IndexWriter(tmp_path)
    for start in range(0, len(rows), 3):
        writer.write(rows[start : start + 3], [])
    index = Index(tmp_path)
    incremental = snapshot(index)
    index.rebuild_derived()
    assert snapshot(index) == incremental
    assert_derived_match(index, rows)


def test_versions_and_derived_from(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    writer = IndexWriter(tmp_path)
    index = Index(tmp_path)
    writer.write(rows[:3], [])
    assert index.versions() == {
        "instances": 0,
        "series": 0,
        "studies": 0,
        "rejects": None,
        "crawl_state": None,
        "transfers": None,
    }
    writer.write(rows[3:], [])
    versions = index.versions()
    assert versions["instances"] == 1
    assert versions["series"] == versions["studies"] == 1
    # Each derived commit says which instances version it was computed from.
    for name in ("series", "studies"):
        assert index.table(name).commit_metadata()["imgindex.instances_version"] == "1"
    index.rebuild_derived()
    for name in ("series", "studies"):
        assert index.table(name).version() == 2
        assert index.table(name).commit_metadata()["imgindex.instances_version"] == "1"


def test_rejects_are_upserted(tmp_path: Path, malformed: dict[str, Path]) -> None:
    extractor = Extractor(source="test")
    rejects = [
        r
        for kind in ("empty", "not_dicom", "bad_date")
        for r in extractor.extract_file(malformed[kind], indexed_at=NOW).rejects
    ]
    assert len(rejects) == 3
    writer = IndexWriter(tmp_path)
    writer.write([], rejects)
    writer.write([], rejects)
    index = Index(tmp_path)
    assert index.versions() == {
        "instances": None,
        "series": None,
        "studies": None,
        "rejects": 1,
        "crawl_state": None,
        "transfers": None,
    }
    table = index.sql("SELECT level, reason FROM rejects ORDER BY reason")
    assert table.to_pylist() == [
        {"level": "value", "reason": "bad_value"},
        {"level": "file", "reason": "empty"},
        {"level": "file", "reason": "no_preamble"},
    ]
