"""Data management: the transactional outbox, the inbox and orchestrated sagas, on
PostgreSQL (asyncpg, ``basidia[postgres]``) or SQLite (aiosqlite, ``basidia[sqlite]``).

Importing this package imports neither driver: each is imported when a database of its
kind is opened (docs/outbox.md, docs/sagas.md).
"""

from basidia.data.db import Connection, Database, DatabaseError, open_database
from basidia.data.outbox import Backoff, Outbox, OutboxTransaction, Relay
from basidia.data.saga import Saga, Sagas, step
from basidia.data.schema import SCHEMA_VERSION, SchemaError, migrate

__all__ = [
    "SCHEMA_VERSION",
    "Backoff",
    "Connection",
    "Database",
    "DatabaseError",
    "Outbox",
    "OutboxTransaction",
    "Relay",
    "Saga",
    "Sagas",
    "SchemaError",
    "migrate",
    "open_database",
    "step",
]
