"""Tables, arrays and bytes for imgindex; knows nothing of DICOM."""

from storage.errors import ConflictError, ObjectNotFoundError, StorageError, TableNotFoundError
from storage.objects import LocalObjectStore, ObjectStore, validate_key
from storage.tables import Table

__all__ = [
    "ConflictError",
    "LocalObjectStore",
    "ObjectNotFoundError",
    "ObjectStore",
    "StorageError",
    "Table",
    "TableNotFoundError",
    "validate_key",
]
