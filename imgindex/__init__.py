"""imgindex: index PACS/DICOM metadata, join it with OMOP EMR data, export cohorts.

The Python surface: :class:`Index` reads the index tables as polars LazyFrames or DuckDB SQL;
:class:`Cohort` selects series by EMR criteria (run with :func:`imgindex.cohort.select`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from imgindex.errors import CohortError, ConfigError, DicomReadError, EmrError, ImgindexError

if TYPE_CHECKING:
    from imgindex.cohort import Cohort
    from imgindex.index import Index

__all__ = [
    "Cohort",
    "CohortError",
    "ConfigError",
    "DicomReadError",
    "EmrError",
    "ImgindexError",
    "Index",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): worker processes import imgindex.extract without DuckDB, polars and
    # deltalake, which Index needs and header parsing does not.
    if name == "Index":
        from imgindex.index import Index

        return Index
    if name == "Cohort":
        from imgindex.cohort import Cohort

        return Cohort
    raise AttributeError(f"module 'imgindex' has no attribute {name!r}")
