"""``imgindex export SELECTION --root ROOT --out EXPORT.zarr``: selected series to Zarr (or to
de-identified DICOM files with ``--format dicom``), de-identified by default."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgindex.cli._common import add_root, is_terminal, settings_from, stop_on_signals
from imgindex.errors import ConfigError

if TYPE_CHECKING:
    from imgindex.deid import Deidentifier
    from imgindex.export.run import ExportProgress, ExportSummary

#: Failures listed in the summary; the rest are in the transfers table.
_SHOWN = 20


def add_parser(sub: Any) -> None:
    """Register the subcommand."""
    parser = sub.add_parser(
        "export",
        help="export selected series, de-identified, to a Zarr store (one array per series) "
        "or as DICOM files",
        description="Fetch every instance of the selected series from where the index says it "
        "is (a file, or a DICOMweb server asked for the stored transfer syntax), decode it "
        "losslessly, assemble each series into a volume ordered along the slice normal, and "
        "write one Zarr v3 array per series with its geometry, plus manifest.parquet. "
        "Everything written passes through de-identification (DICOM PS3.15 Annex E Basic "
        "Profile with the Retain Longitudinal Temporal Information with Modified Dates, "
        "Retain Patient Characteristics and Clean Descriptors options): PatientID and UIDs "
        "become keyed pseudonyms and dates shift by a per-patient offset, both derived from "
        "a secret key, so exports made with the same key line up (docs/deid.md). Instances "
        "that may show burned-in text are left out and listed. "
        "Every series is recorded in the transfers table (expected, fetched and written "
        "instances); a series is complete only when the three agree, and a rerun of the same "
        "command resumes. Exit status 0 when every series is complete, 2 when some failed.",
    )
    parser.add_argument(
        "selection",
        metavar="SELECTION",
        help="a selection from `imgindex select` (.parquet), or a .parquet/.csv file with a "
        "SeriesInstanceUID column, or a text file with one SeriesInstanceUID per line",
    )
    add_root(parser)
    parser.add_argument(
        "--out",
        required=True,
        metavar="EXPORT.zarr",
        help="the Zarr store (or, with --format dicom, the folder) to write; a rerun resumes it",
    )
    parser.add_argument(
        "--format",
        choices=("zarr", "dicom"),
        default="zarr",
        help="zarr: one array per series (default); dicom: de-identified DICOM files, pixel "
        "data untouched, as OUT/<patient>/<study>/<series>/<instance>.dcm",
    )
    parser.add_argument(
        "--with-emr",
        action="store_true",
        help="also write the selected persons' OMOP rows (person, visits, conditions, "
        "procedures, drugs, measurements, observations) as OUT/emr/<table>.parquet, with the "
        "same pseudonyms and date shifts as the images",
    )
    parser.add_argument(
        "--deid-key-file",
        metavar="FILE",
        default=None,
        help="the secret key of pseudonyms and date shifts (64 hex digits); default "
        "ROOT/secrets/deid.key, made on first use. Same key, same pseudonyms: keep it secret "
        "and keep it",
    )
    parser.add_argument(
        "--deid-options",
        default="dates,characteristics,descriptors",
        metavar="LIST",
        help="PS3.15 profile options, comma-separated: dates (shift dates rather than remove "
        "them), characteristics (keep age, sex, size, weight), descriptors (keep free-text "
        "descriptions once cleaned); or none for the Basic Profile alone (default: all three)",
    )
    parser.add_argument(
        "--allow-burned-in",
        action="store_true",
        help="also export instances that may show burned-in text (BurnedInAnnotation YES, "
        "secondary captures, ultrasound, photographs, screen saves); by default they are left "
        "out and listed",
    )
    parser.add_argument(
        "--no-deid",
        action="store_true",
        help="write identifying values as they are (no de-identification): only for exports "
        "that stay where the source data may be, and for testing imgindex deid-check",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="decode-and-write processes (default: one per CPU)",
    )
    parser.add_argument(
        "--fetch-threads",
        type=int,
        default=4,
        metavar="N",
        help="fetch threads, and requests to a DICOMweb server at once (default 4)",
    )
    parser.add_argument(
        "--max-inflight-mb",
        type=int,
        default=1024,
        metavar="M",
        help="megabytes of series in memory at once, fetched and decoded (default 1024); a "
        "series larger than this is exported alone",
    )
    parser.add_argument(
        "--chunks",
        type=_chunks,
        default=None,
        metavar="z,y,x",
        help="inner chunk shape (default: one slice, 1,ROWS,COLUMNS); shards group chunks "
        "into files of up to 256 MiB",
    )
    parser.add_argument(
        "--compressor",
        choices=("blosc-lz4", "blosc-zstd", "zstd", "none"),
        default="blosc-lz4",
        help="chunk compression, all lossless (default blosc-lz4: fastest to write and to "
        "read in training; blosc-zstd: about 25%% smaller, slower)",
    )
    parser.add_argument(
        "--split-stacks",
        action="store_true",
        help="write a series that is not one volume (mixed sizes or orientations) as one "
        "array per consistent stack, instead of failing it",
    )
    parser.add_argument(
        "--scheduler",
        metavar="tcp://HOST:PORT",
        default=None,
        help="run each series as a task on this Dask distributed scheduler",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="P",
        help="serve Prometheus metrics (imgindex_export_*) on 127.0.0.1:P/metrics",
    )
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument(
        "--auth",
        default=None,
        help="DICOMweb credentials: user:password, bearer:TOKEN or header:NAME:VALUE "
        "(visible to other users in the process list: prefer --auth-file or IMGINDEX_AUTH)",
    )
    auth.add_argument(
        "--auth-file",
        default=None,
        metavar="FILE",
        help="read the credentials, in --auth syntax, from the first line of FILE",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (it shows on a terminal)"
    )
    parser.set_defaults(run=run)


def _chunks(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"chunks are integers like 1,512,512, not {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"chunks must be positive integers, not {text!r}")
    return values


def _auth_text(args: argparse.Namespace) -> str | None:
    import os

    if args.auth_file:
        try:
            lines = Path(args.auth_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"--auth-file: {exc}") from None
        if not lines or not lines[0].strip():
            raise ConfigError(f"--auth-file {args.auth_file}: the first line is empty")
        return lines[0].strip()
    text = args.auth or os.environ.get("IMGINDEX_AUTH")
    return text or None


class _Bar:
    """A progress bar over DICOM bytes: series done of total, MB/s now and on average, ETA,
    failures."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.last = 0.0

    def __call__(self, progress: ExportProgress) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(
                total=progress.total or 0,
                unit=" series",
                desc="export",
                file=sys.stderr,
                dynamic_ncols=True,
            )
        self.bar.total = progress.total
        self.bar.n = progress.done + progress.failed
        self.bar.set_postfix_str(
            f"{progress.rate_now / 1e6:,.0f} MB/s now, {progress.rate_avg / 1e6:,.0f} avg, "
            f"ETA {_eta(progress.eta_s)}, {progress.failed} failed",
            refresh=False,
        )
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return time.strftime("%H:%M:%S", time.gmtime(max(0.0, seconds)))


def run(args: argparse.Namespace) -> int:
    """Run ``imgindex export``."""
    from imgindex._metrics import ServedMetrics
    from imgindex.export.fetch import FetchOptions
    from imgindex.export.run import export

    settings = settings_from(args)
    if args.fetch_threads < 1:
        raise ConfigError(f"--fetch-threads must be at least 1, not {args.fetch_threads}")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, not {args.workers}")
    served = ServedMetrics()
    if args.metrics_port is not None:
        port = served.serve(args.metrics_port)
        print(f"imgindex export: metrics on http://127.0.0.1:{port}/metrics", file=sys.stderr)
    deid = _deidentifier(args, settings.root)
    stop = stop_on_signals("export", "finishing the series in flight (a rerun resumes)")
    bar = _Bar(is_terminal() and not args.no_progress)
    try:
        summary = export(
            args.selection,
            settings.root,
            args.out,
            workers=args.workers,
            fetch_threads=args.fetch_threads,
            max_inflight_mb=args.max_inflight_mb,
            chunks=args.chunks,
            compressor=args.compressor,
            split_stacks=args.split_stacks,
            scheduler=args.scheduler,
            fetch=FetchOptions(auth=_auth_text(args), concurrency=args.fetch_threads),
            deid=deid,
            format=args.format,
            with_emr=args.with_emr,
            allow_burned_in=args.allow_burned_in,
            registry=served.registry,
            on_progress=bar,
            stop=stop,
        )
    finally:
        bar.close()
        served.close()
    print(format_summary(summary))
    if summary.cancelled:
        return 130
    return 0 if summary.ok else 2


def _deidentifier(args: argparse.Namespace, root: Path) -> Deidentifier:
    """The export's key and options, saying so when a key is made or de-identification is off."""
    from imgindex.deid import Deidentifier, ProfileOptions

    try:
        options = ProfileOptions.parse(args.deid_options)
    except ValueError as exc:
        raise ConfigError(f"--deid-options: {exc}") from None
    enabled = not args.no_deid
    if not enabled:
        print(
            "imgindex export: --no-deid: identifying values are written as they are",
            file=sys.stderr,
        )
    if args.deid_key_file:
        return Deidentifier.from_file(args.deid_key_file, options, enabled=enabled)
    key = Path(root) / "secrets" / "deid.key"
    made = not key.is_file()
    deid = Deidentifier.for_root(root, options, enabled=enabled)
    if made:
        print(
            f"imgindex export: made a new de-identification key, {key} (readable by you "
            "only): exports with the same key share pseudonyms and date shifts; keep it secret",
            file=sys.stderr,
        )
    return deid


def format_summary(summary: ExportSummary) -> str:
    """The summary, failures capped at a screenful, and how to open the store."""
    text = summary.describe()
    lines = text.splitlines()
    if len(summary.failures) > _SHOWN:
        head = [line for line in lines if not line.startswith("  ")]
        shown = [line for line in lines if line.startswith("  ")][:_SHOWN]
        lines = [
            *head,
            *shown,
            (
                f"  ... and {len(summary.failures) - _SHOWN} more: imgindex sql --root ROOT "
                "\"SELECT * FROM transfers WHERE outcome <> 'complete'\""
            ),
        ]
    if summary.arrays and summary.format == "zarr":
        lines += [
            "open it in Python, with no imgindex code (docs/export.md):",
            "  import zarr, polars as pl",
            f'  manifest = pl.read_parquet("{summary.out / "manifest.parquet"}")',
            f'  volume = zarr.open_array("{summary.out}/" + manifest["key"][0], mode="r")[...]',
        ]
    return "\n".join(lines)
