"""One small async database layer over asyncpg (PostgreSQL) and aiosqlite (SQLite).

Both drivers are imported only when a database of their kind is opened, so ``import
basidia`` stays light; a missing one gives the extra to install (docs/outbox.md says why
these two drivers).  Statements are written with PostgreSQL's ``$1, $2`` placeholders and
rewritten to SQLite's ``?1, ?2`` (which SQLite numbers the same way) for SQLite.

URLs: ``postgresql://user@host:5432/db`` (or ``postgres://``); ``sqlite:///relative.db``,
``sqlite:////absolute/path.db``, ``sqlite:///:memory:``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, Protocol

from basidia.brokers._common import redact_url
from basidia.errors import BasidiaError, ConfigError

__all__ = [
    "Connection",
    "Database",
    "DatabaseError",
    "Row",
    "open_database",
]

Dialect = Literal["postgresql", "sqlite"]

_PLACEHOLDER = re.compile(r"\$(\d+)")
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# How long SQLite waits for another process's write lock before failing a statement.
_SQLITE_BUSY_TIMEOUT_MS = 30_000


class DatabaseError(BasidiaError):
    """The database refused an operation or could not be reached."""


class Row(Protocol):
    """A result row: by column name (``row["id"]``) or by position (``row[0]``)."""

    def __getitem__(self, key: int | str, /) -> Any: ...

    def keys(self) -> Any: ...


def _install_hint(package: str, extra: str) -> ImportError:
    return ImportError(f"{package} is needed for this database: pip install 'basidia[{extra}]'")


def parse_url(url: str) -> tuple[Dialect, str]:
    """``(dialect, target)``: the asyncpg DSN, or the SQLite file path."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql", url
    if url.startswith("sqlite://"):
        rest = url[len("sqlite://") :]
        if not rest.startswith("/") or len(rest) < 2:
            raise ConfigError(
                f"bad SQLite URL {url!r}: use sqlite:///relative.db, sqlite:////absolute.db "
                "or sqlite:///:memory:"
            )
        return "sqlite", rest[1:]
    raise ConfigError(
        f"unsupported database URL {safe_url(url)!r}: use postgresql://... or sqlite:///file.db"
    )


def safe_url(url: str) -> str:
    """The URL without its password, for logs and errors."""
    return redact_url(url)


class Connection:
    """One connection inside a transaction: run statements, read rows.

    ``execute`` returns the number of rows the statement changed.
    """

    dialect: Dialect

    async def execute(self, sql: str, *args: Any) -> int:
        raise NotImplementedError

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        raise NotImplementedError

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        raise NotImplementedError

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchrow(sql, *args)
        return None if row is None else row[0]


class _PgConnection(Connection):
    dialect: Dialect = "postgresql"

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    async def execute(self, sql: str, *args: Any) -> int:
        status: str = await self.raw.execute(sql, *args)
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self.raw.executemany(sql, rows)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        rows: list[Row] = await self.raw.fetch(sql, *args)
        return rows


class _SqliteConnection(Connection):
    dialect: Dialect = "sqlite"

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    async def execute(self, sql: str, *args: Any) -> int:
        cursor = await self.raw.execute(_sqlite_sql(sql), args)
        count: int = cursor.rowcount
        await cursor.close()
        return max(count, 0)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self.raw.executemany(_sqlite_sql(sql), rows)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        cursor = await self.raw.execute(_sqlite_sql(sql), args)
        try:
            rows: list[Row] = list(await cursor.fetchall())
        finally:
            await cursor.close()
        return rows


def _sqlite_sql(sql: str) -> str:
    return _PLACEHOLDER.sub(r"?\1", sql)


class Database:
    """An open database: a pool (PostgreSQL) or one connection (SQLite).

    ``transaction()`` gives a ``Connection`` inside a transaction that commits when the
    block ends and rolls back when it raises.  On PostgreSQL ``schema`` (created if
    missing) is the ``search_path`` of every connection, so tables of different
    services or tests can share one database.
    """

    dialect: Dialect

    def __init__(self, url: str, *, schema: str | None = None) -> None:
        self.url = url
        self.safe_url = safe_url(url)
        self.dialect, self._target = parse_url(url)
        if schema is not None and not _SCHEMA_NAME.match(schema):
            raise ConfigError(
                f"bad schema name {schema!r}: lower-case letters, digits and _, at most 63"
            )
        self.schema = schema

    def __repr__(self) -> str:
        schema = f" schema={self.schema}" if self.schema else ""
        return f"<Database {self.safe_url}{schema}>"

    async def connect(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def transaction(self) -> Any:
        """``async with db.transaction() as conn``: one transaction."""
        raise NotImplementedError

    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement in a transaction of its own."""
        async with self.transaction() as conn:
            result: int = await conn.execute(sql, *args)
            return result

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """Read rows in a transaction of its own."""
        async with self.transaction() as conn:
            rows: list[Row] = await conn.fetch(sql, *args)
            return rows

    @property
    def notify_channel(self) -> str:
        """The LISTEN/NOTIFY channel of this database's outbox (PostgreSQL)."""
        return f"basidia_outbox_{self.schema}" if self.schema else "basidia_outbox"

    async def listen(self, channel: str, callback: Callable[[], None]) -> Callable[[], bool]:
        """Call ``callback`` on every NOTIFY on ``channel`` (PostgreSQL only).

        Returns a function telling whether the listening connection is still alive.
        """
        raise DatabaseError(f"{self.dialect} has no LISTEN/NOTIFY")

    async def close_listener(self) -> None:
        """Close the listening connection, if any."""


class _PostgresDatabase(Database):
    def __init__(self, url: str, *, schema: str | None = None, pool_size: int = 10) -> None:
        super().__init__(url, schema=schema)
        self._pool_size = pool_size
        self._pool: Any = None
        self._listener: Any = None
        try:
            import asyncpg
        except ImportError:
            raise _install_hint("asyncpg", "postgres") from None
        self._asyncpg = asyncpg

    def _settings(self) -> dict[str, str]:
        return {"search_path": self.schema} if self.schema else {}

    async def connect(self) -> None:
        asyncpg = self._asyncpg
        try:
            # A search_path may name a schema that does not exist yet: it is created next.
            self._pool = await asyncpg.create_pool(
                self._target,
                min_size=1,
                max_size=self._pool_size,
                timeout=10,
                command_timeout=60,
                server_settings=self._settings(),
            )
            if self.schema:
                # UniqueViolation: another process created it at the same moment.
                with contextlib.suppress(asyncpg.UniqueViolationError):
                    await self._pool.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            await self.close()
            raise DatabaseError(f"cannot connect to {self.safe_url}: {exc}") from exc

    async def close(self) -> None:
        await self.close_listener()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 10)
            except TimeoutError:
                pool.terminate()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        if self._pool is None:
            raise DatabaseError(f"{self!r} is not connected")
        async with self._pool.acquire() as raw, raw.transaction():
            yield _PgConnection(raw)

    async def listen(self, channel: str, callback: Callable[[], None]) -> Callable[[], bool]:
        await self.close_listener()
        conn = await self._asyncpg.connect(
            self._target, timeout=10, server_settings=self._settings()
        )
        await conn.add_listener(channel, lambda *_: callback())
        self._listener = conn
        return lambda: not conn.is_closed()

    async def close_listener(self) -> None:
        conn, self._listener = self._listener, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 5)
            except (TimeoutError, OSError):
                conn.terminate()


class _SqliteDatabase(Database):
    """One connection, one transaction at a time (SQLite has one writer anyway).

    WAL journal with ``synchronous=FULL``: a committed transaction survives the process
    being killed, and readers (``basidia sagas``) do not block the service.
    """

    def __init__(self, url: str, *, schema: str | None = None) -> None:
        super().__init__(url, schema=schema)
        self._conn: Any = None
        self._lock = asyncio.Lock()
        try:
            import aiosqlite
        except ImportError:
            raise _install_hint("aiosqlite", "sqlite") from None
        self._aiosqlite = aiosqlite

    @property
    def path(self) -> str:
        return self._target

    async def connect(self) -> None:
        path = self._target
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = await self._aiosqlite.connect(path, isolation_level=None)
            conn.row_factory = sqlite3.Row
            await conn.execute(f"PRAGMA busy_timeout = {_SQLITE_BUSY_TIMEOUT_MS}")
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            raise DatabaseError(f"cannot open {self.safe_url}: {exc}") from exc
        self._conn = conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        async with self._lock:
            conn = self._conn
            if conn is None:
                raise DatabaseError(f"{self!r} is not connected")
            # IMMEDIATE: take the write lock now, so that two processes on one file
            # queue up (busy_timeout) instead of failing when a reader tries to write.
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteConnection(conn)
            except BaseException:
                await asyncio.shield(conn.execute("ROLLBACK"))
                raise
            await conn.execute("COMMIT")


def open_database(url: str, *, schema: str | None = None) -> Database:
    """A ``Database`` for ``url`` (not connected yet: ``await db.connect()``)."""
    dialect, _ = parse_url(url)
    if dialect == "postgresql":
        return _PostgresDatabase(url, schema=schema)
    return _SqliteDatabase(url, schema=schema)


def resolve_url(url: str, base: Path | None = None) -> str:
    """A SQLite URL with a relative path made absolute against ``base`` (default: cwd)."""
    dialect, target = parse_url(url)
    if dialect != "sqlite" or target == ":memory:" or Path(target).is_absolute():
        return url
    return "sqlite:///" + str((base or Path.cwd()) / target)
