"""The index schema: which DICOM attributes become columns, and their Arrow types.

Columns holding DICOM attributes keep the Standard's keyword spelling (``StudyDate``,
``PixelSpacing``); columns imgindex adds are snake_case (``location``, ``size_bytes``).
Types follow the attribute's Value Representation (PS3.5 6.2) and Value Multiplicity:

=======================  =================================
VR                       Arrow type
=======================  =================================
DA                       ``date32``
TM                       ``string`` ``HH:MM:SS[.ffffff]`` (Delta Lake has no TIME type;
                         ``CAST(StudyTime AS TIME)`` in SQL)
DT                       ``timestamp[us, UTC]`` (the value as written; offset dropped)
IS, SS, US, SL, UL, SV   ``int64``
DS, FL, FD               ``float64``
anything else            ``string`` (PN as its decoded text)
=======================  =================================

Attributes that may hold more than one value (VM other than 1) are lists of that type.
Values that do not parse are kept as null and recorded in ``rejects``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_dict, tag_for_keyword

__all__ = [
    "CRAWL_STATE_SCHEMA",
    "DEFAULT_ATTRIBUTES",
    "REJECT_SCHEMA",
    "TRANSFER_SCHEMA",
    "UID_KEYWORDS",
    "Attribute",
    "Level",
    "attributes_for",
    "instance_schema",
]

Level = Literal["patient", "study", "series", "instance"]

#: The UIDs every indexed instance must carry: (0008,0018), (0020,000E), (0020,000D).
UID_KEYWORDS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")

#: Default attributes per level: what researchers filter and group on. PatientName and other
#: identifying attributes are indexed (the index is internal to the hospital); export passes
#: everything through de-identification.
_DEFAULTS: dict[Level, tuple[str, ...]] = {
    "patient": (
        "PatientID",
        "IssuerOfPatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
    ),
    "study": (
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyDescription",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
        "InstitutionName",
    ),
    "series": (
        "SeriesInstanceUID",
        "SeriesNumber",
        "SeriesDate",
        "SeriesTime",
        "Modality",
        "SeriesDescription",
        "BodyPartExamined",
        "ProtocolName",
        "Laterality",
        "PatientPosition",
        "Manufacturer",
        "ManufacturerModelName",
        "StationName",
        "FrameOfReferenceUID",
        "ContrastBolusAgent",
    ),
    "instance": (
        "SOPInstanceUID",
        "SOPClassUID",
        "InstanceNumber",
        "AcquisitionNumber",
        "AcquisitionDate",
        "AcquisitionTime",
        "ContentDate",
        "ContentTime",
        "ImageType",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
        "SpacingBetweenSlices",
        "SliceLocation",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "BitsAllocated",
        "BitsStored",
        "PixelRepresentation",
        "RescaleIntercept",
        "RescaleSlope",
        "WindowCenter",
        "WindowWidth",
        "KVP",
        "ConvolutionKernel",
        "EchoTime",
        "RepetitionTime",
        "MagneticFieldStrength",
        "BurnedInAnnotation",
        "SpecificCharacterSet",
    ),
}

_SCALARS: dict[str, pa.DataType] = {
    "DA": pa.date32(),
    "TM": pa.string(),
    "DT": pa.timestamp("us", tz="UTC"),
    "IS": pa.int64(),
    "SS": pa.int64(),
    "US": pa.int64(),
    "SL": pa.int64(),
    "UL": pa.int64(),
    "SV": pa.int64(),
    "UV": pa.int64(),
    "DS": pa.float64(),
    "FL": pa.float64(),
    "FD": pa.float64(),
}

#: VRs that cannot be a column: nested or bulk values.
_UNSUPPORTED_VRS = frozenset({"SQ", "OB", "OD", "OF", "OL", "OV", "OW", "UN"})


@dataclass(frozen=True)
class Attribute:
    """A DICOM attribute indexed as a column.

    Attributes
    ----------
    keyword : str
        The Standard's keyword, also the column name.
    tag : int
        The attribute's tag, e.g. ``0x0020000D``.
    vr : str
        Value Representation from the data dictionary (PS3.6).
    multi : bool
        Whether the column is a list (VM other than 1).
    level : Level
        The information-model level the attribute belongs to.
    """

    keyword: str
    tag: int
    vr: str
    multi: bool
    level: Level

    @property
    def arrow_type(self) -> pa.DataType:
        """The column's Arrow type (see the module docstring)."""
        scalar = _SCALARS.get(self.vr, pa.string())
        return pa.list_(scalar) if self.multi else scalar

    @property
    def tag_text(self) -> str:
        """The tag as pydicom writes it, e.g. ``(0020,000D)``."""
        return f"({self.tag >> 16:04X},{self.tag & 0xFFFF:04X})"

    @classmethod
    def from_keyword(cls, keyword: str, level: Level = "instance") -> Attribute:
        """Describe a column for the data-dictionary attribute ``keyword``.

        Raises
        ------
        ValueError
            If ``keyword`` is not in the DICOM data dictionary, or names a sequence or bulk
            attribute that cannot be a column.
        """
        if keyword not in keyword_dict:
            raise ValueError(
                f"{keyword!r} is not a DICOM keyword (PS3.6); check its spelling, "
                "e.g. 'BodyPartExamined'"
            )
        tag = tag_for_keyword(keyword)
        assert tag is not None
        vr = dictionary_VR(tag).split(" or ")[0]
        if vr in _UNSUPPORTED_VRS:
            raise ValueError(
                f"{keyword} has VR {vr}; sequence and bulk attributes cannot be columns"
            )
        return cls(keyword, tag, vr, dictionary_VM(tag) != "1", level)


DEFAULT_ATTRIBUTES: tuple[Attribute, ...] = tuple(
    Attribute.from_keyword(keyword, level)
    for level, keywords in _DEFAULTS.items()
    for keyword in keywords
)


def attributes_for(extra_keywords: tuple[str, ...] = ()) -> tuple[Attribute, ...]:
    """The default attributes plus ``extra_keywords`` (instance level), without repeats."""
    known = {a.keyword for a in DEFAULT_ATTRIBUTES}
    extra = tuple(
        Attribute.from_keyword(k) for k in dict.fromkeys(extra_keywords) if k not in known
    )
    return DEFAULT_ATTRIBUTES + extra


#: Columns imgindex adds to every instance row.
INSTANCE_EXTRA_FIELDS: tuple[pa.Field, ...] = (
    pa.field("TransferSyntaxUID", pa.string()),
    pa.field("source", pa.string()),
    pa.field("location", pa.string()),
    pa.field("size_bytes", pa.int64()),
    pa.field("indexed_at", pa.timestamp("us", tz="UTC")),
)


def instance_schema(attributes: tuple[Attribute, ...] = DEFAULT_ATTRIBUTES) -> pa.Schema:
    """Arrow schema of the ``instances`` table for these attributes."""
    return pa.schema(
        [pa.field(a.keyword, a.arrow_type) for a in attributes] + list(INSTANCE_EXTRA_FIELDS)
    )


#: Schema of ``rejects``: one row per unreadable file (``level='file'``) or per value that
#: did not parse (``level='value'``); ``reject_id`` makes re-indexing idempotent.
REJECT_SCHEMA = pa.schema(
    [
        pa.field("reject_id", pa.string()),
        pa.field("level", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("location", pa.string()),
        pa.field("source", pa.string()),
        pa.field("SOPInstanceUID", pa.string()),
        pa.field("keyword", pa.string()),
        pa.field("tag", pa.string()),
        pa.field("value", pa.string()),
        pa.field("message", pa.string()),
        pa.field("size_bytes", pa.int64()),
        pa.field("indexed_at", pa.timestamp("us", tz="UTC")),
    ]
)


#: Schema of ``crawl_state``: what each crawl of a server has seen and done, keyed by
#: (``source``, ``kind``, ``key``). ``kind`` is ``study`` or ``series`` (``key`` its UID; the
#: counts the server reported and the instances indexed; ``status`` ``done``, ``incomplete``
#: (fewer indexed than reported; ``missing`` says how many) or ``failed`` (``error`` says why)),
#: ``window`` (a StudyDate range still capped after splitting: ``status`` ``capped``) or
#: ``feed`` (Orthanc's change feed: ``last_seq``). A later crawl skips studies and series
#: whose counts are unchanged and ``done``, and retries every other one.
CRAWL_STATE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),
        pa.field("kind", pa.string()),
        pa.field("key", pa.string()),
        pa.field("StudyInstanceUID", pa.string()),
        pa.field("status", pa.string()),
        pa.field("expected_series", pa.int64()),
        pa.field("expected_instances", pa.int64()),
        pa.field("indexed_instances", pa.int64()),
        pa.field("missing", pa.int64()),
        pa.field("last_seq", pa.int64()),
        pa.field("error", pa.string()),
        pa.field("updated_at", pa.timestamp("us", tz="UTC")),
    ]
)


#: Schema of ``transfers``, the export ledger: one row per (``export``, ``SeriesInstanceUID``),
#: ``export`` being the export store's absolute path. ``outcome`` is ``complete`` (the
#: instances expected from the index, fetched and written agree, and every array is in
#: place), ``failed`` (``reason`` and ``message`` say why) or ``skipped`` (nothing to
#: export, e.g. no pixel data). ``arrays`` are the keys written in the store.
TRANSFER_SCHEMA = pa.schema(
    [
        pa.field("export", pa.string()),
        pa.field("SeriesInstanceUID", pa.string()),
        pa.field("outcome", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("message", pa.string()),
        pa.field("arrays", pa.list_(pa.string())),
        pa.field("expected_instances", pa.int64()),
        pa.field("fetched_instances", pa.int64()),
        pa.field("written_instances", pa.int64()),
        pa.field("bytes_in", pa.int64()),
        pa.field("bytes_out", pa.int64()),
        pa.field("seconds", pa.float64()),
        pa.field("attempts", pa.int64()),
        pa.field("finished_at", pa.timestamp("us", tz="UTC")),
    ]
)
