"""SqlStore.read / SqlStore.write: one synchronous unit of Core statements, one hop, on both
databases (the hot paths' interface; see scepd/store/sql.py)."""
from __future__ import annotations

import asyncio
import threading

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from scepd.store import SqlStore
from scepd.store.sql import challenges

from . import helpers

import datetime as dt

NOW = dt.datetime(2026, 1, 1, 12, 0)


def _insert(secret: str):
    def unit(conn: sa.Connection) -> int:
        result = conn.execute(challenges.insert(), dict(secret_sha256=secret, cn_pattern=None,
                                                         created_at=NOW, expires_at=NOW + dt.timedelta(hours=1)))
        return int(result.inserted_primary_key[0])
    return unit


def _count(conn: sa.Connection) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(challenges)).scalar_one())


async def test_write_commits_and_read_sees_it(database_url):
    store = await SqlStore.open(database_url)
    try:
        first = await store.write(_insert("a" * 64))
        second = await store.write(_insert("b" * 64))
        assert second != first
        assert await store.read(_count) == 2
        # the older per-statement interface sees the same rows
        assert (await store.find_challenge("a" * 64)).id == first
    finally:
        await store.close()


async def test_a_raising_unit_is_rolled_back_whole(database_url):
    store = await SqlStore.open(database_url)
    try:
        await store.write(_insert("a" * 64))

        def two_then_fail(conn):
            _insert("c" * 64)(conn)
            _insert("a" * 64)(conn)  # unique secret: IntegrityError

        with pytest.raises(IntegrityError):
            await store.write(two_then_fail)
        assert await store.read(_count) == 1  # "c" was not kept
        await store.write(_insert("c" * 64))  # and the store still works
        assert await store.read(_count) == 2
    finally:
        await store.close()


async def test_concurrent_units_all_commit(database_url):
    store = await SqlStore.open(database_url)
    try:
        ids = await asyncio.gather(*(store.write(_insert(f"{i:064x}")) for i in range(40)))
        assert len(set(ids)) == 40
        assert await store.read(_count) == 40
    finally:
        await store.close()


async def test_sqlite_units_run_off_the_event_loop_thread(tmp_path):
    store = await SqlStore.open(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    try:
        loop_thread = threading.get_ident()
        seen = await store.write(lambda conn: (threading.get_ident(), threading.current_thread().name))
        assert seen[0] != loop_thread and seen[1].startswith("scepd-db-write")
        seen = await store.read(lambda conn: threading.current_thread().name)
        assert seen.startswith("scepd-db-read")
    finally:
        await store.close()


async def test_prepare_runs_off_the_loop_before_the_unit_and_its_result_is_the_units(database_url):
    """read/write(fn, prepare=...): the CPU work a unit depends on runs first, never in the
    event loop's thread (on SQLite: the read in the same store thread, the write's in a worker
    thread that hands the unit to the writer), and the unit gets its result."""
    store = await SqlStore.open(database_url)
    try:
        loop_thread = threading.get_ident()
        prepared_in: list[int] = []

        def prepare(secret):
            def run():
                prepared_in.append(threading.get_ident())
                return secret
            return run
        first = await store.write(lambda conn, secret: _insert(secret)(conn), prepare=prepare("a" * 64))
        assert await store.read(lambda conn, n: (_count(conn), n), prepare=prepare(7)) == (1, 7)
        assert (await store.find_challenge("a" * 64)).id == first
        assert len(prepared_in) == 2 and loop_thread not in prepared_in

        def refuse():
            raise ValueError("no")
        ran: list[bool] = []
        with pytest.raises(ValueError):
            await store.write(lambda conn, _x: ran.append(True), prepare=refuse)
        with pytest.raises(ValueError):
            await store.read(lambda conn, _x: ran.append(True), prepare=refuse)
        assert ran == []
    finally:
        await store.close()


async def test_meanwhile_overlaps_the_unit_and_is_handed_out_only_once_it_committed(database_url):
    """write(fn, prepare=..., meanwhile=...): the reply's work runs while the unit runs and
    commits (here the unit waits for a signal that only `meanwhile` gives: run one after the
    other, they would not finish), off the loop; both results come back once the unit committed;
    when the unit fails, its error propagates and meanwhile's result is not handed out."""
    store = await SqlStore.open(database_url)
    try:
        loop_thread = threading.get_ident()
        signal, threads = threading.Event(), []

        def unit(conn, secret):
            assert signal.wait(10), "meanwhile did not run while the unit ran"
            return _insert(secret)(conn)

        def meanwhile(secret):
            threads.append(threading.get_ident())
            signal.set()
            return f"reply for {secret[:4]}"
        row_id, reply = await store.write(unit, prepare=lambda: "b" * 64, meanwhile=meanwhile)
        assert reply == "reply for bbbb" and (await store.find_challenge("b" * 64)).id == row_id
        assert threads and loop_thread not in threads

        def failing(conn, secret):
            _insert(secret)(conn)
            raise IntegrityError("INSERT", {}, Exception("taken"))
        handed: list[str] = []
        with pytest.raises(IntegrityError):
            handed.append(await store.write(failing, prepare=lambda: "c" * 64, meanwhile=lambda s: "reply"))
        assert handed == [] and await store.find_challenge("c" * 64) is None
    finally:
        await store.close()


def _unit_statements(store: SqlStore, now: dt.datetime):
    """Every module-level unit statement of scepd.store.sql once (writes, then reads), as
    (write unit, read unit); the read unit returns every record it read."""
    from scepd.store import AuditRecord, CertificateRecord, PendingRecord, sql

    def cert(serial: str, txn: str, subject: str) -> CertificateRecord:
        return CertificateRecord(serial=serial, ca_id="ca1", subject=subject, sans=("DNS:a.example", "IP:10.0.0.1"),
                                 not_before=now, not_after=now + dt.timedelta(days=30, microseconds=7),
                                 profile="device", protocol="scep", transaction_id=txn, requester=None,
                                 spki_sha256="ab" * 32, der=b"\x30\x03\x02\x01\x00", issued_at=now)

    async def writes() -> list:
        challenge = await store.write(_insert("c" * 64))
        pending = PendingRecord(id=0, transaction_id="t1", spki_sha256="cd" * 32, signer_spki_sha256="ef" * 32,
                                csr_der=b"\x30\x00", subject="CN=p", profile="device", protocol="scep",
                                requester="r", created_at=now)
        async with store.transaction() as tx:  # no unit function inserts a pending request
            pending_id = await tx.insert_pending(pending)

        def unit(conn):
            out = [sql.consume_challenge(conn, challenge, now, "0a"), sql.consume_challenge(conn, challenge, now, "0b")]
            sql.insert_certificate(conn, cert("0a", "t1", "CN=a"))
            sql.insert_certificate(conn, cert("0b", "t1", "CN=b"))
            out += [sql.decide_pending(conn, pending_id, "issued", now, "admin", serial="0a"),
                    sql.decide_pending(conn, pending_id, "issued", now, "admin"),
                    sql.revoke_certificate(conn, "0b", "superseded", now),
                    sql.revoke_certificate(conn, "0b", "superseded", now)]
            sql.insert_audit(conn, AuditRecord(at=now, event="e", subject="CN=a", serial="0a", actor="x",
                                               details={"k": [1, "v"], "n": None}))
            try:
                sql.revoke_certificate(conn, "ff", "superseded", now)
            except LookupError:
                out.append("not found")
            return out
        out = await store.write(unit)
        try:
            await store.write(lambda conn: sql.insert_certificate(conn, cert("0a", "t2", "CN=dup")))
        except Exception as err:  # noqa: BLE001 - the type is what is compared
            out.append(type(err).__name__)
        return out

    def reads(conn) -> list:
        return [sql.find_transaction(conn, "t1"), sql.find_pending(conn, "t1"), sql.get_pending(conn, 1),
                sql.get_pending(conn, 99), sql.get_certificate(conn, "0a"), sql.get_certificate(conn, "ff"),
                sql.find_certificate_for_transaction(conn, "t1", "ab" * 32),
                sql.find_valid_by_subject(conn, "CN=a", now), sql.find_valid_by_subject(conn, "CN=b", now),
                sql.find_challenge(conn, "c" * 64), sql.find_challenge(conn, "d" * 64)]
    return writes, reads


_TABLES = ("certificates", "challenges", "audit", "pending_requests", "revocation_generation")


def _trace(engine) -> list[str]:
    """Every statement SQLAlchemy sends on `engine` from now on (a listener: the driver paths
    step aside while one is attached)."""
    from sqlalchemy import event
    listened: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda _c, _cur, statement, *_a: listened.append(statement))
    return listened


def _assert_statement_path(traced: bool, listened: list, unit_statements: list[str]) -> None:
    if traced:
        assert len(listened) >= 20  # the tracing tests see every statement
    else:
        # only the test's own inserts (the challenge, the pending request) went through SQLAlchemy
        assert [s for s in unit_statements if s not in ("SAVEPOINT", "RELEASE")] == ["INSERT", "INSERT"], \
            unit_statements


def _assert_same_both_ways(results: list, dumps: list) -> None:
    """The driver path and SQLAlchemy's answered and stored the same."""
    assert results[0] == results[1]
    assert dumps[0] == dumps[1]
    assert results[0][0] == [True, False, True, False, True, False, "not found", "Conflict"]


async def test_sqlite_unit_statements_on_the_driver_store_and_read_as_sqlalchemy_does(tmp_path, monkeypatch):
    """The store threads run the unit statements straight on the stdlib driver (no
    Connection.execute at all), unless something listens to the engine's statements: then
    SQLAlchemy runs them. Both store the same rows, byte for byte, and read the same records."""
    import sqlite3

    now = dt.datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=dt.timezone.utc)
    executed = helpers.statements_through_sqlalchemy(monkeypatch)

    results, dumps = [], []
    for traced in (False, True):
        path = tmp_path / f"{traced}.db"
        store = await SqlStore.open(f"sqlite+aiosqlite:///{path}")
        listened = _trace(store.sync_engines()[-1]) if traced else []
        try:
            writes, reads = _unit_statements(store, now)
            executed.clear()
            outcome = [await writes(), await store.read(reads)]
            unit_statements = list(executed)
        finally:
            await store.close()
        results.append(outcome)
        db = sqlite3.connect(path)
        dumps.append({t: db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
                      for t in _TABLES})
        db.close()
        _assert_statement_path(traced, listened, unit_statements)
    _assert_same_both_ways(results, dumps)


async def test_postgresql_unit_statements_on_asyncpg_store_and_read_as_sqlalchemy_does(postgres_cluster, monkeypatch):
    """On PostgreSQL the units' statements go straight to asyncpg (no Connection.execute),
    unless something listens to the engine's statements: then SQLAlchemy runs them. Both store
    the same rows and read the same records; a duplicate serial is still a Conflict, and the
    statements run in the unit's transaction (a raising unit leaves nothing)."""
    from scepd.store import AuditRecord, sql

    now = dt.datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=dt.timezone.utc)
    executed = helpers.statements_through_sqlalchemy(monkeypatch)

    results, dumps = [], []
    for traced in (False, True):
        store = await SqlStore.open(postgres_cluster.create_database(f"scepd_units_{traced}".lower()))
        listened = _trace(store.sync_engines()[0]) if traced else []
        try:
            writes, reads = _unit_statements(store, now)
            executed.clear()
            outcome = [await writes(), await store.read(reads)]
            unit_statements = list(executed)

            def boom(conn):
                sql.insert_audit(conn, AuditRecord(at=now, event="void", subject=None, serial=None, actor=None,
                                                   details={}))
                raise RuntimeError("void")
            with pytest.raises(RuntimeError):
                await store.write(boom)

            def dump(conn):
                return {t: [tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {t} ORDER BY 1"))]
                        for t in _TABLES}
            dumps.append(await store.read(dump))
        finally:
            await store.close()
        results.append(outcome)
        _assert_statement_path(traced, listened, unit_statements)
    _assert_same_both_ways(results, dumps)
    assert not [row for row in dumps[0]["audit"] if "void" in row]


async def test_postgresql_connections_killed_under_the_pool_cost_no_unit(postgres_cluster):
    """Every pooled connection's backend is terminated (a database restart, a failover): the
    next units are answered as if nothing happened, since each checkout pings (one round trip)
    and replaces a dead connection."""
    store = await SqlStore.open(postgres_cluster.create_database("scepd_units_killed"))
    try:
        ids = await asyncio.gather(*(store.write(_insert(f"{i:064x}")) for i in range(4)))
        admin = await SqlStore.open(postgres_cluster.create_database("scepd_units_killer"))
        try:
            killed = await admin.read(lambda conn: conn.execute(sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = 'scepd_units_killed'")).scalar_one())
        finally:
            await admin.close()
        assert killed >= 1
        counts = await asyncio.gather(*(store.read(_count) for _ in range(6)))
        assert counts == [4] * 6
        assert await store.write(_insert("f" * 64)) > max(ids)
    finally:
        await store.close()


async def test_sqlite_units_finished_together_wake_the_loop_once(tmp_path, monkeypatch):
    """Issue 13: units the store threads finish while the event loop is busy are handed back
    with one loop wake-up (call_soon_threadsafe) for all of them, not one each (before: one
    self-pipe write and read, and a future chained across threads, per unit); every caller
    still gets its own result or error, and a unit whose caller was cancelled before it
    started never runs."""
    from scepd.store.sql import _SqliteUnits

    monkeypatch.setattr(_SqliteUnits, "READERS", 1)  # each lane one thread: its units in order
    store = await SqlStore.open(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    try:
        await store.read(_count)
        await store.write(_count)  # both store threads are up
        loop = asyncio.get_running_loop()
        n, ran = 12, []

        def unit(i):
            def run(conn):
                ran.append(i)
                if i == 3:
                    raise ValueError("three")
                return i
            return run
        started = [threading.Event(), threading.Event()]
        release = threading.Event()

        def marker(k):  # queued after the counted units: once it runs, they are all handed back
            def run(conn):
                started[k].set()
                release.wait(10)
            return run
        wakeups = []
        real = loop.call_soon_threadsafe

        def counting(*args, **kwargs):
            wakeups.append(1)
            return real(*args, **kwargs)
        loop.call_soon_threadsafe = counting
        try:
            tasks = [asyncio.ensure_future(store.read(unit(i))) for i in range(n - 2)] + \
                [asyncio.ensure_future(store.write(unit(i))) for i in (n - 2, n - 1)]
            markers = [asyncio.ensure_future(store.read(marker(0))), asyncio.ensure_future(store.write(marker(1)))]
            await asyncio.sleep(0)  # every task handed its unit to the store threads
            # the loop blocks meanwhile: every counted unit finishes and is handed back before it looks
            assert started[0].wait(10) and started[1].wait(10)
            handed_back = len(wakeups)
            release.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*markers)
        finally:
            release.set()
            del loop.call_soon_threadsafe
        assert sorted(ran) == list(range(n))
        assert [r for i, r in enumerate(results) if i != 3] == [i for i in range(n) if i != 3]
        assert isinstance(results[3], ValueError)
        assert handed_back <= 2, handed_back  # one per store thread (reader, writer), not one per unit

        blocker, go = threading.Event(), threading.Event()
        first = asyncio.ensure_future(store.write(lambda conn: (blocker.set(), go.wait(10))))
        await asyncio.sleep(0)
        assert blocker.wait(10)  # the writer is busy: the next write waits in its queue
        skipped = asyncio.ensure_future(store.write(lambda conn: ran.append("cancelled")))
        await asyncio.sleep(0)
        skipped.cancel()
        go.set()
        await first
        assert await store.write(lambda conn: "after") == "after"
        assert "cancelled" not in ran and skipped.cancelled()
    finally:
        await store.close()


async def test_a_postgresql_read_unit_reads_one_snapshot_and_writes_nothing(postgres_cluster):
    """A read unit's statements see one snapshot, as on SQLite: a row committed by another
    connection between two of its statements is not seen by the second. And it is read-only."""
    from sqlalchemy.util import await_only

    store = await SqlStore.open(postgres_cluster.create_database("scepd_units_snapshot"))
    try:
        await store.write(_insert("a" * 64))

        def unit(conn):
            before = _count(conn)
            await_only(store.write(_insert("b" * 64)))  # another connection commits meanwhile
            return before, _count(conn)
        assert await store.read(unit) == (1, 1)
        assert await store.read(_count) == 2
        with pytest.raises(sa.exc.DBAPIError, match="read-only"):
            await store.read(_insert("c" * 64))
    finally:
        await store.close()
