"""Tables, arrays and bytes for imgindex; knows nothing of DICOM.

The names below are imported on first use (PEP 562): the export's worker processes need
:class:`ArrayStore` and not Delta Lake, polars or Prometheus, and importing them costs
each worker most of a second.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from storage.arrays import (
        COMPRESSORS,
        ArrayInfo,
        ArrayStore,
        default_chunks,
        default_shards,
    )
    from storage.errors import (
        ConflictError,
        ObjectNotFoundError,
        StorageError,
        TableNotFoundError,
    )
    from storage.objects import LocalObjectStore, ObjectStore, validate_key
    from storage.reader import ArrayReader, StoreLocation, StoreReader, open_location
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

#: Where each public name lives.
_MODULES: dict[str, str] = {
    "COMPRESSORS": "arrays",
    "ArrayInfo": "arrays",
    "ArrayStore": "arrays",
    "default_chunks": "arrays",
    "default_shards": "arrays",
    "ConflictError": "errors",
    "ObjectNotFoundError": "errors",
    "StorageError": "errors",
    "TableNotFoundError": "errors",
    "LocalObjectStore": "objects",
    "ObjectStore": "objects",
    "validate_key": "objects",
    "ArrayReader": "reader",
    "StoreLocation": "reader",
    "StoreReader": "reader",
    "open_location": "reader",
    "Table": "tables",
    "Outcome": "transfer",
    "Pipeline": "transfer",
    "Progress": "transfer",
    "Retry": "transfer",
    "RunSummary": "transfer",
    "Stage": "transfer",
    "TransferMetrics": "transfer",
    "Work": "transfer",
    "run_on_dask": "transfer",
    "WriteAheadLog": "wal",
}

__all__ = [
    "COMPRESSORS",
    "ArrayInfo",
    "ArrayReader",
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
    "StoreLocation",
    "StoreReader",
    "Table",
    "TableNotFoundError",
    "TransferMetrics",
    "Work",
    "WriteAheadLog",
    "default_chunks",
    "default_shards",
    "open_location",
    "run_on_dask",
    "validate_key",
]


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'storage' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"storage.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
