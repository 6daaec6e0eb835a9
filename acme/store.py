"""ACME storage: accounts, orders, authorizations, challenges, nonces (component "acme")."""
from __future__ import annotations

import datetime as dt
import json
import secrets

import sqlalchemy as sa
import sqlalchemy.exc  # noqa: F401

from scepd.store import Conflict, SqlStore
from scepd.store.sql import _aware, _naive

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

    async def redeem_nonce(self, nonce_id: str, expires_at: dt.datetime, prune_before: dt.datetime | None,
                           account_id: str | None = None) -> tuple[bool, dict | None]:
        """Record a (verified, unexpired) nonce as used: one insert; (False, None) if it was used
        before. `prune_before`: also drop the records that expired before then (indexed range
        delete). `account_id`: the account row too, read in the same transaction (a request
        signed with a kid needs it next; this saves it a connection of its own)."""
        account = None
        try:
            async with self.store.transaction() as tx:
                c = tx.connection
                await c.execute(used_nonces.insert().values(id=nonce_id, expires_at=_naive(expires_at)))
                if prune_before is not None:
                    await c.execute(used_nonces.delete().where(used_nonces.c.expires_at < _naive(prune_before)))
                if account_id is not None:
                    row = (await c.execute(sa.select(accounts).where(accounts.c.id == account_id))).first()
                    account = None if row is None else _row(row)
        except sa.exc.IntegrityError:
            return False, None
        return True, account

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

    async def get_with_children(self, table: sa.Table, key: str, child: sa.Table,
                                fk: str) -> tuple[dict | None, list[dict]]:
        """A row and the rows of `child` whose `fk` names it (an order and its authorizations, an
        authorization and its challenges), through one connection."""
        async with self.store.engine.connect() as conn:
            row = (await conn.execute(sa.select(table).where(table.c.id == key))).first()
            if row is None:
                return None, []
            rows = (await conn.execute(sa.select(child).where(child.c[fk] == key))).all()
        return _row(row), [_row(r) for r in rows]

    async def update_together(self, *updates: tuple[sa.Table, str, dict | None, dict]) -> list[bool]:
        """Several `update`s (table, key, where, values) in one transaction: all or none."""
        done = []
        async with self.store.transaction() as tx:
            for table, key, where, values in updates:
                q = table.update().where(table.c.id == key)
                for col, val in (where or {}).items():
                    q = q.where(table.c[col] == val)
                done.append((await tx.connection.execute(q.values(**_naive_values(values)))).rowcount == 1)
        return done

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
        found = await self.find(accounts, thumbprint=tp)
        return found[0] if found else None

    async def create_order(self, order: dict, authz_rows: list[dict], challenge_rows: list[dict],
                           replacement: dict | None = None) -> bool:
        """False (and nothing written) if `replacement` names an already replaced certificate."""
        try:
            async with self.store.transaction() as tx:
                c = tx.connection
                if replacement is not None:
                    await c.execute(replacements.insert().values(**replacement))
                await c.execute(orders.insert().values(**_naive_values(order)))
                for a in authz_rows:
                    await c.execute(authzs.insert().values(**_naive_values(a)))
                for ch in challenge_rows:
                    await c.execute(challenges.insert().values(**_naive_values(ch)))
        except sa.exc.IntegrityError:
            return False
        return True

    async def create_account(self, account: dict) -> None:
        """Conflict if an account with this key (thumbprint) exists: a concurrent newAccount won."""
        try:
            await self.insert(accounts, **account)
        except sa.exc.IntegrityError:
            raise Conflict("an account with this key exists") from None

    async def create_account_bound(self, account: dict, eab_kid: str, now: dt.datetime) -> bool:
        """Insert the account and spend its EAB key in one transaction; False if the key was
        used meanwhile (single use under concurrency); Conflict (and the key unspent) if an
        account with this key exists."""
        try:
            async with self.store.transaction() as tx:
                c = tx.connection
                result = await c.execute(eab_keys.update().where(
                    eab_keys.c.kid == eab_kid, eab_keys.c.used_at.is_(None),
                    eab_keys.c.expires_at > _naive(now))
                    .values(used_at=_naive(now), account_id=account["id"], hmac_key=""))
                if result.rowcount != 1:
                    raise _Spent()
                await c.execute(accounts.insert().values(**_naive_values(account)))
        except _Spent:
            return False
        except sa.exc.IntegrityError:
            raise Conflict("an account with this key exists") from None
        return True

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


class _Spent(Exception):
    """Aborts the binding transaction: the EAB key was used or expired meanwhile."""
