"""Benchmark the MI/CAD cohort of issue 5: imgindex against hand-written DuckDB SQL and polars.

Usage::

    python scripts/bench_cohort.py [--persons 1000000] [--series-per-person 10]
        [--conditions 2000000] [--procedures 2000000] [--repeat 3] [--order date,random]
        [--engines duckdb,polars,imgindex] [--seed N] [--data DIR] [--quick]

The question (:data:`imgindex.testing.omop.MI_CAD_CT`): persons whose **first** myocardial
infarction ever (condition concept 4329847 or a descendant, or ``condition_source_value``
``I21*``/``I22*`` without case and dots) falls between 2023-10-01 and 2023-10-10, with a
coronary procedure (PCI, CABG or coronary angiography, with descendants) 7 to 14 days after it;
their CT series whose imaging date is 0 to 30 days after it. One row per series.

The data is :func:`imgindex.testing.omop.generate_world`: ``--persons`` patients with
``--series-per-person`` series each on average, ``--conditions`` condition and
``--procedures`` procedure rows (and visits, drugs, measurements and observations in
proportion), a planted MI cluster of several thousand persons with its edge cases. It is
written once under ``--data`` in a folder named after the parameters: the EMR as Delta tables in
``emr/`` (sorted by date, row groups of 100k rows), and the index ``series`` table twice, once
sorted by ``imaging_date`` (``date/``, as an index filled while studies arrive roughly is) and
once shuffled (``random/``); ``date/emr`` and ``random/emr`` link to the one ``emr/``.

Contenders, each over the same Parquet files of the current Delta versions:

* ``duckdb``: hand-written SQL (:func:`imgindex.testing.omop.reference_duckdb`);
* ``polars``: a hand-written lazy query, filters first and small joins
  (:func:`imgindex.testing.omop.reference_polars`);
* ``imgindex``: ``select(Cohort.from_yaml(PATH), root).table`` from :mod:`imgindex.cohort`
  with the question as a cohort file (:meth:`CohortQuestion.to_yaml`, written beside the data).
  Skipped, with a message, while :mod:`imgindex.cohort` does not exist.

Each contender and order runs in a subprocess of its own: modules are imported first, then the
query runs ``--repeat`` times; the best time counts, and peak memory is the subprocess's
``ru_maxrss`` (its size after the imports is shown too). All answers must hold the same
(person_id, SeriesInstanceUID) pairs, or the run fails. The ratio is each time divided by the
faster hand-written query of the same order. The table goes to stdout as Markdown, with the
exact command; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import importlib.util
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from _bench import available_cpus, git_revision

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import pyarrow as pa

ROOT: Final = Path(__file__).resolve().parent.parent
#: Default cache of generated worlds.
DEFAULT_DATA: Final = Path("/tmp/bench-cohort-data")
#: Bump when the generator's output changes, so that cached worlds are not reused.
GENERATOR_VERSION: Final = 2
ENGINES: Final = ("duckdb", "polars", "imgindex")
REFERENCES: Final = ("duckdb", "polars")
ORDERS: Final = ("date", "random")
#: ``--quick``: a world that generates, writes and runs in well under a minute.
QUICK: Final = {"persons": 50_000, "conditions": 100_000, "procedures": 100_000}
MANIFEST: Final = "manifest.json"
COHORT_FILE: Final = "mi_cad_ct.yaml"
#: Seconds a worker may take before the run is abandoned.
WORKER_TIMEOUT_S: Final = 1800


class BenchError(RuntimeError):
    """A setup step or a check failed (the figures would mean nothing)."""


# --- arguments ---------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def _choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [part.strip() for part in text.split(",") if part.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(allowed)}, not {text!r}"
            )
        return list(dict.fromkeys(values))

    return parse


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser (a function of its own so tests can call it)."""
    parser = argparse.ArgumentParser(
        prog="bench_cohort.py",
        description="Time the MI/CAD cohort: imgindex vs hand-written DuckDB SQL and polars.",
    )
    parser.add_argument(
        "--persons", type=_positive_int, help="patients (default 1000000; --quick 50000)"
    )
    parser.add_argument(
        "--series-per-person",
        type=_positive_int,
        default=10,
        help="index series per patient on average (default 10)",
    )
    parser.add_argument(
        "--conditions",
        type=_positive_int,
        help="condition_occurrence rows (default 2 per person)",
    )
    parser.add_argument(
        "--procedures",
        type=_positive_int,
        help="procedure_occurrence rows (default 2 per person)",
    )
    parser.add_argument("--seed", type=int, default=20231001, help="generator seed")
    parser.add_argument(
        "--repeat", type=_positive_int, default=3, help="runs per contender; the best counts"
    )
    parser.add_argument(
        "--order",
        type=_choices(ORDERS),
        default=list(ORDERS),
        metavar="date,random",
        help="row orders of the index series table to run on (default both)",
    )
    parser.add_argument(
        "--engines",
        type=_choices(ENGINES),
        default=list(ENGINES),
        metavar="duckdb,polars,imgindex",
        help="contenders (default all three)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        metavar="DIR",
        help=f"cache of generated worlds (default {DEFAULT_DATA})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small world (50000 persons, 100000 conditions and procedures) for smoke runs",
    )
    # Internal: the subprocesses.
    parser.add_argument("--worker", choices=(*ENGINES, "generate"), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser


# --- the world ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What is generated, and where it is cached."""

    persons: int
    series_per_person: int
    conditions: int
    procedures: int
    seed: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Workload:
        """The workload the arguments ask for (``--quick`` fills the sizes not given)."""
        sizes = QUICK if args.quick else {"persons": 1_000_000}
        persons = args.persons or sizes["persons"]
        return cls(
            persons=persons,
            series_per_person=args.series_per_person,
            conditions=args.conditions or sizes.get("conditions", 2 * persons),
            procedures=args.procedures or sizes.get("procedures", 2 * persons),
            seed=args.seed,
        )

    @property
    def key(self) -> str:
        """Name of the cache folder: a hash of the parameters and the generator version."""
        text = json.dumps({**asdict(self), "generator": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def description(self) -> str:
        """One line for the table's header."""
        return (
            f"{self.persons:,} patients, {self.persons * self.series_per_person:,} series, "
            f"{self.conditions:,} condition and {self.procedures:,} procedure rows "
            f"(seed {self.seed})"
        )


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def generate(work: Workload, directory: Path) -> dict[str, Any]:
    """Generate and write the world into ``directory`` (in this process); return the manifest."""
    from imgindex.testing.omop import generate_world, write_omop_tables, write_series_index

    started = time.perf_counter()
    world = generate_world(
        work.persons,
        seed=work.seed,
        series_per_person=work.series_per_person,
        conditions=work.conditions,
        procedures=work.procedures,
    )
    generated = time.perf_counter()
    write_omop_tables(world.omop, directory)
    for order in ORDERS:
        root = directory / order
        root.mkdir(parents=True, exist_ok=True)
        link = root / "emr"
        if not link.is_symlink():
            link.symlink_to(Path("..") / "emr", target_is_directory=True)
        write_series_index(world.series, root, order=order, seed=work.seed)
    written = time.perf_counter()
    return {
        "workload": asdict(work),
        "generator": GENERATOR_VERSION,
        "generate_seconds": round(generated - started, 2),
        "write_seconds": round(written - generated, 2),
        "rows": {
            **{name: table.num_rows for name, table in world.omop.items()},
            "series": world.series.num_rows,
            "planted_persons": world.planted.num_rows,
        },
        "bytes": {
            "emr": _folder_bytes(directory / "emr"),
            **{f"series_{o}": _folder_bytes(directory / o / "tables" / "series") for o in ORDERS},
        },
        "peak_mib": _peak_mib(),
    }


def ensure_data(work: Workload, data: Path) -> tuple[Path, dict[str, Any]]:
    """The cached world for ``work`` (generated in a subprocess first if missing).

    Raises
    ------
    BenchError
        If generating fails.
    """
    directory = data / f"cohort-{work.key}"
    manifest_path = directory / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("workload") == asdict(work):
            print(f"reusing the world in {directory}", file=sys.stderr)
            return directory, manifest
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    print(f"generating {work.description()} into {directory}...", file=sys.stderr)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "generate",
        "--root",
        str(directory),
        "--persons",
        str(work.persons),
        "--series-per-person",
        str(work.series_per_person),
        "--conditions",
        str(work.conditions),
        "--procedures",
        str(work.procedures),
        "--seed",
        str(work.seed),
    ]
    manifest = _run_worker(command)
    manifest_path.write_text(json.dumps(manifest, indent=2))
    print(
        f"  generated in {manifest['generate_seconds']} s, written in "
        f"{manifest['write_seconds']} s, peak {manifest['peak_mib']:,.0f} MiB",
        file=sys.stderr,
    )
    return directory, manifest


# --- workers -----------------------------------------------------------------------------------


def _peak_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _query(engine: str, root: Path) -> Callable[[], pa.Table]:
    """The contender's query, with its modules imported (imports are not timed)."""
    import duckdb  # noqa: F401  (imported before timing, whatever the engine)
    import polars  # noqa: F401

    from imgindex.testing.omop import MI_CAD_CT, reference_duckdb, reference_polars

    if engine == "duckdb":
        return lambda: reference_duckdb(root, MI_CAD_CT)
    if engine == "polars":
        return lambda: reference_polars(root, MI_CAD_CT)
    from imgindex.cohort import Cohort, select

    cohort_path = root.parent / COHORT_FILE

    def run() -> pa.Table:
        table: pa.Table = select(Cohort.from_yaml(cohort_path), root).table
        return table

    return run


def worker(args: argparse.Namespace) -> int:
    """Run one contender ``--repeat`` times; print a JSON line with the figures."""
    if args.worker == "generate":
        work = Workload.from_args(args)
        print(json.dumps(generate(work, args.root)))
        return 0
    import pyarrow.parquet as pq

    query = _query(args.worker, args.root)
    after_imports = _peak_mib()
    seconds = []
    table = None
    for _ in range(args.repeat):
        started = time.perf_counter()
        table = query()
        seconds.append(time.perf_counter() - started)
    peak = _peak_mib()
    assert table is not None
    pq.write_table(table.select(["person_id", "SeriesInstanceUID"]), args.result)
    persons = len(set(table.column("person_id").to_pylist()))
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_mib": peak,
                "after_imports_mib": after_imports,
                "rows": table.num_rows,
                "persons": persons,
            }
        )
    )
    return 0


def _run_worker(command: Sequence[str]) -> dict[str, Any]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=WORKER_TIMEOUT_S,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{shlex.join(command)} took more than {WORKER_TIMEOUT_S} s") from exc
    if done.returncode != 0:
        raise BenchError(
            f"{shlex.join(command)} exited with {done.returncode}:\n{done.stderr[-3000:]}"
        )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@dataclass
class Run:
    """One contender on one order."""

    engine: str
    order: str
    seconds: list[float]
    peak_mib: float
    after_imports_mib: float
    rows: int
    persons: int
    result: Path

    @property
    def best(self) -> float:
        """The best of the runs."""
        return min(self.seconds)


def measure(engine: str, order: str, directory: Path, repeat: int, work_dir: Path) -> Run:
    """Run ``engine`` on the ``order`` copy of the index in a subprocess of its own."""
    result = work_dir / f"{engine}-{order}.parquet"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        engine,
        "--root",
        str(directory / order),
        "--result",
        str(result),
        "--repeat",
        str(repeat),
    ]
    figures = _run_worker(command)
    return Run(engine, order, result=result, **figures)


# --- checks and the table ----------------------------------------------------------------------


def check_equal(runs: Sequence[Run]) -> None:
    """Every run must select the same (person_id, SeriesInstanceUID) pairs.

    Raises
    ------
    BenchError
        If two runs differ (the first pair that differs is named).
    """
    import pyarrow.parquet as pq

    answers = {
        (r.engine, r.order): {
            (row["person_id"], row["SeriesInstanceUID"])
            for row in pq.read_table(r.result).to_pylist()
        }
        for r in runs
    }
    (first_key, first), *others = answers.items()
    for key, answer in others:
        if answer != first:
            only_first = sorted(first - answer)[:5]
            only_other = sorted(answer - first)[:5]
            raise BenchError(
                f"{key[0]} on {key[1]} selected {len(answer)} series, {first_key[0]} on "
                f"{first_key[1]} {len(first)}; only in the first: {only_first}; only in the "
                f"second: {only_other}"
            )
    if not first:
        raise BenchError("every contender selected nothing: the planted cluster is missing")


def format_table(runs: Sequence[Run], repeat: int) -> str:
    """The Markdown table: one row per contender and order."""
    lines = [
        (
            f"| engine | order | seconds (best of {repeat}) | all runs (s) | peak MiB "
            "| MiB after imports | series | persons | ratio to faster hand-written |"
        ),
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        references = [x.best for x in runs if x.order == r.order and x.engine in REFERENCES]
        ratio = f"{r.best / min(references):.2f}" if references else "n/a"
        lines.append(
            f"| {r.engine} | {r.order} | {r.best:.3f} "
            f"| {', '.join(f'{s:.3f}' for s in r.seconds)} | {r.peak_mib:,.0f} "
            f"| {r.after_imports_mib:,.0f} | {r.rows:,} | {r.persons:,} | {ratio} |"
        )
    return "\n".join(lines)


def _versions() -> str:
    import deltalake
    import duckdb
    import polars
    import pyarrow

    return (
        f"Python {platform.python_version()}, DuckDB {duckdb.__version__}, polars "
        f"{polars.__version__}, pyarrow {pyarrow.__version__}, deltalake {deltalake.__version__}"
    )


def command_line() -> str:
    """This run's command, as typed from the repository root."""
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    return shlex.join([str(python), *sys.argv])


def cohort_available() -> bool:
    """Whether :mod:`imgindex.cohort` exists yet (the lead is writing it)."""
    try:
        return importlib.util.find_spec("imgindex.cohort") is not None
    except ImportError:
        return False


# --- main --------------------------------------------------------------------------------------


def _bench(args: argparse.Namespace, work_dir: Path) -> int:
    from imgindex.testing.omop import MI_CAD_CT

    work = Workload.from_args(args)
    args.data.mkdir(parents=True, exist_ok=True)
    directory, manifest = ensure_data(work, args.data)
    (directory / COHORT_FILE).write_text(MI_CAD_CT.to_yaml())
    engines = list(args.engines)
    if "imgindex" in engines and not cohort_available():
        print("imgindex.cohort not available yet: skipping the imgindex contender", file=sys.stderr)
        engines.remove("imgindex")
    runs: list[Run] = []
    for order in args.order:
        for engine in engines:
            run = measure(engine, order, directory, args.repeat, work_dir)
            runs.append(run)
            print(
                f"  {engine} on {order}: best {run.best:.3f} s of "
                f"{', '.join(f'{s:.3f}' for s in run.seconds)}, peak {run.peak_mib:,.0f} MiB, "
                f"{run.rows:,} series of {run.persons:,} persons",
                file=sys.stderr,
            )
    check_equal(runs)
    sizes = manifest["bytes"]
    print(f"# {work.description()}")
    print(
        f"# generated in {manifest['generate_seconds']} s (peak {manifest['peak_mib']:,.0f} MiB), "
        f"written in {manifest['write_seconds']} s; on disk: EMR "
        f"{sizes['emr'] / 2**20:,.0f} MiB, series "
        + ", ".join(f"{sizes[f'series_{o}'] / 2**20:,.0f} MiB ({o})" for o in ORDERS)
        + f"; rows: {json.dumps(manifest['rows'])}"
    )
    print(
        f"# {dt.date.today().isoformat()}, {platform.node()}, {available_cpus()} CPUs, "
        f"{_versions()}, git {git_revision()}"
    )
    print(
        "# each contender in its own subprocess: imports, then the query --repeat times; peak = "
        "ru_maxrss of the subprocess; ratio = best seconds / best of the hand-written queries "
        "on the same order; all answers checked equal"
    )
    print(f"# command: {command_line()}")
    if "imgindex" in args.engines and "imgindex" not in engines:
        print("# imgindex: skipped (imgindex.cohort not available yet)")
    print()
    print(format_table(runs, args.repeat))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args)
    work_dir = Path(tempfile.mkdtemp(prefix="bench-cohort-"))
    try:
        return _bench(args, work_dir)
    except (BenchError, OSError) as exc:
        print(f"bench_cohort.py: error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
