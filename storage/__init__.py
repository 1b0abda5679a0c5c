"""Tables, arrays and bytes for imgindex; knows nothing of DICOM."""

from storage.errors import ConflictError, StorageError, TableNotFoundError
from storage.tables import Table

__all__ = ["ConflictError", "StorageError", "Table", "TableNotFoundError"]
