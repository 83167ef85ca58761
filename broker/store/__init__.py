"""Durable state behind the broker: the :class:`Store` interface and its implementations.

SQLite (:class:`SQLiteStore`) is the embedded default. Backends with optional drivers are
imported from their own modules only when chosen.
"""

from broker.store.base import (
    GRADES,
    IncomingReport,
    JobRecord,
    NewJob,
    QueueStats,
    ReleaseRecord,
    ReportSummary,
    SchemaTooNew,
    Store,
    StoredMessage,
    UploadRecord,
)
from broker.store.sqlite import SQLiteStore

__all__ = [
    "GRADES",
    "IncomingReport",
    "JobRecord",
    "NewJob",
    "QueueStats",
    "ReleaseRecord",
    "ReportSummary",
    "SQLiteStore",
    "SchemaTooNew",
    "Store",
    "StoredMessage",
    "UploadRecord",
]
