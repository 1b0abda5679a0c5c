"""Errors raised by :mod:`storage`.

::

    StorageError (Exception)
    ├── TableNotFoundError (StorageError, FileNotFoundError)
    ├── ObjectNotFoundError (StorageError, FileNotFoundError)
    └── ConflictError (StorageError)   a commit lost against concurrent writers too often
"""

from __future__ import annotations

__all__ = ["ConflictError", "ObjectNotFoundError", "StorageError", "TableNotFoundError"]


class StorageError(Exception):
    """Base class of every error raised on purpose by :mod:`storage`."""


class TableNotFoundError(StorageError, FileNotFoundError):
    """A table was read before anything was written to it."""


class ConflictError(StorageError):
    """A commit kept conflicting with concurrent writers after every retry."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """No object is stored under that key."""
