"""Fixtures shared by the test suites: DICOM corpora on disk and the Hypothesis profiles.

The corpora are the files pydicom ships (``pydicom/data/test_files`` and
``pydicom/data/charset_files``) and those of the ``pydicom-data`` package. They are found by
globbing the installed folders: ``pydicom.data.get_testdata_file`` downloads files that are not
local, and the tests run without a network.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pydicom
import pytest
from hypothesis import settings

from imgindex.testing import write_malformed_files

#: Repository root.
REPO = Path(__file__).resolve().parents[1]

# zarr's split: "ci" is derandomized so that a run is repeatable; "dev" explores.
settings.register_profile("ci", derandomize=True, deadline=None, database=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    assert files, f"no files under {folder}"
    return files


@pytest.fixture(scope="session")
def pydicom_test_files() -> Path:
    """pydicom's bundled ``test_files`` folder."""
    return Path(pydicom.__file__).parent / "data" / "test_files"


@pytest.fixture(scope="session")
def pydicom_charset_files() -> Path:
    """pydicom's bundled ``charset_files`` folder (names in many character sets)."""
    return Path(pydicom.__file__).parent / "data" / "charset_files"


@pytest.fixture(scope="session")
def pydicom_data_files() -> Path:
    """The ``data`` folder of the ``pydicom-data`` package (a test dependency)."""
    spec = importlib.util.find_spec("data_store")
    assert spec is not None, "pydicom-data is a test dependency: install the test group"
    assert spec.origin is not None
    return Path(spec.origin).parent / "data"


@pytest.fixture(scope="session")
def corpus(
    pydicom_test_files: Path, pydicom_charset_files: Path, pydicom_data_files: Path
) -> list[Path]:
    """Every file of the three corpora, DICOM or not, in a fixed order."""
    return [
        *_files(pydicom_test_files),
        *_files(pydicom_charset_files),
        *_files(pydicom_data_files),
    ]


@pytest.fixture(scope="session")
def malformed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One file of each kind of :func:`imgindex.testing.write_malformed_files` (read only)."""
    return write_malformed_files(tmp_path_factory.mktemp("malformed"), seed=0)
