"""The console's reads that the store has no method for: read units (SqlStore.read) of SQLAlchemy
Core over the store's tables."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa

from ..admin.service import admin_tokens
from ..render import serial_key
from ..store.sql import _cert_record, _naive, certificates

PAGE_SIZE = 25
TIMELINE_DAYS = 90

_meta = sa.MetaData()

#: sessions signed out before their expiry (scepd.console.session): kept until that expiry
console_signouts = sa.Table(
    "console_signouts", _meta,
    sa.Column("sid", sa.String(32), primary_key=True),
    sa.Column("expires_at", sa.DateTime, nullable=False, index=True),
)

#: component "console", version 1 (applied from the ordered list, scepd.http.assembly.migrations)
MIGRATIONS = [(1, [console_signouts])]


@dataclass(frozen=True)
class Filters:
    q: str = ""
    state: str = ""  # "", valid, expired, revoked
    profile: str = ""
    protocol: str = ""
    ca: str = ""
    page: int = 1


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def search(f: Filters, now: dt.datetime):
    """A read unit: (records of the page, there is a next page)."""
    c = certificates
    q = sa.select(c)
    if f.q:
        # case-insensitive on both databases (SQLite's LIKE is, PostgreSQL's is not: ILIKE)
        terms = [c.c.subject.ilike(_like(f.q), escape="\\"), c.c.sans.ilike(_like(f.q), escape="\\")]
        try:
            terms.append(c.c.serial == serial_key(f.q))
        except ValueError:
            pass
        q = q.where(sa.or_(*terms))
    if f.state == "revoked":
        q = q.where(c.c.status == "revoked")
    elif f.state == "valid":
        q = q.where(c.c.status == "valid", c.c.not_after > _naive(now))
    elif f.state == "expired":
        q = q.where(c.c.status == "valid", c.c.not_after <= _naive(now))
    for column, value in ((c.c.profile, f.profile), (c.c.protocol, f.protocol), (c.c.ca_id, f.ca)):
        if value:
            q = q.where(column == value)
    q = q.order_by(c.c.issued_at.desc(), c.c.serial).limit(PAGE_SIZE + 1).offset((f.page - 1) * PAGE_SIZE)

    def unit(conn: sa.Connection):
        rows = conn.execute(q).all()
        return [_cert_record(r) for r in rows[:PAGE_SIZE]], len(rows) > PAGE_SIZE
    return unit


def choices(conn: sa.Connection) -> dict[str, list[str]]:
    """A read unit: the profiles, protocols and CAs present, for the filter menus."""
    c = certificates
    return {name: [v for (v,) in conn.execute(sa.select(col).distinct().order_by(col)).all()]
            for name, col in (("profile", c.c.profile), ("protocol", c.c.protocol), ("ca", c.c.ca_id))}


@dataclass(frozen=True)
class Timeline:
    start: dt.date
    per_day: list[int]  # valid certificates expiring on start + i days, 0 <= i <= TIMELINE_DAYS
    expired: int
    revoked: int


def timeline(now: dt.datetime):
    c = certificates
    end = now + dt.timedelta(days=TIMELINE_DAYS)

    def unit(conn: sa.Connection) -> Timeline:
        ends = conn.execute(sa.select(c.c.not_after).where(
            c.c.status == "valid", c.c.not_after > _naive(now), c.c.not_after <= _naive(end))).scalars().all()
        expired = conn.execute(sa.select(sa.func.count()).select_from(c).where(
            c.c.status == "valid", c.c.not_after <= _naive(now))).scalar_one()
        revoked = conn.execute(sa.select(sa.func.count()).select_from(c).where(
            c.c.status == "revoked")).scalar_one()
        start = now.date()
        per_day = [0] * (TIMELINE_DAYS + 1)  # today .. the day `end` falls on
        for t in ends:
            per_day[min(max((t.date() - start).days, 0), TIMELINE_DAYS)] += 1
        return Timeline(start, per_day, int(expired), int(revoked))
    return unit


def session_live(token_id: int, sid: str):
    """A read unit: the name of admin token `token_id` if it exists and is not revoked and session
    `sid` was not signed out, else None."""
    def unit(conn: sa.Connection) -> str | None:
        row = conn.execute(sa.select(admin_tokens.c.name, admin_tokens.c.revoked_at).where(
            admin_tokens.c.id == token_id)).first()
        if row is None or row.revoked_at is not None:
            return None
        out = conn.execute(sa.select(console_signouts.c.sid).where(console_signouts.c.sid == sid)).first()
        return row.name if out is None else None
    return unit


def sign_out(sid: str, expires: dt.datetime, now: dt.datetime):
    """A write unit: session `sid` signed out until `expires`; signed-out sessions already expired
    are dropped (the table holds at most the sessions of the last SESSION_TTL)."""
    def unit(conn: sa.Connection) -> None:
        conn.execute(console_signouts.delete().where(console_signouts.c.expires_at <= _naive(now)))
        if conn.execute(sa.select(console_signouts.c.sid).where(console_signouts.c.sid == sid)).first() is None:
            conn.execute(console_signouts.insert().values(sid=sid, expires_at=_naive(expires)))
    return unit
