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
