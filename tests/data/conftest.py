"""Databases for the data tests: the PostgreSQL server on 127.0.0.1:5432 (a schema of its own
per test, dropped after it) and SQLite files in the test's temporary directory.

PostgreSQL is skipped with a reason where it is not reachable, and fails the test under
``BASIDIA_REQUIRE_BROKERS=1``, like the brokers (tests/conftest.py).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import require_broker

POSTGRES_URL = os.environ.get(
    "BASIDIA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


@dataclass(frozen=True)
class Db:
    """Where a test's tables go: a URL and, on PostgreSQL, a schema."""

    url: str
    schema: str | None = None

    @property
    def dialect(self) -> str:
        return "postgresql" if self.url.startswith("postgres") else "sqlite"


def require_postgres() -> None:
    parts = urlsplit(POSTGRES_URL)
    require_broker("postgres", parts.hostname or "127.0.0.1", parts.port or 5432)


async def drop_schema(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def pg() -> AsyncIterator[Db]:
    """A fresh schema in the PostgreSQL test database."""
    require_postgres()
    schema = f"basidia_t_{uuid.uuid4().hex[:12]}"
    yield Db(POSTGRES_URL, schema)
    await drop_schema(schema)


@pytest.fixture
def sqlite(tmp_path: Path) -> Db:
    """A SQLite file in the test's temporary directory."""
    return Db(f"sqlite:///{tmp_path / 'service.db'}")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Db]:
    """Each test once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield Db(f"sqlite:///{tmp_path / 'service.db'}")
        return
    require_postgres()
    schema = f"basidia_t_{uuid.uuid4().hex[:12]}"
    yield Db(POSTGRES_URL, schema)
    await drop_schema(schema)
