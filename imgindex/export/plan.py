"""What an export moves: the selected series, each with its instances from the index.

A selection is a Parquet file written by ``imgindex select`` (its labels and provenance travel
with the arrays), or any Parquet or CSV file with a ``SeriesInstanceUID`` column, or a text
file with one SeriesInstanceUID per line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import polars as pl
import pyarrow.parquet as pq
from pydicom.uid import UID

from imgindex.errors import ConfigError
from imgindex.schema import DEFAULT_ATTRIBUTES, UID_KEYWORDS

if TYPE_CHECKING:
    from collections.abc import Mapping

    from imgindex.index import Index

__all__ = [
    "BURNED_IN_MODALITIES",
    "BURNED_IN_SOP_CLASSES",
    "SERIES_ATTRIBUTES",
    "Exclusion",
    "Instance",
    "SelectionFile",
    "SeriesJob",
    "burned_in_reason",
    "plan_series",
    "read_selection_file",
]

#: Columns of a selection that are not labels (the series' identity and where it comes from).
_NOT_LABELS: Final = frozenset(
    {
        "person_id",
        "PatientID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "AccessionNumber",
        "Modality",
        "BodyPartExamined",
        "SeriesDescription",
        "instance_count",
        "imaging_date",
        "cohort_sha256",
    }
)
#: Attributes of the index offered to the arrays: the patient, study and series levels of the
#: index schema, and a few acquisition parameters (of the series' first instance). Each goes
#: through de-identification (:meth:`imgindex.deid.Deidentifier.attributes`), which drops,
#: shifts or cleans the identifying ones; the names and IDs among them are what descriptions
#: are cleaned of. PatientID and the study's UID travel separately.
SERIES_ATTRIBUTES: Final = (
    *(
        a.keyword
        for a in DEFAULT_ATTRIBUTES
        if a.level != "instance" and a.keyword not in (*UID_KEYWORDS, "PatientID")
    ),
    "KVP",
    "ConvolutionKernel",
    "MagneticFieldStrength",
)
#: SOP classes that commonly carry burned-in text: secondary captures (screenshots, scanned
#: documents), ultrasound, visible light photography and video (PS3.15 E.1.1 and the
#: Standard's note on burned-in annotation).
BURNED_IN_SOP_CLASSES: Final = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
        "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
        "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume Storage
        "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image Storage
        "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image Storage (retired)
        "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image Storage (retired)
        "1.2.840.10008.5.1.4.1.1.77.1.1.1",  # Video Endoscopic Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.2.1",  # Video Microscopic Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.4.1",  # Video Photographic Image Storage
        "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF Storage
    }
)
#: Modalities that commonly carry burned-in text (ultrasound, secondary capture, external
#: camera photography, document).
BURNED_IN_MODALITIES: Final = frozenset({"US", "SC", "XC", "DOC"})
#: Bytes a decoded pixel takes, per instance, when the index does not know the image size.
_FALLBACK_DECODED_RATIO: Final = 3


@dataclass(frozen=True)
class SelectionFile:
    """A selection's rows (one per series, first row wins) and what made it."""

    path: Path
    series: list[str]
    rows: dict[str, dict[str, Any]]
    label_columns: list[str]
    cohort_sha256: str | None
    versions: dict[str, Any]


@dataclass(frozen=True)
class Instance:
    """One instance to fetch: where the index says it is, and its size there."""

    sop_instance_uid: str
    location: str
    size_bytes: int
    transfer_syntax: str | None


@dataclass(frozen=True)
class Exclusion:
    """Instances of a series left out of the export because they may show burned-in text."""

    series_uid: str
    excluded: int
    of: int
    reason: str


@dataclass(frozen=True)
class SeriesJob:
    """One series to export."""

    series_uid: str
    study_uid: str | None
    patient_id: str | None
    instances: tuple[Instance, ...]
    #: The selection's row (labels and person_id), before de-identification.
    labels: dict[str, Any] = field(default_factory=dict)
    #: Series attributes from the index, before de-identification.
    attributes: dict[str, Any] = field(default_factory=dict)
    #: Decoded bytes estimated from Rows x Columns x frames x samples x bits.
    decoded_bytes: int = 0

    @property
    def size_bytes(self) -> int:
        """DICOM bytes in (what the index says the instances weigh)."""
        return sum(i.size_bytes for i in self.instances)

    @property
    def memory_bytes(self) -> int:
        """What converting the series holds in memory at most: the fetched bytes, the decoded
        frames and the assembled volume."""
        return self.size_bytes + 2 * max(self.decoded_bytes, self.size_bytes)


def read_selection_file(path: str | Path) -> SelectionFile:
    """Read a selection (see the module docstring).

    Raises
    ------
    ConfigError
        If the file is missing, unreadable or has no SeriesInstanceUID.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such selection file")
    cohort_sha: str | None = None
    versions: dict[str, Any] = {}
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            table = pq.read_table(path)
            meta = table.schema.metadata or {}
            if b"imgindex.cohort_sha256" in meta:
                cohort_sha = meta[b"imgindex.cohort_sha256"].decode()
            if b"imgindex.versions" in meta:
                versions = json.loads(meta[b"imgindex.versions"])
            frame = pl.from_arrow(table)
            assert isinstance(frame, pl.DataFrame)
        elif suffix in (".csv", ".tsv"):
            frame = pl.read_csv(
                path, separator="\t" if suffix == ".tsv" else ",", infer_schema=False
            )
        else:
            # One UID per line; quotes (as a CSV export writes them), a SeriesInstanceUID
            # header, blank lines and # comments are allowed.
            stripped = (
                line.strip().strip("\"'").strip()
                for line in path.read_text(encoding="utf-8").splitlines()
            )
            uids = [
                uid
                for uid in stripped
                if uid and not uid.startswith("#") and uid != "SeriesInstanceUID"
            ]
            frame = pl.DataFrame(
                {"SeriesInstanceUID": uids}, schema={"SeriesInstanceUID": pl.String}
            )
    except (OSError, ValueError, pl.exceptions.PolarsError) as exc:
        raise ConfigError(f"{path}: cannot read the selection: {exc}") from exc
    if "SeriesInstanceUID" not in frame.columns:
        raise ConfigError(
            f"{path}: a selection needs a SeriesInstanceUID column (has {', '.join(frame.columns)}); "
            "write one with: imgindex select COHORT --root ROOT --out SELECTION.parquet"
        )
    frame = frame.filter(pl.col("SeriesInstanceUID").is_not_null()).unique(
        "SeriesInstanceUID", keep="first", maintain_order=True
    )
    if "cohort_sha256" in frame.columns and cohort_sha is None:
        shas = frame.get_column("cohort_sha256").drop_nulls().unique().to_list()
        cohort_sha = str(shas[0]) if len(shas) == 1 else None
    labels = [c for c in frame.columns if c not in _NOT_LABELS]
    rows = {
        str(row["SeriesInstanceUID"]): row
        for row in frame.select(
            "SeriesInstanceUID", *[c for c in ("person_id", *labels) if c in frame.columns]
        ).iter_rows(named=True)
    }
    return SelectionFile(
        path=path,
        series=list(rows),
        rows=rows,
        label_columns=labels,
        cohort_sha256=cohort_sha,
        versions=versions,
    )


def burned_in_reason(row: Mapping[str, Any]) -> str | None:
    """Why an instance (an index row) may show burned-in text, or ``None``:
    BurnedInAnnotation YES, a SOP class or modality that commonly burns text in, or an
    ImageType of SCREEN SAVE."""
    if str(row.get("BurnedInAnnotation") or "").strip().upper() == "YES":
        return "BurnedInAnnotation is YES"
    sop_class = str(row.get("SOPClassUID") or "")
    if sop_class in BURNED_IN_SOP_CLASSES:
        return f"SOP class {UID(sop_class).name}"
    modality = str(row.get("Modality") or "").strip().upper()
    if modality in BURNED_IN_MODALITIES:
        return f"modality {modality}"
    image_type = row.get("ImageType")
    values = image_type if isinstance(image_type, list) else str(image_type or "").split("\\")
    if any(str(v).strip().upper() == "SCREEN SAVE" for v in values):
        return "ImageType SCREEN SAVE"
    return None


def plan_series(
    index: Index, selection: SelectionFile, *, allow_burned_in: bool = False
) -> tuple[list[SeriesJob], list[str], list[Exclusion]]:
    """The selection's series as jobs (selection order), the UIDs the index lacks, and the
    instances left out as possibly showing burned-in text (unless ``allow_burned_in``).

    A series all of whose instances are left out has no job."""
    wanted = pl.Series("SeriesInstanceUID", selection.series, dtype=pl.String)
    instances = index.instances
    names = set(instances.collect_schema().names())
    size_columns = [
        c
        for c in ("Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated")
        if c in names
    ]
    attributes = [c for c in SERIES_ATTRIBUTES if c in names]
    frame = (
        instances.filter(pl.col("SeriesInstanceUID").is_in(wanted.implode()))
        .select(
            "SeriesInstanceUID",
            "StudyInstanceUID",
            "PatientID",
            "SOPInstanceUID",
            "location",
            "size_bytes",
            "TransferSyntaxUID",
            *size_columns,
            *attributes,
            *(["InstanceNumber"] if "InstanceNumber" in names else []),
            *[c for c in ("BurnedInAnnotation", "SOPClassUID", "ImageType") if c in names],
        )
        .collect()
    )
    by_series: dict[str, list[dict[str, Any]]] = {}
    for row in frame.iter_rows(named=True):
        by_series.setdefault(row["SeriesInstanceUID"], []).append(row)
    jobs: list[SeriesJob] = []
    missing: list[str] = []
    exclusions: list[Exclusion] = []
    for uid in selection.series:
        rows = by_series.get(uid)
        if not rows:
            missing.append(uid)
            continue
        if not allow_burned_in:
            reasons = [burned_in_reason(r) for r in rows]
            flagged = [r for r in reasons if r is not None]
            if flagged:
                exclusions.append(
                    Exclusion(
                        uid, len(flagged), len(rows), f"possible burned-in text: {flagged[0]}"
                    )
                )
                rows = [r for r, why in zip(rows, reasons, strict=True) if why is None]
                if not rows:
                    continue
        rows.sort(key=lambda r: (r.get("InstanceNumber") is None, r.get("InstanceNumber") or 0))
        first = rows[0]
        jobs.append(
            SeriesJob(
                series_uid=uid,
                study_uid=first["StudyInstanceUID"],
                patient_id=first["PatientID"],
                instances=tuple(
                    Instance(
                        r["SOPInstanceUID"],
                        r["location"] or "",
                        int(r["size_bytes"] or 0),
                        r["TransferSyntaxUID"],
                    )
                    for r in rows
                ),
                labels=dict(selection.rows.get(uid, {})),
                attributes={a: first[a] for a in attributes},
                decoded_bytes=sum(_decoded_bytes(r) for r in rows),
            )
        )
    return jobs, missing, exclusions


def _decoded_bytes(row: dict[str, Any]) -> int:
    rows, columns = row.get("Rows"), row.get("Columns")
    if not rows or not columns:
        return _FALLBACK_DECODED_RATIO * int(row.get("size_bytes") or 0)
    frames = row.get("NumberOfFrames") or 1
    samples = row.get("SamplesPerPixel") or 1
    bits = row.get("BitsAllocated") or 16
    return int(rows * columns * frames * samples * max(1, bits // 8))
