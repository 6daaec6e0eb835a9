"""One contract for every store backend: SQLite (default) and a real PostgreSQL 15."""
from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from scepd import config as config_mod
from scepd.http.app import create_app, open_services
from scepd.store import AuditRecord, CertificateRecord, Conflict, PendingRecord, SqlStore, StoreNotFound

from .conftest import NOW
from .helpers import make_csr, pkcs_req, rsa_key, self_signed
from .test_acme_ari import responder  # noqa: F401  (fixture: a real http-01 responder)


def cert(serial: str, **kw) -> CertificateRecord:
    base = dict(serial=serial, ca_id="ca1", subject=f"CN={serial}", sans=("DNS:x.example",),
                not_before=NOW, not_after=NOW + dt.timedelta(days=90), profile="device", protocol="scep",
                transaction_id=f"txn-{serial}", requester="test", spki_sha256="ab" * 32,
                der=b"\x30\x00", issued_at=NOW)
    base.update(kw)
    return CertificateRecord(**base)


@pytest.fixture
async def store(database_url):
    s = await SqlStore.open(database_url)
    yield s
    await s.close()


async def test_migrations_are_idempotent(database_url):
    from scepd.http.assembly import open_store
    for _ in range(2):
        s = await open_store(database_url)
        await s.close()


def test_one_ordered_list_names_every_migration():
    """scepd.http.assembly.migrations() is the one list: every component's versions once, ascending,
    core first; the component modules only declare their steps, nothing registers on import."""
    from acme import store as acme_store
    from scepd.http.assembly import migrations
    from scepd.admin import service as admin
    from scepd.ops import agents, audit
    from scepd.ca import crl
    from scepd.store import sql
    listed = [(component, version) for component, version, _ in migrations()]
    assert len(set(listed)) == len(listed)
    assert listed[:len(sql.MIGRATIONS["core"])] == [("core", v) for v, _ in sql.MIGRATIONS["core"]]
    for component in {c for c, _ in listed}:
        versions = [v for c, v in listed if c == component]
        assert versions == sorted(versions) == list(range(1, len(versions) + 1)), component
    declared = {("ops", v) for m in (crl, audit, admin) for v, _ in m.MIGRATIONS}
    declared |= {("agents", v) for v, _ in agents.MIGRATIONS} | {("acme", v) for v, _ in acme_store.MIGRATIONS}
    assert declared <= set(listed)
    assert not hasattr(sql, "register_migrations")


async def test_what_a_database_gets_does_not_depend_on_what_was_imported(database_url):
    """Component modules used to register their migrations on import, so a new database got
    whatever the process had imported. SqlStore.open applies the list it is given (default: the
    store's own tables); scepd.http.assembly.open_store applies the one ordered list."""
    import sqlalchemy as sa

    import acme.store  # noqa: F401  (imported: must not change what SqlStore.open applies)
    import scepd.ops.agents  # noqa: F401
    import scepd.ca.crl  # noqa: F401
    from scepd.store.sql import schema_version

    async def applied(s) -> set[tuple[str, int]]:
        async with s.engine.connect() as conn:
            return {(r[0], r[1]) for r in await conn.execute(
                sa.select(schema_version.c.component, schema_version.c.version))}
    s = await SqlStore.open(database_url)
    try:
        assert {c for c, _ in await applied(s)} == {"core"}
    finally:
        await s.close()
    from scepd.http.assembly import migrations, open_store
    s = await open_store(database_url)
    try:
        assert await applied(s) == {(c, v) for c, v, _ in migrations()}
        async with s.engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(sa.inspect(c).get_table_names()))
        assert {"acme_accounts", "acme_orders", "crl_state", "admin_tokens", "agents"} <= tables
    finally:
        await s.close()


async def test_certificate_round_trip_and_unique_serial(store):
    async with store.transaction() as tx:
        await tx.insert_certificate(cert("a1"))
    got = await store.get_certificate("a1")
    assert got == cert("a1")
    assert got.not_after.tzinfo is not None
    with pytest.raises(Conflict):
        async with store.transaction() as tx:
            await tx.insert_certificate(cert("a1", subject="CN=other"))
    assert (await store.get_certificate("a1")).subject == "CN=a1"
    with pytest.raises(StoreNotFound):
        await store.get_certificate("nope")


async def test_failed_transaction_leaves_nothing(store):
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.insert_certificate(cert("b1"))
            await tx.audit(AuditRecord(at=NOW, event="certificate.issued", serial="b1"))
            raise RuntimeError("crash between steps")
    assert await store.list_certificates() == []
    assert await store.list_audit() == []


async def test_listing_expiry_and_transaction_lookup(store):
    async with store.transaction() as tx:
        await tx.insert_certificate(cert("c1", not_after=NOW + dt.timedelta(days=5)))
        await tx.insert_certificate(cert("c2", not_after=NOW + dt.timedelta(days=50)))
    soon = await store.list_certificates(expiring_before=NOW + dt.timedelta(days=30))
    assert [r.serial for r in soon] == ["c1"]
    found = await store.find_certificate_for_transaction("txn-c2", "ab" * 32)
    assert found.serial == "c2"
    assert await store.find_certificate_for_transaction("txn-c2", "cd" * 32) is None


async def test_revocation(store):
    async with store.transaction() as tx:
        await tx.insert_certificate(cert("d1"))
    async with store.transaction() as tx:
        assert await tx.revoke_certificate("d1", "keyCompromise", NOW) is True
    async with store.transaction() as tx:
        assert await tx.revoke_certificate("d1", "superseded", NOW) is False
    with pytest.raises(StoreNotFound):
        async with store.transaction() as tx:
            await tx.revoke_certificate("zz", "superseded", NOW)
    rec = await store.get_certificate("d1")
    assert rec.status == "revoked" and rec.revocation_reason == "keyCompromise"
    assert [r.serial for r in await store.list_revoked("ca1")] == ["d1"]


async def test_revocation_generation_moves_with_each_revocation_only(store):
    """The CRL's cheap change check: bumped in the revoking transaction, by nothing else."""
    async with store.transaction() as tx:
        await tx.insert_certificate(cert("g1"))
        await tx.insert_certificate(cert("g2"))
    start = await store.revocation_generation()
    async with store.transaction() as tx:
        assert await tx.revoke_certificate("g1", "keyCompromise", NOW) is True
    assert await store.revocation_generation() == start + 1
    async with store.transaction() as tx:  # already revoked: no change
        assert await tx.revoke_certificate("g1", "superseded", NOW) is False
    with pytest.raises(RuntimeError):  # rolled back: neither the revocation nor the bump stays
        async with store.transaction() as tx:
            assert await tx.revoke_certificate("g2", "superseded", NOW) is True
            raise RuntimeError("abort")
    assert await store.revocation_generation() == start + 1
    assert (await store.get_certificate("g2")).status == "valid"


async def test_challenge_consumed_once_under_concurrency(store):
    async with store.transaction() as tx:
        cid = await tx.insert_challenge("ff" * 32, None, NOW, NOW + dt.timedelta(hours=1))

    async def consume(i: int) -> bool:
        async with store.transaction() as tx:
            return await tx.consume_challenge(cid, NOW, f"s{i}")
    results = await asyncio.gather(*(consume(i) for i in range(10)))
    assert results.count(True) == 1
    rec = await store.find_challenge("ff" * 32)
    assert rec.used_at is not None


async def test_pending_lifecycle(store):
    p = PendingRecord(id=0, transaction_id="t1", spki_sha256="aa", signer_spki_sha256="bb",
                      csr_der=b"csr", subject="CN=p", profile="device", protocol="scep",
                      requester=None, created_at=NOW)
    async with store.transaction() as tx:
        pid = await tx.insert_pending(p)
    with pytest.raises(Conflict):
        async with store.transaction() as tx:
            await tx.insert_pending(p)
    assert [r.id for r in await store.list_pending()] == [pid]
    async with store.transaction() as tx:
        assert await tx.decide_pending(pid, "rejected", NOW, "admin", reason="no") is True
        assert await tx.decide_pending(pid, "issued", NOW, "admin") is False
    assert (await store.get_pending(pid)).status == "rejected"
    assert await store.count_pending() == 0


async def test_two_replicas_share_one_database(database_url, state_dir, clock, aiohttp_client):
    """Two server processes on one database: a one-time challenge raced across both still
    yields exactly one certificate, and both see every certificate."""
    env = {"SCEPD_DATABASE_URL": database_url}
    a = await open_services(config_mod.load(state_dir, environ=env), clock)
    b = await open_services(config_mod.load(state_dir, environ=env), clock)
    try:
        ca, cb = await aiohttp_client(create_app(a)), await aiohttp_client(create_app(b))
        secret = await a.challenges.create(dt.timedelta(hours=1))
        msgs = []
        for i in range(10):
            key = rsa_key(i % 4)
            der, _, _ = pkcs_req(a.ca_material.cert, key, make_csr(key, f"rep-{i}", secret),
                                 signer=(self_signed(key), key))
            msgs.append(der)
        from scepd.scep import wire

        async def send(client, m):
            resp = await client.post("/scep?operation=PKIOperation", data=m)
            return wire.decode_cert_rep(await resp.read()).status
        statuses = await asyncio.gather(*(send(ca if i % 2 else cb, m) for i, m in enumerate(msgs)))
        assert statuses.count(wire.PkiStatus.SUCCESS) == 1
        assert len(await a.store.list_certificates()) == len(await b.store.list_certificates()) == 1
    finally:
        await a.close()
        await b.close()


async def test_acme_v4_adds_its_columns_to_a_v3_database(database_url):
    """A database migrated before acme v4 gains the order/authorization columns and the
    pagination index; the rows it holds stay readable."""
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    from acme import store as acme_store
    from scepd.store.sql import schema_version
    new_columns = {"profile", "not_before", "not_after", "processing_at", "wildcard"}
    old = sa.MetaData()
    for table in (acme_store.orders, acme_store.authzs):
        sa.Table(table.name, old, *[sa.Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
                                    for c in table.columns if c.name not in new_columns])
    engine = create_async_engine(database_url)
    async with engine.begin() as conn:
        await conn.run_sync(old.create_all)
        await conn.run_sync(lambda c: schema_version.create(c, checkfirst=True))
        for version in (1, 2, 3):
            await conn.execute(schema_version.insert().values(component="acme", version=version,
                                                              applied_at=NOW.replace(tzinfo=None)))
        await conn.execute(old.tables["acme_orders"].insert().values(
            id="o1", account_id="a1", status="pending", identifiers="[]", expires=NOW.replace(tzinfo=None),
            created_at=NOW.replace(tzinfo=None)))
    await engine.dispose()
    from scepd.http.assembly import open_store
    s = await open_store(database_url)
    try:
        db = acme_store.AcmeStore(s)
        row = await db.get(acme_store.orders, "o1")
        assert row["profile"] is None and row["processing_at"] is None
        assert await db.update(acme_store.orders, "o1", profile="agent")
        assert (await db.get(acme_store.orders, "o1"))["profile"] == "agent"
        page = await db.orders_page("a1", None, 10)
        assert [r["id"] for r in page] == ["o1"]
        async with s.engine.connect() as conn:
            indexes = await conn.run_sync(lambda c: {i["name"] for i in sa.inspect(c).get_indexes("acme_orders")})
        assert "ix_acme_orders_account_created" in indexes
    finally:
        await s.close()


async def test_core_v3_adds_challenge_names_and_profile_to_a_v2_database(database_url):
    """A database migrated before core v3 gains the challenges' names and profile columns; a
    challenge created then (bound by cn_pattern alone) reads that pattern as its one name."""
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    from scepd.enroll.challenges import secret_hash
    from scepd.store.sql import audit, certificates, challenges, pending_requests, schema_version
    old = sa.MetaData()
    for table in (certificates, audit, pending_requests):
        table.to_metadata(old)
    sa.Table(challenges.name, old, *[sa.Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
                                     for c in challenges.columns if c.name not in ("names", "profile")])
    engine = create_async_engine(database_url)
    async with engine.begin() as conn:
        await conn.run_sync(old.create_all)
        await conn.run_sync(lambda c: schema_version.create(c, checkfirst=True))
        for version in (1, 2):
            await conn.execute(schema_version.insert().values(component="core", version=version,
                                                              applied_at=NOW.replace(tzinfo=None)))
        await conn.execute(old.tables["challenges"].insert().values(
            secret_sha256=secret_hash("old"), cn_pattern="router-*", created_at=NOW.replace(tzinfo=None),
            expires_at=(NOW + dt.timedelta(hours=1)).replace(tzinfo=None)))
    await engine.dispose()
    s = await SqlStore.open(database_url)
    try:
        rec = await s.find_challenge(secret_hash("old"))
        assert (rec.cn_pattern, rec.names, rec.profile) == ("router-*", ("router-*",), None)
        async with s.transaction() as tx:
            await tx.insert_challenge(secret_hash("new"), None, NOW, NOW + dt.timedelta(hours=1),
                                      names=("a-*", "*.b"), profile="agent")
        rec = await s.find_challenge(secret_hash("new"))
        assert (rec.names, rec.profile) == (("a-*", "*.b"), "agent")
    finally:
        await s.close()


async def test_acme_across_two_replicas(database_url, state_dir, clock, aiohttp_client, responder):
    """ACME behind a load balancer: a nonce from one replica is good (once) at the other, and an
    order created on one is validated, finalized and downloaded through the other."""
    from cryptography import x509

    from scepd.http.app import create_https_app

    from .test_acme_ari import path_of, thumb
    from .test_acme_jws import P, Acme, b64, problem_type
    http, tokens = responder
    env = {"SCEPD_DATABASE_URL": database_url, "SCEPD_ACME_HTTP01_PORT": str(http.port),
           "SCEPD_ACME_RESOLVE": "*=127.0.0.1"}
    a = await open_services(config_mod.load(state_dir, environ=env), clock)
    b = await open_services(config_mod.load(state_dir, environ=env), clock)
    try:
        ra = Acme(await aiohttp_client(create_https_app(a)), rsa_key(0))
        rb = Acme(await aiohttp_client(create_https_app(b)), rsa_key(0))
        await ra.register()
        rb.kid = ra.kid
        nonce = await rb.nonce()
        order_req = {"identifiers": [{"type": "dns", "value": "lb.example.test"}]}
        resp = await ra.post("/acme/new-order", order_req, nonce=nonce)
        assert resp.status == 201, await resp.text()
        order = await resp.json()
        replay = await ra.post("/acme/new-order", order_req, nonce=nonce)
        assert await problem_type(replay) == P + "badNonce"
        authz = await (await rb.post(path_of(order["authorizations"][0]), None)).json()
        ch = next(c for c in authz["challenges"] if c["type"] == "http-01")
        tokens[ch["token"]] = f"{ch['token']}.{thumb(rb.key)}"
        assert (await rb.post(path_of(ch["url"]), {})).status == 200
        order_path = path_of(resp.headers["Location"])
        for _ in range(200):  # bounded
            order = await (await ra.post(order_path, None)).json()
            if order["status"] != "pending":
                break
            await asyncio.sleep(0.05)
        assert order["status"] == "ready", order
        csr = make_csr(rsa_key(1), None, sans=[x509.DNSName("lb.example.test")])
        order = await (await rb.post(path_of(order["finalize"]), {"csr": b64(csr)})).json()
        assert order["status"] == "valid", order
        pem = await (await ra.post(path_of(order["certificate"]), None)).read()
        cert = x509.load_pem_x509_certificates(pem)[0]
        assert (await a.store.get_certificate(format(cert.serial_number, "x"))).protocol == "acme"
    finally:
        await a.close()
        await b.close()
