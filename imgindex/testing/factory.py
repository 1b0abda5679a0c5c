"""Seeded factories of valid, realistic DICOM datasets.

Every function here is deterministic: the same seed gives the same datasets, and
written out the same bytes. Randomness comes only from
:func:`numpy.random.default_rng` seeded from the caller's seed, UIDs from
:func:`pydicom.uid.generate_uid` with ``entropy_srcs`` derived from it, and dates
and times from a fixed calendar window, never from the clock.

The layers, from small to large:

* :func:`make_patient` and :func:`make_study_info` give the patient- and
  study-level attributes as small frozen dataclasses (:class:`Patient`,
  :class:`Study`) so several series can share them.
* :func:`iter_series` / :func:`make_series` build single-frame CT or MR series
  with consistent geometry and a phantom image; :func:`make_multiframe` one
  Multi-frame Grayscale Word Secondary Capture instance; and
  :func:`make_secondary_capture` one small RGB Secondary Capture instance.
* :func:`plan_study` and :func:`plan_patient_studies` describe studies as
  :class:`SeriesPlan` records (cheap: no pixels), which
  :func:`iter_planned_series` turns into datasets. :func:`make_study` and
  :func:`make_patient_studies` do both. :mod:`imgindex.testing.hospital` uses the
  plans to write large trees in parallel.
* :func:`dataset_to_bytes`, :func:`write_dataset` and
  :func:`write_and_read_dataset` encode as a DICOM File (preamble and file meta).

Pixel data of compressed transfer syntaxes is encoded with pydicom's
:meth:`~pydicom.dataset.Dataset.compress` and the pylibjpeg plugins (pylibjpeg-rle
for RLE Lossless, pylibjpeg-openjpeg for JPEG 2000 Lossless); all encodings are
lossless, so ``ds.pixel_array`` decodes to the array that was encoded.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from dataclasses import dataclass, replace
from io import BytesIO
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple

import numpy as np
from pydicom import dcmread, dcmwrite
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    PYDICOM_ROOT_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

if TYPE_CHECKING:
    from collections.abc import Iterator
    from os import PathLike

    from numpy.typing import NDArray

logger = logging.getLogger(__name__)

#: Root of every generated UID. pydicom's root is the one it offers to projects
#: without their own (PS3.5 Section 9 and Annex B); the suffix is a hash of the seed.
UID_PREFIX: Final = PYDICOM_ROOT_UID

#: Private Creator of the private block written into every generated image
#: (PS3.5 Section 7.8.1): ``(0029,0010)`` holds it, ``(0029,10xx)`` the elements.
PRIVATE_CREATOR: Final = "IMGINDEX_TEST 1.0"
#: Odd (private) group of :data:`PRIVATE_CREATOR`'s block.
PRIVATE_GROUP: Final = 0x0029

#: Transfer syntaxes the factories write. JPEG-LS Lossless is absent: pydicom's
#: only JPEG-LS encoder needs pyjpegls, which is not a dependency.
SUPPORTED_TRANSFER_SYNTAXES: Final[tuple[UID, ...]] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    JPEG2000Lossless,
)
#: The encapsulated (compressed) members of :data:`SUPPORTED_TRANSFER_SYNTAXES`.
COMPRESSED_TRANSFER_SYNTAXES: Final[tuple[UID, ...]] = (RLELossless, JPEG2000Lossless)

#: Modalities :func:`make_series` builds, with their Storage SOP Classes (PS3.4 B.5).
IMAGE_SOP_CLASSES: Final[dict[str, UID]] = {"CT": CTImageStorage, "MR": MRImageStorage}

#: Smallest rows and columns JPEG 2000 can encode: pylibjpeg-openjpeg always uses
#: 6 wavelet resolutions, which need at least 2**5 pixels in each direction.
J2K_MIN_SIZE: Final = 32

#: pydicom encoding plugin per compressed transfer syntax: pylibjpeg-rle encodes RLE
#: about ten times faster than pydicom's pure-Python RLE encoder; JPEG 2000 has
#: only the pylibjpeg-openjpeg encoder.
_ENCODING_PLUGINS: Final[dict[str, str]] = {RLELossless: "pylibjpeg", JPEG2000Lossless: "pylibjpeg"}

# Mixed into every derived seed and UID so they do not collide with other users of
# pydicom's root that hash small integers.
_ENTROPY_ROOT: Final = "imgindex.testing"
# Studies fall in this window, so that dates never depend on the clock.
_FIRST_STUDY_DATE: Final = dt.date(2012, 1, 1)
_LAST_STUDY_DATE: Final = dt.date(2024, 12, 31)
_FIRST_BIRTH_DATE: Final = dt.date(1932, 1, 1)
_LAST_BIRTH_DATE: Final = dt.date(2011, 12, 31)

_BITS_STORED: Final = 12
# Stored values of the CT phantom; Rescale Intercept -1024 maps them to HU.
_CT_INTERCEPT: Final = -1024
_CT_AIR: Final = 24
_CT_FAT: Final = 924
_CT_SOFT_TISSUE: Final = 1064
_CT_LUNG: Final = 200
_CT_BONE: Final = 1800
_CT_LESION: Final = 1180

SeriesKind = Literal["image", "multiframe", "secondary_capture"]


# -- seeds, UIDs and value formatting -------------------------------------------------


def _derive_seed(seed: int, *labels: object) -> int:
    """Return a 63-bit seed derived from `seed` and `labels`, stable across processes.

    Python's ``hash`` is salted per process for strings, so a digest is used.
    """
    digest = hashlib.sha256(repr((_ENTROPY_ROOT, seed, *labels)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _rng(seed: int, *labels: object) -> np.random.Generator:
    return np.random.default_rng(_derive_seed(seed, *labels))


def _uid(seed: int | str, *labels: object) -> UID:
    return generate_uid(
        prefix=UID_PREFIX, entropy_srcs=[_ENTROPY_ROOT, str(seed), *map(str, labels)]
    )


def _ds(value: float) -> str:
    """Format `value` as a Decimal String of at most 16 characters (PS3.5 6.2)."""
    return format_number_as_ds(float(value))


def _pick(rng: np.random.Generator, options: tuple[Any, ...] | list[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _da(date: dt.date) -> str:
    return date.strftime("%Y%m%d")


def _tm(seconds: int) -> str:
    seconds %= 86_400
    return f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"


def _parse_da(value: str) -> dt.date:
    return dt.datetime.strptime(value, "%Y%m%d").date()


def _parse_tm(value: str) -> int:
    return int(value[0:2]) * 3600 + int(value[2:4]) * 60 + int(value[4:6])


def _random_date(rng: np.random.Generator, first: dt.date, last: dt.date) -> dt.date:
    return first + dt.timedelta(days=int(rng.integers((last - first).days + 1)))


def _patient_age(birth_date: str, study_date: str) -> str:
    """Return Patient's Age (AS, PS3.5 6.2) at `study_date`: ``nnnD``, ``nnnM`` or ``nnnY``."""
    born, seen = _parse_da(birth_date), _parse_da(study_date)
    months = (seen.year - born.year) * 12 + seen.month - born.month - (seen.day < born.day)
    if months >= 12:
        return f"{min(months // 12, 999):03d}Y"
    if months >= 1:
        return f"{months:03d}M"
    return f"{max((seen - born).days, 0):03d}D"


# -- patients and studies ---------------------------------------------------------------


@dataclass(frozen=True)
class Patient:
    """Patient-level attributes shared by all of one patient's instances.

    Field names are the DICOM keywords they fill. `SpecificCharacterSet` is ``None``
    when the default repertoire (ASCII) is enough and the element is left out.
    """

    PatientID: str
    PatientName: str
    PatientBirthDate: str
    PatientSex: str
    SpecificCharacterSet: str | None


@dataclass(frozen=True)
class Study:
    """Study-level attributes shared by the series of one study.

    Field names are the DICOM keywords they fill. Create one with
    :func:`make_study_info`.
    """

    StudyInstanceUID: str
    StudyDate: str
    StudyTime: str
    AccessionNumber: str
    StudyID: str
    StudyDescription: str
    ReferringPhysicianName: str
    InstitutionName: str
    BodyPartExamined: str
    Modality: str


_FAMILY_NAMES: Final = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis",
    "Rodriguez", "Martinez", "Hernandez", "Lopez", "Wilson", "Anderson", "Thomas",
    "Taylor", "Moore", "Jackson", "Martin", "Lee", "Perez", "Thompson", "White",
    "Harris", "Sanchez", "Clark", "Lewis", "Robinson", "Walker", "Young", "Allen",
)  # fmt: skip
_GIVEN_NAMES: Final = {
    "M": ("James", "John", "Robert", "Michael", "William", "David", "Richard", "Joseph",
          "Thomas", "Charles", "Daniel", "Matthew", "Anthony", "Mark", "Paul", "Steven"),
    "F": ("Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan",
          "Jessica", "Sarah", "Karen", "Nancy", "Lisa", "Betty", "Margaret", "Sandra"),
}  # fmt: skip
# (PatientName, SpecificCharacterSet, PatientSex). ISO_IR 192 is UTF-8 and
# ISO_IR 100 is Latin-1 (PS3.3 C.12.1.1.2); the multi-group names use PS3.5 6.2's
# alphabetic=ideographic=phonetic component groups.
_NON_ASCII_NAMES: Final = (
    ("홍^길동", "ISO_IR 192", "M"),
    ("Hong^Gildong=洪^吉洞=홍^길동", "ISO_IR 192", "M"),
    ("김^민지", "ISO_IR 192", "F"),
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", "ISO_IR 192", "M"),
    ("佐藤^花子", "ISO_IR 192", "F"),
    ("王^小明", "ISO_IR 192", "M"),
    ("Dvořák^Antonín", "ISO_IR 192", "M"),
    ("Wójcik^Łucja", "ISO_IR 192", "F"),
    ("Müller^Jürgen", "ISO_IR 100", "M"),
    ("Gonçalves^José", "ISO_IR 100", "M"),
    ("Åberg^Søren", "ISO_IR 100", "M"),
    ("Núñez^María", "ISO_IR 100", "F"),
)
_NON_ASCII_FRACTION: Final = 0.25

_STUDY_KINDS: Final = {
    # Modality: (BodyPartExamined, StudyDescription, procedure code)
    "CT": (
        ("CHEST", "CT CHEST W/O CONTRAST", "CTCHESTWO"),
        ("CHEST", "CT CHEST W CONTRAST", "CTCHESTW"),
        ("ABDOMEN", "CT ABDOMEN PELVIS W CONTRAST", "CTABDPELW"),
        ("HEAD", "CT HEAD W/O CONTRAST", "CTHEADWO"),
        ("HEART", "CT CORONARY ANGIOGRAPHY", "CTCORANGIO"),
        ("NECK", "CT NECK SOFT TISSUE W CONTRAST", "CTNECKW"),
    ),
    "MR": (
        ("HEAD", "MR BRAIN W/WO CONTRAST", "MRBRAINWWO"),
        ("HEAD", "MR BRAIN W/O CONTRAST", "MRBRAINWO"),
        ("KNEE", "MR KNEE LEFT W/O CONTRAST", "MRKNEELWO"),
        ("LSPINE", "MR LUMBAR SPINE W/O CONTRAST", "MRLSPINEWO"),
        ("HEART", "MR CARDIAC FUNCTION", "MRCARDFX"),
        ("ABDOMEN", "MR LIVER W/WO CONTRAST", "MRLIVERWWO"),
    ),
}
#: StudyDescription -> local procedure code (CodingSchemeDesignator "99IMGINDEX").
_PROCEDURE_CODES: Final = {
    description: code for kinds in _STUDY_KINDS.values() for _, description, code in kinds
}
_INSTITUTIONS: Final = (
    ("GENERAL HOSPITAL", "1 Main Street, Springfield"),
    ("ST. MARY'S MEDICAL CENTER", "450 Harbor Road, Bayview"),
    ("UNIVERSITY CLINIC", "12 Campus Drive, Lakeside"),
    ("CITY IMAGING CENTER", "88 Market Avenue, Riverton"),
)
_PHYSICIANS: Final = (
    "Grey^Meredith", "House^Gregory^^Dr.", "Quinn^Michaela", "Ross^Doug", "Carter^John",
    "Yang^Cristina", "Kildare^James", "Welby^Marcus^^Dr.", "",
)  # fmt: skip
_EQUIPMENT: Final = {
    # Modality: (Manufacturer, ManufacturerModelName, SoftwareVersions, field strength)
    "CT": (
        ("SIEMENS", "SOMATOM Definition AS+", "syngo CT VA48A", 0.0),
        ("GE MEDICAL SYSTEMS", "Revolution CT", "rev_ct_1.4", 0.0),
        ("Philips", "iCT 256", "4.1.6", 0.0),
        ("TOSHIBA", "Aquilion ONE", "V6.0SP0005", 0.0),
    ),
    "MR": (
        ("SIEMENS", "Skyra", "syngo MR E11", 3.0),
        ("GE MEDICAL SYSTEMS", "SIGNA Premier", "28.0 LX MR", 3.0),
        ("Philips Medical Systems", "Ingenia", "5.4.1", 1.5),
        ("Canon Medical Systems", "Vantage Orian", "V7.0", 1.5),
    ),
}


def make_patient(seed: int) -> Patient:
    """Return a patient whose attributes derive from `seed`.

    Parameters
    ----------
    seed : int
        A non-negative integer. ``PatientID`` is ``f"PAT{seed:06d}"``, so different
        seeds give different patients.

    Returns
    -------
    Patient
        About one patient in four has a non-ASCII ``PatientName`` (Korean,
        Japanese, Chinese or European) with the matching ``SpecificCharacterSet``:
        ``"ISO_IR 192"`` (UTF-8) or ``"ISO_IR 100"`` (Latin-1). ASCII names have
        ``"ISO_IR 100"`` or no Specific Character Set.

    Raises
    ------
    ValueError
        If `seed` is negative.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, not {seed}")
    rng = _rng(seed, "patient")
    charset: str | None
    if rng.random() < _NON_ASCII_FRACTION:
        name, charset, sex = _pick(rng, _NON_ASCII_NAMES)
    else:
        sex = "O" if rng.random() < 0.02 else _pick(rng, ("M", "F"))
        given = _pick(rng, _GIVEN_NAMES["F" if sex == "F" else "M"])
        family = _pick(rng, _FAMILY_NAMES)
        name = f"{family}^{given}"
        if rng.random() < 0.3:
            name += f"^{chr(ord('A') + int(rng.integers(26)))}"
        if rng.random() < 0.5:
            name = name.upper()
        charset = "ISO_IR 100" if rng.random() < 0.5 else None
    birth = _random_date(rng, _FIRST_BIRTH_DATE, _LAST_BIRTH_DATE)
    return Patient(
        PatientID=f"PAT{seed:06d}",
        PatientName=name,
        PatientBirthDate=_da(birth),
        PatientSex=sex,
        SpecificCharacterSet=charset,
    )


def make_study_info(
    seed: int,
    patient: Patient,
    *,
    modality: str = "CT",
    study_date: str | None = None,
) -> Study:
    """Return the study-level attributes of one study of `patient`.

    Parameters
    ----------
    seed : int
        Seed of the study; it alone fixes the UID, accession number and times.
    patient : Patient
        The study's patient; the study date is never before their birth.
    modality : str
        ``"CT"`` or ``"MR"``: chooses the body part and study description.
    study_date : str, optional
        Study Date (``YYYYMMDD``); seed-chosen between 2012 and 2024 by default.

    Returns
    -------
    Study
        The attributes shared by the series of the study.

    Raises
    ------
    ValueError
        If `modality` is not one of :data:`IMAGE_SOP_CLASSES`.
    """
    _check_modality(modality)
    rng = _rng(seed, "study", modality)
    if study_date is None:
        first = max(_FIRST_STUDY_DATE, _parse_da(patient.PatientBirthDate))
        study_date = _da(_random_date(rng, first, _LAST_STUDY_DATE))
    body_part, description, _ = _pick(rng, _STUDY_KINDS[modality])
    institution, _address = _pick(rng, _INSTITUTIONS)
    # Outpatient hours: 07:00 to 19:00.
    study_time = _tm(7 * 3600 + int(rng.integers(12 * 3600)))
    return Study(
        StudyInstanceUID=_uid(seed, "study"),
        StudyDate=study_date,
        StudyTime=study_time,
        AccessionNumber=f"A{_derive_seed(seed, 'accession') % 10**10:010d}",
        StudyID=str(int(rng.integers(1, 100_000))),
        StudyDescription=description,
        ReferringPhysicianName=_pick(rng, _PHYSICIANS),
        InstitutionName=institution,
        BodyPartExamined=body_part,
        Modality=modality,
    )


def _check_modality(modality: str) -> None:
    if modality not in IMAGE_SOP_CLASSES:
        raise ValueError(f"modality must be one of {sorted(IMAGE_SOP_CLASSES)}, not {modality!r}")


def _check_transfer_syntax(transfer_syntax: str) -> UID:
    uid = UID(transfer_syntax)
    if uid not in SUPPORTED_TRANSFER_SYNTAXES:
        names = ", ".join(ts.name for ts in SUPPORTED_TRANSFER_SYNTAXES)
        raise ValueError(f"transfer_syntax must be one of {names}, not {uid!r}")
    return uid


def _resolve_context(
    seed: int,
    modality: str,
    patient: Patient | None,
    study: Study | None,
    study_uid: str | None,
    study_date: str | None,
) -> tuple[Patient, Study]:
    if patient is None:
        patient = make_patient(seed)
    if study is None:
        study = make_study_info(seed, patient, modality=modality, study_date=study_date)
    elif study_date is not None:
        study = replace(study, StudyDate=study_date)
    if study_uid is not None:
        study = replace(study, StudyInstanceUID=study_uid)
    return patient, study


# -- common modules ----------------------------------------------------------------------


def _file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "IMGINDEX_TEST"
    return meta


def _set_patient_and_study(ds: Dataset, patient: Patient, study: Study) -> None:
    """Fill the Patient, General Study and Patient Study modules (PS3.3 C.7.1-C.7.2).

    Values not in `patient` or `study` derive from the StudyInstanceUID, so that
    every series of a study carries the same ones.
    """
    rng = _rng(_derive_seed(0, study.StudyInstanceUID), "patient-study")
    if patient.SpecificCharacterSet is not None:
        ds.SpecificCharacterSet = patient.SpecificCharacterSet
    ds.PatientName = patient.PatientName
    ds.PatientID = patient.PatientID
    ds.IssuerOfPatientID = "IMGINDEX"
    ds.PatientBirthDate = patient.PatientBirthDate
    ds.PatientSex = patient.PatientSex
    ds.PatientIdentityRemoved = "NO"
    ds.StudyInstanceUID = study.StudyInstanceUID
    ds.StudyDate = study.StudyDate
    ds.StudyTime = study.StudyTime
    ds.AccessionNumber = study.AccessionNumber
    ds.StudyID = study.StudyID
    ds.StudyDescription = study.StudyDescription
    ds.ReferringPhysicianName = study.ReferringPhysicianName
    ds.PhysiciansOfRecord = study.ReferringPhysicianName
    ds.NameOfPhysiciansReadingStudy = _pick(rng, _PHYSICIANS[:-1])
    ds.PatientAge = _patient_age(patient.PatientBirthDate, study.StudyDate)
    age_years = int(ds.PatientAge[:3]) if ds.PatientAge.endswith("Y") else 0
    adult = age_years >= 16
    weight = float(np.clip(rng.normal(75, 12), 45, 130)) if adult else 4 + 3.5 * age_years
    height = float(np.clip(rng.normal(1.72, 0.09), 1.45, 2.0)) if adult else 0.5 + 0.07 * age_years
    ds.PatientWeight = _ds(round(weight, 1))
    ds.PatientSize = _ds(round(height, 2))
    ds.AdditionalPatientHistory = _pick(rng, ("", "FOLLOW-UP", "R/O PNEUMONIA", "TRAUMA"))
    procedure = Dataset()
    procedure.CodeValue = _PROCEDURE_CODES.get(study.StudyDescription, "UNLISTED")
    procedure.CodingSchemeDesignator = "99IMGINDEX"
    procedure.CodeMeaning = study.StudyDescription or "UNKNOWN"
    ds.ProcedureCodeSequence = DicomSequence([procedure])
    request = Dataset()
    request.RequestedProcedureID = study.AccessionNumber
    request.ScheduledProcedureStepID = f"{study.AccessionNumber}1"
    request.RequestedProcedureDescription = study.StudyDescription
    ds.RequestAttributesSequence = DicomSequence([request])


class _Equipment(NamedTuple):
    """The scanner of a series (General Equipment, PS3.3 C.7.5.1)."""

    manufacturer: str
    model: str
    software: str
    field_strength: float  # tesla; 0 for CT
    serial_number: str
    station: str


def _choose_equipment(study: Study, modality: str) -> _Equipment:
    """Return the scanner of `modality` at `study`'s site: one per study and modality."""
    rng = _rng(_derive_seed(0, study.StudyInstanceUID, modality), "equipment")
    manufacturer, model, software, field = _pick(rng, _EQUIPMENT[modality])
    room = int(rng.integers(1, 9))
    return _Equipment(
        manufacturer=manufacturer,
        model=model,
        software=software,
        field_strength=float(field),
        serial_number=str(int(rng.integers(10_000, 99_999))),
        station=f"{modality}{room:02d}{'OC' if rng.random() < 0.5 else 'EM'}",
    )


def _set_equipment(ds: Dataset, study: Study, equipment: _Equipment) -> None:
    ds.Manufacturer = equipment.manufacturer
    ds.ManufacturerModelName = equipment.model
    ds.SoftwareVersions = equipment.software
    ds.DeviceSerialNumber = equipment.serial_number
    ds.InstitutionName = study.InstitutionName
    ds.InstitutionAddress = dict(_INSTITUTIONS).get(study.InstitutionName, "")
    ds.InstitutionalDepartmentName = "RADIOLOGY"
    ds.StationName = equipment.station
    ds.DateOfLastCalibration = study.StudyDate


def _set_private_block(ds: Dataset, seed: int, payload: bytes) -> None:
    """Add the ``IMGINDEX_TEST 1.0`` private block (PS3.5 7.8): LO, DS, SH, OB elements."""
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", "IMGINDEX SYNTHETIC")
    block.add_new(0x02, "DS", _ds(round(seed % 1000 / 7, 3)))
    block.add_new(0x03, "SH", f"V{seed % 97}")
    block.add_new(0x04, "OB", payload)


def _private_payload(seed: int) -> bytes:
    """Return the opaque OB value of the private block, like a vendor's binary header."""
    rng = _rng(seed, "private-payload")
    length = 2 * int(rng.integers(150, 600))
    return rng.integers(0, 256, size=length, dtype=np.uint8).tobytes()


def _apply_overrides(ds: Dataset, overrides: dict[str, Any]) -> None:
    for keyword, value in overrides.items():
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"override {keyword!r} is not a DICOM keyword")
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)


def _check_size(transfer_syntax: UID, rows: int, cols: int) -> None:
    if rows < 1 or cols < 1:
        raise ValueError(f"rows and cols must be positive, not {rows} and {cols}")
    if transfer_syntax == JPEG2000Lossless and min(rows, cols) < J2K_MIN_SIZE:
        raise ValueError(
            f"JPEG 2000 needs rows and cols of at least {J2K_MIN_SIZE}, not {rows} and {cols}; "
            "use RLE Lossless for smaller images"
        )


def _set_pixels(ds: Dataset, pixels: NDArray[Any], transfer_syntax: UID) -> None:
    """Store `pixels` as Pixel Data in `transfer_syntax`, encoding it if compressed."""
    if transfer_syntax in COMPRESSED_TRANSFER_SYNTAXES:
        ds.compress(
            transfer_syntax,
            pixels,
            encoding_plugin=_ENCODING_PLUGINS[transfer_syntax],
            generate_instance_uid=False,
        )
        return
    vr = "OW" if ds.BitsAllocated > 8 else "OB"
    ds.add_new(0x7FE00010, vr, pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes())


# -- geometry and phantom ---------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    """Image plane of one series (PS3.3 C.7.6.2): direction cosines and stepping."""

    row: NDArray[np.float64]
    column: NDArray[np.float64]
    origin: NDArray[np.float64]
    step: float  # signed distance between slices along the normal, mm
    pixel_spacing: float
    thickness: float
    tilt_degrees: float

    @property
    def normal(self) -> NDArray[np.float64]:
        return np.cross(self.row, self.column)

    def orientation(self) -> list[str]:
        return [_ds(v) for v in (*self.row, *self.column)]

    def position(self, index: int) -> NDArray[np.float64]:
        return self.origin + index * self.step * self.normal


_PLANES: Final = {
    # plane: (row direction, column direction), LPS patient axes (PS3.3 C.7.6.2.1.1)
    "AXIAL": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "SAGITTAL": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "CORONAL": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}


def _make_geometry(
    rng: np.random.Generator,
    plane: str,
    rows: int,
    cols: int,
    field_of_view: float,
    thickness: float,
    spacing: float,
    *,
    tilt_degrees: float,
) -> _Geometry:
    row = np.array(_PLANES[plane][0])
    column = np.array(_PLANES[plane][1])
    if tilt_degrees:
        # Tilt about the row direction (a gantry tilt for axial CT): the column
        # direction turns towards the old normal, which keeps the pair orthonormal.
        theta = np.radians(tilt_degrees)
        normal = np.cross(row, column)
        column = np.cos(theta) * column + np.sin(theta) * normal
    # Round the cosines to what a DS can hold, then re-derive them from the text so
    # that the written values are exactly the ones the geometry uses.
    row = np.array([float(_ds(v)) for v in row])
    column = np.array([float(_ds(v)) for v in column])
    pixel_spacing = float(_ds(round(field_of_view / max(rows, cols), 6)))
    center = np.array(
        [rng.uniform(-20, 20), rng.uniform(-40, 0), rng.uniform(-300, 100)], dtype=np.float64
    )
    origin = center - row * (cols / 2 * pixel_spacing) - column * (rows / 2 * pixel_spacing)
    direction = -1.0 if rng.random() < 0.5 else 1.0
    return _Geometry(
        row=row,
        column=column,
        origin=origin,
        step=direction * spacing,
        pixel_spacing=pixel_spacing,
        thickness=thickness,
        tilt_degrees=tilt_degrees,
    )


@dataclass(frozen=True)
class _Phantom:
    """A cheap anatomical phantom: ellipses whose size varies along the series.

    Coordinates are fractions of the half field of view, ``-1`` to ``1``.
    """

    modality: str
    center: tuple[float, float]
    body: tuple[float, float]
    noise: int

    def slice(self, rng: np.random.Generator, rows: int, cols: int, z: float) -> NDArray[np.uint16]:
        """Return one slice at relative position `z` (0 to 1) along the series.

        Vectorised: each ellipse costs one broadcast comparison, so a 512 x 512
        slice takes about 2 ms.
        """
        ct = self.modality == "CT"
        air, fat, tissue, lung, bone, lesion = (
            (_CT_AIR, _CT_FAT, _CT_SOFT_TISSUE, _CT_LUNG, _CT_BONE, _CT_LESION)
            if ct
            else (0, 1400, 700, 90, 260, 1100)
        )
        image = np.full((rows, cols), air, dtype=np.int16)
        y = (np.arange(rows, dtype=np.float32) + 0.5) / rows * 2 - 1
        x = (np.arange(cols, dtype=np.float32) + 0.5) / cols * 2 - 1
        swell = 0.85 + 0.15 * np.sin(np.pi * z)
        cx, cy = self.center
        bx, by = self.body
        lung_height = 0.6 * by * float(np.sin(np.pi * z)) + 0.01
        ellipses = [
            (cx, cy, bx * swell, by * swell, fat),
            (cx, cy, bx * swell * 0.93, by * swell * 0.9, tissue),
            (cx - 0.3 * bx, cy - 0.05, 0.28 * bx * swell, lung_height, lung),
            (cx + 0.3 * bx, cy - 0.05, 0.28 * bx * swell, lung_height, lung),
            (cx, cy + 0.7 * by, 0.12 * bx, 0.12 * by, bone),
        ]
        if 0.35 < z < 0.65:
            # A small lesion that grows and shrinks over the middle slices.
            radius = 0.08 * (1 - abs(z - 0.5) * 6)
            ellipses.append((cx + 0.2 * bx, cy + 0.1, radius, 0.07, lesion))
        for ex, ey, ax, ay, value in ellipses:
            t = 1.0 - ((y - ey) / ay) ** 2
            half = np.where(t >= 0, ax * np.sqrt(np.maximum(t, 0.0)), -1.0)
            mask = np.abs(x[None, :] - ex) <= half[:, None]
            np.copyto(image, np.int16(value), where=mask)
        low = -self.noise if ct else 0
        image += rng.integers(low, self.noise + 1, size=(rows, cols), dtype=np.int16)
        np.clip(image, 0, (1 << _BITS_STORED) - 1, out=image)
        return image.view(np.uint16)


def _make_phantom(rng: np.random.Generator, modality: str) -> _Phantom:
    return _Phantom(
        modality=modality,
        center=(float(rng.uniform(-0.08, 0.08)), float(rng.uniform(-0.08, 0.08))),
        body=(float(rng.uniform(0.7, 0.85)), float(rng.uniform(0.5, 0.65))),
        noise=int(rng.integers(8, 25)) if modality == "CT" else int(rng.integers(10, 40)),
    )


# -- CT and MR series -----------------------------------------------------------------


class _Reconstruction(NamedTuple):
    """A CT reconstruction: what SeriesNumber selects in a CT study."""

    description: str
    kernel: str
    window_center: int
    window_width: int
    thickness: float  # mm; contiguous slices, so also the spacing


class _MRSequence(NamedTuple):
    """An MR pulse sequence: what SeriesNumber selects in an MR study."""

    description: str
    scanning: tuple[str, ...]
    variant: tuple[str, ...]
    repetition_time: float  # ms
    echo_time: float  # ms
    inversion_time: float | None  # ms
    flip_angle: float  # degrees


_CT_RECONSTRUCTIONS: Final = (
    _Reconstruction("AXIAL 5.0 SOFT TISSUE", "B30f", 40, 400, 5.0),
    _Reconstruction("AXIAL 1.25 LUNG", "B70f", -600, 1500, 1.25),
    _Reconstruction("AXIAL 2.5 BONE", "B60s", 500, 2000, 2.5),
    _Reconstruction("AXIAL 3.0 STANDARD", "STANDARD", 40, 350, 3.0),
)
_CT_HEAD_RECONSTRUCTIONS: Final = (
    _Reconstruction("AXIAL 5.0 BRAIN", "H31s", 40, 80, 5.0),
    _Reconstruction("AXIAL 1.0 BONE", "H70h", 600, 2800, 1.0),
    _Reconstruction("AXIAL 2.0 STROKE", "H41s", 35, 45, 2.0),
)
_MR_SEQUENCES: Final = (
    _MRSequence("AX T1 SE", ("SE",), ("SP",), 550.0, 9.0, None, 90),
    _MRSequence("AX T2 FSE", ("SE",), ("SK", "SP"), 4200.0, 95.0, None, 150),
    _MRSequence("AX FLAIR", ("SE", "IR"), ("SK", "SP", "MP"), 9000.0, 81.0, 2500.0, 150),
    _MRSequence("SAG T1 MPRAGE", ("GR", "IR"), ("SK", "SP", "MP"), 2300.0, 2.98, 900.0, 9),
    _MRSequence("COR T2 STIR", ("SE", "IR"), ("SK", "SP"), 5000.0, 60.0, 160.0, 150),
    _MRSequence("AX DWI B1000", ("EP",), ("SK", "SP"), 5800.0, 78.0, None, 90),
)
_MR_PLANES: Final = {"SAG": "SAGITTAL", "COR": "CORONAL"}


@dataclass(frozen=True)
class _ImageSeries:
    """What stays the same across the instances of one CT or MR series."""

    seed: int
    modality: str
    n_instances: int
    rows: int
    cols: int
    series_number: int
    series_uid: str
    frame_of_reference_uid: str
    description: str
    window: tuple[float, float]
    window_name: str
    plane: str
    geometry: _Geometry
    series_time: str
    acquisition_time: str
    equipment: _Equipment
    payload: bytes
    reconstruction: _Reconstruction | None  # CT only
    sequence: _MRSequence | None  # MR only
    kvp: float
    tube_current: int
    exposure_time: int
    field_of_view: float


def _describe_image_series(
    seed: int,
    modality: str,
    n_instances: int,
    rows: int,
    cols: int,
    study: Study,
    series_number: int | None,
) -> tuple[_ImageSeries, _Phantom]:
    rng = _rng(seed, "series", modality)
    if series_number is None:
        series_number = int(rng.integers(1, 10))
    reconstruction: _Reconstruction | None = None
    sequence: _MRSequence | None = None
    if modality == "CT":
        head = study.BodyPartExamined == "HEAD"
        choices = _CT_HEAD_RECONSTRUCTIONS if head else _CT_RECONSTRUCTIONS
        reconstruction = choices[(series_number - 1) % len(choices)]
        description = reconstruction.description
        window = (float(reconstruction.window_center), float(reconstruction.window_width))
        window_name = " ".join(description.split()[2:])  # "AXIAL 5.0 SOFT TISSUE"
        plane, thickness = "AXIAL", reconstruction.thickness
        spacing = thickness
        tilt = float(round(rng.uniform(5, 20), 1)) if rng.random() < 0.25 else 0.0
        field_of_view = float(rng.choice([250.0, 350.0, 400.0, 500.0]))
    else:
        sequence = _MR_SEQUENCES[(series_number - 1) % len(_MR_SEQUENCES)]
        description = sequence.description
        window, window_name = (600.0, 1200.0), "DEFAULT"
        plane = _MR_PLANES.get(description[:3], "AXIAL")
        thickness = float(rng.choice([3.0, 4.0, 5.0]))
        spacing = thickness + float(rng.choice([0.0, 0.5, 1.0]))
        tilt = float(round(rng.uniform(3, 15), 1)) if rng.random() < 0.25 else 0.0
        field_of_view = float(rng.choice([220.0, 240.0, 256.0, 380.0]))
    geometry = _make_geometry(
        rng, plane, rows, cols, field_of_view, thickness, spacing, tilt_degrees=tilt
    )
    # Series are acquired a few minutes apart, in SeriesNumber order.
    start = _parse_tm(study.StudyTime) + 60 * (5 + 3 * series_number)
    series = _ImageSeries(
        seed=seed,
        modality=modality,
        n_instances=n_instances,
        rows=rows,
        cols=cols,
        series_number=series_number,
        series_uid=_uid(seed, "series"),
        # One Frame of Reference per study and modality: the patient stays put.
        frame_of_reference_uid=_uid(study.StudyInstanceUID, "frame-of-reference", modality),
        description=description,
        window=window,
        window_name=window_name,
        plane=plane,
        geometry=geometry,
        series_time=_tm(start),
        acquisition_time=_tm(start - 20),
        equipment=_choose_equipment(study, modality),
        payload=_private_payload(seed),
        reconstruction=reconstruction,
        sequence=sequence,
        kvp=float(rng.choice([80.0, 100.0, 120.0, 140.0])),
        tube_current=int(rng.integers(80, 400)),
        exposure_time=int(rng.integers(500, 1500)),
        field_of_view=field_of_view,
    )
    return series, _make_phantom(rng, modality)


def _set_series_and_image(ds: Dataset, series: _ImageSeries, study: Study, index: int) -> None:
    """Fill SOP Common, General Series, Frame of Reference, Acquisition and Image."""
    ds.InstanceCreationDate = study.StudyDate
    ds.InstanceCreationTime = series.series_time
    ds.InstanceCreatorUID = UID_PREFIX + "1"
    ds.TimezoneOffsetFromUTC = "+0000"
    ds.Modality = series.modality
    ds.SeriesInstanceUID = series.series_uid
    ds.SeriesNumber = series.series_number
    ds.SeriesDate = study.StudyDate
    ds.SeriesTime = series.series_time
    ds.SeriesDescription = series.description
    ds.ProtocolName = f"{study.StudyDescription} {series.description}"[:64]
    ds.BodyPartExamined = study.BodyPartExamined
    ds.PatientPosition = "HFS"
    ds.OperatorsName = "Tech^Radiology"
    ds.PerformingPhysicianName = ""
    ds.PerformedProcedureStepID = f"{study.AccessionNumber}1"
    ds.PerformedProcedureStepStartDate = study.StudyDate
    ds.PerformedProcedureStepStartTime = study.StudyTime
    ds.PerformedProcedureStepDescription = study.StudyDescription
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = study.StudyDate
    ds.AcquisitionTime = series.acquisition_time
    ds.AcquisitionDateTime = f"{study.StudyDate}{series.acquisition_time}"
    ds.InstanceNumber = index + 1
    ds.ContentDate = study.StudyDate
    ds.ContentTime = series.series_time
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if series.plane == "AXIAL" else "OTHER"]
    ds.ImagesInAcquisition = series.n_instances
    ds.LossyImageCompression = "00"
    ds.ImageComments = f"synthetic phantom slice {index + 1} of {series.n_instances}"
    ds.BurnedInAnnotation = "NO"


def _set_plane_and_pixel_module(ds: Dataset, series: _ImageSeries, index: int) -> None:
    """Fill Image Plane (C.7.6.2), Image Pixel (C.7.6.3) without the pixels, VOI LUT."""
    geometry = series.geometry
    position = geometry.position(index)
    ds.ImageOrientationPatient = geometry.orientation()
    ds.ImagePositionPatient = [_ds(round(float(v), 6)) for v in position]
    ds.PixelSpacing = [_ds(geometry.pixel_spacing)] * 2
    ds.SliceThickness = _ds(geometry.thickness)
    ds.SpacingBetweenSlices = _ds(abs(geometry.step))
    ds.SliceLocation = _ds(round(float(position @ geometry.normal), 6))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = series.rows
    ds.Columns = series.cols
    ds.BitsAllocated = 16
    ds.BitsStored = _BITS_STORED
    ds.HighBit = _BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = _ds(series.window[0])
    ds.WindowWidth = _ds(series.window[1])
    ds.WindowCenterWidthExplanation = series.window_name


def _set_ct_image(
    ds: Dataset, series: _ImageSeries, reconstruction: _Reconstruction, index: int
) -> None:
    """Fill the CT Image module (PS3.3 C.8.2.1) and the CT dose attributes."""
    ds.RescaleIntercept = _ds(_CT_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.KVP = _ds(series.kvp)
    ds.ScanOptions = "HELICAL MODE"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = _ds(series.field_of_view)
    ds.DistanceSourceToDetector = "1085.6"
    ds.DistanceSourceToPatient = "595"
    ds.GantryDetectorTilt = _ds(series.geometry.tilt_degrees)
    ds.TableHeight = "160"
    ds.RotationDirection = "CW"
    ds.ExposureTime = series.exposure_time
    ds.XRayTubeCurrent = series.tube_current
    ds.Exposure = series.tube_current * series.exposure_time // 1000
    ds.FilterType = "FLAT"
    ds.GeneratorPower = int(series.kvp * series.tube_current / 1000)
    ds.FocalSpots = "1.2"
    ds.ConvolutionKernel = reconstruction.kernel
    ds.RevolutionTime = 0.5
    ds.SingleCollimationWidth = 0.6
    ds.TotalCollimationWidth = 38.4
    ds.SpiralPitchFactor = 0.8
    ds.CTDIvol = round(series.tube_current * series.kvp / 4000, 2)
    phantom_code = Dataset()
    phantom_code.CodeValue = "113691"
    phantom_code.CodingSchemeDesignator = "DCM"
    phantom_code.CodeMeaning = "IEC Body Dosimetry Phantom"
    ds.CTDIPhantomTypeCodeSequence = DicomSequence([phantom_code])
    ds.IrradiationEventUID = _uid(series.seed, "irradiation", index + 1)


def _set_mr_image(ds: Dataset, series: _ImageSeries, sequence: _MRSequence, study: Study) -> None:
    """Fill the MR Image module (PS3.3 C.8.3.1)."""
    field = series.equipment.field_strength
    phase_steps = max(1, series.rows * 4 // 5)
    ds.ScanningSequence = list(sequence.scanning)
    ds.SequenceVariant = list(sequence.variant)
    ds.ScanOptions = "FS" if "STIR" in sequence.description else ""
    ds.MRAcquisitionType = "3D" if "MPRAGE" in sequence.description else "2D"
    ds.SequenceName = f"*{sequence.scanning[0].lower()}2d1_{series.series_number}"
    ds.AngioFlag = "N"
    ds.RepetitionTime = _ds(sequence.repetition_time)
    ds.EchoTime = _ds(sequence.echo_time)
    if sequence.inversion_time is not None:
        ds.InversionTime = _ds(sequence.inversion_time)
    ds.NumberOfAverages = "1"
    # Larmor frequency of 1H: 42.577478 MHz per tesla.
    ds.ImagingFrequency = _ds(round(field * 42.577478, 6))
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = _ds(field)
    ds.NumberOfPhaseEncodingSteps = phase_steps
    ds.EchoTrainLength = 1 if sequence.description.endswith(" SE") else 16
    ds.PercentSampling = "100"
    ds.PercentPhaseFieldOfView = "80"
    ds.PixelBandwidth = "200"
    ds.TransmitCoilName = "Body"
    ds.ReceiveCoilName = "Head_32" if study.BodyPartExamined == "HEAD" else "Body_18"
    ds.AcquisitionMatrix = [0, series.cols, phase_steps, 0]
    ds.InPlanePhaseEncodingDirection = "ROW"
    ds.FlipAngle = _ds(sequence.flip_angle)
    ds.VariableFlipAngleFlag = "N"
    ds.SAR = "0.84"
    ds.dBdt = "0"


def _image_dataset(
    series: _ImageSeries, patient: Patient, study: Study, index: int, transfer_syntax: UID
) -> Dataset:
    """Return instance `index` of `series`, complete but for its Pixel Data."""
    sop_class = IMAGE_SOP_CLASSES[series.modality]
    sop_instance_uid = _uid(series.seed, "instance", index + 1)
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_instance_uid, transfer_syntax)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid
    _set_patient_and_study(ds, patient, study)
    _set_equipment(ds, study, series.equipment)
    _set_series_and_image(ds, series, study, index)
    _set_plane_and_pixel_module(ds, series, index)
    if series.reconstruction is not None:
        _set_ct_image(ds, series, series.reconstruction, index)
    if series.sequence is not None:
        _set_mr_image(ds, series, series.sequence, study)
    _set_private_block(ds, series.seed, series.payload)
    return ds


def iter_series(
    seed: int,
    modality: str = "CT",
    n_instances: int = 3,
    rows: int = 16,
    cols: int = 16,
    *,
    patient: Patient | None = None,
    study: Study | None = None,
    study_uid: str | None = None,
    study_date: str | None = None,
    series_number: int | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    **overrides: Any,
) -> Iterator[Dataset]:
    """Yield the instances of one single-frame CT or MR series, one at a time.

    A generator, so that writers of large series hold one slice at a time. The
    parameters and the datasets are those of :func:`make_series`.

    Yields
    ------
    pydicom.dataset.Dataset
        The instances in InstanceNumber order.

    Raises
    ------
    ValueError
        If `modality`, `transfer_syntax`, a size or an override is not supported
        (raised at the first ``next()``).
    """
    _check_modality(modality)
    ts = _check_transfer_syntax(transfer_syntax)
    if n_instances < 1:
        raise ValueError(f"n_instances must be positive, not {n_instances}")
    _check_size(ts, rows, cols)
    patient, study = _resolve_context(seed, modality, patient, study, study_uid, study_date)
    series, phantom = _describe_image_series(
        seed, modality, n_instances, rows, cols, study, series_number
    )
    noise_rng = _rng(seed, "noise")
    for index in range(n_instances):
        ds = _image_dataset(series, patient, study, index, ts)
        _set_pixels(ds, phantom.slice(noise_rng, rows, cols, (index + 0.5) / n_instances), ts)
        _apply_overrides(ds, overrides)
        yield ds


def make_series(
    seed: int,
    modality: str = "CT",
    n_instances: int = 3,
    rows: int = 16,
    cols: int = 16,
    *,
    patient: Patient | None = None,
    study: Study | None = None,
    study_uid: str | None = None,
    study_date: str | None = None,
    series_number: int | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    **overrides: Any,
) -> list[Dataset]:
    """Return one single-frame CT or MR series with consistent geometry.

    Each instance carries the Patient, Study, Series, Frame of Reference,
    Equipment, Image Plane, Image Pixel, VOI LUT, CT Image or MR Image and SOP
    Common attributes a scanner writes (about 120 elements, 2-4 KB of header), a
    private block of :data:`PRIVATE_CREATOR`, and a phantom image that changes
    from slice to slice. ImagePositionPatient steps along the slice normal (the
    cross product of the row and column direction cosines) by
    SpacingBetweenSlices; about one series in four is oblique by a small tilt.

    Parameters
    ----------
    seed : int
        Fixes everything not given explicitly: UIDs, geometry, pixels.
    modality : str
        ``"CT"`` (CT Image Storage) or ``"MR"`` (MR Image Storage).
    n_instances, rows, cols : int
        Number of slices and their size.
    patient : Patient, optional
        Defaults to ``make_patient(seed)``.
    study : Study, optional
        Defaults to ``make_study_info(seed, patient, modality=modality)``; pass the
        same one to several series to put them in one study.
    study_uid, study_date : str, optional
        Replace the study's StudyInstanceUID and StudyDate.
    series_number : int, optional
        SeriesNumber; it also picks the reconstruction or MR sequence, so
        consecutive numbers in one study give different series descriptions.
    transfer_syntax : str
        One of :data:`SUPPORTED_TRANSFER_SYNTAXES`.
    **overrides
        DICOM keywords set on every dataset after it is built; a value of ``None``
        deletes the attribute (for example ``SOPInstanceUID=None`` makes an
        instance lacking a Type 1 attribute).

    Returns
    -------
    list of pydicom.dataset.Dataset
        Datasets with ``file_meta`` set. With Implicit VR Little Endian, a reader
        without this private dictionary sees the private elements as UN.

    Raises
    ------
    ValueError
        If `modality` or `transfer_syntax` is not supported, a size is not
        positive, or an override is not a DICOM keyword.
    """
    return list(
        iter_series(
            seed,
            modality,
            n_instances,
            rows,
            cols,
            patient=patient,
            study=study,
            study_uid=study_uid,
            study_date=study_date,
            series_number=series_number,
            transfer_syntax=transfer_syntax,
            **overrides,
        )
    )


# -- secondary captures ------------------------------------------------------------------


def _set_secondary_capture_series(
    ds: Dataset, seed: int, study: Study, modality: str, series_number: int, description: str
) -> None:
    """Fill General Series and SC Equipment (PS3.3 C.8.6.1) of a Secondary Capture."""
    series_time = _tm(_parse_tm(study.StudyTime) + 60 * (30 + series_number % 60))
    ds.Modality = modality
    ds.SeriesInstanceUID = _uid(seed, "series")
    ds.SeriesNumber = series_number
    ds.SeriesDate = study.StudyDate
    ds.SeriesTime = series_time
    ds.SeriesDescription = description
    ds.BodyPartExamined = study.BodyPartExamined
    ds.ConversionType = "WSD"
    ds.Manufacturer = "IMGINDEX"
    ds.InstitutionName = study.InstitutionName
    ds.SecondaryCaptureDeviceID = "WS01"
    ds.SecondaryCaptureDeviceManufacturer = "IMGINDEX"
    ds.SecondaryCaptureDeviceManufacturerModelName = "Synthetic Workstation"
    ds.SecondaryCaptureDeviceSoftwareVersions = "1.0"
    ds.DateOfSecondaryCapture = study.StudyDate
    ds.TimeOfSecondaryCapture = series_time
    ds.ContentDate = study.StudyDate
    ds.ContentTime = series_time
    ds.InstanceCreationDate = study.StudyDate
    ds.InstanceCreationTime = series_time


def make_multiframe(
    seed: int,
    n_frames: int = 4,
    rows: int = 16,
    cols: int = 16,
    *,
    patient: Patient | None = None,
    study: Study | None = None,
    study_uid: str | None = None,
    study_date: str | None = None,
    series_number: int | None = None,
    modality: str = "OT",
    transfer_syntax: str = ExplicitVRLittleEndian,
    **overrides: Any,
) -> Dataset:
    """Return one Multi-frame Grayscale Word Secondary Capture instance.

    The frames are phantom slices (16-bit, 12 stored), as a workstation saves a
    reformatted stack. NumberOfFrames, FrameIncrementPointer ``(0018,2005)`` and
    a per-frame SliceLocationVector follow the Multi-frame and SC Multi-frame
    Image modules (PS3.3 C.7.6.6, C.8.6.3, C.8.6.4).

    Parameters
    ----------
    seed : int
        Fixes everything not given explicitly.
    n_frames : int
        NumberOfFrames, at least 2.
    rows, cols : int
        Size of each frame.
    patient, study, study_uid, study_date, series_number
        As for :func:`make_series`.
    modality : str
        Modality of the series; ``"OT"`` by default.
    transfer_syntax : str
        One of :data:`SUPPORTED_TRANSFER_SYNTAXES`; compressed ones encode each
        frame as its own fragment.
    **overrides
        As for :func:`make_series`.

    Returns
    -------
    pydicom.dataset.Dataset
        The instance, with ``file_meta`` set.

    Raises
    ------
    ValueError
        If `n_frames` is below 2, or as for :func:`make_series`.
    """
    if n_frames < 2:
        raise ValueError(f"n_frames must be at least 2, not {n_frames}")
    ts = _check_transfer_syntax(transfer_syntax)
    _check_size(ts, rows, cols)
    patient, study = _resolve_context(seed, "CT", patient, study, study_uid, study_date)
    rng = _rng(seed, "multiframe")
    if series_number is None:
        series_number = int(rng.integers(500, 600))
    sop_class = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    sop_instance_uid = _uid(seed, "instance", 1)
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_instance_uid, ts)
    _set_patient_and_study(ds, patient, study)
    _set_secondary_capture_series(ds, seed, study, modality, series_number, "MIP CINE")
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceNumber = 1
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = _BITS_STORED
    ds.HighBit = _BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.WindowCenter = "1100"
    ds.WindowWidth = "1600"
    ds.NumberOfFrames = n_frames
    ds.FrameIncrementPointer = Tag(0x0018, 0x2005)  # Slice Location Vector
    ds.SliceLocationVector = [_ds(-2.5 * k) for k in range(n_frames)]
    _set_private_block(ds, seed, _private_payload(seed))
    phantom = _make_phantom(rng, "CT")
    noise_rng = _rng(seed, "noise")
    frames = np.stack(
        [phantom.slice(noise_rng, rows, cols, (k + 0.5) / n_frames) for k in range(n_frames)]
    )
    _set_pixels(ds, frames, ts)
    _apply_overrides(ds, overrides)
    return ds


def _rgb_picture(
    rng: np.random.Generator, rows: int, cols: int, annotated: bool
) -> NDArray[np.uint8]:
    """Return an RGB screenshot-like picture: a gradient, boxes and text-like bars."""
    y = np.linspace(0, 1, rows, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, cols, dtype=np.float32)[None, :]
    picture = np.empty((rows, cols, 3), dtype=np.uint8)
    picture[..., 0] = (255 * x * (1 - y) * 0.8).astype(np.uint8)
    picture[..., 1] = (255 * y * 0.6).astype(np.uint8)
    picture[..., 2] = (255 * (1 - x) * 0.7).astype(np.uint8)
    for _ in range(3):
        top, left = int(rng.integers(rows)), int(rng.integers(cols))
        height, width = int(rng.integers(1, rows // 3 + 2)), int(rng.integers(1, cols // 3 + 2))
        picture[top : top + height, left : left + width] = rng.integers(0, 256, size=3)
    if annotated:
        # A few rows of white "characters" in the corner, as burned-in text.
        for line in range(0, max(rows // 8, 1), 3):
            picture[1 + line, 1 : max(cols // 2, 2) : 2] = 255
    return picture


def make_secondary_capture(
    seed: int,
    rows: int = 64,
    cols: int = 64,
    *,
    patient: Patient | None = None,
    study: Study | None = None,
    study_uid: str | None = None,
    study_date: str | None = None,
    series_number: int | None = None,
    instance_number: int = 1,
    burned_in_annotation: bool | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    **overrides: Any,
) -> Dataset:
    """Return one small RGB Secondary Capture Image instance (a screenshot).

    PhotometricInterpretation ``RGB``, SamplesPerPixel 3, PlanarConfiguration 0,
    8 bits, ConversionType ``WSD`` (PS3.3 C.8.6). Instances made with the same
    seed and different `instance_number` belong to one series.

    Parameters
    ----------
    seed : int
        Fixes everything not given explicitly.
    rows, cols : int
        Picture size. JPEG 2000 needs at least about 32 x 32.
    patient, study, study_uid, study_date, series_number
        As for :func:`make_series`.
    instance_number : int
        InstanceNumber; it also varies the SOPInstanceUID and the picture.
    burned_in_annotation : bool, optional
        BurnedInAnnotation ``"YES"`` (with text-like pixels) or ``"NO"``;
        seed-chosen by default, ``"YES"`` for about one in three.
    transfer_syntax : str
        One of :data:`SUPPORTED_TRANSFER_SYNTAXES`.
    **overrides
        As for :func:`make_series`.

    Returns
    -------
    pydicom.dataset.Dataset
        The instance, with ``file_meta`` set.

    Raises
    ------
    ValueError
        As for :func:`make_series`.
    """
    ts = _check_transfer_syntax(transfer_syntax)
    _check_size(ts, rows, cols)
    patient, study = _resolve_context(seed, "CT", patient, study, study_uid, study_date)
    rng = _rng(seed, "secondary-capture", instance_number)
    if series_number is None:
        series_number = 900 + int(_rng(seed, "secondary-capture").integers(100))
    if burned_in_annotation is None:
        burned_in_annotation = _rng(seed, "burned-in", instance_number).random() < 1 / 3
    sop_class = SecondaryCaptureImageStorage
    sop_instance_uid = _uid(seed, "instance", instance_number)
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_instance_uid, ts)
    _set_patient_and_study(ds, patient, study)
    _set_secondary_capture_series(ds, seed, study, "OT", series_number, "SCREEN CAPTURE")
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceNumber = instance_number
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "YES" if burned_in_annotation else "NO"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    _set_private_block(ds, seed, _private_payload(seed)[:64])
    _set_pixels(ds, _rgb_picture(rng, rows, cols, burned_in_annotation), ts)
    _apply_overrides(ds, overrides)
    return ds


# -- studies and patients ------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesPlan:
    """Everything needed to build one series, without building it.

    Plans are cheap and picklable, so a writer can plan a whole hospital first and
    build the series in worker processes; :func:`iter_planned_series` builds one.
    `n_instances` counts frames when `kind` is ``"multiframe"`` (one instance).
    """

    kind: SeriesKind
    seed: int
    modality: str
    n_instances: int
    rows: int
    cols: int
    transfer_syntax: str
    series_number: int
    patient: Patient
    study: Study

    @property
    def instance_count(self) -> int:
        """Number of instances (files) the series has."""
        return 1 if self.kind == "multiframe" else self.n_instances

    def estimated_bytes(self) -> int:
        """Rough size of the series written as files, for planning by size."""
        samples = 3 if self.kind == "secondary_capture" else 2  # bytes per pixel
        pixels = self.rows * self.cols * samples * self.n_instances
        ratio = {RLELossless: 0.6, JPEG2000Lossless: 0.4}.get(UID(self.transfer_syntax), 1.0)
        header = 3_000 if self.kind == "image" else 1_800
        return int(pixels * ratio) + header * self.instance_count


@dataclass(frozen=True)
class StudyPlan:
    """A study and the plans of its series."""

    study: Study
    series: tuple[SeriesPlan, ...]


def iter_planned_series(plan: SeriesPlan) -> Iterator[Dataset]:
    """Yield the instances of the series that `plan` describes.

    Parameters
    ----------
    plan : SeriesPlan
        From :func:`plan_study` or :func:`plan_patient_studies`.

    Yields
    ------
    pydicom.dataset.Dataset
        The instances, in InstanceNumber order.
    """
    common: dict[str, Any] = {
        "patient": plan.patient,
        "study": plan.study,
        "series_number": plan.series_number,
        "transfer_syntax": plan.transfer_syntax,
    }
    if plan.kind == "image":
        yield from iter_series(
            plan.seed, plan.modality, plan.n_instances, plan.rows, plan.cols, **common
        )
    elif plan.kind == "multiframe":
        yield make_multiframe(
            plan.seed, plan.n_instances, plan.rows, plan.cols, modality=plan.modality, **common
        )
    else:
        for number in range(1, plan.n_instances + 1):
            yield make_secondary_capture(
                plan.seed, plan.rows, plan.cols, instance_number=number, **common
            )


def _choose_transfer_syntax(rng: np.random.Generator, compressed_fraction: float, size: int) -> UID:
    if rng.random() < compressed_fraction:
        j2k = rng.random() >= 0.7 and size >= J2K_MIN_SIZE
        return JPEG2000Lossless if j2k else RLELossless
    return ImplicitVRLittleEndian if rng.random() < 0.15 else ExplicitVRLittleEndian


def plan_study(
    seed: int,
    patient: Patient,
    *,
    modality: str | None = None,
    size: int = 16,
    slices: tuple[int, int] = (2, 5),
    study_date: str | None = None,
    compressed_fraction: float = 0.2,
    max_j2k_slices: int = 24,
) -> StudyPlan:
    """Plan one study: 2-3 CT series or 2-4 MR series, sometimes more objects.

    About one study in three also has an RGB Secondary Capture series (1-2
    instances, 64 x 64) and one in four a multi-frame instance.

    Parameters
    ----------
    seed : int
        Fixes everything not given explicitly.
    patient : Patient
        The study's patient.
    modality : str, optional
        ``"CT"`` or ``"MR"``; seed-chosen (two CT studies for one MR) by default.
    size : int
        Rows and columns of CT and MR slices; multi-frame frames are half as large.
    slices : tuple of int
        Inclusive range of the number of slices per CT/MR series.
    study_date : str, optional
        Study Date; seed-chosen by default.
    compressed_fraction : float
        Probability that a series is written RLE Lossless (70 %) or JPEG 2000
        Lossless (30 %, RLE below :data:`J2K_MIN_SIZE`); the others are Explicit
        VR Little Endian (85 %) or Implicit VR Little Endian (15 %).
    max_j2k_slices : int
        Cap on the slices of a JPEG 2000 series, whose encoding is slow.

    Returns
    -------
    StudyPlan
        The study and its series plans, in SeriesNumber order.

    Raises
    ------
    ValueError
        If `slices` is not a valid range, `size` is not positive or `modality`
        is not supported.
    """
    low, high = slices
    if not 1 <= low <= high or size < 1:
        raise ValueError(
            f"slices must satisfy 1 <= low <= high and size >= 1, not {slices}, {size}"
        )
    rng = _rng(seed, "study-plan")
    if modality is None:
        modality = "CT" if rng.random() < 2 / 3 else "MR"
    study = make_study_info(seed, patient, modality=modality, study_date=study_date)
    n_series = int(rng.integers(2, 4)) if modality == "CT" else int(rng.integers(2, 5))
    plans: list[SeriesPlan] = []
    for number in range(1, n_series + 1):
        ts = _choose_transfer_syntax(rng, compressed_fraction, size)
        n_slices = int(rng.integers(low, high + 1))
        if ts == JPEG2000Lossless:
            n_slices = min(n_slices, max_j2k_slices)
        plans.append(
            SeriesPlan(
                kind="image",
                seed=_derive_seed(seed, "series", number),
                modality=modality,
                n_instances=n_slices,
                rows=size,
                cols=size,
                transfer_syntax=ts,
                series_number=number,
                patient=patient,
                study=study,
            )
        )
    if rng.random() < 0.25:
        frame_size = max(size // 2, 16)
        ts = RLELossless if rng.random() < compressed_fraction else ExplicitVRLittleEndian
        plans.append(
            SeriesPlan(
                kind="multiframe",
                seed=_derive_seed(seed, "multiframe"),
                modality="OT",
                n_instances=int(rng.integers(4, 13)),
                rows=frame_size,
                cols=frame_size,
                transfer_syntax=ts,
                series_number=500 + n_series,
                patient=patient,
                study=study,
            )
        )
    if rng.random() < 1 / 3:
        ts = RLELossless if rng.random() < compressed_fraction else ExplicitVRLittleEndian
        plans.append(
            SeriesPlan(
                kind="secondary_capture",
                seed=_derive_seed(seed, "secondary-capture"),
                modality="OT",
                n_instances=int(rng.integers(1, 3)),
                rows=64,
                cols=64,
                transfer_syntax=ts,
                series_number=900 + n_series,
                patient=patient,
                study=study,
            )
        )
    return StudyPlan(study=study, series=tuple(plans))


def make_study(
    seed: int,
    patient: Patient | None = None,
    *,
    modality: str | None = None,
    size: int = 16,
    slices: tuple[int, int] = (2, 5),
    study_date: str | None = None,
    compressed_fraction: float = 0.2,
) -> list[list[Dataset]]:
    """Return one study as a list of series, each a list of datasets.

    Parameters
    ----------
    seed : int
        Fixes everything not given explicitly.
    patient : Patient, optional
        Defaults to ``make_patient(seed)``.
    modality, size, slices, study_date, compressed_fraction
        As for :func:`plan_study`.

    Returns
    -------
    list of list of pydicom.dataset.Dataset
        The series of the study, sharing StudyInstanceUID and patient attributes.
    """
    if patient is None:
        patient = make_patient(seed)
    plan = plan_study(
        seed,
        patient,
        modality=modality,
        size=size,
        slices=slices,
        study_date=study_date,
        compressed_fraction=compressed_fraction,
    )
    return [list(iter_planned_series(series)) for series in plan.series]


def plan_patient_studies(
    seed: int,
    patient: Patient,
    *,
    n_studies: int | None = None,
    size: int = 16,
    slices: tuple[int, int] = (2, 5),
    compressed_fraction: float = 0.2,
) -> list[StudyPlan]:
    """Plan several studies of one patient on different dates, oldest first.

    Parameters
    ----------
    seed : int
        Fixes everything not given explicitly.
    patient : Patient
        The patient.
    n_studies : int, optional
        Number of studies; 1-3 by default.
    size, slices, compressed_fraction
        As for :func:`plan_study`.

    Returns
    -------
    list of StudyPlan
        Studies with strictly increasing StudyDate.

    Raises
    ------
    ValueError
        If `n_studies` is below 1.
    """
    rng = _rng(seed, "patient-plan")
    if n_studies is None:
        n_studies = int(rng.integers(1, 4))
    if n_studies < 1:
        raise ValueError(f"n_studies must be at least 1, not {n_studies}")
    first = max(_FIRST_STUDY_DATE, _parse_da(patient.PatientBirthDate))
    span = max((_LAST_STUDY_DATE - first).days, n_studies)
    offsets = np.sort(rng.choice(span + 1, size=n_studies, replace=False))
    return [
        plan_study(
            _derive_seed(seed, "study", number),
            patient,
            size=size,
            slices=slices,
            study_date=_da(first + dt.timedelta(days=int(offset))),
            compressed_fraction=compressed_fraction,
        )
        for number, offset in enumerate(offsets)
    ]


def make_patient_studies(
    seed: int,
    patient: Patient | None = None,
    *,
    n_studies: int | None = None,
    size: int = 16,
    slices: tuple[int, int] = (2, 5),
    compressed_fraction: float = 0.2,
) -> list[list[list[Dataset]]]:
    """Return several studies of one patient on different dates.

    Parameters
    ----------
    seed : int
        Fixes everything not given explicitly.
    patient : Patient, optional
        Defaults to ``make_patient(seed)``.
    n_studies, size, slices, compressed_fraction
        As for :func:`plan_patient_studies`.

    Returns
    -------
    list of list of list of pydicom.dataset.Dataset
        Studies (oldest first), each a list of series, each a list of datasets.
    """
    if patient is None:
        patient = make_patient(seed)
    plans = plan_patient_studies(
        seed,
        patient,
        n_studies=n_studies,
        size=size,
        slices=slices,
        compressed_fraction=compressed_fraction,
    )
    return [[list(iter_planned_series(s)) for s in plan.series] for plan in plans]


# -- encoding ---------------------------------------------------------------------------------


def write_dataset(ds: Dataset, path: str | PathLike[str]) -> None:
    """Write `ds` to `path` as a DICOM File: 128-byte preamble, ``DICM``, file meta.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A dataset with ``file_meta`` (as every factory here returns).
    path : str or os.PathLike
        Destination; overwritten if it exists.
    """
    dcmwrite(path, ds, enforce_file_format=True)


def dataset_to_bytes(ds: Dataset) -> bytes:
    """Return `ds` encoded as a DICOM File, as :func:`write_dataset` writes it.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A dataset with ``file_meta``.

    Returns
    -------
    bytes
        Preamble, ``DICM`` prefix, file meta and data set.
    """
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def write_and_read_dataset(ds: Dataset) -> Dataset:
    """Encode `ds` as a DICOM File and read it back (highdicom's test helper).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A dataset with ``file_meta``.

    Returns
    -------
    pydicom.dataset.Dataset
        The dataset as a reader sees it.
    """
    return dcmread(BytesIO(dataset_to_bytes(ds)))
