"""The DICOM listener: a Storage SCP that makes what it acknowledges durable, then indexes it.

:class:`Listener` is the server (``imgindex listen``), :class:`Ingest` the storage pipeline
behind it (write-ahead log, object store, index), :class:`Status` the DIMSE statuses it
answers with.
"""

from imgindex.listener.dimse import Status
from imgindex.listener.ingest import Ingest, LogIndexer, Receiver, StoreResult, object_key
from imgindex.listener.server import Listener, ListenerConfig

__all__ = [
    "Ingest",
    "Listener",
    "ListenerConfig",
    "LogIndexer",
    "Receiver",
    "Status",
    "StoreResult",
    "object_key",
]
