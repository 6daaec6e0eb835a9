"""The web console (issue 17) without a browser: sign-in with a token (wrong token, expired and
revoked sessions), CSRF on every form, admin and non-admin client certificates, escaping, the
timeline's counts, and placement (where the admin API is)."""
from __future__ import annotations

import datetime as dt
import re

import aiohttp
import pytest
from aiohttp import DummyCookieJar

from scepd.admin.service import AdminService
from scepd.ca.revocation import RevocationReason
from scepd.console import queries
from scepd.console.session import COOKIE, PRE_COOKIE, Sessions
from scepd.http.app import create_admin_app, create_https_app

from .helpers import rsa_key
from .test_admin_api import _ctx, _pem, https  # noqa: F401  (https: the real TLS listener fixture)
from .test_revocation_tls import _issue

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


async def _token(services) -> tuple[int, str]:
    return await AdminService(services.store, services.clock).create_token("ops", actor="test")


@pytest.fixture
async def ui(services, aiohttp_client):
    """The HTTPS app over plain HTTP (no client certificate), without a cookie jar: cookies are sent by hand."""
    return await aiohttp_client(create_https_app(services), cookie_jar=DummyCookieJar())


async def _login_form(ui) -> tuple[str, str]:
    r = await ui.get("/ui/login")
    assert r.status == 200
    return r.cookies[PRE_COOKIE].value, CSRF.search(await r.text()).group(1)


async def sign_in(ui, token: str) -> str:
    nonce, csrf = await _login_form(ui)
    r = await ui.post("/ui/login", data={"csrf": csrf, "token": token}, cookies={PRE_COOKIE: nonce},
                      allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/ui/certificates", await r.text()
    return r.cookies[COOKIE].value


async def _page_csrf(ui, session: str, path: str) -> str:
    r = await ui.get(path, cookies={COOKIE: session}, allow_redirects=False)
    assert r.status == 200, await r.text()
    return CSRF.search(await r.text()).group(1)


async def test_token_sign_in_sets_a_strict_session_cookie(services, ui):
    _id, token = await _token(services)
    nonce, csrf = await _login_form(ui)
    r = await ui.post("/ui/login", data={"csrf": csrf, "token": token}, cookies={PRE_COOKIE: nonce},
                      allow_redirects=False)
    assert r.status == 303
    header = next(h for h in r.headers.getall("Set-Cookie") if h.startswith(COOKIE + "="))
    assert "HttpOnly" in header and "Secure" in header and "SameSite=Strict" in header
    assert "Max-Age=28800" in header and "Path=/ui/" in header
    assert token not in header  # the cookie carries a signed id, never the token
    r = await ui.get("/ui/certificates", cookies={COOKIE: r.cookies[COOKIE].value}, allow_redirects=False)
    assert r.status == 200 and "Sign out" in await r.text()
    assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]


@pytest.mark.parametrize("token", ["scepd_wrong", "", "not-a-token"])
async def test_a_wrong_token_does_not_sign_in(services, ui, token):
    await _token(services)
    nonce, csrf = await _login_form(ui)
    r = await ui.post("/ui/login", data={"csrf": csrf, "token": token}, cookies={PRE_COOKIE: nonce},
                      allow_redirects=False)
    assert r.status == 401 and "Invalid or revoked token" in await r.text()
    assert COOKIE not in r.cookies


async def test_without_a_session_pages_redirect_to_sign_in(services, ui):
    for path in ("/ui/", "/ui/certificates", "/ui/timeline", "/ui/pending", "/ui/agents", "/ui/ca", "/ui/audit"):
        r = await ui.get(path, allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/ui/login", path
    forged = "1.99999999999.AAAA"
    r = await ui.get("/ui/certificates", cookies={COOKIE: forged}, allow_redirects=False)
    assert r.status == 303


async def test_a_session_expires(services, ui, clock):
    _id, token = await _token(services)
    session = await sign_in(ui, token)
    clock.advance(dt.timedelta(hours=7, minutes=59))
    assert (await ui.get("/ui/certificates", cookies={COOKIE: session}, allow_redirects=False)).status == 200
    clock.advance(dt.timedelta(minutes=1))
    r = await ui.get("/ui/certificates", cookies={COOKIE: session}, allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/ui/login"


async def test_revoking_the_token_ends_its_sessions(services, ui):
    token_id, token = await _token(services)
    session = await sign_in(ui, token)
    assert await AdminService(services.store, services.clock).revoke_token(token_id, actor="test")
    r = await ui.get("/ui/certificates", cookies={COOKIE: session}, allow_redirects=False)
    assert r.status == 303


async def test_signing_out_ends_the_session_for_every_copy_of_its_cookie(services, ui, clock):
    """Sign-out is recorded in the store: a copy of the cookie (another browser, a stolen one)
    no longer signs in, in any worker; another session of the same token goes on."""
    _id, token = await _token(services)
    session = await sign_in(ui, token)
    other = await sign_in(ui, token)
    assert session != other
    copy = str(session)
    csrf = await _page_csrf(ui, session, "/ui/certificates")
    r = await ui.post("/ui/logout", data={"csrf": csrf}, cookies={COOKIE: session}, allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/ui/login"
    r = await ui.get("/ui/certificates", cookies={COOKIE: copy}, allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/ui/login"
    r = await ui.post("/ui/logout", data={"csrf": csrf}, cookies={COOKIE: copy}, allow_redirects=False)
    assert r.status == 401  # a signed-out session cannot post either
    assert (await ui.get("/ui/certificates", cookies={COOKIE: other}, allow_redirects=False)).status == 200
    # the record of a sign-out lives as long as the session would have, then goes with the next one
    import sqlalchemy as sa
    from scepd.console.queries import console_signouts
    count = lambda: services.store.read(lambda c: c.execute(sa.select(sa.func.count()).select_from(console_signouts)).scalar())  # noqa: E731
    assert await count() == 1
    clock.advance(dt.timedelta(hours=8))
    third = await sign_in(ui, token)
    csrf = await _page_csrf(ui, third, "/ui/certificates")
    await ui.post("/ui/logout", data={"csrf": csrf}, cookies={COOKIE: third}, allow_redirects=False)
    assert await count() == 1


async def test_a_cookie_signed_with_another_key_is_refused(services, ui):
    _id, token = await _token(services)
    await sign_in(ui, token)
    other, _ = Sessions(b"k" * 32, services.clock).issue(_id)
    assert (await ui.get("/ui/certificates", cookies={COOKIE: other}, allow_redirects=False)).status == 303


async def test_every_form_needs_its_csrf_token(services, ui):
    issued = await _issue(services, "csrf-1", rsa_key(0))
    serial = issued.record.serial
    _id, token = await _token(services)
    session = await sign_in(ui, token)
    csrf = await _page_csrf(ui, session, f"/ui/certificates/{serial}")
    for data in ({"reason": "keyCompromise", "confirm": "yes"},
                 {"reason": "keyCompromise", "confirm": "yes", "csrf": "x" + csrf}):
        r = await ui.post(f"/ui/certificates/{serial}/revoke", data=data, cookies={COOKIE: session},
                          allow_redirects=False)
        assert r.status == 403 and "CSRF" in await r.text()
    assert (await services.store.get_certificate(serial)).status == "valid"
    # sign-out and sign-in too
    r = await ui.post("/ui/logout", data={}, cookies={COOKIE: session}, allow_redirects=False)
    assert r.status == 403
    nonce, login_csrf = await _login_form(ui)
    r = await ui.post("/ui/login", data={"token": token}, cookies={PRE_COOKIE: nonce}, allow_redirects=False)
    assert r.status == 403 and COOKIE not in r.cookies
    # with the token: the confirmation box is required, then the revocation is done and audited
    r = await ui.post(f"/ui/certificates/{serial}/revoke", data={"reason": "keyCompromise", "csrf": csrf},
                      cookies={COOKIE: session}, allow_redirects=False)
    assert r.status == 400 and "confirmation" in await r.text()
    r = await ui.post(f"/ui/certificates/{serial}/revoke", data={"reason": "keyCompromise", "confirm": "yes",
                                                                  "csrf": csrf},
                      cookies={COOKIE: session}, allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == f"/ui/certificates/{serial}"
    rec = await services.store.get_certificate(serial)
    assert rec.status == "revoked" and rec.revocation_reason == "keyCompromise"
    page = await (await ui.get(f"/ui/certificates/{serial}", cookies={COOKIE: session})).text()
    assert "certificate.revoked" in page and f"console:token:{_id}:ops" in page
    r = await ui.post("/ui/logout", data={"csrf": csrf}, cookies={COOKIE: session}, allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/ui/login"


async def test_subjects_are_escaped(services, ui):
    issued = await _issue(services, "<script>alert(1)</script>", rsa_key(1))
    assert "<script" in issued.record.subject
    _id, token = await _token(services)
    session = await sign_in(ui, token)
    for path in ("/ui/certificates", f"/ui/certificates/{issued.record.serial}", "/ui/audit"):
        text = await (await ui.get(path, cookies={COOKIE: session})).text()
        assert "<script" not in text and "</script" not in text and "&lt;script" in text, path


async def test_inventory_search_filters_and_pem(services, ui):
    a = await _issue(services, "router-a.example", rsa_key(0))
    b = await _issue(services, "printer-b.example", rsa_key(1))
    await services.revocation.revoke(b.record.serial, RevocationReason.SUPERSEDED, "test")
    _id, token = await _token(services)
    session = await sign_in(ui, token)

    async def listing(query: str) -> str:
        r = await ui.get(f"/ui/certificates?{query}", cookies={COOKIE: session})
        assert r.status == 200
        return await r.text()
    text = await listing("q=router")
    assert "router-a.example" in text and "printer-b.example" not in text
    text = await listing(f"q={b.record.serial.upper()}")
    assert "printer-b.example" in text and "router-a.example" not in text
    text = await listing("state=revoked")
    assert "printer-b.example" in text and "router-a.example" not in text
    text = await listing("state=valid&protocol=test&profile=agent")
    assert "router-a.example" in text and "printer-b.example" not in text
    assert "No certificate matches" in await listing("protocol=acme")
    assert (await ui.get("/ui/certificates?page=0", cookies={COOKIE: session})).status == 400
    assert (await ui.get("/ui/certificates?state=nope", cookies={COOKIE: session})).status == 400
    r = await ui.get(f"/ui/certificates/{a.record.serial}.pem", cookies={COOKIE: session})
    assert r.status == 200 and (await r.text()).startswith("-----BEGIN CERTIFICATE-----")
    assert (await ui.get("/ui/certificates/zz", cookies={COOKIE: session})).status == 400
    assert (await ui.get("/ui/certificates/abcdef", cookies={COOKIE: session})).status == 404


async def test_timeline_counts(services, clock):
    """Bucketed per day from `at`; the expired and revoked counts beside them."""
    at = clock.now() + dt.timedelta(days=2)
    for days, n in ((5, 2), (42, 1), (92, 1), (1, 1), (202, 1)):  # validity from clock.now()
        services.enrollment.validity = dt.timedelta(days=days)
        for i in range(n):
            await _issue(services, f"t{days}-{i}", rsa_key(0))
    rev = await _issue(services, "gone", rsa_key(1))
    await services.revocation.revoke(rev.record.serial, RevocationReason.UNSPECIFIED, "test")
    t = await services.store.read(queries.timeline(at))
    assert len(t.per_day) == 91 and sum(t.per_day) == 4
    assert t.per_day[3] == 2 and t.per_day[40] == 1 and t.per_day[90] == 1
    assert t.expired == 1 and t.revoked == 1


async def test_admin_certificate_signs_in_and_others_are_403(services, https, tmp_path):  # noqa: F811
    admin = AdminService(services.store, services.clock, services.enrollment)
    cert = await admin.issue_admin_certificate("alice", actor="test")
    ctx = _ctx(services, tmp_path, _pem(services, cert.cert), cert.key_pem)
    issued = await _issue(services, "victim", rsa_key(0))
    async with aiohttp.ClientSession(cookie_jar=DummyCookieJar()) as s:
        async with s.get(f"{https}/ui/certificates/{issued.record.serial}", ssl=ctx, allow_redirects=False) as r:
            text = await r.text()
            assert r.status == 200 and "cert:" in text and "CN=alice" in text
            csrf = CSRF.search(text).group(1)
        async with s.post(f"{https}/ui/certificates/{issued.record.serial}/revoke", ssl=ctx, allow_redirects=False,
                          data={"reason": "superseded", "confirm": "yes"}) as r:
            assert r.status == 403
        async with s.post(f"{https}/ui/certificates/{issued.record.serial}/revoke", ssl=ctx, allow_redirects=False,
                          data={"reason": "superseded", "confirm": "yes", "csrf": csrf}) as r:
            assert r.status == 303
    assert (await services.store.get_certificate(issued.record.serial)).status == "revoked"
    # a valid certificate of ours that is not an admin certificate: 403 on every page
    key = rsa_key(1)
    agent = await _issue(services, "agent-x", key)
    from cryptography.hazmat.primitives import serialization
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    ctx = _ctx(services, tmp_path, _pem(services, agent.cert), key_pem)
    async with aiohttp.ClientSession(cookie_jar=DummyCookieJar()) as s:
        for path in ("/ui/certificates", "/ui/pending", "/ui/timeline"):
            async with s.get(f"{https}{path}", ssl=ctx, allow_redirects=False) as r:
                assert r.status == 403 and "not an admin certificate" in await r.text(), path


async def test_the_console_is_where_the_admin_api_is(make_services, aiohttp_client):
    services = await make_services({"SCEPD_SERVER_ADMIN": "127.0.0.1:8445"})
    https_app = await aiohttp_client(create_https_app(services))
    admin_app = await aiohttp_client(create_admin_app(services))
    assert (await https_app.get("/ui/login")).status == 404
    assert (await admin_app.get("/ui/login")).status == 200


async def _pending(services, cn: str, key) -> int:
    import hashlib

    from scepd.ca.csr import decode_csr
    from scepd.store import PendingRecord

    from .helpers import make_csr
    csr = make_csr(key, cn)
    spki = decode_csr(csr).spki_sha256
    async with services.store.transaction() as tx:
        return await tx.insert_pending(PendingRecord(
            id=0, transaction_id=hashlib.sha256(csr).hexdigest(), spki_sha256=spki, signer_spki_sha256=spki,
            csr_der=csr, subject=f"CN={cn}", profile=services.config.scep.profile, protocol="scep",
            requester="test", created_at=services.clock.now()))


async def test_approve_and_reject_are_audited_with_the_signed_in_actor(services, ui):
    ok = await _pending(services, "approve-me", rsa_key(0))
    no = await _pending(services, "reject-me", rsa_key(1))
    token_id, token = await _token(services)
    session = await sign_in(ui, token)
    csrf = await _page_csrf(ui, session, "/ui/pending")
    actor = f"console:token:{token_id}:ops"
    r = await ui.post(f"/ui/pending/{no}/reject", data={"csrf": csrf, "reason": "  "}, cookies={COOKIE: session},
                      allow_redirects=False)
    assert r.status == 400 and "reason" in await r.text()
    r = await ui.post(f"/ui/pending/{no}/reject", data={"csrf": csrf, "reason": "unknown device"},
                      cookies={COOKIE: session}, allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/ui/pending"
    rejected = await services.store.get_pending(no)
    assert rejected.status == "rejected" and rejected.reason == "unknown device" and rejected.decided_by == actor
    r = await ui.post(f"/ui/pending/{ok}/approve", data={"csrf": csrf}, cookies={COOKIE: session},
                      allow_redirects=False)
    assert r.status == 303
    approved = await services.store.get_pending(ok)
    assert approved.status == "issued" and approved.decided_by == actor
    assert r.headers["Location"] == f"/ui/certificates/{approved.serial}"
    # deciding twice is refused with the service's message, not a 500
    r = await ui.post(f"/ui/pending/{ok}/approve", data={"csrf": csrf}, cookies={COOKIE: session},
                      allow_redirects=False)
    assert 400 <= r.status < 500 and "already" in await r.text()
    assert (await ui.post("/ui/pending/x/approve", data={"csrf": csrf}, cookies={COOKIE: session})).status == 400
    text = await (await ui.get("/ui/audit", cookies={COOKIE: session})).text()
    assert actor in text and "unknown device" in text
    assert "No request is waiting" in await (await ui.get("/ui/pending", cookies={COOKIE: session})).text()


async def test_agents_page_shows_health(services, ui, clock):
    from scepd.ops.agents import AgentInventory, Checkin
    now = clock.now()
    inv = AgentInventory(services.store, clock)
    await inv.record(Checkin("fresh-host", "1.0", "a1", "CN=fresh", now + dt.timedelta(days=30)))
    await inv.record(Checkin("<b>old-host</b>", "1.0", "a2", "CN=old", now + dt.timedelta(days=30)))
    clock.advance(dt.timedelta(days=4))
    await inv.record(Checkin("fresh-host", "1.1", "a1", "CN=fresh", now + dt.timedelta(days=30)))
    _id, token = await _token(services)
    session = await sign_in(ui, token)
    text = await (await ui.get("/ui/agents", cookies={COOKIE: session})).text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"<tr><td>([^<]*)</td>.*?</tr>", text)}
    assert "healthy" in rows["fresh-host"] and "1.1" in rows["fresh-host"]
    assert "silent" in rows["&lt;b&gt;old-host&lt;/b&gt;"]


async def test_inventory_pages(services, ui, monkeypatch):
    monkeypatch.setattr(queries, "PAGE_SIZE", 2)
    for i in range(5):
        await _issue(services, f"page-{i}", rsa_key(0))
    _id, token = await _token(services)
    session = await sign_in(ui, token)
    seen = []
    for page in (1, 2, 3):
        text = await (await ui.get(f"/ui/certificates?q=page-&page={page}", cookies={COOKIE: session})).text()
        seen += re.findall(r"CN=(page-\d)", text)
        assert ('rel="next"' in text) == (page < 3) and ('rel="prev"' in text) == (page > 1)
        if page < 3:
            assert f'href="/ui/certificates?q=page-&amp;page={page + 1}"' in text
    assert sorted(seen) == [f"page-{i}" for i in range(5)]


def test_the_session_key_is_created_once_and_shared(tmp_path, clock):
    from scepd.console.session import KEY_FILE, load_key
    key = load_key(tmp_path)
    assert len(key) == 32 and load_key(tmp_path) == key
    assert (tmp_path / KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE]
    value, _ = Sessions(key, clock).issue(7)
    assert Sessions(load_key(tmp_path), clock).verify(value).token_id == 7  # another worker reads the same key
    tampered = value.replace("7.", "8.", 1)
    assert Sessions(key, clock).verify(tampered) is None


async def test_ca_status(services, ui):
    from cryptography.hazmat.primitives import serialization

    from scepd.ca import pki
    _id, token = await _token(services)
    session = await sign_in(ui, token)
    text = await (await ui.get("/ui/ca", cookies={COOKIE: session})).text()
    crl = await services.crl.current()
    assert services.authority.ca_id in text and "none staged" in text
    assert re.search(rf"CRL number</th><td>{crl.number}</td>", text)
    assert crl.next_update.strftime("%Y-%m-%d %H:%M:%S UTC") in text
    assert f"{services.config.base_url}/ocsp" in text
    # a next CA staged by `scepd ca rollover` (its certificate in the next/ directory) is shown
    nxt = pki.next_dir(services.config.state_dir)
    nxt.mkdir(parents=True, exist_ok=True)
    (nxt / "ca.pem").write_bytes(services.ca_material.root.public_bytes(serialization.Encoding.PEM))
    text = await (await ui.get("/ui/ca", cookies={COOKIE: session})).text()
    assert "none staged" not in text and "CN=Test" in text.split("Next CA", 1)[1]


async def test_every_page_reads_postgresql_too(make_services, aiohttp_client, postgres_cluster):
    """The console's own queries (scepd/console/queries.py) on PostgreSQL: filters, search,
    the timeline buckets, pending, agents, CA and audit pages."""
    url = postgres_cluster.create_database("scepd_console_pg")
    services = await make_services({"SCEPD_DATABASE_URL": url, "SCEPD_SCEP_STATIC_CHALLENGE": "s"})
    ui = await aiohttp_client(create_https_app(services), cookie_jar=DummyCookieJar())
    a = await _issue(services, "pg-router.example", rsa_key(0))
    b = await _issue(services, "pg-printer.example", rsa_key(1))
    await services.revocation.revoke(b.record.serial, RevocationReason.SUPERSEDED, "test")
    await _pending(services, "pg-pending.example", rsa_key(2))
    _id, token = await _token(services)
    session = await sign_in(ui, token)

    async def page(path: str) -> str:
        r = await ui.get(path, cookies={COOKIE: session})
        assert r.status == 200, (path, r.status, await r.text())
        return await r.text()
    text = await page("/ui/certificates?q=ROUTER&state=valid&protocol=test")
    assert "pg-router.example" in text and "pg-printer.example" not in text
    assert "pg-printer.example" in await page(f"/ui/certificates?q={b.record.serial}")
    assert "pg-router.example" in await page(f"/ui/certificates/{a.record.serial}")
    assert "revoked" in (await page("/ui/timeline")).lower()
    t = await services.store.read(queries.timeline(services.clock.now()))
    assert t.revoked == 1 and sum(t.per_day) == 1
    assert "pg-pending.example" in await page("/ui/pending")
    for path in ("/ui/agents", "/ui/ca", "/ui/audit"):
        await page(path)


async def test_filter_menus_are_read_once_a_minute(services, ui, clock, monkeypatch):
    """The menus are DISTINCTs over the whole inventory: not on every page view."""
    calls = []
    real = queries.choices

    def counting(conn):
        calls.append(1)
        return real(conn)
    monkeypatch.setattr(queries, "choices", counting)
    await _issue(services, "menu.example", rsa_key(0))
    _id, token = await _token(services)
    session = await sign_in(ui, token)
    for _ in range(3):
        assert (await ui.get("/ui/certificates", cookies={COOKIE: session})).status == 200
    assert len(calls) == 1
    clock.advance(dt.timedelta(seconds=61))
    assert (await ui.get("/ui/certificates", cookies={COOKIE: session})).status == 200
    assert len(calls) == 2
