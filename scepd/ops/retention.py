"""Retention: what expires is purged on a schedule; certificates and audit rows never are.

Purged (`[retention]`):
  spent_challenges   one-time challenges used or expired longer ago than this (their hashes)
  pending_requests   requests decided (issued/rejected) longer ago than this, and requests nobody
                     decided within this time (stale; an audit row `request.expired` each)
  and what front-ends add (acme/: expired nonces at once, orders expired longer ago than
  `acme_orders` with their authorizations and challenges)

One run deletes in bounded batches (`BATCH` rows a statement, a few statements a run) so a
first run on a large store never holds the database for long; what is left goes on the next
run. The primary worker runs it every `interval`; each purge is counted in
`scepd_retention_purged_total{kind}` and one audit row `retention.purged` records a run that
purged anything.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import sqlalchemy as sa

from ..clock import Clock
from ..config import ConfigError, parse_duration
from ..store import AuditRecord, SqlStore
from ..store.sql import _naive, challenges, insert_audit, pending_requests

log = logging.getLogger("scepd.retention")

#: rows one statement deletes at most; a run repeats a purge at most MAX_ROUNDS times
BATCH = 5000
MAX_ROUNDS = 20


@dataclass(frozen=True)
class Purge:
    """One kind of expired row: fn(connection, now, age) -> rows deleted (at most BATCH)."""
    kind: str
    #: the `[retention]` key holding its age ("" = purged as soon as it has expired)
    setting: str
    fn: Callable[[sa.Connection, dt.datetime, dt.timedelta], int]


@dataclass(frozen=True)
class RetentionSettings:
    interval: dt.timedelta | None  # None: off
    ages: dict[str, dt.timedelta] = field(default_factory=dict)

    @classmethod
    def from_config(cls, section) -> "RetentionSettings":
        ages = {}
        for key in ("spent_challenges", "pending_requests", "acme_orders"):
            text = getattr(section, key)
            ages[key] = parse_duration(text)
            if ages[key] <= dt.timedelta(0):
                raise ConfigError(f"[retention] {key} must be a positive duration, got {text!r}")
        interval = parse_duration(section.interval)
        return cls(interval if interval > dt.timedelta(0) else None, ages)


def _ids(conn: sa.Connection, table: sa.Table, *where) -> list:
    return [r[0] for r in conn.execute(sa.select(table.c.id).where(*where).limit(BATCH))]


def purge_challenges(conn: sa.Connection, now: dt.datetime, age: dt.timedelta) -> int:
    cutoff = _naive(now - age)
    c = challenges.c
    ids = _ids(conn, challenges, sa.or_(c.used_at < cutoff, c.expires_at < cutoff))
    if ids:
        conn.execute(challenges.delete().where(c.id.in_(ids)))
    return len(ids)


def purge_pending(conn: sa.Connection, now: dt.datetime, age: dt.timedelta) -> int:
    cutoff = _naive(now - age)
    p = pending_requests.c
    decided = _ids(conn, pending_requests, p.status != "pending", p.decided_at < cutoff)
    stale = conn.execute(sa.select(p.id, p.subject, p.transaction_id, p.protocol).where(
        p.status == "pending", p.created_at < cutoff).limit(BATCH)).all()
    for row in stale:  # nobody decided: the request expires, and the trail says so
        insert_audit(conn, AuditRecord(at=now, event="request.expired", subject=row.subject, actor="retention",
                                       details={"pending_id": int(row.id), "protocol": row.protocol,
                                                "transaction_id": row.transaction_id}))
    ids = decided + [r.id for r in stale]
    if ids:
        conn.execute(pending_requests.delete().where(p.id.in_(ids)))
    return len(ids)


CORE_PURGES = (Purge("challenges", "spent_challenges", purge_challenges),
               Purge("pending_requests", "pending_requests", purge_pending))


class RetentionService:
    def __init__(self, store: SqlStore, clock: Clock, settings: RetentionSettings,
                 purges: Sequence[Purge] = CORE_PURGES):
        self.store = store
        self.clock = clock
        self.settings = settings
        self.purges = tuple(purges)
        #: sync callables(kind, count) told after each committed purge (metrics)
        self.listeners: list[Callable[[str, int], None]] = []

    async def run_once(self) -> dict[str, int]:
        """One pass over every purge; {kind: rows deleted}. Each batch is its own transaction."""
        now = self.clock.now()
        done: dict[str, int] = {}
        for purge in self.purges:
            age = self.settings.ages.get(purge.setting, dt.timedelta(0)) if purge.setting else dt.timedelta(0)
            total = 0
            for _ in range(MAX_ROUNDS):
                count = await self.store.write(lambda conn, p=purge, a=age: p.fn(conn, now, a))
                total += count
                if count:
                    for listener in self.listeners:
                        listener(purge.kind, count)
                if count < BATCH:
                    break
            if total:
                done[purge.kind] = total
        if done:
            record = AuditRecord(at=now, event="retention.purged", actor="retention", details=dict(done))
            await self.store.write(lambda conn: insert_audit(conn, record))
            log.info("retention: purged %s", ", ".join(f"{k}={v}" for k, v in sorted(done.items())))
        return done

    async def run_forever(self, stop: asyncio.Event, active: Callable[[], bool] = lambda: True) -> None:
        """Every interval until `stop`, while `active()` (the primary worker: it may change at a
        reload); a failed run is logged and retried at the next one."""
        interval = self.settings.interval
        if interval is None:
            return
        while not stop.is_set():
            try:
                if active():
                    await self.run_once()
            except Exception:
                log.exception("retention run failed; retrying in %s", interval)
            try:
                await asyncio.wait_for(stop.wait(), interval.total_seconds())
            except asyncio.TimeoutError:
                pass
