"""ACME's expired rows for scepd's retention schedule (scepd/ops/retention.py): redeemed nonces
once they have expired (a nonce past its expiry is refused without them), and orders expired
longer ago than `[retention] acme_orders` with their authorizations and challenges. An
authorization still valid (it authorizes revocation and new orders for 30 days) is kept."""
from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from scepd.ops.retention import BATCH, Purge
from scepd.store.sql import _naive

from .store import authzs, challenges, nonces, orders, used_nonces


def purge_nonces(conn: sa.Connection, now: dt.datetime, _age: dt.timedelta) -> int:
    deleted = 0
    for table, key in ((used_nonces, used_nonces.c.id), (nonces, nonces.c.value)):
        ids = [r[0] for r in conn.execute(sa.select(key).where(table.c.expires_at < _naive(now)).limit(BATCH))]
        if ids:
            conn.execute(table.delete().where(key.in_(ids)))
            deleted += len(ids)
    return deleted


def purge_orders(conn: sa.Connection, now: dt.datetime, age: dt.timedelta) -> int:
    o, a, c = orders.c, authzs.c, challenges.c
    ids = [r[0] for r in conn.execute(sa.select(o.id).where(
        o.expires < _naive(now - age), o.status != "processing").limit(BATCH))]
    if not ids:
        return 0
    gone = [r[0] for r in conn.execute(sa.select(a.id).where(a.order_id.in_(ids), a.expires < _naive(now)))]
    for chunk in range(0, len(gone), 500):
        part = gone[chunk:chunk + 500]
        conn.execute(challenges.delete().where(c.authz_id.in_(part)))
        conn.execute(authzs.delete().where(a.id.in_(part)))
    conn.execute(orders.delete().where(o.id.in_(ids)))
    return len(ids)


def purges() -> list[Purge]:
    return [Purge("acme_nonces", "", purge_nonces), Purge("acme_orders", "acme_orders", purge_orders)]
