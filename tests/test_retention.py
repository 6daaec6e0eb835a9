"""Retention (issue 15): expired nonces, ACME orders with their authorizations and challenges,
stale and decided pending requests and spent challenges are purged on a schedule and counted;
certificates and audit rows never are."""
from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from acme import store as acme_store
from scepd.config import ConfigError, RetentionConfig
from scepd.ops import retention as retention_mod
from scepd.ops.retention import RetentionSettings
from scepd.store import PendingRecord
from scepd.store.sql import _naive, audit, certificates, challenges, pending_requests

from .helpers import rsa_key
from .test_revocation_tls import _issue

DAY = dt.timedelta(days=1)


def _count(table):
    return lambda conn: int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


async def _pending(services, txn: str, created: dt.datetime) -> int:
    rec = PendingRecord(id=0, transaction_id=txn, spki_sha256="a" * 64, signer_spki_sha256="a" * 64,
                        csr_der=b"x", subject=f"CN={txn}", profile="device", protocol="scep",
                        requester=None, created_at=created)
    async with services.store.transaction() as tx:
        return await tx.insert_pending(rec)


def _acme_order(conn, oid: str, now: dt.datetime, expires: dt.datetime, status: str, authz_expires: dt.datetime):
    conn.execute(acme_store.orders.insert(), dict(id=oid, account_id="acct", status=status, identifiers="[]",
                                                  expires=_naive(expires), created_at=_naive(now)))
    conn.execute(acme_store.authzs.insert(), dict(id=f"a-{oid}", order_id=oid, account_id="acct", type="dns",
                                                  value="x.example", status="valid",
                                                  expires=_naive(authz_expires)))
    conn.execute(acme_store.challenges.insert(), dict(id=f"c-{oid}", authz_id=f"a-{oid}", type="http-01",
                                                      token="t" * 43, status="valid"))


async def test_expired_rows_go_and_certificates_and_audit_stay(services):
    clock, store = services.clock, services.store
    start = clock.now()
    # challenges: one spent, one expired unused, one still usable
    spent = await services.challenges.create(dt.timedelta(days=400))
    await services.challenges.create(dt.timedelta(hours=1))
    fresh = await services.challenges.create(dt.timedelta(days=400))
    from scepd.enroll.challenges import secret_hash
    spent_id = (await store.find_challenge(secret_hash(spent))).id
    async with store.transaction() as tx:
        assert await tx.consume_challenge(spent_id, start, "00ff")
    # pending: one decided, one never decided, one recent
    decided = await _pending(services, "decided", start)
    async with store.transaction() as tx:
        assert await tx.decide_pending(decided, "rejected", start, "admin", reason="no")
    await _pending(services, "stale", start)
    issued = [await _issue(services, f"keep-{i}", rsa_key(i)) for i in range(2)]
    # ACME: an old order (its authorization expired), a processing one, a recent one
    old_exp = start + 7 * DAY
    await store.write(lambda c: _acme_order(c, "old", start, old_exp, "valid", start + 30 * DAY))
    await store.write(lambda c: _acme_order(c, "busy", start, old_exp, "processing", start + 30 * DAY))

    clock.advance(100 * DAY)
    now = clock.now()
    await _pending(services, "recent", now)
    await store.write(lambda c: _acme_order(c, "new", now, now + 7 * DAY, "pending", now + 7 * DAY))
    await store.write(lambda c: c.execute(acme_store.used_nonces.insert(), [
        dict(id=f"n{i}", expires_at=_naive(now - dt.timedelta(minutes=1))) for i in range(3)] + [
        dict(id="live", expires_at=_naive(now + dt.timedelta(hours=1)))]))
    audit_before = await store.read(_count(audit))

    seen = []
    services.retention.listeners.append(lambda kind, n: seen.append((kind, n)))
    done = await services.retention.run_once()
    assert done == {"challenges": 2, "pending_requests": 2, "acme_nonces": 3, "acme_orders": 1}
    assert sorted(seen) == sorted(done.items())
    # what stays
    assert await store.find_challenge(secret_hash(fresh)) is not None
    assert await store.read(_count(challenges)) == 1
    left = await store.read(lambda c: sorted(r[0] for r in c.execute(sa.select(pending_requests.c.transaction_id))))
    assert left == ["recent"]
    orders_left = await store.read(lambda c: sorted(r[0] for r in c.execute(sa.select(acme_store.orders.c.id))))
    assert orders_left == ["busy", "new"]
    authz_left = await store.read(lambda c: sorted(r[0] for r in c.execute(sa.select(acme_store.authzs.c.id))))
    assert authz_left == ["a-busy", "a-new"]
    assert await store.read(_count(acme_store.challenges)) == 2
    assert await store.read(lambda c: [r[0] for r in c.execute(sa.select(acme_store.used_nonces.c.id))]) == ["live"]
    # certificates never; audit rows only grow (the stale request and the run itself)
    assert await store.read(_count(certificates)) == len(issued)
    events = await store.read(lambda c: [r[0] for r in c.execute(sa.select(audit.c.event).order_by(audit.c.id))])
    assert await store.read(_count(audit)) == audit_before + 2
    assert events[-2:] == ["request.expired", "retention.purged"]
    # counted in /metrics
    text = (await services.metrics.render()).decode()
    assert 'scepd_retention_purged_total{kind="acme_nonces"} 3.0' in text
    assert 'scepd_retention_purged_total{kind="challenges"} 2.0' in text
    # a second run finds nothing
    assert await services.retention.run_once() == {}


async def test_a_large_backlog_is_purged_in_bounded_batches(services, monkeypatch):
    monkeypatch.setattr(retention_mod, "BATCH", 10)
    monkeypatch.setattr("acme.retention.BATCH", 10)
    now = services.clock.now()
    await services.store.write(lambda c: c.execute(acme_store.used_nonces.insert(), [
        dict(id=f"n{i}", expires_at=_naive(now - DAY)) for i in range(35)]))
    statements = []
    original = services.store.write

    async def counting(fn):
        statements.append(fn)
        return await original(fn)
    monkeypatch.setattr(services.store, "write", counting)
    done = await services.retention.run_once()
    assert done["acme_nonces"] == 35
    assert len(statements) >= 4  # 10 + 10 + 10 + 5: one short transaction each, not one long one


def test_settings():
    s = RetentionSettings.from_config(RetentionConfig())
    assert s.interval == dt.timedelta(hours=1) and s.ages["acme_orders"] == 30 * DAY
    assert RetentionSettings.from_config(RetentionConfig(interval="0")).interval is None
    with pytest.raises(ConfigError):
        RetentionSettings.from_config(RetentionConfig(pending_requests="0"))
    with pytest.raises(ConfigError):
        RetentionSettings.from_config(RetentionConfig(spent_challenges="soon"))


async def test_the_schedule_runs_in_the_primary_only(make_services):
    import asyncio

    from scepd.http.app import create_app
    services = await make_services({"SCEPD_RETENTION_INTERVAL": "1h"})
    assert len(create_app(services).cleanup_ctx) == 1
    off = await make_services({"SCEPD_RETENTION_INTERVAL": "0"})
    assert len(create_app(off).cleanup_ctx) == 0
    # each run asks whether this process is the primary now (a reload moves the role)
    runs = []

    async def run_once():
        runs.append(1)
        return {}
    services.retention.run_once = run_once
    services.retention.settings = RetentionSettings(dt.timedelta(milliseconds=1), services.retention.settings.ages)
    stop = asyncio.Event()
    primary = {"now": False}
    task = asyncio.create_task(services.retention.run_forever(stop, lambda: primary["now"]))
    for _ in range(20):
        await asyncio.sleep(0.005)
    assert runs == []
    primary["now"] = True
    for _ in range(200):
        await asyncio.sleep(0.005)
        if runs:
            break
    stop.set()
    await task
    assert runs
