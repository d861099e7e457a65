"""What ``basidia sagas list|show`` prints: read from the database, so it works while the
service is down (after a crash, say) as well as while it runs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from basidia.data.db import Database, open_database
from basidia.data.saga import get_saga, list_sagas
from basidia.data.schema import schema_version
from basidia.errors import BasidiaError

__all__ = ["show_sagas"]


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp))


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _listing(sagas: list[dict[str, Any]]) -> str:
    if not sagas:
        return "no sagas"
    rows = [["ID", "NAME", "SERVICE", "STATUS", "STEP", "UPDATED (UTC)", "ERROR"]]
    for saga in sagas:
        rows.append(
            [
                saga["id"],
                saga["name"],
                saga["service"],
                saga["status"],
                str(saga["step"]),
                _when(saga["updated_at"]),
                (saga["error"] or "")[:60],
            ]
        )
    return _table(rows)


def _details(saga: dict[str, Any]) -> str:
    lines = [
        f"saga {saga['id']}: {saga['name']} of {saga['service']}, {saga['status']}",
        f"created {_when(saga['created_at'])}, updated {_when(saga['updated_at'])}, "
        f"deadline {_when(saga['deadline'])} (UTC)",
    ]
    if saga["error"]:
        lines.append(f"error: {saga['error']}")
    if saga["owner"]:
        lines.append(f"run by: {saga['owner']}")
    rows = [["#", "STEP", "STATUS", "ATTEMPTS", "ERROR"]]
    for position, step in enumerate(saga["steps"]):
        rows.append(
            [
                str(position),
                step["name"],
                step["status"],
                str(step["attempts"]),
                (step["error"] or "")[:60],
            ]
        )
    lines += ["", _table(rows), "", "data: " + json.dumps(saga["data"], sort_keys=True)]
    return "\n".join(lines)


def _check_exists(db: Database) -> None:
    """Refuse a SQLite file that is not there (opening it would create an empty one)."""
    path = getattr(db, "path", None)
    if path is not None and path != ":memory:" and not Path(path).exists():
        raise BasidiaError(f"no database file at {path}")


async def show_sagas(
    url: str,
    schema: str | None,
    saga_id: str | None,
    *,
    status: str | None = None,
    limit: int = 50,
    as_json: bool = False,
) -> str:
    """The text of ``basidia sagas list`` (no ``saga_id``) or ``show``."""
    db = open_database(url, schema=schema)
    _check_exists(db)
    await db.connect()
    try:
        if await schema_version(db) < 2:
            raise BasidiaError(f"{db.safe_url} has no saga tables: no service has run sagas there")
        if saga_id is None:
            sagas = await list_sagas(db, status=status, limit=limit)
            return json.dumps(sagas, indent=2) if as_json else _listing(sagas)
        saga = await get_saga(db, saga_id)
        if saga is None:
            raise BasidiaError(f"no saga {saga_id!r} in {db.safe_url}")
        return json.dumps(saga, indent=2) if as_json else _details(saga)
    finally:
        await db.close()
