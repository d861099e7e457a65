"""The tables of the outbox, the inbox and the sagas, and their migrations.

``migrate(db)`` brings a database to ``SCHEMA_VERSION``, one numbered migration at a
time, each in a transaction with the new version number; concurrent starters wait for
each other (an advisory lock on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite).  A database
whose version is newer than this library's is refused rather than misread.  The tables
are documented in docs/outbox.md and docs/sagas.md.
"""

from __future__ import annotations

import time

from basidia.data.db import Connection, Database, DatabaseError

__all__ = ["SCHEMA_VERSION", "SchemaError", "migrate", "schema_version"]

#: The version of the tables this library reads and writes.
SCHEMA_VERSION = 2

# Key of the PostgreSQL advisory lock that serialises migrations (any constant will do;
# this one is "basidia" in ASCII, truncated to 63 bits).
_MIGRATION_LOCK = 0x62617369646961


class SchemaError(DatabaseError):
    """The database's tables are of a version this library cannot use."""


def _id_column(dialect: str) -> str:
    # AUTOINCREMENT: SQLite never reuses an id, even after the newest row is deleted, so an
    # outbox id (an event's idempotency key) names one event forever.
    if dialect == "postgresql":
        return "id BIGSERIAL PRIMARY KEY"
    return "id INTEGER PRIMARY KEY AUTOINCREMENT"


def _blob(dialect: str) -> str:
    return "BYTEA" if dialect == "postgresql" else "BLOB"


def _real(dialect: str) -> str:
    return "DOUBLE PRECISION" if dialect == "postgresql" else "REAL"


def _migration_1(dialect: str) -> list[str]:
    """The outbox and the inbox."""
    real = _real(dialect)
    return [
        f"""CREATE TABLE basidia_outbox (
            {_id_column(dialect)},
            event TEXT NOT NULL,
            payload {_blob(dialect)} NOT NULL,
            source TEXT NOT NULL,
            version INTEGER,
            created_at {real} NOT NULL,
            sent_at {real},
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT
        )""",
        # The relay's query: a service's pending events in id order.
        "CREATE INDEX basidia_outbox_pending ON basidia_outbox (source, id) WHERE sent_at IS NULL",
        f"""CREATE TABLE basidia_inbox (
            consumer TEXT NOT NULL,
            key TEXT NOT NULL,
            handled_at {real} NOT NULL,
            PRIMARY KEY (consumer, key)
        )""",
        "CREATE INDEX basidia_inbox_age ON basidia_inbox (handled_at)",
    ]


def _migration_2(dialect: str) -> list[str]:
    """Sagas and their steps."""
    real = _real(dialect)
    return [
        f"""CREATE TABLE basidia_sagas (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            service TEXT NOT NULL,
            status TEXT NOT NULL,
            step INTEGER NOT NULL DEFAULT 0,
            data TEXT NOT NULL,
            error TEXT,
            created_at {real} NOT NULL,
            updated_at {real} NOT NULL,
            deadline {real} NOT NULL,
            owner TEXT,
            lease_until {real} NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX basidia_sagas_status ON basidia_sagas (status, updated_at)",
        f"""CREATE TABLE basidia_saga_steps (
            saga_id TEXT NOT NULL REFERENCES basidia_sagas (id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            name TEXT NOT NULL,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            error TEXT,
            updated_at {real} NOT NULL,
            PRIMARY KEY (saga_id, position)
        )""",
    ]


MIGRATIONS = {1: _migration_1, 2: _migration_2}


async def _read_version(conn: Connection) -> int:
    if conn.dialect == "postgresql":
        exists = await conn.fetchval(
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_schema = current_schema() AND table_name = 'basidia_schema'"
        )
    else:
        exists = await conn.fetchval(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'basidia_schema'"
        )
    if not exists:
        return 0
    version = await conn.fetchval("SELECT max(version) FROM basidia_schema")
    return int(version or 0)


async def schema_version(db: Database) -> int:
    """The version of the database's Basidia tables (0: none yet)."""
    async with db.transaction() as conn:
        return await _read_version(conn)


async def migrate(db: Database, target: int = SCHEMA_VERSION) -> int:
    """Create or upgrade the tables to ``target``; return the version found before."""
    if not 0 < target <= SCHEMA_VERSION:
        raise ValueError(f"target must be 1 to {SCHEMA_VERSION}")
    async with db.transaction() as conn:
        if conn.dialect == "postgresql":
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        found = await _read_version(conn)
        if found > SCHEMA_VERSION:
            raise SchemaError(
                f"{db.safe_url} has Basidia tables of version {found}, newer than this "
                f"library's {SCHEMA_VERSION}: upgrade basidia"
            )
        if found == 0:
            await conn.execute(
                f"CREATE TABLE basidia_schema (version INTEGER PRIMARY KEY, "
                f"applied_at {_real(conn.dialect)} NOT NULL)"
            )
        for version in range(found + 1, target + 1):
            for statement in MIGRATIONS[version](conn.dialect):
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO basidia_schema (version, applied_at) VALUES ($1, $2)",
                version,
                time.time(),
            )
        return found
