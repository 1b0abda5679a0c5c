"""Tables, arrays and bytes for imgindex; knows nothing of DICOM."""

from storage.errors import ConflictError, ObjectNotFoundError, StorageError, TableNotFoundError
from storage.objects import LocalObjectStore, ObjectStore, validate_key
from storage.tables import Table
from storage.wal import WriteAheadLog

__all__ = [
    "ConflictError",
    "LocalObjectStore",
    "ObjectNotFoundError",
    "ObjectStore",
    "StorageError",
    "Table",
    "TableNotFoundError",
    "WriteAheadLog",
    "validate_key",
]
