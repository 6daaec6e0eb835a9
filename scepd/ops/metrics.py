"""Prometheus metrics: one CollectorRegistry per Services (tests build many apps).

Counters and histograms are updated as things happen; with `serve --workers N` each worker
writes them to a shared directory (prometheus_client's multiprocess mode, see
`share_across_processes`) and /metrics sums them, whichever worker answers. Gauges that describe
the inventory (active, expiring within 30/7/1 days, pending approvals) are computed at scrape
time. The certificate gauges read a counter the database maintains (migration ("metrics", 1):
valid certificates per expiry day, kept by triggers on the certificates table in the transaction
of every insert and revocation, so any process or replica sees it), plus index-only counts over at
most a day of expiries at each end of a window: the cost of a scrape does not grow with the
inventory (bench/flat.py). A store without that migration falls back to COUNT queries.
Other components report through the small API below:
`acme_problem(type)`, `scep_observer(...)`, `issued(record)`, `revoked(reason)`; gauges for
tables they own are filled by scrape hooks (`add_scrape_hook(async fn(metrics))`).
"""
from __future__ import annotations

import datetime as dt
import logging
import os
from typing import Awaitable, Callable

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST, values
from prometheus_client.multiprocess import MultiProcessCollector

from ..clock import Clock
from ..errors import FailInfo
from ..store import CertificateRecord, SqlStore
from ..store.sql import VALID, _naive, certificates, schema_version

log = logging.getLogger("scepd.metrics")

#: ("metrics", 1): valid certificates per (expiry day, shard). The shard spreads concurrent
#: PostgreSQL writers over several rows (a backend's pid modulo 8), so issuances on different
#: connections do not queue on one counter row until commit; SQLite has one writer: shard 0.
expiry_counts = sa.Table(
    "certificate_expiry_counts", sa.MetaData(),
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("shard", sa.Integer, primary_key=True),
    sa.Column("valid", sa.BigInteger, nullable=False),
)

_UPSERT = ("INSERT INTO certificate_expiry_counts (day, shard, valid) {rows} "
           "ON CONFLICT (day, shard) DO UPDATE SET valid = certificate_expiry_counts.valid + excluded.valid")
# SQLAlchemy stores an SQLite DateTime as 'YYYY-MM-DD HH:MM:SS.ffffff' (naive UTC): the day is
# the first ten characters, the same text SQLAlchemy's Date type stores and binds.
_SQLITE_DAY = "substr({row}.not_after, 1, 10)"
_SQLITE = [
    "CREATE TRIGGER IF NOT EXISTS certificates_count_insert AFTER INSERT ON certificates "
    "WHEN NEW.status = 'valid' BEGIN "
    + _UPSERT.format(rows=f"VALUES ({_SQLITE_DAY.format(row='NEW')}, 0, 1)") + "; END",
    "CREATE TRIGGER IF NOT EXISTS certificates_count_update AFTER UPDATE OF status, not_after "
    "ON certificates BEGIN "
    + _UPSERT.format(rows=f"SELECT {_SQLITE_DAY.format(row='OLD')}, 0, -1 WHERE OLD.status = 'valid'") + "; "
    + _UPSERT.format(rows=f"SELECT {_SQLITE_DAY.format(row='NEW')}, 0, 1 WHERE NEW.status = 'valid'") + "; END",
    "CREATE TRIGGER IF NOT EXISTS certificates_count_delete AFTER DELETE ON certificates "
    "WHEN OLD.status = 'valid' BEGIN "
    + _UPSERT.format(rows=f"VALUES ({_SQLITE_DAY.format(row='OLD')}, 0, -1)") + "; END",
    "INSERT INTO certificate_expiry_counts (day, shard, valid) "
    f"SELECT {_SQLITE_DAY.format(row='certificates')}, 0, COUNT(*) FROM certificates "
    "WHERE status = 'valid' GROUP BY 1",
]
_POSTGRES = [
    "CREATE OR REPLACE FUNCTION scepd_certificates_count() RETURNS trigger AS $$ BEGIN "
    "IF TG_OP <> 'INSERT' AND OLD.status = 'valid' THEN "
    + _UPSERT.format(rows="VALUES (OLD.not_after::date, pg_backend_pid() % 8, -1)") + "; END IF; "
    "IF TG_OP <> 'DELETE' AND NEW.status = 'valid' THEN "
    + _UPSERT.format(rows="VALUES (NEW.not_after::date, pg_backend_pid() % 8, 1)") + "; END IF; "
    "RETURN NULL; END $$ LANGUAGE plpgsql",
    "DROP TRIGGER IF EXISTS certificates_count ON certificates",
    # taking the trigger's lock first: no insert can slip between the backfill and the trigger
    "CREATE TRIGGER certificates_count AFTER INSERT OR UPDATE OF status, not_after OR DELETE "
    "ON certificates FOR EACH ROW EXECUTE FUNCTION scepd_certificates_count()",
    "INSERT INTO certificate_expiry_counts (day, shard, valid) "
    "SELECT not_after::date, 0, COUNT(*) FROM certificates WHERE status = 'valid' GROUP BY 1",
]


def _create_expiry_counts(conn: sa.Connection) -> None:
    expiry_counts.create(conn, checkfirst=True)
    conn.execute(expiry_counts.delete())  # the backfill below counts every row again
    for statement in (_POSTGRES if conn.dialect.name == "postgresql" else _SQLITE):
        conn.exec_driver_sql(statement)


#: component "metrics", version 1 (applied from the ordered list, scepd.http.assembly.migrations)
MIGRATIONS = [(1, _create_expiry_counts)]

CONTENT_TYPE = CONTENT_TYPE_LATEST
EXPIRY_WINDOWS = (30, 7, 1)

_FAIL_INFO_NAMES = {int(f): name for f, name in (
    (FailInfo.BAD_ALG, "badAlg"), (FailInfo.BAD_MESSAGE_CHECK, "badMessageCheck"),
    (FailInfo.BAD_REQUEST, "badRequest"), (FailInfo.BAD_TIME, "badTime"),
    (FailInfo.BAD_CERT_ID, "badCertId"))}

_SCEP_OPERATIONS = {"getcacaps", "getcacert", "pkioperation", "getnextcacert"}

#: the directory the worker processes of one server share their counters through (None: this
#: process counts alone)
_shared_dir: str | None = None


def share_across_processes(directory: str) -> None:
    """In a worker process, before its Metrics exist: counters and histograms live in files in
    `directory` (one per process) and every worker's /metrics sums them all."""
    global _shared_dir
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = values.MultiProcessValue()
    _shared_dir = directory


#: gauges set as events happen in whichever worker (a CRL signed), read across the workers
_EVENT_GAUGES = {"scepd_crl_number", "scepd_crl_next_update_timestamp_seconds"}


class _Totals:
    """Counters and histograms summed over the workers' files, event gauges at their largest;
    the other gauges of this process (the inventory gauges were just computed from the database
    by the process answering)."""

    def __init__(self, directory: str, local: CollectorRegistry):
        self.shared = MultiProcessCollector(None, directory)
        self.local = local

    def collect(self):
        for family in self.shared.collect():
            if family.type != "gauge" or family.name in _EVENT_GAUGES:
                yield family
        for family in self.local.collect():
            if family.type == "gauge" and family.name not in _EVENT_GAUGES:
                yield family


class Metrics:
    def __init__(self, store: SqlStore, clock: Clock):
        self.store = store
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.issued_total = Counter("scepd_certificates_issued", "Certificates issued",
                                    ["protocol", "profile"], registry=r)
        self.revoked_total = Counter("scepd_certificates_revoked", "Certificates revoked", ["reason"],
                                     registry=r)
        self.active = Gauge("scepd_certificates_active", "Valid (not revoked, not expired) certificates",
                            registry=r)
        self.expiring = Gauge("scepd_certificates_expiring", "Valid certificates expiring within N days",
                              ["within_days"], registry=r)
        self.request_seconds = Histogram("scepd_http_request_duration_seconds", "HTTP request latency",
                                         ["endpoint", "method"], registry=r)
        self.scep_seconds = Histogram("scepd_scep_operation_duration_seconds", "SCEP operation latency",
                                      ["operation"], registry=r)
        self.scep_failures = Counter("scepd_scep_failures", "SCEP CertRep FAILURE replies by failInfo",
                                     ["fail_info"], registry=r)
        self.responses = Counter("scepd_http_responses", "HTTP responses by route and status code",
                                 ["endpoint", "status"], registry=r)
        self.retention_purged_total = Counter("scepd_retention_purged", "Expired rows purged by retention",
                                              ["kind"], registry=r)
        self.est_responses = Counter("scepd_est_responses", "EST responses by operation and HTTP status",
                                     ["operation", "status"], registry=r)
        self.est_seconds = Histogram("scepd_est_operation_duration_seconds", "EST operation latency",
                                     ["operation"], registry=r)
        self.acme_problems = Counter("scepd_acme_problems", "ACME problem documents by type", ["type"],
                                     registry=r)
        self.rate_limited_total = Counter("scepd_rate_limited", "Requests refused by a rate limit",
                                          ["limit"], registry=r)
        self.pending = Gauge("scepd_pending_approvals", "Requests waiting for approval", registry=r)
        self.agents_seen = Gauge("scepd_agents_seen", "Agents seen within a window", ["within"],
                                 registry=r)
        self.ocsp_responses = Counter("scepd_ocsp_responses", "OCSP responses by status", ["status"],
                                      registry=r)
        # set by the worker that signed the CRL; across workers the newest is the largest
        self.crl_number = Gauge("scepd_crl_number", "Number of the newest CRL", ["ca_id"], registry=r,
                                multiprocess_mode="max")
        self.crl_next_update = Gauge("scepd_crl_next_update_timestamp_seconds",
                                     "nextUpdate of the newest CRL", ["ca_id"], registry=r,
                                     multiprocess_mode="max")
        for within in ("1h", "24h"):
            self.agents_seen.labels(within=within).set(0)
        self._hooks: list[Callable[["Metrics"], Awaitable[None]]] = []
        self._counted: bool | None = None  # does the database keep expiry_counts? (asked once)
        #: labelled children looked up once: labels() builds a key and takes a lock per call
        self._children: dict[tuple, object] = {}

    def _child(self, metric, *values: str):
        """metric.labels(*values) (label values in the metric's label order), cached (bounded)."""
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*values)
            if len(self._children) < 4096:
                self._children[key] = child
        return child

    # --- the API other components call ------------------------------------------------------

    def issued(self, record: CertificateRecord) -> None:
        self._child(self.issued_total, record.protocol, record.profile).inc()

    async def on_revocation(self, record: CertificateRecord, reason) -> None:
        self.revoked(reason.label)

    def revoked(self, reason: str) -> None:
        self.revoked_total.labels(reason=reason).inc()

    def acme_problem(self, problem_type: str) -> None:
        self.acme_problems.labels(type=problem_type.rsplit(":", 1)[-1]).inc()

    def rate_limited(self, limit: str) -> None:
        """RateLimiter listener: a request was refused by `limit`."""
        self.rate_limited_total.labels(limit=limit).inc()

    def scep_observer(self, operation: str, outcome, seconds: float) -> None:
        """ScepHandler's observer(operation, outcome|None, seconds)."""
        op = operation if operation in _SCEP_OPERATIONS else "other"
        self._child(self.scep_seconds, op).observe(seconds)
        if outcome is not None and outcome.fail_info is not None:
            self._child(self.scep_failures, _FAIL_INFO_NAMES.get(outcome.fail_info, "other")).inc()

    def est_observer(self, operation: str, status: int, seconds: float) -> None:
        """EstHandler's observer(operation, HTTP status, seconds); issuance is counted by
        scepd_certificates_issued{protocol="est"} like every protocol's."""
        self._child(self.est_seconds, operation).observe(seconds)
        self._child(self.est_responses, operation, str(status)).inc()

    def observe_request(self, endpoint: str, method: str, seconds: float, status: int = 0) -> None:
        self._child(self.request_seconds, endpoint, method).observe(seconds)
        self._child(self.responses, endpoint, str(status)).inc()

    def crl_published(self, published) -> None:
        self.crl_number.labels(ca_id=published.ca_id).set(published.number)
        self.crl_next_update.labels(ca_id=published.ca_id).set(published.next_update.timestamp())

    def add_scrape_hook(self, hook: Callable[["Metrics"], Awaitable[None]]) -> None:
        self._hooks.append(hook)

    # --- scrape ---------------------------------------------------------------------------------

    async def refresh(self) -> None:
        now = self.clock.now()
        async with self.store.engine.connect() as conn:
            if self._counted is None:
                self._counted = (await conn.execute(sa.select(schema_version.c.version).where(
                    schema_version.c.component == "metrics", schema_version.c.version == 1))).first() is not None
            if self._counted:
                active, expiring = await _counts_from_counter(conn, now)
            else:
                active, expiring = await _counts_by_count(conn, now)
        self.active.set(active)
        for days, n in expiring.items():
            self.expiring.labels(within_days=str(days)).set(n)
        count_pending = getattr(self.store, "count_pending", None)
        if count_pending is not None:
            self.pending.set(await count_pending())
        for hook in self._hooks:
            try:
                await hook(self)
            except Exception:  # a broken hook must not break the scrape
                log.exception("metrics scrape hook failed")

    async def render(self) -> bytes:
        await self.refresh()
        if _shared_dir is None:
            return generate_latest(self.registry)
        totals = CollectorRegistry(auto_describe=False)
        totals.register(_Totals(_shared_dir, self.registry))  # type: ignore[arg-type]
        return generate_latest(totals)


def _valid_between(low: dt.datetime, high: dt.datetime, *, high_inclusive: bool) -> sa.Select:
    """Valid certificates with low < not_after < (or <=) high: an index-only range count
    (ix_certificates_valid_expiry), used for at most a day of expiries."""
    c = certificates.c
    upper = c.not_after <= _naive(high) if high_inclusive else c.not_after < _naive(high)
    return sa.select(sa.func.count()).select_from(certificates).where(
        c.status == VALID, c.not_after > _naive(low), upper)


async def _counts_from_counter(conn, now: dt.datetime) -> tuple[int, dict[int, int]]:
    """(active, {days: expiring within}) from the per-day counter: whole days after today come
    from the counter; the rest of today and the part of the last day within the window from
    range counts on the index."""
    now = now.astimezone(dt.timezone.utc)
    today = now.date()
    tomorrow = dt.datetime.combine(today + dt.timedelta(days=1), dt.time(), dt.timezone.utc)
    ends = {days: now + dt.timedelta(days=days) for days in EXPIRY_WINDOWS}
    e = expiry_counts.c
    sums = [sa.func.coalesce(sa.func.sum(e.valid), 0)] + [
        sa.func.coalesce(sa.func.sum(sa.case((e.day < end.date(), e.valid), else_=0)), 0)
        for end in ends.values()]
    row = (await conn.execute(sa.select(*sums).where(e.day > today))).one()
    rest_of_today = (await conn.execute(_valid_between(now, tomorrow, high_inclusive=False))).scalar_one()
    expiring = {}
    for (days, end), whole_days in zip(ends.items(), row[1:]):
        last_day = dt.datetime.combine(end.date(), dt.time(), dt.timezone.utc)
        part = (await conn.execute(_valid_between(last_day - dt.timedelta(microseconds=1), end,
                                                  high_inclusive=True))).scalar_one()
        expiring[days] = rest_of_today + int(whole_days) + part
    return rest_of_today + int(row[0]), expiring


async def _counts_by_count(conn, now: dt.datetime) -> tuple[int, dict[int, int]]:
    """The same figures by COUNT over the certificates (a store without the counter)."""
    valid = sa.and_(certificates.c.status == "valid", certificates.c.not_after > _naive(now))
    count = sa.select(sa.func.count()).select_from(certificates)
    active = (await conn.execute(count.where(valid))).scalar_one()
    expiring = {}
    for days in EXPIRY_WINDOWS:
        soon = certificates.c.not_after <= _naive(now + dt.timedelta(days=days))
        expiring[days] = (await conn.execute(count.where(valid, soon))).scalar_one()
    return active, expiring
