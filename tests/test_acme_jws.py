"""ACME transport rules through the real app: every malformed, replayed or unauthenticated
request gets the exact RFC 8555 problem type, a Replay-Nonce and never a 500."""
from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import hashes, hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from scepd.http.app import create_https_app

from .helpers import make_csr, rsa_key

P = "urn:ietf:params:acme:error:"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rsa_jwk(key) -> dict:
    n = key.public_key().public_numbers()
    return {"kty": "RSA", "n": b64(n.n.to_bytes((n.n.bit_length() + 7) // 8, "big")),
            "e": b64(n.e.to_bytes(3, "big"))}


def sign(key, protected: dict, payload: bytes | None, alg: str = "RS256", extra: dict | None = None) -> bytes:
    p64 = b64(json.dumps(protected).encode())
    pl64 = "" if payload is None else b64(payload)
    data = f"{p64}.{pl64}".encode()
    if alg == "RS256":
        sig = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    elif alg == "ES256":
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    elif alg == "HS256":
        h = crypto_hmac.HMAC(b"k" * 32, hashes.SHA256())
        h.update(data)
        sig = h.finalize()
    else:
        sig = b""
    body = {"protected": p64, "payload": pl64, "signature": b64(sig)}
    body.update(extra or {})
    return json.dumps(body).encode()


class Acme:
    def __init__(self, client, key):
        self.client, self.key, self.kid = client, key, None

    def url(self, path: str) -> str:
        return str(self.client.make_url(path))

    async def nonce(self) -> str:
        resp = await self.client.head("/acme/new-nonce")
        assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
        return resp.headers["Replay-Nonce"]

    async def post(self, path, payload, *, jwk=False, nonce=None, url=None, alg="RS256", key=None,
                   extra_header=None, content_type="application/jose+json", extra=None, kid=None):
        protected = {"alg": alg, "nonce": nonce or await self.nonce(), "url": url or self.url(path)}
        if jwk:
            protected["jwk"] = rsa_jwk(key or self.key)
        else:
            protected["kid"] = kid or self.kid
        protected.update(extra_header or {})
        raw = None if payload is None else json.dumps(payload).encode()
        body = sign(key or self.key, protected, raw, alg, extra)
        resp = await self.client.post(path, data=body, headers={"Content-Type": content_type})
        assert resp.status != 500
        assert "Replay-Nonce" in resp.headers
        return resp

    async def register(self):
        resp = await self.post("/acme/new-account", {"termsOfServiceAgreed": True}, jwk=True)
        assert resp.status == 201
        self.kid = resp.headers["Location"]
        return resp


@pytest.fixture
async def acme(aiohttp_client, services):
    client = await aiohttp_client(create_https_app(services))
    a = Acme(client, rsa_key(0))
    await a.register()
    return a


async def problem_type(resp) -> str:
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    return (await resp.json())["type"]


async def test_directory_and_nonce(acme):
    d = await (await acme.client.get("/acme/directory")).json()
    assert set(d) >= {"newNonce", "newAccount", "newOrder", "revokeCert", "keyChange", "meta"}
    resp = await acme.client.get("/acme/new-nonce")
    assert resp.status == 204 and resp.headers["Replay-Nonce"]
    assert 'rel="index"' in resp.headers["Link"]


async def test_existing_account_returns_200_and_empty_fetch(acme):
    resp = await acme.post("/acme/new-account", {"onlyReturnExisting": True}, jwk=True)
    assert resp.status == 200 and resp.headers["Location"] == acme.kid
    resp = await acme.post("/acme/acct/" + acme.kid.rsplit("/", 1)[1], {})  # dehydrated fetches with {}
    assert resp.status == 200 and (await resp.json())["status"] == "valid"


async def test_only_return_existing_unknown_key(acme):
    resp = await acme.post("/acme/new-account", {"onlyReturnExisting": True}, jwk=True, key=rsa_key(2))
    assert await problem_type(resp) == P + "accountDoesNotExist"


@pytest.mark.parametrize("case,ptype,status", [
    ("replayed-nonce", "badNonce", 400),
    ("bogus-nonce", "badNonce", 400),
    ("missing-nonce", "badNonce", 400),
    ("wrong-url", "unauthorized", 403),
    ("alg-none", "badSignatureAlgorithm", 400),
    ("hs256", "badSignatureAlgorithm", 400),
    ("jwk-and-kid", "malformed", 400),
    ("unknown-kid", "accountDoesNotExist", 400),
    ("unprotected-header", "malformed", 400),
    ("wrong-content-type", "malformed", 415),
    ("bad-signature", "malformed", 400),
    ("not-json", "malformed", 400),
])
async def test_jws_rejections(acme, case, ptype, status):
    order = {"identifiers": [{"type": "dns", "value": "x.example.test"}]}
    path = "/acme/new-order"
    if case == "replayed-nonce":
        n = await acme.nonce()
        assert (await acme.post(path, order, nonce=n)).status == 201
        resp = await acme.post(path, order, nonce=n)
    elif case == "bogus-nonce":
        resp = await acme.post(path, order, nonce="not-a-nonce")
    elif case == "missing-nonce":
        p64 = b64(json.dumps({"alg": "RS256", "kid": acme.kid, "url": acme.url(path)}).encode())
        data = f"{p64}.{b64(json.dumps(order).encode())}".encode()
        body = json.dumps({"protected": p64, "payload": b64(json.dumps(order).encode()),
                           "signature": b64(acme.key.sign(data, padding.PKCS1v15(), hashes.SHA256()))})
        resp = await acme.client.post(path, data=body, headers={"Content-Type": "application/jose+json"})
    elif case == "wrong-url":
        resp = await acme.post(path, order, url=acme.url("/acme/new-account"))
    elif case == "alg-none":
        resp = await acme.post(path, order, alg="none")
    elif case == "hs256":
        resp = await acme.post(path, order, alg="HS256")
    elif case == "jwk-and-kid":
        resp = await acme.post(path, order, extra_header={"jwk": rsa_jwk(acme.key)})
    elif case == "unknown-kid":
        resp = await acme.post(path, order, kid=acme.url("/acme/acct/nobody"))
    elif case == "unprotected-header":
        resp = await acme.post(path, order, extra={"header": {"kid": acme.kid}})
    elif case == "wrong-content-type":
        resp = await acme.post(path, order, content_type="application/json")
    elif case == "bad-signature":
        resp = await acme.post(path, order, key=rsa_key(3))
    else:
        resp = await acme.client.post(path, data=b"{nope", headers={"Content-Type": "application/jose+json"})
    assert resp.status == status
    assert await problem_type(resp) == P + ptype


async def test_deactivated_account_is_unauthorized(acme):
    path = "/acme/acct/" + acme.kid.rsplit("/", 1)[1]
    resp = await acme.post(path, {"status": "deactivated"})
    assert (await resp.json())["status"] == "deactivated"
    resp = await acme.post("/acme/new-order", {"identifiers": [{"type": "dns", "value": "a.example.test"}]})
    assert await problem_type(resp) == P + "unauthorized"


@pytest.mark.parametrize("value", ["*.example.test.", "bad..name", "-x.example.test", "a.*.example.test", "*.test", "**.example.test"])
async def test_rejected_identifiers(acme, value):
    resp = await acme.post("/acme/new-order", {"identifiers": [{"type": "dns", "value": value}]})
    assert await problem_type(resp) == P + "rejectedIdentifier"


async def test_finalize_before_ready_is_order_not_ready(acme):
    resp = await acme.post("/acme/new-order", {"identifiers": [{"type": "dns", "value": "f.example.test"}]})
    order = await resp.json()
    csr = make_csr(rsa_key(1), "f.example.test")
    resp = await acme.post("/acme/order/" + order["finalize"].split("/")[-2] + "/finalize", {"csr": b64(csr)})
    assert resp.status == 403 and await problem_type(resp) == P + "orderNotReady"


async def test_other_accounts_resources_are_hidden(acme):
    resp = await acme.post("/acme/new-order", {"identifiers": [{"type": "dns", "value": "h.example.test"}]})
    order_url = resp.headers["Location"]
    other = Acme(acme.client, rsa_key(2))
    await other.register()
    path = "/acme/order/" + order_url.rsplit("/", 1)[1]
    resp = await other.post(path, None)
    assert resp.status == 404


async def test_key_change_conflict(acme):
    other = Acme(acme.client, rsa_key(2))
    await other.register()
    inner_protected = {"alg": "RS256", "jwk": rsa_jwk(rsa_key(2)), "url": acme.url("/acme/key-change")}
    inner = sign(rsa_key(2), inner_protected, json.dumps({"account": acme.kid, "oldKey": rsa_jwk(acme.key)}).encode())
    resp = await acme.post("/acme/key-change", json.loads(inner))
    assert resp.status == 409 and resp.headers["Location"] == other.kid
    new = rsa_key(3)
    inner_protected["jwk"] = rsa_jwk(new)
    inner = sign(new, inner_protected, json.dumps({"account": acme.kid, "oldKey": rsa_jwk(acme.key)}).encode())
    resp = await acme.post("/acme/key-change", json.loads(inner))
    assert resp.status == 200
    acme.key = new  # the old key no longer works, the new one does
    resp = await acme.post("/acme/acct/" + acme.kid.rsplit("/", 1)[1], {})
    assert resp.status == 200


async def test_problems_are_counted_in_metrics(acme, services, aiohttp_client):
    from scepd.http.app import create_app

    from .test_metrics_audit import _get, _scrape
    await acme.post("/acme/new-order", {"identifiers": []}, nonce="stale")
    http = await aiohttp_client(create_app(services))
    assert _get(await _scrape(http), "scepd_acme_problems_total", type="badNonce") == 1


def test_okp_thumbprint_matches_rfc8037_vector():
    from acme import jws
    key = jws.load_jwk({"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"})
    assert jws.thumbprint(key) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


async def test_eddsa_account_and_order(acme):
    """RFC 8037: an Ed25519 account key signs with alg EdDSA; a mismatched alg is refused."""
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    key = ed25519.Ed25519PrivateKey.generate()
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))}

    async def post(path, payload, header, alg="EdDSA"):
        protected = {"alg": alg, "nonce": await acme.nonce(), "url": acme.url(path), **header}
        p64, pl64 = b64(json.dumps(protected).encode()), b64(json.dumps(payload).encode())
        sig = key.sign(f"{p64}.{pl64}".encode())
        body = json.dumps({"protected": p64, "payload": pl64, "signature": b64(sig)}).encode()
        return await acme.client.post(path, data=body, headers={"Content-Type": "application/jose+json"})
    resp = await post("/acme/new-account", {"termsOfServiceAgreed": True}, {"jwk": jwk})
    assert resp.status == 201, await resp.text()
    kid = resp.headers["Location"]
    resp = await post("/acme/new-order", {"identifiers": [{"type": "dns", "value": "ed.example.test"}]}, {"kid": kid})
    assert resp.status == 201, await resp.text()
    resp = await post("/acme/new-order", {"identifiers": [{"type": "dns", "value": "ed.example.test"}]},
                      {"kid": kid}, alg="ES256")
    assert await problem_type(resp) == P + "badSignatureAlgorithm"
    resp = await post("/acme/new-account", {}, {"jwk": {**jwk, "crv": "Ed448"}})
    assert await problem_type(resp) == P + "malformed"


# --- stateless nonces (issue 13): issuing writes nothing, redeeming is one insert ---------------

def sql_trace(store) -> list[str]:
    """Every SQL statement the store executes from now on, on each of its engines (the async
    one and, on SQLite, the synchronous one behind `read`/`write` units), BEGINs included."""
    import sqlalchemy as sa

    seen: list[str] = []
    units = getattr(store, "_units", None)
    for engine in store.sync_engines():
        sa.event.listen(engine, "before_cursor_execute",
                        lambda _c, _cur, statement, *_r: seen.append(" ".join(statement.split())))
    if units is not None:  # the units' BEGIN goes straight to the driver: seen at the begin event
        sa.event.listen(units.engine, "begin", lambda conn: seen.append(
            "BEGIN IMMEDIATE" if conn.get_execution_options().get("sqlite_immediate") else "BEGIN"))
    return seen


def _writes(services) -> list[str]:
    """Collects every write statement the store executes from now on."""
    trace = sql_trace(services.store)

    class Writes(list):
        def _now(self):
            return [s for s in trace if s.split(None, 1)[0].upper() in {"INSERT", "UPDATE", "DELETE", "REPLACE"}]

        def __eq__(self, other):
            return self._now() == other

        def __iter__(self):
            return iter(self._now())
    return Writes()


async def test_new_nonce_writes_nothing(acme, services):
    await acme.nonce()  # the first nonce of a database may create the shared key
    writes = _writes(services)
    nonces = {await acme.nonce() for _ in range(5)}
    nonces.add((await acme.client.get("/acme/new-nonce")).headers["Replay-Nonce"])
    assert len(nonces) == 6 and writes == []
    # redeeming one is a single insert (no read-modify-write)
    assert (await acme.post("/acme/acct/" + acme.kid.rsplit("/", 1)[1], {}, nonce=nonces.pop())).status == 200
    assert [w.split()[:3] for w in writes] == [["INSERT", "INTO", "acme_used_nonces"]]


async def test_kid_post_as_get_is_one_unit(acme, services):
    """Issue 13: a kid-signed POST-as-GET is one unit: its nonce spent first (the insert), then
    its account and the object it asks for read in the same transaction (before: a read unit
    and a write unit of its own for the nonce, two thread hops)."""
    resp = await acme.post("/acme/new-order", {"identifiers": [{"type": "dns", "value": "u.example.test"}]})
    order_path = "/acme/order/" + resp.headers["Location"].rsplit("/", 1)[1]
    seen = sql_trace(services.store)
    resp = await acme.post(order_path, None)
    assert resp.status == 200 and (await resp.json())["status"] == "pending"
    heads = [" ".join(s.split()[:2]) for s in seen]
    assert heads.count("BEGIN IMMEDIATE") == 1 and heads.count("BEGIN") == 0, heads
    write = heads.index("BEGIN IMMEDIATE")
    assert heads[write + 1] == "INSERT INTO" and "acme_used_nonces" in seen[write + 1], heads
    selects = [s.split(" FROM ", 1)[1].split()[0].split(".")[0] for s in seen if s.startswith("SELECT")]
    assert selects == ["acme_accounts", "acme_orders", "acme_authzs"], seen
    assert sum(1 for s in seen if s.split()[0] in ("INSERT", "UPDATE", "DELETE")) == 1
    # a replayed nonce is refused before anything is read
    seen.clear()
    nonce = await acme.nonce()
    assert (await acme.post(order_path, None, nonce=nonce)).status == 200
    resp = await acme.post(order_path, None, nonce=nonce)
    assert await problem_type(resp) == P + "badNonce"


@pytest.mark.parametrize("case", ["mac-flipped", "id-changed", "other-key", "truncated", "expired", "future"])
async def test_forged_or_expired_nonce_is_bad_nonce(acme, services, clock, case):
    """Nothing but an untouched, unexpired nonce of this database is accepted."""
    import datetime as dt
    import hmac as std_hmac

    from acme.jws import b64u_decode, b64u_encode
    from acme.service import NONCE_LIFETIME

    path = "/acme/acct/" + acme.kid.rsplit("/", 1)[1]
    raw = bytearray(b64u_decode(await acme.nonce()))
    if case == "mac-flipped":
        raw[-1] ^= 1
    elif case == "id-changed":
        raw[0] ^= 1
    elif case == "other-key":
        body = bytes(raw[:24])
        raw = bytearray(body + std_hmac.new(b"k" * 32, b"scepd-acme-nonce\0" + body, "sha256").digest()[:16])
    elif case == "truncated":
        raw = raw[:-1]
    elif case == "expired":
        clock.advance(NONCE_LIFETIME + dt.timedelta(seconds=1))
    elif case == "future":
        clock.advance(-dt.timedelta(hours=1))
    resp = await acme.post(path, {}, nonce=b64u_encode(bytes(raw)))
    assert resp.status == 400 and await problem_type(resp) == P + "badNonce"
    # and the client's retry with the fresh Replay-Nonce of that answer works
    assert (await acme.post(path, {}, nonce=resp.headers["Replay-Nonce"])).status == 200


async def test_nonce_single_use_across_restart_and_pruned_after_expiry(make_services, aiohttp_client, clock):
    """A nonce issued before a restart is good once after it; the used-nonce record outlives the
    process and is pruned by time only once the nonce itself is expired."""
    import datetime as dt

    import sqlalchemy as sa

    from acme.service import NONCE_CLOCK_SKEW, NONCE_LIFETIME
    from acme.store import used_nonces

    async def open_acme():
        services = await make_services()
        a = Acme(await aiohttp_client(create_https_app(services)), rsa_key(0))
        resp = await a.post("/acme/new-account", {"termsOfServiceAgreed": True}, jwk=True)
        assert resp.status in (200, 201)  # 200: the account exists (second process)
        a.kid = resp.headers["Location"]
        return services, a

    first, a = await open_acme()
    kept, replayed = await a.nonce(), await a.nonce()
    path = "/acme/acct/" + a.kid.rsplit("/", 1)[1]
    assert (await a.post(path, {}, nonce=replayed)).status == 200
    await first.close()

    second, b = await open_acme()
    assert (await b.post(path, {}, nonce=kept)).status == 200
    for nonce in (kept, replayed):
        assert await problem_type(await b.post(path, {}, nonce=nonce)) == P + "badNonce"

    async def used() -> int:
        async with second.store.engine.connect() as conn:
            return (await conn.execute(sa.select(sa.func.count()).select_from(used_nonces))).scalar_one()
    before = await used()
    assert before >= 4
    clock.advance(NONCE_LIFETIME + NONCE_CLOCK_SKEW + dt.timedelta(minutes=1))
    assert (await b.post(path, {})).status == 200  # redeeming prunes the expired records
    assert await used() == 1
    assert await problem_type(await b.post(path, {}, nonce=kept)) == P + "badNonce"


# --- the parsed account key cache (issue 13) --------------------------------------------------

def _rollover_elsewhere(services, account_id: str, new_key) -> None:
    """What a keyChange by another process on the same database leaves behind: the row names
    the new key (this process's cache is not told)."""
    from acme import jws
    from acme.store import accounts
    import sqlalchemy as sa

    jwk = rsa_jwk(new_key)
    tp = jws.thumbprint(jws.load_jwk(jwk))
    return services.store.write(lambda conn: conn.execute(
        sa.update(accounts).where(accounts.c.id == account_id).values(jwk=json.dumps(jwk), thumbprint=tp)))


async def test_account_key_is_parsed_once_per_process(acme, monkeypatch):
    """kid-signed requests reuse the parsed account key (josepy's JWK parse is the slow part
    of a request's authentication): newAccount's jwk, verified there, is the cached key, so
    its kid requests parse none."""
    from acme import jws
    parsed = []
    real = jws.load_jwk
    monkeypatch.setattr(jws, "load_jwk", lambda jwk: parsed.append(1) or real(jwk))
    path = "/acme/acct/" + acme.kid.rsplit("/", 1)[1]
    for _ in range(3):
        assert (await acme.post(path, None)).status == 200
    assert len(parsed) == 0


async def test_account_key_cache_honours_rollover_and_deactivation_by_another_process(acme, services):
    from acme.store import accounts
    import sqlalchemy as sa

    account_id = acme.kid.rsplit("/", 1)[1]
    path = "/acme/acct/" + account_id
    assert (await acme.post(path, None)).status == 200  # the old key is cached now
    new_key = rsa_key(3)
    await _rollover_elsewhere(services, account_id, new_key)
    resp = await acme.post(path, None)  # signed with the old key: refused at once
    assert resp.status == 400 and await problem_type(resp) == P + "malformed"
    assert "does not verify" in (await resp.json())["detail"]
    assert (await acme.post(path, None, key=new_key)).status == 200
    await services.store.write(lambda conn: conn.execute(
        sa.update(accounts).where(accounts.c.id == account_id).values(status="deactivated")))
    resp = await acme.post(path, None, key=new_key)  # cached key, deactivated row: refused
    assert resp.status == 401 and await problem_type(resp) == P + "unauthorized"
    assert "deactivated" in (await resp.json())["detail"]


async def test_concurrent_write_units_commit_together_and_fail_alone(database_url):
    """Group commit (issue 13): write units submitted together run in one transaction; a
    replayed nonce among them fails alone (the batch runs again, each unit in a savepoint) and
    the other units are committed (SQLite and PostgreSQL: there a failed statement must not void
    the others' transaction)."""
    from scepd.http.assembly import open_store

    store = await open_store(database_url)
    try:
        await _batched_units(store)
    finally:
        await store.close()


async def _batched_units(store):
    import asyncio
    import datetime as dt

    import sqlalchemy as sa

    from acme.store import NonceUsed, WriteBatcher, spend_nonce, used_nonces

    batcher = WriteBatcher(store)
    expires = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)

    def spend(*ids):
        return asyncio.gather(*(batcher.write(lambda conn, n=n: spend_nonce(conn, n, expires, None)) for n in ids),
                              return_exceptions=True)

    seen = sql_trace(store)
    assert await spend("n-0", "n-00", "n-000") == [None, None, None]
    heads = [" ".join(s.split()[:2]) for s in seen]
    assert heads.count("INSERT INTO") == 3 and heads.count("BEGIN IMMEDIATE") <= 1  # PostgreSQL: implicit
    assert not any(h.startswith("SAVEPOINT") for h in heads)  # no failure: no savepoints
    results = await spend("n-1", "n-2", "n-1", "n-3")
    assert [type(r).__name__ for r in results] == ["NoneType", "NoneType", "NonceUsed", "NoneType"]
    assert isinstance(results[2], NonceUsed)
    ids = await store.read(lambda conn: sorted(r[0] for r in conn.execute(sa.select(used_nonces.c.id))))
    assert ids == ["n-0", "n-00", "n-000", "n-1", "n-2", "n-3"]
    # alone, a unit is its own transaction
    seen.clear()
    await batcher.write(lambda conn: spend_nonce(conn, "n-4", expires, None))
    assert not any(s.startswith("SAVEPOINT") for s in seen)
