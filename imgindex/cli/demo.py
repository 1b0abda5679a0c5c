"""``imgindex demo [--root ROOT]``: a small hospital, indexed, and what to try next."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgindex.cli._common import add_root, is_terminal, settings_from
from imgindex.cli.index_files import format_summary
from imgindex.cli.sql import write_result
from imgindex.crawl import index_files
from imgindex.errors import ImgindexError
from imgindex.index import Index

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

    from imgindex.deid import Deidentifier
    from imgindex.listener.send import SendSummary
    from imgindex.schema import Attribute

#: The demo's example query: what a researcher asks first.
EXAMPLE_QUERY = (
    "SELECT Modality, BodyPartExamined, count(*) AS series, sum(instance_count)::BIGINT AS images "
    "FROM series GROUP BY ALL ORDER BY series DESC"
)


def add_parser(sub: Any) -> None:
    """Register the subcommand."""
    parser = sub.add_parser(
        "demo",
        help="generate a small hospital, send it to the listener, and show what you can ask",
        description="Generate a few patients' CT, MR, multi-frame and secondary-capture "
        "studies (seeded, about 60 MB) under ROOT/demo-dicom, send them over DICOM to an "
        "`imgindex listen` on a free loopback port (which stores and indexes them into ROOT), "
        "index a folder of broken files from disk, and print what a newcomer should see. "
        "Needs no server.",
    )
    add_root(parser)
    parser.add_argument("--size-mb", type=int, default=60, help="DICOM to generate (default 60)")
    parser.add_argument("--seed", type=int, default=7, help="generator seed (default 7)")
    parser.add_argument(
        "--fresh", action="store_true", help="delete ROOT/demo-dicom first and generate anew"
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="then leave the web app running on the demo data (imgindex serve), with a "
        "researcher, a reviewer and an operator whose passwords it prints",
    )
    parser.add_argument(
        "--port", type=int, default=8080, help="the web app's port with --serve (default 8080)"
    )
    parser.set_defaults(run=run)


def _send_through_listener(
    files: list[Path], root: Path, attributes: Sequence[Attribute], progress: bool
) -> SendSummary:
    """Start a listener on a free loopback port, send ``files`` to it, stop it (flushing)."""
    from tqdm import tqdm

    from imgindex.listener import Listener, ListenerConfig
    from imgindex.listener.send import send_files

    config = ListenerConfig(root=root, port=0, attributes=attributes, flush_interval=0.5)
    with (
        Listener(config) as listener,
        tqdm(total=len(files), unit="file", disable=not progress, leave=False) as bar,
    ):
        return send_files(files, "127.0.0.1", listener.port, associations=2, on_sent=bar.update)


def run(args: argparse.Namespace) -> int:
    """Generate (once), index, and show the index."""
    from imgindex.testing import write_hospital, write_malformed_files

    settings = settings_from(args)
    root = settings.root
    dicom = root / "demo-dicom"
    if args.fresh and dicom.exists():
        shutil.rmtree(dicom)
    progress = is_terminal()
    if not dicom.exists() or not any(dicom.iterdir()):
        print(f"1. generating a small hospital under {dicom} ...")
        made = write_hospital(
            dicom,
            seed=args.seed,
            target_bytes=args.size_mb * 1_000_000,
            ct_size=256,
            workers=settings.workers,
            progress=progress,
        )
        # A few broken files, as every real export has, to show where they end up.
        write_malformed_files(dicom / "zz-broken", seed=args.seed)
        print(
            f"   {made.patients} patients, {made.studies} studies, {made.series} series, "
            f"{made.files} files, {made.bytes / 1e6:.0f} MB, and a folder of broken files"
        )
    else:
        print(f"1. reusing the DICOM files already under {dicom} (--fresh to regenerate)")

    print(
        "\n2. sending them over DICOM (C-STORE) to a listener, as a scanner or PACS would:\n"
        f"   imgindex listen --root {root} --port <free port>, fed by pynetdicom"
    )
    good = sorted(p for p in dicom.rglob("*") if p.is_file() and "zz-broken" not in p.parts)
    sent = _send_through_listener(good, root, settings.attributes, progress)
    print(
        f"   {sent.sent} of {len(good)} instances acknowledged (stored durably under "
        f"{root / 'objects'} and indexed)"
    )
    broken = dicom / "zz-broken"
    if broken.exists():
        print(f"\n   and the broken files from disk: imgindex index-files {broken} --root {root}")
        summary = index_files(
            [broken],
            root,
            attributes=settings.attributes,
            workers=1,
            batch_rows=settings.batch_rows,
            progress=False,
        )
        print("   " + format_summary(summary, str(root)).replace("\n", "\n   "))

    index = Index(root, settings.attributes)
    print("\n3. what is in the index, per modality:")
    write_result(
        index.sql(
            "SELECT Modality, count(DISTINCT StudyInstanceUID) AS studies, count(*) AS series, "
            "sum(instance_count)::BIGINT AS instances, round(sum(size_bytes) / 1e6, 1) AS mb "
            "FROM series GROUP BY Modality ORDER BY instances DESC"
        ),
        "table",
        40,
    )
    print(f'\n4. an example query:\n   imgindex sql --root {root} "{EXAMPLE_QUERY}"')
    write_result(index.sql(EXAMPLE_QUERY), "table", 15)
    selection = _emr_and_cohort(root, index)
    exported = _export(selection, root, progress)
    print(
        "\nWhere to go next (the command is .venv/bin/imgindex; `source .venv/bin/activate` "
        "puts it on PATH):\n"
        f"  - your own files:   imgindex index-files /path/to/dicom --root {root}\n"
        f'  - any question:     imgindex sql --root {root} "SELECT * FROM studies LIMIT 5"\n'
        f'  - what was refused: imgindex sql --root {root} "SELECT reason, location, message '
        'FROM rejects"\n'
        f"  - from Python:      imgindex.Index('{root}').series  (polars LazyFrames)\n"
        f"  - your own EMR:     imgindex emr import /path/to/omop --root {root}  (docs/emr.md)\n"
        f"  - a cohort:         imgindex select cohorts/stroke_mr_24h.yaml --root {root}"
        "  (docs/cohorts.md)\n"
        f"  - the selection:    {selection}\n"
        f"  - the arrays:       {exported}  (docs/export.md)\n"
        "  - the tables and columns: docs/index-tables.md"
    )
    if args.serve:
        _serve(root, args.port)
    return 0


def _serve(root: Path, port: int) -> None:
    """Demo users with fresh passwords, then the web app until Ctrl-C."""
    import secrets

    import uvicorn

    from imgindex.web.accounts import ROLES, Accounts
    from imgindex.web.app import create_app

    accounts = Accounts(root)
    print("\n9. the web app on the demo data (imgindex serve; Ctrl-C stops it), sign in as:")
    for role in ROLES:
        password = secrets.token_urlsafe(9)
        accounts.add_user(role, role, password)
        print(f"   {role:<10}  password {password}")
    print(
        "   the researcher explores the index and builds cohorts (Cohort builder: start from "
        "mi_cad_ct_demo, the example with its dates widened as in step 6) and requests their "
        "export; the "
        "reviewer approves it and the export runs, de-identified; the operator watches "
        "throughput (docs/web.md)"
    )
    print(f"   http://127.0.0.1:{port}/", flush=True)
    uvicorn.run(create_app(root), host="127.0.0.1", port=port, log_level="warning")


def _export(selection: Path, root: Path, progress: bool) -> Path:
    """Export the example cohort's series to Zarr, and say how to open them."""
    from imgindex.cli.export import _Bar, format_summary
    from imgindex.deid import Deidentifier
    from imgindex.export import export

    out = root / "exports" / "mi_cad_ct.zarr"
    print(
        "\n7. the cohort's series, de-identified (DICOM PS3.15 Basic Profile, dates shifted per "
        "patient, descriptions cleaned), as one Zarr array per series, with the persons' EMR "
        "rows under the same pseudonyms:\n"
        f"   imgindex export {selection} --root {root} --out {out} --with-emr"
    )
    key = root / "secrets" / "deid.key"
    if not key.is_file():
        print(
            f"   made a demo de-identification key: {key} (pseudonyms and date shifts derive "
            "from it; for real data make your own and pass it with --deid-key-file)"
        )
    deid = Deidentifier.for_root(root)
    bar = _Bar(progress)
    try:
        summary = export(selection, root, out, deid=deid, with_emr=True, on_progress=bar)
    finally:
        bar.close()
    print("   " + format_summary(summary).replace("\n", "\n   "))
    if not summary.ok:
        raise ImgindexError("the demo's export did not complete; see the list above")
    _check(out, root, deid)
    return out


def _check(out: Path, root: Path, deid: Deidentifier) -> None:
    """Scan the export for identifying values, as a researcher would before sharing it."""
    from imgindex.cli.deid_check import format_report
    from imgindex.deid.check import check_export

    print(
        "\n8. anything identifying left in the export? (names, IDs, UIDs of the index, dates "
        f"not shifted):\n   imgindex deid-check {out} --root {root}"
    )
    report = check_export(out, root, deid=deid)
    print("   " + format_report(report).replace("\n", "\n   "))
    if not report.ok:
        raise ImgindexError("the demo's export holds identifying values; see the list above")


def _emr_and_cohort(root: Path, index: Index) -> Path:
    """Write a synthetic OMOP EMR for the demo's patients, import it, run the MI/CAD cohort."""
    import polars as pl

    from imgindex.cli.cohort import print_attrition, with_entry_dates
    from imgindex.cohort import Cohort, select
    from imgindex.cohort.examples import examples_folder
    from imgindex.emr import import_emr, link_report
    from imgindex.testing import write_omop_csv
    from imgindex.testing.omop_demo import emr_for_index

    omop = root / "demo-omop"
    series = index.series.select(
        "PatientID", "PatientSex", "PatientBirthDate", "Modality", "imaging_date"
    ).collect()
    emr = emr_for_index(series)
    write_omop_csv(emr.tables, omop)
    print(
        f"\n5. an EMR for these patients, in the OMOP CDM (synthetic: {emr.mi_persons} have a "
        f"myocardial infarction before a CT, {emr.procedure_in_window} a coronary procedure "
        f"7-14 days later), as CSV files under {omop}:\n"
        f"   imgindex emr import {omop} --root {root}"
    )
    summary = import_emr(omop, root)
    rows = ", ".join(f"{name} {n:,}" for name, n in summary.rows.items())
    print(f"   imported {rows} in {summary.seconds:.1f} s")
    print("   " + link_report(index, root).describe().replace("\n", "\n   "))

    folder = examples_folder()
    path = folder / "mi_cad_ct.yaml"
    dates = pl.DataFrame(series).get_column("imaging_date").drop_nulls()
    first, last = dates.min(), dates.max()
    assert isinstance(first, dt.date)
    assert isinstance(last, dt.date)
    first -= dt.timedelta(days=5)  # a diagnosis may precede the first image
    out = root / "selections" / "mi_cad_ct.parquet"
    shown = _relative(path)
    print(
        "\n6. the example cohort: MI, a coronary procedure 7 to 14 days later, their CT from "
        "the 30 days after the diagnosis.\n"
        "   Its diagnosis dates (2023-10-01..10) are widened to the demo's years:\n"
        f"   imgindex select {shown} --root {root} --entry-from {first} --entry-to {last} "
        f"--out {out}"
    )
    cohort = with_entry_dates(Cohort.from_yaml(path), first, last)
    selection = select(cohort, root)
    selection.write(out)
    # The same cohort, for the web app's cohort builder to start from (ROOT/cohorts/).
    saved = root / "cohorts" / "mi_cad_ct_demo.yaml"
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(
        "# The example mi_cad_ct with its diagnosis dates widened to the demo's years.\n"
        + cohort.to_yaml(),
        encoding="utf-8",
    )
    print("   " + _indented(print_attrition, selection))
    preview = selection.table.select(
        [
            "PatientID",
            "SeriesDescription",
            "entry_date",
            "days_from_index",
            "coronary_procedure_days",
        ]
    )
    write_result(preview, "table", 8)
    return out


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _indented(show: Any, *args: Any) -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        show(*args)
    return buffer.getvalue().rstrip("\n").replace("\n", "\n   ")
