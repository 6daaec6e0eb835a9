"""SQLAlchemy 2 Core store for SQLite (default) and PostgreSQL (asyncpg).

Every write is one database transaction, committed before the caller answers its client.
Timestamps are stored as naive UTC and returned aware.

Two ways in:
  * `read(fn)` / `write(fn)` -- the hot paths: `fn(connection)` is a plain synchronous function
    of SQLAlchemy Core statements, run as ONE unit: on SQLite in a database thread of the store
    (one hop for the whole unit; all writes of this process in one writer thread, BEGIN
    IMMEDIATE), on PostgreSQL through the async connection's `run_sync` (no thread at all;
    statements given to `execute` go straight to asyncpg). The same function serves both
    databases, so each rule is written once.
  * `transaction()` and the async per-statement methods below -- the older interface (aiosqlite
    on SQLite: one thread hop per statement), kept for callers off the hot paths.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import datetime as dt
import functools
import json
import queue
import sqlite3
import threading
from typing import AsyncIterator, Callable, Sequence, TypeVar

import sqlalchemy as sa
from asyncpg import exceptions as asyncpg_exceptions
from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.util import await_only

from .records import AuditRecord, CertificateRecord, ChallengeRecord, PendingRecord

T = TypeVar("T")


class StoreNotFound(LookupError):
    pass


class Conflict(Exception):
    """A uniqueness constraint refused the write (e.g. a serial number already used)."""


metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version", metadata,
    sa.Column("component", sa.String(32), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", sa.DateTime, nullable=False),
)

certificates = sa.Table(
    "certificates", metadata,
    sa.Column("serial", sa.String(64), primary_key=True),  # unique index: no serial is ever reused
    sa.Column("ca_id", sa.String(32), nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("sans", sa.Text, nullable=False),  # JSON list
    sa.Column("not_before", sa.DateTime, nullable=False),
    sa.Column("not_after", sa.DateTime, nullable=False),
    sa.Column("profile", sa.String(64), nullable=False),
    sa.Column("protocol", sa.String(16), nullable=False),
    sa.Column("transaction_id", sa.String(255)),
    sa.Column("requester", sa.Text),
    sa.Column("spki_sha256", sa.String(64), nullable=False),
    sa.Column("der", sa.LargeBinary, nullable=False),
    sa.Column("issued_at", sa.DateTime, nullable=False),
    sa.Column("status", sa.String(16), nullable=False, server_default="valid"),
    sa.Column("revoked_at", sa.DateTime),
    sa.Column("revocation_reason", sa.String(32)),
    sa.Index("ix_certificates_not_after", "not_after"),
    sa.Index("ix_certificates_txn", "transaction_id", "spki_sha256"),
    sa.Index("ix_certificates_subject", "subject"),
    sa.Index("ix_certificates_revoked", "ca_id", "status"),
)

challenges = sa.Table(
    "challenges", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("secret_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("cn_pattern", sa.Text),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("expires_at", sa.DateTime, nullable=False),
    sa.Column("used_at", sa.DateTime),
    sa.Column("used_by_serial", sa.String(64)),
    sa.Column("names", sa.Text),  # v3: JSON list of name patterns; NULL: cn_pattern (or any name)
    sa.Column("profile", sa.String(64)),  # v3: the profile the challenge grants
)

audit = sa.Table(
    "audit", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.DateTime, nullable=False),
    sa.Column("event", sa.String(64), nullable=False),
    sa.Column("subject", sa.Text),
    sa.Column("serial", sa.String(64)),
    sa.Column("actor", sa.Text),
    sa.Column("details", sa.Text, nullable=False),  # JSON object
    sa.Index("ix_audit_at", "at"),
)

pending_requests = sa.Table(
    "pending_requests", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("transaction_id", sa.String(255), nullable=False),
    sa.Column("spki_sha256", sa.String(64), nullable=False),
    sa.Column("signer_spki_sha256", sa.String(64), nullable=False),
    sa.Column("csr_der", sa.LargeBinary, nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("profile", sa.String(64), nullable=False),
    sa.Column("protocol", sa.String(16), nullable=False),
    sa.Column("requester", sa.Text),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("renewal_of", sa.String(64)),
    sa.Column("decided_at", sa.DateTime),
    sa.Column("decided_by", sa.Text),
    sa.Column("reason", sa.Text),
    sa.Column("serial", sa.String(64)),
    sa.UniqueConstraint("transaction_id", "spki_sha256", name="uq_pending_txn_key"),
    sa.Index("ix_pending_status", "status"),
)

#: v4: one row counting revocations, bumped in the transaction of each one, so readers (the CRL)
#: notice a change made by any process with one primary-key read instead of a COUNT
revocations = sa.Table(
    "revocation_generation", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("generation", sa.BigInteger, nullable=False),
)


def _create_revocation_generation(conn: sa.Connection) -> None:
    revocations.create(conn, checkfirst=True)
    if conn.execute(sa.select(revocations.c.id)).first() is None:
        conn.execute(revocations.insert().values(id=1, generation=0))


#: The condition of the partial index below, written as a literal in the queries meant to use it.
VALID = sa.literal_column("'valid'")


def _create_valid_expiry_index(conn: sa.Connection) -> None:
    """v5: valid certificates by expiry, a partial index. Serves `certs list --expiring-within`
    (range on not_after, ORDER BY not_after, serial: no sort, stops at LIMIT) and the range counts
    of the metrics scrape (index only: SQLite wants `status` among the columns to see that).
    Partial, so only queries that say status = 'valid' as a literal (VALID) can use it: SQLite,
    without ANALYZE statistics, preferred a full (status, not_after) index to the subject index
    for find_valid_by_subject and walked every valid certificate (26 s at a million)."""
    conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_certificates_valid_expiry "
                         "ON certificates (not_after, serial, status) WHERE status = 'valid'")


#: A migration step: a list of tables to create, or a callable(sync_connection) for DDL changes.
Step = list[sa.Table] | Callable[[sa.Connection], None]

#: The store's own migrations: (version, step). New versions append; never edit an applied one.
#: Other components (ops, the agent inventory, acme/) keep their tables in their own modules; the
#: one ordered list of every migration is scepd.http.assembly.migrations(), given to SqlStore.open.
MIGRATIONS: dict[str, list[tuple[int, Step]]] = {
    "core": [(1, [certificates, challenges, audit]), (2, [pending_requests]),
             (3, lambda conn: _add_missing_columns(conn, challenges)),
             (4, _create_revocation_generation),
             (5, _create_valid_expiry_index)],
}


#: One migration: (component, version, step), applied in list order, each once per database.
Migration = tuple[str, int, Step]


def core_migrations() -> list[Migration]:
    """The store's own tables only (what SqlStore.open applies when given no list)."""
    return [(component, version, step) for component, steps in MIGRATIONS.items() for version, step in steps]


def _naive(t: dt.datetime | None) -> dt.datetime | None:
    if t is None:
        return None
    tz = t.tzinfo
    if tz is dt.timezone.utc:  # the clock's own: no conversion
        return t.replace(tzinfo=None)
    if tz is None:
        raise ValueError("naive datetime given to the store")
    return t.astimezone(dt.timezone.utc).replace(tzinfo=None)


def _aware(t: dt.datetime | None) -> dt.datetime | None:
    return None if t is None else t.replace(tzinfo=dt.timezone.utc)


def _cert_row(r: CertificateRecord) -> dict:
    return dict(serial=r.serial, ca_id=r.ca_id, subject=r.subject, sans=json.dumps(list(r.sans)),
                not_before=_naive(r.not_before), not_after=_naive(r.not_after), profile=r.profile,
                protocol=r.protocol, transaction_id=r.transaction_id, requester=r.requester,
                spki_sha256=r.spki_sha256, der=r.der, issued_at=_naive(r.issued_at), status=r.status,
                revoked_at=_naive(r.revoked_at), revocation_reason=r.revocation_reason)


def _cert_record(row) -> CertificateRecord:
    m = row._mapping
    return CertificateRecord(
        serial=m["serial"], ca_id=m["ca_id"], subject=m["subject"], sans=tuple(json.loads(m["sans"])),
        not_before=_aware(m["not_before"]), not_after=_aware(m["not_after"]), profile=m["profile"],
        protocol=m["protocol"], transaction_id=m["transaction_id"], requester=m["requester"],
        spki_sha256=m["spki_sha256"], der=bytes(m["der"]), issued_at=_aware(m["issued_at"]),
        status=m["status"], revoked_at=_aware(m["revoked_at"]), revocation_reason=m["revocation_reason"])


def _pending_record(row) -> PendingRecord:
    m = dict(row._mapping)
    for k in ("created_at", "decided_at"):
        m[k] = _aware(m[k])
    m["csr_der"] = bytes(m["csr_der"])
    return PendingRecord(**m)


def _challenge_record(row) -> ChallengeRecord:
    m = row._mapping
    names = tuple(json.loads(m["names"])) if m["names"] else None
    if names is None and m["cn_pattern"]:
        names = (m["cn_pattern"],)  # a challenge created before the names column
    return ChallengeRecord(id=m["id"], secret_sha256=m["secret_sha256"], cn_pattern=m["cn_pattern"],
                           created_at=_aware(m["created_at"]), expires_at=_aware(m["expires_at"]),
                           used_at=_aware(m["used_at"]), used_by_serial=m["used_by_serial"],
                           names=names or None, profile=m["profile"])


def _add_missing_columns(conn: sa.Connection, table: sa.Table) -> None:
    """Columns a table gained after it was first created (a fresh database has them)."""
    have = {c["name"] for c in sa.inspect(conn).get_columns(table.name)}
    for col in table.columns:
        if col.name not in have:
            ddl = col.type.compile(dialect=conn.dialect)
            conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {col.name} {ddl}"))


class Transaction:
    """The writes of one unit of work; all or nothing."""

    def __init__(self, conn: AsyncConnection):
        self._conn = conn

    @property
    def connection(self) -> AsyncConnection:
        """For components with their own tables (acme/, agents): same transaction, same commit."""
        return self._conn

    async def insert_certificate(self, rec: CertificateRecord) -> None:
        """Conflict (and the whole transaction is void) if the serial exists: callers retry
        the unit of work, so no savepoint round trip is spent on the common path."""
        try:
            await self._conn.execute(certificates.insert().values(**_cert_row(rec)))
        except IntegrityError:
            raise Conflict(f"serial {rec.serial} already exists") from None

    async def consume_challenge(self, challenge_id: int, now: dt.datetime, serial: str) -> bool:
        """Mark a one-time challenge used; False if someone else got there first."""
        result = await self._conn.execute(
            challenges.update()
            .where(challenges.c.id == challenge_id, challenges.c.used_at.is_(None),
                   challenges.c.expires_at > _naive(now))
            .values(used_at=_naive(now), used_by_serial=serial))
        return result.rowcount == 1

    async def insert_challenge(self, secret_sha256: str, cn_pattern: str | None, now: dt.datetime,
                               expires_at: dt.datetime, names: tuple[str, ...] | None = None,
                               profile: str | None = None) -> int:
        result = await self._conn.execute(challenges.insert().values(
            secret_sha256=secret_sha256, cn_pattern=cn_pattern, created_at=_naive(now),
            expires_at=_naive(expires_at), names=json.dumps(list(names)) if names else None,
            profile=profile))
        return int(result.inserted_primary_key[0])

    async def revoke_certificate(self, serial: str, reason: str, at: dt.datetime) -> bool:
        """Mark a certificate revoked; False if it was already revoked. StoreNotFound if unknown."""
        result = await self._conn.execute(
            certificates.update()
            .where(certificates.c.serial == serial, certificates.c.status != "revoked")
            .values(status="revoked", revoked_at=_naive(at), revocation_reason=reason))
        if result.rowcount == 1:
            await self._conn.execute(revocations.update().where(revocations.c.id == 1).values(
                generation=revocations.c.generation + 1))
            return True
        exists = (await self._conn.execute(sa.select(certificates.c.serial).where(
            certificates.c.serial == serial))).first()
        if exists is None:
            raise StoreNotFound(serial)
        return False

    async def insert_pending(self, rec: PendingRecord) -> int:
        """Insert a pending request; Conflict if this transaction+key is already pending."""
        values = {k: v for k, v in rec.__dict__.items() if k != "id"}
        values["created_at"] = _naive(rec.created_at)
        values["decided_at"] = _naive(rec.decided_at)
        try:
            async with self._conn.begin_nested():
                result = await self._conn.execute(pending_requests.insert().values(**values))
        except IntegrityError:
            raise Conflict("this transaction is already pending") from None
        return int(result.inserted_primary_key[0])

    async def decide_pending(self, pending_id: int, status: str, at: dt.datetime, by: str,
                             reason: str | None = None, serial: str | None = None) -> bool:
        """Move a pending request to issued/rejected; False if it was no longer pending."""
        result = await self._conn.execute(
            pending_requests.update()
            .where(pending_requests.c.id == pending_id, pending_requests.c.status == "pending")
            .values(status=status, decided_at=_naive(at), decided_by=by, reason=reason, serial=serial))
        return result.rowcount == 1

    async def audit(self, rec: AuditRecord) -> None:
        await self._conn.execute(audit.insert().values(
            at=_naive(rec.at), event=rec.event, subject=rec.subject, serial=rec.serial,
            actor=rec.actor, details=json.dumps(rec.details, sort_keys=True, default=str)))


# --- synchronous statements for read()/write() units ---------------------------------------
# Built once: executing the same statement object with a parameter dict skips SQLAlchemy's
# per-call statement building and cache-key computation (`.values(**row)` builds a new statement
# each time). Each function takes the unit's connection; the same one serves SQLite and PostgreSQL.

_b = sa.bindparam
_INSERT_CERTIFICATE = certificates.insert()
_INSERT_AUDIT = audit.insert()
_CONSUME_CHALLENGE = challenges.update().where(
    challenges.c.id == _b("p_id"), challenges.c.used_at.is_(None),
    challenges.c.expires_at > _b("p_now")).values(used_at=_b("p_used_at"), used_by_serial=_b("p_serial"))
_DECIDE_PENDING = pending_requests.update().where(
    pending_requests.c.id == _b("p_id"), pending_requests.c.status == "pending").values(
    status=_b("p_status"), decided_at=_b("p_at"), decided_by=_b("p_by"), reason=_b("p_reason"),
    serial=_b("p_serial"))
_REVOKE = certificates.update().where(
    certificates.c.serial == _b("p_serial"), certificates.c.status != "revoked").values(
    status="revoked", revoked_at=_b("p_at"), revocation_reason=_b("p_reason"))
_BUMP_GENERATION = revocations.update().where(revocations.c.id == 1).values(
    generation=revocations.c.generation + 1)
_SERIAL_EXISTS = sa.select(certificates.c.serial).where(certificates.c.serial == _b("p_serial"))
_CERT_BY_SERIAL = sa.select(certificates).where(certificates.c.serial == _b("p_serial"))
_CERTS_BY_TXN = sa.select(certificates).where(certificates.c.transaction_id == _b("p_txn"))
_PENDING_BY_TXN = sa.select(pending_requests).where(pending_requests.c.transaction_id == _b("p_txn"))
_PENDING_BY_ID = sa.select(pending_requests).where(pending_requests.c.id == _b("p_id"))
_CERT_FOR_TXN_KEY = sa.select(certificates).where(
    certificates.c.transaction_id == _b("p_txn"), certificates.c.spki_sha256 == _b("p_spki")).order_by(
    certificates.c.issued_at.desc()).limit(1)
_VALID_BY_SUBJECT = sa.select(certificates).where(
    certificates.c.subject == _b("p_subject"), certificates.c.status == "valid",
    certificates.c.not_after > _b("p_now"))
_CHALLENGE_BY_HASH = sa.select(challenges).where(challenges.c.secret_sha256 == _b("p_hash"))


#: the unit running in this store thread, when its statements may skip SQLAlchemy's machinery:
#: (its Connection, the stdlib sqlite3 connection under it); set by _SqliteUnits._run
_DRIVER_UNIT = threading.local()
_REQUIRED = object()


class _DriverStatement:
    """A statement above, compiled once for SQLite's stdlib driver: its SQL, where each
    positional parameter comes from (the caller's key, or the value bound in the statement)
    with its column type's bind processor, and for a SELECT each result column's name and
    result processor. The types' own processors, so values are stored and read exactly as
    SQLAlchemy stores and reads them."""

    __slots__ = ("sql", "params", "columns")

    def __init__(self, stmt, dialect, keys: tuple[str, ...] | None):
        compiled = stmt.compile(dialect=dialect, column_keys=list(keys) if keys is not None else None)
        self.sql = compiled.string
        self.params = []
        for name in compiled.positiontup:
            bind = compiled.binds[name]
            default = _REQUIRED if bind.required else bind.value
            self.params.append((bind.key, default, bind.type.dialect_impl(dialect).bind_processor(dialect)))
        self.columns = [(col.name, col.type.dialect_impl(dialect).result_processor(dialect, None))
                        for col in stmt.selected_columns] if stmt.is_select else None


class _DriverRow:
    """A result row as the record builders read it (`row._mapping`)."""

    __slots__ = ("_mapping",)

    def __init__(self, mapping: dict):
        self._mapping = mapping


class _DriverResult:
    __slots__ = ("rows", "rowcount")

    def __init__(self, rows: list, rowcount: int):
        self.rows, self.rowcount = rows, rowcount

    def all(self) -> list:
        return self.rows

    def first(self):
        return self.rows[0] if self.rows else None


_DRIVER_STATEMENTS: dict = {}


def execute(conn: sa.Connection, stmt, params: dict | list[dict] | None = None):
    """conn.execute(stmt, params) -- or, in a SQLite unit of the store's own threads while
    nothing listens to its statements (tracing tests do: they get SQLAlchemy's path), the same
    compiled SQL straight on the stdlib driver: SQLAlchemy's per-statement machinery costs
    about 30 µs, the driver about 4, and an enrollment runs six statements. Same transaction,
    same SQL, same type conversions; a unique-key refusal is SQLAlchemy's IntegrityError.
    In a PostgreSQL unit (SqlStore.read/write) likewise straight on asyncpg (_execute_pg).
    `params` a list of dicts (each with the same keys): an INSERT of several rows, one
    executemany. For the units of every component (acme/store.py's too): a prebuilt Core
    statement and a dict; what it returns offers rowcount, first(), all() and row._mapping."""
    unit = getattr(_DRIVER_UNIT, "unit", None)
    if unit is None or unit[0] is not conn:
        adapted = _PG_UNITS.get(id(conn)) if _PG_UNITS else None
        if adapted is not None:
            return _execute_pg(conn, adapted, stmt, params)
        return conn.execute(stmt, params)
    call = _driver_call(_DRIVER_STATEMENTS, conn, stmt, params)
    if call is None:
        return _DriverResult([], 0)
    prepared, args, many = call
    try:
        cursor = unit[1].executemany(prepared.sql, args) if many else unit[1].execute(prepared.sql, args)
    except sqlite3.IntegrityError as err:
        raise IntegrityError(prepared.sql, args, err) from None
    if prepared.columns is None:
        return _DriverResult([], cursor.rowcount)
    return _DriverResult(_driver_rows(prepared, cursor.fetchall()), cursor.rowcount)


def _driver_call(cache: dict, conn: sa.Connection, stmt, params) -> tuple | None:
    """(the statement compiled for conn's dialect, cached in `cache`; its driver arguments; whether
    it is an executemany), or None for an executemany of no rows."""
    many = isinstance(params, list)
    if many and not params:
        return None
    params = params or {}
    first = params[0] if many else params
    keys = tuple(first) if stmt.is_insert else None
    prepared = cache.get((stmt, keys))
    if prepared is None:
        prepared = cache[(stmt, keys)] = _DriverStatement(stmt, conn.dialect, keys)
    args = [_driver_args(prepared, p) for p in params] if many else _driver_args(prepared, params)
    return prepared, args, many


def _driver_rows(prepared: _DriverStatement, rows) -> list[_DriverRow]:
    """The driver's result rows (tuples or asyncpg Records, in the SELECT's column order) as
    records read them, through the columns' result processors."""
    return [_DriverRow({name: value if process is None or value is None else process(value)
                        for (name, process), value in zip(prepared.columns, row)}) for row in rows]


_execute = execute

#: PostgreSQL units running now (each in its own greenlet of SQLAlchemy's run_sync, several at a
#: time on the event loop): id(the unit's Connection) -> its asyncpg adapter connection; set by
#: _pg_driver_unit while nothing listens to the engine's statements
_PG_UNITS: dict[int, object] = {}
_PG_STATEMENTS: dict = {}


def _execute_pg(conn: sa.Connection, adapted, stmt, params):
    """`execute` on asyncpg itself: the statement compiled once for the asyncpg dialect, sent
    with asyncpg's own prepared-statement cache, in the unit's transaction (started here the way
    SQLAlchemy's adapter starts it, if no statement did yet). SQLAlchemy's execution path costs
    about 140 µs a statement on the event loop, this about 40."""
    call = _driver_call(_PG_STATEMENTS, conn, stmt, params)
    if call is None:
        return _DriverResult([], 0)
    prepared, args, many = call
    if adapted._transaction is None:  # the adapter begins lazily, at a unit's first statement
        await_only(adapted._start_transaction())
    raw = adapted._connection
    try:
        if many:
            await_only(raw.executemany(prepared.sql, args))
            return _DriverResult([], len(args))
        if prepared.columns is None:
            status = await_only(raw.execute(prepared.sql, *args))  # "UPDATE 1", "INSERT 0 1"
            return _DriverResult([], int(status.rsplit(" ", 1)[-1]) if status[-1:].isdigit() else -1)
        records = await_only(raw.fetch(prepared.sql, *args))
    except asyncpg_exceptions.IntegrityConstraintViolationError as err:
        raise IntegrityError(prepared.sql, args, err) from None
    rows = _driver_rows(prepared, records)  # a Record iterates over its values
    return _DriverResult(rows, len(rows))


def _ping_on_checkout(dbapi_conn, _record, _proxy) -> None:
    """A pooled PostgreSQL connection is checked before each use, so a database restart costs
    no request a dead connection: one round trip, SELECT 1 in the simple query protocol
    (SQLAlchemy's pool_pre_ping spends three on asyncpg: BEGIN, `;`, ROLLBACK). A dead one is
    replaced (DisconnectionError: the pool connects again)."""
    try:
        await_only(dbapi_conn.driver_connection.execute("SELECT 1"))
    except Exception as err:  # noqa: BLE001 - whatever the broken connection raises
        raise DisconnectionError(f"the pooled connection is dead: {type(err).__name__}") from None


def _listened(engine: sa.Engine) -> bool:
    dispatch = engine.dispatch
    return bool(dispatch.before_cursor_execute or dispatch.after_cursor_execute or
                dispatch.before_execute or dispatch.after_execute)


def _pg_driver_unit(fn):
    """`fn` as a PostgreSQL unit whose `execute` statements go straight to asyncpg -- unless
    something listens to the engine's statements (tracing tests: SQLAlchemy's path, so they see
    every statement)."""
    def unit(conn: sa.Connection, *args):
        if _listened(conn.engine):
            return fn(conn, *args)
        key = id(conn)
        _PG_UNITS[key] = conn.connection.dbapi_connection
        try:
            return fn(conn, *args)
        finally:
            del _PG_UNITS[key]
    return unit


def _driver_args(prepared: _DriverStatement, params: dict) -> list:
    args = []
    for key, default, process in prepared.params:
        value = params.get(key, default)
        if value is _REQUIRED:
            raise KeyError(f"no value for the bound parameter {key!r}")
        args.append(value if process is None or value is None else process(value))
    return args


def insert_certificate(conn: sa.Connection, rec: CertificateRecord) -> None:
    """Conflict (and the unit is void) if the serial exists: the caller retries the unit."""
    try:
        _execute(conn, _INSERT_CERTIFICATE, _cert_row(rec))
    except IntegrityError:
        raise Conflict(f"serial {rec.serial} already exists") from None


def consume_challenge(conn: sa.Connection, challenge_id: int, now: dt.datetime, serial: str) -> bool:
    """Mark a one-time challenge used; False if someone else got there first (or it expired)."""
    naive = _naive(now)
    return _execute(conn, _CONSUME_CHALLENGE, {"p_id": challenge_id, "p_now": naive, "p_used_at": naive,
                                             "p_serial": serial}).rowcount == 1


def decide_pending(conn: sa.Connection, pending_id: int, status: str, at: dt.datetime, by: str,
                   reason: str | None = None, serial: str | None = None) -> bool:
    """Move a pending request to issued/rejected; False if it was no longer pending."""
    return _execute(conn, _DECIDE_PENDING, {"p_id": pending_id, "p_status": status, "p_at": _naive(at),
                                          "p_by": by, "p_reason": reason, "p_serial": serial}).rowcount == 1


def revoke_certificate(conn: sa.Connection, serial: str, reason: str, at: dt.datetime) -> bool:
    """Mark revoked (and bump the revocation generation); False if it already was. StoreNotFound
    if unknown."""
    if _execute(conn, _REVOKE, {"p_serial": serial, "p_at": _naive(at), "p_reason": reason}).rowcount == 1:
        _execute(conn, _BUMP_GENERATION)
        return True
    if _execute(conn, _SERIAL_EXISTS, {"p_serial": serial}).first() is None:
        raise StoreNotFound(serial)
    return False


def insert_audit(conn: sa.Connection, rec: AuditRecord) -> None:
    _execute(conn, _INSERT_AUDIT, {"at": _naive(rec.at), "event": rec.event, "subject": rec.subject,
                                 "serial": rec.serial, "actor": rec.actor,
                                 "details": json.dumps(rec.details, sort_keys=True, default=str)})


def get_certificate(conn: sa.Connection, serial: str) -> CertificateRecord | None:
    row = _execute(conn, _CERT_BY_SERIAL, {"p_serial": serial}).first()
    return None if row is None else _cert_record(row)


def find_transaction(conn: sa.Connection, transaction_id: str) -> tuple[list[CertificateRecord],
                                                                        list[PendingRecord]]:
    certs = _execute(conn, _CERTS_BY_TXN, {"p_txn": transaction_id}).all()
    pend = _execute(conn, _PENDING_BY_TXN, {"p_txn": transaction_id}).all()
    return [_cert_record(r) for r in certs], [_pending_record(r) for r in pend]


def find_pending(conn: sa.Connection, transaction_id: str) -> list[PendingRecord]:
    return [_pending_record(r) for r in _execute(conn, _PENDING_BY_TXN, {"p_txn": transaction_id}).all()]


def get_pending(conn: sa.Connection, pending_id: int) -> PendingRecord | None:
    row = _execute(conn, _PENDING_BY_ID, {"p_id": pending_id}).first()
    return None if row is None else _pending_record(row)


def find_certificate_for_transaction(conn: sa.Connection, transaction_id: str,
                                     spki_sha256: str) -> CertificateRecord | None:
    row = _execute(conn, _CERT_FOR_TXN_KEY, {"p_txn": transaction_id, "p_spki": spki_sha256}).first()
    return None if row is None else _cert_record(row)


def find_valid_by_subject(conn: sa.Connection, subject: str, now: dt.datetime) -> list[CertificateRecord]:
    return [_cert_record(r) for r in _execute(conn, _VALID_BY_SUBJECT, {"p_subject": subject,
                                                                      "p_now": _naive(now)}).all()]


def find_challenge(conn: sa.Connection, secret_sha256: str) -> ChallengeRecord | None:
    row = _execute(conn, _CHALLENGE_BY_HASH, {"p_hash": secret_sha256}).first()
    return None if row is None else _challenge_record(row)


def _sqlite_pragmas(dbapi_conn) -> None:
    dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see SqlStore.open)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class _Returns:
    """Results of store-thread work handed back to one event loop, coalesced: a thread that
    finishes while an earlier hand-back is still pending only queues its result, so under load
    one loop wake-up (call_soon_threadsafe: a self-pipe write and read) settles many units
    instead of one each."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._done: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, fut: asyncio.Future, ok: bool, value) -> None:  # in a store thread
        self._done.append((fut, ok, value))
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._settle)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _settle(self) -> None:  # on the loop
        with self._lock:
            self._scheduled = False  # before draining: a result queued after this schedules anew
        done = self._done
        while done:
            fut, ok, value = done.popleft()
            if not fut.cancelled():
                fut.set_result(value) if ok else fut.set_exception(value)


class _Lane:
    """Threads (started on first use) running store work from a queue: the loop's awaitable
    (`run`, results handed back through _Returns) or a concurrent future (`submit`, from another
    thread). Cheaper per unit than run_in_executor (no executor work item, future chaining and
    wake-up per call); work whose awaiting task was cancelled before it started is skipped."""

    def __init__(self, name: str, threads: int):
        self._name, self._count = name, threads
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._start_lock = threading.Lock()
        self._returns: _Returns | None = None
        self._closed = False

    def _ensure_started(self) -> None:
        if len(self._threads) < self._count or self._closed:
            self._start()

    def _start(self) -> None:
        with self._start_lock:
            if self._closed:
                raise RuntimeError("the store is closed")
            while len(self._threads) < self._count:
                t = threading.Thread(target=self._work, name=f"{self._name}_{len(self._threads)}", daemon=True)
                t.start()
                self._threads.append(t)

    def run(self, fn, *args) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        returns = self._returns
        if returns is None or returns.loop is not loop:
            returns = self._returns = _Returns(loop)
        self._ensure_started()
        fut = loop.create_future()
        self._queue.put((returns, fut, fn, args))
        return fut

    def submit(self, fn, *args) -> concurrent.futures.Future:
        self._ensure_started()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((None, fut, fn, args))
        return fut

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            returns, fut, fn, args = item
            if returns is None:
                if not fut.set_running_or_notify_cancel():
                    continue
            elif fut.cancelled():
                continue
            try:
                ok, value = True, fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, as an executor does
                ok, value = False, exc
            if returns is None:
                fut.set_result(value) if ok else fut.set_exception(value)
            else:
                returns.put(fut, ok, value)
            del item, fut, fn, args, value

    def shutdown(self) -> None:
        """Waits for the queued work to finish."""
        with self._start_lock:
            threads, self._threads = self._threads, []
            self._closed, self._count = True, 0
        for _ in threads:
            self._queue.put(None)
        for t in threads:
            t.join()


class _SqliteUnits:
    """Units of work on SQLite through the stdlib driver, each in one thread hop.

    Writes: one writer thread with one connection, so this process's writers queue in order
    instead of contending for SQLite's lock (other processes wait on busy_timeout). Reads: a few
    reader threads, each with its own connection (WAL: readers never wait for the writer). Each
    thread keeps its connection for the life of the store."""

    READERS = 2

    def __init__(self, url: sa.URL):
        self.engine = sa.create_engine(url.set(drivername="sqlite"),
                                       connect_args={"timeout": 30, "check_same_thread": False},
                                       pool_size=self.READERS + 1, max_overflow=0)

        @event.listens_for(self.engine, "connect")
        def _connect(dbapi_conn, _record):  # pragma: no cover - exercised by every test
            _sqlite_pragmas(dbapi_conn)

        @event.listens_for(self.engine, "begin")
        def _begin(conn):  # pragma: no cover - exercised by every test
            # straight to the stdlib driver (in autocommit, see _sqlite_pragmas): through
            # SQLAlchemy's statement machinery, BEGIN cost a third of a two-statement read unit
            conn.connection.driver_connection.execute(
                "BEGIN IMMEDIATE" if conn.get_execution_options().get("sqlite_immediate") else "BEGIN")

        self._writer = _Lane("scepd-db-write", 1)
        self._readers = _Lane("scepd-db-read", self.READERS)
        self._local = threading.local()
        self._conns: list[sa.Connection] = []
        self._lock = threading.Lock()

    def _connection(self, immediate: bool) -> sa.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self.engine.connect()
            if immediate:
                conn = conn.execution_options(sqlite_immediate=True)
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def _run(self, fn, immediate: bool, prepare=None):
        args = () if prepare is None else (prepare(),)  # before BEGIN: no snapshot held meanwhile
        conn = self._connection(immediate)
        _DRIVER_UNIT.unit = None if _listened(self.engine) else (conn, conn.connection.driver_connection)
        try:
            with conn.begin():
                return fn(conn, *args)
        finally:
            _DRIVER_UNIT.unit = None

    async def read(self, fn, prepare=None):
        # `prepare` runs in the reader thread itself: the unit and its CPU work are one hop
        return await self._readers.run(self._run, fn, False, prepare)

    async def write(self, fn, prepare=None, meanwhile=None):
        loop = asyncio.get_running_loop()
        if prepare is None:
            return await self._writer.run(self._run, fn, True)
        # `prepare` runs in a worker thread, which hands the unit straight to the writer thread
        # (no event-loop round trip between them); not in the writer itself, which would queue
        # every write of the process behind each signature (an HSM's latency included)
        return await loop.run_in_executor(None, self._prepared_write, fn, prepare, meanwhile)

    def _prepared_write(self, fn, prepare, meanwhile=None):
        prepared = prepare()
        unit = self._writer.submit(self._run, lambda conn: fn(conn, prepared), True)
        if meanwhile is None:
            return unit.result()
        try:  # while the writer runs the unit and waits for its commit (fsync)
            extra = meanwhile(prepared)
        finally:
            result = unit.result()  # the unit's outcome first: its error wins, and nothing of
        return result, extra        # `meanwhile` is handed out before the commit

    def close(self) -> None:
        self._writer.shutdown()
        self._readers.shutdown()
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
        self.engine.dispose()


def _with_prepared(fn, prepared, conn):
    return fn(conn, prepared)


class SqlStore:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self._is_sqlite = engine.dialect.name == "sqlite"
        # SQLite has one writer at a time; serialising writers in-process turns lock contention
        # into a queue instead of "database is locked" errors. PostgreSQL needs no such lock.
        self._write_lock = asyncio.Lock() if self._is_sqlite else contextlib.nullcontext()
        self._units = _SqliteUnits(engine.url) if self._is_sqlite else None

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def sync_engines(self) -> list[sa.Engine]:
        """Every engine this store executes statements on (the async engine's sync side, and on
        SQLite the stdlib-driver engine behind read/write units): for statement tracing."""
        return [self.engine.sync_engine] + ([self._units.engine] if self._units is not None else [])

    async def read(self, fn: Callable[..., T], prepare: Callable[[], object] | None = None) -> T:
        """Run `fn(connection)` -- synchronous SQLAlchemy Core reads -- as one unit, in one
        snapshot. See the module docstring.

        `prepare()`: CPU work the reads depend on (decoding, decrypting), run first and never on
        the event loop; then the unit is `fn(connection, prepare())`. On SQLite both run in the
        same store thread (one hop); on PostgreSQL `prepare` runs in a worker thread. What
        `prepare` raises propagates, and no unit runs."""
        if self._units is not None:
            return await self._units.read(fn, prepare)
        if prepare is not None:
            fn = functools.partial(_with_prepared, fn, await asyncio.to_thread(prepare))
        async with self.engine.connect() as conn:
            # one snapshot for the whole unit (READ COMMITTED would take one a statement); a
            # read-only REPEATABLE READ transaction never fails to serialize, and costs no round
            # trip more: the adapter names both in the BEGIN it sends anyway
            conn = await conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            return await conn.run_sync(_pg_driver_unit(fn))

    async def write(self, fn: Callable[..., T], prepare: Callable[[], object] | None = None,
                    meanwhile: Callable[[object], object] | None = None):
        """Run `fn(connection)` in one write transaction, committed when it returns (rolled back
        when it raises). IntegrityError from a unique key is the caller's to interpret.
        `prepare()`: as for read() (CPU work off the loop, e.g. signing what the unit stores;
        then the unit is `fn(connection, prepare())`), run in a worker thread that hands the
        unit on to the store's writer without a round trip through the event loop.
        `meanwhile(prepared)` (with `prepare` only): more CPU work off the loop -- a reply to
        sign -- done while the unit runs and commits (an fsync: the two overlap); the result is
        then `(unit's result, meanwhile's)`, returned only once the unit committed; when the unit
        raises, that is what propagates and meanwhile's result is dropped."""
        if self._units is not None:
            return await self._units.write(fn, prepare, meanwhile)
        if prepare is None:
            async with self.engine.begin() as conn:
                return await conn.run_sync(_pg_driver_unit(fn))
        prepared = await asyncio.to_thread(prepare)
        fn = functools.partial(_with_prepared, fn, prepared)
        side = None if meanwhile is None else asyncio.ensure_future(asyncio.to_thread(meanwhile, prepared))
        try:
            async with self.engine.begin() as conn:
                result = await conn.run_sync(_pg_driver_unit(fn))
        finally:
            if side is not None:
                await asyncio.wait([side])  # never left running; its error (if any) is read below
        if side is None:
            return result
        return result, side.result()

    @classmethod
    async def open(cls, url: str, migrations: Sequence[Migration] | None = None) -> "SqlStore":
        """Connect and apply `migrations` (default: the store's own, core_migrations(); the server
        and the CLI pass scepd.http.assembly.migrations(), every component's)."""
        kwargs: dict = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30}
        else:  # each checkout is pinged (_ping_on_checkout), not with SQLAlchemy's pool_pre_ping
            kwargs.update(pool_size=10, max_overflow=10)
        engine = create_async_engine(url, **kwargs)
        if engine.dialect.name == "postgresql":
            event.listen(engine.sync_engine, "checkout", _ping_on_checkout)
        if engine.dialect.name == "sqlite":
            # pysqlite's own transaction handling is broken for SAVEPOINTs (a savepoint opened
            # as the first statement commits on RELEASE). SQLAlchemy's documented fix: driver in
            # autocommit, and we emit BEGIN ourselves -- BEGIN IMMEDIATE for write transactions,
            # so a writer takes the lock up front instead of failing to upgrade later.
            @event.listens_for(engine.sync_engine, "connect")
            def _pragmas(dbapi_conn, _record):  # pragma: no cover - exercised by every test
                _sqlite_pragmas(dbapi_conn)

            @event.listens_for(engine.sync_engine, "begin")
            def _begin(conn):  # pragma: no cover - exercised by every test
                immediate = conn.get_execution_options().get("sqlite_immediate")
                conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
        store = cls(engine)
        await store.migrate(core_migrations() if migrations is None else migrations)
        return store

    @staticmethod
    async def probe(url: str, timeout: float = 10) -> None:
        """Connect to `url` and run SELECT 1, changing nothing (`scepd config check`); raises
        the driver's error or TimeoutError."""
        engine = create_async_engine(url, **({"connect_args": {"timeout": timeout}} if url.startswith("sqlite") else {}))
        try:
            async def _ping():
                async with engine.connect() as conn:
                    await conn.execute(sa.text("SELECT 1"))
            await asyncio.wait_for(_ping(), timeout)
        finally:
            await engine.dispose()

    async def close(self) -> None:
        if self._units is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._units.close)
        await self.engine.dispose()

    async def migrate(self, migrations: Sequence[Migration]) -> None:
        """Apply, in order, every migration of the list not yet recorded, in one transaction."""
        async with self.transaction() as tx:
            conn = tx.connection
            await conn.run_sync(lambda c: schema_version.create(c, checkfirst=True))
            done = {(r[0], r[1]) for r in await conn.execute(
                sa.select(schema_version.c.component, schema_version.c.version))}
            for component, version, step in migrations:
                if (component, version) in done:
                    continue
                if callable(step):
                    await conn.run_sync(step)
                else:
                    for table in step:
                        await conn.run_sync(lambda c, t=table: t.create(c, checkfirst=True))
                done.add((component, version))
                try:
                    async with conn.begin_nested():
                        await conn.execute(schema_version.insert().values(
                            component=component, version=version,
                            applied_at=dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)))
                except IntegrityError:  # another replica migrated concurrently
                    pass

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        async with self._write_lock:
            async with self.engine.connect() as conn:
                if self._is_sqlite:
                    conn = await conn.execution_options(sqlite_immediate=True)
                async with conn.begin():
                    yield Transaction(conn)

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    # --- reads --------------------------------------------------------------------------------

    async def revocation_generation(self) -> int:
        """Grows with every revocation (by any process on this database); one primary-key read."""
        async with self.engine.connect() as conn:
            return int((await conn.execute(sa.select(revocations.c.generation).where(
                revocations.c.id == 1))).scalar_one_or_none() or 0)

    # the lookups of the request paths: each one read unit (one hop on SQLite) of a prebuilt
    # statement; the module functions above compose into larger units (scepd/scep/service.py)

    async def get_certificate(self, serial: str) -> CertificateRecord:
        rec = await self.read(lambda conn: get_certificate(conn, serial))
        if rec is None:
            raise StoreNotFound(serial)
        return rec

    async def find_certificate_for_transaction(self, transaction_id: str,
                                               spki_sha256: str) -> CertificateRecord | None:
        return await self.read(lambda conn: find_certificate_for_transaction(conn, transaction_id, spki_sha256))

    async def list_certificates(self, expiring_before: dt.datetime | None = None,
                                limit: int = 1000, offset: int = 0) -> list[CertificateRecord]:
        q = sa.select(certificates).order_by(certificates.c.not_after, certificates.c.serial)
        if expiring_before is not None:
            q = q.where(certificates.c.not_after <= _naive(expiring_before),
                        certificates.c.status == VALID)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q.limit(limit).offset(offset))).all()
        return [_cert_record(r) for r in rows]

    async def list_revoked(self, ca_id: str) -> list[CertificateRecord]:
        """Revoked certificates of one issuing CA (for CRLs), by revocation time."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(sa.select(certificates).where(
                certificates.c.ca_id == ca_id, certificates.c.status == "revoked").order_by(
                certificates.c.revoked_at))).all()
        return [_cert_record(r) for r in rows]

    async def find_transaction(self, transaction_id: str) -> tuple[list[CertificateRecord], list[PendingRecord]]:
        """Everything known about a SCEP transaction, in one read unit: the certificates
        issued for it and its pending requests (both by indexed transaction id)."""
        return await self.read(lambda conn: find_transaction(conn, transaction_id))

    async def find_pending(self, transaction_id: str) -> list[PendingRecord]:
        return await self.read(lambda conn: find_pending(conn, transaction_id))

    async def get_pending(self, pending_id: int) -> PendingRecord:
        rec = await self.read(lambda conn: get_pending(conn, pending_id))
        if rec is None:
            raise StoreNotFound(str(pending_id))
        return rec

    async def list_pending(self, status: str | None = "pending", limit: int = 1000) -> list[PendingRecord]:
        q = sa.select(pending_requests).order_by(pending_requests.c.id).limit(limit)
        if status:
            q = q.where(pending_requests.c.status == status)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q)).all()
        return [_pending_record(r) for r in rows]

    async def count_pending(self) -> int:
        async with self.engine.connect() as conn:
            return int((await conn.execute(sa.select(sa.func.count()).select_from(pending_requests).where(
                pending_requests.c.status == "pending"))).scalar_one())

    async def find_valid_by_subject(self, subject: str, now: dt.datetime) -> list[CertificateRecord]:
        return await self.read(lambda conn: find_valid_by_subject(conn, subject, now))

    async def find_challenge(self, secret_sha256: str) -> ChallengeRecord | None:
        return await self.read(lambda conn: find_challenge(conn, secret_sha256))

    async def list_audit(self, limit: int = 100) -> list[AuditRecord]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(sa.select(audit).order_by(audit.c.id.desc()).limit(limit))).all()
        return [AuditRecord(id=r.id, at=_aware(r.at), event=r.event, subject=r.subject,
                            serial=r.serial, actor=r.actor, details=json.loads(r.details)) for r in rows]
