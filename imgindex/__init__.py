"""imgindex: index PACS/DICOM metadata, join it with OMOP EMR data, export cohorts.

The Python surface: :class:`Index` reads the index tables as polars LazyFrames or DuckDB SQL.
"""

import logging

from imgindex.errors import ConfigError, DicomReadError, ImgindexError
from imgindex.index import Index

__all__ = ["ConfigError", "DicomReadError", "ImgindexError", "Index"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
