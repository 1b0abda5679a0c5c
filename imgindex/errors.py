"""Errors raised by :mod:`imgindex`.

::

    ImgindexError (Exception)
    ├── ConfigError (ImgindexError, ValueError)     a setting or flag is wrong
    ├── DicomReadError (ImgindexError, ValueError)  a file cannot be indexed; ``reason`` says why
    ├── EmrError (ImgindexError, ValueError)        EMR data cannot be imported or read
    ├── CohortError (ImgindexError, ValueError)     a cohort definition is wrong
    └── VolumeError (ImgindexError, ValueError)     a series is not one decodable volume
                                                    (imgindex.export.volume; ``reason``)
"""

from __future__ import annotations

__all__ = ["CohortError", "ConfigError", "DicomReadError", "EmrError", "ImgindexError"]


class ImgindexError(Exception):
    """Base class of every error raised on purpose by :mod:`imgindex`."""


class ConfigError(ImgindexError, ValueError):
    """A setting, flag or configuration file is wrong; the message says which and why."""


class DicomReadError(ImgindexError, ValueError):
    """A file cannot be indexed.

    Parameters
    ----------
    reason : str
        Short machine-readable reason, one of :data:`imgindex.extract.REJECT_REASONS`
        (``not_dicom``, ``no_preamble``, ``truncated``, ``unreadable``, ``missing_uid``, ...).
    message : str
        What is wrong, for people.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class EmrError(ImgindexError, ValueError):
    """OMOP CDM data cannot be imported or read; the message names the table and column."""


class CohortError(ImgindexError, ValueError):
    """A cohort definition or code set is wrong; the message names the file, line and field."""
