"""ACME storage: accounts, orders, authorizations, challenges, nonces (component "acme")."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets

import sqlalchemy as sa
import sqlalchemy.exc  # noqa: F401

from scepd.store import SqlStore
from scepd.store.sql import _aware, _naive, certificates, execute

metadata = sa.MetaData()

accounts = sa.Table(
    "acme_accounts", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("thumbprint", sa.String(64), nullable=False, unique=True),
    sa.Column("jwk", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("contact", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
)
orders = sa.Table(
    "acme_orders", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("account_id", sa.String(32), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # pending | processing | valid | invalid
    sa.Column("identifiers", sa.Text, nullable=False),
    sa.Column("expires", sa.DateTime, nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("cert_serial", sa.String(64)),
    sa.Column("created_at", sa.DateTime, nullable=False),
    # v4: draft-ietf-acme-profiles and RFC 8555 §7.4 notBefore/notAfter
    sa.Column("profile", sa.String(32)),
    sa.Column("not_before", sa.DateTime),
    sa.Column("not_after", sa.DateTime),
    sa.Column("processing_at", sa.DateTime),  # v4: when finalize started the issuance
    sa.Index("ix_acme_orders_account", "account_id"),
    sa.Index("ix_acme_orders_account_created", "account_id", "created_at", "id"),  # v4: pagination
    sa.Index("ix_acme_orders_serial", "cert_serial"),
)
authzs = sa.Table(
    "acme_authzs", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("order_id", sa.String(32), nullable=False),
    sa.Column("account_id", sa.String(32), nullable=False),
    sa.Column("type", sa.String(8), nullable=False),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # pending | valid | invalid | deactivated
    sa.Column("expires", sa.DateTime, nullable=False),  # pending: the order's; valid: 30 days on
    sa.Column("wildcard", sa.Boolean),  # v4: the order named *.value (dns-01 only)
    sa.Index("ix_acme_authzs_order", "order_id"),
    sa.Index("ix_acme_authzs_account_value", "account_id", "value"),
)
challenges = sa.Table(
    "acme_challenges", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("authz_id", sa.String(32), nullable=False),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("token", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # pending | processing | valid | invalid
    sa.Column("validated", sa.DateTime),
    sa.Column("error", sa.Text),
    sa.Index("ix_acme_challenges_authz", "authz_id"),
)
nonces = sa.Table(
    "acme_nonces", metadata,
    sa.Column("value", sa.String(64), primary_key=True),
    sa.Column("expires_at", sa.DateTime, nullable=False),
    sa.Index("ix_acme_nonces_expires", "expires_at"),
)  # v1-v4 stored every issued nonce; since v5 unused (nonces are stateless until redeemed)

#: v5: the ids of redeemed nonces, until they expire (the primary key refuses a replay)
used_nonces = sa.Table(
    "acme_used_nonces", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("expires_at", sa.DateTime, nullable=False),
    sa.Index("ix_acme_used_nonces_expires", "expires_at"),
)
#: v5: the HMAC key nonces are signed with; one row, created by the first replica to need it
nonce_keys = sa.Table(
    "acme_nonce_keys", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("key", sa.String(128), nullable=False),
)

#: ARI (RFC 9773): each certificate is replaced at most once (the primary key enforces it)
replacements = sa.Table(
    "acme_replacements", metadata,
    sa.Column("replaced_serial", sa.String(64), primary_key=True),
    sa.Column("order_id", sa.String(32), nullable=False),
    sa.Column("account_id", sa.String(32), nullable=False),
)
#: `scepd certs renew-now SERIAL`: the ARI window of these certificates lies in the past
renew_now = sa.Table(
    "acme_renew_now", metadata,
    sa.Column("serial", sa.String(64), primary_key=True),
    sa.Column("at", sa.DateTime, nullable=False),
)

#: External account binding keys (`scepd eab create`): single use. The HMAC key must be kept to
#: verify the binding, so it is erased (set to "") the moment an account is bound with it.
eab_keys = sa.Table(
    "acme_eab_keys", metadata,
    sa.Column("kid", sa.String(64), primary_key=True),
    sa.Column("hmac_key", sa.String(128), nullable=False),
    sa.Column("identifiers", sa.Text),  # shell pattern the bound account may order, or NULL
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("expires_at", sa.DateTime, nullable=False),
    sa.Column("account_id", sa.String(32)),
    sa.Column("used_at", sa.DateTime),
    sa.Index("ix_acme_eab_account", "account_id"),
)

def _add_missing_columns(*tables: sa.Table):
    """A migration step adding the columns (and indexes) a table gained after it was first
    created; a fresh database got them with the table and is left alone."""
    def step(conn: sa.Connection) -> None:
        inspector = sa.inspect(conn)
        for table in tables:
            have = {c["name"] for c in inspector.get_columns(table.name)}
            for col in table.columns:
                if col.name not in have:
                    ddl = col.type.compile(dialect=conn.dialect)
                    conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {col.name} {ddl}"))
            indexes = {i["name"] for i in inspector.get_indexes(table.name)}
            for index in table.indexes:
                if index.name not in indexes:
                    index.create(conn)
    return step


#: component "acme" (applied from the ordered list of every migration, scepd.http.assembly.migrations)
MIGRATIONS = [(1, [accounts, orders, authzs, challenges, nonces]),
              (2, [replacements, renew_now]),
              (3, [eab_keys]),
              (4, _add_missing_columns(orders, authzs)),
              (5, [used_nonces, nonce_keys])]


def _row(row) -> dict:
    out = dict(row._mapping)
    for k, v in list(out.items()):
        if isinstance(v, dt.datetime):
            out[k] = _aware(v)
    return out


# --- prebuilt statements for the request paths ------------------------------------------------
# Built once and executed with parameter dicts inside `SqlStore.read`/`write` units: no per-call
# statement construction or cache-key work. Each unit below is a plain function of a synchronous
# connection, the same on SQLite and PostgreSQL.
_p = sa.bindparam
#: an account with its EAB binding (the key that bound it at creation, never changed after):
#: whether it is bound and the identifier pattern it may order, in the same statement
_ACCOUNT_COLUMNS = sa.select(accounts, eab_keys.c.kid.label("eab_kid"),
                             eab_keys.c.identifiers.label("eab_identifiers")).select_from(
    accounts.outerjoin(eab_keys, eab_keys.c.account_id == accounts.c.id))
_ACCOUNT_BY_ID = _ACCOUNT_COLUMNS.where(accounts.c.id == _p("id"))
_ACCOUNT_BY_TP = _ACCOUNT_COLUMNS.where(accounts.c.thumbprint == _p("tp"))
_ORDER_BY_ID = sa.select(orders).where(orders.c.id == _p("id"))
_AUTHZS_OF_ORDER = sa.select(authzs).where(authzs.c.order_id == _p("order_id"))
_AUTHZ_BY_ID = sa.select(authzs).where(authzs.c.id == _p("id"))
_CHALLENGES_OF_AUTHZ = sa.select(challenges).where(challenges.c.authz_id == _p("authz_id"))
_SIBLING_CHALLENGES = sa.select(challenges).where(challenges.c.authz_id == sa.select(challenges.c.authz_id).where(
    challenges.c.id == _p("id")).scalar_subquery())
_ORDER_OF_SERIAL = sa.select(orders.c.id, orders.c.account_id, orders.c.identifiers).where(
    orders.c.cert_serial == _p("serial"))
_REPLACED = sa.select(replacements.c.order_id).where(replacements.c.replaced_serial == _p("serial"))
_NONCE_INSERT = used_nonces.insert()
_NONCE_PRUNE = used_nonces.delete().where(used_nonces.c.expires_at < _p("before"))
_ORDER_INSERT, _AUTHZ_INSERT, _CHALLENGE_INSERT = orders.insert(), authzs.insert(), challenges.insert()
_REPLACEMENT_INSERT = replacements.insert()
_CHALLENGE_START = challenges.update().where(challenges.c.id == _p("cid"), challenges.c.status == "pending").values(
    status="processing")
_CHALLENGE_SETTLE = challenges.update().where(challenges.c.id == _p("cid"), challenges.c.status == "processing").values(
    status=_p("status"), validated=_p("validated"), error=_p("error"))
_AUTHZ_SETTLE = authzs.update().where(authzs.c.id == _p("aid"), authzs.c.status == "pending").values(
    status=_p("status"), expires=_p("expires"))
_ORDER_START = orders.update().where(orders.c.id == _p("oid"), orders.c.status == "pending").values(
    status="processing", processing_at=_p("at"))
_ORDER_ISSUED = orders.update().where(orders.c.id == _p("oid")).values(status="valid", cert_serial=_p("serial"))


def _one(conn: sa.Connection, stmt, params: dict) -> dict | None:
    row = execute(conn, stmt, params).first()
    return None if row is None else _row(row)


def _all(conn: sa.Connection, stmt, params: dict) -> list[dict]:
    return [_row(r) for r in execute(conn, stmt, params).all()]


class NonceUsed(Exception):
    """Raised inside a write unit: the nonce was redeemed before (the unit rolls back)."""


def spend_nonce(conn: sa.Connection, nonce_id: str, expires_at: dt.datetime, prune_before: dt.datetime | None) -> None:
    """Record a (verified, unexpired) nonce as used: the first statement of the request's write
    unit; NonceUsed if its id is recorded already (the primary key refuses the replay, across
    processes). `prune_before`: also drop the records that expired before then."""
    try:
        execute(conn, _NONCE_INSERT, {"id": nonce_id, "expires_at": _naive(expires_at)})
    except sa.exc.IntegrityError:
        raise NonceUsed() from None
    if prune_before is not None:
        execute(conn, _NONCE_PRUNE, {"before": _naive(prune_before)})


def account_by_id(conn: sa.Connection, account_id: str) -> dict | None:
    return _one(conn, _ACCOUNT_BY_ID, {"id": account_id})


def account_by_thumbprint(conn: sa.Connection, tp: str) -> dict | None:
    return _one(conn, _ACCOUNT_BY_TP, {"tp": tp})


def order_with_authzs(conn: sa.Connection, order_id: str) -> tuple[dict | None, list[dict]]:
    order = _one(conn, _ORDER_BY_ID, {"id": order_id})
    return (None, []) if order is None else (order, _all(conn, _AUTHZS_OF_ORDER, {"order_id": order_id}))


def authz_with_challenges(conn: sa.Connection, authz_id: str) -> tuple[dict | None, list[dict]]:
    a = _one(conn, _AUTHZ_BY_ID, {"id": authz_id})
    return (None, []) if a is None else (a, _all(conn, _CHALLENGES_OF_AUTHZ, {"authz_id": authz_id}))


def challenge_view(conn: sa.Connection, challenge_id: str) -> tuple[dict | None, dict | None, list[dict]]:
    """A challenge, its authorization and the authorization's challenges (two statements: the
    challenges are read as the authorization's, by the challenge's authz_id)."""
    chs = _all(conn, _SIBLING_CHALLENGES, {"id": challenge_id})
    ch = next((c for c in chs if c["id"] == challenge_id), None)
    if ch is None:
        return None, None, []
    return ch, _one(conn, _AUTHZ_BY_ID, {"id": ch["authz_id"]}), chs


def order_of_serial(conn: sa.Connection, serial: str) -> dict | None:
    return _one(conn, _ORDER_OF_SERIAL, {"serial": serial})


_CERT_DER = sa.select(certificates.c.der).where(certificates.c.serial == _p("serial"))


def certificate_der(conn: sa.Connection, serial: str) -> bytes | None:
    row = execute(conn, _CERT_DER, {"serial": serial}).first()
    return None if row is None else bytes(row._mapping["der"])


def is_replaced(conn: sa.Connection, serial: str) -> bool:
    return execute(conn, _REPLACED, {"serial": serial}).first() is not None


def insert_order(conn: sa.Connection, order: dict, authz_rows: list[dict], challenge_rows: list[dict],
                 replacement: dict | None) -> None:
    """IntegrityError (the unit rolls back) if `replacement` names an already replaced certificate."""
    if replacement is not None:
        execute(conn, _REPLACEMENT_INSERT, replacement)
    execute(conn, _ORDER_INSERT, _naive_values(order))
    execute(conn, _AUTHZ_INSERT, [_naive_values(a) for a in authz_rows])
    if challenge_rows:
        execute(conn, _CHALLENGE_INSERT, [_naive_values(c) for c in challenge_rows])


def start_challenge(conn: sa.Connection, challenge_id: str) -> bool:
    return execute(conn, _CHALLENGE_START, {"cid": challenge_id}).rowcount == 1


def settle_challenge(conn: sa.Connection, challenge_id: str, authz_id: str, valid: bool, now: dt.datetime,
                     error: dict | None, authz_expires: dt.datetime) -> bool:
    """A validation's outcome on challenge and authorization together (never a valid challenge
    under a pending authorization). Only a challenge still `processing` takes an outcome: a
    duplicate validation (a restarted primary worker resuming one another worker still runs)
    records nothing and returns False."""
    if execute(conn, _CHALLENGE_SETTLE, {"cid": challenge_id, "status": "valid" if valid else "invalid",
                                         "validated": _naive(now),
                                         "error": None if error is None else json.dumps(error)}).rowcount != 1:
        return False
    execute(conn, _AUTHZ_SETTLE, {"aid": authz_id, "status": "valid" if valid else "invalid",
                                  "expires": _naive(authz_expires)})
    return True


def start_order(conn: sa.Connection, order_id: str, now: dt.datetime) -> bool:
    return execute(conn, _ORDER_START, {"oid": order_id, "at": _naive(now)}).rowcount == 1


def order_issued(conn: sa.Connection, order_id: str, serial: str) -> None:
    execute(conn, _ORDER_ISSUED, {"oid": order_id, "serial": serial})


class WriteBatcher:
    """Group commit for ACME's write units. SQLite commits one fsync at a time (synchronous=FULL:
    several milliseconds on real disks), so write units run one by one cap a process at a few
    hundred requests a second whatever the CPU. Units submitted while one commits are queued
    and run together in the next transaction. Every caller's unit is committed before its
    `write` returns, as before, and a unit that raises (a replayed nonce, a unique key) fails
    alone: the batch is then rolled back and run again with each unit in a SAVEPOINT of its
    own, so the failing one rolls back by itself and the others commit. A unit arriving when
    nothing commits runs at once, alone."""

    MAX_BATCH = 64

    def __init__(self, store: SqlStore):
        self.store = store
        self._queue: list[tuple] = []
        self._task: asyncio.Task | None = None

    async def write(self, fn):
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((fn, fut))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        batch: list[tuple] = []
        try:
            while self._queue:
                batch, self._queue = self._queue[:self.MAX_BATCH], self._queue[self.MAX_BATCH:]
                units = [fn for fn, _ in batch]
                try:
                    if len(units) == 1:  # alone: the unit is the transaction
                        results = [(True, await self.store.write(units[0]))]
                    else:
                        try:
                            values = await self.store.write(lambda conn: _run_all(conn, units))
                            results = [(True, v) for v in values]
                        except _UnitFailed:  # rolled back: again, each unit in a savepoint
                            results = await self.store.write(lambda conn: _run_isolated(conn, units))
                except Exception as exc:  # the unit (alone) or the transaction failed
                    results = [(False, exc)] * len(batch)
                for (_, fut), (ok, value) in zip(batch, results):
                    if not fut.done():
                        fut.set_result(value) if ok else fut.set_exception(value)
        finally:
            self._task = None
            for _, fut in batch + self._queue:  # only when cancelled (shutdown)
                if not fut.done():
                    fut.cancel()
            self._queue = []


class _UnitFailed(Exception):
    """A unit of a batch raised: the batch's transaction is rolled back and run isolated."""


def _run_all(conn: sa.Connection, units: list) -> list:
    out = []
    for fn in units:
        try:
            out.append(fn(conn))
        except Exception as exc:
            raise _UnitFailed() from exc
    return out


def _run_isolated(conn: sa.Connection, units: list) -> list[tuple[bool, object]]:
    out: list[tuple[bool, object]] = []
    for fn in units:
        savepoint = conn.begin_nested()
        try:
            value = fn(conn)
        except Exception as exc:
            savepoint.rollback()
            out.append((False, exc))
        else:
            savepoint.commit()
            out.append((True, value))
    return out


class AcmeStore:
    def __init__(self, store: SqlStore):
        self.store = store

    # --- nonces: single use, expire, shared by every replica on the database ------------------

    async def nonce_key(self) -> bytes:
        """The nonce HMAC key every replica on this database shares: read once, created (one
        insert) by whichever process needs it first."""
        async with self.store.engine.connect() as conn:
            row = (await conn.execute(sa.select(nonce_keys.c.key).where(nonce_keys.c.id == 1))).first()
        if row is None:
            try:
                async with self.store.transaction() as tx:
                    await tx.connection.execute(nonce_keys.insert().values(id=1, key=secrets.token_hex(32)))
            except sa.exc.IntegrityError:  # another replica created it meanwhile
                pass
            async with self.store.engine.connect() as conn:
                row = (await conn.execute(sa.select(nonce_keys.c.key).where(nonce_keys.c.id == 1))).first()
        return bytes.fromhex(row[0])

    # --- generic helpers --------------------------------------------------------------------------

    async def insert(self, table: sa.Table, **values) -> None:
        async with self.store.transaction() as tx:
            await tx.connection.execute(table.insert().values(**_naive_values(values)))

    async def update(self, table: sa.Table, key: str, where: dict | None = None, **values) -> bool:
        q = table.update().where(table.c.id == key)
        for col, val in (where or {}).items():
            q = q.where(table.c[col] == val)
        async with self.store.transaction() as tx:
            result = await tx.connection.execute(q.values(**_naive_values(values)))
        return result.rowcount == 1

    async def get(self, table: sa.Table, key: str) -> dict | None:
        async with self.store.engine.connect() as conn:
            row = (await conn.execute(sa.select(table).where(table.c.id == key))).first()
        return None if row is None else _row(row)

    async def find(self, table: sa.Table, **where) -> list[dict]:
        q = sa.select(table)
        for col, val in where.items():
            q = q.where(table.c[col] == val)
        async with self.store.engine.connect() as conn:
            rows = (await conn.execute(q)).all()
        return [_row(r) for r in rows]

    async def orders_page(self, account_id: str, after: str | None, limit: int) -> list[dict] | None:
        """The account's orders by (created_at, id), `limit` + 1 rows after the cursor (an order
        id of this account); None if the cursor is not one."""
        q = sa.select(orders.c.id, orders.c.status, orders.c.created_at, orders.c.expires).where(
            orders.c.account_id == account_id)
        async with self.store.engine.connect() as conn:
            if after:
                cur = (await conn.execute(sa.select(orders.c.created_at).where(
                    orders.c.id == after, orders.c.account_id == account_id))).first()
                if cur is None:
                    return None
                q = q.where(sa.or_(orders.c.created_at > cur[0],
                                   sa.and_(orders.c.created_at == cur[0], orders.c.id > after)))
            rows = (await conn.execute(q.order_by(orders.c.created_at, orders.c.id).limit(limit + 1))).all()
        return [_row(r) for r in rows]

    async def account_by_thumbprint(self, tp: str) -> dict | None:
        return await self.store.read(lambda conn: account_by_thumbprint(conn, tp))

    async def get_eab(self, kid: str) -> dict | None:
        async with self.store.engine.connect() as conn:
            row = (await conn.execute(sa.select(eab_keys).where(eab_keys.c.kid == kid))).first()
        return None if row is None else _row(row)

    async def get_renew_now(self, serial: str) -> bool:
        async with self.store.engine.connect() as conn:
            return (await conn.execute(sa.select(renew_now.c.serial).where(
                renew_now.c.serial == serial))).first() is not None

    async def set_renew_now(self, serial: str, at: dt.datetime) -> None:
        if await self.get_renew_now(serial):
            return
        try:
            async with self.store.transaction() as tx:
                await tx.connection.execute(renew_now.insert().values(serial=serial, at=_naive(at)))
        except sa.exc.IntegrityError:
            pass


def _naive_values(values: dict) -> dict:
    out = {}
    for k, v in values.items():
        if isinstance(v, dt.datetime):
            v = _naive(v)
        elif isinstance(v, (dict, list)):
            v = json.dumps(v)
        out[k] = v
    return out
