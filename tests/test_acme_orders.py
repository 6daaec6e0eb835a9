"""ACME orders beyond http-01: dns-01 against a real DNS server on loopback, tls-alpn-01 against
a real TLS listener (RFC 8737), wildcards, profiles, notBefore/notAfter, rejectedIdentifier
subproblems, the orders list with pagination, asynchronous finalize and its recovery, and
revocation by an account holding authorizations."""
from __future__ import annotations

import asyncio
import datetime as dt
import ssl

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from acme import validators
from acme.service import ACME_PROFILES
from acme.store import challenges, orders
from scepd.http.app import create_https_app

from .acme_responders import DnsServer, free_port, tls_alpn_certificate
from . import helpers
from .helpers import make_csr, rsa_key
from .test_acme_ari import path_of, responder, thumb  # noqa: F401  (fixture)
from .test_acme_jws import P, Acme, b64, problem_type


@pytest.fixture
def dns_server():
    with DnsServer() as server:
        yield server


@pytest.fixture
async def lab(aiohttp_client, make_services, responder, dns_server):  # noqa: F811
    http, tokens = responder
    tls_port = free_port()
    services = await make_services({
        "SCEPD_ACME_HTTP01_PORT": str(http.port), "SCEPD_ACME_TLSALPN01_PORT": str(tls_port),
        "SCEPD_ACME_RESOLVE": "*=127.0.0.1", "SCEPD_ACME_DNS_RESOLVER": f"127.0.0.1:{dns_server.port}"})
    app = create_https_app(services)
    client = await aiohttp_client(app)
    a = Acme(client, rsa_key(0))
    await a.register()
    a.tokens, a.services, a.dns, a.tls_port, a.app = tokens, services, dns_server, tls_port, app
    from acme.server import ACME
    a.service = app[ACME]
    return a


async def new_order(acme, identifiers, **extra):
    resp = await acme.post("/acme/new-order", {"identifiers": identifiers, **extra})
    return resp, await resp.json()


async def get(acme, url):
    return await (await acme.post(path_of(url), None)).json()


async def wait_status(acme, url, until=("pending", "processing"), rounds=200):
    for _ in range(rounds):  # bounded: 200 x 50 ms
        body = await get(acme, url)
        if body["status"] not in until:
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} still {body['status']}")


async def finalize(acme, order, names, key_index=1):
    csr = make_csr(rsa_key(key_index), None, sans=[x509.DNSName(n) for n in names])
    resp = await acme.post(path_of(order["finalize"]), {"csr": b64(csr)})
    body = await resp.json()
    if body.get("status") == "processing":
        body = await wait_status(acme, resp.headers["Location"], until=("processing",))
    return resp, body


async def certificate(acme, order) -> x509.Certificate:
    resp = await acme.post(path_of(order["certificate"]), None)
    return x509.load_pem_x509_certificates(await resp.read())[0]


def key_authorization(acme, ch) -> str:
    return f"{ch['token']}.{thumb(acme.key)}"


# --- dns-01 and wildcards -----------------------------------------------------------------

async def test_wildcard_order_offers_only_dns01_and_issues(lab):
    resp, order = await new_order(lab, [{"type": "dns", "value": "*.W.example.test"},
                                        {"type": "dns", "value": "w.example.test"}])
    assert resp.status == 201
    assert order["identifiers"] == [{"type": "dns", "value": "*.w.example.test"},
                                    {"type": "dns", "value": "w.example.test"}]
    az = [await get(lab, u) for u in order["authorizations"]]
    wild = next(a for a in az if a.get("wildcard"))
    plain = next(a for a in az if not a.get("wildcard"))
    assert wild["identifier"] == {"type": "dns", "value": "w.example.test"}
    assert [c["type"] for c in wild["challenges"]] == ["dns-01"]
    assert sorted(c["type"] for c in plain["challenges"]) == ["dns-01", "http-01", "tls-alpn-01"]
    # both authorizations by dns-01: two TXT values at the same name, as RFC 8555 §8.4 allows
    txt = []
    for a in (wild, plain):
        ch = next(c for c in a["challenges"] if c["type"] == "dns-01")
        txt.append(validators.dns01_value(key_authorization(lab, ch)))
    lab.dns.records["_acme-challenge.w.example.test"] = txt
    for a in (wild, plain):
        ch = next(c for c in a["challenges"] if c["type"] == "dns-01")
        assert (await lab.post(path_of(ch["url"]), {})).status == 200
    order = await wait_status(lab, resp.headers["Location"])
    assert order["status"] == "ready", order
    wild = await get(lab, order["authorizations"][0])
    assert [c["type"] for c in wild["challenges"]] == ["dns-01"] and wild["challenges"][0]["status"] == "valid"
    _, order = await finalize(lab, order, ["*.w.example.test", "w.example.test"])
    assert order["status"] == "valid", order
    cert = await certificate(lab, order)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)
    assert sorted(names) == ["*.w.example.test", "w.example.test"]
    assert "_acme-challenge.w.example.test" in lab.dns.queries


async def test_wildcard_csr_without_wildcard_order_is_bad_csr(lab):
    resp, order = await new_order(lab, [{"type": "dns", "value": "x.example.test"}])
    a = await get(lab, order["authorizations"][0])
    ch = next(c for c in a["challenges"] if c["type"] == "http-01")
    lab.tokens[ch["token"]] = key_authorization(lab, ch)
    await lab.post(path_of(ch["url"]), {})
    order = await wait_status(lab, resp.headers["Location"])
    csr = make_csr(rsa_key(1), None, sans=[x509.DNSName("*.x.example.test")])
    resp = await lab.post(path_of(order["finalize"]), {"csr": b64(csr)})
    assert await problem_type(resp) == P + "badCSR"


@pytest.mark.parametrize("records, ptype", [
    ({"_acme-challenge.d.example.test": ["not-the-digest"]}, "incorrectResponse"),
    ({}, "dns"),  # NXDOMAIN
])
async def test_dns01_failures_invalidate_with_the_right_problem(lab, records, ptype):
    lab.dns.records.update(records)
    resp, order = await new_order(lab, [{"type": "dns", "value": "d.example.test"}])
    a = await get(lab, order["authorizations"][0])
    ch = next(c for c in a["challenges"] if c["type"] == "dns-01")
    await lab.post(path_of(ch["url"]), {})
    order = await wait_status(lab, resp.headers["Location"])
    assert order["status"] == "invalid"
    a = await get(lab, order["authorizations"][0])
    failed = next(c for c in a["challenges"] if c["type"] == "dns-01")
    assert a["status"] == "invalid" and failed["status"] == "invalid"
    assert failed["error"]["type"] == P + ptype


async def test_second_challenge_while_one_runs_changes_nothing(lab):
    resp, order = await new_order(lab, [{"type": "dns", "value": "two.example.test"}])
    a = await get(lab, order["authorizations"][0])
    http = next(c for c in a["challenges"] if c["type"] == "http-01")
    dns01 = next(c for c in a["challenges"] if c["type"] == "dns-01")
    await lab.service.db.update(challenges, http["url"].rsplit("/", 1)[1], status="processing")
    body = await (await lab.post(path_of(dns01["url"]), {})).json()
    assert body["status"] == "pending"


# --- tls-alpn-01 --------------------------------------------------------------------------

async def tls_responder(tmp_path, port, cert_pem, key_pem, alpn=("acme-tls/1",)):
    (tmp_path / "c.pem").write_bytes(cert_pem)
    (tmp_path / "k.pem").write_bytes(key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    seen = []
    ctx.sni_callback = lambda sock, name, _ctx: seen.append(name)

    async def handle(reader, writer):
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=ctx)
    server.sni = seen
    return server


@pytest.mark.parametrize("variant, ptype", [
    ("good", None), ("wrong-digest", "incorrectResponse"), ("not-critical", "incorrectResponse"),
    ("no-alpn", "tls"), ("nobody", "connection")])
async def test_tls_alpn01(lab, tmp_path, variant, ptype):
    resp, order = await new_order(lab, [{"type": "dns", "value": "t.example.test"}])
    a = await get(lab, order["authorizations"][0])
    ch = next(c for c in a["challenges"] if c["type"] == "tls-alpn-01")
    ka = key_authorization(lab, ch)
    server = None
    if variant != "nobody":
        cert, key = tls_alpn_certificate("t.example.test", ka, critical=variant != "not-critical",
                                         digest=b"\0" * 32 if variant == "wrong-digest" else None)
        server = await tls_responder(tmp_path, lab.tls_port, cert, key,
                                     alpn=() if variant == "no-alpn" else ("acme-tls/1",))
    try:
        await lab.post(path_of(ch["url"]), {})
        order = await wait_status(lab, resp.headers["Location"])
    finally:
        if server is not None:
            server.close()
    a = await get(lab, order["authorizations"][0])
    if ptype is None:
        assert order["status"] == "ready" and a["status"] == "valid"
        assert server.sni == ["t.example.test"]
    else:
        assert order["status"] == "invalid"
        failed = next(c for c in a["challenges"] if c["type"] == "tls-alpn-01")
        assert failed["error"]["type"] == P + ptype, failed


async def test_tls_alpn01_for_an_ip_identifier_uses_the_reverse_name(lab, tmp_path):
    resp, order = await new_order(lab, [{"type": "ip", "value": "127.0.0.1"}])
    a = await get(lab, order["authorizations"][0])
    assert sorted(c["type"] for c in a["challenges"]) == ["http-01", "tls-alpn-01"]  # never dns-01
    ch = next(c for c in a["challenges"] if c["type"] == "tls-alpn-01")
    cert, key = tls_alpn_certificate("127.0.0.1", key_authorization(lab, ch), ip=True)
    server = await tls_responder(tmp_path, lab.tls_port, cert, key)
    try:
        await lab.post(path_of(ch["url"]), {})
        order = await wait_status(lab, resp.headers["Location"])
    finally:
        server.close()
    assert order["status"] == "ready"
    assert server.sni == ["1.0.0.127.in-addr.arpa"]


# --- identifiers, profiles, validity ------------------------------------------------------

async def test_several_refused_identifiers_are_subproblems(lab):
    resp, body = await new_order(lab, [{"type": "dns", "value": "ok.example.test"},
                                       {"type": "dns", "value": "bad..name"},
                                       {"type": "email", "value": "a@example.test"}])
    assert resp.status == 400 and body["type"] == P + "rejectedIdentifier"
    subs = {s["identifier"]["value"]: s["type"] for s in body["subproblems"]}
    assert subs == {"bad..name": P + "rejectedIdentifier", "a@example.test": P + "unsupportedIdentifier"}
    resp, body = await new_order(lab, [{"type": "email", "value": "a@example.test"}])
    assert body["type"] == P + "unsupportedIdentifier" and "subproblems" not in body
    resp, body = await new_order(lab, [{"type": "ip", "value": "fe80::1%eth0"}])
    assert body["type"] == P + "rejectedIdentifier"


async def issue_http01(lab, names, **extra):
    resp, order = await new_order(lab, [{"type": "dns", "value": n} for n in names], **extra)
    assert resp.status == 201, order
    for url in order["authorizations"]:
        a = await get(lab, url)
        ch = next(c for c in a["challenges"] if c["type"] == "http-01")
        lab.tokens[ch["token"]] = key_authorization(lab, ch)
        await lab.post(path_of(ch["url"]), {})
    order = await wait_status(lab, resp.headers["Location"])
    assert order["status"] == "ready", order
    _, order = await finalize(lab, order, names)
    assert order["status"] == "valid", order
    return order, await certificate(lab, order)


async def test_profiles(lab):
    d = await (await lab.client.get("/acme/directory")).json()
    assert set(d["meta"]["profiles"]) == set(ACME_PROFILES) == {"server", "agent", "device"}
    order, cert = await issue_http01(lab, ["agent.example.test"], profile="agent")
    assert order["profile"] == "agent"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    order, cert = await issue_http01(lab, ["srv.example.test"])
    assert order["profile"] == "server"
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [ExtendedKeyUsageOID.SERVER_AUTH]
    resp, body = await new_order(lab, [{"type": "dns", "value": "p.example.test"}], profile="ocsp")
    assert resp.status == 400 and body["type"] == P + "invalidProfile"


async def test_not_before_not_after(lab, clock):
    nb = clock.now() + dt.timedelta(hours=1)
    na = nb + dt.timedelta(days=2)
    fmt = lambda t: t.isoformat().replace("+00:00", "Z")  # noqa: E731
    order, cert = await issue_http01(lab, ["v.example.test"], notBefore=fmt(nb), notAfter=fmt(na))
    assert order["notBefore"] == fmt(nb) and order["notAfter"] == fmt(na)
    assert cert.not_valid_before_utc == nb and cert.not_valid_after_utc == na
    for bad in ({"notBefore": fmt(na), "notAfter": fmt(nb)},
                {"notAfter": fmt(clock.now() + dt.timedelta(days=400))},
                {"notBefore": fmt(clock.now() - dt.timedelta(days=1))},
                {"notAfter": "tomorrow"}, {"notBefore": "2026-11-24T00:00:00"}):
        resp, body = await new_order(lab, [{"type": "dns", "value": "v.example.test"}], **bad)
        assert resp.status == 400 and body["type"] == P + "malformed", (bad, body)


# --- orders list, asynchronous finalize, recovery ------------------------------------------

async def test_orders_list_is_paginated(lab):
    lab.service.orders_page_size = 2
    made = []
    for i in range(5):
        resp, _ = await new_order(lab, [{"type": "dns", "value": f"o{i}.example.test"}])
        made.append(resp.headers["Location"].rsplit("/", 1)[1])
    account = await (await lab.post(path_of(lab.kid), None)).json()
    url, seen, pages = account["orders"], [], 0
    while url and pages < 10:
        resp = await lab.post(path_of(url), None)
        seen += [u.rsplit("/", 1)[1] for u in (await resp.json())["orders"]]
        url = resp.links.get("next", {}).get("url")
        url = str(url) if url else None
        pages += 1
    assert pages == 3 and sorted(seen) == sorted(made) and len(seen) == 5
    resp = await lab.post(path_of(account["orders"]) + "?cursor=nope", None)
    assert await problem_type(resp) == P + "malformed"


async def test_finalize_answers_processing_then_valid(lab):
    lab.service.finalize_wait = 0
    resp, order = await new_order(lab, [{"type": "dns", "value": "slow.example.test"}])
    a = await get(lab, order["authorizations"][0])
    ch = next(c for c in a["challenges"] if c["type"] == "http-01")
    lab.tokens[ch["token"]] = key_authorization(lab, ch)
    await lab.post(path_of(ch["url"]), {})
    order = await wait_status(lab, resp.headers["Location"])
    csr = make_csr(rsa_key(1), None, sans=[x509.DNSName("slow.example.test")])
    resp = await lab.post(path_of(order["finalize"]), {"csr": b64(csr)})
    body = await resp.json()
    assert body["status"] == "processing" and resp.headers["Retry-After"] == "1"
    again = await lab.post(path_of(order["finalize"]), {"csr": b64(csr)})
    assert await problem_type(again) == P + "orderNotReady"
    body = await wait_status(lab, resp.headers["Location"], until=("processing",))
    assert body["status"] == "valid" and body["certificate"]


async def test_interrupted_issuance_is_settled_from_the_store(lab, clock):
    svc = lab.service
    resp, order = await new_order(lab, [{"type": "dns", "value": "crash.example.test"}])
    oid = resp.headers["Location"].rsplit("/", 1)[1]
    await svc.db.update(orders, oid, status="processing", processing_at=clock.now())
    assert (await get(lab, resp.headers["Location"]))["status"] == "processing"  # still in time
    clock.advance(dt.timedelta(minutes=6))
    body = await get(lab, resp.headers["Location"])
    assert body["status"] == "invalid" and body["error"]["type"] == P + "serverInternal"


async def test_resume_revalidates_challenges_left_processing(lab):
    resp, order = await new_order(lab, [{"type": "dns", "value": "resume.example.test"}])
    a = await get(lab, order["authorizations"][0])
    ch = next(c for c in a["challenges"] if c["type"] == "http-01")
    lab.tokens[ch["token"]] = key_authorization(lab, ch)
    cid = ch["url"].rsplit("/", 1)[1]
    await lab.service.db.update(challenges, cid, status="processing")  # as a stopped process left it
    await lab.service.resume()
    order = await wait_status(lab, resp.headers["Location"])
    assert order["status"] == "ready"


async def test_authorization_holder_may_revoke(lab):
    order, cert = await issue_http01(lab, ["shared.example.test"])
    other = Acme(lab.client, rsa_key(2))
    await other.register()
    other.tokens = lab.tokens
    from cryptography.hazmat.primitives import serialization
    der = cert.public_bytes(serialization.Encoding.DER)
    resp = await other.post("/acme/revoke-cert", {"certificate": b64(der)})
    assert await problem_type(resp) == P + "unauthorized"
    # the other account proves control of the name, then may revoke
    resp, o2 = await new_order(other, [{"type": "dns", "value": "shared.example.test"}])
    a = await get(other, o2["authorizations"][0])
    ch = next(c for c in a["challenges"] if c["type"] == "http-01")
    lab.tokens[ch["token"]] = f"{ch['token']}.{thumb(other.key)}"
    await other.post(path_of(ch["url"]), {})
    assert (await wait_status(other, resp.headers["Location"]))["status"] == "ready"
    resp = await other.post("/acme/revoke-cert", {"certificate": b64(der), "reason": 4})
    assert resp.status == 200, await resp.text()
    rec = await lab.services.store.get_certificate(format(cert.serial_number, "x"))
    assert rec.status == "revoked"


@pytest.mark.parametrize("payload", [
    {}, {"identifiers": None}, {"identifiers": "x"}, {"identifiers": [None]}, {"identifiers": [[]]},
    {"identifiers": [{"type": "dns"}]}, {"identifiers": [{"type": 5, "value": "a.test"}]},
    {"identifiers": [{"type": "dns", "value": 5}]}, {"identifiers": [{"type": "dns", "value": "a" * 300}]},
    {"identifiers": [{"type": "ip", "value": "999.1.1.1"}]}, {"identifiers": [{"type": "dns", "value": "*"}]},
    {"identifiers": [{"type": "dns", "value": "é.example.test"}]},
    {"identifiers": [{"type": "dns", "value": "a.test"}] * 101},
    {"identifiers": [{"type": "dns", "value": "a.test"}], "notBefore": 5},
    {"identifiers": [{"type": "dns", "value": "a.test"}], "notAfter": ["x"]},
    {"identifiers": [{"type": "dns", "value": "a.test"}], "profile": {"x": 1}},
    {"identifiers": [{"type": "dns", "value": "a.test"}], "replaces": 7},
    {"identifiers": [{"type": "dns", "value": "a.test"}], "replaces": "a.b"},
])
async def test_malformed_orders_get_problems_never_500(lab, payload):
    resp = await lab.post("/acme/new-order", payload)
    assert 400 <= resp.status < 500
    body = await resp.json()
    assert body["type"].startswith(P) and "Traceback" not in body["detail"]


async def test_order_round_runs_in_few_units_and_validation_commits_once(lab):
    """Issue 13: every request of an order round is at most one read unit and one write unit
    (the nonce spent in the request's own write); a validation result moves challenge and
    authorization in one transaction (never a valid challenge under a pending authorization).
    Before: 66 statements, 12 write and 12 read transactions; the issuance's own units are the
    enrollment pipeline's."""
    from .test_acme_jws import sql_trace

    seen = sql_trace(lab.services.store)
    await issue_http01(lab, ["few.example.test"])
    heads = [" ".join(s.split()[:2]) for s in seen]
    pairs = list(zip(heads, heads[1:]))
    assert ("UPDATE acme_challenges", "UPDATE acme_authzs") in pairs
    acme_writes = [i for i, h in enumerate(heads) if h == "BEGIN IMMEDIATE"
                   and i + 1 < len(heads) and "acme_" in seen[i + 1].split("(")[0]]
    reads = heads.count("BEGIN")
    # newOrder, authz, challenge (+ its validation), order poll, finalize (+ order valid), certificate
    assert len(acme_writes) <= 8, heads
    assert reads <= 6, heads


async def test_order_turns_valid_in_the_certificates_transaction(lab):
    """Issue 13: the order names its certificate in the transaction that stores it (no write
    unit of its own after the issuance; never a stored certificate its order does not name)."""
    from .test_acme_jws import sql_trace

    seen = sql_trace(lab.services.store)
    order, cert = await issue_http01(lab, ["tx.example.test"])
    stored = next(i for i, s in enumerate(seen) if s.startswith("INSERT INTO certificates"))
    begin = max(i for i in range(stored) if seen[i].startswith("BEGIN"))
    end = next((i for i in range(stored, len(seen)) if seen[i].startswith("BEGIN")), len(seen))
    names_cert = [s for s in seen if s.startswith("UPDATE acme_orders") and "cert_serial" in s]
    assert len(names_cert) == 1 and names_cert[0] in seen[begin:end], seen[begin:end]
    assert order["certificate"].endswith(format(cert.serial_number, "x"))


@pytest.mark.parametrize("cached", [True, False])
async def test_challenge_response_starts_the_validation_in_its_one_unit(lab, cached):
    """Issue 13: answering a challenge is one unit when the signature verifies in it (SQLite, the
    account key cached): nonce spent, challenge read, challenge `processing`; before that, no
    other unit. Without a cached key the signature is verified outside and a second unit starts
    the validation (as on PostgreSQL); either way the challenge is validated once."""
    from .test_acme_jws import sql_trace

    resp, order = await new_order(lab, [{"type": "dns", "value": f"one{int(cached)}.example.test"}])
    a = await get(lab, order["authorizations"][0])
    ch = next(c for c in a["challenges"] if c["type"] == "http-01")
    lab.tokens[ch["token"]] = key_authorization(lab, ch)
    if not cached:
        lab.service._keys.clear()
    lab.service.respond_wait = 60.0
    nonce = await lab.nonce()
    seen = sql_trace(lab.services.store)
    answer = await (await lab.post(path_of(ch["url"]), {}, nonce=nonce)).json()
    assert answer["status"] == "valid", answer
    heads = [" ".join(s.split()[:2]) for s in seen]
    units = [i for i, h in enumerate(heads) if h.startswith("BEGIN")]
    first = seen[units[0]:units[1]]
    assert first[0] == "BEGIN IMMEDIATE" and "acme_used_nonces" in first[1], heads
    started = [s for s in seen if s.startswith("UPDATE acme_challenges SET status=?") and "validated" not in s]
    assert len(started) == 1, seen
    assert (started[0] in first) == cached, heads
    assert len(units) == (2 if cached else 3), heads  # + the validation's outcome
    # the nonce was spent by that unit: a replay is refused and starts nothing
    again = await lab.post(path_of(ch["url"]), {}, nonce=nonce)
    assert await problem_type(again) == P + "badNonce"


async def test_order_round_unit_statements_run_on_sqlites_driver(lab, monkeypatch):
    """Issue 13: on SQLite the statements of an order round's units (nonce, account, order,
    authorizations, challenges, certificate) run straight on the stdlib driver, as the core
    store's do (scepd.store.sql.execute): none goes through SQLAlchemy's Connection.execute
    (before: every one of them, about 30 µs each). A statement tracer still sees all of them
    (test_order_round_runs_in_few_units_and_validation_commits_once)."""
    await issue_http01(lab, ["warm.example.test"])  # nonce key, account key cache, CA chain
    executed = helpers.statements_through_sqlalchemy(monkeypatch)
    order, cert = await issue_http01(lab, ["driver.example.test", "two.example.test"])
    assert order["certificate"].endswith(format(cert.serial_number, "x"))
    assert executed == [], executed


async def test_new_order_is_one_unit(lab):
    """Issue 13: newOrder is one unit once the account key is cached (SQLite): nonce spent,
    account read, order, authorization and challenges inserted in one transaction (before: a
    read unit, then a write unit). A request refused after authentication inserts nothing and
    still spends its nonce in that unit."""
    from .test_acme_jws import sql_trace

    await get(lab, lab.kid)  # the account key cached (as after any earlier request)
    seen = sql_trace(lab.services.store)
    resp, order = await new_order(lab, [{"type": "dns", "value": "unit.example.test"}])
    assert resp.status == 201 and order["status"] == "pending", order
    heads = [" ".join(s.split()[:3]) for s in seen]
    assert [h for h in heads if h.startswith("BEGIN")] == ["BEGIN IMMEDIATE"], heads
    assert "acme_used_nonces" in seen[1], heads
    assert [h for h in heads if h.startswith("INSERT")] == [
        "INSERT INTO acme_used_nonces", "INSERT INTO acme_orders", "INSERT INTO acme_authzs",
        "INSERT INTO acme_challenges"], heads
    assert (await get(lab, resp.headers["Location"]))["status"] == "pending"
    seen.clear()
    resp, body = await new_order(lab, [{"type": "dns", "value": "-bad-"}])
    assert resp.status == 400 and body["type"].startswith(P), body
    assert [" ".join(s.split()[:3]) for s in seen if s.startswith("INSERT")] == [
        "INSERT INTO acme_used_nonces"], seen


async def test_first_order_after_new_account_is_one_unit(lab):
    """Issue 13: newAccount caches the account key (its jwk, verified there), so the account's
    first newOrder in this process verifies in its one unit too (before: the key was cached
    only by the first kid request, which then took two units)."""
    from .test_acme_jws import sql_trace

    other = Acme(lab.client, rsa_key(5))
    await other.register()
    seen = sql_trace(lab.services.store)
    resp, order = await new_order(other, [{"type": "dns", "value": "first.example.test"}])
    assert resp.status == 201 and order["status"] == "pending", order
    assert [s.split()[0] for s in seen if s.startswith("BEGIN")] == ["BEGIN"], seen
    assert seen[0] == "BEGIN IMMEDIATE" and "acme_used_nonces" in seen[1], seen
    assert sum(s.startswith("INSERT INTO acme_orders") for s in seen) == 1, seen


async def test_finalize_checks_the_csr_in_the_reads_thread_hop(lab, monkeypatch):
    """Issue 13: finalize decodes and verifies the CSR in its read unit's own thread hop, before
    the unit (SqlStore.read's `prepare`), not in a worker thread hop of its own; a bad CSR is
    still answered (badCSR, malformed), only once the order is found ready."""
    import threading

    import acme.service as service_mod

    threads: list[str] = []
    real = service_mod.decode_csr

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)
    monkeypatch.setattr(service_mod, "decode_csr", spy)
    resp, order = await new_order(lab, [{"type": "dns", "value": "hop.example.test"}])
    bad = await lab.post(path_of(order["finalize"]), {"csr": b64(b"\x30\x03\x02\x01\x00")})
    assert await problem_type(bad) == P + "orderNotReady"  # the order first, then the CSR
    order, _cert = await issue_http01(lab, ["hop2.example.test"])
    assert order["status"] == "valid"
    assert len(threads) == 2 and all(t.startswith("scepd-db-read") for t in threads), threads
    resp, order = await new_order(lab, [{"type": "dns", "value": "hop3.example.test"}])
    for url in order["authorizations"]:
        ch = next(c for c in (await get(lab, url))["challenges"] if c["type"] == "http-01")
        lab.tokens[ch["token"]] = key_authorization(lab, ch)
        await lab.post(path_of(ch["url"]), {})
    order = await wait_status(lab, resp.headers["Location"])
    bad = await lab.post(path_of(order["finalize"]), {"csr": "!not-base64url!"})
    assert await problem_type(bad) == P + "badCSR"
    bad = await lab.post(path_of(order["finalize"]), {"csr": b64(b"\x30\x03\x02\x01\x00")})
    assert await problem_type(bad) == P + "malformed"  # not DER (as before)
    assert len(threads) == 3 and all(t.startswith("scepd-db-read") for t in threads), threads
