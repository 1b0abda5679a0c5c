"""imgindex.crawl.folders: indexing folders of files, checked against pydicom.

The issue's "done when": indexing pydicom's test files and pydicom-data gives one
``instances`` row per distinct SOPInstanceUID among the files pydicom reads (with the three
UIDs), and one file-level ``rejects`` row for every other file.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections import Counter
from typing import TYPE_CHECKING, Any, NamedTuple

import pydicom
import pytest

from imgindex.crawl import IndexSummary, folders, index_files, iter_files
from imgindex.index import Index
from imgindex.schema import DEFAULT_ATTRIBUTES, UID_KEYWORDS
from imgindex.testing import write_hospital

#: Media Storage Directory Storage, the SOP Class of a DICOMDIR (PS3.4 Annex F).
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

if TYPE_CHECKING:
    from pathlib import Path

#: Files pydicom reads whole, the three UIDs included, that the index rejects. In each case the
#: index is right: the file is cut short, and pydicom keeps what it could read without saying so.
INDEX_REJECTS = {
    # Pixel Data (7FE0,0010) says 8192 bytes; the file holds 8130 (pixel_array raises).
    "pydicom/MR_truncated.dcm": "truncated",
    # Beam Sequence (300A,00B0) says 976 bytes; 711 follow.
    "pydicom/rtplan_truncated.dcm": "truncated",
}
#: Files the index accepts although pydicom's full read fails or lacks a UID: none.
INDEX_ACCEPTS: dict[str, str] = {}

KEYS = {
    "instances": "SOPInstanceUID",
    "series": "SeriesInstanceUID",
    "studies": "StudyInstanceUID",
    "rejects": "reject_id",
}


def oracle_uid(path: Path) -> str | None:
    """The SOPInstanceUID if pydicom reads the whole file and it has the three UIDs."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            uids = [str(ds.get(keyword) or "") for keyword in UID_KEYWORDS]
    except Exception:  # noqa: BLE001 - the oracle is "pydicom reads it without exception"
        return None
    return uids[0] if all(uids) else None


def walk_order(root: Path, path: Path) -> tuple[str, ...]:
    """Names sorted at each folder level, depth first: the order index_files documents."""
    return path.relative_to(root).parts


def rows(root: Path, *, drop: tuple[str, ...] = ("indexed_at",)) -> dict[str, list[Any]]:
    index = Index(root)
    return {
        name: index.scan(name).drop(drop).sort(KEYS[name]).collect().to_dicts() for name in KEYS
    }


def counts(root: Path) -> dict[str, int]:
    index = Index(root)
    return {name: index.scan(name).collect().height for name in KEYS}


class Indexed(NamedTuple):
    corpus: Path
    root: Path
    summary: IndexSummary


@pytest.fixture(scope="module")
def copied_corpus(
    tmp_path_factory: pytest.TempPathFactory,
    pydicom_test_files: Path,
    pydicom_charset_files: Path,
    pydicom_data_files: Path,
) -> Path:
    """The corpora copied into one tree, so that locations do not depend on the venv."""
    corpus = tmp_path_factory.mktemp("corpus")
    shutil.copytree(pydicom_test_files, corpus / "pydicom")
    shutil.copytree(pydicom_charset_files, corpus / "pydicom-charsets")
    shutil.copytree(pydicom_data_files, corpus / "pydicom-data")
    return corpus


@pytest.fixture(scope="module")
def indexed(copied_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Indexed:
    root = tmp_path_factory.mktemp("root")
    summary = index_files([copied_corpus], root, attributes=DEFAULT_ATTRIBUTES, workers=2)
    return Indexed(copied_corpus, root, summary)


def test_index_agrees_with_pydicom(indexed: Indexed) -> None:
    corpus = indexed.corpus
    files = sorted(
        (p for p in corpus.rglob("*") if p.is_file()), key=lambda p: walk_order(corpus, p)
    )
    accepted: dict[str, list[Path]] = {}  # SOPInstanceUID -> files, in walk order
    refused: list[Path] = []
    for path in files:
        name = path.relative_to(corpus).as_posix()
        uid = oracle_uid(path)
        if name in INDEX_REJECTS:
            assert uid is not None, f"{name} is no longer an exception: remove it"
            uid = None
        if name in INDEX_ACCEPTS:
            uid = INDEX_ACCEPTS[name]
        if uid is None:
            refused.append(path)
        else:
            accepted.setdefault(uid, []).append(path)
    assert len(accepted) > 100
    assert len(refused) > 20

    index = Index(indexed.root)
    instances = index.scan("instances").select("SOPInstanceUID", "location").collect()
    assert instances.height == len(accepted)
    assert set(instances["SOPInstanceUID"]) == set(accepted)

    file_rejects = index.rejects.filter(level="file").select("location", "reason").collect()
    locations = file_rejects["location"].to_list()
    assert len(locations) == len(set(locations)), "a file has two file-level rejects"
    assert set(locations) == {p.absolute().as_uri() for p in refused}
    reasons = dict(zip(locations, file_rejects["reason"], strict=True))
    for name, reason in INDEX_REJECTS.items():
        assert reasons[(corpus / name).absolute().as_uri()] == reason

    # The first copy in walk order is the one indexed.
    where = dict(zip(instances["SOPInstanceUID"], instances["location"], strict=True))
    for uid, paths in accepted.items():
        assert where[uid] == paths[0].absolute().as_uri(), uid

    summary = indexed.summary
    assert summary.files == len(files)
    assert summary.instances == len(accepted)
    assert summary.duplicates == sum(len(p) - 1 for p in accepted.values()) > 0
    assert summary.rejected_files == len(refused)
    assert summary.bytes_scanned == sum(p.stat().st_size for p in files)
    assert summary.series == index.series.collect().height
    assert summary.studies == index.studies.collect().height


def test_reasons_of_the_rejects(indexed: Indexed) -> None:
    reasons = Counter(
        Index(indexed.root).rejects.filter(level="file").collect()["reason"].to_list()
    )
    # Every file-level reason is a known one, and the common ones all occur here.
    assert {"no_preamble", "missing_uid", "dicomdir", "truncated"} <= set(reasons)
    value_level = {"bad_value", "no_pixel_data"}
    assert reasons == Counter(
        {k: v for k, v in indexed.summary.rejects_by_reason.items() if k not in value_level}
    )
    # Media directories are named as such, whatever their byte order or VR encoding.
    dicomdirs = set()
    for path in (p for p in indexed.corpus.rglob("*") if p.is_file()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        except Exception:  # noqa: BLE001, S112 - not DICOM to pydicom: not a DICOMDIR either
            continue
        if meta.get("MediaStorageSOPClassUID") == MEDIA_STORAGE_DIRECTORY:
            dicomdirs.add(path.absolute().as_uri())
    found = Index(indexed.root).sql("SELECT location FROM rejects WHERE reason = 'dicomdir'")
    assert set(found["location"].to_pylist()) == dicomdirs
    assert len(dicomdirs) >= 6


def test_second_run_adds_nothing(copied_corpus: Path, tmp_path: Path) -> None:
    first = index_files([copied_corpus], tmp_path, attributes=DEFAULT_ATTRIBUTES, workers=1)
    before, versions = rows(tmp_path), Index(tmp_path).versions()
    second = index_files([copied_corpus], tmp_path, attributes=DEFAULT_ATTRIBUTES, workers=2)
    assert counts(tmp_path) == {name: len(v) for name, v in before.items()}
    assert rows(tmp_path) == before
    assert (second.instances, second.rejected_files) == (first.instances, first.rejected_files)
    # It did write again (same rows, new versions), it just added nothing.
    assert Index(tmp_path).versions()["instances"] == (versions["instances"] or 0) + 1


def test_workers_give_the_same_rows(indexed: Indexed, tmp_path: Path) -> None:
    index_files([indexed.corpus], tmp_path, attributes=DEFAULT_ATTRIBUTES, workers=1)
    assert rows(tmp_path) == rows(indexed.root)


# -- generated trees ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("hospital")
    summary = write_hospital(out, seed=7, target_bytes=400_000, ct_size=32)
    return out, summary


def test_generated_hospital(hospital: tuple[Path, Any], tmp_path: Path) -> None:
    tree, written = hospital
    summary = index_files([tree], tmp_path, attributes=DEFAULT_ATTRIBUTES, workers=2)
    assert written.instances > 50
    assert summary.instances == written.instances == summary.files
    assert (summary.series, summary.studies) == (written.series, written.studies)
    assert (summary.rejected_files, summary.duplicates) == (0, 0)
    index = Index(tmp_path)
    per_modality = index.sql(
        "SELECT Modality, count(*) AS n FROM instances GROUP BY Modality ORDER BY Modality"
    ).to_pylist()
    assert {r["Modality"]: r["n"] for r in per_modality} == written.instances_per_modality
    per_syntax = index.sql(
        "SELECT TransferSyntaxUID AS ts, count(*) AS n FROM instances GROUP BY ts"
    ).to_pylist()
    assert {r["ts"]: r["n"] for r in per_syntax} == written.instances_per_transfer_syntax
    counts_ = index.sql(
        "SELECT sum(instance_count)::BIGINT AS i, count(*) AS s FROM series"
    ).to_pylist()
    assert counts_ == [{"i": written.instances, "s": written.series}]
    patients = index.sql("SELECT count(DISTINCT PatientID) AS n FROM studies").to_pylist()
    assert patients == [{"n": written.patients}]
    assert counts(tmp_path)["rejects"] == 0


def test_small_batches_give_the_same_rows(
    hospital: tuple[Path, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree, _ = hospital
    one = tmp_path / "one-batch"
    many = tmp_path / "many-batches"
    index_files([tree], one, attributes=DEFAULT_ATTRIBUTES, workers=1)
    # Batches are flushed between chunks of files: make both small.
    monkeypatch.setattr(folders, "CHUNK_FILES", 8)
    index_files([tree], many, attributes=DEFAULT_ATTRIBUTES, workers=1, batch_rows=10)
    assert (Index(many).versions()["instances"] or 0) >= 3
    assert rows(many) == rows(one)


def test_malformed_files_and_force(malformed: dict[str, Path], tmp_path: Path) -> None:
    folder = next(iter(malformed.values())).parent
    summary = index_files([folder], tmp_path / "strict", attributes=DEFAULT_ATTRIBUTES)
    assert summary.files == len(malformed)
    assert summary.rejects_by_reason == {
        "truncated": 3,
        "no_preamble": 3,
        "empty": 1,
        "missing_uid": 2,
        "bad_value": 1,
    }
    indexed = Index(tmp_path / "strict").sql("SELECT location FROM instances")["location"]
    assert sorted(loc.rsplit("/", 1)[1] for loc in indexed.to_pylist()) == [
        "bad_date",
        "odd_length",
        "unknown_tags",
    ]
    forced = index_files([folder], tmp_path / "force", attributes=DEFAULT_ATTRIBUTES, force=True)
    assert forced.instances == summary.instances + 1  # no_preamble
    assert forced.rejects_by_reason["not_dicom"] == 2


# -- walking ------------------------------------------------------------------------------


def test_iter_files_order_and_links(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "b" / "c").mkdir(parents=True)
    (tree / "a.dcm").write_bytes(b"")
    (tree / "b" / "c" / "z").write_bytes(b"")
    (tree / "b" / "y").write_bytes(b"")
    (tree / "b.txt").write_bytes(b"")
    os.symlink(tree / "a.dcm", tree / "link-to-file")
    os.symlink(tree / "b", tree / "link-to-folder")  # not followed: no loops, no repeats
    os.symlink(tree / "missing", tree / "broken-link")  # yielded, so it gets a reject
    alone = tmp_path / "alone.dcm"
    alone.write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in iter_files([tree, alone])]
    assert found == [
        "tree/a.dcm",
        "tree/b/c/z",
        "tree/b/y",
        "tree/b.txt",
        "tree/broken-link",
        "tree/link-to-file",
        "alone.dcm",
    ]
