"""Flat to a million certificates: the scrape-time gauges come from a counter the database keeps
(no COUNT over the inventory), and the inventory queries read ix_certificates_valid_expiry
(no sort, no table scan) while the subject lookup keeps its own index -- on SQLite (no ANALYZE
statistics, as scepd runs it) and on PostgreSQL. bench/flat.py measures it at 1,000,000."""
from __future__ import annotations

import datetime as dt
import re

import sqlalchemy as sa
from sqlalchemy import event

from scepd.clock import FixedClock
from scepd.http.assembly import migrations, open_store
from scepd.ops import metrics as metrics_mod
from scepd.ops.metrics import Metrics
from scepd.store import CertificateRecord, SqlStore
from scepd.store.sql import _cert_row, certificates

from .conftest import NOW

# expiries around every boundary the scrape splits at: now, midnight, the end of each window
OFFSETS = [dt.timedelta(hours=-1), dt.timedelta(0), dt.timedelta(microseconds=1), dt.timedelta(hours=1),
           dt.timedelta(hours=11, minutes=59, seconds=59, microseconds=999999), dt.timedelta(hours=12),
           dt.timedelta(hours=13), dt.timedelta(days=1), dt.timedelta(days=1, hours=12),
           dt.timedelta(days=1, microseconds=1), dt.timedelta(days=6, hours=23), dt.timedelta(days=7),
           dt.timedelta(days=7, microseconds=1), dt.timedelta(days=29, hours=20), dt.timedelta(days=30),
           dt.timedelta(days=30, microseconds=1), dt.timedelta(days=30, hours=13), dt.timedelta(days=90),
           dt.timedelta(days=400)]


def _cert(i: int, not_after: dt.datetime, **kw) -> CertificateRecord:
    return CertificateRecord(
        serial=format(i + (1 << 126), "x"), ca_id="ca1", subject=f"CN=flat-{i}", sans=(),
        not_before=NOW - dt.timedelta(days=1), not_after=not_after, profile="device", protocol="scep",
        transaction_id=None, requester=None, spki_sha256="ab" * 32, der=b"\x30\x00",
        issued_at=NOW - dt.timedelta(days=1), **kw)


async def _insert(store: SqlStore, records: list[CertificateRecord]) -> None:
    async with store.transaction() as tx:
        for rec in records:
            await tx.insert_certificate(rec)


def _inventory() -> list[CertificateRecord]:
    out = [_cert(i, NOW + off) for i, off in enumerate(OFFSETS)]
    out += [_cert(100 + i, NOW + off, status="revoked", revoked_at=NOW, revocation_reason="superseded")
            for i, off in enumerate(OFFSETS[3:8])]
    return out


async def _both_ways(store: SqlStore, at: dt.datetime):
    async with store.engine.connect() as conn:
        return (await metrics_mod._counts_from_counter(conn, at),
                await metrics_mod._counts_by_count(conn, at))


async def test_scrape_gauges_come_from_the_counter_and_match_a_count(database_url):
    store = await open_store(database_url)
    try:
        inventory = _inventory()
        await _insert(store, inventory)
        revoked = {format(7 + (1 << 126), "x"), format(17 + (1 << 126), "x")}
        async with store.transaction() as tx:  # revocations move rows out of the counter
            for serial in revoked:
                assert await tx.revoke_certificate(serial, "keyCompromise", NOW)
        valid = [r.not_after for r in inventory if r.status == "valid" and r.serial not in revoked]
        clock = FixedClock(NOW)
        metrics = Metrics(store, clock)
        statements: list[str] = []

        def capture(conn, cursor, statement, parameters, context, executemany):
            statements.append(statement)
        for _engine in store.sync_engines():  # the async engine and the units' one
            event.listen(_engine, "before_cursor_execute", capture)
        try:
            for at in (NOW, NOW + dt.timedelta(hours=11, minutes=30), NOW + dt.timedelta(hours=12),
                       NOW - dt.timedelta(hours=12), NOW + dt.timedelta(days=6, hours=23),
                       NOW + dt.timedelta(microseconds=1), NOW + dt.timedelta(days=29, hours=20)):
                clock.set(at)
                await metrics.refresh()
                assert metrics.active._value.get() == sum(1 for t in valid if t > at), at
                for days in (30, 7, 1):
                    want = sum(1 for t in valid if at < t <= at + dt.timedelta(days=days))
                    assert metrics.expiring.labels(within_days=str(days))._value.get() == want, (at, days)
        finally:
            for _engine in store.sync_engines():  # the async engine and the units' one
                event.remove(_engine, "before_cursor_execute", capture)
        assert any("certificate_expiry_counts" in s for s in statements)
        # every read of the certificates table is bounded above on not_after: at most a day of rows
        on_certs = [s for s in statements if re.search(r"FROM certificates\b", s)]
        assert on_certs and all(re.search(r"not_after <=? ", s) for s in on_certs), on_certs
        # and the figures agree with a COUNT over the rows
        counted, by_count = await _both_ways(store, NOW)
        assert counted == by_count and by_count[0] > by_count[1][30] > by_count[1][7] > by_count[1][1] > 0
    finally:
        await store.close()


async def test_upgrade_backfills_the_counter(database_url):
    """A database with certificates (every migration before this one) gains the index and an
    exact counter at upgrade."""
    older = [m for m in migrations() if m[:2] not in {("core", 5), ("metrics", 1)}]
    store = await SqlStore.open(database_url, older)
    try:
        await _insert(store, _inventory())
    finally:
        await store.close()
    store = await open_store(database_url)
    try:
        async with store.engine.connect() as conn:
            total = (await conn.execute(sa.select(sa.func.sum(metrics_mod.expiry_counts.c.valid)))).scalar_one()
        assert total == len(OFFSETS)
        for at in (NOW, NOW + dt.timedelta(days=6, hours=23)):
            counted, by_count = await _both_ways(store, at)
            assert counted == by_count
    finally:
        await store.close()


async def _plans(store: SqlStore, run) -> list[tuple[str, str]]:
    """(statement, plan) of every SELECT `run()` executes, explained on the same database."""
    captured: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if re.match(r"\s*SELECT", statement, re.I):
            captured.append((statement, parameters))
    engines = store.sync_engines()
    for engine in engines:
        event.listen(engine, "before_cursor_execute", capture)
    try:
        await run()
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", capture)
    out = []
    postgres = store.engine.dialect.name == "postgresql"
    if postgres:  # what autovacuum does after a bulk load: statistics and the visibility map
        async with store.engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.exec_driver_sql("VACUUM ANALYZE certificates")
    async with store.engine.connect() as conn:
        if postgres:
            # a few hundred rows: make the planner show the index it uses at a million
            await conn.exec_driver_sql("SET enable_seqscan = off")
            explain = "EXPLAIN "
        else:
            explain = "EXPLAIN QUERY PLAN "
        for statement, params in captured:
            rows = (await conn.exec_driver_sql(explain + statement, params)).all()
            out.append((statement, " | ".join(str(r[-1]) for r in rows)))
    return out


async def test_inventory_queries_read_the_valid_expiry_index(database_url):
    store = await open_store(database_url)
    try:
        await _insert(store, _inventory() + [_cert(1000 + i, NOW + dt.timedelta(days=i % 400, seconds=i))
                                             for i in range(600)])
        postgres = store.engine.dialect.name == "postgresql"

        listing = await _plans(store, lambda: store.list_certificates(
            expiring_before=NOW + dt.timedelta(days=30), limit=20))
        assert len(listing) == 1
        _, plan = listing[0]
        assert "ix_certificates_valid_expiry" in plan, plan
        # rows come in index order and stop at LIMIT: no sort of every match
        assert ("Sort" not in plan) if postgres else ("TEMP B-TREE" not in plan), plan

        # the partial index is no candidate for a subject lookup (SQLite, without ANALYZE
        # statistics, preferred a full (status, not_after) index here and walked every valid row)
        by_subject = await _plans(store, lambda: store.find_valid_by_subject("CN=flat-1001", NOW))
        assert len(by_subject) == 1 and "ix_certificates_subject" in by_subject[0][1], by_subject

        scrape = await _plans(store, lambda: Metrics(store, FixedClock(NOW)).refresh())
        ranges = [(s, p) for s, p in scrape if re.search(r"FROM certificates\b", s)]
        assert len(ranges) == 4  # the rest of today and the last day of each of the three windows
        for statement, plan in ranges:
            wanted = ("Index Only Scan using ix_certificates_valid_expiry" if postgres
                      else "USING COVERING INDEX ix_certificates_valid_expiry")
            assert wanted in plan, f"{statement}\n{plan}"
        for statement, plan in listing + by_subject + scrape:
            assert not re.search(r"Seq Scan on certificates|\bSCAN certificates\b", plan), plan
    finally:
        await store.close()
