"""storage.tables: keyed upserts on Delta tables, schema evolution, concurrent writers."""

from __future__ import annotations

import multiprocessing
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import StorageError, Table, TableNotFoundError

if TYPE_CHECKING:
    from multiprocessing.synchronize import Barrier

SCHEMA = pa.schema([("k", pa.string()), ("v", pa.int64())])


def batch(*rows: tuple[str, int]) -> pa.Table:
    return pa.Table.from_pylist([{"k": k, "v": v} for k, v in rows], SCHEMA)


def contents(table: Table) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = table.to_arrow().to_pylist()
    return sorted(rows, key=lambda r: (r["k"], r.get("k2") or ""))


def test_upsert_inserts(tmp_path: Path) -> None:
    table = Table(tmp_path / "t", ["k"])
    assert table.version() is None
    assert table.upsert(batch(("a", 1), ("b", 2))) == 0
    assert table.exists
    assert contents(table) == [{"k": "a", "v": 1}, {"k": "b", "v": 2}]
    assert table.to_arrow().schema == SCHEMA


def test_upsert_updates_on_key(tmp_path: Path) -> None:
    table = Table(tmp_path / "t", ["k"])
    table.upsert(batch(("a", 1), ("b", 2)))
    table.upsert(batch(("b", 20), ("c", 3)))
    table.upsert(batch(("b", 200)))
    assert contents(table) == [{"k": "a", "v": 1}, {"k": "b", "v": 200}, {"k": "c", "v": 3}]


def test_upsert_on_a_composite_key(tmp_path: Path) -> None:
    table = Table(tmp_path / "t", ["k", "k2"])
    rows = [{"k": "a", "k2": "x", "v": 1}, {"k": "a", "k2": "y", "v": 2}]
    table.upsert(pa.Table.from_pylist(rows))
    table.upsert(pa.Table.from_pylist([{"k": "a", "k2": "y", "v": 3}]))
    assert contents(table) == [{"k": "a", "k2": "x", "v": 1}, {"k": "a", "k2": "y", "v": 3}]


@pytest.mark.parametrize("existing", [False, True], ids=["first-write", "merge"])
def test_upsert_keeps_the_last_row_of_a_key_within_a_batch(tmp_path: Path, existing: bool) -> None:
    table = Table(tmp_path / "t", ["k"])
    if existing:
        table.upsert(batch(("a", 0), ("z", 0)))
    table.upsert(batch(("a", 1), ("b", 1), ("a", 2), ("b", 3), ("a", 4)))
    expected = [{"k": "a", "v": 4}, {"k": "b", "v": 3}]
    if existing:
        expected.append({"k": "z", "v": 0})
    assert contents(table) == expected


def test_schema_evolves_with_new_columns(tmp_path: Path) -> None:
    table = Table(tmp_path / "t", ["k"])
    table.upsert(batch(("a", 1), ("b", 2)))
    table.upsert(pa.table({"k": ["b", "c"], "v": [20, 3], "w": ["x", "y"]}))
    assert table.to_arrow().schema.names == ["k", "v", "w"]
    assert contents(table) == [
        {"k": "a", "v": 1, "w": None},
        {"k": "b", "v": 20, "w": "x"},
        {"k": "c", "v": 3, "w": "y"},
    ]
    # A later batch without the new column leaves it as it was.
    table.upsert(batch(("c", 30), ("d", 4)))
    assert contents(table) == [
        {"k": "a", "v": 1, "w": None},
        {"k": "b", "v": 20, "w": "x"},
        {"k": "c", "v": 30, "w": "y"},
        {"k": "d", "v": 4, "w": None},
    ]


def test_append_keeps_every_row(tmp_path: Path) -> None:
    table = Table(tmp_path / "events", ["k"])
    assert table.append(batch(("a", 1))) == 0
    assert table.append(batch(("a", 1), ("b", 2))) == 1
    table.append(pa.table({"k": ["c"], "v": [3], "note": ["late"]}))
    rows = contents(table)
    assert [r["k"] for r in rows] == ["a", "a", "b", "c"]
    assert [r["note"] for r in rows] == [None, None, None, "late"]


def test_overwrite_replaces_rows_and_schema(tmp_path: Path) -> None:
    table = Table(tmp_path / "t", ["k"])
    assert table.overwrite(batch(("a", 1), ("b", 2))) == 0
    assert table.overwrite(pa.table({"k": ["c"], "w": ["x"]}), metadata={"why": "rebuild"}) == 1
    assert contents(table) == [{"k": "c", "w": "x"}]
    assert table.commit_metadata()["why"] == "rebuild"


def test_versions_increase_and_carry_metadata(tmp_path: Path) -> None:
    table = Table(tmp_path / "t", ["k"])
    assert table.version() is None
    assert table.commit_metadata() == {}
    versions = [table.upsert(batch((str(i), i)), metadata={"n": str(i)}) for i in range(4)]
    assert versions == [0, 1, 2, 3]
    assert table.version() == 3
    assert table.commit_metadata()["n"] == "3"
    # An empty batch commits nothing.
    assert table.upsert(SCHEMA.empty_table()) == 3
    assert table.version() == 3


def test_reads_before_the_first_write_raise(tmp_path: Path) -> None:
    table = Table(tmp_path / "never-written", ["k"])
    assert not table.exists
    assert table.version() is None
    for read in (table.to_arrow, table.to_arrow_dataset, table.scan, table.compact):
        with pytest.raises(TableNotFoundError, match="nothing indexed yet") as info:
            read()
        assert isinstance(info.value, FileNotFoundError)
        assert isinstance(info.value, StorageError)
    # An empty first batch creates nothing either.
    assert table.upsert(SCHEMA.empty_table()) == 0
    assert not table.exists


def test_key_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one column"):
        Table(tmp_path / "t", [])
    table = Table(tmp_path / "t", ["k"])
    with pytest.raises(ValueError, match=r"lack key column\(s\) \['k'\]"):
        table.upsert(pa.table({"v": [1]}))
    assert not table.exists


def test_scan_and_compact_keep_the_rows(tmp_path: Path) -> None:
    table = Table(tmp_path / "t", ["k"])
    for i in range(5):
        table.upsert(batch((f"k{i}", i), ("shared", i)))
    before = contents(table)
    table.compact()
    assert contents(table) == before
    scanned = table.scan().sort("k").collect()
    assert isinstance(table.scan(), pl.LazyFrame)
    assert scanned.to_dicts() == before
    assert table.to_arrow_dataset().count_rows() == len(before) == 6


def test_optimize_sorts_into_row_groups_with_narrow_statistics(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    table = Table(tmp_path / "t", ["k"])
    values = [(i * 7919) % 1000 for i in range(1000)]  # a permutation of 0..999
    for start in range(0, 1000, 250):  # four appends in arrival order
        chunk = values[start : start + 250]
        table.upsert(pa.table({"k": [f"k{v}" for v in chunk], "v": chunk}))
    before = contents(table)
    version = table.optimize(["v"], row_group_rows=100)
    assert version == table.version()
    assert contents(table) == before
    groups = []
    for path in table.files():
        meta = pq.ParquetFile(path).metadata
        column = meta.schema.names.index("v")
        for i in range(meta.num_row_groups):
            stats = meta.row_group(i).column(column).statistics
            groups.append((stats.min, stats.max))
    assert len(groups) == 10
    assert all(high - low == 99 for low, high in groups)


# -- concurrent writers -------------------------------------------------------------------

WRITES_PER_PROCESS = 12


def _upsert_concurrently(path: str, writer: int, barrier: Barrier) -> None:
    """Run in a child process: upsert own keys and keys the other writer also upserts."""
    table = Table(path, ["k"])
    barrier.wait(timeout=60)
    for i in range(WRITES_PER_PROCESS):
        table.upsert(batch((f"w{writer}-{i}", writer), (f"shared-{i}", writer)))


def test_concurrent_upserts_from_two_processes(tmp_path: Path) -> None:
    # Both start at once, so they race for the first commit too.
    path = str(tmp_path / "t")
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    processes = [
        context.Process(target=_upsert_concurrently, args=(path, writer, barrier))
        for writer in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0]

    table = Table(path, ["k"])
    keys = table.to_arrow()["k"].to_pylist()
    expected = {f"w{w}-{i}" for w in range(2) for i in range(WRITES_PER_PROCESS)}
    expected |= {f"shared-{i}" for i in range(WRITES_PER_PROCESS)}
    assert len(keys) == len(set(keys)), "duplicate rows"
    assert set(keys) == expected
    # Every batch was one commit: nothing lost, nothing committed twice.
    assert table.version() == 2 * WRITES_PER_PROCESS - 1


# -- property ----------------------------------------------------------------------------

batches = st.lists(
    st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(-5, 5)), max_size=6),
    min_size=1,
    max_size=4,
)


@settings(max_examples=15)
@given(batches=batches)
def test_upserts_equal_a_dict_merge(batches: list[list[tuple[str, int]]]) -> None:
    expected: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as folder:
        table = Table(Path(folder) / "t", ["k"])
        for rows in batches:
            table.upsert(batch(*rows))
            expected.update(rows)
        if not expected:
            assert not table.exists
            return
        assert contents(table) == [{"k": k, "v": v} for k, v in sorted(expected.items())]
