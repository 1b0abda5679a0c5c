"""Tables, arrays and bytes for imgindex; knows nothing of DICOM."""

from storage.arrays import COMPRESSORS, ArrayInfo, ArrayStore, default_chunks, default_shards
from storage.errors import ConflictError, ObjectNotFoundError, StorageError, TableNotFoundError
from storage.objects import LocalObjectStore, ObjectStore, validate_key
from storage.tables import Table
from storage.transfer import (
    Outcome,
    Pipeline,
    Progress,
    Retry,
    RunSummary,
    Stage,
    TransferMetrics,
    Work,
    run_on_dask,
)
from storage.wal import WriteAheadLog

__all__ = [
    "COMPRESSORS",
    "ArrayInfo",
    "ArrayStore",
    "ConflictError",
    "LocalObjectStore",
    "ObjectNotFoundError",
    "ObjectStore",
    "Outcome",
    "Pipeline",
    "Progress",
    "Retry",
    "RunSummary",
    "Stage",
    "StorageError",
    "Table",
    "TableNotFoundError",
    "TransferMetrics",
    "Work",
    "WriteAheadLog",
    "default_chunks",
    "default_shards",
    "run_on_dask",
    "validate_key",
]
