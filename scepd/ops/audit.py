"""The audit trail: filtered reads, and the database-level guarantee that it is append-only.

The store API only ever inserts audit rows (Transaction.audit); there is no update or delete.
Migration ("ops", 2) adds triggers that make the database itself refuse UPDATE and DELETE on
the audit table (SQLite and PostgreSQL), plus indexes for the filters below.
"""
from __future__ import annotations

import datetime as dt
import json

import sqlalchemy as sa

from ..store import AuditRecord, SqlStore
from ..store.sql import _aware, _naive, audit

_SQLITE = [
    "CREATE INDEX IF NOT EXISTS ix_audit_event ON audit (event, id)",
    "CREATE INDEX IF NOT EXISTS ix_audit_serial ON audit (serial)",
    "CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit "
    "BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit "
    "BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END",
]
_POSTGRES = [
    "CREATE INDEX IF NOT EXISTS ix_audit_event ON audit (event, id)",
    "CREATE INDEX IF NOT EXISTS ix_audit_serial ON audit (serial)",
    "CREATE OR REPLACE FUNCTION scepd_audit_append_only() RETURNS trigger AS $$ "
    "BEGIN RAISE EXCEPTION 'audit is append-only'; END $$ LANGUAGE plpgsql",
    "DROP TRIGGER IF EXISTS audit_append_only ON audit",
    "CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit "
    "FOR EACH ROW EXECUTE FUNCTION scepd_audit_append_only()",
]


def _append_only(conn: sa.Connection) -> None:
    for statement in (_POSTGRES if conn.dialect.name == "postgresql" else _SQLITE):
        conn.exec_driver_sql(statement)


#: component "ops", version 2 (applied from the ordered list, scepd.http.assembly.migrations)
MIGRATIONS = [(2, _append_only)]


async def list_audit(store: SqlStore, *, event: str | None = None, serial: str | None = None,
                     since: dt.datetime | None = None, limit: int = 50) -> list[AuditRecord]:
    """Newest first. `event` is exact, or a prefix when it ends with '*' ("certificate.*")."""
    q = sa.select(audit).order_by(audit.c.id.desc()).limit(max(1, min(limit, 10_000)))
    if event:
        if event.endswith("*"):
            prefix = event[:-1].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            q = q.where(audit.c.event.like(prefix + "%", escape="\\"))
        else:
            q = q.where(audit.c.event == event)
    if serial:
        q = q.where(audit.c.serial == serial)
    if since is not None:
        q = q.where(audit.c.at >= _naive(since))
    async with store.engine.connect() as conn:
        rows = (await conn.execute(q)).all()
    return [AuditRecord(id=r.id, at=_aware(r.at), event=r.event, subject=r.subject, serial=r.serial,
                        actor=r.actor, details=json.loads(r.details)) for r in rows]


def audit_json(rec: AuditRecord) -> dict:
    return {"id": rec.id, "at": rec.at.isoformat(), "event": rec.event, "subject": rec.subject,
            "serial": rec.serial, "actor": rec.actor, "details": rec.details}


def parse_since(text: str, now: dt.datetime) -> dt.datetime:
    """An ISO 8601 instant (UTC if no offset) or a duration back from now ("24h", "7d")."""
    from ..config import ConfigError, parse_duration
    try:
        return now - parse_duration(text)
    except ConfigError:
        pass
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since: not a duration or ISO 8601 time: {text!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)
