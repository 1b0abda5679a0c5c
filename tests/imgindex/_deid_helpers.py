"""A planted identity for de-identification tests: one patient, two studies 9 days apart,
with every kind of identifying value the tests look for in the outputs.

The values are deliberately unusual (non-ASCII names, distinctive IDs) so that a search of
an output's bytes finds them only if they leaked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from _export_helpers import WrittenSeries, index_folder, write_series
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from imgindex.testing import make_series
from imgindex.testing.factory import Patient, make_study_info

if TYPE_CHECKING:
    from pathlib import Path

#: The planted values, by what they are. Every one must be absent from a de-identified output.
PLANTED: dict[str, str] = {
    "PatientName": "Schröder-Løvås^Zoë Ingrid",
    "family_name": "Schröder-Løvås",
    "given_name": "Zoë",
    "PatientID": "PLANT-77310",
    "OtherPatientIDs": "ALT-55102",
    "PatientBirthDate": "19610417",
    "AccessionNumber": "ACC998817",
    "InstitutionName": "Sankt Wendelinus Klinikum",
    "ReferringPhysicianName": "Kovačević^Anđela",
    "referring_family": "Kovačević",
    "PatientAddress": "Hauptstraße 12, Oberwil",
    "StationName": "CTWENDEL01",
    "OperatorsName": "Brzęczyszczykiewicz^Grzegorz",
}
#: The two studies' dates: 9 days apart, so an interval check has something to keep.
STUDY_DATES = ("20231003", "20231012")
#: A SeriesDescription with the patient's family name inside, and a private element
#: (creator :data:`PRIVATE_CREATOR`) holding the whole name.
SERIES_DESCRIPTION = f"CT Thorax {PLANTED['family_name']} Verlauf"
PRIVATE_CREATOR = "ACME PATIENTINFO 1.0"
PRIVATE_GROUP = 0x0011


@dataclass(frozen=True)
class PlantedSet:
    """The planted patient's series on disk, indexed into ``root``."""

    root: Path
    series: list[WrittenSeries]


def planted_datasets(seed: int, study_date: str, *, modality: str = "CT") -> list[Dataset]:
    """One series of the planted patient on ``study_date``, every planted value in place."""
    patient = Patient(
        PatientID=PLANTED["PatientID"],
        PatientName=PLANTED["PatientName"],
        PatientBirthDate=PLANTED["PatientBirthDate"],
        PatientSex="F",
        SpecificCharacterSet="ISO_IR 192",
    )
    study = make_study_info(seed, patient, modality=modality, study_date=study_date)
    datasets = make_series(seed, modality, 4, 16, 16, patient=patient, study=study)
    for ds in datasets:
        ds.AccessionNumber = PLANTED["AccessionNumber"]
        ds.InstitutionName = PLANTED["InstitutionName"]
        ds.ReferringPhysicianName = PLANTED["ReferringPhysicianName"]
        ds.OtherPatientIDs = PLANTED["OtherPatientIDs"]
        ds.PatientAddress = PLANTED["PatientAddress"]
        ds.StationName = PLANTED["StationName"]
        ds.OperatorsName = PLANTED["OperatorsName"]
        ds.SeriesDescription = SERIES_DESCRIPTION
        ds.StudyDescription = f"Thorax {PLANTED['given_name']}"
        ds.SeriesDate = study_date
        ds.AcquisitionDate = study_date
        ds.ContentDate = study_date
        ds.PatientAge = "062Y"
        ds.PatientWeight = "71.5"
        ds.PatientSize = "1.68"
        ds.BurnedInAnnotation = "NO"
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        block.add_new(0x01, "LO", PLANTED["PatientName"])
        block.add_new(0x02, "LO", PLANTED["PatientID"])
        # A sequence holding identifiers too: the profile must reach into it.
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        ds.ReferencedImageSequence = DicomSequence([item])
        physician = Dataset()
        physician.PersonName = PLANTED["ReferringPhysicianName"]
        ds.ReferringPhysicianIdentificationSequence = DicomSequence([physician])
    return datasets


def write_planted(folder: Path, root: Path) -> PlantedSet:
    """Two studies of the planted patient (dates :data:`STUDY_DATES`), written to ``folder``
    and indexed into ``root``."""
    series = [
        write_series(folder, planted_datasets(9100 + i, date), name=f"planted{i}")
        for i, date in enumerate(STUDY_DATES)
    ]
    index_folder(folder, root)
    return PlantedSet(root, series)
