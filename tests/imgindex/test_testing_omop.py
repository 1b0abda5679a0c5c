"""Tests of imgindex.testing.omop: the synthetic EMR and series, and the reference answers."""

from __future__ import annotations

import datetime as dt
import importlib.util
import itertools
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from pyarrow import csv

from imgindex.index import Index
from imgindex.testing.omop import (
    CONCEPTS,
    MI_CAD_CT,
    OMOP_DATE_COLUMNS,
    OMOP_KEYS,
    OMOP_SCHEMAS,
    OMOP_TABLES,
    CohortQuestion,
    World,
    concept_ancestor_table,
    generate_world,
    reference_duckdb,
    reference_polars,
    write_omop_csv,
    write_omop_tables,
    write_series_index,
    write_world,
)

if TYPE_CHECKING:
    from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
PERSONS = 2000
SEED = 11

#: Columns the CDM v5.4 marks required, per table.
REQUIRED = {
    "person": ["person_id", "gender_concept_id", "year_of_birth", "race_concept_id",
               "ethnicity_concept_id"],
    "visit_occurrence": ["visit_occurrence_id", "person_id", "visit_concept_id",
                         "visit_start_date", "visit_end_date", "visit_type_concept_id"],
    "condition_occurrence": ["condition_occurrence_id", "person_id", "condition_concept_id",
                             "condition_start_date", "condition_type_concept_id"],
    "procedure_occurrence": ["procedure_occurrence_id", "person_id", "procedure_concept_id",
                             "procedure_date", "procedure_type_concept_id"],
    "drug_exposure": ["drug_exposure_id", "person_id", "drug_concept_id",
                      "drug_exposure_start_date", "drug_exposure_end_date",
                      "drug_type_concept_id"],
    "measurement": ["measurement_id", "person_id", "measurement_concept_id", "measurement_date",
                    "measurement_type_concept_id"],
    "observation": ["observation_id", "person_id", "observation_concept_id", "observation_date",
                    "observation_type_concept_id"],
    "concept": ["concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_class_id",
                "concept_code", "valid_start_date", "valid_end_date"],
    "concept_ancestor": ["ancestor_concept_id", "descendant_concept_id",
                         "min_levels_of_separation", "max_levels_of_separation"],
}  # fmt: skip


@pytest.fixture(scope="module")
def world() -> World:
    return generate_world(PERSONS, seed=SEED)


@pytest.fixture(scope="module")
def root(world: World, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("omop-world")
    write_world(world, path, order="random")
    return path


# -- generation -------------------------------------------------------------------------------


def test_same_seed_same_world(world: World) -> None:
    again = generate_world(PERSONS, seed=SEED)
    for name in OMOP_TABLES:
        assert again.omop[name].equals(world.omop[name]), name
    assert again.series.equals(world.series)
    assert again.planted.equals(world.planted)
    other = generate_world(PERSONS, seed=SEED + 1)
    assert not other.series.equals(world.series)
    assert not other.omop["condition_occurrence"].equals(world.omop["condition_occurrence"])


def test_small_world_is_fast() -> None:
    started = time.perf_counter()
    generate_world(PERSONS, seed=3)
    assert time.perf_counter() - started < 1.0


def test_sizes(world: World) -> None:
    assert world.series.num_rows == PERSONS * 10
    assert world.omop["condition_occurrence"].num_rows == 2 * PERSONS
    assert world.omop["procedure_occurrence"].num_rows == 2 * PERSONS
    sized = generate_world(500, seed=1, series_per_person=3, conditions=900, procedures=700)
    assert sized.series.num_rows == 1500
    assert sized.omop["condition_occurrence"].num_rows == 900
    assert sized.omop["procedure_occurrence"].num_rows == 700


@pytest.mark.parametrize("name", OMOP_TABLES)
def test_tables_follow_the_contract(world: World, name: str) -> None:
    table = world.omop[name]
    assert table.schema.equals(OMOP_SCHEMAS[name])
    for f in table.schema:
        if f.name.endswith("_date"):
            assert f.type == pa.date32(), f.name
        elif f.name.endswith("_datetime"):
            assert f.type == pa.timestamp("us"), f.name
        elif f.name in ("value_as_number", "quantity", "range_low", "range_high"):
            assert f.type == pa.float64(), f.name
        elif f.name.endswith("_id") and f.name not in ("domain_id", "vocabulary_id",
                                                         "concept_class_id"):  # fmt: skip
            assert f.type == pa.int64(), f.name
    assert table.schema.field("person_id" if name not in ("concept", "concept_ancestor") else
                              table.schema.names[0]).type == pa.int64()  # fmt: skip
    for column in REQUIRED[name]:
        assert table.column(column).null_count == 0, f"{name}.{column} has nulls"
    assert table.num_rows > 0


@pytest.mark.parametrize("name", OMOP_TABLES)
def test_tables_match_the_importer(world: World, name: str) -> None:
    # The generator and imgindex.emr keep one contract: same columns, types, keys and order.
    from imgindex.emr.omop import TABLE_SPECS

    spec = TABLE_SPECS[name]
    assert OMOP_SCHEMAS[name].equals(spec.arrow_schema)
    assert spec.key == OMOP_KEYS[name]
    assert spec.date_column == OMOP_DATE_COLUMNS.get(name)
    for column in spec.required:
        assert world.omop[name].column(column).null_count == 0, f"{name}.{column} has nulls"


@pytest.mark.parametrize("name", OMOP_TABLES)
def test_tables_are_sorted(world: World, name: str) -> None:
    table = world.omop[name]
    keys = [OMOP_DATE_COLUMNS[name], "person_id"] if name in OMOP_DATE_COLUMNS else OMOP_KEYS[name]
    rows = list(zip(*(table.column(k).to_pylist() for k in keys), strict=True))
    assert rows == sorted(rows)
    key = OMOP_KEYS[name]
    assert len(set(zip(*(table.column(k).to_pylist() for k in key), strict=True))) == len(rows)


def test_vocabulary() -> None:
    ids = [c.concept_id for c in CONCEPTS]
    assert len(ids) == len(set(ids))
    ancestors = concept_ancestor_table().to_pylist()
    pairs = {(r["ancestor_concept_id"], r["descendant_concept_id"]): r for r in ancestors}
    for concept in CONCEPTS:
        if concept.standard and concept.concept_id:
            assert pairs[(concept.concept_id, concept.concept_id)]["max_levels_of_separation"] == 0
    mi = {d for a, d in pairs if a == 4329847}
    assert {312327, 4296653, 4270024, 434376, 4108217, 4108218} <= mi
    assert 317576 not in mi  # coronary arteriosclerosis is a sibling, not a kind of MI
    assert pairs[(4329847, 4296653)]["min_levels_of_separation"] == 2
    assert {4184832, 4304209} <= {d for a, d in pairs if a == 4216130}
    assert all(r["min_levels_of_separation"] <= r["max_levels_of_separation"] for r in ancestors)


def test_persons_link_to_patients(world: World) -> None:
    person = world.omop["person"]
    patients = set(world.series.column("PatientID").to_pylist())
    sources = person.column("person_source_value").to_pylist()
    assert all(s.startswith("PAT") for s in sources)
    linked = patients & set(sources)
    assert 0.9 * len(patients) < len(linked) < len(patients), "some index patients have no person"
    assert len(set(sources) - patients) > 0, "some persons have no imaging"
    years = person.column("year_of_birth").to_pylist()
    assert min(years) >= 1930
    assert max(years) <= 2005
    assert set(person.column("gender_concept_id").to_pylist()) == {8507, 8532}


def test_series_schema(world: World) -> None:
    expected = Index(Path("unused")).empty("series").schema
    for f in expected:
        assert world.series.schema.field(f.name).type == f.type, f.name
    assert world.series.schema.field("imaging_date").type == pa.date32()
    assert world.series.schema.field("StudyDate").type == pa.date32()
    assert world.series.column("SeriesInstanceUID").null_count == 0
    assert pc.count_distinct(world.series.column("SeriesInstanceUID")).as_py() == PERSONS * 10
    counts = world.series.column("instance_count")
    ct = world.series.filter(pc.equal(world.series.column("Modality"), "CT"))
    assert pc.min(counts).as_py() >= 1
    assert pc.max(ct.column("instance_count")).as_py() <= 600
    assert all(len(u) <= 64 for u in world.series.column("StudyInstanceUID").to_pylist())


def test_series_dates(world: World) -> None:
    rows = world.series.select(["StudyDate", "SeriesDate", "imaging_date"]).to_pylist()
    kinds = {
        (r["StudyDate"] is None, r["SeriesDate"] is None, r["imaging_date"] is None) for r in rows
    }
    assert (False, False, False) in kinds
    assert (True, False, False) in kinds  # no StudyDate: imaging_date from SeriesDate
    assert (True, True, False) in kinds  # only the AcquisitionDate
    assert (True, True, True) in kinds  # no date at all
    for r in rows:
        expected = r["StudyDate"] or r["SeriesDate"]
        if expected is not None:
            assert r["imaging_date"] == expected


def test_planted_edges(world: World) -> None:
    planted = world.planted.to_pylist()
    assert len(planted) == 60
    days = {p["mi_date"] for p in planted}
    assert {dt.date(2023, 10, 1), dt.date(2023, 10, 10)} <= days
    assert {dt.date(2023, 9, 30), dt.date(2023, 10, 11)} <= days
    assert {6, 7, 14, 15} <= {p["procedure_days"] for p in planted}
    assert any(p["procedure_days"] is None for p in planted)
    assert any(p["earlier_mi"] for p in planted)
    assert any(p["later_mi"] for p in planted)
    assert any(not p["has_imaging"] for p in planted)
    sources = {(p["mi_concept_id"], p["mi_source_value"]) for p in planted}
    assert (0, "I21.4") in sources  # matched by source code only
    assert (0, "I214") in sources  # KCD style, no dot
    assert (4270024, "410.71") in sources  # matched by concept only
    # Rows exist for what was planted.
    conditions = world.omop["condition_occurrence"]
    rows = set(
        zip(
            conditions.column("person_id").to_pylist(),
            conditions.column("condition_start_date").to_pylist(),
            conditions.column("condition_source_value").to_pylist(),
            strict=True,
        )
    )
    for p in planted:
        assert (p["person_id"], p["mi_date"], p["mi_source_value"]) in rows


def test_planted_series_around_the_entry(world: World) -> None:
    entry = {p["PatientID"]: p["mi_date"] for p in world.planted.to_pylist()}
    offsets = {
        (r["imaging_date"] - entry[r["PatientID"]]).days
        for r in world.series.select(["PatientID", "imaging_date", "Modality"]).to_pylist()
        if r["PatientID"] in entry and r["imaging_date"] is not None and r["Modality"] == "CT"
    }
    assert {-1, 0, 30, 31} <= offsets


def test_generate_world_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="persons"):
        generate_world(0, seed=1)
    with pytest.raises(ValueError, match="fraction"):
        generate_world(10, seed=1, linked_fraction=0)
    with pytest.raises(ValueError, match="procedures must not be negative"):
        generate_world(10, seed=1, procedures=-1)
    with pytest.raises(ValueError, match="before start"):
        generate_world(10, seed=1, start=dt.date(2020, 1, 1), end=dt.date(2019, 1, 1))


# -- writing ----------------------------------------------------------------------------------


def test_written_tables_read_back(world: World, root: Path) -> None:
    series = Index(root).series.collect()
    assert series.height == world.series.num_rows
    assert series.schema["imaging_date"].__class__.__name__ == "Date"
    for name in OMOP_TABLES:
        files = list((root / "emr" / name).glob("*.parquet"))
        assert files, name
        table = pq.read_table(files).select(OMOP_SCHEMAS[name].names)
        assert table.num_rows == world.omop[name].num_rows, name


def test_row_groups(world: World, tmp_path: Path) -> None:
    paths = write_omop_tables(
        {"condition_occurrence": world.omop["condition_occurrence"]}, tmp_path, row_group_rows=1000
    )
    (file,) = paths["condition_occurrence"].glob("*.parquet")
    meta = pq.ParquetFile(file).metadata
    assert meta.num_row_groups == 4
    # Sorted by date: the row groups' date ranges do not overlap.
    column = OMOP_SCHEMAS["condition_occurrence"].get_field_index("condition_start_date")
    ranges = [
        (
            meta.row_group(i).column(column).statistics.min,
            meta.row_group(i).column(column).statistics.max,
        )
        for i in range(meta.num_row_groups)
    ]
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(ranges))


def test_series_orders(world: World, tmp_path: Path) -> None:
    write_series_index(world.series, tmp_path / "d", order="date")
    by_date = Index(tmp_path / "d").series.collect()
    days = [d for d in by_date["imaging_date"].to_list() if d is not None]
    assert days == sorted(days)
    assert by_date["imaging_date"].null_count() == by_date.tail(by_date["imaging_date"].null_count())["imaging_date"].null_count()  # fmt: skip
    with pytest.raises(ValueError, match="order"):
        write_series_index(world.series, tmp_path / "x", order="sideways")  # type: ignore[arg-type]


def test_write_csv(world: World, tmp_path: Path) -> None:
    paths = write_omop_csv(world.omop, tmp_path)
    assert paths["condition_occurrence"].name == "CONDITION_OCCURRENCE.csv"
    assert paths["concept_ancestor"].name == "CONCEPT_ANCESTOR.csv"
    back = csv.read_csv(paths["condition_occurrence"])
    assert back.column_names == OMOP_SCHEMAS["condition_occurrence"].names
    assert back.num_rows == world.omop["condition_occurrence"].num_rows
    text = paths["condition_occurrence"].read_text().splitlines()[1]
    assert "2" in text.split(",")[3]  # condition_start_date
    assert text.split(",")[3].count("-") == 2  # YYYY-MM-DD


# -- reference answers ------------------------------------------------------------------------


def oracle(world: World, q: CohortQuestion) -> set[tuple[int, str, int]]:
    """The question answered row by row in plain Python, over the in-memory tables."""
    ancestors = world.omop["concept_ancestor"].to_pylist()

    def expand(ids: tuple[int, ...]) -> set[int]:
        return set(ids) | {
            r["descendant_concept_id"] for r in ancestors if r["ancestor_concept_id"] in ids
        }

    entry_ids, proc_ids = expand(q.entry_concepts), expand(q.procedure_concepts)
    prefixes = tuple(p.upper() for p in q.entry_source_prefixes)
    first: dict[int, dt.date] = {}
    for r in world.omop["condition_occurrence"].to_pylist():
        code = (r["condition_source_value"] or "").replace(".", "").upper()
        if r["condition_concept_id"] in entry_ids or code.startswith(prefixes):
            pid, day = r["person_id"], r["condition_start_date"]
            first[pid] = min(day, first.get(pid, day))
    entries = {p: d for p, d in first.items() if q.entry_from <= d <= q.entry_to}
    low, high = q.procedure_days
    kept = {
        r["person_id"]
        for r in world.omop["procedure_occurrence"].to_pylist()
        if r["person_id"] in entries
        and r["procedure_concept_id"] in proc_ids
        and low <= (r["procedure_date"] - entries[r["person_id"]]).days <= high
    }
    patient = {
        r["person_source_value"]: r["person_id"]
        for r in world.omop["person"].to_pylist()
        if r["person_id"] in kept
    }
    low, high = q.imaging_days
    answer = set()
    for s in world.series.select(["PatientID", "SeriesInstanceUID", "Modality", "imaging_date"]).to_pylist():  # fmt: skip
        pid = patient.get(s["PatientID"])
        if pid is None or s["Modality"] != q.modality or s["imaging_date"] is None:
            continue
        days = (s["imaging_date"] - entries[pid]).days
        if low <= days <= high:
            answer.add((pid, s["SeriesInstanceUID"], days))
    return answer


def _triples(table: pa.Table) -> set[tuple[int, str, int]]:
    return set(
        zip(
            table.column("person_id").to_pylist(),
            table.column("SeriesInstanceUID").to_pylist(),
            table.column("days_from_index").to_pylist(),
            strict=True,
        )
    )


def test_references_agree_with_the_oracle(world: World, root: Path) -> None:
    by_duckdb = reference_duckdb(root)
    by_polars = reference_polars(root)
    assert by_duckdb.equals(by_polars)
    expected = oracle(world, MI_CAD_CT)
    assert _triples(by_duckdb) == expected
    assert len(expected) >= 20, "the planted cluster should give a non-trivial answer"
    days = {d for _, _, d in expected}
    assert {0, 30} <= days
    assert min(days) >= 0
    assert max(days) <= 30
    persons = {p for p, _, _ in expected}
    planted = {p["person_id"]: p for p in world.planted.to_pylist()}
    # Planted persons whose first MI is outside the range, or whose procedure is on day 6 or
    # 15 and nothing else, are not in the answer.
    for pid in persons & set(planted):
        p = planted[pid]
        assert not p["earlier_mi"]
        assert dt.date(2023, 10, 1) <= p["mi_date"] <= dt.date(2023, 10, 10)
    assert {7, 14} <= {planted[p]["procedure_days"] for p in persons & set(planted)}
    entry_dates = set(by_duckdb.column("entry_date").to_pylist())
    assert entry_dates <= {dt.date(2023, 10, d) for d in range(1, 11)}


def test_references_on_another_question(world: World, root: Path) -> None:
    question = CohortQuestion(
        entry_concepts=(317576,),
        entry_source_prefixes=("I25",),
        entry_from=dt.date(2015, 1, 1),
        entry_to=dt.date(2025, 12, 31),
        procedure_concepts=(4163951,),
        procedure_days=(-365, 365),
        modality="MR",
        imaging_days=(-30, 365),
    )
    by_duckdb = reference_duckdb(root, question)
    assert by_duckdb.equals(reference_polars(root, question))
    assert _triples(by_duckdb) == oracle(world, question)


def test_question_yaml() -> None:
    import yaml

    text = MI_CAD_CT.to_yaml()
    data: dict[str, Any] = yaml.safe_load(text)
    assert data["entry"]["dates"] == {"from": dt.date(2023, 10, 1), "to": dt.date(2023, 10, 10)}
    assert data["codesets"]["entry_codes"]["source_codes"] == ["I21*", "I22*"]
    assert data["inclusion"][0]["after"] == [7, 14]
    assert data["imaging"] == {"modality": ["CT"], "after": [0, 30]}


def test_imgindex_cohort_agrees(root: Path, tmp_path: Path) -> None:
    # The benchmark's equality check, on a small world.
    from imgindex.cohort import Cohort, select

    path = tmp_path / "mi_cad_ct.yaml"
    path.write_text(MI_CAD_CT.to_yaml())
    selection = select(Cohort.from_yaml(path), root).table
    expected = reference_duckdb(root)
    assert set(
        zip(
            selection.column("person_id").to_pylist(),
            selection.column("SeriesInstanceUID").to_pylist(),
            strict=True,
        )
    ) == set(
        zip(
            expected.column("person_id").to_pylist(),
            expected.column("SeriesInstanceUID").to_pylist(),
            strict=True,
        )
    )


# -- the benchmark script ---------------------------------------------------------------------


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bench_cohort", REPO / "scripts" / "bench_cohort.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # As when it runs as a script: its folder is on the path, for the shared scripts/_bench.py.
    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    # Dataclasses look their module up in sys.modules while the class is created.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_arguments() -> None:
    bench = load_bench()
    quick = bench.Workload.from_args(bench.build_parser().parse_args(["--quick"]))
    assert (quick.persons, quick.conditions, quick.procedures) == (50_000, 100_000, 100_000)
    full = bench.Workload.from_args(bench.build_parser().parse_args([]))
    assert (full.persons, full.series_per_person, full.conditions) == (1_000_000, 10, 2_000_000)
    assert quick.key != full.key
    args = bench.build_parser().parse_args(["--order", "random", "--engines", "polars,duckdb"])
    assert args.order == ["random"]
    assert args.engines == ["polars", "duckdb"]
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--order", "sideways"])


def test_bench_checks_answers(tmp_path: Path) -> None:
    bench = load_bench()

    def run(engine: str, rows: list[tuple[int, str]]) -> Any:
        path = tmp_path / f"{engine}.parquet"
        pq.write_table(
            pa.table(
                {"person_id": [r[0] for r in rows], "SeriesInstanceUID": [r[1] for r in rows]}
            ),
            path,
        )
        return bench.Run(engine, "date", [1.0], 100.0, 50.0, len(rows), 1, path)

    same = [run("duckdb", [(1, "1.2")]), run("polars", [(1, "1.2")])]
    bench.check_equal(same)
    with pytest.raises(bench.BenchError, match="only in the first"):
        bench.check_equal([*same, run("imgindex", [(1, "1.3")])])
    table = bench.format_table(same, 1)
    assert "| duckdb | date | 1.000 |" in table


def test_gen_cohort_world_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location(
        "gen_cohort_world", REPO / "scripts" / "gen_cohort_world.py"
    )
    assert spec is not None
    assert spec.loader is not None
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert (
        cli.main([str(tmp_path / "root"), "--persons", "300", "--csv", str(tmp_path / "csv")]) == 0
    )
    assert "3,000 series" in capsys.readouterr().out
    assert Index(tmp_path / "root").series.collect().height == 3000
    assert (tmp_path / "csv" / "PERSON.csv").exists()
    assert cli.main([str(tmp_path / "bad"), "--persons", "5", "--series-per-person", "-1"]) == 2
    assert "series_per_person must not be negative" in capsys.readouterr().err
