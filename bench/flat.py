"""Flat: the same load against an empty store and against one seeded with N certificates.

    .venv/bin/python bench/flat.py [--count 1000000] [--postgres | --database-url URL --empty-database-url URL2]
                                   [--rounds 2] [--requests 200] [--concurrency 4] [--max-seconds 60]
                                   [--quick] [--json FILE] [--keep]

1. Two state directories (`scepd init`), each with its store: SQLite in the directory, or
   PostgreSQL (`--postgres` starts a throwaway cluster on 127.0.0.1 the way the tests do,
   tests/pg.py; or two empty databases by URL).
2. The seeded store gets the schema of every migration except the ones this benchmark added
   (NEW_MIGRATIONS), then N rows straight into the database, server stopped, secondary indexes
   dropped for the load and rebuilt after it (SQLite: executemany in 50,000-row transactions,
   synchronous off for that connection only; PostgreSQL: COPY, then VACUUM ANALYZE as autovacuum
   would). Rows are realistic where a query can see it: unique 127-bit random serials in the CA's
   format (lower-case hex), subjects CN=seed-<i>.<org>.example,O=<one of 50 orgs>, one to three
   dNSName SANs, not_after spread over the next year, 0.2 % revoked (reasons, revoked_at), a third
   with a transaction id, an SPKI hash each. The DER column is ONE leaf certificate of that CA,
   reused for every row (no query reads inside it; only its size matters to the page layout).
3. Every store-size-dependent read is run on the seeded store and its plan and time printed
   (EXPLAIN QUERY PLAN / EXPLAIN ANALYZE), before the upgrade and again at the end.
4. Rounds alternate the empty and the seeded store (so a change of load on the shared machine hits
   both): `scepd serve` starts (its start-up time is printed; the seeded store's first start is
   the upgrade: index build and counter backfill), then SCEP PKCSReq enrollments, RenewalReq signed
   by a certificate the server issued (duplicate_subjects = "refuse", so every issuance also looks
   the subject up), OCSP for a known serial (a seeded one on the seeded store), CRL fetch, /metrics
   scrape, and `scepd certs list --expiring-within 400d --limit 20` (the CLI, and the store call
   behind it timed in-process). Requests are built before the clock starts; every reply is checked
   (CertRep signature, nonces, decryption, key match; renewal reply for the new key; OCSP GOOD;
   the CRL parses; /metrics counts the seeded certificates).
5. The table: medians over rounds of ops/s and server CPU ms per op (and PostgreSQL's own CPU
   when the benchmark started the cluster), empty and seeded, and the ratio seeded / empty.

Loopback only; every phase is bounded in count and in time. `--quick` (20,000 rows, few requests,
one round) is the smoke test conformance/test_bench_flat.py runs.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509 import ocsp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (ScepRequest, build_requests, check_cert_rep, recipient_of,  # noqa: E402
                          start_scepd, tree_cpu)
from scepd.ca import pki  # noqa: E402
from scepd.scep import wire  # noqa: E402
from tests.helpers import make_csr, pkcs_req, self_signed  # noqa: E402

CHALLENGE = "bench-flat"
ORGS = [f"Org {i}" for i in range(50)]
REASONS = ["keyCompromise", "superseded", "cessationOfOperation", "affiliationChanged", "unspecified"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --- seeding --------------------------------------------------------------------------------------

def _ts(t: dt.datetime) -> str:
    """SQLAlchemy's SQLite DateTime text (naive UTC, always with microseconds): comparisons are
    string comparisons there, so seeded rows must use the very same format."""
    return t.strftime("%Y-%m-%d %H:%M:%S.%f")


def seed_rows(count: int, ca_id: str, der: bytes, now: dt.datetime, rng: random.Random):
    """Rows as tuples in the certificates table's column order (naive UTC datetimes)."""
    year = 365 * 86400
    serials: set[str] = set()
    for i in range(count):
        while True:
            serial = format(rng.getrandbits(127) | (1 << 126), "x")
            if serial not in serials:
                serials.add(serial)
                break
        org = ORGS[i % len(ORGS)]
        cn = f"seed-{i}.{org.replace(' ', '').lower()}.example"
        sans = json.dumps([f"DNS:{cn}"] + [f"DNS:alt{k}-{i}.example" for k in range(i % 3)])
        issued = now - dt.timedelta(seconds=rng.randrange(year))
        not_after = now + dt.timedelta(seconds=rng.randrange(60, year))
        revoked = i % 500 == 7
        yield (serial, ca_id, f"CN={cn},O={org}", sans, issued, not_after, "device",
               "scep" if i % 4 else "acme", os.urandom(8).hex().upper() if i % 3 == 0 else None,
               None, secrets.token_hex(32), der, issued, "revoked" if revoked else "valid",
               issued + dt.timedelta(days=1) if revoked else None,
               REASONS[i % len(REASONS)] if revoked else None)


COLUMNS = ("serial", "ca_id", "subject", "sans", "not_before", "not_after", "profile", "protocol",
           "transaction_id", "requester", "spki_sha256", "der", "issued_at", "status", "revoked_at",
           "revocation_reason")


def seed_sqlite(path: Path, rows, batch: int = 50_000) -> None:
    """Secondary indexes are dropped for the load and built again after it (the same DDL, from
    sqlite_master): one sorted build each instead of a million random inserts."""
    import sqlite3
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")  # this connection only; the server's stays FULL
    db.execute("PRAGMA cache_size=-400000")  # 400 MB while seeding
    indexes = db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND "
                         "tbl_name = 'certificates' AND sql IS NOT NULL").fetchall()
    for name, _ in indexes:
        db.execute(f"DROP INDEX {name}")
    sql = f"INSERT INTO certificates ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
    chunk: list[tuple] = []

    def flush() -> None:
        db.execute("BEGIN")
        db.executemany(sql, [(*r[:4], _ts(r[4]), _ts(r[5]), *r[6:12], _ts(r[12]), r[13],
                              _ts(r[14]) if r[14] else None, r[15]) for r in chunk])
        db.execute("COMMIT")
        chunk.clear()
    for r in rows:
        chunk.append(r)
        if len(chunk) >= batch:
            flush()
    if chunk:
        flush()
    for _, sql in indexes:
        db.execute(sql)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()  # no ANALYZE: scepd never runs one, so its planner works without statistics


async def seed_postgres(url: str, rows, batch: int = 100_000) -> None:
    import asyncpg
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        # secondary indexes off for the load, built again after it (the same definitions)
        indexes = await conn.fetch("SELECT i.indexname, i.indexdef FROM pg_indexes i JOIN pg_index x "
                                   "ON x.indexrelid = (quote_ident(i.indexname))::regclass "
                                   "WHERE i.tablename = 'certificates' AND NOT x.indisprimary")
        for ix in indexes:
            await conn.execute(f'DROP INDEX "{ix["indexname"]}"')
        chunk: list[tuple] = []
        for r in rows:
            chunk.append(r)
            if len(chunk) >= batch:
                await conn.copy_records_to_table("certificates", records=chunk, columns=COLUMNS)
                chunk.clear()
        if chunk:
            await conn.copy_records_to_table("certificates", records=chunk, columns=COLUMNS)
        await conn.execute("SET maintenance_work_mem = '256MB'")
        for ix in indexes:
            await conn.execute(ix["indexdef"])
        await conn.execute("VACUUM ANALYZE certificates")  # what autovacuum does after a bulk load
    finally:
        await conn.close()


# --- one phase of measurements ----------------------------------------------------------------------

@dataclass
class Result:
    name: str
    done: int = 0
    failures: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    db_cpu: float = 0.0  # PostgreSQL's own processes, when this benchmark started the cluster
    latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms(self) -> float:
        return self.cpu / max(self.done, 1) * 1000

    @property
    def db_cpu_ms(self) -> float:
        return self.db_cpu / max(self.done, 1) * 1000

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies) * 1000 if self.latencies else 0.0


async def run_load(name: str, pid: int, items, call, concurrency: int, max_seconds: float,
                   db_pid: int | None = None) -> Result:
    """`call(item) -> None` (raises on a wrong reply) for every item, `concurrency` at a time."""
    res = Result(name)
    queue: asyncio.Queue = asyncio.Queue()
    for it in items:
        queue.put_nowait(it)
    stop_at = time.monotonic() + max_seconds

    async def worker() -> None:
        while not queue.empty() and time.monotonic() < stop_at:
            it = queue.get_nowait()
            t0 = time.perf_counter()
            try:
                await call(it)
            except Exception as e:  # counted, printed once
                if res.failures == 0:
                    print(f"  {name}: first failure: {type(e).__name__}: {e}", flush=True)
                res.failures += 1
            res.latencies.append(time.perf_counter() - t0)
            res.done += 1
    cpu0, db0 = tree_cpu(pid), tree_cpu(db_pid) if db_pid else 0.0
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    res.seconds = time.perf_counter() - t0
    res.cpu = tree_cpu(pid) - cpu0
    res.db_cpu = tree_cpu(db_pid) - db0 if db_pid else 0.0
    res.done -= res.failures
    return res


async def phase(label: str, state: Path, env: dict, port: int, args, seeded_serial: str | None,
                db_pid: int | None) -> dict:
    started = time.perf_counter()
    proc = start_scepd(state, env)
    startup = time.perf_counter() - started
    print(f"[{label}] server ready in {startup:.1f}s (migrations included); loadavg {loadavg()}", flush=True)
    results: list[Result] = []
    scraped: dict[str, float] = {}
    try:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(base + "/scep?operation=GetCACert") as resp:
                ca_certs = wire.certs_from_certs_only(await resp.read())
            ca = next(c for c in ca_certs if c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
            recipient = recipient_of(ca_certs)
            keys = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(8)]
            signers = [self_signed(k) for k in keys]

            async def enroll(req: ScepRequest) -> x509.Certificate:
                async with session.post(base + "/scep?operation=PKIOperation", data=req.der) as resp:
                    body = await resp.read()
                return check_cert_rep(req, resp.status, body, ca_certs)

            # certificates to renew (issued now, outside the clock), then every request, prebuilt
            warm = build_requests(recipient, keys, signers, args.renewals, f"{label}-old", CHALLENGE)
            olds = [await enroll(r) for r in warm]
            reqs = build_requests(recipient, keys, signers, args.requests, f"{label}-new", CHALLENGE)
            renewals = []
            for i, (old, w) in enumerate(zip(olds, warm)):
                new_key = keys[(i + 1) % len(keys)]
                cn = old.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
                der, tid, nonce = pkcs_req(recipient, new_key, make_csr(new_key, cn), signer=(old, w.key),
                                           message_type=17)
                renewals.append((ScepRequest(der, tid, nonce, w.key, old), new_key))
            serial = int(seeded_serial, 16) if seeded_serial else olds[0].serial_number
            issuer_name_hash = hashes.Hash(hashes.SHA1())
            issuer_name_hash.update(ca.subject.public_bytes())
            # RFC 6960 issuerKeyHash: SHA-1 of the subjectPublicKey bits, i.e. RFC 5280 key id method 1
            key_hash = x509.SubjectKeyIdentifier.from_public_key(ca.public_key()).digest
            ocsp_der = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
                issuer_name_hash.finalize(), key_hash, serial, hashes.SHA1()).build().public_bytes(
                serialization.Encoding.DER)

            async def do_ocsp(_):
                async with session.post(base + "/ocsp", data=ocsp_der,
                                        headers={"Content-Type": "application/ocsp-request"}) as resp:
                    body = await resp.read()
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                r = ocsp.load_der_ocsp_response(body)
                if r.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL or r.certificate_status != ocsp.OCSPCertStatus.GOOD:
                    raise ValueError(f"OCSP {r.response_status} {getattr(r, 'certificate_status', None)}")

            crl_url = f"{base}/crl/{pki.ca_id_of(ca)}.crl"

            async def do_crl(_):
                async with session.get(crl_url) as resp:
                    body = await resp.read()
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                scraped["crl_entries"] = len(x509.load_der_x509_crl(body))
                scraped["crl_bytes"] = len(body)

            async def do_metrics(_):
                async with session.get(base + "/metrics") as resp:
                    body = await resp.text()
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                for line in body.splitlines():
                    if line.startswith(("scepd_certificates_active ", "scepd_certificates_expiring{")):
                        name, value = line.rsplit(" ", 1)
                        scraped[name] = float(value)
                if "scepd_certificates_active" not in scraped:
                    raise ValueError("no scepd_certificates_active in /metrics")

            async def do_renew(item: tuple[ScepRequest, object]):
                # the reply is encrypted to the signer (the old certificate and its key)
                req, new_key = item
                async with session.post(base + "/scep?operation=PKIOperation", data=req.der) as resp:
                    body = await resp.read()
                try:
                    check_cert_rep(req, resp.status, body, ca_certs)
                except ValueError as e:
                    if "no certificate for the request's key" not in str(e):
                        raise
                certs = wire.certs_from_certs_only(wire.open_envelope(
                    wire.decode_cert_rep(body).envelope, [wire.Recipient(req.signer, req.key)]))
                if not any(c.public_key() == new_key.public_key() for c in certs):
                    raise ValueError("no certificate for the renewal's new key in the reply")

            n, c, s, d = args.requests, args.concurrency, args.max_seconds, db_pid
            print(f"[{label}] measuring ...", flush=True)
            results.append(await run_load("SCEP PKCSReq", proc.pid, reqs, enroll, c, s, d))
            results.append(await run_load("SCEP RenewalReq", proc.pid, renewals, do_renew, c, s, d))
            results.append(await run_load("OCSP (known serial)", proc.pid, range(n * 2), do_ocsp, c, s, d))
            results.append(await run_load("CRL fetch", proc.pid, range(n), do_crl, c, s, d))
            results.append(await run_load("/metrics scrape", proc.pid, range(max(n // 4, 10)), do_metrics, 1, s, d))
        results.append(await certs_list_cli(state, env, args))
        results.append(await certs_list_store(env, args, d))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    for r in results:
        print(f"[{label}] {r.name:28s} {r.done:6d} ok {r.failures:3d} failed  {r.rate:8.1f}/s  "
              f"p50 {r.p50_ms:7.1f} ms  server CPU {r.cpu_ms:6.2f} ms/op"
              + (f"  PostgreSQL CPU {r.db_cpu_ms:5.2f} ms/op" if db_pid else ""), flush=True)
    print(f"[{label}] /metrics: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(scraped.items())), flush=True)
    return {"startup_seconds": startup, "loadavg": loadavg(), "metrics": scraped,
            "ops": {r.name: {"done": r.done, "failures": r.failures, "per_second": r.rate,
                             "p50_ms": r.p50_ms, "cpu_ms": r.cpu_ms, "db_cpu_ms": r.db_cpu_ms} for r in results}}


async def certs_list_cli(state: Path, env: dict, args) -> Result:
    """`scepd certs list --expiring-within 400d --limit 20 --json` as a user types it (wall time; process start
    dominates, so the in-process store call is timed separately)."""
    res = Result("certs list CLI (wall)")
    for _ in range(args.cli_runs):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "scepd", "certs", "list", "--expiring-within", "400d",
                              "--limit", "20", "--json", "--state-dir", str(state)],
                             capture_output=True, text=True, env=env, timeout=120)
        res.latencies.append(time.perf_counter() - t0)
        if out.returncode != 0 or not out.stdout.lstrip().startswith("["):
            res.failures += 1
            print(f"  certs list failed: {out.stderr[-300:]}")
        else:
            res.done += 1
    res.seconds = sum(res.latencies)
    return res


async def certs_list_store(env: dict, args, db_pid: int | None) -> Result:
    """The store call behind `certs list --expiring-within 400d --limit 20`, in this process (400 days
    and 20 rows: both stores have at least that many matches, so both phases return as many rows)."""
    from scepd.store.sql import SqlStore
    res = Result("certs list (store call)")
    store = await SqlStore.open(env["SCEPD_DATABASE_URL"], migrations=[])
    try:
        before = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=400)
        cpu0, db0 = time.process_time(), tree_cpu(db_pid) if db_pid else 0.0
        for _ in range(args.cli_runs * 5):
            t0 = time.perf_counter()
            rows = await store.list_certificates(expiring_before=before, limit=20)
            res.latencies.append(time.perf_counter() - t0)
            res.done += 1
            if len(rows) != 20:
                res.failures += 1
        res.cpu = time.process_time() - cpu0  # this process: the store call is made here
        res.db_cpu = tree_cpu(db_pid) - db0 if db_pid else 0.0
    finally:
        await store.close()
    res.seconds = sum(res.latencies)
    return res


async def explain_hot_queries(url: str, serial: str, subject: str, txid: str) -> list[dict]:
    """Every statement of the store-size-dependent reads, run on the seeded store and explained
    there (EXPLAIN QUERY PLAN on SQLite, EXPLAIN ANALYZE on PostgreSQL), with its time."""
    import re

    from sqlalchemy import event

    from scepd.clock import SystemClock
    from scepd.ops.metrics import Metrics
    from scepd.store.sql import SqlStore
    store = await SqlStore.open(url, migrations=[])
    captured: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if re.match(r"\s*SELECT", statement, re.I) and "schema_version" not in statement:
            captured.append((statement, parameters))
    now = dt.datetime.now(dt.timezone.utc)
    event.listen(store.engine.sync_engine, "before_cursor_execute", capture)
    try:
        await store.get_certificate(serial)                        # OCSP, renewal, GetCert
        await store.find_valid_by_subject(subject, now)            # duplicate_subjects = refuse
        await store.find_transaction(txid)                         # SCEP retry / GetCertInitial
        await store.list_certificates(expiring_before=now + dt.timedelta(days=30), limit=100)
        await store.list_revoked((await store.get_certificate(serial)).ca_id)  # the CRL's read
        await store.revocation_generation()                        # CRL freshness
        await Metrics(store, SystemClock()).refresh()              # /metrics
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", capture)
    out = []
    postgres = url.startswith("postgresql")
    async with store.engine.connect() as conn:
        for statement, params in captured:
            explain = "EXPLAIN (ANALYZE, BUFFERS) " if postgres else "EXPLAIN QUERY PLAN "
            t0 = time.perf_counter()
            if not postgres:
                (await conn.exec_driver_sql(statement, params)).all()
            seconds = time.perf_counter() - t0
            plan = " | ".join(str(r[-1]).strip() for r in (await conn.exec_driver_sql(explain + statement, params)).all())
            if postgres:
                m = re.search(r"Execution Time: ([\d.]+) ms", plan)
                seconds = float(m.group(1)) / 1000 if m else seconds
            out.append({"statement": " ".join(statement.split()), "plan": plan, "ms": seconds * 1000})
    await store.close()
    return out


def template_der(state: Path) -> bytes:
    """One leaf certificate of this state's CA (RSA-2048 key, the extensions the CA adds): the DER
    reused by every seeded row."""
    material = pki.load(state, None)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "seed-template.example")]))
            .issuer_name(material.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("seed-template.example")]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(material.cert.public_key()),
                           critical=False)
            .sign(material.key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


#: The migrations this benchmark's fixes added: the seeded store is created without them, so its
#: first start measures the upgrade of a million-row database (index build, counter backfill).
NEW_MIGRATIONS = {("core", 5), ("metrics", 1)}


async def create_old_schema(url: str) -> None:
    from scepd.http.assembly import migrations
    from scepd.store.sql import SqlStore
    store = await SqlStore.open(url, [m for m in migrations() if m[:2] not in NEW_MIGRATIONS])
    await store.close()


def median_of(runs: list[dict]) -> dict:
    """Per operation, the median over rounds of throughput and of CPU ms per op."""
    out = {}
    for name in runs[0]["ops"]:
        ops = [r["ops"][name] for r in runs]
        out[name] = {k: statistics.median(o[k] for o in ops) for k in ("per_second", "cpu_ms", "db_cpu_ms", "p50_ms")}
        out[name]["done"] = sum(o["done"] for o in ops)
        out[name]["failures"] = sum(o["failures"] for o in ops)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=1_000_000, help="certificates to seed")
    ap.add_argument("--postgres", action="store_true", help="start a throwaway PostgreSQL on 127.0.0.1")
    ap.add_argument("--database-url", default=None,
                    help="postgresql+asyncpg://... an empty database to seed (with --empty-database-url)")
    ap.add_argument("--empty-database-url", default=None, help="a second empty database, kept empty")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--renewals", type=int, default=60)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="empty/seeded alternations (medians reported)")
    ap.add_argument("--cli-runs", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=60, help="bound of each measured load")
    ap.add_argument("--quick", action="store_true", help="20,000 rows, few requests (smoke test)")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    ap.add_argument("--keep", action="store_true", help="keep the state directories")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if args.quick:
        args.count, args.requests, args.renewals, args.cli_runs = min(args.count, 20_000), 12, 6, 1
        args.max_seconds, args.rounds = min(args.max_seconds, 30), 1
    if bool(args.database_url) != bool(args.empty_database_url):
        ap.error("--database-url and --empty-database-url go together")
    cluster = None
    top = Path(tempfile.mkdtemp(prefix="scepd-flat-"))
    states = {"empty": top / "empty", "seeded": top / "seeded"}
    urls = {"empty": args.empty_database_url, "seeded": args.database_url}
    port = free_port()
    db_pid = None  # the postmaster, whose process tree's CPU is PostgreSQL's share
    try:
        if args.postgres and not args.database_url:
            from tests import pg
            cluster = pg.PostgresCluster().start()
            urls = {k: cluster.create_database(f"scepd_flat_{k}") for k in states}
            db_pid = int((cluster.data / "postmaster.pid").read_text().split()[0])
        for k, state in states.items():
            urls[k] = urls[k] or f"sqlite+aiosqlite:///{state / 'scepd.db'}"
            out = subprocess.run([sys.executable, "-m", "scepd", "init", "--state-dir", str(state),
                                  "--insecure-unencrypted-root-key"],  # a throwaway CA
                                 capture_output=True, text=True, timeout=120)
            if out.returncode != 0:
                raise SystemExit(f"scepd init failed: {out.stdout}{out.stderr}")
            for leftover in state.glob("scepd.db*"):  # init made its database: start from none
                leftover.unlink()
        envs = {k: {**os.environ, "SCEPD_SERVER_HTTP": f"127.0.0.1:{port}",
                    "SCEPD_SCEP_STATIC_CHALLENGE": CHALLENGE, "SCEPD_LIMITS_ENABLED": "0",
                    "SCEPD_DATABASE_URL": urls[k], "SCEPD_SCEP_DUPLICATE_SUBJECTS": "refuse"} for k in states}
        backend = "PostgreSQL" if urls["seeded"].startswith("postgresql") else "SQLite"
        print(f"{backend}; {args.count:,} certificates; {args.requests} enrollments at concurrency "
              f"{args.concurrency}, {args.rounds} round(s); loadavg {loadavg()}", flush=True)

        # the seeded store: the schema before this benchmark's migrations, then the rows
        asyncio.run(create_old_schema(urls["seeded"]))
        ca_id, der = pki.load(states["seeded"], None).ca_id, template_der(states["seeded"])
        now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        t0 = time.perf_counter()
        rows = seed_rows(args.count, ca_id, der, now, random.Random(args.seed))
        if backend == "SQLite":
            seed_sqlite(Path(urls["seeded"].split("///", 1)[1]), rows)
        else:
            asyncio.run(seed_postgres(urls["seeded"], rows))
        seed_seconds = time.perf_counter() - t0
        print(f"seeded {args.count:,} certificates in {seed_seconds:.1f}s "
              f"({args.count / seed_seconds:,.0f} rows/s; one reused {len(der)}-byte DER)", flush=True)
        probe = next(r for r in seed_rows(args.count, ca_id, der, now, random.Random(args.seed))
                     if r[13] == "valid")[0]  # a valid seeded serial for OCSP: the same generator again

        probe_row = next(r for r in seed_rows(args.count, ca_id, der, now, random.Random(args.seed))
                         if r[13] == "valid" and r[8])
        plans = asyncio.run(explain_hot_queries(urls["seeded"], probe, probe_row[2], probe_row[8]))
        print("hot reads on the seeded store (before its upgrade):")
        for p in plans:
            print(f"  {p['ms']:8.2f} ms  {p['statement'][:150]}\n             {p['plan'][:400]}")

        runs: dict[str, list[dict]] = {"empty": [], "seeded": []}
        for r in range(args.rounds):  # alternate, so a change of load on the machine hits both
            for k in ("empty", "seeded"):
                runs[k].append(asyncio.run(phase(f"{k} {r + 1}", states[k], envs[k], port, args,
                                                 probe if k == "seeded" else None, db_pid)))
        plans_after = asyncio.run(explain_hot_queries(urls["seeded"], probe, probe_row[2], probe_row[8]))
        print("hot reads on the seeded store (after its upgrade):")
        for p in plans_after:
            print(f"  {p['ms']:8.2f} ms  {p['statement'][:150]}\n             {p['plan'][:400]}")
    finally:
        if cluster is not None:
            cluster.stop()
        if not args.keep:
            shutil.rmtree(top, ignore_errors=True)
    empty, seeded = median_of(runs["empty"]), median_of(runs["seeded"])
    upgrade = runs["seeded"][0]["startup_seconds"]
    starts = [p["startup_seconds"] for p in runs["seeded"][1:]]
    print(f"\n{backend}, {args.count:,} certificates seeded in {seed_seconds:.0f}s; first start on them "
          f"(upgrade: index + counter backfill) {upgrade:.1f}s"
          + (f", later starts {', '.join(f'{s:.1f}s' for s in starts)}" if starts else "")
          + f"; empty store start {runs['empty'][0]['startup_seconds']:.1f}s; "
          f"loadavg {', '.join(p['loadavg'] for k in ('empty', 'seeded') for p in runs[k])}")
    print(f"medians of {args.rounds} alternating round(s); ratio = median of each round's seeded / empty:")
    n = f"{args.count // 1_000_000}M" if args.count % 1_000_000 == 0 else f"{args.count / 1000:g}k"

    def ratio(name: str, key: str) -> str:
        """Median over rounds of seeded / empty, each round's pair measured back to back."""
        pairs = [s["ops"][name][key] / e["ops"][name][key]
                 for e, s in zip(runs["empty"], runs["seeded"]) if e["ops"][name][key]]
        return f"{statistics.median(pairs):.2f}" if pairs else "–"
    pg_cols = db_pid is not None
    print(f"| operation | empty ops/s | {n} ops/s | ratio | empty CPU ms/op | {n} CPU ms/op | ratio |"
          + (f" empty PostgreSQL CPU ms/op | {n} PostgreSQL CPU ms/op |" if pg_cols else ""))
    print("|---|---|---|---|---|---|---|" + ("---|---|" if pg_cols else ""))
    for name, e in empty.items():
        s = seeded[name]
        print(f"| {name} | {e['per_second']:.1f} | {s['per_second']:.1f} | {ratio(name, 'per_second')} | "
              f"{e['cpu_ms']:.2f} | {s['cpu_ms']:.2f} | {ratio(name, 'cpu_ms')} |"
              + (f" {e['db_cpu_ms']:.2f} | {s['db_cpu_ms']:.2f} |" if pg_cols else ""))
    failures = sum(o["failures"] for p in (empty, seeded) for o in p.values())
    # the seeded rows are visible to the server as valid certificates (format, counter, index)
    seeded_valid = sum(1 for i in range(args.count) if i % 500 != 7)
    active = runs["seeded"][-1]["metrics"].get("scepd_certificates_active", 0)
    if active < seeded_valid:
        print(f"scepd_certificates_active {active:.0f} < {seeded_valid} valid seeded certificates")
        failures += 1
    print(f"failures: {failures}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "backend": backend, "count": args.count, "seed_seconds": seed_seconds, "upgrade_seconds": upgrade,
            "empty": {"ops": empty, "metrics": runs["empty"][-1]["metrics"]},
            "seeded": {"ops": seeded, "metrics": runs["seeded"][-1]["metrics"]},
            "rounds": runs, "plans_before_upgrade": plans, "plans_after_upgrade": plans_after,
            "failures": failures}, indent=2))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
